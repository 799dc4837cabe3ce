//! Key wrap and import through the real server: Vault's BYOK import with a
//! client-side `CKM_RSA_AES_KEY_WRAP` done here (aws-lc-rs RSA-OAEP +
//! aes-kw KWP), proven by using the imported key and checking the result
//! locally with the known key; hsmgate's wrap/unwrap between key-encryption
//! keys; and every allow/deny of those routes.
mod common;

use aes_kw::{KeyInit, KwAes256, KwpAes256};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    OaepAlgorithm, OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA1_MGF1SHA1,
    OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384, OAEP_SHA512_MGF1SHA512,
};
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey,
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
    ECDSA_P521_SHA512_ASN1_SIGNING, ED25519, RSA_PKCS1_SHA256, RSA_PSS_2048_8192_SHA256,
    RSA_PSS_SHA256,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

struct T {
    s: TestServer,
    c: reqwest::Client,
    app: String,
    co: String,
}

impl T {
    async fn new() -> T {
        let s = TestServer::start(Opts::default());
        let (co, app) = s.init_with_app_user().await;
        let c = s.client();
        T { s, c, app, co }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.s.post(&self.c, path, Some(&self.app), body).await
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (st, resp) = self.post(path, body.clone()).await;
        assert_eq!(st, 200, "{path} {body}: {resp}");
        resp["data"].clone()
    }

    async fn wrapping_key(&self) -> String {
        let (st, body) = self
            .s
            .get(&self.c, "/v1/transit/wrapping_key", Some(&self.app))
            .await;
        assert_eq!(st, 200, "{body}");
        body["data"]["public_key"].as_str().unwrap().to_string()
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new().fill(&mut v).unwrap();
    v
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    STANDARD.decode(body).expect("PEM body is base64")
}

/// What a Vault BYOK client does: a fresh AES-256 key under RSA-OAEP with
/// the wrapping key, then the target key under AES-KWP with that key.
fn vault_wrap(pem: &str, target: &[u8], oaep: &'static OaepAlgorithm) -> String {
    let public = PublicEncryptingKey::from_der(&pem_der(pem)).expect("SPKI");
    let public = OaepPublicEncryptingKey::new(public).unwrap();
    assert_eq!(
        public.key_size_bits(),
        4096,
        "Vault's wrapping key is RSA-4096"
    );
    let ephemeral = random(32);
    let mut rsa_block = vec![0u8; public.ciphertext_size()];
    let n = public
        .encrypt(oaep, &ephemeral, &mut rsa_block, None)
        .unwrap()
        .len();
    rsa_block.truncate(n);
    STANDARD.encode([rsa_block, kwp_wrap(&ephemeral, target)].concat())
}

/// `vault_wrap` with `hash_function: SHA224`: OAEP and MGF1 with SHA-224,
/// which aws-lc-rs does not offer, done with the `oaep-sha224` crate's
/// encryption (aws-lc's EVP API; its decryption side is checked against
/// Wycheproof's SHA-224 vectors).
fn vault_wrap_sha224(pem: &str, target: &[u8]) -> String {
    let ephemeral = random(32);
    let rsa_block = oaep_sha224::encrypt(&pem_der(pem), &ephemeral).expect("OAEP-SHA224");
    assert_eq!(rsa_block.len(), 512, "Vault's wrapping key is RSA-4096");
    STANDARD.encode([rsa_block, kwp_wrap(&ephemeral, target)].concat())
}

fn kwp_wrap(ephemeral: &[u8], target: &[u8]) -> Vec<u8> {
    let kwp = KwpAes256::new_from_slice(ephemeral).unwrap();
    let mut wrapped = vec![0u8; target.len().div_ceil(8) * 8 + 8];
    kwp.wrap_key(target, &mut wrapped).unwrap().to_vec()
}

/// Opens a Transit `vault:vN:` AES-256-GCM ciphertext with the raw key.
fn open_locally(key: &[u8], ciphertext: &str) -> Vec<u8> {
    let blob = STANDARD
        .decode(ciphertext.splitn(3, ':').nth(2).unwrap())
        .unwrap();
    let (nonce, rest) = blob.split_at(12);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut buf = rest.to_vec();
    let pt = key
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).unwrap(),
            Aad::empty(),
            &mut buf,
        )
        .expect("the imported key is the engine's key");
    pt.to_vec()
}

fn sig_bytes(s: &str) -> Vec<u8> {
    STANDARD.decode(s.splitn(3, ':').nth(2).unwrap()).unwrap()
}

#[tokio::test]
async fn byok_import_of_a_known_aes_key_really_imports_that_key() {
    let mut t = T::new().await;
    let pem = t.wrapping_key().await;
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    assert_eq!(t.wrapping_key().await, pem, "created once, then the same");

    let known = random(32);
    let info = t
        .ok(
            "/v1/transit/keys/imported/import",
            json!({"ciphertext": vault_wrap(&pem, &known, &OAEP_SHA256_MGF1SHA256), "type": "aes256-gcm96"}),
        )
        .await;
    assert_eq!(info["imported_key"], true, "{info}");
    assert_eq!(info["exportable"], false);
    let ct = t
        .ok(
            "/v1/transit/encrypt/imported",
            json!({"plaintext": b64(b"moved in from another HSM")}),
        )
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("vault:v1:"), "{ct}");
    assert_eq!(open_locally(&known, &ct), b"moved in from another HSM");

    // The wrapping key and the imported key survive a restart (sealed store),
    // and the reserved wrapping-key record is no Transit key.
    t.s.restart();
    let app = t.s.token("app", CU_PASSWORD).await;
    t.app = app;
    assert_eq!(t.wrapping_key().await, pem);
    let pt = t
        .ok("/v1/transit/decrypt/imported", json!({"ciphertext": ct}))
        .await;
    assert_eq!(pt["plaintext"], b64(b"moved in from another HSM"));
    let (st, list) =
        t.s.get(&t.c, "/v1/transit/keys?list=true", Some(&t.app))
            .await;
    assert_eq!(st, 200);
    assert_eq!(list["data"]["keys"], json!(["imported"]));
    for path in [
        "/v1/transit/keys/.transit-wrapping-key",
        "/v1/transit/decrypt/.transit-wrapping-key",
    ] {
        let (st, _) = t.s.get(&t.c, path, Some(&t.app)).await;
        assert!(st == 404 || st == 405, "{path}: {st}");
    }
    let (st, _) = t
        .post(
            "/v1/transit/decrypt/.transit-wrapping-key",
            json!({"ciphertext": "vault:v1:AAAA"}),
        )
        .await;
    assert_eq!(st, 404, "the wrapping key decrypts nothing for callers");
}

