//! One test per attack, named for what it guards against. Each deny has its
//! allow beside it, so a test cannot pass by refusing everything.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use serde_json::json;

const UNTRUSTED: &str = "127.0.0.2";
/// In the test server's `apps` group but not in `admins`.
const APP_NET: &str = "127.0.0.3";

fn app_and_admin_nets() -> Opts {
    Opts {
        apps: vec!["127.0.0.1/32", "127.0.0.3/32"],
        admins: vec!["127.0.0.1/32"],
        ..Opts::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Connects from `source`, sends the start of a TLS ClientHello, and returns
/// every byte the server sent back before closing.
async fn raw_exchange(source: &str, server: SocketAddr) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip(source), 0))?;
    let mut stream = socket.connect(server).await?;
    // A TLS record header for a ClientHello, then a truncated body: enough
    // for a server that speaks TLS to answer or wait.
    let _ = stream
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00])
        .await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    match read {
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "server kept the connection open",
        )),
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(got),
        Ok(Err(e)) => Err(e),
    }
}

#[tokio::test]
async fn untrusted_source_is_disconnected_before_any_tls_byte() {
    let s = TestServer::start(Opts::default());
    let got = raw_exchange(UNTRUSTED, s.addr)
        .await
        .expect("the server closes, it does not hang");
    assert!(
        got.is_empty(),
        "the server sent {} bytes to an untrusted peer",
        got.len()
    );
    // A real TLS client from there fails to connect at all.
    let err = s
        .client_from(ip(UNTRUSTED))
        .get(s.url("/v1/sys/health"))
        .send()
        .await;
    assert!(err.is_err(), "untrusted peer got a response");
    // The allow: a trusted peer completes TLS and gets an answer.
    let (st, _) = s.get(&s.client(), "/v1/sys/health", None).await;
    assert_eq!(st, 501);
}

#[tokio::test]
async fn untrusted_source_cannot_spend_officer_login_attempts() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    let untrusted = s.client_from(ip(UNTRUSTED));
    for _ in 0..100 {
        let r = untrusted
            .post(s.url("/v1/hsm/login"))
            .json(&json!({"username": "admin", "password": "guess"}))
            .send()
            .await;
        assert!(r.is_err(), "an untrusted login attempt reached HTTP");
    }
    let status = s.status().await;
    assert_eq!(status["state"], "active");
    for user in status["users"].as_array().unwrap() {
        assert_eq!(user["consecutive_failures"], 0, "{status}");
    }
    // The allow: the same wrong guess from the trusted network is counted.
    assert_eq!(s.login("admin", "guess").await.0, 401);
    assert_eq!(s.failures("admin").await, 1);
}

