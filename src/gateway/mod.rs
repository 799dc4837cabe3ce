//! The gateway: listeners, TLS, HTTP, and the request phases.
//!
//! - [`listener`]: accept → network check (phase 1) → TLS (2) → HTTP (3).
//! - [`router`]: per request, phases 4–10 (route class, class networks,
//!   limits, identity, dispatch, access log).
//! - [`observe`]: phase 10's audit record and metrics for each request.
//! - [`rescue`]: errors → HTTP responses, in one place.
//! - [`tls`]: the certificate and rustls config.
pub mod listener;
pub mod observe;
pub mod rescue;
pub mod router;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::audit::{AuditError, AuditLog, Event, Outcome};
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::metrics::{Metrics, MetricsError};
use crate::netfilter::{CidrSet, Netfilter};

/// One immutable view of the configuration. A request loads it once, so a
/// reload never changes the rules under a request in flight.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub netfilter: Netfilter,
    /// Who may connect to the metrics listener.
    pub metrics_filter: CidrSet,
}

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        let netfilter = Netfilter::build(&config);
        let metrics_filter = crate::metrics::admitted(&config);
        Snapshot {
            config: Arc::new(config),
            netfilter,
            metrics_filter,
        }
    }
}

/// What every connection and request shares.
pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub engine: Arc<Engine>,
    /// Rate-limit counters and open connections: they outlive snapshots.
    pub fence: Arc<crate::ratelimit::Fence>,
    /// The hash-chained audit log (phase 10).
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    #[error("binding listener {name} on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound, not yet running, server.
pub struct Server {
    state: Arc<AppState>,
    cert: tls::ServerCert,
    listeners: Vec<(usize, TcpListener)>,
    metrics_listener: Option<TcpListener>,
}

impl Server {
    /// Opens the engine, loads or generates the certificate and binds every
    /// listener. Nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let data_dir = config.data_dir.clone();
        let engine_config = config.engine.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::open(&data_dir, engine_config))
            .await
            .map_err(|e| EngineError::Internal(format!("engine open task: {e}")))??;
        let audit_path = config.audit.log_path(&config.data_dir);
        let audit_config = config.audit.clone();
        let audit = tokio::task::spawn_blocking(move || AuditLog::open(&audit_path, &audit_config))
            .await
            .map_err(|e| EngineError::Internal(format!("audit open task: {e}")))??;
        let metrics = Metrics::new(&config)?;
        let cert = tls::load_or_generate(&config)?;
        let metrics_listener = crate::metrics::bind(&config).await?;
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let socket = TcpListener::bind(l.address)
                .await
                .map_err(|source| ServeError::Bind {
                    name: l.name.clone(),
                    address: l.address,
                    source,
                })?;
            listeners.push((i, socket));
        }
        let fence = Arc::new(crate::ratelimit::Fence::new(&config.limits.rate));
        Ok(Server {
            state: Arc::new(AppState {
                fence,
                snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
                engine: Arc::new(engine),
                audit: Arc::new(audit),
                metrics: Arc::new(metrics),
            }),
            cert,
            listeners,
            metrics_listener,
        })
    }

    /// The bound addresses, by listener name (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let snap = self.state.snapshot.load();
        self.listeners
            .iter()
            .filter_map(|(i, l)| {
                let name = snap.config.listeners[*i].name.clone();
                l.local_addr().ok().map(|a| (name, a))
            })
            .collect()
    }

    /// The metrics listener's bound address (plain HTTP), when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.state.engine.clone()
    }

    pub fn certificate(&self) -> &tls::ServerCert {
        &self.cert
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives
    /// in-flight requests a grace period to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let sweeper = {
            let state = self.state.clone();
            tokio::spawn(crate::ratelimit::sweep_forever(
                state.fence.clone(),
                move || state.snapshot.load().config.limits.rate.sweep_interval,
            ))
        };
        let start = Event::new("server.start", Outcome::Success)
            .detail("engine_state", self.state.engine.state().as_str())
            .detail("version", env!("CARGO_PKG_VERSION"));
        audit_local(&self.state, start).await;
        if let Some(socket) = self.metrics_listener {
            tasks.spawn(crate::metrics::serve(
                socket,
                self.state.clone(),
                stop_rx.clone(),
            ));
        }
        {
            let interval = self.state.audit.flush_interval();
            let audit = self.state.audit.clone();
            let metrics = self.state.metrics.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {}
                    }
                    let audit = audit.clone();
                    let flushed = tokio::task::spawn_blocking(move || audit.flush()).await;
                    if !matches!(flushed, Ok(Ok(()))) {
                        metrics.audit_write_failures.inc();
                        tracing::error!("audit log: timed flush (sync and head checkpoint) failed");
                    }
                }
            });
        }
        if self.state.engine.config().backup.schedule_dir.is_some() {
            let state = self.state.clone();
            let interval = state.engine.config().backup.schedule_interval;
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(interval);
                // The first tick fires at once: the first backup is one
                // interval after start.
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {}
                    }
                    let engine = state.engine.clone();
                    let done = tokio::task::spawn_blocking(move || engine.scheduled_backup()).await;
                    let event = match done {
                        Ok(Ok(Some(path))) => Event::new("backup.scheduled", Outcome::Success)
                            .detail("file", path.display().to_string()),
                        Ok(Ok(None)) => continue,
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "scheduled backup failed");
                            Event::new("backup.scheduled", Outcome::Error)
                                .detail("error", e.to_string())
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "scheduled backup task failed");
                            Event::new("backup.scheduled", Outcome::Error)
                        }
                    };
                    audit_local(&state, event).await;
                }
            });
        }
        for (index, socket) in self.listeners {
            let state = self.state.clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(self.cert.server_config());
            let stop = stop_rx.clone();
            tasks.spawn(listener::serve(index, socket, state, acceptor, stop));
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        sweeper.abort();
        // After the drain: every request's record is written; sync them all.
        let state = self.state.clone();
        audit_local(&state, Event::new("server.stop", Outcome::Success)).await;
        let flushed = tokio::task::spawn_blocking(move || state.audit.flush()).await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::error!("audit log: final sync failed");
        }
    }
}

/// Records a server-side event (no peer, no actor).
async fn audit_local(state: &AppState, event: Event) {
    let audit = state.audit.clone();
    let written = tokio::task::spawn_blocking(move || audit.append(event)).await;
    if !matches!(written, Ok(Ok(_))) {
        state.metrics.audit_write_failures.inc();
        tracing::error!("audit log: could not record a server event");
    }
}