#[tokio::test]
async fn byok_import_with_each_hash_function_and_import_version() {
    let t = T::new().await;
    let pem = t.wrapping_key().await;
    for (name, hash, oaep) in [
        ("h1", "SHA1", &OAEP_SHA1_MGF1SHA1),
        ("h384", "sha384", &OAEP_SHA384_MGF1SHA384),
        ("h512", "SHA512", &OAEP_SHA512_MGF1SHA512),
    ] {
        let known = random(32);
        t.ok(
            &format!("/v1/transit/keys/{name}/import"),
            json!({"ciphertext": vault_wrap(&pem, &known, oaep), "hash_function": hash, "allow_rotation": false}),
        )
        .await;
        let ct = t
            .ok(
                &format!("/v1/transit/encrypt/{name}"),
                json!({"plaintext": b64(b"x")}),
            )
            .await["ciphertext"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(open_locally(&known, &ct), b"x", "{hash}");
        // The same material under another hash function is refused.
        let (st, body) = t
            .post(
                &format!("/v1/transit/keys/{name}-x/import"),
                json!({"ciphertext": vault_wrap(&pem, &known, oaep), "hash_function": "SHA256"}),
            )
            .await;
        assert_eq!(st, 400, "{body}");
    }
    // An imported key is not rotated unless allow_rotation...
    let (st, body) = t.post("/v1/transit/keys/h1/rotate", json!({})).await;
    assert_eq!(st, 400, "{body}");
    // ...but takes a new imported version.
    let v1_ct = t
        .ok("/v1/transit/encrypt/h1", json!({"plaintext": b64(b"old")}))
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    let second = random(32);
    let info = t
        .ok(
            "/v1/transit/keys/h1/import_version",
            json!({"ciphertext": vault_wrap(&pem, &second, &OAEP_SHA256_MGF1SHA256)}),
        )
        .await;
    assert_eq!(info["latest_version"], 2, "{info}");
    let v2_ct = t
        .ok("/v1/transit/encrypt/h1", json!({"plaintext": b64(b"new")}))
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(v2_ct.starts_with("vault:v2:"));
    assert_eq!(open_locally(&second, &v2_ct), b"new");
    let old = t
        .ok("/v1/transit/decrypt/h1", json!({"ciphertext": v1_ct}))
        .await;
    assert_eq!(old["plaintext"], b64(b"old"));
    // With allow_rotation, rotation works.
    t.ok(
        "/v1/transit/keys/rot/import",
        json!({"ciphertext": vault_wrap(&pem, &random(32), &OAEP_SHA256_MGF1SHA256), "allow_rotation": true}),
    )
    .await;
    t.ok("/v1/transit/keys/rot/rotate", json!({})).await;
    // Automatic rotation of an imported key, too, needs allow_rotation.
    let info = t
        .ok(
            "/v1/transit/keys/autorot/import",
            json!({"ciphertext": vault_wrap(&pem, &random(32), &OAEP_SHA256_MGF1SHA256),
                   "allow_rotation": true, "auto_rotate_period": "24h"}),
        )
        .await;
    assert_eq!(info["auto_rotate_period"], 86_400, "{info}");
    let (st, body) = t
        .post(
            "/v1/transit/keys/h1/config",
            json!({"auto_rotate_period": "24h"}),
        )
        .await;
    assert_eq!(st, 400, "h1 was imported without allow_rotation: {body}");
    // import_version on a generated key is refused, as in Vault.
    t.ok("/v1/transit/keys/generated", json!({})).await;
    let (st, _) = t
        .post(
            "/v1/transit/keys/generated/import_version",
            json!({"ciphertext": vault_wrap(&pem, &random(32), &OAEP_SHA256_MGF1SHA256)}),
        )
        .await;
    assert_eq!(st, 400);
}

/// Vault's `hash_function: SHA224` (Go's `rsa.DecryptOAEP` with SHA-224
/// for OAEP and MGF1): import and import_version of a known key, which then
/// really is the engine's key; a SHA-224 block under another declared hash,
/// and another hash's block declared SHA224, are refused.
#[tokio::test]
async fn byok_import_with_sha224_imports_the_known_key() {
    let t = T::new().await;
    let pem = t.wrapping_key().await;
    let known = random(32);
    let wrapped = vault_wrap_sha224(&pem, &known);
    for other in ["SHA256", "SHA1", "SHA512"] {
        let (st, body) = t
            .post(
                "/v1/transit/keys/h224/import",
                json!({"ciphertext": wrapped, "hash_function": other}),
            )
            .await;
        assert_eq!(st, 400, "a SHA-224 block declared {other}: {body}");
    }
    let (st, body) = t
        .post(
            "/v1/transit/keys/h224/import",
            json!({"ciphertext": vault_wrap(&pem, &known, &OAEP_SHA256_MGF1SHA256),
                   "hash_function": "SHA224"}),
        )
        .await;
    assert_eq!(st, 400, "a SHA-256 block declared SHA224: {body}");
    let (st, _) = t.s.get(&t.c, "/v1/transit/keys/h224", Some(&t.app)).await;
    assert_eq!(st, 404, "the refusals created nothing");

    let info = t
        .ok(
            "/v1/transit/keys/h224/import",
            json!({"ciphertext": wrapped, "hash_function": "SHA224"}),
        )
        .await;
    assert_eq!(info["imported_key"], true, "{info}");
    let ct = t
        .ok(
            "/v1/transit/encrypt/h224",
            json!({"plaintext": b64(b"wrapped with OAEP-SHA224")}),
        )
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(open_locally(&known, &ct), b"wrapped with OAEP-SHA224");

    let second = random(32);
    let info = t
        .ok(
            "/v1/transit/keys/h224/import_version",
            json!({"ciphertext": vault_wrap_sha224(&pem, &second), "hash_function": "sha224"}),
        )
        .await;
    assert_eq!(info["latest_version"], 2, "{info}");
    let ct = t
        .ok("/v1/transit/encrypt/h224", json!({"plaintext": b64(b"v2")}))
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("vault:v2:"), "{ct}");
    assert_eq!(open_locally(&second, &ct), b"v2");
}

