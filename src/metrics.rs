//! Prometheus metrics: one registry per server, the hot-path handles, and
//! the metrics listener (plain HTTP, its own security group).
//!
//! Naming: `hsmgate_` prefix, base units (seconds), `_total` counters.
//! Labels are bounded sets only: listener names (from config), route
//! classes, HTTP methods folded to a fixed list, status codes, roles,
//! operations from a fixed list, key types. Never a source address, a key
//! name or a user name (the one exception is the crypto officer's
//! attempts-left gauge, labelled with the officer's name, of which there is
//! one per engine).
//!
//! Hot-path handles (per-listener connection counters, per-class request
//! counters and latency histograms) are resolved once at startup; engine
//! state, key counts and the officer's attempts left are read from the
//! engine at scrape time. With `[cluster]`, the `hsmgate_cluster_*`
//! gauges (labels: node ids only) live in `cluster::metrics`, registered
//! on this registry.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::engine::crypto::KeyType;
use crate::engine::{Engine, EngineState, Role};
use crate::gateway::router::RouteClass;
use crate::netfilter::{self, CidrSet};

/// The group the metrics listener admits by default.
pub const DEFAULT_GROUP: &str = "monitoring";

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Whether to run the metrics listener. `/v1/sys/metrics` on the API
    /// listener is served either way (it needs a token).
    pub enabled: bool,
    /// Plain HTTP: keep it on loopback, or on a monitoring network you trust
    /// with the counters (they hold no secrets, addresses or key names).
    pub address: SocketAddr,
    pub security_groups: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            address: SocketAddr::from(([127, 0, 0, 1], 9464)),
            security_groups: vec![DEFAULT_GROUP.to_string()],
        }
    }
}

/// The listener label of the metrics listener itself.
pub const METRICS_LISTENER: &str = "metrics";

pub const CLASSES: [RouteClass; 6] = [
    RouteClass::Transit,
    RouteClass::Login,
    RouteClass::Admin,
    RouteClass::Health,
    RouteClass::Metrics,
    RouteClass::Unknown,
];

pub fn class_label(class: RouteClass) -> &'static str {
    match class {
        RouteClass::Transit => "transit",
        RouteClass::Login => "login",
        RouteClass::Admin => "admin",
        RouteClass::Health => "health",
        RouteClass::Metrics => "metrics",
        RouteClass::Unknown => "unknown",
    }
}

const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "LIST", "HEAD", "PATCH", "OTHER",
];

fn method_index(method: &Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(7)
}

/// The status codes hsmgate answers with; anything else (a health override)
/// takes the slow path.
const STATUSES: [u16; 15] = [
    200, 204, 400, 401, 403, 404, 405, 413, 423, 429, 473, 500, 501, 503, 307,
];

/// Transit operations that may appear as the `op` label.
const OPS: [&str; 24] = [
    "encrypt",
    "decrypt",
    "rewrap",
    "datakey",
    "random",
    "hash",
    "hmac",
    "sign",
    "verify",
    "export",
    "backup",
    "restore",
    "create",
    "read",
    "delete",
    "list",
    "rotate",
    "config",
    "trim",
    "import",
    "import_version",
    "wrap",
    "unwrap",
    "wrapping_key",
];

/// `hsmgate_rate_limited_total`'s `scope` label, from the limit that
/// refused ([`crate::ratelimit::Limited::scope`]); a closed set.
pub const RATE_LIMIT_SCOPES: [&str; 5] = [
    "source",
    "login_user",
    "principal",
    "key",
    "password_hashing",
];

fn scope_index(scope: &str) -> usize {
    match scope {
        "login-user" => 1,
        "principal" => 2,
        "key" => 3,
        "password-hashing" => 4,
        // `source`, and anything a future limit names before it is added here.
        _ => 0,
    }
}

pub fn op_label(op: &str) -> &'static str {
    OPS.iter().find(|o| **o == op).copied().unwrap_or("other")
}

