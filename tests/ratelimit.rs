//! Rate limits, the password-hashing cap and the connection caps: each
//! refusal beside the allow that proves it is not refusing everything.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use governor::clock::FakeRelativeClock;
use hsmgate::ratelimit::{Class, Limiters, RateLimitPolicy};
use serde_json::json;

/// In the test server's `apps` group but not in `admins`.
const APP_NET: &str = "127.0.0.3";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The loose test limits with one `key = value` line replaced (or, for a
/// `[section]`, appended).
fn opts(change: &str) -> Opts {
    let mut file = String::new();
    let key = change.split(" = ").next().unwrap_or_default();
    for line in LOOSE_RATE_LIMITS.lines() {
        if line.starts_with(&format!("{key} = ")) {
            continue;
        }
        file.push_str(line);
        file.push('\n');
        if line == "[rate_limits]" && !change.starts_with('[') {
            file.push_str(change);
            file.push('\n');
        }
    }
    if change.starts_with('[') {
        file.push_str(change);
    }
    Opts {
        apps: vec!["127.0.0.1/32", "127.0.0.3/32", "127.0.0.4/32"],
        admins: vec!["127.0.0.1/32"],
        rate_limits: Some(file),
        ..Opts::default()
    }
}

#[tokio::test]
async fn a_burst_gets_429_with_retry_after_while_another_source_is_unaffected() {
    let s = TestServer::start(opts(
        "source.health = { rate = 1, per = \"minute\", burst = 3 }",
    ));
    let flooder = s.client_from(ip(APP_NET));
    let health = s.url("/v1/sys/health");
    for _ in 0..3 {
        let r = flooder.get(&health).send().await.unwrap();
        assert_eq!(r.status(), 501, "uninitialized, not limited");
    }
    let r = flooder.get(&health).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.headers()["ratelimit-limit"], "3");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["errors"][0]
        .as_str()
        .unwrap()
        .contains("rate limit quota exceeded"));
    // Another source keeps its whole budget.
    let other = s.client_from(ip("127.0.0.4"));
    for _ in 0..3 {
        assert_eq!(other.get(&health).send().await.unwrap().status(), 501);
    }
}

