//! Sealed mode and master-key rotation through the real server.
mod common;

use common::*;
use serde_json::{json, Value};

const PASSPHRASE: &str = "operators keep this one offline";

fn shamir() -> Opts {
    Opts {
        engine_extra: "seal = \"shamir\"\nshamir_threshold = 2\nshamir_shares = 3\n".into(),
        ..Opts::default()
    }
}

fn passphrase() -> Opts {
    Opts {
        admins: vec!["127.0.0.1/32"],
        apps: vec!["127.0.0.1/32", "127.0.0.3/32"],
        engine_extra: "seal = \"passphrase\"\n".into(),
        ..Opts::default()
    }
}

async fn init_shamir(s: &TestServer) -> Vec<String> {
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token()}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["seal_type"], "shamir");
    body["data"]["keys_base64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn put_unseal(s: &TestServer, body: Value) -> (u16, Value) {
    let resp = s
        .client()
        .put(s.url("/v1/sys/unseal"))
        .json(&body)
        .send()
        .await
        .unwrap();
    into_parts(resp).await
}

async fn app_key_and_ciphertext(s: &TestServer, co: &str) -> (String, String) {
    let c = s.client();
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/users",
            Some(co),
            json!({"username": "app", "password": CU_PASSWORD}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let app = s.token("app", CU_PASSWORD).await;
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"sealed secret")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    (
        app,
        body["data"]["ciphertext"].as_str().unwrap().to_string(),
    )
}

async fn decrypts(s: &TestServer, app: &str, ct: &str) -> bool {
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/transit/decrypt/k",
            Some(app),
            json!({"ciphertext": ct}),
        )
        .await;
    st == 200 && body["data"]["plaintext"] == b64(b"sealed secret")
}

