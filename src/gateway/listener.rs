//! Phases 1–3 for one listener: accept, network check, PROXY header, TLS,
//! HTTP.
//!
//! A peer outside the listener's security groups (and not one of its
//! trusted proxies) is dropped right after `accept`: no TLS byte is read or
//! written, no HTTP is parsed. So is a peer over the connection caps (per
//! source network and in all; see [`crate::ratelimit`]).
//!
//! On a `proxy_protocol` listener, a trusted proxy must open with a PROXY
//! v1/v2 header (read with a timeout and a size bound, before TLS); the
//! client it names is then judged by the deny lists and groups like a direct
//! peer. Anyone else who opens with a PROXY header is refused: a peer does
//! not get to choose its own address. An admitted connection is closed when no request
//! has been in flight for the idle timeout (HTTP/2 would otherwise hold an
//! idle connection, and its slot under the caps, forever).
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::proxy_protocol::{self, Header};
use super::{router, AppState};
use crate::auth::ClientCert;
use crate::config::Forwarded;
use crate::engine::Channel;
use crate::netfilter::{self, DenyReason};

/// How long in-flight requests get after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What a request knows about the connection it came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer (IPv4-mapped IPv6 already folded to IPv4). Admin routes,
    /// crypto-officer logins and break-glass judge this address alone.
    pub peer: IpAddr,
    /// The effective client: the TCP peer, or the client a trusted proxy
    /// named (PROXY header at connect; `X-Forwarded-For` per request, set by
    /// `gateway::router` from `gateway::forwarded`). Security groups,
    /// route-class groups and rate limits judge this one.
    pub client: IpAddr,
    /// Whether `client` came from a trusted proxy's PROXY header (re-checked
    /// per request: the proxy may have been revoked since).
    pub proxied: bool,
    /// The verified client certificate (mutual TLS), if one was presented.
    pub cert: Option<Arc<ClientCert>>,
    /// Index into the snapshot's listeners.
    pub listener: usize,
    /// The listener's bound port, for port-range rules (known only after
    /// bind when the config says port 0).
    pub port: u16,
    pub channel: Channel,
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

