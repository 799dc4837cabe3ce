//! App JWTs over real sockets: the valid token works (directly as the Transit
//! token and through `auth/jwt/login`), and every kind of bad token is
//! refused the same way — 403 as a Transit token (Vault's answer to any bad
//! token), 401 from `auth/jwt/login` — without a panic.
//!
//! Keys are generated at test time; no private key is committed.
mod common;

#[path = "fixtures/jwt_issuer.rs"]
mod jwt_issuer;

use common::*;
use jsonwebtoken::Algorithm;
use jwt_issuer::*;
use serde_json::{json, Value};

async fn server(issuer: &Issuer) -> TestServer {
    let s = TestServer::start(Opts {
        extra_config: issuer.config(),
        ..Opts::default()
    });
    s.init().await;
    let (status, body) = s
        .post(
            &s.client(),
            "/v1/transit/keys/jwt-key",
            Some(&issuer.rs256(&issuer.claims())),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "a JWT app creates its key: {body}");
    s
}

async fn encrypt(s: &TestServer, token: &str) -> (u16, Value) {
    s.post(
        &s.client(),
        "/v1/transit/encrypt/jwt-key",
        Some(token),
        json!({"plaintext": b64(b"hello")}),
    )
    .await
}

async fn jwt_login(s: &TestServer, role: Option<&str>, jwt: &str) -> (u16, Value) {
    let mut body = json!({ "jwt": jwt });
    if let Some(role) = role {
        body["role"] = json!(role);
    }
    s.post(&s.client(), "/v1/auth/jwt/login", None, body).await
}

