//! Phases 4–10 of a request: route class, the class's networks, body
//! limits, identity and dispatch — then, always, the access log.
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, Request, Response};

use super::forwarded::{self, ForwardedError};
use super::listener::ConnInfo;
use super::observe;
use super::rescue::{self, ApiError};
use super::{AppState, Snapshot};
use crate::api::{self, Call};
use crate::engine::{crypto, Channel};
use crate::netfilter::NetClass;
use crate::ratelimit;

/// Which part of the API a path belongs to; each class may demand its own
/// networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// `/v1/transit/...` and token lookups: apps.
    Transit,
    /// `/v1/hsm/login`: anyone admitted; officers only from admin networks
    /// (decided inside the engine with the network fact we pass).
    Login,
    /// The rest of `/v1/hsm/...`: admin networks only.
    Admin,
    /// `/v1/sys/health` and `/v1/hsm/openapi.json`.
    Health,
    /// `/v1/sys/metrics`: Prometheus text, with a valid token.
    Metrics,
    Unknown,
}

pub fn classify(path: &str) -> RouteClass {
    if path.starts_with("/v1/transit/") {
        RouteClass::Transit
    } else if path == "/v1/hsm/login" {
        RouteClass::Login
    } else if path == api::openapi::PATH {
        // Describes the API, holds no secret; clients read it before they
        // have credentials (src/api/openapi.rs).
        RouteClass::Health
    } else if path.starts_with("/v1/hsm/") && path != "/v1/hsm/logout" {
        RouteClass::Admin
    } else if path == "/v1/sys/health" || path == "/v1/sys/seal-status" {
        RouteClass::Health
    } else if path == "/v1/sys/unseal" {
        // Vault's unseal: no token, admin networks only.
        RouteClass::Admin
    } else if path == "/v1/sys/metrics" {
        RouteClass::Metrics
    } else if path == "/v1/auth/token/lookup-self"
        || path == "/v1/auth/token/revoke-self"
        || path == "/v1/hsm/logout"
    {
        // Token housekeeping: whoever holds a token, from wherever.
        RouteClass::Transit
    } else if path == "/v1/auth/jwt/login" {
        RouteClass::Login
    } else {
        RouteClass::Unknown
    }
}

/// Handles one request, detached from its connection (see [`detach`]).
pub fn handle(
    state: Arc<AppState>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> impl Future<Output = Response<Full<Bytes>>> + Send + 'static {
    detach(&state.clone(), handle_detached(state, conn, req))
}

/// A request's answer that cannot cut the request short: if the client
/// hangs up (hyper then drops this future), the request still runs to its
/// end — the engine call *and* its audit record — so no action can be cut
/// off from its record by a disconnect. Shutdown waits for such requests
/// ([`super::InFlight`]).
///
/// The request runs inline, polled by the connection's own task: no task
/// spawn, no copy of the (large) request future into a task cell, no
/// wake-up of another worker per request — the spawn those cost was 4% of
/// the server's CPU under Transit load (docs/BENCHMARKS.md, session 7).
/// Only when the answer is dropped before the request finished (a hang-up,
/// or dropped unpolled: a client that writes its request and hangs up at
/// once) does [`Drop`] hand the pinned, boxed request to a task of its own
/// to finish it. A request is either refused before it starts or run to
/// its end, never cut short.
///
/// A panic in a handler ends only that request: the caller gets a plain
/// 500 and the connection goes on. Must be called inside the Tokio runtime.
pub fn detach(
    state: &Arc<AppState>,
    request: impl Future<Output = Response<Full<Bytes>>> + Send + 'static,
) -> Detached {
    let guard = super::InFlight::enter(state);
    Detached::new(async move {
        let response = request.await;
        drop(guard);
        response
    })
}

/// A request, boxed and pinned where it will stay (so a hang-up can hand
/// it, half-run, to a task of its own).
type BoxedRequest = std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// The answer [`detach`] returns.
pub struct Detached {
    /// `None` once the request has finished (or panicked).
    request: Option<BoxedRequest>,
    runtime: tokio::runtime::Handle,
}

impl Detached {
    fn new(request: impl Future<Output = Response<Full<Bytes>>> + Send + 'static) -> Self {
        Detached {
            request: Some(Box::pin(request)),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl Future for Detached {
    type Output = Response<Full<Bytes>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let Some(request) = self.request.as_mut() else {
            panic!("a request's answer polled after it was given");
        };
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| request.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(response)) => {
                self.request = None;
                Poll::Ready(response)
            }
            Err(panic) => {
                // The half-run request is dropped here (its in-flight
                // guard with it), never resumed.
                self.request = None;
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!(error = %what, "request failed");
                Poll::Ready(rescue::respond(&ApiError::Internal(what), ""))
            }
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            // Nobody waits for the answer any more; the request finishes on
            // a task of its own (a panic there ends that task only).
            drop(self.runtime.spawn(request));
        }
    }
}

