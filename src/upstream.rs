//! The upstream pool: a gateway (`[upstream]` in the config) holds no engine
//! of its own and forwards every request that passed its fence to remote
//! engine nodes' API listeners, over TLS (mutual when the gateway has a
//! certificate), HTTP/2, one multiplexed connection per node.
//!
//! Who gets a request (decided here, see docs/CLUSTER.md "Gateways"):
//! * **Retry-safe** requests (reads and crypto that change nothing:
//!   encrypt, decrypt, sign, verify, hmac, ...) go round-robin over the
//!   healthy nodes; a node that cannot be reached, drops the answer or
//!   answers 503 is left for the next one.
//! * **Writes** (key create/rotate/config/trim/delete/import/restore, user
//!   and cluster administration) go to the Raft leader when one is known
//!   healthy, else to any healthy node (a follower forwards to its leader).
//!   A write moves on to another node only if it was never sent.
//! * **Password logins** (`/v1/hsm/login`) go to one node chosen by the
//!   username (rendezvous hashing over the healthy nodes): login counters
//!   are per node, so a guesser cannot spread one user's attempts over the
//!   cluster. Never resent once sent: a resent wrong password would count
//!   twice. (JWT logins count nothing: retry-safe.)
//!
//! "Sent" is hyper's word: a request it hands back unwritten
//! (`try_send_request`) or one whose connection never opened was not sent.
//!
//! Health: every `health_interval` each node's `GET /v1/sys/health` is read;
//! healthy means 200 (initialized, unsealed, active), `performance_standby:
//! false` marks the leader. Passive ejection: a node that fails to connect
//! or drops an answer leaves the pool at once and returns with its next
//! good health check.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper::{header, HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls_pki_types::ServerName;

use crate::gateway::rescue::ApiError;

/// The largest answer read from a node (a batch answer is bounded by the
/// node's own body limit; this only bounds a misbehaving node).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// The header naming the node that answered (for operators and tests).
pub const NODE_HEADER: &str = "x-hsmgate-upstream";

/// `[upstream]`, validated (see `config::upstream_section`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub nodes: Vec<UpstreamNode>,
    /// PEM roots the nodes' API certificates must chain to.
    pub ca_file: PathBuf,
    /// This gateway's client certificate and key, for nodes whose listener
    /// has a `client_ca`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub health_interval: Duration,
    /// Bound on one forwarded request (connect, send, answer).
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamNode {
    pub id: u64,
    pub address: SocketAddr,
    /// The name the node's certificate must carry (default: the address's IP).
    pub server_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream TLS: {0}")]
    Tls(String),
    #[error("upstream metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What a request may do to the cluster, which decides where it goes and
/// whether it may be resent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    RetrySafe,
    Write,
    Login { username: Option<String> },
}

impl Kind {
    /// Classifies a request the fence let through (`path` without query).
    /// Password logins stick to a node; a JWT login (`/v1/auth/jwt/login`)
    /// counts nothing anywhere, so it is retry-safe.
    pub fn of(method: &Method, path: &str, body: &[u8]) -> Kind {
        if path.starts_with("/v1/auth/") && path.ends_with("/login") {
            return Kind::RetrySafe;
        }
        if path == "/v1/hsm/login" {
            let username = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("username").and_then(|u| u.as_str()).map(String::from));
            return Kind::Login { username };
        }
        if method == Method::GET || method == Method::HEAD {
            return Kind::RetrySafe;
        }
        const CRYPTO: [&str; 10] = [
            "encrypt/", "decrypt/", "rewrap/", "datakey/", "hmac/", "sign/", "verify/", "hash",
            "random", "export/",
        ];
        match path.strip_prefix("/v1/transit/") {
            Some(op) if CRYPTO.iter().any(|p| op.starts_with(p)) => Kind::RetrySafe,
            _ => Kind::Write,
        }
    }
}

