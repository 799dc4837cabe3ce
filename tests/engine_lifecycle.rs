//! The engine's life through the real server: init, the consecutive-failure
//! counters, zeroization (crypto-erase), lockout, restarts and kill -9.
mod common;

use common::*;
use serde_json::json;

async fn wrong_admin_login(s: &TestServer) -> u16 {
    s.login("admin", "not the password").await.0
}

async fn wrong_admin_login_break_glass(s: &TestServer) -> u16 {
    s.login_break_glass("admin", "not the password").await.0
}

#[tokio::test]
async fn three_wrong_officer_passwords_zeroize_the_engine() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(&c, "/v1/transit/keys/payroll", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    let (_, enc) = s
        .post(
            &c,
            "/v1/transit/encrypt/payroll",
            Some(&app),
            json!({"plaintext": b64(b"salary")}),
        )
        .await;
    let ciphertext = enc["data"]["ciphertext"].as_str().unwrap().to_string();
    assert!(s.path("master.key").exists());
    assert!(!s.path("init-token").exists(), "init consumes the token");

    // The engine's threat is real: three wrong passwords through the door
    // that may spend every attempt (break-glass) destroy every key.
    for _ in 0..3 {
        assert_eq!(wrong_admin_login_break_glass(&s).await, 401);
    }

    let status = s.status().await;
    assert_eq!(status["state"], "zeroized", "{status}");
    assert_eq!(status["zeroizations"], 1);
    assert!(
        !s.path("master.key").exists(),
        "master key file must be gone"
    );
    assert!(!s.path("store.redb").exists(), "key store must be gone");
    let new_token = s.init_token();
    assert!(!new_token.is_empty(), "a fresh init token is written");

    // The old session died with the engine; the key is gone for good.
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/decrypt/payroll",
            Some(&app),
            json!({"ciphertext": ciphertext}),
        )
        .await;
    assert_eq!(st, 503);
    let (st, body) = s.get(&c, "/v1/sys/health", None).await;
    assert_eq!(st, 503, "{body}");

    // Re-initializing gives an empty HSM: nothing came back.
    let (_co, app) = s.init_with_app_user().await;
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/decrypt/payroll",
            Some(&app),
            json!({"ciphertext": ciphertext}),
        )
        .await;
    assert_eq!(st, 404);
    assert_eq!(s.status().await["zeroizations"], 1);
}

#[tokio::test]
async fn two_wrong_passwords_do_not_zeroize_and_a_success_resets_the_count() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    assert_eq!(wrong_admin_login(&s).await, 401);
    assert_eq!(wrong_admin_login(&s).await, 401);
    assert_eq!(s.failures("admin").await, 2);
    assert_eq!(s.status().await["state"], "active");

    // Two is the front door's limit (the guard); break-glass may log in.
    let (st, body) = s.login_break_glass("admin", ADMIN_PASSWORD).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.failures("admin").await, 0);

    // Two more wrong ones after the reset are still only two, on either door.
    assert_eq!(wrong_admin_login_break_glass(&s).await, 401);
    assert_eq!(wrong_admin_login_break_glass(&s).await, 401);
    let status = s.status().await;
    assert_eq!(status["state"], "active");
    assert_eq!(status["users"][0]["attempts_left"], 1);

    // A front-door success before the reserve resets the count as well.
    let (st, _) = s.login_break_glass("admin", ADMIN_PASSWORD).await;
    assert_eq!(st, 200);
    assert_eq!(wrong_admin_login(&s).await, 401);
    assert_eq!(s.login("admin", ADMIN_PASSWORD).await.0, 200);
    assert_eq!(s.failures("admin").await, 0);
}

#[tokio::test]
async fn concurrent_wrong_logins_are_all_counted_and_zeroize_exactly_once() {
    let s = TestServer::start(Opts {
        zeroize_after_failures: 10,
        ..Opts::default()
    });
    s.init().await;
    let front = s.url("/v1/hsm/login");
    let statuses = s.concurrent_wrong_logins(front.clone(), "admin", 9).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(
        s.failures("admin").await,
        9,
        "every concurrent attempt is counted"
    );
    assert_eq!(s.status().await["state"], "active");

    // The front door stops at the reserve; break-glass may spend the rest.
    let statuses = s.concurrent_wrong_logins(front, "admin", 10).await;
    assert!(statuses.iter().all(|s| *s == 423), "{statuses:?}");
    assert_eq!(s.failures("admin").await, 9, "refusals count nothing");
    let statuses = s
        .concurrent_wrong_logins(s.break_glass_url("/v1/hsm/login"), "admin", 10)
        .await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 503),
        "{statuses:?}"
    );
    let status = s.status().await;
    assert_eq!(status["state"], "zeroized");
    assert_eq!(status["zeroizations"], 1, "zeroized exactly once");
}

