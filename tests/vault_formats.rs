//! Known-answer tests of Vault's documented wire formats, decided by
//! computations made here, independently of the engine, with aws-lc-rs on
//! keys the test knows (moved in through Vault's BYOK import):
//!
//! - ciphertext: `vault:v{N}:` + standard base64 of nonce ‖ ciphertext ‖
//!   tag, a 12-byte nonce and a 16-byte tag, for AES-128/256-GCM and
//!   ChaCha20-Poly1305: a ciphertext built here with a fixed nonce opens in
//!   the engine, and the engine's ciphertexts open here;
//! - datakeys: the `ciphertext` of `datakey/plaintext` opens here to the
//!   `plaintext` returned beside it; `datakey/wrapped` opens to `bits/8`
//!   bytes;
//! - HMAC: `vault:v1:` + base64 of the raw MAC, equal byte for byte;
//! - signatures: deterministic schemes (Ed25519, RSA PKCS#1 v1.5) equal to
//!   the signature made here; JWS marshaling is unpadded base64url, of raw
//!   r ‖ s for ECDSA, verified here with the fixed-length algorithms, and
//!   signatures made here verify in the engine in both marshalings.
//!
//! Shapes alone (field names, lengths) are in tests/transit.rs; the BYOK
//! flow's refusals are in tests/wrap.rs.
mod common;