struct Node {
    cfg: UpstreamNode,
    name: ServerName<'static>,
    up: AtomicBool,
    leader: AtomicBool,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// Why a try on one node failed.
enum Failure {
    /// Nothing reached the node: another node may be tried for any request.
    Unsent(String),
    /// Sent, no (readable) answer: the request may have taken effect.
    Lost(String),
}

pub struct Pool {
    tls: Arc<rustls::ClientConfig>,
    nodes: Vec<Node>,
    next: AtomicUsize,
    timeout: Duration,
    interval: Duration,
    metrics: PoolMetrics,
}

struct PoolMetrics {
    up: IntGaugeVec,
    leader: IntGaugeVec,
    ejections: IntCounterVec,
    requests: IntCounterVec,
}

impl PoolMetrics {
    fn register(registry: &Registry) -> Result<PoolMetrics, prometheus::Error> {
        let up = IntGaugeVec::new(
            Opts::new(
                "hsmgate_upstream_node_up",
                "1 while the engine node is in this gateway's pool (healthy), else 0",
            ),
            &["node"],
        )?;
        let leader = IntGaugeVec::new(
            Opts::new(
                "hsmgate_upstream_node_leader",
                "1 for the node this gateway's health checks last saw as the Raft leader",
            ),
            &["node"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "hsmgate_upstream_ejections_total",
                "Times a node left this gateway's pool (failed health check or request)",
            ),
            &["node"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "hsmgate_upstream_requests_total",
                "Requests this gateway sent to each node, by outcome (answered, unsent, lost)",
            ),
            &["node", "outcome"],
        )?;
        use crate::metrics::registered;
        Ok(PoolMetrics {
            up: registered(registry, up)?,
            leader: registered(registry, leader)?,
            ejections: registered(registry, ejections)?,
            requests: registered(registry, requests)?,
        })
    }
}

impl Pool {
    pub fn new(cfg: &UpstreamConfig, registry: &Registry) -> Result<Pool, UpstreamError> {
        let tls = Arc::new(client_tls(cfg)?);
        let metrics = PoolMetrics::register(registry)?;
        let nodes = cfg
            .nodes
            .iter()
            .map(|n| {
                let name = ServerName::try_from(n.server_name.clone())
                    .map_err(|e| UpstreamError::Tls(format!("node {}: {e}", n.id)))?;
                // Every series from the start, so alerts and rate() see 0.
                let label = n.id.to_string();
                metrics.up.with_label_values(&[&label]).set(0);
                metrics.leader.with_label_values(&[&label]).set(0);
                metrics.ejections.with_label_values(&[&label]);
                Ok(Node {
                    cfg: n.clone(),
                    name,
                    up: AtomicBool::new(false),
                    leader: AtomicBool::new(false),
                    conn: tokio::sync::Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, UpstreamError>>()?;
        Ok(Pool {
            tls,
            nodes,
            next: AtomicUsize::new(0),
            timeout: cfg.timeout,
            interval: cfg.health_interval,
            metrics,
        })
    }

    /// One health round: every node checked at once; returns when all
    /// answered or timed out (`timeout_ms`). The gateway runs the first
    /// round before any listener serves (`gateway::Server::run`), so a
    /// request that arrives with the gateway meets the nodes' real state,
    /// not an empty pool's 503.
    pub async fn check_all(self: &Arc<Self>) {
        let mut checks = tokio::task::JoinSet::new();
        for i in 0..self.nodes.len() {
            let pool = self.clone();
            checks.spawn(async move { pool.check(&pool.nodes[i]).await });
        }
        while checks.join_next().await.is_some() {}
    }

    /// A health round every interval until `stop` fires (after the first,
    /// which [`Pool::check_all`] ran at start-up).
    pub async fn run_health_checks(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => return,
            }
            self.check_all().await;
        }
    }

    async fn check(&self, node: &Node) {
        let req = Request::get(format!("https://{}/v1/sys/health", node.cfg.server_name))
            .body(Full::new(Bytes::new()));
        let answer = match req {
            Ok(req) => self.send(node, req).await,
            Err(e) => Err(Failure::Unsent(e.to_string())),
        };
        let (healthy, leader, why) = match answer {
            Ok((status, _, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let ok =
                    status == StatusCode::OK && v["initialized"] == true && v["sealed"] == false;
                let leader = ok && v["performance_standby"] == false;
                (ok, leader, format!("health answered {status}"))
            }
            Err(Failure::Unsent(e) | Failure::Lost(e)) => (false, false, e),
        };
        let label = node.cfg.id.to_string();
        node.leader.store(leader, Ordering::Release);
        self.metrics
            .leader
            .with_label_values(&[&label])
            .set(leader as i64);
        if healthy {
            if !node.up.swap(true, Ordering::AcqRel) {
                tracing::info!(node = node.cfg.id, address = %node.cfg.address, "upstream node joined the pool");
            }
            self.metrics.up.with_label_values(&[&label]).set(1);
        } else {
            self.eject(node, &why);
        }
    }

    fn eject(&self, node: &Node, why: &str) {
        if node.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(node = node.cfg.id, address = %node.cfg.address, reason = why, "upstream node left the pool");
            self.metrics
                .ejections
                .with_label_values(&[&node.cfg.id.to_string()])
                .inc();
        }
        node.leader.store(false, Ordering::Release);
        self.metrics
            .up
            .with_label_values(&[&node.cfg.id.to_string()])
            .set(0);
    }

    /// The healthy nodes in the order this request tries them.
    fn candidates(&self, kind: &Kind) -> Vec<&Node> {
        let mut up: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.up.load(Ordering::Acquire))
            .collect();
        if up.is_empty() {
            return up;
        }
        match kind {
            Kind::RetrySafe => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % up.len();
                up.rotate_left(start);
            }
            Kind::Write => {
                // The leader first; stable (by id) otherwise.
                up.sort_by_key(|n| (!n.leader.load(Ordering::Acquire), n.cfg.id));
            }
            Kind::Login { username } => {
                // Rendezvous hashing: the same user meets the same node while
                // it is healthy, and only its users move when it leaves.
                let user = username.as_deref().unwrap_or("");
                up.sort_by_key(|n| std::cmp::Reverse(rendezvous(user, n.cfg.id)));
            }
        }
        up
    }