#[tokio::test]
async fn shamir_restart_is_sealed_wrong_shares_refused_right_shares_unseal() {
    let mut s = TestServer::start(shamir());
    let shares = init_shamir(&s).await;
    assert_eq!(shares.len(), 3);
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (_, ct) = app_key_and_ciphertext(&s, &co).await;
    s.restart();
    let c = s.client();

    // Sealed: Vault's seal-status shape, health 503 (sealedcode honoured).
    let (st, status) = s.get(&c, "/v1/sys/seal-status", None).await;
    assert_eq!(st, 200);
    assert_eq!(status["type"], "shamir");
    assert_eq!(status["sealed"], true);
    assert_eq!(status["initialized"], true);
    assert_eq!(
        (status["t"].as_u64(), status["n"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(status["progress"], 0);
    assert!(!status["nonce"].as_str().unwrap().is_empty());
    let (st, health) = s.get(&c, "/v1/sys/health", None).await;
    assert_eq!(st, 503);
    assert_eq!(health["sealed"], true);
    let (st, _) = s.get(&c, "/v1/sys/health?sealedcode=299", None).await;
    assert_eq!(st, 299);
    // Logins refused while sealed, with a clear error.
    let (st, body) = s.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(st, 503, "{body}");
    assert!(body.to_string().contains("sealed"), "{body}");

    // A malformed share: 400, progress unchanged.
    let (st, _) = put_unseal(&s, json!({"key": "not-a-share"})).await;
    assert_eq!(st, 400);
    // One right share, then a forged one: refused, progress reset.
    let (st, body) = put_unseal(&s, json!({"key": shares[0]})).await;
    assert_eq!((st, body["progress"].as_u64()), (200, Some(1)), "{body}");
    let mut forged = base64_decode(&shares[1]);
    forged[5] ^= 1;
    let (st, body) = put_unseal(&s, json!({"key": b64(&forged)})).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("unseal failed"), "{body}");
    let (_, status) = s.get(&c, "/v1/sys/seal-status", None).await;
    assert_eq!(
        (status["sealed"].as_bool(), status["progress"].as_u64()),
        (Some(true), Some(0))
    );

    // Right shares (any two) through the HSM route: unsealed.
    let (st, body) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": shares[2]}))
        .await;
    assert_eq!(
        (st, body["data"]["progress"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    let (st, body) = put_unseal(&s, json!({"key": shares[0]})).await;
    assert_eq!((st, body["sealed"].as_bool()), (200, Some(false)), "{body}");
    let (st, _) = s.get(&c, "/v1/sys/health", None).await;
    assert_eq!(st, 200);
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test]
async fn passphrase_seal_by_officer_then_unseal_only_from_admin_networks() {
    let s = TestServer::start(passphrase());
    let c = s.client();
    // Init without the passphrase: 400, still uninitialized.
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token()}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token(),
                   "unseal_passphrase": PASSPHRASE}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"].get("keys_base64").is_none());
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (app, ct) = app_key_and_ciphertext(&s, &co).await;

    // A crypto user cannot seal; the officer can.
    let (st, _) = s.post(&c, "/v1/hsm/seal", Some(&app), json!({})).await;
    assert_eq!(st, 403);
    let (st, body) = s.post(&c, "/v1/hsm/seal", Some(&co), json!({})).await;
    assert_eq!(st, 200, "{body}");
    // Transit refused while sealed (the old token is dead too).
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/decrypt/k",
            Some(&app),
            json!({"ciphertext": ct}),
        )
        .await;
    assert_eq!(st, 503, "{body}");
    assert!(body.to_string().contains("sealed"), "{body}");

    // From an app network (not admin): refused before the engine sees it.
    let outsider = s.client_from("127.0.0.3".parse().unwrap());
    let (st, _) = s
        .post(
            &outsider,
            "/v1/hsm/unseal",
            None,
            json!({"key": PASSPHRASE}),
        )
        .await;
    assert_eq!(st, 403);
    let (_, status) = s.get(&c, "/v1/sys/seal-status", None).await;
    assert_eq!(status["sealed"], true);
    // Wrong passphrase: 400, counted, still sealed.
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/unseal",
            None,
            json!({"key": "not the passphrase at all"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let (_, status) = s.get(&c, "/v1/hsm/status", None).await;
    assert_eq!(status["data"]["state"], "sealed");
    assert_eq!(status["data"]["unseal_failures"], 1);
    // Right passphrase from the admin network.
    let (st, body) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": PASSPHRASE}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["sealed"], false);
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);
}

#[tokio::test]
async fn master_key_rotation_online_and_across_restart() {
    let mut s = TestServer::start(Opts::default());
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (app, ct) = app_key_and_ciphertext(&s, &co).await;
    let c = s.client();
    // Only the officer rotates.
    let (st, _) = s
        .post(&c, "/v1/hsm/rotate-master-key", Some(&app), json!({}))
        .await;
    assert_eq!(st, 403);
    let (st, body) = s
        .post(&c, "/v1/hsm/rotate-master-key", Some(&co), json!({}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["master_key_generation"], 2);
    // Sessions and keys keep working without a restart.
    assert!(decrypts(&s, &app, &ct).await);
    s.restart();
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);
    assert_eq!(s.status().await["master_key_generation"], 2);
}

/// kill -9 while rotations run back to back: every restart opens, and
/// every key still decrypts its old ciphertext.
#[tokio::test]
async fn master_key_rotation_survives_kill_9_mid_way() {
    let mut s = TestServer::start(Opts::default());
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (_, ct) = app_key_and_ciphertext(&s, &co).await;
    for round in 0..3u64 {
        let co = s.token("admin", ADMIN_PASSWORD).await;
        let (c, url) = (s.client(), s.url("/v1/hsm/rotate-master-key"));
        let spam = tokio::spawn(async move {
            loop {
                let r = c
                    .post(&url)
                    .header("X-Vault-Token", &co)
                    .json(&json!({}))
                    .send()
                    .await;
                if r.is_err() {
                    break;
                }
            }
        });
        // Let a few rotations commit, then kill mid-stream.
        tokio::time::sleep(std::time::Duration::from_millis(150 + 70 * round)).await;
        s.kill9();
        let _ = spam.await;
        s.start_again();
        let app = s.token("app", CU_PASSWORD).await;
        assert!(decrypts(&s, &app, &ct).await, "round {round}: {}", s.log());
        assert_eq!(s.status().await["state"], "active");
    }
}

async fn rekey(s: &TestServer, token: Option<&str>, body: Value) -> (u16, Value) {
    s.post(&s.client(), "/v1/hsm/rekey", token, body).await
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Shamir 2-of-3 rekeyed to 3-of-5: only the officer with two current
/// shares may; afterwards the old shares rebuild nothing, the new ones
/// (given in hex, Vault's `keys`) unseal and every key still decrypts.
#[tokio::test]
async fn shamir_rekey_to_a_new_split_old_shares_stop_working_new_ones_unseal() {
    let mut s = TestServer::start(shamir());
    let old = init_shamir(&s).await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (app, ct) = app_key_and_ciphertext(&s, &co).await;
    let ask = json!({"current_keys": [old[0], old[2]], "secret_threshold": 3, "secret_shares": 5});

    // Deny: no token, a crypto user's token.
    let (st, body) = rekey(&s, None, ask.clone()).await;
    assert!(st == 401 || st == 403, "{st} {body}");
    let (st, _) = rekey(&s, Some(&app), ask.clone()).await;
    assert_eq!(st, 403);
    // Deny: one share short, a forged share, a malformed one, a bad split.
    let (st, body) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": [old[0]], "secret_threshold": 3, "secret_shares": 5}),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    let mut forged = base64_decode(&old[1]);
    forged[7] ^= 1;
    let (st, body) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": [old[0], b64(&forged)], "secret_threshold": 3, "secret_shares": 5}),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("unseal failed"), "{body}");
    let (st, _) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": [old[0], "zz"], "secret_threshold": 3, "secret_shares": 5}),
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": [old[0], old[1]], "secret_threshold": 4, "secret_shares": 3}),
    )
    .await;
    assert_eq!(st, 400);
    let (_, status) = s.get(&s.client(), "/v1/sys/seal-status", None).await;
    assert_eq!(
        (status["t"].as_u64(), status["n"].as_u64()),
        (Some(2), Some(3))
    );

    // Allow: the officer with two current shares (one of them in hex). A
    // Shamir rekey only begins: nothing changes until the new shares come
    // back, and a restart drops it, the current shares still valid.
    let old1_hex = hex::encode(base64_decode(&old[1]));
    let ask =
        json!({"current_keys": [old[0], old1_hex], "secret_threshold": 3, "secret_shares": 5});
    let (st, body) = rekey(&s, Some(&co), ask.clone()).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["verification_required"], true, "{body}");
    let lost = strings(&body["data"]["keys_base64"]);
    assert_eq!(lost.len(), 5);
    s.restart();
    for share in [&old[2], &old[0]] {
        let (st, body) = put_unseal(&s, json!({"key": share})).await;
        assert_eq!(st, 200, "the current shares still unseal: {body}");
    }
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let app = s.token("app", CU_PASSWORD).await;
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/hsm/rekey/verify",
            Some(&co),
            json!({"keys": lost[..3]}),
        )
        .await;
    assert_eq!(st, 400, "nothing pending after a restart: {body}");

    let (st, body) = rekey(&s, Some(&co), ask).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["seal_type"], "shamir");
    let new_b64 = strings(&body["data"]["keys_base64"]);
    let new_hex = strings(&body["data"]["keys"]);
    assert_eq!((new_b64.len(), new_hex.len()), (5, 5));
    for (b, h) in new_b64.iter().zip(&new_hex) {
        assert_eq!(hex::encode(base64_decode(b)), *h);
    }
    let (_, status) = s.get(&s.client(), "/v1/sys/seal-status", None).await;
    assert_eq!(
        (status["t"].as_u64(), status["n"].as_u64()),
        (Some(2), Some(3)),
        "unverified: the current split still holds"
    );
    // Verify, deny: the old shares, the lost split, too few new ones, a
    // crypto user. Allow: three new shares in hex, from the officer.
    let verify = |token: String, keys: Vec<String>| {
        let s = &s;
        async move {
            s.post(
                &s.client(),
                "/v1/hsm/rekey/verify",
                Some(&token),
                json!({"keys": keys}),
            )
            .await
        }
    };
    for (who, keys, want) in [
        (co.clone(), old.clone(), 400),
        (co.clone(), lost[..3].to_vec(), 400),
        (co.clone(), new_b64[..2].to_vec(), 400),
        (app.clone(), new_b64[..3].to_vec(), 403),
    ] {
        let (st, body) = verify(who, keys).await;
        assert_eq!(st, want, "{body}");
    }
    let (st, body) = verify(
        co.clone(),
        vec![new_hex[4].clone(), new_hex[0].clone(), new_hex[2].clone()],
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["complete"], true);
    let (_, status) = s.get(&s.client(), "/v1/sys/seal-status", None).await;
    assert_eq!(
        (status["t"].as_u64(), status["n"].as_u64()),
        (Some(3), Some(5))
    );
    assert_eq!(
        s.audit_records("hsm.rekey.verify")
            .iter()
            .filter(|r| r["outcome"] == "success")
            .count(),
        1
    );
    assert!(
        s.audit_records("hsm.rekey").len() >= 7,
        "every rekey attempt is audited"
    );
    // The engine keeps serving meanwhile.
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);

    s.restart();
    let (_, status) = s.get(&s.client(), "/v1/sys/seal-status", None).await;
    assert_eq!(
        (
            status["sealed"].as_bool(),
            status["t"].as_u64(),
            status["n"].as_u64()
        ),
        (Some(true), Some(3), Some(5))
    );
    // Every old share together rebuilds nothing that opens the store.
    for (i, share) in old.iter().enumerate() {
        let (st, body) = put_unseal(&s, json!({"key": share})).await;
        if i < 2 {
            assert_eq!(st, 200, "{body}");
        } else {
            assert_eq!(st, 400, "old shares must not unseal: {body}");
            assert!(body.to_string().contains("unseal failed"), "{body}");
        }
    }
    // Three new shares, in hex: unsealed.
    for (i, share) in [&new_hex[4], &new_hex[0], &new_hex[2]]
        .into_iter()
        .enumerate()
    {
        let (st, body) = put_unseal(&s, json!({"key": share})).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["sealed"].as_bool(), Some(i < 2), "{body}");
    }
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);
}

