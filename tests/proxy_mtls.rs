//! Trusted proxies (X-Forwarded-For, PROXY protocol v1/v2) and mutual TLS,
//! over real sockets: each decision allowed once and denied once.
mod common;

use std::net::{IpAddr, SocketAddr};

use common::{Opts, TestServer, LOOSE_RATE_LIMITS};

/// The app network (in group `apps`, and so admitted directly).
const APP: &str = "127.0.0.1";
/// A second app-network address (its own rate-limit bucket).
const APP2: &str = "127.0.0.4";
/// The trusted proxy (group `proxies`; in no security group itself).
const PROXY: &str = "127.0.0.3";
/// Nobody's network.
const STRANGER: &str = "127.0.0.9";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn xff_server(rate_limits: Option<String>) -> TestServer {
    TestServer::start(Opts {
        apps: vec!["127.0.0.1/32", "127.0.0.4/32"],
        admins: vec!["127.0.0.1/32"],
        proxies: vec!["127.0.0.3/32"],
        api_listener_extra: "trusted_proxy_groups = [\"proxies\"]\nxff_hops = 1\n".into(),
        rate_limits,
        ..Opts::default()
    })
}

async fn health_with_xff(s: &TestServer, from: &str, xff: Option<&str>) -> Result<u16, String> {
    let mut req = s.client_from(ip(from)).get(s.url("/v1/sys/health"));
    if let Some(v) = xff {
        req = req.header("x-forwarded-for", v);
    }
    req.send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

// Health answers 501 while the engine is uninitialized: "admitted".
const ADMITTED: u16 = 501;

#[tokio::test]
async fn xff_from_an_untrusted_peer_is_ignored() {
    let s = xff_server(None);
    // An app peer claiming a stranger's address is still judged as itself.
    assert_eq!(health_with_xff(&s, APP, Some(STRANGER)).await, Ok(ADMITTED));
    // A stranger claiming an app address is still a stranger: dropped at accept.
    assert!(
        health_with_xff(&s, STRANGER, Some(APP)).await.is_err(),
        "a stranger got in by naming an app address"
    );
}

#[tokio::test]
async fn xff_from_a_trusted_proxy_is_honoured() {
    let s = xff_server(None);
    // The proxy names an app client: admitted.
    assert_eq!(health_with_xff(&s, PROXY, Some(APP)).await, Ok(ADMITTED));
    // The proxy names a stranger: the groups refuse the stranger.
    assert_eq!(health_with_xff(&s, PROXY, Some(STRANGER)).await, Ok(403));
    // xff_hops = 1: the rightmost entry (the proxy's own) decides; what the
    // client wrote to the left is never read.
    assert_eq!(
        health_with_xff(&s, PROXY, Some(&format!("{STRANGER}, {APP}"))).await,
        Ok(ADMITTED)
    );
    assert_eq!(
        health_with_xff(&s, PROXY, Some(&format!("{APP}, {STRANGER}"))).await,
        Ok(403)
    );
    // Without the header the proxy speaks for itself, and is in no group.
    assert_eq!(health_with_xff(&s, PROXY, None).await, Ok(403));
    // A malformed entry from the trusted chain is refused, not guessed at.
    assert_eq!(health_with_xff(&s, PROXY, Some("junk")).await, Ok(400));
    // The audit record of a (denied, so audited) Transit request names both
    // the proxy (source) and the client it named.
    let st = s
        .client_from(ip(PROXY))
        .get(s.url("/v1/transit/keys/k"))
        .header("x-forwarded-for", APP2)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 403);
    let log = std::fs::read_to_string(s.data_dir.join("audit.log")).unwrap();
    let found = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .any(|r| r["source"] == PROXY && r["detail"]["client"] == APP2);
    assert!(
        found,
        "no audit record with source {PROXY} and client {APP2}:\n{log}"
    );
    // A direct request's record has no separate client.
    let st = s
        .client_from(ip(APP2))
        .get(s.url("/v1/transit/keys/k"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 403);
    let log = std::fs::read_to_string(s.data_dir.join("audit.log")).unwrap();
    let direct = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["source"] == APP2)
        .expect("the direct request's record");
    assert!(direct["detail"].get("client").is_none(), "{direct}");
}

