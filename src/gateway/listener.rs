//! Phases 1–3 for one listener: accept, network check, TLS, HTTP.
//!
//! A peer outside the listener's security groups is dropped right after
//! `accept`: no TLS byte is read or written, no HTTP is parsed. So is a peer
//! over the connection caps (per source network and in all; see
//! [`crate::ratelimit`]). An admitted connection is closed when no request
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

use super::{router, AppState};
use crate::engine::Channel;
use crate::netfilter;

/// How long in-flight requests get after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What a request knows about the connection it came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The TCP peer (IPv4-mapped IPv6 already folded to IPv4).
    pub peer: IpAddr,
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
        // Phase 1: deny lists, then security groups. Denials are counted and
        // summarised per source by netfilter (no log line per connection).
        if let Err(reason) = snapshot.netfilter.listener(index).check_connect(peer, port) {
            // Close before any byte either way.
            drop(stream);
            counters.denied.inc();
            tracing::trace!(%peer, listener = index, %reason, "connection denied");
            continue;
        }
        let slot = match state
            .fence
            .open_connection(peer, &snapshot.config.limits.rate)
        {
            Ok(slot) => slot,
            Err(cap) => {
                drop(stream);
                counters.capped.inc();
                tracing::debug!(%peer, listener = index, cap, "connection refused: connection cap");
                continue;
            }
        };
        let limits = snapshot.config.limits.clone();
        let channel = snapshot.config.listeners[index].channel;
        // The TLS config of the snapshot that admitted the peer: a reloaded
        // certificate serves every handshake after the swap.
        let acceptor = TlsAcceptor::from(snapshot.tls.clone());
        drop(snapshot);
        counters.accepted.inc();
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let conn_info = ConnInfo {
            peer,
            listener: index,
            port,
            channel,
        };
        let watcher = graceful.watcher();
        let counters = counters.clone();
        tokio::spawn(async move {
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
            let activity = Arc::new(Activity::new());
            let service_activity = activity.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                let busy = service_activity.begin();
                async move {
                    let response = router::handle(state, conn_info, req).await;
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
