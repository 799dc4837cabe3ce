//! User management through the real server: the crypto officer lists and
//! deletes crypto users (tokens die with them), every user changes its own
//! password through the guarded login path, and the password policy.
mod common;

use common::*;
use serde_json::{json, Value};

async fn create_user(s: &TestServer, co: &str, name: &str, password: &str) -> (u16, Value) {
    s.post(
        &s.client(),
        "/v1/hsm/users",
        Some(co),
        json!({"username": name, "password": password}),
    )
    .await
}

async fn change(s: &TestServer, token: &str, old: &str, new: &str) -> (u16, Value) {
    s.post(
        &s.client(),
        "/v1/hsm/password",
        Some(token),
        json!({"old_password": old, "new_password": new}),
    )
    .await
}

async fn transit_ok(s: &TestServer, token: &str) -> u16 {
    s.post(&s.client(), "/v1/transit/random/8", Some(token), json!({}))
        .await
        .0
}

#[tokio::test]
async fn the_officer_lists_users_without_hashes_and_others_cannot() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, body) = s.get(&c, "/v1/hsm/users", Some(&co)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["keys"], json!(["admin", "app"]));
    let app_entry = &body["data"]["users"][1];
    assert_eq!(app_entry["role"], "crypto-user");
    assert_eq!(app_entry["locked"], false);
    assert_eq!(app_entry["consecutive_failures"], 0);
    let text = body.to_string();
    assert!(
        !text.contains("argon2") && !text.contains("password_hash"),
        "{text}"
    );
    // LIST works too (Vault clients list with it).
    let resp = c
        .request(
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            s.url("/v1/hsm/users"),
        )
        .header("X-Vault-Token", &co)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Denied: a crypto user, no token.
    assert_eq!(s.get(&c, "/v1/hsm/users", Some(&app)).await.0, 403);
    assert_eq!(s.get(&c, "/v1/hsm/users", None).await.0, 403);
}

#[tokio::test]
async fn deleting_a_user_kills_its_tokens_at_once() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    assert_eq!(create_user(&s, &co, "bob", "bob-password-1").await.0, 200);
    let bob = s.token("bob", "bob-password-1").await;
    let bob2 = s.token("bob", "bob-password-1").await;
    assert_eq!(transit_ok(&s, &bob).await, 200);

    // Denied: a crypto user deleting another; the officer deleting itself.
    let del = |who: &'static str, token: String| {
        let s = &s;
        let c = c.clone();
        async move {
            let resp = c
                .delete(s.url(&format!("/v1/hsm/users/{who}")))
                .header("X-Vault-Token", token)
                .send()
                .await
                .unwrap();
            into_parts(resp).await
        }
    };
    assert_eq!(del("bob", app.clone()).await.0, 403);
    assert_eq!(transit_ok(&s, &bob).await, 200, "bob still works");
    let (st, body) = del("admin", co.clone()).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(del("nobody", co.clone()).await.0, 404);
    assert_eq!(del("bad%2Fname", co.clone()).await.0, 400);

    // Allowed: the officer deletes bob; both of bob's tokens die at once.
    let (st, body) = del("bob", co.clone()).await;
    assert_eq!(st, 204, "{body}");
    assert_eq!(transit_ok(&s, &bob).await, 403);
    assert_eq!(transit_ok(&s, &bob2).await, 403);
    assert_eq!(s.login("bob", "bob-password-1").await.0, 401);
    assert_eq!(transit_ok(&s, &app).await, 200, "other users are untouched");
    let (_, list) = s.get(&c, "/v1/hsm/users", Some(&co)).await;
    assert_eq!(list["data"]["keys"], json!(["admin", "app"]));
    // The name can be used again, with nothing of the old user.
    assert_eq!(create_user(&s, &co, "bob", "new-bob-password").await.0, 200);
    assert_eq!(s.login("bob", "bob-password-1").await.0, 401);
    assert_eq!(s.login("bob", "new-bob-password").await.0, 200);
}