use aes_kw::{KeyInit, KwpAes256};
use aws_lc_rs::aead::{
    Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, EcdsaSigningAlgorithm, EcdsaVerificationAlgorithm, Ed25519KeyPair, KeyPair,
    RsaKeyPair, UnparsedPublicKey,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

struct T {
    s: TestServer,
    c: reqwest::Client,
    app: String,
    wrapping_pem: String,
}

impl T {
    async fn new() -> T {
        let s = TestServer::start(Opts::default());
        let (_co, app) = s.init_with_app_user().await;
        let c = s.client();
        let (st, body) = s.get(&c, "/v1/transit/wrapping_key", Some(&app)).await;
        assert_eq!(st, 200, "{body}");
        let wrapping_pem = body["data"]["public_key"].as_str().unwrap().to_string();
        T {
            s,
            c,
            app,
            wrapping_pem,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.s.post(&self.c, path, Some(&self.app), body).await
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (st, resp) = self.post(path, body.clone()).await;
        assert_eq!(st, 200, "{path} {body}: {resp}");
        resp["data"].clone()
    }

    async fn text(&self, path: &str, body: Value, field: &str) -> String {
        self.ok(path, body).await[field]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no {field}"))
            .to_string()
    }

    /// Vault's BYOK import of `material` as `name` of type `ty`.
    async fn import(&self, name: &str, ty: &str, material: &[u8]) {
        let info = self
            .ok(
                &format!("/v1/transit/keys/{name}/import"),
                json!({"ciphertext": vault_wrap(&self.wrapping_pem, material), "type": ty}),
            )
            .await;
        assert_eq!(info["type"], ty);
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new().fill(&mut v).unwrap();
    v
}

/// A Vault BYOK client: an ephemeral AES-256 key under RSA-OAEP-SHA256 with
/// the wrapping key, then the target under AES-KWP with it.
fn vault_wrap(pem: &str, target: &[u8]) -> String {
    let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let public = PublicEncryptingKey::from_der(&STANDARD.decode(der).unwrap()).unwrap();
    let public = OaepPublicEncryptingKey::new(public).unwrap();
    let ephemeral = random(32);
    let mut block = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(&OAEP_SHA256_MGF1SHA256, &ephemeral, &mut block, None)
        .unwrap()
        .len();
    block.truncate(n);
    let mut wrapped = vec![0u8; target.len().div_ceil(8) * 8 + 8];
    let w = KwpAes256::new_from_slice(&ephemeral)
        .unwrap()
        .wrap_key(target, &mut wrapped)
        .unwrap()
        .to_vec();
    STANDARD.encode([block, w].concat())
}

/// The payload of `vault:v{version}:...`, standard base64 (padded).
fn payload(value: &str, version: u32) -> Vec<u8> {
    let prefix = format!("vault:v{version}:");
    let body = value
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("not {prefix}: {value}"));
    STANDARD
        .decode(body)
        .unwrap_or_else(|e| panic!("not standard base64 ({e}): {value}"))
}

fn seal_here(
    alg: &'static Algorithm,
    key: &[u8],
    nonce: [u8; 12],
    pt: &[u8],
    aad: &[u8],
) -> String {
    let key = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
    let mut buf = pt.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .unwrap();
    format!(
        "vault:v1:{}",
        STANDARD.encode([nonce.as_slice(), &buf].concat())
    )
}

fn open_here(alg: &'static Algorithm, key: &[u8], ct: &str, aad: &[u8]) -> Vec<u8> {
    let blob = payload(ct, 1);
    assert!(blob.len() >= 28, "nonce + tag at least: {ct}");
    let (nonce, rest) = blob.split_at(12);
    let key = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
    let mut buf = rest.to_vec();
    key.open_in_place(
        Nonce::try_assume_unique_for_key(nonce).unwrap(),
        Aad::from(aad),
        &mut buf,
    )
    .unwrap_or_else(|_| panic!("does not open with the known key: {ct}"))
    .to_vec()
}

const AEADS: [(&str, &Algorithm, usize); 3] = [
    ("aes128-gcm96", &AES_128_GCM, 16),
    ("aes256-gcm96", &AES_256_GCM, 32),
    ("chacha20-poly1305", &CHACHA20_POLY1305, 32),
];

#[tokio::test]
async fn ciphertexts_are_vault_v1_nonce_ciphertext_tag_both_ways() {
    let t = T::new().await;
    for (ty, alg, size) in AEADS {
        // A fixed key, nonce, plaintext and AAD: the ciphertext below is
        // fully determined here, and must open in the engine.
        let key: Vec<u8> = (0..size as u8).collect();
        t.import(ty, ty, &key).await;
        let nonce: [u8; 12] = std::array::from_fn(|i| 0xa0 + i as u8);
        let pt = b"Vault Transit known answer \x00\xff";
        let aad = b"tenant=42";
        let made_here = seal_here(alg, &key, nonce, pt, aad);
        let body = payload(&made_here, 1);
        assert_eq!(&body[..12], &nonce, "nonce first");
        assert_eq!(body.len(), 12 + pt.len() + 16, "then ciphertext and tag");
        let back = t
            .text(
                &format!("/v1/transit/decrypt/{ty}"),
                json!({"ciphertext": made_here, "associated_data": STANDARD.encode(aad)}),
                "plaintext",
            )
            .await;
        assert_eq!(STANDARD.decode(back).unwrap(), pt, "{ty}");
        // The tag really is checked: one flipped bit is refused.
        let mut flipped = body.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let (st, _) = t
            .post(
                &format!("/v1/transit/decrypt/{ty}"),
                json!({"ciphertext": format!("vault:v1:{}", STANDARD.encode(&flipped)),
                       "associated_data": STANDARD.encode(aad)}),
            )
            .await;
        assert_eq!(st, 400, "{ty}: a flipped tag bit");
        // Version 2 of a one-version key does not exist.
        let (st, _) = t
            .post(
                &format!("/v1/transit/decrypt/{ty}"),
                json!({"ciphertext": made_here.replacen("vault:v1:", "vault:v2:", 1),
                       "associated_data": STANDARD.encode(aad)}),
            )
            .await;
        assert_eq!(st, 400, "{ty}: vault:v2: of a key with one version");

        // The other way: the engine's ciphertext opens here.
        let ct = t
            .text(
                &format!("/v1/transit/encrypt/{ty}"),
                json!({"plaintext": STANDARD.encode(pt), "associated_data": STANDARD.encode(aad)}),
                "ciphertext",
            )
            .await;
        assert_eq!(payload(&ct, 1).len(), 12 + pt.len() + 16, "{ty}: {ct}");
        assert_eq!(open_here(alg, &key, &ct, aad), pt, "{ty}");
    }
}

#[tokio::test]
async fn datakeys_open_here_to_the_plaintext_returned() {
    let t = T::new().await;
    let key = random(32);
    t.import("dk", "aes256-gcm96", &key).await;
    for bits in [128usize, 256, 512] {
        let d = t
            .ok("/v1/transit/datakey/plaintext/dk", json!({"bits": bits}))
            .await;
        let plain = STANDARD.decode(d["plaintext"].as_str().unwrap()).unwrap();
        assert_eq!(plain.len(), bits / 8);
        let ct = d["ciphertext"].as_str().unwrap();
        assert_eq!(open_here(&AES_256_GCM, &key, ct, b""), plain, "bits={bits}");
        assert_eq!(d["key_version"], 1);
        let w = t
            .ok("/v1/transit/datakey/wrapped/dk", json!({"bits": bits}))
            .await;
        assert!(w.get("plaintext").is_none(), "{w}");
        let ct = w["ciphertext"].as_str().unwrap();
        assert_eq!(open_here(&AES_256_GCM, &key, ct, b"").len(), bits / 8);
    }
}

#[tokio::test]
async fn hmacs_equal_the_hmac_computed_here() {
    let t = T::new().await;
    let key = random(32);
    t.import("h", "hmac", &key).await;
    let msg = b"webhook body";
    for (name, alg) in [
        ("sha2-256", hmac::HMAC_SHA256),
        ("sha2-384", hmac::HMAC_SHA384),
        ("sha2-512", hmac::HMAC_SHA512),
    ] {
        let want = hmac::sign(&hmac::Key::new(alg, &key), msg);
        // Both places Vault reads the algorithm from: the path and the body.
        for (path, body) in [
            (
                format!("/v1/transit/hmac/h/{name}"),
                json!({"input": STANDARD.encode(msg)}),
            ),
            (
                "/v1/transit/hmac/h".to_string(),
                json!({"input": STANDARD.encode(msg), "algorithm": name}),
            ),
        ] {
            let mac = t.text(&path, body, "hmac").await;
            assert_eq!(payload(&mac, 1), want.as_ref(), "{name} via {path}");
        }
        let here = format!("vault:v1:{}", STANDARD.encode(want.as_ref()));
        let v = t
            .ok(
                &format!("/v1/transit/verify/h/{name}"),
                json!({"input": STANDARD.encode(msg), "hmac": here}),
            )
            .await;
        assert_eq!(v["valid"], true, "{name}: the HMAC made here verifies");
        let v = t
            .ok(
                &format!("/v1/transit/verify/h/{name}"),
                json!({"input": STANDARD.encode(b"other"), "hmac": here}),
            )
            .await;
        assert_eq!(v["valid"], false, "{name}: for other input it does not");
    }
}

/// Signs through the engine and returns (the `vault:v1:` text, raw bytes).
async fn engine_sign(t: &T, name: &str, body: Value, jws: bool) -> (String, Vec<u8>) {
    let sig = t
        .text(&format!("/v1/transit/sign/{name}"), body, "signature")
        .await;
    let b = sig.strip_prefix("vault:v1:").unwrap();
    let raw = if jws {
        assert!(
            !b.contains(['+', '/', '=']),
            "JWS: unpadded base64url: {sig}"
        );
        URL_SAFE_NO_PAD.decode(b).unwrap()
    } else {
        STANDARD.decode(b).unwrap()
    };
    (sig, raw)
}

async fn engine_verifies(t: &T, name: &str, mut body: Value, sig: String) -> bool {
    body["signature"] = json!(sig);
    t.ok(&format!("/v1/transit/verify/{name}"), body).await["valid"]
        .as_bool()
        .unwrap()
}

#[tokio::test]
async fn deterministic_signatures_equal_the_ones_made_here() {
    let t = T::new().await;
    let msg = b"signed by a key that came from elsewhere";
    let input = STANDARD.encode(msg);

    // Ed25519 from a fixed seed: one right signature per message.
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
    let ed = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
    t.import("ed", "ed25519", ed.to_pkcs8().unwrap().as_ref())
        .await;
    let here = ed.sign(msg);
    for jws in [false, true] {
        let body = if jws {
            json!({"input": input, "marshaling_algorithm": "jws"})
        } else {
            json!({"input": input})
        };
        let (text, raw) = engine_sign(&t, "ed", body.clone(), jws).await;
        assert_eq!(raw, here.as_ref(), "ed25519 jws={jws}");
        assert!(engine_verifies(&t, "ed", body, text).await);
    }
    let (st, key) = t.s.get(&t.c, "/v1/transit/keys/ed", Some(&t.app)).await;
    assert_eq!(st, 200);
    assert_eq!(
        key["data"]["keys"]["1"]["public_key"],
        STANDARD.encode(ed.public_key().as_ref()),
        "ed25519 public key: base64 of the raw 32 bytes"
    );

    // RSA PKCS#1 v1.5 is deterministic too.
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    t.import("rsa", "rsa-2048", rsa.as_der().unwrap().as_ref())
        .await;
    for (hash, enc) in [
        ("sha2-256", &signature::RSA_PKCS1_SHA256),
        ("sha2-512", &signature::RSA_PKCS1_SHA512),
    ] {
        let mut here = vec![0u8; rsa.public_modulus_len()];
        rsa.sign(enc, &SystemRandom::new(), msg, &mut here).unwrap();
        for jws in [false, true] {
            let mut body = json!({"input": input, "hash_algorithm": hash,
                                  "signature_algorithm": "pkcs1v15"});
            if jws {
                body["marshaling_algorithm"] = json!("jws");
            }
            let (text, raw) = engine_sign(&t, "rsa", body.clone(), jws).await;
            assert_eq!(raw, here, "rsa pkcs1v15 {hash} jws={jws}");
            assert!(engine_verifies(&t, "rsa", body, text).await);
        }
    }
}

#[tokio::test]
async fn ecdsa_jws_is_raw_r_s_and_asn1_is_der_both_ways() {
    let t = T::new().await;
    let msg = b"ecdsa known answer";
    let input = STANDARD.encode(msg);
    type Algs = (
        &'static EcdsaSigningAlgorithm,
        &'static EcdsaSigningAlgorithm,
        &'static EcdsaVerificationAlgorithm,
        &'static EcdsaVerificationAlgorithm,
    );
    let cases: [(&str, &str, usize, Algs); 3] = [
        (
            "ecdsa-p256",
            "sha2-256",
            32,
            (
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &signature::ECDSA_P256_SHA256_FIXED,
                &signature::ECDSA_P256_SHA256_ASN1,
            ),
        ),
        (
            "ecdsa-p384",
            "sha2-384",
            48,
            (
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &signature::ECDSA_P384_SHA384_FIXED,
                &signature::ECDSA_P384_SHA384_ASN1,
            ),
        ),
        (
            "ecdsa-p521",
            "sha2-512",
            66,
            (
                &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
                &signature::ECDSA_P521_SHA512_ASN1_SIGNING,
                &signature::ECDSA_P521_SHA512_FIXED,
                &signature::ECDSA_P521_SHA512_ASN1,
            ),
        ),
    ];
    let rng = SystemRandom::new();
    for (ty, hash, n, (fixed_sign, asn1_sign, fixed_verify, asn1_verify)) in cases {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(fixed_sign, &rng).unwrap();
        t.import(ty, ty, pkcs8.as_ref()).await;
        let fixed_pair = EcdsaKeyPair::from_pkcs8(fixed_sign, pkcs8.as_ref()).unwrap();
        let asn1_pair = EcdsaKeyPair::from_pkcs8(asn1_sign, pkcs8.as_ref()).unwrap();
        let public = fixed_pair.public_key().as_ref().to_vec();
        let path = format!("{ty}/{hash}");

        // Engine → here.
        let jws_body = json!({"input": input, "marshaling_algorithm": "jws"});
        let (_, raw) = engine_sign(&t, &path, jws_body.clone(), true).await;
        assert_eq!(raw.len(), 2 * n, "{ty}: JWS is r ‖ s");
        UnparsedPublicKey::new(fixed_verify, &public)
            .verify(msg, &raw)
            .unwrap_or_else(|_| panic!("{ty}: JWS signature verifies here as fixed r ‖ s"));
        let asn1_body = json!({"input": input});
        let (_, der) = engine_sign(&t, &path, asn1_body.clone(), false).await;
        assert_eq!(der[0], 0x30, "{ty}: asn1 is a DER SEQUENCE");
        UnparsedPublicKey::new(asn1_verify, &public)
            .verify(msg, &der)
            .unwrap_or_else(|_| panic!("{ty}: asn1 signature verifies here"));

        // Here → engine, each in its marshaling; crossed, never valid.
        let fixed_here = fixed_pair.sign(&rng, msg).unwrap();
        let der_here = asn1_pair.sign(&rng, msg).unwrap();
        let jws_text = format!("vault:v1:{}", URL_SAFE_NO_PAD.encode(fixed_here.as_ref()));
        let der_text = format!("vault:v1:{}", STANDARD.encode(der_here.as_ref()));
        let verify = format!("/v1/transit/verify/{path}");
        assert!(engine_verifies(&t, &path, jws_body.clone(), jws_text.clone()).await);
        assert!(engine_verifies(&t, &path, asn1_body.clone(), der_text.clone()).await);
        let (st, v) = t
            .post(&verify, json!({"input": input, "signature": jws_text}))
            .await;
        assert!(st == 400 || v["data"]["valid"] == false, "{ty}: {st} {v}");
        let mut other = jws_body.clone();
        other["input"] = json!(STANDARD.encode(b"other"));
        assert!(!engine_verifies(&t, &path, other, jws_text).await);
    }
}