async fn handle_detached(
    state: Arc<AppState>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let request_id = new_request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let snapshot = state.snapshot.load_full();
    let class = classify(&path);
    let mut facts = observe::Facts::new(state.engine.state());
    let mut conn = conn;
    // Phase 4a: the effective client (a trusted proxy's word, or the peer).
    let outcome = match forwarded::effective_client(
        &snapshot.config.listeners[conn.listener],
        snapshot.netfilter.listener(conn.listener),
        &conn,
        req.headers(),
    ) {
        Ok(client) => {
            conn.client = client;
            phases(
                &state,
                &snapshot,
                &conn,
                class,
                &request_id,
                req,
                &mut facts,
            )
            .await
        }
        Err(e) => {
            tracing::info!(request_id, peer = %conn.peer, error = %e, "forwarded client refused");
            Err(match e {
                ForwardedError::ProxyRevoked => ApiError::PermissionDenied,
                other => ApiError::BadRequest(other.to_string()),
            })
        }
    };
    let guard_refused = matches!(outcome, Err(ApiError::GuardRefused(_)));
    let audit_refused = matches!(outcome, Err(ApiError::AuditUnavailable));
    if let Err(ApiError::RateLimited(limited)) = &outcome {
        state.metrics.rate_limited(class, limited.scope);
    }
    let mut response = match outcome {
        Ok(r) => r,
        Err(e) => {
            let mut r = rescue::respond(&e, &request_id);
            if matches!(e, ApiError::PermissionDenied) && !still_admitted(&snapshot, &conn) {
                // The peer lost its network since it connected: end the connection too.
                r.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            r
        }
    };
    // Phase 10, whatever happened above: audit (which may still fail an
    // admin request), metrics, access log.
    if let Err(e) = observe::record(
        &state,
        &conn,
        class,
        &method,
        &path,
        &request_id,
        &facts,
        response.status().as_u16(),
        guard_refused,
    )
    .await
    {
        // A request refused because the log is failing keeps its 503.
        if !audit_refused {
            response = rescue::respond(&e, &request_id);
        }
    }
    let elapsed = started.elapsed();
    state
        .metrics
        .request(class, &method, response.status().as_u16(), elapsed);
    observe::observe(&state, class, &facts, response.status().as_u16(), elapsed);
    if let Ok(v) = header::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        target: "hsmgate::access",
        request_id,
        peer = %conn.peer,
        client = %conn.client,
        listener = conn.listener,
        %method,
        path,
        class = ?class,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
    );
    response
}

/// Whether the connection would still be admitted by this snapshot (else a
/// denial also closes it): the peer as a trusted proxy or by the groups, and
/// a client named by a PROXY header by the groups.
fn still_admitted(snapshot: &Snapshot, conn: &ConnInfo) -> bool {
    let filter = snapshot.netfilter.listener(conn.listener);
    let peer_ok =
        filter.is_trusted_proxy(conn.peer, conn.port) || filter.may_connect(conn.peer, conn.port);
    peer_ok && (!conn.proxied || filter.may_connect(conn.client, conn.port))
}

