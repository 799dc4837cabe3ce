//! The Transit request decoders, through the real router: a live engine in a
//! temp dir, HTTP/1.1 over an in-memory pipe (no TLS, no sockets), every
//! phase from route class to audit record. Any body sent to any Transit
//! operation must get a Vault-style answer below 500, and must leave the
//! engine active.
//!
//! Input: first byte picks the route (and key), the rest is the JSON body.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use hsmgate::engine::Channel;
use hsmgate::gateway::listener::ConnInfo;
use hsmgate::gateway::{router, AppState};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Keys created once at start-up: (name, type).
const KEYS: &[(&str, &str)] = &[
    ("aes", "aes256-gcm96"),
    ("chacha", "chacha20-poly1305"),
    ("ed", "ed25519"),
    ("ec", "ecdsa-p256"),
    ("rsa", "rsa-2048"),
    ("mac", "hmac"),
];

/// Operations that take a key name; `keys/<name>` creation is left out (an
/// RSA-4096 key per input would starve the fuzzer).
const KEYED: &[&str] = &[
    "encrypt",
    "decrypt",
    "rewrap",
    "datakey/plaintext",
    "datakey/wrapped",
    "sign",
    "verify",
    "hmac",
    "keys/{}/config",
    "keys/{}/trim",
];
const UNKEYED: &[&str] = &["hash", "random", "hash/sha2-512", "random/32"];

struct World {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    token: String,
}

fn conn_info() -> ConnInfo {
    ConnInfo {
        peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        proxied: false,
        cert: None,
        listener: 0,
        port: 8200,
        channel: Channel::FrontDoor,
    }
}

/// One HTTP/1.1 connection to the router over an in-memory pipe.
async fn connect(state: Arc<AppState>) -> SendRequest<Full<Bytes>> {
    let (client, server) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move {
                Ok::<_, std::convert::Infallible>(router::handle(state, conn_info(), req).await)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), svc)
            .await;
    });
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .expect("client handshake");
    tokio::spawn(conn);
    send
}

async fn call(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> (u16, Value) {
    let mut send = connect(state.clone()).await;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "fuzz")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("x-vault-token", t);
    }
    let resp = send
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("security-groups.toml"),
            "[group.local]\nrules = [{ source = \"127.0.0.1/32\" }]\n",
        )
        .unwrap();
        let loose = "{ rate = 1000000, per = \"second\", burst = 1000000 }";
        std::fs::write(
            policies.join("rate-limits.toml"),
            format!(
                "[rate_limits]\nsource.transit = {loose}\nsource.login = {loose}\nsource.admin = {loose}\n\
                 source.health = {loose}\nlogin_user = {loose}\nprincipal = {loose}\nkey = {loose}\n"
            ),
        )
        .unwrap();
        let config_path = dir.path().join("hsmgate.toml");
        std::fs::write(
            &config_path,
            format!(
                "policies_dir = \"policies\"\n[engine]\ndata_dir = \"{}\"\n[audit]\nfsync = \"batched\"\n\
                 key_use = \"off\"\n[metrics]\nenabled = false\n[[listener]]\nname = \"api\"\n\
                 address = \"127.0.0.1:0\"\nsecurity_groups = [\"local\"]\nadmin_groups = [\"local\"]\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let config = hsmgate::config::load(&config_path).unwrap_or_else(|e| {
            let lines: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
            panic!("fuzz config: {}", lines.join("; "))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (state, token) = rt.block_on(async {
            let server = hsmgate::gateway::Server::bind(config).await.expect("bind");
            let state = server.state();
            // The server's listeners are never run: requests go straight to
            // the router below. Keep the engine, drop the sockets.
            std::mem::forget(server);
            let init_token = std::fs::read_to_string(dir.path().join("data/init-token")).unwrap();
            let pw = "fuzz-officer-password-1";
            let (s, b) = call(&state, "POST", "/v1/hsm/init", None,
                json!({"admin_password": pw, "init_token": init_token}).to_string().into()).await;
            assert_eq!(s, 200, "init: {b}");
            let (s, b) = call(&state, "POST", "/v1/hsm/login", None,
                json!({"username": "admin", "password": pw}).to_string().into()).await;
            assert_eq!(s, 200, "login: {b}");
            let co = b["auth"]["client_token"].as_str().unwrap().to_string();
            let (s, b) = call(&state, "POST", "/v1/hsm/users", Some(&co),
                json!({"username": "app", "password": "fuzz-app-password-1", "role": "crypto-user"}).to_string().into()).await;
            assert_eq!(s, 200, "user: {b}");
            let (s, b) = call(&state, "POST", "/v1/hsm/login", None,
                json!({"username": "app", "password": "fuzz-app-password-1"}).to_string().into()).await;
            assert_eq!(s, 200, "app login: {b}");
            let app = b["auth"]["client_token"].as_str().unwrap().to_string();
            for (name, kind) in KEYS {
                let (s, b) = call(&state, "POST", &format!("/v1/transit/keys/{name}"), Some(&app),
                    json!({"type": kind, "exportable": false}).to_string().into()).await;
                assert!(s == 200 || s == 204, "create {name}: {s} {b}");
            }
            (state, app)
        });
        World { _dir: dir, rt, state, token }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let w = world();
    let pick = pick as usize;
    let path = if pick % 4 == 3 {
        format!("/v1/transit/{}", UNKEYED[(pick / 4) % UNKEYED.len()])
    } else {
        let op = KEYED[(pick / 4) % KEYED.len()];
        let (key, _) = KEYS[pick % KEYS.len()];
        if op.contains("{}") {
            format!("/v1/transit/{}", op.replace("{}", key))
        } else {
            format!("/v1/transit/{op}/{key}")
        }
    };
    let (status, answer) = w.rt.block_on(call(
        &w.state,
        "POST",
        &path,
        Some(&w.token),
        Bytes::copy_from_slice(body),
    ));
    assert!(
        status < 500,
        "{path} answered {status}: {answer} (body {:?})",
        String::from_utf8_lossy(body)
    );
    assert_eq!(w.state.engine.state().as_str(), "active");
});