/// Per listener: accept and handshake outcomes.
#[derive(Clone)]
pub struct ListenerCounters {
    pub accepted: IntCounter,
    pub denied: IntCounter,
    /// Refused at accept by the connection caps (per source network, total).
    pub capped: IntCounter,
    /// Refused over a PROXY header: untrusted sender, a trusted proxy's
    /// missing or malformed one, or a client it named that is refused (deny
    /// lists, groups, connection cap).
    pub proxy_denied: IntCounter,
    pub tls_failed: IntCounter,
    pub tls_timeout: IntCounter,
}

struct ClassHandles {
    duration: Histogram,
    /// [method][status index], resolved on first use (creating every
    /// combination up front would export hundreds of zero series).
    requests: Vec<Vec<OnceLock<IntCounter>>>,
}

pub struct Metrics {
    registry: Registry,
    connections: IntCounterVec,
    /// Netfilter's per-listener, per-reason deny counters, synced at scrape.
    denials: IntCounterVec,
    tls_failures: IntCounterVec,
    requests: IntCounterVec,
    classes: Vec<ClassHandles>,
    /// [class][scope], every combination created up front (30 series) so
    /// `increase()` sees the first refusal.
    rate_limited: Vec<Vec<IntCounter>>,
    listeners: Vec<ListenerCounters>,
    metrics_listener: ListenerCounters,
    logins: IntCounterVec,
    attempts_left: IntGaugeVec,
    pub guard_refusals: IntCounter,
    zeroizations: IntCounter,
    engine_state: IntGaugeVec,
    engine_ops: IntCounterVec,
    engine_op_duration: HistogramVec,
    keys: IntGaugeVec,
    pub audit_write_failures: IntCounter,
    audit_head: IntGauge,
    acl_denials: IntCounterVec,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("binding the metrics listener on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Registers `collector` and hands back the handle its owner keeps (every
/// module's metrics are registered through here: one registry, one way).
pub(crate) fn registered<C>(r: &Registry, collector: C) -> prometheus::Result<C>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    r.register(Box::new(collector.clone()))?;
    Ok(collector)
}

pub(crate) fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    registered(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

pub(crate) fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(r, IntGauge::new(name, help)?)
}

pub(crate) fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    registered(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

/// Latency buckets from 100 µs (a cached AES call) to 10 s (a stalled disk).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

impl Metrics {
    /// The registry, for metrics owned by other modules (config reloads).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers every metric and resolves the hot-path handles for the
    /// configured listeners.
    pub fn new(config: &Config) -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let connections = counter_vec(
            &r,
            "hsmgate_connections_total",
            "TCP connections by listener and verdict (accepted, or denied and why).",
            &["listener", "result", "reason"],
        )?;
        let tls_failures = counter_vec(
            &r,
            "hsmgate_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out, by listener.",
            &["listener", "reason"],
        )?;
        let requests = counter_vec(
            &r,
            "hsmgate_http_requests_total",
            "HTTP requests by route class, method and status code.",
            &["class", "method", "status"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "hsmgate_http_request_duration_seconds",
                "Time from request head to response, by route class.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["class"],
        )?;
        r.register(Box::new(durations.clone()))?;
        let mut classes = Vec::new();
        for class in CLASSES {
            classes.push(ClassHandles {
                duration: durations.with_label_values(&[class_label(class)]),
                requests: METHODS
                    .iter()
                    .map(|_| STATUSES.iter().map(|_| OnceLock::new()).collect())
                    .collect(),
            });
        }
        let rate_limited_vec = counter_vec(
            &r,
            "hsmgate_rate_limited_total",
            "Requests refused with 429 by a rate limit, by route class and the limit's scope.",
            &["class", "scope"],
        )?;
        let rate_limited = CLASSES
            .iter()
            .map(|c| {
                RATE_LIMIT_SCOPES
                    .iter()
                    .map(|s| rate_limited_vec.with_label_values(&[class_label(*c), s]))
                    .collect()
            })
            .collect();
        let listener_counters = |name: &str| ListenerCounters {
            accepted: connections.with_label_values(&[name, "accepted", "allowed"]),
            denied: connections.with_label_values(&[name, "denied", "security_group"]),
            capped: connections.with_label_values(&[name, "denied", "connection_cap"]),
            proxy_denied: connections.with_label_values(&[name, "denied", "proxy_protocol"]),
            tls_failed: tls_failures.with_label_values(&[name, "error"]),
            tls_timeout: tls_failures.with_label_values(&[name, "timeout"]),
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| listener_counters(&l.name))
            .collect();
        let metrics_listener = listener_counters(METRICS_LISTENER);
        let logins = counter_vec(
            &r,
            "hsmgate_login_attempts_total",
            "Login attempts by role and outcome (success, failure, refused by the guard, denied).",
            &["role", "outcome"],
        )?;
        for role in ["crypto_officer", "crypto_user"] {
            for outcome in ["success", "failure", "refused", "denied"] {
                logins.with_label_values(&[role, outcome]);
            }
        }
        let attempts_left = gauge_vec(
            &r,
            "hsmgate_login_attempts_left",
            "Failed crypto-officer logins left before the engine zeroizes itself.",
            &["user"],
        )?;
        let guard_refusals = IntCounter::new(
            "hsmgate_login_guard_refusals_total",
            "Front-door crypto-officer logins refused by the login guard.",
        )?;
        r.register(Box::new(guard_refusals.clone()))?;
        let zeroizations = IntCounter::new(
            "hsmgate_zeroizations_total",
            "Zeroizations of this data dir, ever (read from the engine's durable state).",
        )?;
        r.register(Box::new(zeroizations.clone()))?;
        let engine_state = gauge_vec(
            &r,
            "hsmgate_engine_state",
            "1 for the engine's current state, 0 for the others.",
            &["state"],
        )?;
        let engine_ops = counter_vec(
            &r,
            "hsmgate_engine_operations_total",
            "Transit operations by operation, key type and outcome.",
            &["op", "key_type", "outcome"],
        )?;
        let engine_op_duration = HistogramVec::new(
            HistogramOpts::new(
                "hsmgate_engine_operation_duration_seconds",
                "Latency of Transit operations at the gateway, by operation and key type.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op", "key_type"],
        )?;
        r.register(Box::new(engine_op_duration.clone()))?;
        let keys = gauge_vec(
            &r,
            "hsmgate_keys",
            "Key rings stored, by key type.",
            &["key_type"],
        )?;
        let audit_write_failures = IntCounter::new(
            "hsmgate_audit_write_failures_total",
            "Audit records that could not be written or synced.",
        )?;
        r.register(Box::new(audit_write_failures.clone()))?;
        let acl_denials = counter_vec(
            &r,
            "hsmgate_acl_denials_total",
            "Transit requests refused by an access policy, by the capability needed and why.",
            &["capability", "reason"],
        )?;
        let audit_head = IntGauge::new(
            "hsmgate_audit_head_sequence",
            "Sequence number of the last audit record: an off-host witness against truncation.",
        )?;
        r.register(Box::new(audit_head.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new(
                "hsmgate_build_info",
                "Always 1; the labels say which build runs.",
            ),
            &["version"],
        )?;
        r.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let denials = counter_vec(
            &r,
            "hsmgate_denials_total",
            "Peers refused by the network policy, by listener and reason (deny list, not in the \
             listener's groups, not in a route class's groups, PROXY header refused); connections \
             and requests alike.",
            &["listener", "reason"],
        )?;
        Ok(Metrics {
            registry: r,
            connections,
            denials,
            tls_failures,
            requests,
            classes,
            rate_limited,
            listeners,
            metrics_listener,
            logins,
            attempts_left,
            guard_refusals,
            zeroizations,
            engine_state,
            engine_ops,
            engine_op_duration,
            keys,
            audit_write_failures,
            audit_head,
            acl_denials,
        })
    }

    /// The counters of listener `index` (the metrics listener when out of range).
    pub fn listener(&self, index: usize) -> &ListenerCounters {
        self.listeners.get(index).unwrap_or(&self.metrics_listener)
    }

    pub fn request(&self, class: RouteClass, method: &Method, status: u16, elapsed: Duration) {
        let ci = CLASSES.iter().position(|c| *c == class).unwrap_or(5);
        let handles = &self.classes[ci];
        handles.duration.observe(elapsed.as_secs_f64());
        let mi = method_index(method);
        match STATUSES.iter().position(|s| *s == status) {
            Some(si) => handles.requests[mi][si]
                .get_or_init(|| {
                    self.requests.with_label_values(&[
                        class_label(class),
                        METHODS[mi],
                        &STATUSES[si].to_string(),
                    ])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[class_label(class), METHODS[mi], &status.to_string()])
                .inc(),
        }
    }

    /// An access-policy refusal. Both labels are closed sets
    /// ([`crate::acl::Capability`] or `none`, [`crate::acl::DenyReason`]).
    pub fn acl_denial(&self, capability: &'static str, reason: crate::acl::DenyReason) {
        self.acl_denials
            .with_label_values(&[capability, reason.as_str()])
            .inc();
    }

    /// A 429: which class and which limit (`Limited::scope`).
    pub fn rate_limited(&self, class: RouteClass, scope: &str) {
        let ci = CLASSES.iter().position(|c| *c == class).unwrap_or(5);
        self.rate_limited[ci][scope_index(scope)].inc();
    }

    pub fn login(&self, role: Role, outcome: &str) {
        let role = match role {
            Role::CryptoOfficer => "crypto_officer",
            Role::CryptoUser => "crypto_user",
        };
        self.logins.with_label_values(&[role, outcome]).inc();
    }

    pub fn engine_op(&self, op: &'static str, key_type: &str, ok: bool, elapsed: Duration) {
        let outcome = if ok { "success" } else { "failure" };
        self.engine_ops
            .with_label_values(&[op, key_type, outcome])
            .inc();
        self.engine_op_duration
            .with_label_values(&[op, key_type])
            .observe(elapsed.as_secs_f64());
    }

    /// Reads the engine's state, counters and key inventory into gauges.
    pub fn refresh(&self, engine: &Engine, audit: &AuditLog) {
        let state = engine.state();
        // A gateway (`[upstream]`) has no engine: no state is true of it
        // (its nodes' states are theirs; the pool's gauges say who is up).
        if engine.is_absent() {
            self.engine_state.reset();
        } else {
            for s in [
                EngineState::Uninitialized,
                EngineState::Sealed,
                EngineState::Active,
                EngineState::Zeroized,
            ] {
                self.engine_state
                    .with_label_values(&[s.as_str()])
                    .set(i64::from(s == state));
            }
        }
        if let Ok(status) = engine.status() {
            // Monotonic: the durable count never decreases.
            let seen = self.zeroizations.get();
            if status.zeroizations > seen {
                self.zeroizations.inc_by(status.zeroizations - seen);
            }
            self.attempts_left.reset();
            for u in status
                .users
                .iter()
                .filter(|u| u.role == Role::CryptoOfficer)
            {
                self.attempts_left
                    .with_label_values(&[&u.username])
                    .set(i64::from(u.attempts_left));
            }
        }
        for d in crate::netfilter::deny_counts() {
            let c = self
                .denials
                .with_label_values(&[d.listener.as_str(), d.reason.as_str()]);
            let seen = c.get();
            if d.count > seen {
                c.inc_by(d.count - seen);
            }
        }
        let mut counts: HashMap<&'static str, i64> =
            KeyType::ALL.iter().map(|t| (t.as_str(), 0)).collect();
        for t in engine.key_types() {
            *counts.entry(t.as_str()).or_default() += 1;
        }
        for (t, n) in counts {
            self.keys.with_label_values(&[t]).set(n);
        }
        self.audit_head.set(audit.head().seq as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on metric families the registry
        // itself rejects at registration; an empty scrape is the fallback.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }

    /// Counts an accept verdict for a listener without cached handles.
    pub fn connection(&self, listener: &str, accepted: bool) {
        let (result, reason) = if accepted {
            ("accepted", "allowed")
        } else {
            ("denied", "security_group")
        };
        self.connections
            .with_label_values(&[listener, result, reason])
            .inc();
    }

    pub fn tls_failure(&self, listener: &str, reason: &str) {
        self.tls_failures
            .with_label_values(&[listener, reason])
            .inc();
    }
}

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics listener, when enabled.
pub async fn bind(config: &Config) -> Result<Option<TcpListener>, MetricsError> {
    if !config.metrics.enabled {
        return Ok(None);
    }
    let address = config.metrics.address;
    TcpListener::bind(address)
        .await
        .map(Some)
        .map_err(|source| MetricsError::Bind { address, source })
}

/// The networks the metrics listener admits, from its groups.
pub fn admitted(config: &Config) -> CidrSet {
    cidrs_of_groups(config, &config.metrics.security_groups)
}

/// Every network of the named security groups (prefix lists expanded):
/// the metrics listener's and the cluster port's filter.
pub fn cidrs_of_groups(config: &Config, groups: &[String]) -> CidrSet {
    CidrSet::from_nets(
        groups
            .iter()
            .filter_map(|g| config.groups.get(g))
            .flat_map(|g| g.rules.iter())
            .flat_map(|r| match &r.source {
                crate::config::RuleSource::Net(net) => vec![*net],
                crate::config::RuleSource::PrefixList(name) => config
                    .prefix_lists
                    .get(name)
                    .map(|l| l.nets.to_vec())
                    .unwrap_or_default(),
            }),
    )
}

/// Serves `GET /metrics` over plain HTTP/1.1 until `stop` fires. A peer
/// outside the metrics groups is dropped at accept, as on every listener.
pub async fn serve(
    socket: TcpListener,
    state: Arc<crate::gateway::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let peer: IpAddr = netfilter::canonical(peer.ip());
        let allowed = state.snapshot.load().metrics_filter.contains(peer);
        let counters = state.metrics.listener(usize::MAX);
        if !allowed {
            counters.denied.inc();
            drop(stream);
            tracing::debug!(%peer, "metrics connection denied by security groups");
            continue;
        }
        counters.accepted.inc();
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(
    state: &crate::gateway::AppState,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let mut resp = if req.uri().path() == "/metrics"
        && (req.method() == Method::GET || req.method() == Method::HEAD)
    {
        state.metrics.refresh(&state.engine, &state.audit);
        let mut r = Response::new(Full::new(Bytes::from(state.metrics.encode())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Vault's `GET /v1/sys/metrics?format=prometheus` on the API listener:
/// any valid session token may read it.
pub fn sys_metrics(
    call: &crate::api::Call<'_>,
) -> Result<Response<Full<Bytes>>, crate::gateway::rescue::ApiError> {
    use crate::gateway::rescue::ApiError;
    if call.method != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    call.principal()?;
    if call.query_param("format") != Some("prometheus") {
        return Err(ApiError::BadRequest(
            "only format=prometheus is supported".into(),
        ));
    }
    let state = call.state;
    state.metrics.refresh(&state.engine, &state.audit);
    let mut r = Response::new(Full::new(Bytes::from(state.metrics.encode())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_a_closed_set() {
        assert_eq!(op_label("encrypt"), "encrypt");
        assert_eq!(op_label("../../etc/passwd"), "other");
    }

    #[test]
    fn rate_limit_scopes_map_from_every_limit() {
        assert_eq!(RATE_LIMIT_SCOPES[scope_index("source")], "source");
        assert_eq!(RATE_LIMIT_SCOPES[scope_index("login-user")], "login_user");
        assert_eq!(RATE_LIMIT_SCOPES[scope_index("principal")], "principal");
        assert_eq!(RATE_LIMIT_SCOPES[scope_index("key")], "key");
        assert_eq!(
            RATE_LIMIT_SCOPES[scope_index("password-hashing")],
            "password_hashing"
        );
    }

    #[test]
    fn methods_fold_to_a_closed_set() {
        assert_eq!(METHODS[method_index(&Method::GET)], "GET");
        let list = Method::from_bytes(b"LIST").unwrap();
        assert_eq!(METHODS[method_index(&list)], "LIST");
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(METHODS[method_index(&odd)], "OTHER");
    }
}