#[tokio::test]
async fn officer_login_from_an_app_network_fails_like_a_wrong_password_and_counts_nothing() {
    let s = TestServer::start(app_and_admin_nets());
    let (_co, _app) = s.init_with_app_user().await;
    let from_app_net = s.client_from(ip(APP_NET));
    let (st_right, body_right) = s
        .post(
            &from_app_net,
            "/v1/hsm/login",
            None,
            json!({"username": "admin", "password": ADMIN_PASSWORD}),
        )
        .await;
    let (st_wrong, body_wrong) = s
        .post(
            &from_app_net,
            "/v1/hsm/login",
            None,
            json!({"username": "admin", "password": "wrong password"}),
        )
        .await;
    assert_eq!((st_right, st_wrong), (401, 401));
    assert_eq!(
        body_right["errors"], body_wrong["errors"],
        "the reason must not show"
    );
    assert_eq!(s.failures("admin").await, 0, "nothing was counted");
    // The allow: a crypto user may log in from the app network...
    let (st, body) = s
        .post(
            &from_app_net,
            "/v1/hsm/login",
            None,
            json!({"username": "app", "password": CU_PASSWORD}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // ...and the officer from the admin network.
    assert_eq!(s.login("admin", ADMIN_PASSWORD).await.0, 200);
}

#[tokio::test]
async fn app_network_cannot_reach_admin_routes() {
    let s = TestServer::start(app_and_admin_nets());
    let (co, _app) = s.init_with_app_user().await;
    let from_app_net = s.client_from(ip(APP_NET));
    let (st, _) = s.get(&from_app_net, "/v1/hsm/status", None).await;
    assert_eq!(st, 403);
    // Even with a valid officer token, zeroize is refused off the admin network.
    let (st, _) = s
        .post(&from_app_net, "/v1/hsm/zeroize", Some(&co), json!({}))
        .await;
    assert_eq!(st, 403);
    let (st, _) = s
        .post(
            &from_app_net,
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "eve", "password": "eve-password-1"}),
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(s.status().await["state"], "active");
    // The allow: the same calls from the admin network.
    let (st, _) = s
        .post(
            &s.client(),
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "eve", "password": "eve-password-1"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .post(&s.client(), "/v1/hsm/zeroize", Some(&co), json!({}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(s.status().await["state"], "zeroized");
}

#[tokio::test]
async fn init_from_an_app_network_is_refused_even_with_the_token() {
    let s = TestServer::start(app_and_admin_nets());
    let token = s.init_token();
    let body = json!({"admin_password": ADMIN_PASSWORD, "init_token": token});
    let (st, _) = s
        .post(
            &s.client_from(ip(APP_NET)),
            "/v1/hsm/init",
            None,
            body.clone(),
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(s.status().await["state"], "uninitialized");
    assert_eq!(s.init_token(), token);
    let (st, _) = s.post(&s.client(), "/v1/hsm/init", None, body).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn forwarded_for_header_does_not_grant_admin_routes() {
    let s = TestServer::start(app_and_admin_nets());
    s.init().await;
    let from_app_net = s.client_from(ip(APP_NET));
    for header in ["x-forwarded-for", "x-real-ip", "forwarded"] {
        let value = if header == "forwarded" {
            "for=127.0.0.1"
        } else {
            "127.0.0.1"
        };
        let st = from_app_net
            .get(s.url("/v1/hsm/status"))
            .header(header, value)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 403, "{header} was trusted");
    }
}

#[tokio::test]
async fn crypto_officer_token_cannot_use_keys_and_crypto_user_cannot_administer() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s.post(&c, "/v1/transit/keys/k", Some(&co), json!({})).await;
    assert_eq!(st, 403, "the officer does not use keys");
    let (st, _) = s.post(&c, "/v1/hsm/zeroize", Some(&app), json!({})).await;
    assert_eq!(st, 403, "a crypto user cannot zeroize");
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/users",
            Some(&app),
            json!({"username": "x", "password": "password-123"}),
        )
        .await;
    assert_eq!(st, 403);
    assert_eq!(s.status().await["state"], "active");
    // The allow.
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn missing_forged_or_revoked_tokens_are_refused() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    for token in [
        None,
        Some(""),
        Some("hsm.forged"),
        Some(&app[..app.len() - 1]),
    ] {
        let (st, _) = s.post(&c, "/v1/transit/keys/k", token, json!({})).await;
        assert_eq!(st, 403, "token {token:?} accepted");
    }
    // Bearer works like X-Vault-Token (the allow).
    let st = c
        .post(s.url("/v1/transit/keys/k"))
        .bearer_auth(&app)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 200);
    // A password reset revokes the user's sessions.
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/users/app/password",
            Some(&co),
            json!({"password": "new-password-99"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s.get(&c, "/v1/transit/keys/k", Some(&app)).await;
    assert_eq!(st, 403, "old session survived a password reset");
}

#[tokio::test]
async fn unknown_users_and_wrong_passwords_look_the_same() {
    let s = TestServer::start(Opts::default());
    let (_co, _app) = s.init_with_app_user().await;
    let (a, body_a) = s.login("nobody", "whatever-password").await;
    let (b, body_b) = s.login("app", "whatever-password").await;
    assert_eq!((a, b), (401, 401));
    assert_eq!(body_a["errors"], body_b["errors"]);
}

#[tokio::test]
async fn mistyped_officer_passwords_at_the_front_door_never_zeroize() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    let mut statuses = Vec::new();
    for i in 0..30 {
        statuses.push(s.login("admin", &format!("typo number {i}")).await.0);
    }
    assert_eq!(&statuses[..2], &[401, 401], "two real tries");
    assert!(statuses[2..].iter().all(|st| *st == 423), "{statuses:?}");
    let status = s.status().await;
    assert_eq!(status["state"], "active");
    assert_eq!(status["zeroizations"], 0);
    // The deny's twin: the door that may spend the last attempt does zeroize.
    assert_eq!(s.login_break_glass("admin", "one more typo").await.0, 401);
    assert_eq!(s.status().await["state"], "zeroized");
}

/// Rewrites the test server's policies and `api` listener, then restarts it.
fn refence(s: &mut TestServer, api_extra: &str, policy: &str) {
    std::fs::write(s.dir.path().join("policies/fence.toml"), policy).unwrap();
    let config = std::fs::read_to_string(&s.config_path).unwrap();
    let config = config.replacen(
        "admin_groups = [\"admins\"]\n",
        &format!("admin_groups = [\"admins\"]\n{api_extra}\n"),
        1,
    );
    std::fs::write(&s.config_path, config).unwrap();
    s.restart();
}

/// An imported threat list beats the allow rules: a listed address inside
/// an allowed network never gets a TLS handshake, let alone a login attempt.
#[tokio::test]
async fn threat_list_entry_is_refused_even_inside_an_allowed_network() {
    let mut s = TestServer::start(Opts {
        apps: vec!["127.0.0.0/8"],
        ..Opts::default()
    });
    std::fs::write(
        s.dir.path().join("policies/threats.txt"),
        "# feed\n127.0.0.66\n",
    )
    .unwrap();
    refence(
        &mut s,
        "deny_lists = [\"feed\"]",
        "[prefix_list.feed]\nfile = \"threats.txt\"\n[deny_list.feed]\nrules = [{ prefix_list = \"feed\" }]\n",
    );
    let inside = s.client_from("127.0.0.65".parse().unwrap());
    let (st, _) = s.get(&inside, "/v1/sys/health", None).await;
    assert_eq!(st, 501, "an allowed neighbour still gets in");
    let listed = s.client_from("127.0.0.66".parse().unwrap());
    let refused = listed.get(s.url("/v1/sys/health")).send().await;
    assert!(refused.is_err(), "listed source got an answer: {refused:?}");
    let login = listed
        .post(s.url("/v1/hsm/login"))
        .json(&json!({"username": "admin", "password": "guess"}))
        .send()
        .await;
    assert!(login.is_err(), "listed source reached the login route");
}

/// An app network admitted to the listener cannot reach admin routes nor
/// spend a crypto-officer attempt, while its own route class still works.
#[tokio::test]
async fn app_network_cannot_reach_admin_routes_while_health_works() {
    let s = TestServer::start(Opts {
        apps: vec!["127.0.0.1/32", "127.0.0.2/32"],
        admins: vec!["127.0.0.1/32"],
        ..Opts::default()
    });
    s.init().await;
    let app = s.client_from("127.0.0.2".parse().unwrap());
    let (st, _) = s.get(&app, "/v1/hsm/status", None).await;
    assert_eq!(st, 403);
    let (st, _) = s.post(&app, "/v1/hsm/zeroize", None, json!({})).await;
    assert_eq!(st, 403);
    let (st, _) = s.get(&app, "/v1/sys/health", None).await;
    assert_eq!(st, 200, "health still works from the app network");
    assert_eq!(s.status().await["state"], "active");
    assert_eq!(s.failures("admin").await, 0);
}

/// A port-range rule for another listener's port opens nothing here.
#[tokio::test]
async fn port_range_rule_for_another_port_opens_nothing() {
    let mut s = TestServer::start(Opts::default());
    refence(
        &mut s,
        "",
        "[group.elsewhere]\nrules = [{ source = \"127.0.0.9\", ports = \"1-1\" }]\n",
    );
    let config = std::fs::read_to_string(&s.config_path).unwrap();
    let config = config.replacen(
        "security_groups = [\"apps\", \"admins\"]",
        "security_groups = [\"apps\", \"admins\", \"elsewhere\"]",
        1,
    );
    std::fs::write(&s.config_path, config).unwrap();
    s.restart();
    let outsider = s.client_from("127.0.0.9".parse().unwrap());
    assert!(outsider.get(s.url("/v1/sys/health")).send().await.is_err());
    let (st, _) = s.get(&s.client(), "/v1/sys/health", None).await;
    assert_eq!(st, 501);
}

// ---------------------------------------------------------------------------
// Rate limits and app JWTs (issue 4, items 3 and 5).

#[path = "fixtures/jwt_issuer.rs"]
mod jwt_issuer;

async fn server_with_jwt_issuer(issuer: &jwt_issuer::Issuer) -> TestServer {
    let s = TestServer::start(Opts {
        extra_config: issuer.config(),
        ..Opts::default()
    });
    s.init().await;
    let token = issuer.rs256(&issuer.claims());
    let (status, body) = s
        .post(&s.client(), "/v1/transit/keys/k", Some(&token), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    s
}

async fn encrypt_with(s: &TestServer, token: &str) -> u16 {
    s.post(
        &s.client(),
        "/v1/transit/encrypt/k",
        Some(token),
        json!({"plaintext": b64(b"x")}),
    )
    .await
    .0
}

/// Key confusion: a verifier that feeds the RSA public key to HMAC would
/// accept a token anyone can mint. The allowlist holds no HS algorithm and
/// a key is only used with its own family.
#[tokio::test]
async fn hs256_token_signed_with_the_rsa_public_key_is_refused() {
    let issuer = jwt_issuer::Issuer::new();
    let s = server_with_jwt_issuer(&issuer).await;
    let claims = issuer.claims();
    assert_eq!(
        encrypt_with(&s, &issuer.hs256_with_rsa_public_key(&claims)).await,
        403
    );
    assert_eq!(encrypt_with(&s, &issuer.rs256(&claims)).await, 200);
}

/// `alg: none` means "no signature": never accepted, whatever the claims.
#[tokio::test]
async fn unsigned_alg_none_token_is_refused() {
    let issuer = jwt_issuer::Issuer::new();
    let s = server_with_jwt_issuer(&issuer).await;
    let claims = issuer.claims();
    assert_eq!(encrypt_with(&s, &issuer.unsigned(&claims)).await, 403);
    assert_eq!(encrypt_with(&s, &issuer.es256(&claims)).await, 200);
}

/// A token minted for another service (another `aud`) must not work here.
#[tokio::test]
async fn token_for_another_audience_is_refused() {
    let issuer = jwt_issuer::Issuer::new();
    let s = server_with_jwt_issuer(&issuer).await;
    let mut claims = issuer.claims();
    assert_eq!(encrypt_with(&s, &issuer.rs256(&claims)).await, 200);
    claims["aud"] = json!("payments-db");
    assert_eq!(encrypt_with(&s, &issuer.rs256(&claims)).await, 403);
}

/// One app network guessing passwords, for many users, as fast as it can:
/// the shipped limits stop it after a handful of argon2 runs, the users it
/// did not reach keep their counters at zero, and other hosts log in.
#[tokio::test]
async fn login_flood_from_one_network_cannot_lock_out_other_users() {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/rate-limits.toml"),
    )
    .unwrap();
    let s = TestServer::start(Opts {
        rate_limits: Some(shipped),
        ..app_and_admin_nets()
    });
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"];
    for u in users {
        let (status, body) = s
            .post(
                &s.client(),
                "/v1/hsm/users",
                Some(&co),
                json!({"username": u, "password": CU_PASSWORD}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let attacker = s.client_from(ip(APP_NET));
    let mut limited = 0;
    for round in 0..5 {
        for u in users {
            let r = attacker
                .post(s.url("/v1/hsm/login"))
                .json(&json!({"username": u, "password": format!("guess {round}")}))
                .send()
                .await
                .unwrap();
            if r.status() == 429 {
                assert!(r.headers().contains_key("retry-after"));
                limited += 1;
            } else {
                assert_eq!(r.status(), 401);
            }
        }
    }
    assert!(limited >= 25, "only {limited} of 40 guesses were limited");
    let status = s.status().await;
    let locked = status["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["locked"] == true)
        .count();
    assert_eq!(locked, 0, "{status}");
    // Every user can still log in from its own host.
    for u in users {
        assert_eq!(s.login(u, CU_PASSWORD).await.0, 200, "{u}");
    }
}

/// Guards against a password (right or wrong) reaching the audit log, and
/// against a failed or refused officer login going unrecorded: the audit
/// log is how an operator proves afterwards who burned the attempts.
#[tokio::test]
async fn logins_are_audited_without_their_passwords() {
    let s = TestServer::start(Opts::default());
    s.init().await;
    for _ in 0..3 {
        s.login("admin", "guessed-password-123").await;
    }
    assert_eq!(s.login_break_glass("admin", ADMIN_PASSWORD).await.0, 200);
    let log = std::fs::read_to_string(s.path("audit.log")).unwrap();
    assert!(!log.contains("guessed-password-123"));
    assert!(!log.contains(ADMIN_PASSWORD));
    let outcomes: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "hsm.login")
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_string(),
                r["detail"]["channel"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("failure", "front-door"),
        ("failure", "front-door"),
        ("refused", "front-door"),
        ("success", "break-glass"),
    ];
    assert_eq!(
        outcomes,
        expected.map(|(o, c)| (o.to_string(), c.to_string())),
        "{log}"
    );
}

/// Guards against key exfiltration through the Transit export API: a key
/// created without `exportable` never leaves, under any export type or
/// version, and export of an exportable key (the twin) works.
#[tokio::test]
async fn a_non_exportable_key_never_leaves_through_export() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    for ty in ["aes256-gcm96", "ed25519", "rsa-2048"] {
        let (st, _) = s
            .post(
                &c,
                &format!("/v1/transit/keys/{ty}"),
                Some(&app),
                json!({"type": ty}),
            )
            .await;
        assert_eq!(st, 200);
        for kind in ["encryption-key", "signing-key", "hmac-key"] {
            for suffix in ["", "/1", "/latest"] {
                let (st, body) = s
                    .get(
                        &c,
                        &format!("/v1/transit/export/{kind}/{ty}{suffix}"),
                        Some(&app),
                    )
                    .await;
                assert_eq!(st, 400, "{ty} {kind}{suffix}: {body}");
                assert!(body.get("data").is_none(), "{body}");
            }
        }
    }
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/open",
            Some(&app),
            json!({"exportable": true}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, body) = s
        .get(&c, "/v1/transit/export/encryption-key/open", Some(&app))
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"]["keys"]["1"].is_string());
}

/// Attack: slip a network into the fence through a reload of a policy file
/// that is partly broken, hoping the valid part applies. A reload is all or
/// nothing: the whole change is rejected and the old rules keep serving.
#[tokio::test]
async fn a_broken_policy_file_cannot_open_the_fence() {
    let s = TestServer::start(Opts::default());
    assert!(
        s.client_from(ip(UNTRUSTED))
            .get(s.url("/v1/sys/health"))
            .send()
            .await
            .is_err(),
        "untrusted source admitted before any reload"
    );
    // The apps group would admit the attacker; the admins group is broken.
    let broken = format!(
        "{}\n[group.admins]\nrules = [{{ source = \"127.0.0.1/32\", sorce = \"typo\" }}]\n",
        groups_file(&["127.0.0.1/32", "127.0.0.2/32"], &[]).replace(
            "[group.admins]\ndescription = \"admins\"\nrules = [\n]\n",
            ""
        )
    );
    let record = s
        .reload_with(&[("policies/security-groups.toml", &broken)])
        .await;
    assert_eq!(record["outcome"], "failure", "{record}: {broken}");
    let log = s.log_when(|l| l.contains("sorce"));
    assert!(log.contains("sorce"), "rejected for another reason:\n{log}");
    // Deny: the attacker's network did not ride in with the broken file.
    assert!(
        s.client_from(ip(UNTRUSTED))
            .get(s.url("/v1/sys/health"))
            .send()
            .await
            .is_err(),
        "a rejected reload opened the fence"
    );
    // Allow: the old rules still admit the trusted network.
    let resp = s
        .client()
        .get(s.url("/v1/sys/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 501);
}

/// Path variants outside `api::openapi::ROUTES` (extra segments, trailing
/// slashes, other methods) are refused before any handler runs, even with
/// the officer's token, so no handler arm can serve an undocumented route;
/// the listed routes beside them still work.
#[tokio::test]
async fn routes_outside_the_route_table_are_never_dispatched() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    for (method, path, token, expected) in [
        ("POST", "/v1/hsm/zeroize/", &co, 404),
        ("POST", "/v1/hsm/zeroize/now", &co, 404),
        ("GET", "/v1/hsm/zeroize", &co, 405),
        ("POST", "/v1/hsm/users/app/password/x", &co, 404),
        ("POST", "/v1/transit/encrypt/k/extra", &app, 404),
        ("POST", "/v1/transit/keys/k/rotate/now", &app, 404),
        ("PATCH", "/v1/transit/keys/k", &app, 405),
    ] {
        let resp = c
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                s.url(path),
            )
            .header("X-Vault-Token", token.as_str())
            .json(&json!({"plaintext": b64(b"x")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), expected, "{method} {path}");
    }
    // The engine is untouched and the listed routes work.
    assert_eq!(s.status().await["state"], "active");
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k/rotate", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
}

/// A client that hangs up while its admin request runs cannot separate the
/// action from its audit record: requests run to their end detached from
/// the connection, so every user that exists afterwards has its `hsm.users`
/// success record naming it. (Before the task was spawned at hand-over, a
/// request written in full and hung up at once was dropped unstarted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_mid_request_cannot_skip_the_audit_record() {
    let mut s = TestServer::start(Opts::default());
    let (co, _app) = s.init_with_app_user().await;
    // Twenty user creations at once, each from a client that writes its
    // whole request and hangs up at once, without waiting for any answer:
    // two hash while the rest queue for a password-hashing slot, so the
    // server meets the closed connection mid-hash or mid-wait. (Raw
    // connections: a client-side timeout would depend on how fast this
    // machine hashes.)
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let body =
            json!({"username": format!("hangup-{i}"), "password": "hangup-password-1"}).to_string();
        let request = format!(
            "POST /v1/hsm/users HTTP/1.1\r\nhost: 127.0.0.1\r\nx-vault-token: {co}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut tls = s
            .tls_connect(s.addr, "127.0.0.1".parse().unwrap(), b"")
            .await
            .unwrap();
        set.spawn(async move {
            use tokio::io::AsyncWriteExt;
            tls.write_all(request.as_bytes()).await?;
            tls.flush().await?;
            tls.shutdown().await
        });
    }
    for sent in set.join_all().await {
        sent.expect("request written before hanging up");
    }
    // Every request was written in full, so every one runs to its end even
    // though nobody is left to read the answer: wait for the twentieth
    // user (a shutdown now would close the connections whose request was
    // not read yet, which is not what this test is about).
    let hangup_users = |status: serde_json::Value| {
        status["users"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|u| u["username"].as_str())
            .filter(|u| u.starts_with("hangup-"))
            .map(str::to_string)
            .collect::<Vec<String>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let created = hangup_users(s.status().await);
        if created.len() == 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "requests written in full before the hang-up were dropped: only {created:?} exist"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shutdown waits for the detached requests; then read what happened.
    assert!(s.terminate().success());
    s.start_again();
    let created = hangup_users(s.status().await);
    assert_eq!(created.len(), 20, "{created:?}");
    let records = s.all_audit_records();
    for user in &created {
        assert!(
            records.iter().any(|r| r["action"] == "hsm.users"
                && r["outcome"] == "success"
                && r["detail"]["user"] == user.as_str()),
            "user {user} exists without its audit record"
        );
    }
    // Allow: the records are there because the users are (not the reverse).
    for r in records
        .iter()
        .filter(|r| r["action"] == "hsm.users" && r["outcome"] == "success")
    {
        let user = r["detail"]["user"].as_str().unwrap();
        assert!(user == "app" || created.iter().any(|c| c == user), "{r}");
    }
}

/// Guards against key exfiltration through key wrap: a key created without
/// `exportable` is refused by `keys/:name/wrap` under every mechanism and
/// version, even under a proper wrapping key; an exportable key (the twin)
/// wraps.
#[tokio::test]
async fn a_non_exportable_key_cannot_be_extracted_via_wrap() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let create = |name: &'static str, body: serde_json::Value| {
        let (s, c, app) = (&s, c.clone(), app.clone());
        async move {
            let (st, b) = s
                .post(&c, &format!("/v1/transit/keys/{name}"), Some(&app), body)
                .await;
            assert_eq!(st, 200, "{b}");
        }
    };
    create("kek", json!({"allow_wrap": true})).await;
    create("secret", json!({"type": "ed25519"})).await;
    create("shared", json!({"type": "ed25519", "exportable": true})).await;
    for mechanism in ["aes-kw", "aes-kwp"] {
        for version in [json!(null), json!(1), json!(0)] {
            let (st, body) = s
                .post(
                    &c,
                    "/v1/transit/keys/secret/wrap",
                    Some(&app),
                    json!({"wrapping_key": "kek", "mechanism": mechanism, "version": version}),
                )
                .await;
            assert_eq!(st, 400, "{mechanism} {version}: {body}");
            assert!(body.get("data").is_none(), "{body}");
        }
    }
    // Wrapping a non-exportable key under itself or with itself as the KEK
    // changes nothing either.
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/kek/wrap",
            Some(&app),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/shared/wrap",
            Some(&app),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"]["wrapped_key"].is_string());
}

/// Guards against the PKCS#11 wrap-then-decrypt attack: a key-encryption key
/// never works as a data key, so what it wraps cannot be decrypted (or
/// forged by encrypting) through Transit's data routes.
#[tokio::test]
async fn a_key_encryption_key_never_decrypts_or_encrypts_data() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    for (name, body) in [
        ("kek", json!({"allow_wrap": true, "allow_unwrap": true})),
        ("data", json!({})),
        ("shared", json!({"exportable": true})),
    ] {
        let (st, b) = s
            .post(&c, &format!("/v1/transit/keys/{name}"), Some(&app), body)
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let (st, w) = s
        .post(
            &c,
            "/v1/transit/keys/shared/wrap",
            Some(&app),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 200, "{w}");
    let wrapped = w["data"]["wrapped_key"].as_str().unwrap();
    for (path, body) in [
        (
            "/v1/transit/decrypt/kek",
            json!({"ciphertext": format!("vault:v1:{wrapped}")}),
        ),
        (
            "/v1/transit/encrypt/kek",
            json!({"plaintext": b64(b"forged")}),
        ),
        (
            "/v1/transit/rewrap/kek",
            json!({"ciphertext": format!("vault:v1:{wrapped}")}),
        ),
        ("/v1/transit/datakey/plaintext/kek", json!({})),
    ] {
        let (st, resp) = s.post(&c, path, Some(&app), body).await;
        assert_eq!(st, 400, "{path}: {resp}");
        assert!(resp.get("data").is_none(), "{path}: {resp}");
    }
    // The twin: a data key does its job.
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/encrypt/data",
            Some(&app),
            json!({"plaintext": b64(b"ok")}),
        )
        .await;
    assert_eq!(st, 200);
}

/// Guards against a deleted user's token outliving the user: every session
/// of a crypto user the officer deletes is dead at once, while the officer's
/// and other users' sessions live on.
#[tokio::test]
async fn a_deleted_users_token_is_dead() {
    let s = TestServer::start(Opts::default());
    let (co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "leaver", "password": "leaver-password-1"}),
        )
        .await;
    assert_eq!(st, 200);
    let leaver = s.token("leaver", "leaver-password-1").await;
    let use_key = |token: String| {
        let (s, c) = (&s, c.clone());
        async move {
            s.post(&c, "/v1/transit/keys/k", Some(&token), json!({}))
                .await
                .0
        }
    };
    assert_eq!(use_key(leaver.clone()).await, 200, "the token worked");
    let resp = c
        .delete(s.url("/v1/hsm/users/leaver"))
        .header("X-Vault-Token", &co)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(use_key(leaver.clone()).await, 403, "dead after deletion");
    let (st, _) = s.get(&c, "/v1/auth/token/lookup-self", Some(&leaver)).await;
    assert_eq!(st, 403);
    assert_eq!(use_key(app).await, 200, "another user's token lives");
    assert_eq!(s.get(&c, "/v1/hsm/users", Some(&co)).await.0, 200);
}

/// Guards against change-password as a password-guessing oracle: a wrong
/// old password for the crypto officer moves the same durable counter a
/// failed login does, and the login guard stops the front door before the
/// zeroizing attempt, exactly as on /v1/hsm/login. The right password (the
/// twin) changes it.
#[tokio::test]
async fn change_password_cannot_guess_the_officer_password_without_moving_the_counter() {
    let s = TestServer::start(Opts::default()); // zeroize at 3, guard reserve 1
    s.init().await;
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let c = s.client();
    let guess = |old: &'static str| {
        let (s, c, co) = (&s, c.clone(), co.clone());
        async move {
            s.post(
                &c,
                "/v1/hsm/password",
                Some(&co),
                json!({"old_password": old, "new_password": "a-new-officer-password"}),
            )
            .await
            .0
        }
    };
    assert_eq!(guess("guess-number-one").await, 401);
    assert_eq!(s.failures("admin").await, 1);
    assert_eq!(guess("guess-number-two").await, 401);
    assert_eq!(s.failures("admin").await, 2);
    // One attempt left: the guard refuses unchecked, nothing counts, no zeroize.
    assert_eq!(guess("guess-number-three").await, 423);
    assert_eq!(guess(ADMIN_PASSWORD).await, 423, "not even the right one");
    assert_eq!(s.failures("admin").await, 2);
    assert_eq!(s.status().await["state"], "active");
    // Break-glass resets the count; then the right old password works.
    let (st, _) = s.login_break_glass("admin", ADMIN_PASSWORD).await;
    assert_eq!(st, 200);
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/password",
            Some(&co),
            json!({"old_password": ADMIN_PASSWORD, "new_password": "a-new-officer-password"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.login("admin", "a-new-officer-password").await.0, 200);
}

/// The trusted proxy of the trusted-proxy tests: in group `proxies` only.
const TRUSTED_PROXY: &str = "127.0.0.5";

fn behind_a_trusted_proxy(forwarded: &str) -> Opts {
    Opts {
        proxies: vec!["127.0.0.5/32"],
        api_listener_extra: format!("trusted_proxy_groups = [\"proxies\"]\n{forwarded}\n"),
        ..app_and_admin_nets()
    }
}

/// Attack: an app behind a trusted proxy writes the admin host's address
/// into X-Forwarded-For (which the proxy passes on as the rightmost entry
/// when misconfigured, or the app is the proxy's own health path) to reach
/// admin routes or burn crypto-officer login attempts. Admin routes and CO
/// logins judge the TCP peer alone.
#[tokio::test]
async fn spoofed_xff_through_a_trusted_proxy_reaches_no_admin_route_nor_co_login() {
    let s = TestServer::start(behind_a_trusted_proxy("xff_hops = 1"));
    s.init().await;
    let proxy = s.client_from(ip(TRUSTED_PROXY));
    let st = proxy
        .get(s.url("/v1/hsm/status"))
        .header("x-forwarded-for", "127.0.0.1")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 403, "an admin route trusted a forwarded address");
    for _ in 0..3 {
        let (st, _) = into_parts(
            proxy
                .post(s.url("/v1/hsm/login"))
                .header("x-forwarded-for", "127.0.0.1")
                .json(&json!({"username": "admin", "password": "wrong password"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_ne!(st, 200);
    }
    assert_eq!(
        s.failures("admin").await,
        0,
        "a forwarded CO login moved the counter"
    );
    assert_eq!(s.status().await["state"], "active");
    // The forwarded address is honoured where it may be: the app route.
    let st = proxy
        .get(s.url("/v1/sys/health"))
        .header("x-forwarded-for", APP_NET)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 200);
    // The allow: the admin host itself, directly.
    let (st, _) = s.get(&s.client(), "/v1/hsm/status", None).await;
    assert_eq!(st, 200);
}

/// Attack: a peer that is not a trusted proxy opens with a PROXY protocol
/// header naming an allowed client, to be judged as that client. The
/// connection is refused before TLS.
#[tokio::test]
async fn proxy_header_smuggled_by_an_untrusted_peer_is_refused() {
    let s = TestServer::start(behind_a_trusted_proxy("proxy_protocol = true"));
    let header = format!(
        "PROXY TCP4 127.0.0.1 {} 40000 {}\r\n",
        s.addr.ip(),
        s.addr.port()
    );
    // 127.0.0.3 is an admitted app peer, but no proxy.
    assert!(
        s.raw_get(s.addr, ip(APP_NET), header.as_bytes(), "/v1/sys/health")
            .await
            .is_err(),
        "an untrusted peer's PROXY header was accepted"
    );
    // The same header from the trusted proxy is honoured.
    assert_eq!(
        s.raw_get(
            s.addr,
            ip(TRUSTED_PROXY),
            header.as_bytes(),
            "/v1/sys/health"
        )
        .await
        .unwrap(),
        501
    );
    // And a PROXY header is refused on a listener that does not speak it.
    let plain = TestServer::start(app_and_admin_nets());
    assert!(plain
        .raw_get(
            plain.addr,
            ip("127.0.0.1"),
            header.as_bytes(),
            "/v1/sys/health"
        )
        .await
        .is_err());
}

/// A sealed engine serves no Transit and no login, and a peer outside the
/// admin networks cannot even try the unseal secret; the admin network can.
#[tokio::test]
async fn sealed_engine_refuses_transit_and_unseal_from_non_admin_networks() {
    let s = TestServer::start(Opts {
        engine_extra: "seal = \"passphrase\"\n".into(),
        ..app_and_admin_nets()
    });
    let c = s.client();
    let pp = "an operator passphrase of some length";
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token(),
                   "unseal_passphrase": pp}),
        )
        .await;
    assert_eq!(st, 200);
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (st, _) = s
        .post(
            &c,
            "/v1/hsm/users",
            Some(&co),
            json!({"username": "app", "password": CU_PASSWORD}),
        )
        .await;
    assert_eq!(st, 200);
    let app = s.token("app", CU_PASSWORD).await;
    let (st, _) = s
        .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert_eq!(st, 200);
    let (st, _) = s.post(&c, "/v1/hsm/seal", Some(&co), json!({})).await;
    assert_eq!(st, 200);
    let appc = s.client_from(ip(APP_NET));
    let (st, _) = s
        .post(
            &appc,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!(st, 503);
    let (st, _) = s.login("app", CU_PASSWORD).await;
    assert_eq!(st, 503);
    for path in ["/v1/hsm/unseal", "/v1/sys/unseal"] {
        let (st, _) = s.post(&appc, path, None, json!({"key": pp})).await;
        assert_eq!(st, 403, "{path}");
    }
    assert_eq!(s.status().await["state"], "sealed");
    let (st, _) = s.post(&c, "/v1/sys/unseal", None, json!({"key": pp})).await;
    assert_eq!(st, 200);
    let app = s.token("app", CU_PASSWORD).await;
    let (st, _) = s
        .post(
            &appc,
            "/v1/transit/encrypt/k",
            Some(&app),
            json!({"plaintext": b64(b"x")}),
        )
        .await;
    assert_eq!(st, 200);
}

/// Zeroization in sealed mode leaves neither the store (which holds the
/// wrapped master key) nor any key file in the data dir.
#[tokio::test]
async fn zeroize_in_sealed_mode_leaves_no_wrapped_key_in_the_data_dir() {
    let s = TestServer::start(Opts {
        engine_extra: "seal = \"shamir\"\nshamir_threshold = 2\nshamir_shares = 2\n".into(),
        ..Opts::default()
    });
    let c = s.client();
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/init",
            None,
            json!({"admin_password": ADMIN_PASSWORD, "init_token": s.init_token()}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(s.path("store.redb").exists());
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (st, _) = s.post(&c, "/v1/hsm/zeroize", Some(&co), json!({})).await;
    assert_eq!(st, 200);
    for f in ["store.redb", "master.key", "master.key.next"] {
        assert!(!s.path(f).exists(), "{f} survived zeroization");
    }
    // The old shares open nothing: there is nothing left to unseal.
    let share = body["data"]["keys_base64"][0].as_str().unwrap();
    let (st, _) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": share}))
        .await;
    assert_eq!(st, 503);
}

/// A backup with one byte changed is refused with a clear error, and the
/// zeroized engine it was aimed at stays exactly as it was (same init
/// token); the untouched file then restores.
#[tokio::test]
async fn a_tampered_backup_is_refused_and_changes_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
        .args(["backup-keygen", "--out-dir"])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let config = &text[text.find("[backup]").unwrap()..];
    let s = TestServer::start(Opts {
        extra_config: config.to_string(),
        ..Opts::default()
    });
    let (co, _) = s.init_with_app_user().await;
    let c = s.client();
    let (st, body) = s.post(&c, "/v1/hsm/backup", Some(&co), json!({})).await;
    assert_eq!(st, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();
    let (st, _) = s.post(&c, "/v1/hsm/zeroize", Some(&co), json!({})).await;
    assert_eq!(st, 200);
    let token = s.init_token();
    let custodian = b64(&std::fs::read(keys.path().join("custodian.key")).unwrap());
    use base64::Engine as _;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(&backup)
        .unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 1;
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/restore",
            None,
            json!({"backup": b64(&bytes), "custodian_key": custodian, "init_token": token}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("backup refused"), "{body}");
    assert_eq!(s.status().await["state"], "zeroized");
    assert_eq!(s.init_token(), token);
    assert!(!s.path("store.redb").exists());
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/restore",
            None,
            json!({"backup": backup, "custodian_key": custodian, "init_token": token}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}

/// Sends one HTTP/1.1 request over TLS byte for byte (no client-side URL
/// normalisation, unlike reqwest) and returns the raw response.
async fn raw_https(s: &TestServer, request_line: &str, token: &str, body: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pem = std::fs::read(s.data_dir.join("tls/cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!(
        "{request_line} HTTP/1.1\r\nHost: localhost\r\nX-Vault-Token: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // The server may close without close_notify; what arrived is enough.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Guards against path tricks around access policies: a JWT app whose only
/// policy grants `update` on `transit/encrypt/a` cannot encrypt with key `b`
/// (or `A`) through `..`/`.` segments, `%`-escapes, doubled or trailing
/// slashes, or case — the policy is checked on the exact path the handler
/// routes on, and any non-canonical path is refused before any rule is
/// consulted. The twin: the granted path works.
#[tokio::test]
async fn a_jwt_app_for_key_a_cannot_encrypt_with_key_b_through_path_tricks() {
    let issuer = jwt_issuer::Issuer::new();
    let rsa = issuer.dir.path().join("rsa.pem").display().to_string();
    let mut s = TestServer::start(Opts {
        extra_config: format!(
            "[[jwt_issuer]]\nname = \"ci\"\nissuer = \"{}\"\naudiences = [\"{}\"]\n\
             algorithms = [\"RS256\"]\npublic_keys = [{{ kid = \"rsa1\", file = \"{rsa}\" }}]\n\
             [[jwt_issuer.role]]\nname = \"a-only\"\npolicies = [\"key-a\"]\n",
            jwt_issuer::ISS,
            jwt_issuer::AUD
        ),
        ..Opts::default()
    });
    let (_co, app) = s.init_with_app_user().await;
    for key in ["a", "b", "A"] {
        let path = format!("/v1/transit/keys/{key}");
        assert_eq!(
            s.post(&s.client(), &path, Some(&app), json!({})).await.0,
            200
        );
    }
    std::fs::write(
        s.dir.path().join("policies/acl.toml"),
        "[[policy]]\nname = \"key-a\"\n[[policy.path]]\npath = \"transit/encrypt/a\"\n\
         capabilities = [\"update\"]\n",
    )
    .unwrap();
    s.restart();
    let token = issuer.rs256(&issuer.claims());
    let body = json!({"plaintext": b64(b"secret")});
    // The allow.
    let (st, resp) = s
        .post(
            &s.client(),
            "/v1/transit/encrypt/a",
            Some(&token),
            body.clone(),
        )
        .await;
    assert_eq!(st, 200, "{resp}");
    // Through a normal client. Paths the Transit router takes as an encrypt
    // call reach the policy check and are refused there (403): another
    // key, case, `%`-escapes of a name or of slashes.
    for path in [
        "/v1/transit/encrypt/b",
        "/v1/transit/encrypt/A",
        "/v1/transit/encrypt/%62",
        "/v1/transit/encrypt/a%2F..%2Fb",
        "/v1/transit/encrypt/a%2fb",
    ] {
        let (st, resp) = s.post(&s.client(), path, Some(&token), body.clone()).await;
        assert_eq!(st, 403, "{path}: {resp}");
        assert_eq!(
            resp["errors"],
            json!(["1 error occurred:\n\t* permission denied\n\n"])
        );
    }
    // Extra segments are no route at all (404, before any key is touched).
    for path in [
        "/v1/transit/encrypt//b",
        "/v1/transit//encrypt/b",
        "/v1/transit/encrypt/a/",
        "/v1/transit/encrypt/a/b",
    ] {
        let (st, resp) = s.post(&s.client(), path, Some(&token), body.clone()).await;
        assert!(st == 403 || st == 404, "{path}: {st} {resp}");
        assert!(resp.get("data").is_none(), "{path}: {resp}");
    }
    // Byte for byte: dot segments the client would otherwise normalise.
    let raw_body = body.to_string();
    for target in [
        "/v1/transit/encrypt/a/../b",
        "/v1/transit/encrypt/a/./../b",
        "/v1/transit/encrypt/./b",
        "/v1/transit/./encrypt/b",
        "/v1/transit/encrypt/a/..%2Fb",
        "/v1/transit/encrypt/a\\..\\b",
    ] {
        let resp = raw_https(&s, &format!("POST {target}"), &token, &raw_body).await;
        let status = resp.lines().next().unwrap_or_default().to_string();
        assert!(
            ["HTTP/1.1 400", "HTTP/1.1 403", "HTTP/1.1 404"]
                .iter()
                .any(|s| status.starts_with(s)),
            "{target}: {status}"
        );
        assert!(!resp.contains("vault:v1:"), "{target}: {resp}");
    }
    // And the raw path twin: the granted path byte for byte works.
    let resp = raw_https(&s, "POST /v1/transit/encrypt/a", &token, &raw_body).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// Attack: cut the last audit records and rewrite `audit.log.head` to the
/// new end, so the sidecar agrees. The head sealed in the engine's store
/// still names the real end: `audit verify --config` fails on it. The deny
/// (forged pair) and the allow (untouched log) are both shown.
#[tokio::test]
async fn truncating_the_audit_log_and_its_sidecar_together_is_caught_by_the_store_head() {
    let mut s = TestServer::start(Default::default());
    s.init_with_app_user().await;
    assert!(s.terminate().success());
    let verify = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["audit", "verify", "--config"])
            .arg(&s.config_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(", matches"), "{out}");
    let log = s.data_dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept = &lines[..lines.len() - 2];
    std::fs::write(&log, kept.join("\n") + "\n").unwrap();
    let forged = json!({
        "seq": kept.len(),
        "hash": hex::encode(hsmgate::engine::crypto::sha256(kept.last().unwrap().as_bytes())),
    });
    std::fs::write(
        hsmgate::audit::head_path(&log),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the engine's store head"), "{out}");
}

/// Attack: someone holding a node certificate from the cluster CA (a
/// leaked cert file) but not the cluster key sends the leader a forged
/// write deleting a key, and asks it to add their machine as a node (to be
/// handed the cluster key). The forged entry is committed but refused on
/// apply by every member (it carries no valid member tag: a MAC under a key
/// only members derive); membership changes are not reachable on the
/// cluster port at all. The key keeps working; nothing is added.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_certificate_without_the_cluster_key_can_neither_forge_writes_nor_join_itself() {
    let (s, certs) = common::cluster_of_one(45, &[1, 2]);
    let (_, app) = s.init_with_app_user().await;
    let client = s.client();
    let (status, body) = s
        .post(&client, "/v1/transit/keys/precious", Some(&app), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");

    let stolen = (
        certs.path().join("ca.pem"),
        certs.path().join("node-2.pem"),
        certs.path().join("node-2-key.pem"),
    );
    let identity = (stolen.0.as_path(), stolen.1.as_path(), stolen.2.as_path());
    let forged = json!({
        "ops": [{"table": "keys", "name": "precious", "sealed": null, "expect": "any"}],
        "mac": "00".repeat(32),
    });
    let answer = common::cluster_post("127.0.45.1:8201", 1, identity, "/cluster/v1/write", &forged)
        .await
        .expect("a member's certificate is served");
    assert_eq!(answer.0, 200, "{answer:?}");
    assert!(
        answer.1.to_string().contains("unauthenticated"),
        "the forged entry must be refused on apply: {answer:?}"
    );
    // The key is still there and works.
    let (status, body) = s
        .post(
            &client,
            "/v1/transit/encrypt/precious",
            Some(&app),
            json!({"plaintext": common::b64(b"still here")}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // No membership change through the cluster port.
    for path in ["/cluster/v1/add-node", "/cluster/v1/remove-node"] {
        let answer = common::cluster_post(
            "127.0.45.1:8201",
            1,
            identity,
            path,
            &json!({"node_id": 2, "address": "127.0.45.2:8201", "init_token": "x"}),
        )
        .await
        .expect("served");
        assert_eq!(answer.0, 404, "{path}: {answer:?}");
    }
    let (status, body) = s
        .get(
            &client,
            "/v1/hsm/cluster",
            Some(&s.token("admin", common::ADMIN_PASSWORD).await),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["voters"], json!([1]), "{body}");

    // No cluster-key rotation of the thief's making: refused at the port.
    let key_before = body["data"]["cluster_key_id"].clone();
    let rotation = json!({"ops": [], "mac": "00".repeat(32), "rotate": common::b64(&[7u8; 60])});
    let answer = common::cluster_post(
        "127.0.45.1:8201",
        1,
        identity,
        "/cluster/v1/write",
        &rotation,
    )
    .await
    .expect("served");
    assert_eq!(answer.0, 403, "{answer:?}");
    let (_, body) = s
        .get(
            &client,
            "/v1/hsm/cluster",
            Some(&s.token("admin", common::ADMIN_PASSWORD).await),
        )
        .await;
    assert_eq!(body["data"]["cluster_key_id"], key_before, "{body}");
}

/// A stolen crypto-officer session must not be enough to replace the unseal
/// secret: with a secret of the thief's choosing, a copy of the data dir
/// would open for them, and the operators would be locked out. A rekey
/// without the current passphrase is refused and changes nothing (the old
/// passphrase still unseals); with it, the rekey goes through.
#[tokio::test]
async fn a_stolen_officer_session_cannot_rekey_the_seal_without_the_current_secret() {
    const PASSPHRASE: &str = "operators keep this one offline";
    const THIEFS: &str = "the thief's own long passphrase";
    let s = TestServer::start(Opts {
        engine_extra: "seal = \"passphrase\"\n".into(),
        ..Opts::default()
    });
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
    let stolen = s.token("admin", ADMIN_PASSWORD).await;
    for current in [json!([]), json!(["a guess at the passphrase"])] {
        let (st, body) = s
            .post(
                &c,
                "/v1/hsm/rekey",
                Some(&stolen),
                json!({"current_keys": current, "new_passphrase": THIEFS}),
            )
            .await;
        assert_eq!(st, 400, "{body}");
    }
    let (st, _) = s.post(&c, "/v1/hsm/seal", Some(&stolen), json!({})).await;
    assert_eq!(st, 200);
    let (st, _) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": THIEFS}))
        .await;
    assert_eq!(st, 400, "the thief's passphrase must not unseal");
    let (st, body) = s
        .post(&c, "/v1/hsm/unseal", None, json!({"key": PASSPHRASE}))
        .await;
    assert_eq!(st, 200, "{body}");
    // Allow: the officer who knows the current passphrase.
    let co = s.token("admin", ADMIN_PASSWORD).await;
    let (st, body) = s
        .post(
            &c,
            "/v1/hsm/rekey",
            Some(&co),
            json!({"current_keys": [PASSPHRASE], "new_passphrase": THIEFS}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}

/// With `[engine] non_exportable_is_final = true` a key created without
/// `exportable` can never be opened up through `keys/:name/config` (neither
/// `exportable` nor `allow_plaintext_backup`) and so never leaves; without
/// the switch Vault's behaviour holds (the allow half).
#[tokio::test]
async fn a_key_created_non_exportable_stays_so_when_non_exportable_is_final() {
    for strict in [true, false] {
        let s = TestServer::start(Opts {
            engine_extra: if strict {
                "non_exportable_is_final = true\n".into()
            } else {
                String::new()
            },
            ..Opts::default()
        });
        let (_co, app) = s.init_with_app_user().await;
        let c = s.client();
        let (st, _) = s
            .post(&c, "/v1/transit/keys/k", Some(&app), json!({}))
            .await;
        assert_eq!(st, 200);
        for field in ["exportable", "allow_plaintext_backup"] {
            let (st, body) = s
                .post(
                    &c,
                    "/v1/transit/keys/k/config",
                    Some(&app),
                    json!({ field: true }),
                )
                .await;
            assert_eq!(st, if strict { 400 } else { 200 }, "{field}: {body}");
        }
        let (st, body) = s
            .get(&c, "/v1/transit/export/encryption-key/k", Some(&app))
            .await;
        assert_eq!(st, if strict { 400 } else { 200 }, "{body}");
        // A key created exportable is unaffected by the switch.
        let (st, _) = s
            .post(
                &c,
                "/v1/transit/keys/open",
                Some(&app),
                json!({"exportable": true}),
            )
            .await;
        assert_eq!(st, 200);
        let (st, body) = s
            .get(&c, "/v1/transit/export/encryption-key/open", Some(&app))
            .await;
        assert_eq!(st, 200, "{body}");
    }
}

/// A forged Transit backup names the reserved BYOK wrapping-key record
/// (`.transit-wrapping-key`), in the path or inside the file, to replace it
/// with a key the attacker knows: every later import would then be readable.
/// Refused both ways, and the wrapping key is unchanged; an ordinary name
/// restores (the allow half).
#[tokio::test]
async fn a_forged_transit_backup_cannot_replace_the_byok_wrapping_key() {
    use base64::Engine as _;
    let b64e = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, before) = s.get(&c, "/v1/transit/wrapping_key", Some(&app)).await;
    assert_eq!(st, 200);
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/mine",
            Some(&app),
            json!({"exportable": true, "allow_plaintext_backup": true, "deletion_allowed": true}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, body) = s.get(&c, "/v1/transit/backup/mine", Some(&app)).await;
    assert_eq!(st, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&backup)
        .unwrap();
    let magic = b"hsmgate-transit-backup/1\n";
    let mut record: serde_json::Value = serde_json::from_slice(&raw[magic.len()..]).unwrap();
    record["name"] = json!(".transit-wrapping-key");
    let mut forged = magic.to_vec();
    forged.extend_from_slice(&serde_json::to_vec(&record).unwrap());
    for (path, file) in [
        ("/v1/transit/restore/.transit-wrapping-key", backup.clone()),
        ("/v1/transit/restore", b64e(&forged)),
    ] {
        for force in [false, true] {
            let (st, body) = s
                .post(
                    &c,
                    path,
                    Some(&app),
                    json!({"backup": file, "force": force}),
                )
                .await;
            assert!(st == 400 || st == 404, "{path} force={force}: {st} {body}");
        }
    }
    let (_, after) = s.get(&c, "/v1/transit/wrapping_key", Some(&app)).await;
    assert_eq!(
        before["data"], after["data"],
        "the wrapping key is unchanged"
    );
    // Allow: the same backup under an ordinary name.
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/restore/copy",
            Some(&app),
            json!({"backup": backup}),
        )
        .await;
    assert_eq!(st, 204, "{body}");
}

/// Attack (benches/attack.sh scenario a, in small): admin and crypto-user
/// logins from thirty untrusted loopback sources at once, while an allowed
/// app keeps encrypting. None reaches HTTP, the engine's counters and
/// states do not move, and every encrypt of the allowed app succeeds. The
/// allow: the same wrong guess from the trusted network is counted.
#[tokio::test]
async fn a_login_flood_from_many_untrusted_sources_spends_no_attempt_and_apps_keep_working() {
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let allowed = s.client();
    let (st, body) = s
        .post(&allowed, "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert!(st == 200 || st == 204, "{st} {body}");
    let before = s.status().await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        // 127.0.0.2 ... 127.0.0.31: in no group of the default Opts.
        let c = s.client_from(ip(&format!("127.0.0.{}", 2 + i % 30)));
        let url = s.url("/v1/hsm/login");
        let user = if i % 2 == 0 { "admin" } else { "app" };
        flood.spawn(async move {
            c.post(url)
                .json(&json!({"username": user, "password": "guess"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    for n in 0..20 {
        let (st, body) = s
            .post(
                &allowed,
                "/v1/transit/encrypt/k",
                Some(&app),
                json!({"plaintext": "aGVsbG8="}),
            )
            .await;
        assert_eq!(st, 200, "encrypt {n} during the flood: {body}");
    }
    for r in flood.join_all().await {
        assert!(r.is_err(), "an untrusted login reached HTTP: {r:?}");
    }
    let after = s.status().await;
    assert_eq!(after["users"], before["users"], "{before}\n{after}");
    assert_eq!(after["state"], "active");
    assert_eq!(after["zeroizations"], 0);
    assert_eq!(s.failures("admin").await, 0);
    assert_eq!(s.failures("app").await, 0);
    assert_eq!(s.login("admin", "guess").await.0, 401);
    assert_eq!(s.failures("admin").await, 1);
}

/// The benchmark-only `[bench] dangerous_unfenced_listener` (BENCH=peer):
/// through the real binary it serves Transit over plain HTTP to a valid
/// token and nothing without one, no route but Transit, and `hsmgate check`
/// refuses the same config with a non-loopback address.
#[tokio::test]
async fn the_dangerous_unfenced_bench_listener_needs_a_token_serves_only_transit_and_only_on_loopback(
) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = TestServer::start(Opts {
        extra_config: format!("[bench]\ndangerous_unfenced_listener = \"127.0.0.1:{port}\"\n"),
        ..Opts::default()
    });
    // The warning follows the "listening" lines on another stream: wait
    // for it rather than race it.
    for _ in 0..100 {
        if s.log()
            .contains("DANGER: [bench] dangerous_unfenced_listener is set")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        s.log()
            .contains("DANGER: [bench] dangerous_unfenced_listener is set"),
        "no start-up warning:\n{}",
        s.log()
    );
    let (_co, app) = s.init_with_app_user().await;
    let (st, body) = s
        .post(&s.client(), "/v1/transit/keys/k", Some(&app), json!({}))
        .await;
    assert!(st == 200 || st == 204, "{st} {body}");
    let plain = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let encrypt = |token: Option<&str>| {
        let mut req = plain
            .post(format!("{base}/v1/transit/encrypt/k"))
            .json(&json!({"plaintext": "aGVsbG8="}));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        req.send()
    };
    // The allow: a crypto user's token encrypts over plain HTTP, and the
    // fenced front door decrypts the result.
    let resp = encrypt(Some(&app)).await.expect("plain HTTP request");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    assert!(ct.starts_with("vault:v1:"), "{body}");
    let (st, body) = s
        .post(
            &s.client(),
            "/v1/transit/decrypt/k",
            Some(&app),
            json!({"ciphertext": ct}),
        )
        .await;
    assert_eq!(
        (st, body["data"]["plaintext"].as_str()),
        (200, Some("aGVsbG8="))
    );
    // The denies: no token, a forged token, and any route outside Transit.
    let st = encrypt(None).await.unwrap().status().as_u16();
    assert!(st == 401 || st == 403, "no token: {st}");
    let st = encrypt(Some("hvs.forged")).await.unwrap().status().as_u16();
    assert!(st == 401 || st == 403, "forged token: {st}");
    for path in ["/v1/hsm/status", "/v1/sys/health", "/v1/hsm/login"] {
        let st = plain
            .get(format!("{base}{path}"))
            .header("X-Vault-Token", &app)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 404, "{path} through the unfenced listener");
    }
    // `hsmgate check` on the same config with the listener off loopback.
    let config = std::fs::read_to_string(&s.config_path).unwrap();
    let exposed = s.config_dir().join("exposed.toml");
    std::fs::write(
        &exposed,
        config.replace(
            &format!("\"127.0.0.1:{port}\""),
            &format!("\"0.0.0.0:{port}\""),
        ),
    )
    .unwrap();
    let check = |path: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hsmgate"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = check(&s.config_path);
    assert!(out.status.success(), "{out:?}");
    let out = check(&exposed);
    assert!(!out.status.success(), "check accepted 0.0.0.0");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a loopback address"),
        "{out:?}"
    );
}

/// Attack: a crypto user edits the claims of its cluster session token
/// (role crypto-user → crypto-officer) and keeps the old tag. The tag is an
/// HMAC under a key derived from the cluster key: the edited token is
/// refused; the untouched one works.
#[tokio::test(flavor = "multi_thread")]
async fn an_edited_cluster_session_token_is_refused() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let (s, _certs) = common::cluster_of_one(49, &[1]);
    let (_, app) = s.init_with_app_user().await;
    let client = s.client();
    assert!(app.starts_with("hsmc."), "{app}");
    // Allowed: the token as issued.
    assert_eq!(
        s.get(&client, "/v1/auth/token/lookup-self", Some(&app))
            .await
            .0,
        200
    );
    let (status, _) = s.get(&client, "/v1/hsm/users", Some(&app)).await;
    assert_eq!(status, 403, "a crypto user is no officer");
    // Denied: the same token with its role edited.
    let rest = app.strip_prefix("hsmc.").unwrap();
    let (claims, tag) = rest.split_once('.').unwrap();
    let mut c: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    c["r"] = json!("crypto-officer");
    let forged = format!(
        "hsmc.{}.{tag}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap())
    );
    let (status, body) = s.get(&client, "/v1/hsm/users", Some(&forged)).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = s
        .get(&client, "/v1/auth/token/lookup-self", Some(&forged))
        .await;
    assert_eq!(status, 403, "{body}");
}

/// Guards against key-version churn through a forged Transit backup: a
/// record edited to carry a one-second `auto_rotate_period` (which the API
/// refuses) would have the server generate a new version every check,
/// growing the store and burning key-generation CPU. Restore holds the
/// record to the API's rules: refused, nothing created; the same record
/// with a period of an hour restores.
#[tokio::test]
async fn a_forged_transit_backup_cannot_set_an_auto_rotate_period_under_an_hour() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = TestServer::start(Opts::default());
    let (_co, app) = s.init_with_app_user().await;
    let c = s.client();
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/src",
            Some(&app),
            json!({"exportable": true, "allow_plaintext_backup": true, "auto_rotate_period": "1h"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, body) = s.get(&c, "/v1/transit/backup/src", Some(&app)).await;
    assert_eq!(st, 200, "{body}");
    let raw = b64
        .decode(body["data"]["backup"].as_str().unwrap())
        .unwrap();
    let magic = b"hsmgate-transit-backup/1\n";
    let record: serde_json::Value = serde_json::from_slice(&raw[magic.len()..]).unwrap();
    assert_eq!(record["auto_rotate_period"], 3600);
    let with_period = |p: serde_json::Value| {
        let mut r = record.clone();
        r["auto_rotate_period"] = p;
        let mut out = magic.to_vec();
        out.extend_from_slice(&serde_json::to_vec(&r).unwrap());
        b64.encode(out)
    };
    for bad in [json!(1), json!(3599), json!(-1), json!("1s")] {
        let (st, body) = s
            .post(
                &c,
                "/v1/transit/restore/churn",
                Some(&app),
                json!({"backup": with_period(bad.clone())}),
            )
            .await;
        assert_eq!(st, 400, "{bad}: {body}");
        let (st, _) = s.get(&c, "/v1/transit/keys/churn", Some(&app)).await;
        assert_eq!(st, 404, "{bad}: nothing restored");
    }
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/restore/churn",
            Some(&app),
            json!({"backup": with_period(json!(3600))}),
        )
        .await;
    assert_eq!(st, 204, "{body}");
    let (_, read) = s.get(&c, "/v1/transit/keys/churn", Some(&app)).await;
    assert_eq!(read["data"]["auto_rotate_period"], 3600);
}

/// A key imported with only its public key (Vault's `public_key` import) is
/// a verification key: no path may make the engine sign or decrypt with it,
/// or hand out key material for it. Tried here: sign (plain, a given
/// version, batch, JWS, prehashed, hash in the path), decrypt and rewrap of
/// its own RSA ciphertext, HMAC, every private export, wrap under a KEK,
/// rotation, `import_version` with someone else's private key (with and
/// without `version`), a Transit backup restored under another name, a
/// forged backup putting a private key beside the public one, and a
/// restart. The allow: it verifies the outside holder's signatures and
/// encrypts to them throughout.
#[tokio::test]
async fn a_public_only_imported_key_can_never_sign_or_decrypt() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};
    use aws_lc_rs::signature::{KeyPair, RsaKeyPair, RSA_PSS_SHA256};
    use base64::Engine as _;
    let b64e = base64::engine::general_purpose::STANDARD;

    let mut s = TestServer::start(Opts::default());
    let (_co, mut app) = s.init_with_app_user().await;
    let mut c = s.client();
    // The holder's key pair, made outside the engine.
    let holder = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let spki = holder.public_key().as_der().unwrap();
    let pem = public_key_pem(spki.as_ref());
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/pub/import",
            Some(&app),
            json!({"type": "rsa-2048", "public_key": pem, "exportable": true,
                   "allow_plaintext_backup": true}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let msg = b"a release signed by the holder";
    let mut sig = vec![0u8; holder.public_modulus_len()];
    holder
        .sign(&RSA_PSS_SHA256, &SystemRandom::new(), msg, &mut sig)
        .unwrap();
    let holder_sig = format!("vault:v1:{}", b64e.encode(&sig));

    // The allow, checked again after every attempt below.
    async fn still_only_verifies(
        s: &TestServer,
        c: &reqwest::Client,
        app: &str,
        key: &str,
        msg: &[u8],
        sig: &str,
    ) {
        let (st, body) = s
            .post(
                c,
                &format!("/v1/transit/verify/{key}"),
                Some(app),
                json!({"input": b64(msg), "signature": sig}),
            )
            .await;
        assert_eq!(
            (st, body["data"]["valid"].clone()),
            (200, json!(true)),
            "{body}"
        );
        // Version 1 is the public-only one (a later version may be full).
        for (path, req) in [
            (format!("/v1/transit/sign/{key}"), json!({})),
            (format!("/v1/transit/sign/{key}/sha2-512"), json!({})),
            (
                format!("/v1/transit/sign/{key}"),
                json!({"marshaling_algorithm": "jws", "signature_algorithm": "pkcs1v15"}),
            ),
            (
                format!("/v1/transit/sign/{key}"),
                json!({"input": b64(&[7u8; 32]), "prehashed": true}),
            ),
            (format!("/v1/transit/hmac/{key}"), json!({})),
            (
                format!("/v1/transit/sign/{key}"),
                json!({"batch_input": [{"input": b64(msg)}, {"input": b64(b"x")}]}),
            ),
        ] {
            let mut req = req;
            req["key_version"] = json!(1);
            if req.get("input").is_none() && req.get("batch_input").is_none() {
                req["input"] = json!(b64(msg));
            }
            let (st, body) = s.post(c, &path, Some(app), req.clone()).await;
            assert_eq!(st, 400, "{path} {req}: {body}");
            let text = body.to_string();
            assert!(!text.contains("vault:v"), "{path}: {body}");
            assert!(text.contains("only a public key"), "{path}: {body}");
        }
        for kind in ["signing-key", "encryption-key", "hmac-key"] {
            let (st, body) = s
                .get(c, &format!("/v1/transit/export/{kind}/{key}"), Some(app))
                .await;
            assert_eq!(st, 400, "{kind}: {body}");
        }
    }
    still_only_verifies(&s, &c, &app, "pub", msg, &holder_sig).await;

    // Its own RSA ciphertext: encrypting works (to the holder), opening it
    // in the engine does not.
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/encrypt/pub",
            Some(&app),
            json!({"plaintext": b64(b"to the holder")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let ct = body["data"]["ciphertext"].as_str().unwrap().to_string();
    let dec = OaepPrivateDecryptingKey::new(
        PrivateDecryptingKey::from_pkcs8(holder.as_der().unwrap().as_ref()).unwrap(),
    )
    .unwrap();
    let mut out = vec![0u8; dec.min_output_size()];
    let raw_ct = b64e.decode(ct.splitn(3, ':').nth(2).unwrap()).unwrap();
    let pt = dec
        .decrypt(
            &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
            &raw_ct,
            &mut out,
            None,
        )
        .unwrap();
    assert_eq!(pt, b"to the holder");
    for path in ["/v1/transit/decrypt/pub", "/v1/transit/rewrap/pub"] {
        let (st, body) = s
            .post(&c, path, Some(&app), json!({"ciphertext": ct}))
            .await;
        assert_eq!(st, 400, "{path}: {body}");
        assert!(
            body.to_string().contains("only a public key"),
            "{path}: {body}"
        );
    }
    // Wrap (a wrap carries the private key) and rotation.
    let (st, _) = s
        .post(
            &c,
            "/v1/transit/keys/kek",
            Some(&app),
            json!({"allow_wrap": true}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/pub/wrap",
            Some(&app),
            json!({"wrapping_key": "kek"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = s
        .post(&c, "/v1/transit/keys/pub/rotate", Some(&app), json!({}))
        .await;
    assert_eq!(st, 400, "imported without allow_rotation: {body}");

    // Someone else's private key, wrapped properly: refused for version 1;
    // without `version` it becomes version 2 (Vault's rule), and version 1
    // still only verifies.
    let (_, wk) = s.get(&c, "/v1/transit/wrapping_key", Some(&app)).await;
    let wk_pem = wk["data"]["public_key"].as_str().unwrap();
    let wk_der: String = wk_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let wk = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(
        aws_lc_rs::rsa::PublicEncryptingKey::from_der(&b64e.decode(wk_der).unwrap()).unwrap(),
    )
    .unwrap();
    let stranger = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let wrap_for_import = |pkcs8: &[u8]| {
        use aes_kw::{KeyInit, KwpAes256};
        let eph = [9u8; 32];
        let mut block = vec![0u8; wk.ciphertext_size()];
        let n = wk
            .encrypt(
                &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
                &eph,
                &mut block,
                None,
            )
            .unwrap()
            .len();
        block.truncate(n);
        let mut w = vec![0u8; pkcs8.len().div_ceil(8) * 8 + 8];
        let w = KwpAes256::new_from_slice(&eph)
            .unwrap()
            .wrap_key(pkcs8, &mut w)
            .unwrap()
            .to_vec();
        b64e.encode([block, w].concat())
    };
    let stranger_ct = wrap_for_import(stranger.as_der().unwrap().as_ref());
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/pub/import_version",
            Some(&app),
            json!({"ciphertext": stranger_ct, "version": 1}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("does not match"), "{body}");
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/keys/pub/import_version",
            Some(&app),
            json!({"ciphertext": stranger_ct}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["latest_version"], 2);
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/sign/pub",
            Some(&app),
            json!({"input": b64(msg), "key_version": 1}),
        )
        .await;
    assert_eq!(st, 400, "version 1 still cannot sign: {body}");

    // A Transit backup restores as what it was: a verification key.
    let (st, body) = s.get(&c, "/v1/transit/backup/pub", Some(&app)).await;
    assert_eq!(st, 200, "{body}");
    let backup = body["data"]["backup"].as_str().unwrap().to_string();
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/restore/copy",
            Some(&app),
            json!({"backup": backup}),
        )
        .await;
    assert_eq!(st, 204, "{body}");
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/sign/copy",
            Some(&app),
            json!({"input": b64(msg), "key_version": 1}),
        )
        .await;
    assert_eq!(
        st, 400,
        "the restored copy cannot sign with version 1: {body}"
    );
    // A forged backup giving version 1 a private key beside its public key
    // is refused, and nothing is restored.
    let raw = b64e.decode(&backup).unwrap();
    let magic = b"hsmgate-transit-backup/1\n";
    let mut record: serde_json::Value = serde_json::from_slice(&raw[magic.len()..]).unwrap();
    let v2_secret = record["versions"][1]["secret"].clone();
    assert!(record["versions"][0].get("secret").is_none(), "{record}");
    record["versions"][0]["secret"] = v2_secret;
    let mut forged = magic.to_vec();
    forged.extend_from_slice(&serde_json::to_vec(&record).unwrap());
    let (st, body) = s
        .post(
            &c,
            "/v1/transit/restore/forged",
            Some(&app),
            json!({"backup": b64e.encode(forged)}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let (st, _) = s.get(&c, "/v1/transit/keys/forged", Some(&app)).await;
    assert_eq!(st, 404, "nothing restored");

    // Durable as it was: after a restart, still only a verification key.
    s.restart();
    c = s.client();
    app = s.token("app", CU_PASSWORD).await;
    still_only_verifies(&s, &c, &app, "pub", msg, &holder_sig).await;
    still_only_verifies(&s, &c, &app, "copy", msg, &holder_sig).await;
}