#[tokio::test]
async fn a_user_changes_its_own_password() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let other = s.token("app", CU_PASSWORD).await;
    // Allowed with the right old password: a new token; every old one dies.
    let (st, body) = change(&s, &app, CU_PASSWORD, "a-brand-new-password").await;
    assert_eq!(st, 200, "{body}");
    let fresh = body["auth"]["client_token"].as_str().unwrap().to_string();
    assert_eq!(transit_ok(&s, &fresh).await, 200);
    assert_eq!(transit_ok(&s, &app).await, 403);
    assert_eq!(transit_ok(&s, &other).await, 403);
    assert_eq!(s.login("app", CU_PASSWORD).await.0, 401);
    assert_eq!(s.failures("app").await, 1, "that wrong login counted");
    let (st, _) = s.login("app", "a-brand-new-password").await;
    assert_eq!(st, 200);
    assert_eq!(s.failures("app").await, 0);
}

#[tokio::test]
async fn a_wrong_old_password_counts_like_a_failed_login_and_locks() {
    let s = TestServer::start(Opts {
        lock_user_after_failures: 3,
        ..Opts::default()
    });
    let (_co, app) = s.init_with_app_user().await;
    for n in 1..=2 {
        let (st, _) = change(&s, &app, "not-the-password", "another-password-1").await;
        assert_eq!(st, 401);
        assert_eq!(s.failures("app").await, n);
    }
    // The third failure locks the user and revokes its sessions, as a login would.
    assert_eq!(
        change(&s, &app, "not-the-password", "another-password-1")
            .await
            .0,
        401
    );
    assert_eq!(transit_ok(&s, &app).await, 403);
    assert_eq!(s.login("app", CU_PASSWORD).await.0, 401, "locked");
}

#[tokio::test]
async fn the_password_policy_refuses_short_username_and_previous_passwords() {
    let s = TestServer::start(Opts {
        engine_extra: "min_password_length = 16".into(),
        ..Opts::default()
    });
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    // Create: 15 characters refused, 16 allowed, the username refused.
    assert_eq!(
        create_user(&s, &co, "carol", "fifteen-chars-x").await.0,
        400
    );
    assert_eq!(
        create_user(&s, &co, "carol-the-user-1", "carol-the-user-1")
            .await
            .0,
        400
    );
    assert_eq!(
        create_user(&s, &co, "carol", "sixteen-chars-xy").await.0,
        200
    );
    let carol = s.token("carol", "sixteen-chars-xy").await;
    // Change: every policy refusal is a 400 that counts nothing.
    for new in ["short-password", "CAROL", "sixteen-chars-xy"] {
        let (st, body) = change(&s, &carol, "sixteen-chars-xy", new).await;
        assert_eq!(st, 400, "{new}: {body}");
    }
    assert_eq!(s.failures("carol").await, 0);
    assert_eq!(
        transit_ok(&s, &carol).await,
        200,
        "the session survives refusals"
    );
    // Reset by the officer: the previous password is refused too.
    let reset = |pw: &'static str| {
        let s = &s;
        let co = co.clone();
        async move {
            s.post(
                &s.client(),
                "/v1/hsm/users/carol/password",
                Some(&co),
                json!({"password": pw}),
            )
            .await
            .0
        }
    };
    assert_eq!(reset("sixteen-chars-xy").await, 400);
    assert_eq!(reset("too-short").await, 400);
    assert_eq!(reset("a-different-16-chars").await, 200);
    // An app (JWT) principal cannot change passwords; the officer can change its own.
    let (st, body) = change(&s, &co, ADMIN_PASSWORD, "officer-new-password-16").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.login("admin", "officer-new-password-16").await.0, 200);
}

#[tokio::test]
async fn bad_password_change_requests_are_refused() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    for body in [
        json!({}),
        json!({"old_password": CU_PASSWORD}),
        json!({"old_password": CU_PASSWORD, "new_password": "x-long-enough", "extra": 1}),
        json!({"old_password": 5, "new_password": "x-long-enough"}),
    ] {
        let (st, resp) = s
            .post(&c, "/v1/hsm/password", Some(&app), body.clone())
            .await;
        assert_eq!(st, 400, "{body}: {resp}");
    }
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/password",
            None,
            json!({"old_password": CU_PASSWORD, "new_password": "x-long-enough"}),
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(s.failures("app").await, 0);
    assert_eq!(transit_ok(&s, &app).await, 200);
}