async fn phases(
    state: &Arc<AppState>,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    class: RouteClass,
    request_id: &str,
    req: Request<Incoming>,
    facts: &mut observe::Facts,
) -> Result<Response<Full<Bytes>>, ApiError> {
    // The connection was admitted at accept time; a reload may have revoked
    // the peer since. Re-check against this request's snapshot.
    // Then the route class's own groups: admin routes judge the TCP peer
    // alone (never a forwarded address); the other classes the effective
    // client (the peer unless a trusted proxy named another).
    let filter = snapshot.netfilter.listener(conn.listener);
    let judged = if class == RouteClass::Admin {
        conn.peer
    } else {
        conn.client
    };
    let net_class = match class {
        RouteClass::Transit => Some(NetClass::Transit),
        RouteClass::Login => Some(NetClass::Login),
        RouteClass::Admin => Some(NetClass::Admin),
        RouteClass::Health => Some(NetClass::Health),
        // Vault's token-protected metrics path: the app networks, plus a token.
        RouteClass::Metrics => Some(NetClass::Transit),
        RouteClass::Unknown => None,
    };
    match net_class {
        Some(net_class) => filter
            .check_class(net_class, judged, conn.port)
            .map_err(|_| ApiError::PermissionDenied)?,
        None => {
            filter
                .check_connect(judged, conn.port)
                .map_err(|_| ApiError::PermissionDenied)?;
            return Err(ApiError::NotFound);
        }
    }
    // Break-glass is a door for administrators, not a second app endpoint.
    if conn.channel == Channel::BreakGlass
        && matches!(class, RouteClass::Transit | RouteClass::Metrics)
    {
        return Err(ApiError::PermissionDenied);
    }
    // Crypto-officer logins: the TCP peer alone, like admin routes.
    let is_admin_network = filter.is_admin(conn.peer, conn.port);
    // Phase 5: rate limits before identity, per source network and class.
    // (Phase 7, per principal and key, runs where identity is established:
    // `api::Call::principal`.)
    let limiters = state.fence.limiters(&snapshot.config.limits.rate);
    let limit_class = match class {
        RouteClass::Transit => ratelimit::Class::Transit,
        RouteClass::Login => ratelimit::Class::Login,
        RouteClass::Admin => ratelimit::Class::Admin,
        RouteClass::Health | RouteClass::Metrics | RouteClass::Unknown => ratelimit::Class::Health,
    };
    limiters
        .check_source(judged, limit_class)
        .map_err(ApiError::RateLimited)?;
    // Only what `api::openapi::ROUTES` lists is dispatched: a handler arm
    // the table (and so the OpenAPI document) lacks is unreachable.
    match api::openapi::lookup(req.method().as_str(), req.uri().path()) {
        api::openapi::Lookup::Route(_) => {}
        api::openapi::Lookup::WrongMethod => return Err(ApiError::MethodNotAllowed),
        api::openapi::Lookup::Missing => return Err(ApiError::NotFound),
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, snapshot.config.limits.max_body_bytes).await?;
    facts.learn(state, class, &parts, &body);
    // No unaudited admin action: while the audit log cannot be written,
    // admin requests and logins are refused before they act.
    if matches!(class, RouteClass::Login | RouteClass::Admin) && !state.audit.healthy() {
        // Try once to write the `audit.resumed` record: if the fault has
        // cleared, this request goes on and the gap is in the chain.
        let audit = state.audit.clone();
        let recovered = tokio::task::spawn_blocking(move || audit.recover())
            .await
            .unwrap_or(false);
        if !recovered {
            state.metrics.audit_write_failures.inc();
            return Err(ApiError::AuditUnavailable);
        }
    }
    // A gateway (`[upstream]`): everything past the fence is the nodes'
    // (identity, access policies, the engine, the login guard).
    if let Some(pool) = &state.upstream {
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        return pool
            .forward(&parts.method, target, &parts.headers, body, conn.client)
            .await;
    }
    let call = Call {
        state,
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body,
        conn: conn.clone(),
        is_admin_network,
        request_id,
        limiters,
        jwt: &snapshot.config.jwt,
        acl: &snapshot.config.acl,
        acl_denial: std::sync::Mutex::new(None),
        certs: &snapshot.config.cert_principals,
    };
    let result = match class {
        _ if api::auth::owns(call.path) => api::auth::handle(&call).await,
        RouteClass::Transit if call.path.starts_with("/v1/transit/") => {
            api::transit::handle(&call).await
        }
        RouteClass::Transit => api::sys::lookup_self(&call),
        RouteClass::Admin if call.path == "/v1/sys/unseal" => api::seal::sys_unseal(&call).await,
        RouteClass::Login | RouteClass::Admin => api::hsm::handle(&call).await,
        RouteClass::Health if call.path == api::openapi::PATH => api::openapi::handle(&call),
        RouteClass::Health if call.path == "/v1/sys/seal-status" => {
            api::seal::sys_seal_status(&call)
        }
        RouteClass::Health => api::sys::health(&call),
        RouteClass::Metrics => crate::metrics::sys_metrics(&call),
        RouteClass::Unknown => Err(ApiError::NotFound),
    };
    let denial = call
        .acl_denial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(denial) = denial {
        facts.acl_denied(denial);
    }
    result
}

pub(crate) async fn read_body(
    body: Incoming,
    headers: &hyper::HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(_) => Err(ApiError::BadRequest(
            "failed to read the request body".into(),
        )),
    }
}

