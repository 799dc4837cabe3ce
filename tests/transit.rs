//! Vault Transit wire formats and behaviour through the real server: every
//! key type, ciphertext prefixes, JWS marshaling, datakey shapes, rewrap,
//! key versions and trim, derived and convergent keys, hash, export, and
//! batches with per-item errors on sign/verify/hmac.
mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

struct T {
    s: TestServer,
    c: reqwest::Client,
    app: String,
}

impl T {
    async fn new() -> T {
        let s = TestServer::start(Opts::default());
        let (_co, app) = s.init_with_app_user().await;
        let c = s.client();
        T { s, c, app }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.s.post(&self.c, path, Some(&self.app), body).await
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (st, resp) = self.post(path, body.clone()).await;
        assert_eq!(st, 200, "{path} {body}: {resp}");
        resp["data"].clone()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.s.get(&self.c, path, Some(&self.app)).await
    }
}

fn payload(s: &str) -> Vec<u8> {
    let body = s.splitn(3, ':').nth(2).expect("vault:vN:payload");
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("standard base64")
}

#[tokio::test]
async fn every_key_type_round_trips_with_vault_shapes() {
    let t = T::new().await;
    for (ty, enc, sig_len) in [
        ("aes128-gcm96", true, None),
        ("aes256-gcm96", true, None),
        ("chacha20-poly1305", true, None),
        ("hmac", false, None),
        ("ed25519", false, Some(64)),
        ("ecdsa-p256", false, None),
        ("ecdsa-p384", false, None),
        ("ecdsa-p521", false, None),
        ("rsa-2048", true, Some(256)),
        ("rsa-3072", true, Some(384)),
        ("rsa-4096", true, Some(512)),
    ] {
        let key = t
            .ok(&format!("/v1/transit/keys/{ty}"), json!({"type": ty}))
            .await;
        assert_eq!(key["type"], ty);
        assert_eq!(key["supports_encryption"], enc, "{ty}");
        let path = |op: &str| format!("/v1/transit/{op}/{ty}");
        if enc {
            let ct = t
                .ok(&path("encrypt"), json!({"plaintext": b64(b"hello")}))
                .await["ciphertext"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(ct.starts_with("vault:v1:"), "{ct}");
            let raw = payload(&ct);
            if ty.starts_with("rsa") {
                assert_eq!(
                    Some(raw.len()),
                    sig_len,
                    "{ty} OAEP ciphertext is one block"
                );
            } else {
                // nonce(12) ‖ ciphertext(5) ‖ tag(16)
                assert_eq!(raw.len(), 12 + 5 + 16, "{ty}");
            }
            let pt = t.ok(&path("decrypt"), json!({"ciphertext": ct})).await;
            assert_eq!(pt["plaintext"], b64(b"hello"));
        }
        if key["supports_signing"] == true {
            let pk = &key["keys"]["1"]["public_key"];
            assert!(pk.is_string(), "{ty}: {key}");
            let mut algs = vec![None];
            if ty.starts_with("rsa") {
                algs = vec![Some("pss"), Some("pkcs1v15")];
            }
            for alg in algs {
                for hash in ["sha2-256", "sha2-384", "sha2-512"] {
                    let mut body = json!({"input": b64(b"msg"), "hash_algorithm": hash});
                    if let Some(a) = alg {
                        body["signature_algorithm"] = json!(a);
                    }
                    let sig = t.ok(&path("sign"), body.clone()).await["signature"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    assert!(sig.starts_with("vault:v1:"));
                    if let Some(n) = sig_len {
                        assert_eq!(payload(&sig).len(), n, "{ty}");
                    }
                    body["signature"] = json!(sig);
                    assert_eq!(t.ok(&path("verify"), body.clone()).await["valid"], true);
                    body["input"] = json!(b64(b"msh"));
                    assert_eq!(t.ok(&path("verify"), body).await["valid"], false);
                }
            }
        }
        // Every type has an HMAC key.
        let mac = t.ok(&path("hmac"), json!({"input": b64(b"m")})).await;
        assert!(mac["hmac"].as_str().unwrap().starts_with("vault:v1:"));
    }
}

#[tokio::test]
async fn jws_marshaling_prehashed_and_path_hash() {
    let t = T::new().await;
    for (ty, fixed) in [("ecdsa-p256", 64), ("ecdsa-p384", 96), ("ecdsa-p521", 132)] {
        t.ok(&format!("/v1/transit/keys/{ty}"), json!({"type": ty}))
            .await;
        let sig = t
            .ok(
                &format!("/v1/transit/sign/{ty}/sha2-512"),
                json!({"input": b64(b"jws"), "marshaling_algorithm": "jws"}),
            )
            .await["signature"]
            .as_str()
            .unwrap()
            .to_string();
        let body = sig.strip_prefix("vault:v1:").unwrap();
        assert!(!body.contains(['+', '/', '=']), "URL-safe, unpadded: {sig}");
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(raw.len(), fixed, "{ty}: JWS ECDSA is r ‖ s");
        let v = t
            .ok(
                &format!("/v1/transit/verify/{ty}/sha2-512"),
                json!({"input": b64(b"jws"), "signature": sig, "marshaling_algorithm": "jws"}),
            )
            .await;
        assert_eq!(v["valid"], true);
        // The same signature read as asn1 is malformed: valid=false or 400, never true.
        let (st, v) = t
            .post(
                &format!("/v1/transit/verify/{ty}/sha2-512"),
                json!({"input": b64(b"jws"), "signature": sig}),
            )
            .await;
        assert!(st == 400 || v["data"]["valid"] == false, "{st} {v}");
    }

    // prehashed: the input is the digest.
    t.ok("/v1/transit/keys/r", json!({"type": "rsa-2048"}))
        .await;
    let digest = t
        .ok(
            "/v1/transit/hash/sha2-256",
            json!({"input": b64(b"doc"), "format": "base64"}),
        )
        .await["sum"]
        .as_str()
        .unwrap()
        .to_string();
    for alg in ["pss", "pkcs1v15"] {
        let sig = t
            .ok(
                "/v1/transit/sign/r",
                json!({"input": digest, "prehashed": true, "signature_algorithm": alg}),
            )
            .await["signature"]
            .clone();
        let v = t
            .ok(
                "/v1/transit/verify/r",
                json!({"input": b64(b"doc"), "signature": sig, "signature_algorithm": alg}),
            )
            .await;
        assert_eq!(v["valid"], true, "prehashed {alg} equals hashing here");
    }
    let (st, _) = t
        .post(
            "/v1/transit/sign/r",
            json!({"input": b64(b"short"), "prehashed": true}),
        )
        .await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn hash_and_random_formats() {
    let t = T::new().await;
    let d = t
        .ok("/v1/transit/hash", json!({"input": b64(b"abc")}))
        .await;
    assert_eq!(
        d["sum"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let d = t
        .ok(
            "/v1/transit/hash",
            json!({"input": b64(b"abc"), "algorithm": "sha3-256"}),
        )
        .await;
    assert_eq!(
        d["sum"],
        "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
    );
    let d = t
        .ok(
            "/v1/transit/hash/sha2-512",
            json!({"input": b64(b"abc"), "format": "base64"}),
        )
        .await;
    assert_eq!(
        payload(&format!("x:y:{}", d["sum"].as_str().unwrap())).len(),
        64
    );
    let (st, _) = t
        .post("/v1/transit/hash/md5", json!({"input": b64(b"abc")}))
        .await;
    assert_eq!(st, 400);
    let r = t
        .ok("/v1/transit/random/16", json!({"format": "hex"}))
        .await;
    assert_eq!(r["random_bytes"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn datakey_shapes_and_rewrap_and_versions() {
    let t = T::new().await;
    t.ok("/v1/transit/keys/k", json!({})).await;
    for bits in [128, 256, 512] {
        let d = t
            .ok("/v1/transit/datakey/plaintext/k", json!({"bits": bits}))
            .await;
        let pt = d["plaintext"].as_str().unwrap();
        assert_eq!(payload(&format!("x:y:{pt}")).len(), bits / 8);
        assert_eq!(d["key_version"], 1);
        let back = t
            .ok(
                "/v1/transit/decrypt/k",
                json!({"ciphertext": d["ciphertext"]}),
            )
            .await;
        assert_eq!(back["plaintext"], pt);
        let w = t
            .ok("/v1/transit/datakey/wrapped/k", json!({"bits": bits}))
            .await;
        assert!(
            w.get("plaintext").is_none(),
            "wrapped has no plaintext: {w}"
        );
        assert!(w["ciphertext"].as_str().unwrap().starts_with("vault:v1:"));
    }
    assert_eq!(
        t.post("/v1/transit/datakey/plaintext/k", json!({"bits": 100}))
            .await
            .0,
        400
    );
    assert_eq!(
        t.post("/v1/transit/datakey/other/k", json!({})).await.0,
        400
    );

    let v1 = t
        .ok("/v1/transit/encrypt/k", json!({"plaintext": b64(b"old")}))
        .await["ciphertext"]
        .clone();
    t.ok("/v1/transit/keys/k/rotate", json!({})).await;
    t.ok("/v1/transit/keys/k/rotate", json!({})).await;
    let re = t
        .ok("/v1/transit/rewrap/k", json!({"ciphertext": v1}))
        .await;
    assert!(re["ciphertext"].as_str().unwrap().starts_with("vault:v3:"));
    assert_eq!(re["key_version"], 3);
    let batch = t
        .post(
            "/v1/transit/rewrap/k",
            json!({"batch_input": [{"ciphertext": v1}, {"ciphertext": "vault:v1:AAAA"}]}),
        )
        .await;
    assert_eq!(batch.0, 400, "{}", batch.1);
    let r = &batch.1["data"]["batch_results"];
    assert!(r[0]["ciphertext"]
        .as_str()
        .unwrap()
        .starts_with("vault:v3:"));
    assert!(r[1]["error"].is_string());

    // min_encryption_version, min_decryption_version, trim.
    assert_eq!(
        t.post(
            "/v1/transit/keys/k/trim",
            json!({"min_available_version": 2})
        )
        .await
        .0,
        400
    );
    t.ok(
        "/v1/transit/keys/k/config",
        json!({"min_decryption_version": 2, "min_encryption_version": 3}),
    )
    .await;
    assert_eq!(
        t.post("/v1/transit/decrypt/k", json!({"ciphertext": v1}))
            .await
            .0,
        400
    );
    assert_eq!(
        t.post(
            "/v1/transit/encrypt/k",
            json!({"plaintext": b64(b"x"), "key_version": 2})
        )
        .await
        .0,
        400
    );
    let k = t
        .ok(
            "/v1/transit/keys/k/trim",
            json!({"min_available_version": 2}),
        )
        .await;
    assert_eq!(k["min_available_version"], 2);
    let versions: Vec<&String> = k["keys"].as_object().unwrap().keys().collect();
    assert_eq!(versions, ["2", "3"]);
    assert_eq!(
        t.post(
            "/v1/transit/keys/k/trim",
            json!({"min_available_version": 3})
        )
        .await
        .0,
        400,
        "not above min_decryption_version"
    );
    t.ok(
        "/v1/transit/keys/k/config",
        json!({"min_decryption_version": 3}),
    )
    .await;
    assert_eq!(
        t.post(
            "/v1/transit/keys/k/trim",
            json!({"min_available_version": 3})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        t.post(
            "/v1/transit/keys/k/config",
            json!({"min_decryption_version": 2})
        )
        .await
        .0,
        400,
        "trimmed versions cannot come back"
    );
    // Trim survives a restart (stored record).
    let mut t = t;
    t.s.restart();
    t.c = t.s.client();
    t.app = t.s.token("app", CU_PASSWORD).await;
    let (_, k) = t.get("/v1/transit/keys/k").await;
    assert_eq!(k["data"]["min_available_version"], 3);
}

#[tokio::test]
async fn derived_and_convergent_keys() {
    let t = T::new().await;
    let ctx = b64(b"tenant-1");
    let k = t
        .ok(
            "/v1/transit/keys/d",
            json!({"derived": true, "convergent_encryption": true}),
        )
        .await;
    assert_eq!(k["derived"], true);
    assert_eq!(k["kdf"], "hkdf_sha256");
    assert_eq!(k["convergent_encryption"], true);
    let enc = |ctx: String| {
        let t = &t;
        async move {
            t.ok(
                "/v1/transit/encrypt/d",
                json!({"plaintext": b64(b"same"), "context": ctx}),
            )
            .await["ciphertext"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let a = enc(ctx.clone()).await;
    assert_eq!(a, enc(ctx.clone()).await, "convergent: deterministic");
    assert_ne!(a, enc(b64(b"tenant-2")).await, "context changes the key");
    assert_eq!(
        t.ok(
            "/v1/transit/decrypt/d",
            json!({"ciphertext": a, "context": ctx})
        )
        .await["plaintext"],
        b64(b"same")
    );
    assert_eq!(
        t.post(
            "/v1/transit/decrypt/d",
            json!({"ciphertext": a, "context": b64(b"tenant-2")})
        )
        .await
        .0,
        400
    );
    let (st, e) = t
        .post("/v1/transit/encrypt/d", json!({"plaintext": b64(b"x")}))
        .await;
    assert_eq!(st, 400);
    assert!(e["errors"][0].as_str().unwrap().contains("context"), "{e}");

    // Derived ed25519 signs per context.
    t.ok(
        "/v1/transit/keys/de",
        json!({"type": "ed25519", "derived": true}),
    )
    .await;
    let sig = t
        .ok(
            "/v1/transit/sign/de",
            json!({"input": b64(b"m"), "context": ctx}),
        )
        .await["signature"]
        .clone();
    let ok = t
        .ok(
            "/v1/transit/verify/de",
            json!({"input": b64(b"m"), "context": ctx, "signature": sig}),
        )
        .await;
    assert_eq!(ok["valid"], true);
    let other = t
        .ok(
            "/v1/transit/verify/de",
            json!({"input": b64(b"m"), "context": b64(b"x"), "signature": sig}),
        )
        .await;
    assert_eq!(other["valid"], false);

    // Vault's rules.
    for body in [
        json!({"convergent_encryption": true}),
        json!({"type": "ecdsa-p256", "derived": true}),
        json!({"type": "rsa-2048", "derived": true}),
    ] {
        assert_eq!(t.post("/v1/transit/keys/bad", body).await.0, 400);
    }
}

#[tokio::test]
async fn batches_on_sign_verify_hmac_have_per_item_errors() {
    let t = T::new().await;
    t.ok("/v1/transit/keys/e", json!({"type": "ecdsa-p256"}))
        .await;
    let (st, r) = t
        .post(
            "/v1/transit/sign/e",
            json!({"batch_input": [
                {"input": b64(b"one"), "reference": "a"},
                {"input": "%%", "reference": "b"},
            ]}),
        )
        .await;
    assert_eq!(st, 400, "{r}");
    let res = &r["data"]["batch_results"];
    assert_eq!(res[0]["reference"], "a");
    let sig = res[0]["signature"].as_str().unwrap().to_string();
    assert!(res[1]["error"].as_str().unwrap().contains("base64"));

    let v = t
        .ok(
            "/v1/transit/verify/e",
            json!({"batch_input": [
                {"input": b64(b"one"), "signature": sig},
                {"input": b64(b"two"), "signature": sig},
            ]}),
        )
        .await;
    assert_eq!(v["batch_results"][0]["valid"], true);
    assert_eq!(v["batch_results"][1]["valid"], false);

    let h = t
        .ok(
            "/v1/transit/hmac/e/sha2-384",
            json!({"batch_input": [{"input": b64(b"x")}, {"input": b64(b"y")}]}),
        )
        .await;
    let macs = h["batch_results"].as_array().unwrap();
    assert_eq!(macs.len(), 2);
    assert_eq!(payload(macs[0]["hmac"].as_str().unwrap()).len(), 48);
    let v = t
        .ok(
            "/v1/transit/verify/e/sha2-384",
            json!({"batch_input": [{"input": b64(b"x"), "hmac": macs[0]["hmac"]}]}),
        )
        .await;
    assert_eq!(v["batch_results"][0]["valid"], true);
}

#[tokio::test]
async fn export_only_for_exportable_keys() {
    let t = T::new().await;
    t.ok("/v1/transit/keys/locked", json!({"type": "aes256-gcm96"}))
        .await;
    let (st, _) = t.get("/v1/transit/export/encryption-key/locked").await;
    assert_eq!(st, 400, "a non-exportable key never leaves");
    assert_eq!(t.get("/v1/transit/export/hmac-key/locked").await.0, 400);

    for (ty, kind, check) in [
        ("aes256-gcm96", "encryption-key", "raw32"),
        ("chacha20-poly1305", "encryption-key", "raw32"),
        ("ed25519", "signing-key", "raw64"),
        (
            "ecdsa-p384",
            "signing-key",
            "-----BEGIN EC PRIVATE KEY-----",
        ),
        ("rsa-2048", "signing-key", "-----BEGIN RSA PRIVATE KEY-----"),
        (
            "rsa-2048",
            "encryption-key",
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        ("hmac", "hmac-key", "raw32"),
    ] {
        let name = format!("x-{ty}");
        t.ok(
            &format!("/v1/transit/keys/{name}"),
            json!({"type": ty, "exportable": true}),
        )
        .await;
        let (st, e) = t.get(&format!("/v1/transit/export/{kind}/{name}")).await;
        assert_eq!(st, 200, "{ty} {kind}: {e}");
        assert_eq!(e["data"]["name"], name);
        assert_eq!(e["data"]["type"], ty);
        let k = e["data"]["keys"]["1"].as_str().unwrap();
        match check {
            "raw32" => assert_eq!(payload(&format!("x:y:{k}")).len(), 32, "{ty}"),
            "raw64" => assert_eq!(payload(&format!("x:y:{k}")).len(), 64, "{ty}"),
            pem => assert!(k.starts_with(pem), "{ty}: {k}"),
        }
        let (st, one) = t
            .get(&format!("/v1/transit/export/{kind}/{name}/latest"))
            .await;
        assert_eq!(st, 200);
        assert_eq!(one["data"]["keys"]["1"], k);
    }
    // Wrong kind for the type.
    assert_eq!(
        t.get("/v1/transit/export/signing-key/x-aes256-gcm96")
            .await
            .0,
        400
    );
    assert_eq!(
        t.get("/v1/transit/export/encryption-key/x-ed25519").await.0,
        400
    );
    assert_eq!(t.get("/v1/transit/export/whatever/x-ed25519").await.0, 400);
}

fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Vault's `backup/:name` and `restore(/:name)`: only for keys with
/// `exportable` and `allow_plaintext_backup`; every version comes back and
/// decrypts its old ciphertexts; an existing key is replaced only with
/// `force`, and only if it could be deleted; bad files change nothing.
#[tokio::test]
async fn transit_backup_and_restore_of_one_key() {
    let t = T::new().await;
    t.ok(
        "/v1/transit/keys/src",
        json!({"exportable": true, "allow_plaintext_backup": true}),
    )
    .await;
    let v1 = t
        .ok("/v1/transit/encrypt/src", json!({"plaintext": b64(b"one")}))
        .await["ciphertext"]
        .clone();
    t.ok("/v1/transit/keys/src/rotate", json!({})).await;
    let v2 = t
        .ok("/v1/transit/encrypt/src", json!({"plaintext": b64(b"two")}))
        .await["ciphertext"]
        .clone();
    let (st, body) = t.get("/v1/transit/backup/src").await;
    assert_eq!(st, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();

    // Deny: a key without allow_plaintext_backup, or without exportable.
    t.ok("/v1/transit/keys/closed", json!({"exportable": true}))
        .await;
    t.ok(
        "/v1/transit/keys/closed2",
        json!({"allow_plaintext_backup": true}),
    )
    .await;
    for name in ["closed", "closed2"] {
        let (st, body) = t.get(&format!("/v1/transit/backup/{name}")).await;
        assert_eq!(st, 400, "{name}: {body}");
        assert!(body.get("data").is_none());
    }

    // Restore under a new name: both versions decrypt their ciphertexts.
    let (st, body) = t
        .post("/v1/transit/restore/copy", json!({"backup": backup}))
        .await;
    assert_eq!(st, 204, "{body}");
    let info = t.get("/v1/transit/keys/copy").await.1;
    assert_eq!(info["data"]["latest_version"], 2, "{info}");
    for (ct, pt) in [(&v1, b"one"), (&v2, b"two")] {
        let back = t
            .ok("/v1/transit/decrypt/copy", json!({"ciphertext": ct}))
            .await;
        assert_eq!(back["plaintext"], b64(pt));
    }

    // An existing key: refused without force; with force only if it could
    // be deleted.
    let (st, body) = t
        .post("/v1/transit/restore", json!({"backup": backup}))
        .await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = t
        .post(
            "/v1/transit/restore/closed",
            json!({"backup": backup, "force": true}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("deletion_allowed"), "{body}");
    t.ok(
        "/v1/transit/keys/closed/config",
        json!({"deletion_allowed": true}),
    )
    .await;
    let (st, body) = t
        .post(
            "/v1/transit/restore/closed",
            json!({"backup": backup, "force": true}),
        )
        .await;
    assert_eq!(st, 204, "{body}");
    let back = t
        .ok("/v1/transit/decrypt/closed", json!({"ciphertext": v1}))
        .await;
    assert_eq!(back["plaintext"], b64(b"one"));

    // Bad input: nothing is created.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&backup)
        .unwrap();
    let record: Value =
        serde_json::from_slice(&raw[b"hsmgate-transit-backup/1\n".len()..]).unwrap();
    let mut kek_chacha = record.clone();
    kek_chacha["key_type"] = json!("chacha20-poly1305");
    kek_chacha["allow_wrap"] = json!(true);
    let mut not_exportable = record.clone();
    not_exportable["exportable"] = json!(false);
    let with_magic = |v: &Value| {
        let mut b = b"hsmgate-transit-backup/1\n".to_vec();
        b.extend_from_slice(&serde_json::to_vec(v).unwrap());
        encode(&b)
    };
    for (why, bad) in [
        ("not base64", "%%%".to_string()),
        (
            "Vault's format",
            encode(br#"{"policy":{},"archived_keys":{}}"#),
        ),
        ("truncated", encode(&raw[..raw.len() - 5])),
        ("a key-wrap key of the wrong type", with_magic(&kek_chacha)),
        ("not exportable", with_magic(&not_exportable)),
    ] {
        let (st, body) = t
            .post("/v1/transit/restore/bad", json!({"backup": bad}))
            .await;
        assert_eq!(st, 400, "{why}: {body}");
    }
    let (st, _) = t.post("/v1/transit/restore/bad", json!({})).await;
    assert_eq!(st, 400, "no backup");
    assert_eq!(t.get("/v1/transit/keys/bad").await.0, 404);
    assert_eq!(
        t.post("/v1/transit/backup/src", json!({})).await.0,
        405,
        "backup is a GET"
    );
}

/// Vault's `auto_rotate_period` through the API: set on create and on
/// `keys/:name/config` as a duration, read back in seconds; 0 turns it
/// off; under an hour, negative or malformed → 400 and nothing changes.
/// (The rotation itself is the engine's `rotate_due_keys`, tested there
/// with an injected clock: a test cannot wait an hour.)
#[tokio::test]
async fn auto_rotate_period_is_set_read_and_validated_like_vaults() {
    let t = T::new().await;
    let period = |d: &Value| d["auto_rotate_period"].clone();
    let created = t
        .ok("/v1/transit/keys/k", json!({"auto_rotate_period": "1h"}))
        .await;
    assert_eq!(period(&created), 3600, "{created}");
    let (st, read) = t.get("/v1/transit/keys/k").await;
    assert_eq!(st, 200);
    assert_eq!(period(&read["data"]), 3600);
    let set = t
        .ok(
            "/v1/transit/keys/k/config",
            json!({"auto_rotate_period": "2h"}),
        )
        .await;
    assert_eq!(period(&set), 7200);

    for (what, value) in [
        ("under an hour", json!("30m")),
        ("one second", json!(1)),
        ("negative", json!("-1h")),
        ("negative seconds", json!(-3600)),
        ("garbage", json!("garbage")),
        ("a float", json!(3600.5)),
        ("a boolean", json!(true)),
        ("too large", json!("999999999d")),
    ] {
        let (st, body) = t
            .post(
                "/v1/transit/keys/k/config",
                json!({"auto_rotate_period": value}),
            )
            .await;
        assert_eq!(st, 400, "{what}: {body}");
        assert!(
            body["errors"][0].as_str().unwrap().contains("auto"),
            "{what}: {body}"
        );
        let (_, read) = t.get("/v1/transit/keys/k").await;
        assert_eq!(period(&read["data"]), 7200, "{what} changed the key");
        assert_eq!(read["data"]["latest_version"], 1);
    }
    // A refused period refuses the whole config call: nothing else changes.
    let (st, _) = t
        .post(
            "/v1/transit/keys/k/config",
            json!({"deletion_allowed": true, "auto_rotate_period": "30m"}),
        )
        .await;
    assert_eq!(st, 400);
    let (_, read) = t.get("/v1/transit/keys/k").await;
    assert_eq!(read["data"]["deletion_allowed"], false);

    // Plain seconds (number or string), days, Go durations; 0 and "0" disable.
    for (value, want) in [
        (json!(86400), 86_400),
        (json!("3600"), 3600),
        (json!("30d"), 2_592_000),
        (json!("1h30m"), 5400),
        (json!(0), 0),
        (json!("4h"), 14_400),
        (json!("0"), 0),
    ] {
        let set = t
            .ok(
                "/v1/transit/keys/k/config",
                json!({"auto_rotate_period": value}),
            )
            .await;
        assert_eq!(period(&set), want, "{value}");
    }
    // A config call without the field leaves it alone.
    t.ok(
        "/v1/transit/keys/k/config",
        json!({"auto_rotate_period": "24h"}),
    )
    .await;
    let set = t
        .ok(
            "/v1/transit/keys/k/config",
            json!({"deletion_allowed": true}),
        )
        .await;
    assert_eq!(period(&set), 86_400);

    // Refused on create: no key is made.
    for value in [json!("30m"), json!("nope"), json!("-2h")] {
        let (st, body) = t
            .post(
                "/v1/transit/keys/short",
                json!({"auto_rotate_period": value}),
            )
            .await;
        assert_eq!(st, 400, "{value}: {body}");
        let (st, _) = t.get("/v1/transit/keys/short").await;
        assert_eq!(st, 404, "{value} created a key");
    }
    // Keys made without it report 0 (off).
    let plain = t.ok("/v1/transit/keys/plain", json!({})).await;
    assert_eq!(period(&plain), 0);
    // Rotating by hand still works on a key with a period.
    let rotated = t.ok("/v1/transit/keys/k/rotate", json!({})).await;
    assert_eq!(rotated["latest_version"], 2);
    assert_eq!(period(&rotated), 86_400);
}

/// The server's own timer rotates a due key, once, and audits it. A key
/// whose latest version is two hours old comes in the way real ones can:
/// restored from a Transit backup made elsewhere (here: this server's own
/// backup with the version's creation time set two hours back). With
/// `auto_rotate_check_seconds = 1` the next check rotates it; a key made
/// just now with the same period is left alone.
#[tokio::test]
async fn the_server_rotates_a_due_key_by_itself_and_audits_it() {
    let s = TestServer::start(Opts {
        engine_extra: "auto_rotate_check_seconds = 1\n".into(),
        ..Opts::default()
    });
    let (_co, app) = s.init_with_app_user().await;
    let t = T {
        c: s.client(),
        s,
        app,
    };
    let fresh = t
        .ok(
            "/v1/transit/keys/fresh",
            json!({"auto_rotate_period": "1h", "exportable": true, "allow_plaintext_backup": true}),
        )
        .await;
    assert_eq!(fresh["auto_rotate_period"], 3600);
    let old_ct = t
        .ok(
            "/v1/transit/encrypt/fresh",
            json!({"plaintext": b64(b"before")}),
        )
        .await["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, backup) = t.get("/v1/transit/backup/fresh").await;
    assert_eq!(st, 200, "{backup}");
    let aged = aged_transit_backup(backup["data"]["backup"].as_str().unwrap(), 7200);
    let (st, body) = t
        .post("/v1/transit/restore/aged", json!({"backup": aged}))
        .await;
    assert_eq!(st, 204, "{body}");

    let mut record = None;
    for _ in 0..300 {
        record =
            t.s.audit_records("transit.keys.auto_rotate")
                .into_iter()
                .find(|r| r["detail"]["key"] == "aged");
        if record.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let record = record.unwrap_or_else(|| panic!("no auto-rotation record; log:\n{}", t.s.log()));
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(record["actor"], "auto-rotate", "{record}");
    assert_eq!(record["detail"]["version"], 2, "{record}");

    let (_, aged) = t.get("/v1/transit/keys/aged").await;
    assert_eq!(aged["data"]["latest_version"], 2, "{aged}");
    // The rotation is a real version: new ciphertexts use it, old ones open.
    let new_ct = t
        .ok(
            "/v1/transit/encrypt/aged",
            json!({"plaintext": b64(b"after")}),
        )
        .await;
    assert!(new_ct["ciphertext"]
        .as_str()
        .unwrap()
        .starts_with("vault:v2:"));
    let opened = t
        .ok("/v1/transit/decrypt/aged", json!({"ciphertext": old_ct}))
        .await;
    assert_eq!(opened["plaintext"], b64(b"before"));
    // The check that rotated "aged" saw "fresh" too: not yet due.
    let (_, fresh) = t.get("/v1/transit/keys/fresh").await;
    assert_eq!(fresh["data"]["latest_version"], 1, "{fresh}");
    assert!(t
        .s
        .audit_records("transit.keys.auto_rotate")
        .iter()
        .all(|r| r["detail"]["key"] == "aged"));
}