    /// Forwards one request that passed the fence; `client` (the effective
    /// client) goes in `X-Forwarded-For`, replacing whatever the client sent.
    pub async fn forward(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
        client: IpAddr,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let kind = Kind::of(
            method,
            path_and_query.split('?').next().unwrap_or(""),
            &body,
        );
        let candidates = self.candidates(&kind);
        if candidates.is_empty() {
            return Err(ApiError::UpstreamUnavailable(
                "no engine node is healthy; nothing was sent".into(),
            ));
        }
        let mut last = String::new();
        // A node's own 503 (sealed, zeroized, no quorum) is passed on when no
        // other node answers: its message says more than ours would.
        let mut last_503 = None;
        for node in candidates.into_iter().take(3) {
            let req = upstream_request(method, path_and_query, headers, body.clone(), client, node)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            match self.send(node, req).await {
                Ok((status, head, answer)) => {
                    self.count(node, "answered");
                    if status == StatusCode::SERVICE_UNAVAILABLE && kind == Kind::RetrySafe {
                        // Sealed, zeroized or without quorum: let the health
                        // check judge it, and try another node meanwhile.
                        last = format!("node {} answered 503", node.cfg.id);
                        last_503 = Some(downstream_response(status, &head, answer, node.cfg.id));
                        continue;
                    }
                    return Ok(downstream_response(status, &head, answer, node.cfg.id));
                }
                Err(Failure::Unsent(e)) => {
                    self.count(node, "unsent");
                    self.eject(node, &e);
                    last = format!("node {}: {e}", node.cfg.id);
                }
                Err(Failure::Lost(e)) => {
                    self.count(node, "lost");
                    self.eject(node, &e);
                    if kind != Kind::RetrySafe {
                        return Err(ApiError::UpstreamLost(format!(
                            "engine node {} did not answer; the request may or may not have \
                             taken effect: read before retrying",
                            node.cfg.id
                        )));
                    }
                    last = format!("node {}: {e}", node.cfg.id);
                }
            }
        }
        tracing::warn!(detail = last, "no engine node answered");
        if let Some(resp) = last_503 {
            return Ok(resp);
        }
        Err(ApiError::UpstreamUnavailable(match kind {
            Kind::RetrySafe => "no engine node could answer; retry".into(),
            _ => "no engine node could be reached; nothing was sent, retry".into(),
        }))
    }

    fn count(&self, node: &Node, outcome: &str) {
        self.metrics
            .requests
            .with_label_values(&[&node.cfg.id.to_string(), outcome])
            .inc();
    }