#[tokio::test]
async fn a_crypto_user_is_locked_after_five_failures_until_the_officer_resets_it() {
    let s = TestServer::start(Opts::default());
    let (co, _app) = s.init_with_app_user().await;
    for _ in 0..5 {
        assert_eq!(s.login("app", "wrong password").await.0, 401);
    }
    let status = s.status().await;
    let app = status["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["locked"], true, "{status}");
    assert_eq!(
        status["state"], "active",
        "a crypto user's failures never zeroize"
    );
    // Locked: even the right password fails, with the same answer.
    let (st, body) = s.login("app", CU_PASSWORD).await;
    assert_eq!(st, 401);
    assert_eq!(body["errors"][0], "invalid username or password");

    let (st, body) = s
        .post(
            &s.client(),
            "/v1/hsm/users/app/password",
            Some(&co),
            json!({"password": "a-new-password-2"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.login("app", "a-new-password-2").await.0, 200);
}

#[tokio::test]
async fn init_needs_the_current_token_from_the_data_dir() {
    let mut s = TestServer::start(Opts::default());
    let stale = s.init_token();
    s.restart();
    let current = s.init_token();
    assert_ne!(
        stale, current,
        "each start of an unowned engine writes a fresh token"
    );
    let c = s.client();
    let init =
        |token: serde_json::Value| json!({"admin_password": ADMIN_PASSWORD, "init_token": token});

    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(st, 400, "no token: {body}");
    let (st, _) = s.post(&c, "/v1/hsm/init", None, init(json!(""))).await;
    assert_eq!(st, 403, "empty token");
    let (st, _) = s.post(&c, "/v1/hsm/init", None, init(json!(stale))).await;
    assert_eq!(st, 403, "stale token");
    assert_eq!(s.status().await["state"], "uninitialized");
    assert_eq!(s.init_token(), current, "failed attempts change nothing");

    let (st, body) = s.post(&c, "/v1/hsm/init", None, init(json!(current))).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.status().await["state"], "active");
    // Once owned, init is refused even with the old token.
    let (st, _) = s.post(&c, "/v1/hsm/init", None, init(json!(current))).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn failure_counters_survive_a_restart() {
    let mut s = TestServer::start(Opts::default());
    s.init().await;
    assert_eq!(wrong_admin_login(&s).await, 401);
    assert_eq!(wrong_admin_login(&s).await, 401);
    s.restart();
    assert_eq!(s.failures("admin").await, 2, "a restart is not a reset");
    assert_eq!(wrong_admin_login(&s).await, 423, "the guard still knows");
    assert_eq!(wrong_admin_login_break_glass(&s).await, 401);
    assert_eq!(s.status().await["state"], "zeroized");
}

#[tokio::test]
async fn an_acknowledged_key_survives_kill_9() {
    let mut s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/durable",
            Some(&app),
            json!({"type": "ed25519"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .post(&c, "/v1/transit/keys/durable-aes", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    let (_, enc) = s
        .post(
            &c,
            "/v1/transit/encrypt/durable-aes",
            Some(&app),
            json!({"plaintext": b64(b"keep me")}),
        )
        .await;
    let ciphertext = enc["data"]["ciphertext"].as_str().unwrap().to_string();
    let (_, sig) = s
        .post(
            &c,
            "/v1/transit/sign/durable",
            Some(&app),
            json!({"input": b64(b"doc")}),
        )
        .await;
    let signature = sig["data"]["signature"].as_str().unwrap().to_string();

    s.kill9();
    s.start_again();

    // Sessions live in memory; the keys do not.
    let app = s.token("app", CU_PASSWORD).await;
    let c = s.client();
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/decrypt/durable-aes",
            Some(&app),
            json!({"ciphertext": ciphertext}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["plaintext"], b64(b"keep me"));
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/verify/durable",
            Some(&app),
            json!({"input": b64(b"doc"), "signature": signature}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["valid"], true);
}

#[tokio::test]
async fn the_login_guard_refuses_the_front_door_at_the_reserve_and_break_glass_resets() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    assert_eq!(wrong_admin_login(&s).await, 401);
    assert_eq!(wrong_admin_login(&s).await, 401);
    // At the reserve: refused without looking at the password, even the right one.
    let (st, body) = s.login("admin", "not the password").await;
    assert_eq!(st, 423, "{body}");
    assert!(
        body["errors"][0].as_str().unwrap().contains("break-glass"),
        "{body}"
    );
    assert_eq!(s.login("admin", ADMIN_PASSWORD).await.0, 423);
    let status = s.status().await;
    assert_eq!(status["state"], "active");
    assert_eq!(
        status["users"][0]["consecutive_failures"], 2,
        "refusals count nothing"
    );
    // Break-glass may log in; the success resets the count and reopens the front door.
    let (st, body) = s.login_break_glass("admin", ADMIN_PASSWORD).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.failures("admin").await, 0);
    assert_eq!(s.login("admin", ADMIN_PASSWORD).await.0, 200);
}

#[tokio::test]
async fn twenty_concurrent_wrong_front_door_logins_never_get_past_the_reserve() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    let statuses = s
        .concurrent_wrong_logins(s.url("/v1/hsm/login"), "admin", 20)
        .await;
    let refused = statuses.iter().filter(|s| **s == 423).count();
    let failed = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!((failed, refused), (2, 18), "{statuses:?}");
    let status = s.status().await;
    assert_eq!(status["state"], "active");
    assert_eq!(status["zeroizations"], 0);
    assert_eq!(status["users"][0]["attempts_left"], 1);
}

#[tokio::test]
async fn with_the_guard_off_the_front_door_zeroizes() {
    let s = TestServer::start(Opts {
        login_guard_reserve: 0,
        ..Opts::default()
    });
    s.init().await;
    for _ in 0..3 {
        assert_eq!(wrong_admin_login(&s).await, 401);
    }
    assert_eq!(s.status().await["state"], "zeroized");
}

#[tokio::test]
async fn break_glass_serves_no_transit_and_admits_only_its_group() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let r = s
        .client()
        .post(s.break_glass_url("/v1/transit/keys/k"))
        .header("X-Vault-Token", &app)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // 127.0.0.3 is in no group of the break-glass listener.
    let other = s.client_from("127.0.0.3".parse().unwrap());
    assert!(other
        .get(s.break_glass_url("/v1/sys/health"))
        .send()
        .await
        .is_err());
    let r = s
        .client()
        .get(s.break_glass_url("/v1/sys/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