/// A UUID-shaped random id (Vault's `request_id` format).
pub(crate) fn new_request_id() -> String {
    /// Random bytes for request ids, drawn from the system CSPRNG 64 ids at
    /// a time: one 16-byte draw per request cost more than the id was
    /// worth (1.5% of the server's CPU under Transit load, with the
    /// formatting another 1.5%; docs/BENCHMARKS.md, session 7). Ids are
    /// unique and unpredictable, not secret.
    struct Pool {
        bytes: [u8; 1024],
        used: usize,
    }
    thread_local! {
        static POOL: std::cell::RefCell<Pool> =
            const { std::cell::RefCell::new(Pool { bytes: [0; 1024], used: 1024 }) };
    }
    let mut id = [0u8; 16];
    POOL.with_borrow_mut(|pool| {
        if pool.used == pool.bytes.len() {
            if crypto::fill_random(&mut pool.bytes).is_err() {
                pool.bytes = [0; 1024];
            }
            pool.used = 0;
        }
        id.copy_from_slice(&pool.bytes[pool.used..pool.used + 16]);
        // Used bytes are not kept around.
        pool.bytes[pool.used..pool.used + 16].fill(0);
        pool.used += 16;
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(36);
    for (i, byte) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push(HEX[usize::from(byte >> 4)] as char);
        text.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose answer is dropped — unpolled, or after its first
    /// step — still runs to its end (on a task of its own); one whose
    /// answer is awaited runs inline and answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_answer_does_not_cut_its_request_short() {
        let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let request = |gate: Option<tokio::sync::oneshot::Receiver<()>>| {
            let finished = finished.clone();
            async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                rescue::empty_response(hyper::StatusCode::NO_CONTENT)
            }
        };
        // Allow: awaited, it answers.
        let answer = Detached::new(request(None)).await;
        assert_eq!(answer.status(), hyper::StatusCode::NO_CONTENT);
        // Dropped before its first poll.
        drop(Detached::new(request(None)));
        // Dropped while it waits half-way.
        let (open, gate) = tokio::sync::oneshot::channel();
        let mut answer = Detached::new(request(Some(gate)));
        let polled = futures_poll_once(&mut answer).await;
        assert!(polled.is_none(), "the request waits for its gate");
        drop(answer);
        open.send(()).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while finished.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            assert!(
                Instant::now() < deadline,
                "a dropped request never finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A panicking handler ends its own request with a 500; the caller
    /// (the connection) goes on.
    #[tokio::test]
    async fn a_panicking_request_answers_500() {
        let answer = Detached::new(async {
            if std::hint::black_box(true) {
                panic!("handler bug");
            }
            rescue::empty_response(hyper::StatusCode::OK)
        })
        .await;
        assert_eq!(answer.status(), hyper::StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// Polls `fut` once; `Some` if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    /// UUID-shaped (8-4-4-4-12 lowercase hex) and never repeated, across
    /// several refills of the per-thread pool (64 ids each).
    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let ids: Vec<String> = (0..1000).map(|_| new_request_id()).collect();
        for id in &ids {
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{id}"
            );
            assert!(
                id.bytes()
                    .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Not all zero (a failed draw would give zeros).
        assert!(ids
            .iter()
            .any(|id| id.bytes().any(|b| b != b'0' && b != b'-')));
    }

    #[test]
    fn classes() {
        assert_eq!(classify("/v1/transit/encrypt/k"), RouteClass::Transit);
        assert_eq!(classify("/v1/hsm/login"), RouteClass::Login);
        assert_eq!(classify("/v1/hsm/login/"), RouteClass::Admin);
        assert_eq!(classify("/v1/hsm/init"), RouteClass::Admin);
        assert_eq!(classify("/v1/hsm/zeroize"), RouteClass::Admin);
        assert_eq!(classify("/v1/hsm/openapi.json"), RouteClass::Health);
        assert_eq!(classify("/v1/hsm/openapi.json/"), RouteClass::Admin);
        assert_eq!(classify("/v1/sys/health"), RouteClass::Health);
        assert_eq!(classify("/v1/sys/seal-status"), RouteClass::Health);
        assert_eq!(classify("/v1/sys/unseal"), RouteClass::Admin);
        assert_eq!(classify("/v1/hsm/unseal"), RouteClass::Admin);
        assert_eq!(classify("/v1/sys/metrics"), RouteClass::Metrics);
        assert_eq!(classify("/v1/transitx"), RouteClass::Unknown);
        assert_eq!(classify("/v1/auth/jwt/login"), RouteClass::Login);
        assert_eq!(classify("/v1/hsm/logout"), RouteClass::Transit);
        assert_eq!(classify("/v1/auth/token/revoke-self"), RouteClass::Transit);
        assert_eq!(classify("/"), RouteClass::Unknown);
    }
}