#[tokio::test]
async fn valid_jwts_use_keys_directly_as_bearer_and_vault_token() {
    let issuer = Issuer::new();
    let s = server(&issuer).await;
    let rs = issuer.rs256(&issuer.claims());
    let (status, body) = encrypt(&s, &rs).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["data"]["ciphertext"]
        .as_str()
        .unwrap()
        .starts_with("vault:v1:"));
    // Authorization: Bearer works too, and so does ES256 from the same issuer.
    let resp = s
        .client()
        .post(s.url("/v1/transit/encrypt/jwt-key"))
        .bearer_auth(issuer.es256(&issuer.claims()))
        .json(&json!({"plaintext": b64(b"hello")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // EdDSA from the JWKS issuer.
    let mut claims = issuer.claims();
    claims["iss"] = json!("https://edge.example");
    assert_eq!(encrypt(&s, &issuer.eddsa(&claims)).await.0, 200);
    // lookup-self shows the app principal and its policies.
    let (status, body) = s
        .get(&s.client(), "/v1/auth/token/lookup-self", Some(&rs))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"]["meta"]["username"],
        "jwt:ci:payments:payments-api"
    );
    assert_eq!(
        body["data"]["policies"],
        json!(["crypto-user", "payments-keys"])
    );
}

#[tokio::test]
async fn a_jwt_principal_uses_keys_but_never_administers() {
    let issuer = Issuer::new();
    let s = server(&issuer).await;
    let rs = issuer.rs256(&issuer.claims());
    // Allowed: key use (above). Denied: admin routes, even from an admin network.
    let (status, _) = s
        .post(
            &s.client(),
            "/v1/hsm/users",
            Some(&rs),
            json!({"username": "mallory", "password": "a-long-password-1"}),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        s.post(&s.client(), "/v1/hsm/zeroize", Some(&rs), json!({}))
            .await
            .0,
        403
    );
    assert_eq!(s.status().await["state"], "active");
}

#[tokio::test]
async fn jwt_login_returns_a_session_token_and_logout_revokes_it() {
    let issuer = Issuer::new();
    let s = server(&issuer).await;
    let jwt = issuer.rs256(&issuer.claims());
    let (status, body) = jwt_login(&s, Some("payments"), &jwt).await;
    assert_eq!(status, 200, "{body}");
    let token = body["auth"]["client_token"].as_str().unwrap().to_string();
    assert_eq!(
        body["auth"]["policies"],
        json!(["crypto-user", "payments-keys"])
    );
    assert!(body["auth"]["lease_duration"].as_u64().unwrap() <= 600);
    assert_eq!(encrypt(&s, &token).await.0, 200);
    // A role the claims do not bind is refused.
    assert_eq!(jwt_login(&s, Some("nope"), &jwt).await.0, 401);
    // Logout revokes the session token; the JWT itself still works until exp.
    let resp = s
        .client()
        .post(s.url("/v1/hsm/logout"))
        .header("X-Vault-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(encrypt(&s, &token).await.0, 403);
    assert_eq!(encrypt(&s, &jwt).await.0, 200);
}

#[tokio::test]
async fn hsm_session_logout_revokes_and_revoke_self_too() {
    let issuer = Issuer::new();
    let s = server(&issuer).await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    assert_eq!(s.get(&s.client(), "/v1/hsm/status", Some(&co)).await.0, 200);
    for path in ["/v1/hsm/logout", "/v1/auth/token/revoke-self"] {
        let token = s.token("admin", ADMIN_PASSWORD).await;
        let (ok, _) = s
            .get(&s.client(), "/v1/auth/token/lookup-self", Some(&token))
            .await;
        assert_eq!(ok, 200);
        let resp = s
            .client()
            .post(s.url(path))
            .header("X-Vault-Token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "{path}");
        let (gone, _) = s
            .get(&s.client(), "/v1/auth/token/lookup-self", Some(&token))
            .await;
        assert_eq!(gone, 403, "{path}");
    }
    // Other sessions are untouched.
    let (still, _) = s
        .get(&s.client(), "/v1/auth/token/lookup-self", Some(&co))
        .await;
    assert_eq!(still, 200);
}

#[tokio::test]
async fn every_bad_token_is_refused_the_same_way() {
    let issuer = Issuer::new();
    let s = server(&issuer).await;
    let good = issuer.claims();
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let rsa = issuer.rsa_key();
    let mut cases: Vec<(&str, String)> = vec![
        ("expired", issuer.rs256(&with("exp", json!(now() - 3600)))),
        (
            "not yet valid",
            issuer.rs256(&with("nbf", json!(now() + 3600))),
        ),
        (
            "wrong aud",
            issuer.rs256(&with("aud", json!("another-service"))),
        ),
        (
            "wrong iss",
            issuer.rs256(&with("iss", json!("https://evil.example"))),
        ),
        ("no aud", {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove("aud");
            issuer.rs256(&c)
        }),
        ("no exp", {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove("exp");
            issuer.rs256(&c)
        }),
        ("alg none", issuer.unsigned(&good)),
        (
            "hs256 with the rsa public key",
            issuer.hs256_with_rsa_public_key(&good),
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa9"), &rsa, &good),
        ),
        (
            "no kid with several keys",
            sign(Algorithm::RS256, None, &rsa, &good),
        ),
        (
            "rs384 not in the allowlist",
            sign(Algorithm::RS384, Some("rsa1"), &rsa, &good),
        ),
        (
            "es256 header on the rsa key",
            sign(Algorithm::RS256, Some("ec1"), &rsa, &good),
        ),
        (
            "claims not bound by any role",
            issuer.rs256(&with("team", json!("other"))),
        ),
        ("eddsa key from another issuer", issuer.eddsa(&good)),
        ("garbage", "garbage".into()),
        ("three dots of garbage", "a.b.c".into()),
        ("empty parts", "..".into()),
        (
            "huge",
            format!("{}.{}.{}", "A".repeat(5000), "B".repeat(5000), "C"),
        ),
        (
            "non-json header",
            format!("{}.{}.sig", b64url(b"\xff\xfe"), b64url(b"{}")),
        ),
    ];
    // A valid token with its signature flipped.
    let valid = issuer.rs256(&good);
    let (head, sig) = valid.rsplit_once('.').unwrap();
    let mut flipped: Vec<char> = sig.chars().collect();
    flipped[5] = if flipped[5] == 'A' { 'B' } else { 'A' };
    cases.push((
        "bad signature",
        format!("{head}.{}", flipped.iter().collect::<String>()),
    ));

    let mut transit_bodies = Vec::new();
    let mut login_bodies = Vec::new();
    for (name, token) in &cases {
        let (status, body) = encrypt(&s, token).await;
        assert_eq!(status, 403, "{name}: {body}");
        transit_bodies.push(body);
        let (status, body) = jwt_login(&s, None, token).await;
        assert_eq!(status, 401, "{name}: {body}");
        login_bodies.push(body);
    }
    // The caller cannot tell the reasons apart.
    assert!(transit_bodies.windows(2).all(|w| w[0] == w[1]));
    assert!(login_bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(login_bodies[0]["errors"], json!(["authentication failed"]));
    // The allow beside the denies, on the same server: it still works.
    assert_eq!(encrypt(&s, &valid).await.0, 200);
    assert_eq!(jwt_login(&s, None, &valid).await.0, 200);
    assert_eq!(s.status().await["state"], "active");
}