/// Marks one request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn last(&self) -> Instant {
        // Poisoning cannot leave an Instant half-written.
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When to look again: a busy connection cannot go idle before its
    /// requests end, so it is looked at one full period later.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            Instant::now() + idle
        } else {
            self.last() + idle
        }
    }

    fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.last().elapsed() >= idle
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub async fn serve(
    index: usize,
    socket: TcpListener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let port = socket.local_addr().map_or(0, |a| a.port());
    // Resolved once: the accept loop only bumps atomics.
    let counters = state.metrics.listener(index).clone();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            a = socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let peer = netfilter::canonical(peer.ip());
        let snapshot = state.snapshot.load();
        let filter = snapshot.netfilter.listener(index);
        // Phase 1: deny lists, then trusted proxies and security groups.
        // Denials are counted and summarised per source by netfilter (no
        // log line per connection).
        if let Err(reason) = filter.check_accept(peer, port) {
            // Close before any byte either way.
            drop(stream);
            counters.denied.inc();
            tracing::trace!(%peer, listener = index, %reason, "connection denied");
            continue;
        }
        let proxy_protocol = snapshot.config.listeners[index].forwarded == Forwarded::ProxyProtocol;
        let from_proxy = proxy_protocol && filter.is_trusted_proxy(peer, port);
        // A PROXY connection's slot is keyed by the client it names, taken
        // once the header is read; every other connection's by its peer.
        let slot = if from_proxy {
            None
        } else {
            match state
                .fence
                .open_connection(peer, &snapshot.config.limits.rate)
            {
                Ok(slot) => Some(slot),
                Err(cap) => {
                    drop(stream);
                    counters.capped.inc();
                    tracing::debug!(%peer, listener = index, cap, "connection refused: connection cap");
                    continue;
                }
            }
        };
        let limits = snapshot.config.limits.clone();
        let channel = snapshot.config.listeners[index].channel;
        // The TLS config of the snapshot that admitted the peer: a reloaded
        // certificate serves every handshake after the swap.
        let acceptor = TlsAcceptor::from(snapshot.tls[index].clone());
        drop(snapshot);
        counters.accepted.inc();
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let watcher = graceful.watcher();
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let mut client = peer;
            let mut proxied = false;
            let slot = if from_proxy {
                match proxy_header(&state, index, port, peer, &mut stream, &limits).await {
                    Some((named, slot)) => {
                        proxied = named != peer;
                        client = named;
                        slot
                    }
                    None => {
                        counters.proxy_denied.inc();
                        return;
                    }
                }
            } else {
                // On a PROXY listener, a direct client is judged as itself;
                // one that opens with a PROXY header is claiming an address
                // it may not claim. (A TLS ClientHello starts with 0x16.)
                if proxy_protocol {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(
                        limits.tls_handshake_timeout,
                        stream.peek(&mut first),
                    )
                    .await
                    {
                        Ok(Ok(1)) if matches!(first[0], b'P' | b'\r') => {
                            state
                                .snapshot
                                .load()
                                .netfilter
                                .listener(index)
                                .count_denial(peer, DenyReason::ProxyHeaderUntrusted);
                            counters.proxy_denied.inc();
                            tracing::debug!(%peer, "PROXY header from an untrusted peer: refused");
                            return;
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            counters.tls_timeout.inc();
                            return;
                        }
                    }
                }
                // Set above whenever `from_proxy` is false.
                slot
            };
            let tls =
                match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        counters.tls_failed.inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        counters.tls_timeout.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            // Verified by rustls against the listener's client_ca; read once.
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| ClientCert::from_der(leaf.as_ref()))
                .map(Arc::new);
            let conn_info = ConnInfo {
                peer,
                client,
                proxied,
                cert,
                listener: index,
                port,
                channel,
            };
            let activity = Arc::new(Activity::new());
            let service_activity = activity.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                let conn_info = conn_info.clone();
                let busy = service_activity.begin();
                // Counted in flight now: dropped by hyper, even unpolled, the
                // request still runs to its end (see `router::detach`).
                let answer = router::handle(state, conn_info, req);
                async move {
                    let response = answer.await;
                    drop(busy);
                    Ok::<_, Infallible>(response)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                // hyper refuses buffers under 8 KiB.
                .max_buf_size(limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(limits.max_header_bytes as u32);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            let conn = watcher.watch(conn);
            tokio::pin!(conn);
            let idle = limits.rate.connections.idle_timeout;
            loop {
                let deadline = activity.idle_deadline(idle);
                tokio::select! {
                    result = &mut conn => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        if activity.is_idle(idle) {
                            tracing::debug!(%peer, "idle connection closed");
                            break;
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
}

/// Reads a trusted proxy's PROXY header and judges the client it names by
/// the listener's deny lists and groups, then takes that client's connection
/// slot. `None`: refused (counted with its reason); the caller closes.
async fn proxy_header(
    state: &AppState,
    index: usize,
    port: u16,
    peer: IpAddr,
    stream: &mut tokio::net::TcpStream,
    limits: &crate::config::Limits,
) -> Option<(IpAddr, Option<crate::ratelimit::ConnectionSlot>)> {
    let header = proxy_protocol::read_header(stream, limits.tls_handshake_timeout).await;
    let snapshot = state.snapshot.load();
    let filter = snapshot.netfilter.listener(index);
    let client = match header {
        Ok(Header::Proxied { source, .. }) => netfilter::canonical(source.ip()),
        // LOCAL / UNKNOWN: the proxy's own connection (health checks).
        Ok(Header::Local) => peer,
        Err(e) => {
            filter.count_denial(peer, DenyReason::ProxyHeaderInvalid);
            tracing::debug!(%peer, error = %e, "trusted proxy sent no valid PROXY header: refused");
            return None;
        }
    };
    // The named client passes the same connect check a direct peer does,
    // before any TLS byte.
    if let Err(reason) = filter.check_connect(client, port) {
        tracing::trace!(%peer, %client, listener = index, %reason, "proxied client denied");
        return None;
    }
    match state
        .fence
        .open_connection(client, &snapshot.config.limits.rate)
    {
        Ok(slot) => Some((client, Some(slot))),
        Err(cap) => {
            tracing::debug!(%peer, %client, cap, "proxied connection refused: connection cap");
            None
        }
    }
}