#[tokio::test]
async fn byok_import_of_asymmetric_keys_takes_pkcs8() {
    let t = T::new().await;
    let pem = t.wrapping_key().await;
    let rng = SystemRandom::new();
    let msg = b"signed by an imported key";

    let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed_pub = Ed25519KeyPair::from_pkcs8(ed.as_ref())
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ec_pub = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, ec.as_ref())
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rsa_der = rsa.as_der().unwrap().as_ref().to_vec();
    let rsa_pub = rsa.public_key().as_ref().to_vec();

    for (name, ty, der, public, alg) in [
        (
            "ed",
            "ed25519",
            ed.as_ref().to_vec(),
            ed_pub,
            &ED25519 as &dyn aws_lc_rs::signature::VerificationAlgorithm,
        ),
        (
            "ec",
            "ecdsa-p256",
            ec.as_ref().to_vec(),
            ec_pub,
            &ECDSA_P256_SHA256_ASN1,
        ),
        (
            "rsa",
            "rsa-2048",
            rsa_der,
            rsa_pub,
            &RSA_PSS_2048_8192_SHA256,
        ),
    ] {
        let info = t
            .ok(
                &format!("/v1/transit/keys/{name}/import"),
                json!({"ciphertext": vault_wrap(&pem, &der, &OAEP_SHA256_MGF1SHA256), "type": ty}),
            )
            .await;
        assert_eq!(info["type"], ty);
        let sig = t
            .ok(
                &format!("/v1/transit/sign/{name}"),
                json!({"input": b64(msg), "signature_algorithm": "pss"}),
            )
            .await["signature"]
            .as_str()
            .unwrap()
            .to_string();
        UnparsedPublicKey::new(alg, &public)
            .verify(msg, &sig_bytes(&sig))
            .unwrap_or_else(|_| panic!("{ty}: the imported key signed"));
        // The same DER declared as another type is refused.
        let wrong = if ty == "ecdsa-p256" {
            "ecdsa-p384"
        } else {
            "ecdsa-p256"
        };
        let (st, body) = t
            .post(
                &format!("/v1/transit/keys/{name}-wrong/import"),
                json!({"ciphertext": vault_wrap(&pem, &der, &OAEP_SHA256_MGF1SHA256), "type": wrong}),
            )
            .await;
        assert_eq!(st, 400, "{ty} as {wrong}: {body}");
    }
}

#[tokio::test]
async fn byok_import_refusals_change_nothing() {
    let t = T::new().await;
    let pem = t.wrapping_key().await;
    let good = vault_wrap(&pem, &random(32), &OAEP_SHA256_MGF1SHA256);
    let raw = STANDARD.decode(&good).unwrap();
    let mut flipped_rsa = raw.clone();
    flipped_rsa[10] ^= 1;
    let mut flipped_kwp = raw.clone();
    *flipped_kwp.last_mut().unwrap() ^= 1;
    let mut messages = Vec::new();
    for (what, body) in [
        (
            "RSA block tampered",
            json!({"ciphertext": STANDARD.encode(&flipped_rsa)}),
        ),
        (
            "KWP tampered",
            json!({"ciphertext": STANDARD.encode(&flipped_kwp)}),
        ),
        (
            "wrong hash",
            json!({"ciphertext": good, "hash_function": "SHA512"}),
        ),
        (
            "wrong hash (SHA224)",
            json!({"ciphertext": good, "hash_function": "SHA224"}),
        ),
    ] {
        let (st, body) = t.post("/v1/transit/keys/k/import", body).await;
        assert_eq!(st, 400, "{what}: {body}");
        messages.push(body["errors"].clone());
    }
    assert!(
        messages.windows(2).all(|w| w[0] == w[1]),
        "one message for every unwrap failure (no oracle): {messages:?}"
    );
    for (what, body) in [
        (
            "too short",
            json!({"ciphertext": STANDARD.encode(&raw[..512])}),
        ),
        ("not base64", json!({"ciphertext": "%%%"})),
        ("missing", json!({})),
        (
            "unknown hash function",
            json!({"ciphertext": good, "hash_function": "SHA3-256"}),
        ),
        (
            "convergent",
            json!({"ciphertext": good, "convergent_encryption": false}),
        ),
        ("unknown type", json!({"ciphertext": good, "type": "des"})),
        (
            "public key",
            json!({"public_key": "-----BEGIN PUBLIC KEY-----"}),
        ),
        (
            "auto-rotation of a key that may not rotate",
            json!({"ciphertext": good, "auto_rotate_period": "24h"}),
        ),
        (
            "auto-rotation under an hour",
            json!({"ciphertext": good, "allow_rotation": true, "auto_rotate_period": "30m"}),
        ),
        (
            "auto-rotation garbage",
            json!({"ciphertext": good, "allow_rotation": true, "auto_rotate_period": "soon"}),
        ),
    ] {
        let (st, body) = t.post("/v1/transit/keys/k/import", body).await;
        assert_eq!(st, 400, "{what}: {body}");
    }
    let (st, _) = t.s.get(&t.c, "/v1/transit/keys/k", Some(&t.app)).await;
    assert_eq!(st, 404, "nothing was created");
    // The good one still works afterwards; importing over it is refused.
    t.ok("/v1/transit/keys/k/import", json!({"ciphertext": good}))
        .await;
    let (st, _) = t
        .post("/v1/transit/keys/k/import", json!({"ciphertext": good}))
        .await;
    assert_eq!(st, 400, "import creates new keys only");
    // No token, or the crypto officer's: refused.
    let (st, _) =
        t.s.post(
            &t.c,
            "/v1/transit/keys/k2/import",
            None,
            json!({"ciphertext": good}),
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) =
        t.s.post(
            &t.c,
            "/v1/transit/keys/k2/import",
            Some(&t.co),
            json!({"ciphertext": good}),
        )
        .await;
    assert_eq!(st, 403, "keys are the crypto users'");
    let (st, _) = t.s.get(&t.c, "/v1/transit/wrapping_key", Some(&t.co)).await;
    assert_eq!(st, 403);
}