#[tokio::test]
async fn xff_from_a_trusted_proxy_is_rate_limited_per_claimed_client() {
    let limits = LOOSE_RATE_LIMITS.replace(
        "source.health = { rate = 100000, per = \"second\", burst = 100000 }",
        "source.health = { rate = 1, per = \"minute\", burst = 2 }",
    );
    assert_ne!(limits, LOOSE_RATE_LIMITS);
    let s = xff_server(Some(limits));
    assert_eq!(health_with_xff(&s, PROXY, Some(APP)).await, Ok(ADMITTED));
    assert_eq!(health_with_xff(&s, PROXY, Some(APP)).await, Ok(ADMITTED));
    // The claimed client's budget is spent...
    assert_eq!(health_with_xff(&s, PROXY, Some(APP)).await, Ok(429));
    // ...also when it comes directly: it is the same client.
    assert_eq!(health_with_xff(&s, APP, None).await, Ok(429));
    // Another client behind the same proxy has its own.
    assert_eq!(health_with_xff(&s, PROXY, Some(APP2)).await, Ok(ADMITTED));
}

// ---------------------------------------------------------------------------
// PROXY protocol.

fn proxy_protocol_server() -> TestServer {
    TestServer::start(Opts {
        apps: vec!["127.0.0.1/32"],
        admins: vec!["127.0.0.1/32"],
        proxies: vec!["127.0.0.3/32"],
        api_listener_extra: "trusted_proxy_groups = [\"proxies\"]\nproxy_protocol = true\n".into(),
        ..Opts::default()
    })
}

fn v1(client: &str, server: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {client} {} 40000 {}\r\n",
        server.ip(),
        server.port()
    )
    .into_bytes()
}

fn v2(client: &str, server: SocketAddr) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    let IpAddr::V4(c) = ip(client) else {
        unreachable!()
    };
    let IpAddr::V4(d) = server.ip() else {
        unreachable!()
    };
    out.extend_from_slice(&c.octets());
    out.extend_from_slice(&d.octets());
    out.extend_from_slice(&40000u16.to_be_bytes());
    out.extend_from_slice(&server.port().to_be_bytes());
    out
}

#[tokio::test]
async fn proxy_v1_header_from_a_trusted_proxy_is_honoured() {
    let s = proxy_protocol_server();
    let get = |prefix: Vec<u8>| {
        let s = &s;
        async move {
            s.raw_get(s.addr, ip(PROXY), &prefix, "/v1/sys/health")
                .await
        }
    };
    assert_eq!(get(v1(APP, s.addr)).await.unwrap(), ADMITTED);
    // The named client is judged by the groups, before TLS.
    assert!(
        get(v1(STRANGER, s.addr)).await.is_err(),
        "a stranger named by the proxy got in"
    );
}

#[tokio::test]
async fn proxy_v2_header_from_a_trusted_proxy_is_honoured() {
    let s = proxy_protocol_server();
    let get = |prefix: Vec<u8>| {
        let s = &s;
        async move {
            s.raw_get(s.addr, ip(PROXY), &prefix, "/v1/sys/health")
                .await
        }
    };
    assert_eq!(get(v2(APP, s.addr)).await.unwrap(), ADMITTED);
    assert!(
        get(v2(STRANGER, s.addr)).await.is_err(),
        "a stranger named by the proxy got in"
    );
}

#[tokio::test]
async fn malformed_or_missing_proxy_header_from_a_trusted_proxy_is_refused() {
    let s = proxy_protocol_server();
    for bad in [
        b"PROXY TCP4 127.0.0.1 garbage\r\n".to_vec(),
        b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 8200\n".to_vec(),
        b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01\x00\x01\x00\x02"
            .to_vec(),
        // No header at all: straight into TLS.
        Vec::new(),
    ] {
        assert!(
            s.raw_get(s.addr, ip(PROXY), &bad, "/v1/sys/health")
                .await
                .is_err(),
            "accepted {:?}",
            String::from_utf8_lossy(&bad)
        );
    }
    // The allow, on the same server.
    assert_eq!(
        s.raw_get(s.addr, ip(PROXY), &v1(APP, s.addr), "/v1/sys/health")
            .await
            .unwrap(),
        ADMITTED
    );
}

