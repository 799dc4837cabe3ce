//! DANGER: a benchmark-only listener that serves the Transit API WITHOUT
//! THE FENCE. Never enable it on a machine that holds real keys.
//!
//! It exists so that `benches/run.sh` (`BENCH=peer`) can put another fence
//! (nginx, haproxy: TLS, allow/deny, limit_req) in front of hsmgate's engine
//! and compare that stack with hsmgate's own fenced listener, same engine,
//! same process, same run.
//!
//! Off by default. Enabled only by `[bench] dangerous_unfenced_listener =
//! "127.0.0.1:PORT"`, which config validation accepts only on loopback
//! (`config::bench_section`); the accept loop also drops any peer that is
//! not loopback. At start it logs a warning and prints a line saying what
//! it is. It is NOT the cluster port and serves nothing but Transit.
//!
//! What it skips, per request: TLS (plain HTTP/1.1), security groups and
//! deny lists (at accept and per request), route-class groups, trusted
//! proxies, the per-source rate limits (phase 5), connection caps and the
//! idle timeout, and access policies (phase 8: ACLs are treated as absent).
//! What it keeps, because it is the engine's work rather than the fence's:
//! the token check (phase 6; a crypto user's session or an app JWT), the
//! per-principal and per-key limiter lookups inside `Call::principal`
//! (phase 7; with limits above the offered load they only cost a lookup),
//! the Transit handlers and engine, the body size limit, the audit record,
//! metrics and the access-log line (phase 10).
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::listener::ConnInfo;
use super::rescue::{self, ApiError};
use super::router::{self, RouteClass};
use super::{observe, AppState};
use crate::api::{self, Call};
use crate::engine::Channel;
use crate::netfilter;

/// Logged (warn) and printed (stderr) when the listener starts.
pub const WARNING: &str = "DANGER: [bench] dangerous_unfenced_listener is set: a plain-HTTP \
     listener serves Transit WITHOUT the fence (no TLS, no security groups or deny lists, no \
     source rate limits, no access policies). Benchmark use only; never with real keys.";

/// The name in access-log lines.
const NAME: &str = "dangerous-unfenced-bench";

/// Serves until `stop` changes.
pub async fn serve(socket: TcpListener, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let port = socket.local_addr().map_or(0, |a| a.port());
    tracing::warn!(address = ?socket.local_addr().ok(), "{WARNING}");
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "{NAME}: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let peer = netfilter::canonical(peer.ip());
        // The config only binds loopback; this is the second lock.
        if !peer.is_loopback() {
            drop(stream);
            tracing::warn!(%peer, "{NAME}: non-loopback peer dropped");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                // Detached like the gateway's requests: a hang-up cannot cut
                // a key rotation off from its audit record.
                let answer = router::detach(&state, handle(state.clone(), peer, port, req));
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "{NAME}: connection ended with an error");
            }
        });
    }
}

async fn handle(
    state: Arc<AppState>,
    peer: IpAddr,
    port: u16,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let request_id = router::new_request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let conn = ConnInfo {
        peer,
        client: peer,
        proxied: false,
        cert: None,
        // No configured listener: an index nothing can look up.
        listener: usize::MAX,
        port,
        channel: Channel::FrontDoor,
    };
    let mut facts = observe::Facts::new(state.engine.state());
    let outcome = transit(&state, &conn, &request_id, req, &mut facts).await;
    let mut response = match outcome {
        Ok(r) => r,
        Err(e) => rescue::respond(&e, &request_id),
    };
    let class = RouteClass::Transit;
    if let Err(e) = observe::record(
        &state,
        &conn,
        class,
        &method,
        &path,
        &request_id,
        &facts,
        response.status().as_u16(),
        false,
    )
    .await
    {
        response = rescue::respond(&e, &request_id);
    }
    let elapsed = started.elapsed();
    state
        .metrics
        .request(class, &method, response.status().as_u16(), elapsed);
    observe::observe(&state, class, &facts, response.status().as_u16(), elapsed);
    tracing::info!(
        target: "hsmgate::access",
        request_id,
        peer = %conn.peer,
        listener = NAME,
        %method,
        path,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
    );
    response
}

/// Transit only: `/v1/transit/*` routes of the route table, nothing else.
async fn transit(
    state: &Arc<AppState>,
    conn: &ConnInfo,
    request_id: &str,
    req: Request<hyper::body::Incoming>,
    facts: &mut observe::Facts,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if !req.uri().path().starts_with("/v1/transit/") {
        return Err(ApiError::NotFound);
    }
    match api::openapi::lookup(req.method().as_str(), req.uri().path()) {
        api::openapi::Lookup::Route(_) => {}
        api::openapi::Lookup::WrongMethod => return Err(ApiError::MethodNotAllowed),
        api::openapi::Lookup::Missing => return Err(ApiError::NotFound),
    }
    if req.method() != Method::POST && req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    let snapshot = state.snapshot.load_full();
    let (parts, body) = req.into_parts();
    let body =
        router::read_body(body, &parts.headers, snapshot.config.limits.max_body_bytes).await?;
    facts.learn(state, RouteClass::Transit, &parts, &body);
    // Access policies treated as absent: that is the point of this door.
    let no_acl = crate::acl::Acl::default();
    let call = Call {
        state,
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body,
        conn: conn.clone(),
        is_admin_network: false,
        request_id,
        limiters: state.fence.limiters(&snapshot.config.limits.rate),
        jwt: &snapshot.config.jwt,
        acl: &no_acl,
        acl_denial: std::sync::Mutex::new(None),
        certs: &snapshot.config.cert_principals,
    };
    api::transit::handle(&call).await
}