#[tokio::test]
async fn wrap_and_unwrap_move_a_key_between_names() {
    let t = T::new().await;
    t.ok(
        "/v1/transit/keys/kek",
        json!({"type": "aes256-gcm96", "allow_wrap": true, "allow_unwrap": true}),
    )
    .await;
    for ty in ["aes256-gcm96", "ed25519", "ecdsa-p384", "rsa-2048", "hmac"] {
        let name = format!("src-{ty}");
        t.ok(
            &format!("/v1/transit/keys/{name}"),
            json!({"type": ty, "exportable": true}),
        )
        .await;
        for mechanism in ["aes-kwp", "aes-kw"] {
            let (st, w) = t
                .post(
                    &format!("/v1/transit/keys/{name}/wrap"),
                    json!({"wrapping_key": "kek", "mechanism": mechanism}),
                )
                .await;
            if mechanism == "aes-kw" && st == 400 {
                // KW needs a multiple of 8 bytes: some PKCS#8 documents are not.
                assert!(
                    ty.starts_with("rsa") || ty.starts_with("ecdsa"),
                    "{ty}: {w}"
                );
                continue;
            }
            assert_eq!(st, 200, "{ty} {mechanism}: {w}");
            let w = &w["data"];
            assert_eq!(w["type"], ty);
            assert_eq!(w["version"], 1);
            let copy = format!("copy-{ty}-{mechanism}");
            let info = t
                .ok(
                    &format!("/v1/transit/keys/{copy}/unwrap"),
                    json!({"wrapping_key": "kek", "mechanism": mechanism, "wrapped_key": w["wrapped_key"], "type": ty}),
                )
                .await;
            assert_eq!(info["imported_key"], true);
            assert_eq!(
                info["exportable"], false,
                "the copy is not exportable unless asked"
            );
            // Same material: the copy opens the original's ciphertexts, or
            // verifies its signatures.
            if ty == "aes256-gcm96" {
                let ct = t
                    .ok(
                        &format!("/v1/transit/encrypt/{name}"),
                        json!({"plaintext": b64(b"same key")}),
                    )
                    .await["ciphertext"]
                    .clone();
                let pt = t
                    .ok(
                        &format!("/v1/transit/decrypt/{copy}"),
                        json!({"ciphertext": ct}),
                    )
                    .await;
                assert_eq!(pt["plaintext"], b64(b"same key"));
            } else if ty == "hmac" {
                let a = t
                    .ok(
                        &format!("/v1/transit/hmac/{name}"),
                        json!({"input": b64(b"m")}),
                    )
                    .await;
                let b = t
                    .ok(
                        &format!("/v1/transit/hmac/{copy}"),
                        json!({"input": b64(b"m")}),
                    )
                    .await;
                assert_eq!(a["hmac"], b["hmac"]);
            } else {
                let sig = t
                    .ok(
                        &format!("/v1/transit/sign/{name}"),
                        json!({"input": b64(b"m")}),
                    )
                    .await["signature"]
                    .clone();
                let v = t
                    .ok(
                        &format!("/v1/transit/verify/{copy}"),
                        json!({"input": b64(b"m"), "signature": sig}),
                    )
                    .await;
                assert_eq!(v["valid"], true, "{ty}");
            }
        }
    }
}

/// The wrapped bytes are plain RFC 3394/5649 output of the key's raw bytes:
/// with the KEK in hand (exported here), anyone's AES key wrap unwraps them.
#[tokio::test]
async fn wrapped_keys_are_standard_kw_and_kwp() {
    let t = T::new().await;
    t.ok(
        "/v1/transit/keys/kek",
        json!({"type": "aes256-gcm96", "allow_wrap": true, "exportable": true}),
    )
    .await;
    t.ok("/v1/transit/keys/data", json!({"exportable": true}))
        .await;
    let export = |name: &'static str| {
        let t = &t;
        async move {
            let (st, e) =
                t.s.get(
                    &t.c,
                    &format!("/v1/transit/export/encryption-key/{name}"),
                    Some(&t.app),
                )
                .await;
            assert_eq!(st, 200, "{e}");
            STANDARD
                .decode(e["data"]["keys"]["1"].as_str().unwrap())
                .unwrap()
        }
    };
    let kek = export("kek").await;
    let data = export("data").await;
    for mechanism in ["aes-kw", "aes-kwp"] {
        let w = t
            .ok(
                "/v1/transit/keys/data/wrap",
                json!({"wrapping_key": "kek", "mechanism": mechanism}),
            )
            .await;
        let wrapped = STANDARD.decode(w["wrapped_key"].as_str().unwrap()).unwrap();
        let mut out = vec![0u8; wrapped.len()];
        let got = if mechanism == "aes-kw" {
            KwAes256::new_from_slice(&kek)
                .unwrap()
                .unwrap_key(&wrapped, &mut out)
                .unwrap()
                .to_vec()
        } else {
            KwpAes256::new_from_slice(&kek)
                .unwrap()
                .unwrap_key(&wrapped, &mut out)
                .unwrap()
                .to_vec()
        };
        assert_eq!(got, data, "{mechanism}");
    }
}