#[tokio::test]
async fn direct_client_on_a_proxy_protocol_listener_is_judged_as_itself() {
    let s = proxy_protocol_server();
    // No header, not a proxy: an ordinary client.
    assert_eq!(
        s.raw_get(s.addr, ip(APP), b"", "/v1/sys/health")
            .await
            .unwrap(),
        ADMITTED
    );
    // A header from a peer that is not a trusted proxy: refused.
    assert!(s
        .raw_get(s.addr, ip(APP), &v1(APP, s.addr), "/v1/sys/health")
        .await
        .is_err());
}

// ---------------------------------------------------------------------------
// Mutual TLS.

struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A client certificate and key (PEM, concatenated) for `cn`.
fn client_identity(pki: &Pki, cn: &str) -> String {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let mut params = CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    format!("{}{}", cert.pem(), key.serialize_pem())
}

struct MtlsSetup {
    server: TestServer,
    good: Pki,
    wrong: Pki,
    _dir: tempfile::TempDir,
}

/// The api listener asks for a certificate (optional) and maps subject
/// `payments-svc`; break-glass requires one.
fn mtls_server() -> MtlsSetup {
    let good = ca("hsmgate test client CA");
    let wrong = ca("some other CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&ca_path, &good.ca_pem).unwrap();
    let ca = ca_path.display();
    let server = TestServer::start(Opts {
        api_listener_extra: format!("client_ca = \"{ca}\"\nclient_auth = \"optional\"\n"),
        break_glass_extra: format!("client_ca = \"{ca}\"\nclient_auth = \"required\"\n"),
        extra_config: "[[cert_principal]]\nname = \"payments\"\nsubject_cn = \"payments-svc\"\npolicies = [\"payments-encrypt\"]\n".into(),
        ..Opts::default()
    });
    MtlsSetup {
        server,
        good,
        wrong,
        _dir: dir,
    }
}

#[tokio::test]
async fn mtls_required_listener_needs_a_certificate_from_its_ca() {
    let m = mtls_server();
    let s = &m.server;
    let url = s.break_glass_url("/v1/sys/health");
    // No certificate: the handshake fails.
    assert!(
        s.client().get(&url).send().await.is_err(),
        "no client cert, yet served"
    );
    // From another CA: refused.
    let stranger = s.client_with_identity(ip(APP), &client_identity(&m.wrong, "payments-svc"));
    assert!(
        stranger.get(&url).send().await.is_err(),
        "a wrong-CA cert was accepted"
    );
    // From the configured CA: served.
    let good = s.client_with_identity(ip(APP), &client_identity(&m.good, "operator"));
    assert_eq!(good.get(&url).send().await.unwrap().status(), ADMITTED);
}

#[tokio::test]
async fn mtls_optional_listener_verifies_any_certificate_sent() {
    let m = mtls_server();
    let s = &m.server;
    let url = s.url("/v1/sys/health");
    assert_eq!(
        s.client().get(&url).send().await.unwrap().status(),
        ADMITTED
    );
    let good = s.client_with_identity(ip(APP), &client_identity(&m.good, "whoever"));
    assert_eq!(good.get(&url).send().await.unwrap().status(), ADMITTED);
    let stranger = s.client_with_identity(ip(APP), &client_identity(&m.wrong, "whoever"));
    assert!(
        stranger.get(&url).send().await.is_err(),
        "optional must still verify"
    );
}

#[tokio::test]
async fn mtls_mapped_certificate_subject_acts_as_an_app_principal() {
    let m = mtls_server();
    let s = &m.server;
    s.init().await;
    let url = s.url("/v1/auth/token/lookup-self");
    let mapped = s.client_with_identity(ip(APP), &client_identity(&m.good, "payments-svc"));
    let (st, body) = common::into_parts(mapped.get(&url).send().await.unwrap()).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["display_name"], "hsm-cert:payments", "{body}");
    let policies = body["data"]["policies"].to_string();
    assert!(policies.contains("payments-encrypt"), "{body}");
    // A certificate from the right CA whose subject nobody mapped: no principal.
    let unmapped = s.client_with_identity(ip(APP), &client_identity(&m.good, "intruder-svc"));
    let st = unmapped.get(&url).send().await.unwrap().status();
    assert_eq!(st, 403);
    // No certificate, no token: no principal.
    assert_eq!(s.client().get(&url).send().await.unwrap().status(), 403);
}