    /// One exchange with `node` over its (re-dialled if needed) connection.
    async fn send(
        &self,
        node: &Node,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Failure> {
        let work = async {
            let mut sender = {
                let mut conn = node.conn.lock().await;
                match conn.as_mut() {
                    Some(s) if s.is_ready() => s.clone(),
                    _ => {
                        let s = self.dial(node).await.map_err(Failure::Unsent)?;
                        *conn = Some(s.clone());
                        s
                    }
                }
            };
            let resp = match sender.try_send_request(req).await {
                Ok(r) => r,
                Err(mut e) => {
                    *node.conn.lock().await = None;
                    // hyper hands back a request it never began to write;
                    // any other failure may have reached the node.
                    let unsent = e.take_message().is_some();
                    let detail = e.into_error().to_string();
                    return Err(if unsent {
                        Failure::Unsent(detail)
                    } else {
                        Failure::Lost(detail)
                    });
                }
            };
            let (parts, body) = resp.into_parts();
            let bytes = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| Failure::Lost(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((parts.status, parts.headers, bytes))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                *node.conn.lock().await = None;
                Err(Failure::Lost(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    async fn dial(&self, node: &Node) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(node.cfg.address)
            .await
            .map_err(|e| format!("connect {}: {e}", node.cfg.address))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(node.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", node.cfg.address))?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 with {}: {e}", node.cfg.address))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

fn rendezvous(user: &str, node: u64) -> [u8; 32] {
    let mut input = node.to_be_bytes().to_vec();
    input.extend_from_slice(user.as_bytes());
    crate::engine::crypto::sha256(&input)
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// the client's own claims about addresses, which the gateway replaces.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "x-forwarded-for"
            | "forwarded"
            | "x-real-ip"
    )
}

fn upstream_request(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    client: IpAddr,
    node: &Node,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let mut req = Request::builder()
        .method(method.clone())
        .uri(format!("https://{}{path_and_query}", node.cfg.server_name));
    for (name, value) in headers {
        if !hop_by_hop(name) {
            req = req.header(name, value);
        }
    }
    req.header("x-forwarded-for", client.to_string())
        .body(Full::new(body))
}

fn downstream_response(
    status: StatusCode,
    head: &HeaderMap,
    body: Bytes,
    node: u64,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    for (name, value) in head {
        // The gateway sets its own request id and framing.
        if !hop_by_hop(name) && name.as_str() != "x-request-id" {
            resp.headers_mut().append(name, value.clone());
        }
    }
    resp.headers_mut()
        .insert(NODE_HEADER, header::HeaderValue::from(node));
    resp
}

fn client_tls(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, UpstreamError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
        UpstreamError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(&cfg.ca_file).map_err(|e| bad("ca_file", &cfg.ca_file, &e))?
    {
        let c = c.map_err(|e| bad("ca_file", &cfg.ca_file, &e))?;
        roots.add(c).map_err(|e| bad("ca_file", &cfg.ca_file, &e))?;
    }
    if roots.is_empty() {
        return Err(bad("ca_file", &cfg.ca_file, &"holds no certificate"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match &cfg.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad("cert_file", cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("cert_file", cert, &e))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key_file", key, &e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad("cert_file", cert, &e))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Loads the TLS files as the pool would (for `hsmgate check`).
pub fn check_tls(cfg: &UpstreamConfig) -> Result<(), UpstreamError> {
    client_tls(cfg).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_by_what_they_may_change() {
        let post = Method::POST;
        for path in [
            "/v1/transit/encrypt/k",
            "/v1/transit/decrypt/k",
            "/v1/transit/sign/k/sha2-256",
            "/v1/transit/hash",
            "/v1/transit/random/32",
            "/v1/transit/datakey/plaintext/k",
        ] {
            assert_eq!(Kind::of(&post, path, b""), Kind::RetrySafe, "{path}");
        }
        assert_eq!(
            Kind::of(&Method::GET, "/v1/transit/keys/k", b""),
            Kind::RetrySafe
        );
        for path in [
            "/v1/transit/keys/k",
            "/v1/transit/keys/k/rotate",
            "/v1/transit/keys/k/config",
            "/v1/transit/restore",
            "/v1/transit/keys/encrypt/rotate",
            "/v1/hsm/users",
            "/v1/hsm/zeroize",
        ] {
            assert_eq!(Kind::of(&post, path, b""), Kind::Write, "{path}");
        }
        assert_eq!(
            Kind::of(&Method::DELETE, "/v1/transit/keys/k", b""),
            Kind::Write
        );
        assert_eq!(
            Kind::of(
                &post,
                "/v1/hsm/login",
                br#"{"username":"alice","password":"x"}"#
            ),
            Kind::Login {
                username: Some("alice".into())
            }
        );
        assert_eq!(
            Kind::of(&post, "/v1/auth/jwt/login", b"{}"),
            Kind::RetrySafe
        );
        assert_eq!(
            Kind::of(&post, "/v1/hsm/login", b"not json"),
            Kind::Login { username: None }
        );
    }

    #[test]
    fn a_user_meets_the_same_node_and_only_its_users_move() {
        let pick = |user: &str, nodes: &[u64]| {
            *nodes.iter().max_by_key(|n| rendezvous(user, **n)).unwrap()
        };
        let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let mut moved = 0;
        let mut seen = std::collections::BTreeSet::new();
        for u in &users {
            let all = pick(u, &[1, 2, 3]);
            seen.insert(all);
            assert_eq!(all, pick(u, &[1, 2, 3]));
            let without_2 = pick(u, &[1, 3]);
            if all != 2 {
                assert_eq!(all, without_2, "{u} moved though its node stayed");
            } else {
                moved += 1;
            }
        }
        assert_eq!(seen.len(), 3, "every node gets users");
        assert!(moved > 0 && moved < users.len());
    }

    #[test]
    fn hop_by_hop_and_address_claims_are_not_forwarded() {
        for h in [
            "connection",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "host",
        ] {
            assert!(hop_by_hop(&header::HeaderName::from_static(h)), "{h}");
        }
        for h in [
            "x-vault-token",
            "authorization",
            "content-type",
            "x-vault-request",
        ] {
            assert!(!hop_by_hop(&header::HeaderName::from_static(h)), "{h}");
        }
    }
}
