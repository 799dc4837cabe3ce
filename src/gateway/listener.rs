//! Phases 1–3 for one listener: accept, network check, TLS, HTTP.
//!
//! A peer outside the listener's security groups is dropped right after
//! `accept`: no TLS byte is read or written, no HTTP is parsed.
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

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
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What a request knows about the connection it came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The TCP peer (IPv4-mapped IPv6 already folded to IPv4).
    pub peer: IpAddr,
    /// Index into the snapshot's listeners.
    pub listener: usize,
    pub channel: Channel,
}

pub async fn serve(
    index: usize,
    socket: TcpListener,
    state: Arc<AppState>,
    acceptor: TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
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
        if !snapshot.netfilter.listener(index).may_connect(peer) {
            // Phase 1 deny: close before any byte either way.
            drop(stream);
            counters.denied.inc();
            tracing::debug!(%peer, listener = index, "connection denied by security groups");
            continue;
        }
        let limits = snapshot.config.limits.clone();
        let channel = snapshot.config.listeners[index].channel;
        drop(snapshot);
        counters.accepted.inc();
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let conn_info = ConnInfo {
            peer,
            listener: index,
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
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(router::handle(state, conn_info, req).await) }
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
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
}