#[tokio::test]
async fn logins_are_limited_per_source_and_username() {
    let s = TestServer::start(opts("login_user = { rate = 1, per = \"hour\", burst = 2 }"));
    let (_co, _app) = s.init_with_app_user().await;
    let guesser = s.client_from(ip(APP_NET));
    let guess = |user: &'static str| {
        let c = guesser.clone();
        let url = s.url("/v1/hsm/login");
        async move {
            let r = c
                .post(url)
                .json(&json!({"username": user, "password": "guess"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.headers().get("retry-after").cloned())
        }
    };
    assert_eq!(guess("app").await.0, 401);
    assert_eq!(guess("app").await.0, 401);
    let (status, retry) = guess("app").await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
    // The refusal spent no attempt of the user's.
    assert_eq!(s.failures("app").await, 2);
    // The same network may still try another name, and another network the
    // same name: the app user can still log in from its own host.
    assert_eq!(guess("nobody").await.0, 401);
    assert_eq!(s.login("app", CU_PASSWORD).await.0, 200);
}

#[tokio::test]
async fn password_hashing_is_capped_and_the_excess_gets_429() {
    let s = TestServer::start(opts(
        "[rate_limits.password_hashing]\nmax_concurrent = 1\nmax_wait_ms = 0\n",
    ));
    s.init().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let c = s.client();
        let url = s.url("/v1/hsm/login");
        set.spawn(async move {
            c.post(url)
                .json(&json!({"username": format!("user{i}"), "password": "guess"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let statuses = set.join_all().await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&401), "{statuses:?}");
    // A lone login still gets its slot.
    assert_eq!(s.login("admin", ADMIN_PASSWORD).await.0, 200);
}

/// Opens a TCP connection from `source` and says whether the server closed
/// it at once (true) or kept it open waiting for a TLS handshake (false).
async fn closed_at_once(source: &str, server: SocketAddr) -> (bool, tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(source), 0)).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = matches!(
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    (closed, stream)
}

#[tokio::test]
async fn connections_per_source_are_capped_without_touching_other_sources() {
    let s = TestServer::start(opts(
        "[rate_limits.connections]\nper_source = 2\ntotal = 100\n",
    ));
    let (a, _keep_a) = closed_at_once(APP_NET, s.addr).await;
    let (b, _keep_b) = closed_at_once(APP_NET, s.addr).await;
    assert!(!a && !b, "the first two connections are admitted");
    let (c, _) = closed_at_once(APP_NET, s.addr).await;
    assert!(
        c,
        "the third connection from the same source is closed at once"
    );
    let (d, _keep_d) = closed_at_once("127.0.0.4", s.addr).await;
    assert!(!d, "another source is admitted");
}

fn small_policy() -> RateLimitPolicy {
    let text = "[rate_limits]\nsource.transit = { rate = 10, per = \"second\", burst = 5 }\n";
    load_with(text).limits.rate
}

fn load_with(rate_limits: &str) -> hsmgate::config::Config {
    let main = "policies_dir = \"p\"\n[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"g\"]\n";
    hsmgate::config::load_from_str(
        Path::new("hsmgate.toml"),
        main,
        &[
            (
                PathBuf::from("p/groups.toml"),
                "[group.g]\nrules = [{ source = \"127.0.0.1/32\" }]\n".to_string(),
            ),
            (PathBuf::from("p/rate-limits.toml"), rate_limits.to_string()),
        ],
    )
    .unwrap()
}

#[test]
fn limiter_memory_is_bounded_after_200k_distinct_sources() {
    let clock = FakeRelativeClock::default();
    let limiters = Limiters::new(small_policy(), clock.clone());
    for i in 0..200_000u32 {
        let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        limiters.check_source(source, Class::Transit).unwrap();
    }
    // IPv6 hosts of one /64 are one key, not 2^64.
    for i in 0..1000u128 {
        let source = IpAddr::from(std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | i));
        let _ = limiters.check_source(source, Class::Transit);
    }
    assert_eq!(limiters.key_count(), 200_001);
    // One source drains its bucket just before the sweep: it must be kept.
    clock.advance(Duration::from_secs(10));
    let busy = ip("10.255.255.1");
    while limiters.check_source(busy, Class::Transit).is_ok() {}
    limiters.sweep();
    assert_eq!(
        limiters.key_count(),
        1,
        "idle keys are evicted, the busy one kept"
    );
    // ...and it is still limited after the sweep.
    assert!(limiters.check_source(busy, Class::Transit).is_err());
}

#[test]
fn the_shipped_rate_limit_file_states_the_defaults_and_bad_files_name_their_line() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/rate-limits.toml"),
    )
    .unwrap();
    assert_eq!(load_with(&shipped).limits.rate, RateLimitPolicy::default());
    let bad = "[rate_limits]\nipv6_prefix = 64\nsource.login = { rate = 5, per = \"fortnight\", burst = 0 }\n";
    let main = "policies_dir = \"p\"\n[[listener]]\nname = \"api\"\naddress = \"127.0.0.1:0\"\nsecurity_groups = [\"g\"]\n";
    let err = hsmgate::config::load_from_str(
        Path::new("hsmgate.toml"),
        main,
        &[
            (
                PathBuf::from("p/groups.toml"),
                "[group.g]\nrules = [{ source = \"127.0.0.1/32\" }]\n".to_string(),
            ),
            (PathBuf::from("p/rate-limits.toml"), bad.to_string()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("p/rate-limits.toml:3:"), "{err}");
    assert!(err.contains("fortnight"), "{err}");
}

/// An admitted connection left idle past `idle_timeout_seconds` is closed
/// by the server; a client that keeps working on its own connection over
/// the same span is not. (Waits for the close; no assertion on how fast.)
#[tokio::test]
async fn idle_connection_is_closed_while_an_active_one_is_unaffected() {
    use tokio::io::AsyncReadExt;
    let s = TestServer::start(opts(
        "[rate_limits.connections]\nidle_timeout_seconds = 1\n",
    ));
    let mut idle = s.tls_connect(s.addr, ip(APP_NET), b"").await.unwrap();
    let mut active = s.tls_connect(s.addr, ip("127.0.0.4"), b"").await.unwrap();
    assert_eq!(
        keepalive_get(&mut idle, "/v1/sys/health").await.unwrap(),
        501
    );
    // The active client works on while the idle one waits for its close.
    let closed = async {
        let mut buf = [0u8; 1];
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let working = async {
        let mut served = 0u32;
        loop {
            // Each request ends well inside the idle timeout of the last.
            assert_eq!(
                keepalive_get(&mut active, "/v1/sys/health").await.unwrap(),
                501,
                "the active connection was cut"
            );
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if served > 10_000 {
                return served;
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(60), closed) => {
            assert!(r.is_ok(), "the idle connection was not closed within 60 s");
        }
        n = working => panic!("the idle connection was never closed ({n} requests)"),
    }
    // The active connection outlived the idle one's close and still serves.
    assert_eq!(
        keepalive_get(&mut active, "/v1/sys/health").await.unwrap(),
        501
    );
}