/// Passphrase rekey: the old passphrase stops unsealing, the new one
/// unseals; a wrong current passphrase is refused and counted.
#[tokio::test]
async fn passphrase_rekey_old_passphrase_stops_working_new_one_unseals() {
    const NEW: &str = "a different and also long passphrase";
    let s = TestServer::start(passphrase());
    let c = s.client();
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token(),
                   "unseal_passphrase": PASSPHRASE}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (_, ct) = app_key_and_ciphertext(&s, &co).await;

    // Deny: wrong current passphrase (counted, nothing changes), the same
    // passphrase again, a too-short one, Shamir fields in passphrase mode.
    let (st, body) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": ["not the passphrase at all"], "new_passphrase": NEW}),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("unseal failed"), "{body}");
    assert_eq!(s.status().await["unseal_failures"], 1);
    for bad in [
        json!({"current_keys": [PASSPHRASE], "new_passphrase": PASSPHRASE}),
        json!({"current_keys": [PASSPHRASE], "new_passphrase": "short"}),
        json!({"current_keys": [PASSPHRASE]}),
        json!({"current_keys": [PASSPHRASE], "new_passphrase": NEW, "secret_shares": 3}),
        json!({"current_keys": [PASSPHRASE, PASSPHRASE], "new_passphrase": NEW}),
    ] {
        let (st, body) = rekey(&s, Some(&co), bad.clone()).await;
        assert_eq!(st, 400, "{bad} -> {body}");
    }
    // Allow.
    let (st, body) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": [PASSPHRASE], "new_passphrase": NEW}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["seal_type"], "passphrase");
    assert!(body["data"].get("keys_base64").is_none());

    let (st, _) = s.post(&c, "/v1/hsm/seal", Some(&co), json!({})).await;
    assert_eq!(st, 200);
    let (st, body) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": PASSPHRASE}))
        .await;
    assert_eq!(st, 400, "the old passphrase must not unseal: {body}");
    let (st, body) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": NEW}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["sealed"], false);
    let app = s.token("app", CU_PASSWORD).await;
    assert!(decrypts(&s, &app, &ct).await);
}