#[tokio::test]
async fn wrap_and_unwrap_denials() {
    let t = T::new().await;
    t.ok(
        "/v1/transit/keys/kek",
        json!({"allow_wrap": true, "allow_unwrap": true}),
    )
    .await;
    t.ok("/v1/transit/keys/wrap-only", json!({"allow_wrap": true}))
        .await;
    t.ok("/v1/transit/keys/plain", json!({})).await;
    t.ok("/v1/transit/keys/open", json!({"exportable": true}))
        .await;
    let wrap = |name: &'static str, kek: &'static str| {
        let t = &t;
        async move {
            t.post(
                &format!("/v1/transit/keys/{name}/wrap"),
                json!({"wrapping_key": kek}),
            )
            .await
        }
    };
    // Allowed: exportable key under a wrap KEK.
    let (st, w) = wrap("open", "kek").await;
    assert_eq!(st, 200, "{w}");
    let wrapped = w["data"]["wrapped_key"].clone();
    // Denied: a non-exportable key, under any KEK.
    let (st, body) = wrap("plain", "kek").await;
    assert_eq!(st, 400, "{body}");
    assert!(body["errors"][0]
        .as_str()
        .unwrap()
        .contains("not exportable"));
    assert!(body.get("data").is_none());
    // Denied: a KEK without allow_wrap.
    assert_eq!(wrap("open", "plain").await.0, 400);
    // Denied: unknown keys.
    assert_eq!(wrap("open", "nope").await.0, 404);
    assert_eq!(wrap("nope", "kek").await.0, 404);
    // Unwrap: allowed with allow_unwrap, denied with a wrap-only or plain key.
    let unwrap = |kek: &'static str, name: &'static str, wrapped: Value| {
        let t = &t;
        async move {
            t.post(
                &format!("/v1/transit/keys/{name}/unwrap"),
                json!({"wrapping_key": kek, "wrapped_key": wrapped}),
            )
            .await
        }
    };
    assert_eq!(unwrap("wrap-only", "u1", wrapped.clone()).await.0, 400);
    assert_eq!(unwrap("plain", "u1", wrapped.clone()).await.0, 400);
    let (st, body) = unwrap("kek", "u1", wrapped.clone()).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(unwrap("kek", "u1", wrapped.clone()).await.0, 400, "exists");
    // Tampered or mismatched input: one 400, nothing created.
    let mut raw = STANDARD.decode(wrapped.as_str().unwrap()).unwrap();
    raw[0] ^= 1;
    let (st, body) = unwrap("kek", "u2", json!(STANDARD.encode(&raw))).await;
    assert_eq!(st, 400, "{body}");
    let (st, body2) = t
        .post(
            "/v1/transit/keys/u2/unwrap",
            json!({"wrapping_key": "kek", "wrapped_key": wrapped, "mechanism": "aes-kw"}),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["errors"], body2["errors"], "no oracle");
    assert_eq!(
        t.s.get(&t.c, "/v1/transit/keys/u2", Some(&t.app)).await.0,
        404
    );
    // Key separation: a KEK encrypts and decrypts no data.
    for path in ["/v1/transit/encrypt/kek", "/v1/transit/encrypt/wrap-only"] {
        let (st, body) = t.post(path, json!({"plaintext": b64(b"x")})).await;
        assert_eq!(st, 400, "{path}: {body}");
    }
    let (st, _) = t.post("/v1/transit/datakey/plaintext/kek", json!({})).await;
    assert_eq!(st, 400);
    // KEK attributes need a non-derived aes256-gcm96 key.
    for body in [
        json!({"type": "aes128-gcm96", "allow_wrap": true}),
        json!({"type": "ed25519", "allow_unwrap": true}),
        json!({"type": "aes256-gcm96", "allow_wrap": true, "derived": true}),
    ] {
        let (st, _) = t.post("/v1/transit/keys/bad-kek", body.clone()).await;
        assert_eq!(st, 400, "{body}");
    }
    // Bad mechanism, missing fields.
    let (st, _) = t
        .post(
            "/v1/transit/keys/open/wrap",
            json!({"wrapping_key": "kek", "mechanism": "AES"}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = t.post("/v1/transit/keys/open/wrap", json!({})).await;
    assert_eq!(st, 400);
    // The crypto officer does not use keys.
    let (st, _) =
        t.s.post(
            &t.c,
            "/v1/transit/keys/open/wrap",
            Some(&t.co),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 403);
}

/// Key material moving in or out is audited even with `key_use = "off"`,
/// which drops ordinary key use (the twin: encrypt is not recorded).
#[tokio::test]
async fn wrap_unwrap_and_import_are_always_audited() {
    let s = TestServer::start(Opts {
        extra_config: "[audit]\nkey_use = \"off\"\n".into(),
        ..Opts::default()
    });
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    for (path, body) in [
        (
            "/v1/transit/keys/kek",
            json!({"allow_wrap": true, "allow_unwrap": true}),
        ),
        ("/v1/transit/keys/out", json!({"exportable": true})),
        ("/v1/transit/encrypt/out", json!({"plaintext": b64(b"x")})),
    ] {
        assert_eq!(s.post(&c, path, Some(&app), body).await.0, 200, "{path}");
    }
    let (st, w) = s
        .post(
            &c,
            "/v1/transit/keys/out/wrap",
            Some(&app),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/in/unwrap",
            Some(&app),
            json!({"wrapping_key": "kek", "wrapped_key": w["data"]["wrapped_key"]}),
        )
        .await;
    assert_eq!(st, 200);
    let log = std::fs::read_to_string(s.data_dir.join("audit.log")).unwrap();
    assert!(log.contains("\"transit.wrap\""), "{log}");
    assert!(log.contains("\"transit.unwrap\""), "{log}");
    assert!(
        !log.contains("\"transit.encrypt\""),
        "key_use = off drops key use"
    );
    assert!(
        !log.contains(w["data"]["wrapped_key"].as_str().unwrap()),
        "no key bytes"
    );
}

/// A key pair made outside the engine (aws-lc-rs), as a client holding it
/// would: its SubjectPublicKeyInfo PEM (what `public_key` imports), its
/// PKCS#8 (what `ciphertext` wraps) and a signer.
struct Outside {
    ty: &'static str,
    spki: Vec<u8>,
    pkcs8: Vec<u8>,
    /// Vault's `hash_algorithm` the signer uses.
    hash: &'static str,
    sign: Signer,
}

/// Signs a message with a key held outside the engine.
type Signer = Box<dyn Fn(&[u8]) -> Vec<u8>>;

impl Outside {
    fn pem(&self) -> String {
        public_key_pem(&self.spki)
    }

    fn ed25519() -> Outside {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        Outside {
            ty: "ed25519",
            spki: pair.public_key().as_der().unwrap().as_ref().to_vec(),
            pkcs8: doc.as_ref().to_vec(),
            hash: "sha2-256",
            sign: Box::new(move |m| pair.sign(m).as_ref().to_vec()),
        }
    }

    fn ecdsa(ty: &'static str, alg: &'static EcdsaSigningAlgorithm, hash: &'static str) -> Outside {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, doc.as_ref()).unwrap();
        Outside {
            ty,
            spki: pair.public_key().as_der().unwrap().as_ref().to_vec(),
            pkcs8: doc.as_ref().to_vec(),
            hash,
            sign: Box::new(move |m| pair.sign(&rng, m).unwrap().as_ref().to_vec()),
        }
    }

    fn rsa2048() -> Outside {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap().as_ref().to_vec();
        Outside {
            ty: "rsa-2048",
            spki: pair.public_key().as_der().unwrap().as_ref().to_vec(),
            pkcs8,
            hash: "sha2-256",
            sign: Box::new(move |m| {
                let mut sig = vec![0u8; pair.public_modulus_len()];
                pair.sign(&RSA_PSS_SHA256, &SystemRandom::new(), m, &mut sig)
                    .unwrap();
                sig
            }),
        }
    }

    fn all() -> Vec<Outside> {
        vec![
            Outside::ed25519(),
            Outside::ecdsa("ecdsa-p256", &ECDSA_P256_SHA256_ASN1_SIGNING, "sha2-256"),
            Outside::ecdsa("ecdsa-p384", &ECDSA_P384_SHA384_ASN1_SIGNING, "sha2-384"),
            Outside::ecdsa("ecdsa-p521", &ECDSA_P521_SHA512_ASN1_SIGNING, "sha2-512"),
            Outside::rsa2048(),
        ]
    }
}

/// Vault's `public_key` import for every asymmetric type, with key pairs
/// made here: the imported key verifies signatures made outside (and only
/// those), shows and exports exactly that public key, RSA encrypts to the
/// outside private key; signing, decryption, HMAC and private exports are
/// refused naming why. Then `import_version` with the wrapped matching
/// private key completes version 1, which from then on signs.
#[tokio::test]
async fn public_key_import_verifies_outside_signatures_and_signs_only_once_completed() {
    let t = T::new().await;
    let wrapping = t.wrapping_key().await;
    for o in Outside::all() {
        let name = format!("pub-{}", o.ty);
        let info = t
            .ok(
                &format!("/v1/transit/keys/{name}/import"),
                json!({"type": o.ty, "public_key": o.pem(), "exportable": true}),
            )
            .await;
        assert_eq!(info["imported_key"], true, "{info}");
        assert_eq!(info["latest_version"], 1);
        let shown = info["keys"]["1"]["public_key"]
            .as_str()
            .unwrap()
            .to_string();
        if o.ty == "ed25519" {
            // Vault shows ed25519 keys as base64 of the raw 32 bytes.
            assert_eq!(
                STANDARD.decode(&shown).unwrap(),
                o.spki[o.spki.len() - 32..]
            );
        } else {
            assert_eq!(
                pem_der(&shown),
                o.spki,
                "{}: keys/:name shows the key",
                o.ty
            );
        }
        let exported =
            t.s.get(
                &t.c,
                &format!("/v1/transit/export/public-key/{name}/1"),
                Some(&t.app),
            )
            .await;
        assert_eq!(exported.0, 200, "{}", exported.1);
        assert_eq!(exported.1["data"]["keys"]["1"], shown.as_str(), "{}", o.ty);

        // Verify: the outside signature is valid, a tampered one is not.
        let msg = b"signed outside the engine";
        let sig = format!("vault:v1:{}", STANDARD.encode((o.sign)(msg)));
        let verify = |input: &[u8], sig: &str| json!({"input": b64(input), "signature": sig, "hash_algorithm": o.hash});
        let v = t
            .ok(&format!("/v1/transit/verify/{name}"), verify(msg, &sig))
            .await;
        assert_eq!(v["valid"], true, "{}: {v}", o.ty);
        let v = t
            .ok(
                &format!("/v1/transit/verify/{name}"),
                verify(b"something else", &sig),
            )
            .await;
        assert_eq!(v["valid"], false, "{}", o.ty);

        // Everything that needs the private key is refused, and says why.
        for (path, body) in [
            (
                format!("/v1/transit/sign/{name}"),
                json!({"input": b64(msg), "hash_algorithm": o.hash}),
            ),
            (
                format!("/v1/transit/hmac/{name}"),
                json!({"input": b64(msg)}),
            ),
        ] {
            let (st, body) = t.post(&path, body).await;
            assert_eq!(st, 400, "{path}: {body}");
            assert!(
                body["errors"][0]
                    .as_str()
                    .unwrap()
                    .contains("only a public key"),
                "{path}: {body}"
            );
        }
        for kind in ["signing-key", "hmac-key"] {
            let (st, body) =
                t.s.get(
                    &t.c,
                    &format!("/v1/transit/export/{kind}/{name}"),
                    Some(&t.app),
                )
                .await;
            assert_eq!(st, 400, "{kind}: {body}");
        }
        if o.ty == "rsa-2048" {
            // RSA: encrypt to the outside key holder.
            let ct = t
                .ok(
                    &format!("/v1/transit/encrypt/{name}"),
                    json!({"plaintext": b64(b"for the key holder")}),
                )
                .await["ciphertext"]
                .as_str()
                .unwrap()
                .to_string();
            let dec = aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(&o.pkcs8).unwrap();
            let dec = aws_lc_rs::rsa::OaepPrivateDecryptingKey::new(dec).unwrap();
            let mut out = vec![0u8; dec.min_output_size()];
            let pt = dec
                .decrypt(&OAEP_SHA256_MGF1SHA256, &sig_bytes(&ct), &mut out, None)
                .unwrap();
            assert_eq!(pt, b"for the key holder");
            let (st, body) = t
                .post(
                    &format!("/v1/transit/decrypt/{name}"),
                    json!({"ciphertext": ct}),
                )
                .await;
            assert_eq!(st, 400, "{body}");
            // PKCS#1 v1.5 signatures made outside verify too.
            let pair = RsaKeyPair::from_pkcs8(&o.pkcs8).unwrap();
            let mut sig = vec![0u8; pair.public_modulus_len()];
            pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut sig)
                .unwrap();
            let v = t
                .ok(
                    &format!("/v1/transit/verify/{name}"),
                    json!({"input": b64(msg), "signature": format!("vault:v1:{}", STANDARD.encode(&sig)),
                           "signature_algorithm": "pkcs1v15"}),
                )
                .await;
            assert_eq!(v["valid"], true, "{v}");
        }

        // The matching private key, wrapped, completes version 1.
        let info = t
            .ok(
                &format!("/v1/transit/keys/{name}/import_version"),
                json!({"ciphertext": vault_wrap(&wrapping, &o.pkcs8, &OAEP_SHA256_MGF1SHA256)}),
            )
            .await;
        assert_eq!(info["latest_version"], 1, "completed, not added: {info}");
        assert_eq!(info["keys"]["1"]["public_key"], shown.as_str());
        let signed = t
            .ok(
                &format!("/v1/transit/sign/{name}"),
                json!({"input": b64(msg), "hash_algorithm": o.hash}),
            )
            .await;
        let sig = signed["signature"].as_str().unwrap();
        assert!(sig.starts_with("vault:v1:"), "{sig}");
        let v = t
            .ok(&format!("/v1/transit/verify/{name}"), verify(msg, sig))
            .await;
        assert_eq!(v["valid"], true, "{}", o.ty);
        if o.ty == "ed25519" {
            UnparsedPublicKey::new(&ED25519, &o.spki[o.spki.len() - 32..])
                .verify(msg, &sig_bytes(sig))
                .expect("the engine signed with the outside key");
        }
    }
}

/// import_version with a public key adds a public-only version; the rules
/// for `version` (Vault's): only a public-only version takes a private key,
/// and only its own.
#[tokio::test]
async fn import_version_with_public_keys_follows_vaults_rules() {
    let t = T::new().await;
    let wrapping = t.wrapping_key().await;
    let first = Outside::ecdsa("ecdsa-p256", &ECDSA_P256_SHA256_ASN1_SIGNING, "sha2-256");
    let second = Outside::ecdsa("ecdsa-p256", &ECDSA_P256_SHA256_ASN1_SIGNING, "sha2-256");
    t.ok(
        "/v1/transit/keys/k/import",
        json!({"type": "ecdsa-p256", "public_key": first.pem()}),
    )
    .await;
    let info = t
        .ok(
            "/v1/transit/keys/k/import_version",
            json!({"public_key": second.pem()}),
        )
        .await;
    assert_eq!(info["latest_version"], 2, "{info}");
    // Each version verifies its own outside signatures.
    for (v, o) in [(1, &first), (2, &second)] {
        let sig = format!("vault:v{v}:{}", STANDARD.encode((o.sign)(b"m")));
        let r = t
            .ok(
                "/v1/transit/verify/k",
                json!({"input": b64(b"m"), "signature": sig}),
            )
            .await;
        assert_eq!(r["valid"], true, "v{v}");
    }
    let wrapped = |o: &Outside| vault_wrap(&wrapping, &o.pkcs8, &OAEP_SHA256_MGF1SHA256);
    for (what, body) in [
        (
            "a public key into a version that has one",
            json!({"public_key": first.pem(), "version": 1}),
        ),
        (
            "the wrong private key for version 1",
            json!({"ciphertext": wrapped(&second), "version": 1}),
        ),
        (
            "a version that does not exist",
            json!({"ciphertext": wrapped(&first), "version": 7}),
        ),
        (
            "both fields",
            json!({"ciphertext": wrapped(&first), "public_key": first.pem()}),
        ),
        ("neither field", json!({"version": 1})),
        (
            "a public key of another curve",
            json!({"public_key": Outside::ecdsa("ecdsa-p384", &ECDSA_P384_SHA384_ASN1_SIGNING, "sha2-384").pem()}),
        ),
    ] {
        let (st, body) = t.post("/v1/transit/keys/k/import_version", body).await;
        assert_eq!(st, 400, "{what}: {body}");
    }
    let (_, read) = t.s.get(&t.c, "/v1/transit/keys/k", Some(&t.app)).await;
    assert_eq!(
        read["data"]["latest_version"], 2,
        "the refusals changed nothing"
    );
    let (st, _) = t
        .post(
            "/v1/transit/sign/k",
            json!({"input": b64(b"m"), "key_version": 1}),
        )
        .await;
    assert_eq!(st, 400, "version 1 is still public-only");
    // `version: 1` with its own private key completes version 1 only.
    let info = t
        .ok(
            "/v1/transit/keys/k/import_version",
            json!({"ciphertext": wrapped(&first), "version": 1}),
        )
        .await;
    assert_eq!(info["latest_version"], 2, "{info}");
    t.ok(
        "/v1/transit/sign/k",
        json!({"input": b64(b"m"), "key_version": 1}),
    )
    .await;
    let (st, _) = t
        .post("/v1/transit/sign/k", json!({"input": b64(b"m")}))
        .await;
    assert_eq!(st, 400, "version 2 (the latest) is still public-only");
    // Once complete, a version takes nothing more.
    let (st, body) = t
        .post(
            "/v1/transit/keys/k/import_version",
            json!({"ciphertext": wrapped(&first), "version": 1}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    // Without `version`, the latest version's private key completes it.
    let info = t
        .ok(
            "/v1/transit/keys/k/import_version",
            json!({"ciphertext": wrapped(&second)}),
        )
        .await;
    assert_eq!(info["latest_version"], 2, "{info}");
    t.ok("/v1/transit/sign/k", json!({"input": b64(b"m")}))
        .await;
}

/// Bad `public_key` imports are refused with a 400 that says why, and
/// create nothing.
#[tokio::test]
async fn public_key_import_refusals_change_nothing() {
    let t = T::new().await;
    let wrapping = t.wrapping_key().await;
    let p256 = Outside::ecdsa("ecdsa-p256", &ECDSA_P256_SHA256_ASN1_SIGNING, "sha2-256");
    let rsa = Outside::rsa2048();
    let ed = Outside::ed25519();
    let private_pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(&p256.pkcs8)
    );
    for (what, body, says) in [
        (
            "both fields",
            json!({"type": "ecdsa-p256", "public_key": p256.pem(),
            "ciphertext": vault_wrap(&wrapping, &p256.pkcs8, &OAEP_SHA256_MGF1SHA256)}),
            "only one of",
        ),
        (
            "neither field",
            json!({"type": "ecdsa-p256"}),
            "one of ciphertext",
        ),
        (
            "another curve",
            json!({"type": "ecdsa-p384", "public_key": p256.pem()}),
            "P-256",
        ),
        (
            "another kind",
            json!({"type": "rsa-2048", "public_key": p256.pem()}),
            "ECDSA",
        ),
        (
            "another size",
            json!({"type": "rsa-4096", "public_key": rsa.pem()}),
            "2048 bits",
        ),
        (
            "ed25519 as ECDSA",
            json!({"type": "ecdsa-p256", "public_key": ed.pem()}),
            "Ed25519",
        ),
        (
            "a symmetric type",
            json!({"type": "aes256-gcm96", "public_key": rsa.pem()}),
            "does not support public_key",
        ),
        (
            "the default type",
            json!({"public_key": rsa.pem()}),
            "does not support public_key",
        ),
        (
            "a private key",
            json!({"type": "ecdsa-p256", "public_key": private_pem}),
            "private key",
        ),
        (
            "garbage",
            json!({"type": "rsa-2048", "public_key": "not a key"}),
            "PEM",
        ),
        (
            "not a string",
            json!({"type": "rsa-2048", "public_key": 42}),
            "public_key",
        ),
        (
            "derived ed25519",
            json!({"type": "ed25519", "public_key": ed.pem(), "derived": true}),
            "derived",
        ),
        (
            "convergent",
            json!({"type": "ed25519", "public_key": ed.pem(), "convergent_encryption": true}),
            "convergent",
        ),
        (
            "auto-rotation without allow_rotation",
            json!({"type": "ed25519", "public_key": ed.pem(), "auto_rotate_period": "24h"}),
            "allow_rotation",
        ),
    ] {
        let (st, resp) = t.post("/v1/transit/keys/k/import", body).await;
        assert_eq!(st, 400, "{what}: {resp}");
        let msg = resp["errors"][0].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{what}: {msg:?} lacks {says:?}");
        let (st, _) = t.s.get(&t.c, "/v1/transit/keys/k", Some(&t.app)).await;
        assert_eq!(st, 404, "{what}: nothing was created");
    }
    // Not on a key that was not imported, as every import_version.
    t.ok("/v1/transit/keys/generated", json!({"type": "ecdsa-p256"}))
        .await;
    let (st, _) = t
        .post(
            "/v1/transit/keys/generated/import_version",
            json!({"public_key": p256.pem()}),
        )
        .await;
    assert_eq!(st, 400);
    // The allow: the same key, right type, imports.
    t.ok(
        "/v1/transit/keys/k/import",
        json!({"type": "ecdsa-p256", "public_key": p256.pem()}),
    )
    .await;
}
