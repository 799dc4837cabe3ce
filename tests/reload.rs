//! Config reload on a running server: SIGHUP and file changes, all or
//! nothing. Each test shows the change taking effect (allow) and what it
//! must not do (deny), over real sockets.
mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::client::TlsStream;

const GROUPS: &str = "policies/security-groups.toml";
const NEWCOMER: &str = "127.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `GET /v1/sys/health` from `source` over a fresh connection: the status,
/// or `None` when the connection was refused (dropped at accept).
async fn health_from(server: &TestServer, source: &str) -> Option<u16> {
    let resp = server
        .client_from(ip(source))
        .get(server.url("/v1/sys/health"))
        .send()
        .await
        .ok()?;
    Some(resp.status().as_u16())
}

/// The `hsmgate_...` sample starting with `prefix` in a `sys/metrics` scrape.
async fn metric(server: &TestServer, token: &str, prefix: &str) -> f64 {
    let (status, body) = server
        .get(
            &server.client(),
            "/v1/sys/metrics?format=prometheus",
            Some(token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body.as_str().unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

/// A TLS client that trusts exactly `roots` and connects from `source`.
async fn tls_connect(
    server: SocketAddr,
    source: &str,
    roots: &[CertificateDer<'static>],
) -> io::Result<TlsStream<tokio::net::TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip(source), 0))?;
    let tcp = socket.connect(server).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

fn certs_of(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

/// One HTTP/1.1 request on an open connection; the status and whether the
/// server said it closes the connection. `None` when the connection ended
/// without a response.
async fn http1_get(
    stream: &mut TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> Option<(u16, bool)> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: hsmgate\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((status, head.contains("connection: close")))
}

#[tokio::test]
async fn a_reload_that_adds_a_network_admits_it() {
    let server = TestServer::start(Opts::default());
    assert_eq!(
        health_from(&server, NEWCOMER).await,
        None,
        "not yet in any group"
    );
    let record = server
        .reload_with(&[(
            GROUPS,
            &groups_file(&["127.0.0.1/32", "127.0.0.2/32"], &["127.0.0.1/32"]),
        )])
        .await;
    assert_eq!(record["outcome"], "success", "{record}");
    // The tree's hash moved from the one loaded at start (the file watcher
    // may have applied the change just before the SIGHUP reload did).
    let first = &server.audit_records("config.reload")[0];
    assert_ne!(
        record["detail"]["sha256"],
        first["detail"]["previous_sha256"]
    );
    // Uninitialized: 501, Vault's answer. What matters is that it answered.
    assert_eq!(health_from(&server, NEWCOMER).await, Some(501));
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(501));
    // Another source stays out.
    assert_eq!(health_from(&server, "127.0.0.4").await, None);
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_rules_and_counts_the_failure() {
    let server = TestServer::start(Opts::default());
    let (co, _app) = server.init_with_app_user().await;
    let info_before = metric(&server, &co, "hsmgate_config_info{").await;
    assert_eq!(info_before, 1.0);
    assert_eq!(
        metric(
            &server,
            &co,
            "hsmgate_config_reloads_total{outcome=\"failure\"}"
        )
        .await,
        0.0
    );
    // Would admit 127.0.0.2, but line 4 is not a network.
    let broken = "[group.apps]\nrules = [\n  { source = \"127.0.0.2/32\" },\n  { source = \"127.0.0.1/33\" },\n]\n[group.admins]\nrules = [{ source = \"127.0.0.1/32\" }]\n[group.break-glass]\nrules = [{ source = \"127.0.0.1/32\" }]\n";
    let record = server.reload_with(&[(GROUPS, broken)]).await;
    assert_eq!(record["outcome"], "failure", "{record}");
    assert!(
        record["detail"]["errors"].as_u64().unwrap() >= 1,
        "{record}"
    );
    // The error is logged with its file and line.
    let path = server.config_dir().join(GROUPS);
    let needle = format!("{}:4:", path.display());
    let log = server.log_when(|l| l.contains(&needle));
    assert!(log.contains(&needle), "no file:line in the log:\n{log}");
    assert!(log.contains("config reload rejected"), "{log}");
    // Deny: the broken change did not open the fence.
    assert_eq!(health_from(&server, NEWCOMER).await, None);
    // Allow: the old rules still serve.
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(200));
    // At least 1: the file watcher may have tried the same broken tree too.
    assert!(
        metric(
            &server,
            &co,
            "hsmgate_config_reloads_total{outcome=\"failure\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(&server, &co, "hsmgate_config_last_reload_successful ").await,
        0.0
    );
    // The running config's hash did not move.
    let (_, body) = server
        .get(
            &server.client(),
            "/v1/sys/metrics?format=prometheus",
            Some(&co),
        )
        .await;
    let sha = record["detail"]["running_sha256"].as_str().unwrap();
    assert!(
        body.as_str().unwrap().contains(&format!(
            "hsmgate_config_info{{sha256=\"{}\"}} 1",
            &sha[..16]
        )),
        "{body}"
    );
    // Fixing the file recovers: success, and the failure state clears.
    let record = server
        .reload_with(&[(GROUPS, &groups_file(&["127.0.0.1/32"], &["127.0.0.1/32"]))])
        .await;
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(
        metric(&server, &co, "hsmgate_config_last_reload_successful ").await,
        1.0
    );
    assert!(
        metric(
            &server,
            &co,
            "hsmgate_config_reloads_total{outcome=\"success\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn revocation_cuts_a_kept_alive_connection_after_reload() {
    let server = TestServer::start(Opts {
        apps: vec!["127.0.0.1/32", "127.0.0.2/32"],
        ..Opts::default()
    });
    let roots = certs_of(&std::fs::read(server.path("tls/cert.pem")).unwrap());
    let mut kept = tls_connect(server.addr, NEWCOMER, &roots).await.unwrap();
    let mut trusted = tls_connect(server.addr, "127.0.0.1", &roots).await.unwrap();
    assert_eq!(
        http1_get(&mut kept, "/v1/sys/health").await,
        Some((501, false))
    );
    assert_eq!(
        http1_get(&mut trusted, "/v1/sys/health").await,
        Some((501, false))
    );
    let record = server
        .reload_with(&[(GROUPS, &groups_file(&["127.0.0.1/32"], &["127.0.0.1/32"]))])
        .await;
    assert_eq!(record["outcome"], "success", "{record}");
    // Deny: the same connection, next request: refused, and closed.
    assert_eq!(
        http1_get(&mut kept, "/v1/sys/health").await,
        Some((403, true))
    );
    assert_eq!(http1_get(&mut kept, "/v1/sys/health").await, None);
    // Allow: a kept-alive connection from a network still listed goes on.
    assert_eq!(
        http1_get(&mut trusted, "/v1/sys/health").await,
        Some((501, false))
    );
    // And new connections from the revoked network are dropped at accept.
    assert_eq!(health_from(&server, NEWCOMER).await, None);
}

#[tokio::test]
async fn a_changed_file_reloads_without_sighup() {
    let server = TestServer::start(Opts::default());
    assert_eq!(health_from(&server, NEWCOMER).await, None);
    let before = server.audit_records("config.reload").len();
    server.replace_file(
        GROUPS,
        &groups_file(&["127.0.0.1/32", "127.0.0.2/32"], &["127.0.0.1/32"]),
    );
    let record = server.wait_reload(before, Some("file-change")).await;
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(health_from(&server, NEWCOMER).await, Some(501));
    // A broken edit, also without SIGHUP: rejected, the last good rules stay.
    let before = server.audit_records("config.reload").len();
    server.replace_file(
        GROUPS,
        "[group.apps]\nrules = [{ source = \"nonsense\" }]\n",
    );
    let record = server.wait_reload(before, Some("file-change")).await;
    assert_eq!(record["outcome"], "failure", "{record}");
    assert_eq!(health_from(&server, NEWCOMER).await, Some(501));
    assert_eq!(health_from(&server, "127.0.0.4").await, None);
}

#[tokio::test]
async fn a_reload_that_moves_a_listener_is_rejected() {
    let server = TestServer::start(Opts::default());
    let path = server.config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let moved = text.replacen("address = \"127.0.0.1:0\"", "address = \"127.0.0.1:1\"", 1);
    assert_ne!(moved, text);
    let record = server.reload_with(&[("hsmgate.toml", &moved)]).await;
    assert_eq!(record["outcome"], "failure", "{record}");
    let log = server.log_when(|l| l.contains("address changed"));
    assert!(log.contains("address changed"), "{log}");
    // Still serving on the socket it bound at start.
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(501));
}

fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn write_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_replaced_certificate_serves_the_next_handshake() {
    let (cert1, key1) = self_signed();
    let (cert2, key2) = self_signed();
    let server = TestServer::start(Opts {
        extra_config: "[tls]\ncert_file = \"tls/cert.pem\"\nkey_file = \"tls/key.pem\"\n".into(),
        files: vec![
            ("tls/cert.pem".into(), cert1.clone(), 0o644),
            ("tls/key.pem".into(), key1.clone(), 0o600),
        ],
        ..Opts::default()
    });
    let tls = server.config_dir().join("tls");
    let roots: Vec<_> = certs_of(cert1.as_bytes())
        .into_iter()
        .chain(certs_of(cert2.as_bytes()))
        .collect();
    let peer_cert = |s: &TlsStream<tokio::net::TcpStream>| {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let mut first = tls_connect(server.addr, "127.0.0.1", &roots).await.unwrap();
    assert_eq!(peer_cert(&first), certs_of(cert1.as_bytes())[0].to_vec());

    // A key readable by others is refused whole: the old pair keeps serving.
    let before = server.audit_records("config.reload").len();
    std::fs::write(tls.join("cert.pem.tmp-new"), &cert2).unwrap();
    std::fs::write(tls.join("key.pem.tmp-new"), &key2).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tls.join("key.pem.tmp-new"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::rename(tls.join("key.pem.tmp-new"), tls.join("key.pem")).unwrap();
    std::fs::rename(tls.join("cert.pem.tmp-new"), tls.join("cert.pem")).unwrap();
    server.sighup();
    let record = server.wait_reload(before, Some("sighup")).await;
    assert_eq!(record["outcome"], "failure", "{record}");
    let s = tls_connect(server.addr, "127.0.0.1", &roots).await.unwrap();
    assert_eq!(peer_cert(&s), certs_of(cert1.as_bytes())[0].to_vec());

    // Fixed: the next handshake gets the new certificate.
    let before = server.audit_records("config.reload").len();
    write_key(&tls.join("key.pem"), &key2);
    server.sighup();
    let record = server.wait_reload(before, Some("sighup")).await;
    assert_eq!(record["outcome"], "success", "{record}");
    let s = tls_connect(server.addr, "127.0.0.1", &roots).await.unwrap();
    assert_eq!(peer_cert(&s), certs_of(cert2.as_bytes())[0].to_vec());
    // The connection made before the swap keeps its session.
    assert_eq!(
        http1_get(&mut first, "/v1/sys/health").await,
        Some((501, false))
    );
}

#[tokio::test]
async fn a_reloaded_rate_limit_takes_effect() {
    let server = TestServer::start(Opts::default());
    for _ in 0..3 {
        assert_eq!(health_from(&server, "127.0.0.1").await, Some(501));
    }
    let strict = LOOSE_RATE_LIMITS.replace(
        "source.health = { rate = 100000, per = \"second\", burst = 100000 }",
        "source.health = { rate = 1, per = \"minute\", burst = 2 }",
    );
    assert_ne!(strict, LOOSE_RATE_LIMITS);
    let record = server
        .reload_with(&[("policies/rate-limits.toml", &strict)])
        .await;
    assert_eq!(record["outcome"], "success", "{record}");
    // Allow: the new burst of 2; deny: the third.
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(501));
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(501));
    assert_eq!(health_from(&server, "127.0.0.1").await, Some(429));
}