/// Auto mode has no operator secret to rekey: 400, and the key file
/// rotation stays `rotate-master-key`'s.
#[tokio::test]
async fn rekey_is_refused_in_auto_mode() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (st, body) = rekey(
        &s,
        Some(&co),
        json!({"current_keys": ["anything at all here"], "new_passphrase": "another long passphrase"}),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("rotate-master-key"), "{body}");
}

/// kill -9 while passphrase rekeys run back to back (A → B → A ...): after
/// every restart the store opens with the last acknowledged passphrase or
/// the one in flight, never with neither, and every key still decrypts.
#[tokio::test]
async fn passphrase_rekey_survives_kill_9_mid_way() {
    const A: &str = "first long operator passphrase";
    const B: &str = "second long operator passphrase";
    let mut s = TestServer::start(passphrase());
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token(),
                   "unseal_passphrase": A}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (_, ct) = app_key_and_ciphertext(&s, &co).await;
    let mut current = A;
    for round in 0..3u64 {
        let co = s.token("admin", ADMIN_PASSWORD).await;
        let (c, url) = (s.client(), s.url("/v1/hsm/rekey"));
        let start = current;
        let spam = tokio::spawn(async move {
            let mut acked = start;
            let mut acks = 0u32;
            loop {
                let next = if acked == A { B } else { A };
                let r = c
                    .post(&url)
                    .header("X-Vault-Token", &co)
                    .json(&json!({"current_keys": [acked], "new_passphrase": next}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        acked = next;
                        acks += 1;
                    }
                    Ok(r) => panic!("rekey answered {}", r.status()),
                    Err(_) => return (acked, acks),
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(600 + 250 * round)).await;
        s.kill9();
        let (acked, acks) = spam.await.unwrap();
        s.start_again();
        let in_flight = if acked == A { B } else { A };
        let (st, _) = s
            .post(&s.client(), "/v1/hsm/unseal", None, json!({"key": acked}))
            .await;
        current = if st == 200 {
            acked
        } else {
            let (st, body) = s
                .post(
                    &s.client(),
                    "/v1/hsm/unseal",
                    None,
                    json!({"key": in_flight}),
                )
                .await;
            assert_eq!(
                st, 200,
                "round {round} ({acks} rekeys acknowledged): neither passphrase opens: {body}"
            );
            in_flight
        };
        eprintln!(
            "round {round}: {acks} rekeys acknowledged; opened with the {} one",
            if current == acked {
                "acknowledged"
            } else {
                "in-flight"
            }
        );
        let app = s.token("app", CU_PASSWORD).await;
        assert!(decrypts(&s, &app, &ct).await, "round {round}: {}", s.log());
    }
}
