//! The gateway: listeners, TLS, HTTP, and the request phases.
//!
//! - [`listener`]: accept → network check (phase 1) → TLS (2) → HTTP (3).
//! - [`router`]: per request, phases 4–10 (route class, class networks,
//!   limits, identity, dispatch, access log).
//! - [`observe`]: phase 10's audit record and metrics for each request.
//! - [`rescue`]: errors → HTTP responses, in one place.
//! - [`tls`]: the certificate and rustls config (per listener: mutual TLS).
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header parser.
//! - [`forwarded`]: who the client is when a trusted proxy says so.
//! - [`reload`]: the config lifecycle after start (SIGHUP, file changes).
//! - [`dangerous_unfenced_bench`]: DANGER, benchmark only, off by default: a
//!   loopback plain-HTTP door to Transit without the fence (`[bench]`).
pub mod dangerous_unfenced_bench;
pub mod forwarded;
pub mod listener;
pub mod observe;
pub mod proxy_protocol;
pub mod reload;
pub mod rescue;
pub mod router;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::audit::{AuditError, AuditLog, Event, Outcome};
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::metrics::{Metrics, MetricsError};
use crate::netfilter::{CidrSet, Netfilter};

/// One immutable view of the configuration. A request loads it once, so a
/// reload never changes the rules under a request in flight. Anything built
/// from the config tree belongs here, so a reload swaps it with the rest
/// (see [`reload`]).
pub struct Snapshot {
    pub config: Arc<Config>,
    pub netfilter: Netfilter,
    /// Who may connect to the metrics listener.
    pub metrics_filter: CidrSet,
    /// Each listener's rustls config (same order as `config.listeners`):
    /// the server certificate, plus a client verifier where `client_ca` is
    /// set. Each accepted connection takes the one of the snapshot that
    /// admitted it, so a reloaded certificate or client CA serves the next
    /// handshake.
    pub tls: Vec<Arc<rustls::ServerConfig>>,
    /// SHA-256 of the config tree this snapshot was built from.
    pub digest: reload::ConfigDigest,
}

impl Snapshot {
    /// Builds the netfilter tries and each listener's TLS config (reading
    /// its client CA file) from `config`, over the server certificate's
    /// config `base_tls`.
    pub fn new(
        config: Config,
        base_tls: Arc<rustls::ServerConfig>,
        digest: reload::ConfigDigest,
    ) -> Result<Snapshot, tls::TlsError> {
        let tls = config
            .listeners
            .iter()
            .map(|l| tls::listener_server_config(&base_tls, l.client_auth.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let netfilter = Netfilter::build(&config);
        let metrics_filter = crate::metrics::admitted(&config);
        Ok(Snapshot {
            config: Arc::new(config),
            netfilter,
            metrics_filter,
            tls,
            digest,
        })
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
    /// Requests being handled (detached from their connections): shutdown
    /// waits for them before the last audit records.
    pub in_flight: InFlight,
    /// This node's cluster, when `[cluster]` is configured.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The engine nodes this gateway forwards to, when `[upstream]` is
    /// configured (then `engine` is [`Engine::absent`]).
    pub upstream: Option<Arc<crate::upstream::Pool>>,
}

/// Counts requests in flight; [`InFlight::idle`] waits until none is.
#[derive(Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request in flight, until dropped.
pub struct InFlightGuard(Arc<AppState>);

impl InFlight {
    pub fn enter(state: &Arc<AppState>) -> InFlightGuard {
        state
            .in_flight
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlightGuard(state.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a decrement in between wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let left = self
            .0
            .in_flight
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if left == 1 {
            self.0.in_flight.idle.notify_waiters();
        }
    }
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
    #[error("hashing the config tree: {0}")]
    ConfigTree(std::io::Error),
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
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
    reloader: reload::Reloader,
    listeners: Vec<(usize, TcpListener)>,
    metrics_listener: Option<TcpListener>,
    /// `[bench] dangerous_unfenced_listener`, bound at start (loopback only;
    /// a reload neither opens nor moves it).
    unfenced_listener: Option<TcpListener>,
    /// The cluster port (`[cluster]`), bound at start.
    cluster_listener: Option<TcpListener>,
    /// The `hsmgate_cluster_*` gauges (`[cluster]` only).
    cluster_metrics: Option<crate::cluster::metrics::ClusterMetrics>,
}

impl Server {
    /// Opens the engine, loads or generates the certificate and binds every
    /// listener. Nothing is served until [`Server::run`].
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let data_dir = config.data_dir.clone();
        let engine_config = config.engine.clone();
        let engine = if config.upstream.is_some() {
            // A gateway: the engine is on the nodes (`crate::upstream`).
            Engine::absent(engine_config)
        } else {
            tokio::task::spawn_blocking(move || Engine::open(&data_dir, engine_config))
                .await
                .map_err(|e| EngineError::Internal(format!("engine open task: {e}")))??
        };
        let audit_path = config.audit.log_path(&config.data_dir);
        let audit_config = config.audit.clone();
        let audit = tokio::task::spawn_blocking(move || AuditLog::open(&audit_path, &audit_config))
            .await
            .map_err(|e| EngineError::Internal(format!("audit open task: {e}")))??;
        let audit = Arc::new(audit);
        audit.start_writer()?;
        let metrics = Metrics::new(&config)?;
        let reload_metrics =
            reload::ReloadMetrics::register(metrics.registry()).map_err(MetricsError::from)?;
        let cert = tls::load_or_generate(&config)?;
        let digest = reload::Tree::of(&config)
            .digest()
            .map_err(ServeError::ConfigTree)?;
        let source = reload::ConfigSource {
            path: config.source_path.clone(),
            data_dir_override: None,
        };
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
        let unfenced_listener = match config.dangerous_unfenced_listener {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ServeError::Bind {
                            name: "dangerous-unfenced-bench".into(),
                            address,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let engine = Arc::new(engine);
        let (cluster, cluster_listener) = match &config.cluster {
            Some(c) => {
                let (cluster, socket) =
                    crate::cluster::Cluster::start(c.clone(), engine.clone(), &config.data_dir)
                        .await?;
                (Some(cluster), Some(socket))
            }
            None => (None, None),
        };
        let cluster_metrics = match &cluster {
            Some(_) => Some(
                crate::cluster::metrics::ClusterMetrics::register(metrics.registry())
                    .map_err(MetricsError::from)?,
            ),
            None => None,
        };
        let upstream = match &config.upstream {
            Some(u) => Some(Arc::new(crate::upstream::Pool::new(u, metrics.registry())?)),
            None => None,
        };
        let fence = Arc::new(crate::ratelimit::Fence::new(&config.limits.rate));
        let snapshot = Snapshot::new(config, cert.server_config(), digest)?;
        let reloader = reload::Reloader::new(source, reload_metrics, &snapshot);
        let state = Arc::new(AppState {
            fence,
            snapshot: ArcSwap::from_pointee(snapshot),
            engine,
            audit,
            metrics: Arc::new(metrics),
            in_flight: InFlight::default(),
            cluster,
            upstream,
        });
        // Recorded once everything is bound, before the caller announces the
        // listeners: whoever sees "listening" finds the start in the log.
        let start = Event::new("server.start", Outcome::Success)
            .detail("engine_state", state.engine.state().as_str())
            .detail("version", env!("CARGO_PKG_VERSION"));
        audit_local(&state, start).await;
        Ok(Server {
            state,
            cert,
            reloader,
            listeners,
            metrics_listener,
            unfenced_listener,
            cluster_listener,
            cluster_metrics,
        })
    }

    /// The cluster port's bound address, when `[cluster]` is configured.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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

    /// The benchmark-only unfenced listener's address, when configured.
    pub fn dangerous_unfenced_addr(&self) -> Option<SocketAddr> {
        self.unfenced_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.state.engine.clone()
    }

    pub fn certificate(&self) -> &tls::ServerCert {
        &self.cert
    }

    /// The shared state every connection gets: lets an in-process driver
    /// (the fuzz targets in `fuzz/`) call [`router::handle`] without sockets.
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// `serve --data-dir`: reloads apply it too (the config file's own
    /// `data_dir` is not compared against the running one).
    pub fn set_data_dir_override(&mut self, dir: Option<PathBuf>) {
        self.reloader.set_data_dir_override(dir);
    }

    /// The SHA-256 of the running config tree (first 16 hex digits).
    pub fn config_digest(&self) -> String {
        self.state.snapshot.load().digest.short()
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
        if let Some(socket) = self.metrics_listener {
            tasks.spawn(crate::metrics::serve(
                socket,
                self.state.clone(),
                stop_rx.clone(),
            ));
        }
        let witness = Arc::new(std::sync::Mutex::new(StoreWitness::default()));
        {
            let interval = self.state.audit.flush_interval();
            let audit = self.state.audit.clone();
            let metrics = self.state.metrics.clone();
            let engine = self.state.engine.clone();
            let witness = witness.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {}
                    }
                    let log = audit.clone();
                    let flushed = tokio::task::spawn_blocking(move || {
                        // Minutes of per-minute key use that have ended.
                        log.roll_key_use(false)?;
                        log.flush()
                    })
                    .await;
                    if !matches!(flushed, Ok(Ok(()))) {
                        metrics.audit_write_failures.inc();
                        tracing::error!("audit log: timed flush (sync and head checkpoint) failed");
                    }
                    let (engine, metrics, log, witness) = (
                        engine.clone(),
                        metrics.clone(),
                        audit.clone(),
                        witness.clone(),
                    );
                    let _ = tokio::task::spawn_blocking(move || {
                        keep_store_head(&engine, &metrics, &log, &witness)
                    })
                    .await;
                }
            });
        }
        tasks.spawn(self.reloader.run(self.state.clone(), stop_rx.clone()));
        {
            let state = self.state.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(crate::netfilter::DENY_SUMMARY_INTERVAL);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {}
                    }
                    audit_deny_summaries(&state).await;
                }
            });
        }
        if let Some(pool) = &self.state.upstream {
            // The first round before the listeners serve (connections wait
            // in the backlog, at most `timeout_ms`): a request arriving
            // with the gateway is sent, not refused for an unchecked pool.
            pool.check_all().await;
            tasks.spawn(pool.clone().run_health_checks(stop_rx.clone()));
        }
        // A gateway has no engine to back up: its nodes' leader does it.
        if self.state.upstream.is_none() && self.state.engine.config().backup.schedule_dir.is_some()
        {
            tasks.spawn(scheduled_backups_forever(
                self.state.clone(),
                stop_rx.clone(),
            ));
        }
        // A gateway's keys are on its nodes, and their leader rotates them.
        if self.state.upstream.is_none() {
            tasks.spawn(auto_rotate_forever(self.state.clone(), stop_rx.clone()));
        }
        if let Some(socket) = self.unfenced_listener {
            tasks.spawn(dangerous_unfenced_bench::serve(
                socket,
                self.state.clone(),
                stop_rx.clone(),
            ));
        }
        if let (Some(m), Some(cluster)) = (self.cluster_metrics, self.state.cluster.clone()) {
            tasks.spawn(crate::cluster::metrics::run(cluster, m, stop_rx.clone()));
        }
        if let (Some(socket), Some(cluster)) = (self.cluster_listener, self.state.cluster.clone()) {
            let allowed = crate::metrics::cidrs_of_groups(
                &self.state.snapshot.load().config,
                &cluster_groups(&self.state),
            );
            tasks.spawn(crate::cluster::serve(
                cluster,
                socket,
                allowed,
                stop_rx.clone(),
            ));
        }
        for (index, socket) in self.listeners {
            let state = self.state.clone();
            let stop = stop_rx.clone();
            tasks.spawn(listener::serve(index, socket, state, stop));
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        sweeper.abort();
        if let Some(cluster) = &self.state.cluster {
            cluster.stop().await;
        }
        // Requests run detached from their connections (a client that hangs
        // up cannot cut a request between its action and its audit record):
        // wait for the last of them, past the connections' drain.
        if tokio::time::timeout(listener::DRAIN_DEADLINE, self.state.in_flight.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.state.in_flight.count(),
                "requests still running after the drain; stopping without them"
            );
        }
        // After the drain: every request's record is written. The last
        // denial summaries and key-use counts, then stop, then sync them all.
        let state = self.state.clone();
        audit_deny_summaries(&state).await;
        let audit = state.audit.clone();
        if !matches!(
            tokio::task::spawn_blocking(move || audit.roll_key_use(true)).await,
            Ok(Ok(_))
        ) {
            state.metrics.audit_write_failures.inc();
            tracing::error!("audit log: could not write the last key-use counts");
        }
        audit_local(&state, Event::new("server.stop", Outcome::Success)).await;
        let flushed = tokio::task::spawn_blocking(move || {
            let flushed = state.audit.flush();
            keep_store_head(&state.engine, &state.metrics, &state.audit, &witness);
            flushed
        })
        .await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::error!("audit log: final sync failed");
        }
    }
}

/// This process's view of the engine store's audit head witness.
#[derive(Default)]
struct StoreWitness {
    /// The log was compared with the store's head once the engine was
    /// active (at most once per process).
    checked: bool,
    /// The log does not contain the store's head: the witness is kept as
    /// evidence and never overwritten by this process.
    refused: bool,
    /// The head last written to the store.
    recorded: Option<crate::audit::Head>,
}

/// Copies the audit log's durable head into the engine's store (its
/// second witness, see [`Engine::record_audit_head`]), on the flush timer
/// and at shutdown. A no-op while the engine is not active. The first time
/// it runs with an active engine, the log is checked to contain the head
/// the store already holds: a log cut (with its sidecar rewritten) while
/// the server was stopped would otherwise have its evidence overwritten
/// once it grew past the old head. On a mismatch the witness is left as is
/// for the rest of the process, logged, and counted every tick in
/// `hsmgate_audit_write_failures_total` (the alert keeps firing). Failures
/// never fail a request.
fn keep_store_head(
    engine: &Engine,
    metrics: &crate::metrics::Metrics,
    audit: &crate::audit::AuditLog,
    witness: &std::sync::Mutex<StoreWitness>,
) {
    let Some(head) = audit.durable_head() else {
        return;
    };
    let mut w = witness.lock().unwrap_or_else(|e| e.into_inner());
    if w.refused {
        metrics.audit_write_failures.inc();
        return;
    }
    if w.recorded.as_ref() == Some(&head) {
        return;
    }
    if !w.checked {
        match engine.audit_head() {
            Err(EngineError::NotActive(_)) => return,
            Err(e) => {
                metrics.audit_write_failures.inc();
                tracing::error!(error = %e, "audit log: cannot read the head kept in the engine's store");
                return;
            }
            Ok(None) => {}
            Ok(Some(stored)) => {
                let stored = crate::audit::Head {
                    seq: stored.seq,
                    hash: stored.hash,
                };
                match crate::audit::log_contains(audit.path(), &stored) {
                    Ok(None) => {}
                    Ok(Some(detail)) => {
                        w.refused = true;
                        metrics.audit_write_failures.inc();
                        tracing::error!(
                            stored_seq = stored.seq,
                            %detail,
                            "audit log does not contain the head kept in the engine's store \
                             (truncated or rewritten while the server was stopped?); the store's \
                             head is kept as evidence and not updated: run `hsmgate audit verify`"
                        );
                        return;
                    }
                    Err(e) => {
                        metrics.audit_write_failures.inc();
                        tracing::error!(error = %e, "audit log: cannot read it back to compare with the store's head");
                        return;
                    }
                }
            }
        }
        w.checked = true;
    }
    match engine.record_audit_head(head.seq, &head.hash) {
        Ok(true) => w.recorded = Some(head),
        Ok(false) => {}
        Err(e) => {
            metrics.audit_write_failures.inc();
            tracing::error!(error = %e, seq = head.seq, "audit log: could not keep the head in the engine's store");
        }
    }
}

/// Logs the denial summaries that ended and writes their audit records: one
/// `connection.denied.summary` per source named (at most
/// `netfilter::DENY_SUMMARY_TOP` per interval) and one with the interval's
/// totals (source `local`), so a flood of denials is a bounded number of
/// records, never one per connection.
async fn audit_deny_summaries(state: &AppState) {
    use crate::netfilter::{log_summary, take_deny_summaries, DENY_SUMMARY_INTERVAL};
    let summaries = take_deny_summaries();
    if summaries.is_empty() {
        return;
    }
    let interval = DENY_SUMMARY_INTERVAL.as_secs();
    let mut events = Vec::new();
    for summary in &summaries {
        log_summary(summary);
        for s in &summary.top {
            let mut e = Event::new("connection.denied.summary", Outcome::Denied)
                .detail("listener", s.listener.clone())
                .detail("reason", s.reason.to_string())
                .detail("count", s.count)
                .detail("interval_secs", interval);
            e.source = Some(s.source);
            events.push(e);
        }
        let named: u64 = summary.top.iter().map(|s| s.count).sum();
        events.push(
            Event::new("connection.denied.summary", Outcome::Denied)
                .detail("total", summary.total)
                .detail("sources_named", summary.top.len() as u64)
                .detail(
                    "sources_other",
                    summary.tracked.saturating_sub(summary.top.len()) as u64,
                )
                .detail("denials_other", summary.total.saturating_sub(named))
                .detail("denials_untracked", summary.untracked)
                .detail("interval_secs", interval),
        );
    }
    if state.audit.append_all(events).await.is_err() {
        state.metrics.audit_write_failures.inc();
        tracing::error!("audit log: could not record a denial summary");
    }
}

/// Records a server-side event (no peer, no actor).
async fn audit_local(state: &AppState, event: Event) {
    if state.audit.append_all(vec![event]).await.is_err() {
        state.metrics.audit_write_failures.inc();
        tracing::error!("audit log: could not record a server event");
    }
}

/// Waits for the next tick of a leader-only timer; `false` once the server
/// stops. In a cluster, ticks while this member is not the leader are
/// skipped: scheduled backups, automatic rotations and logout pruning are
/// the leader's (docs/CLUSTER.md), and what they write replicates.
async fn next_leader_tick(
    state: &AppState,
    tick: &mut tokio::time::Interval,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> bool {
    loop {
        tokio::select! {
            _ = stop.changed() => return false,
            _ = tick.tick() => {}
        }
        match &state.cluster {
            Some(cluster) if !cluster.is_leader() => tracing::debug!(
                node = cluster.node_id(),
                "{what} skipped: this member is not the cluster's leader"
            ),
            _ => return true,
        }
    }
}

/// `[backup] schedule_dir`: a backup every `schedule_interval` (the first
/// one interval after start), audited as `backup.scheduled`.
async fn scheduled_backups_forever(
    state: Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(state.engine.config().backup.schedule_interval);
    // The first tick fires at once: the first backup is one interval after start.
    tick.tick().await;
    while next_leader_tick(&state, &mut tick, &mut stop, "scheduled backup").await {
        let engine = state.engine.clone();
        let done = tokio::task::spawn_blocking(move || engine.scheduled_backup()).await;
        let event = match done {
            Ok(Ok(Some(path))) => Event::new("backup.scheduled", Outcome::Success)
                .detail("file", path.display().to_string()),
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "scheduled backup failed");
                Event::new("backup.scheduled", Outcome::Error).detail("error", e.to_string())
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduled backup task failed");
                Event::new("backup.scheduled", Outcome::Error)
            }
        };
        audit_local(&state, event).await;
    }
}

/// Vault's `auto_rotate_period` (and, in a cluster, pruning expired logout
/// records, `Engine::prune_logouts`): every `[engine] auto_rotate_check_seconds`,
/// rotates the keys that are due (`Engine::rotate_due_keys` with the system
/// clock) and writes one `transit.keys.auto_rotate` audit record per key
/// rotated or failed. In a cluster only the leader rotates, as for
/// scheduled backups; the rotation replicates like any write. A failure is
/// logged and audited and the next check tries again.
async fn auto_rotate_forever(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use crate::engine::auto_rotate::{AutoRotation, AUTO_ROTATE_ACTOR};
    let mut tick = tokio::time::interval(state.engine.config().auto_rotate_check_interval);
    // A restart after a long stop may find many keys due at once; Delay
    // keeps a slow pass from being followed by a burst of catch-up ticks.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_leader_tick(&state, &mut tick, &mut stop, "automatic rotation check").await {
        let engine = state.engine.clone();
        let Ok(done) = tokio::task::spawn_blocking(move || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // The same leader-only timer drops logout records no token can
            // need any more (a cluster's replicated logouts).
            if engine.clustered() {
                match engine.prune_logouts(now) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "cluster: expired logout records pruned"),
                    Err(e) => tracing::warn!(error = %e, "cluster: pruning logout records failed; next check retries"),
                }
            }
            engine.rotate_due_keys(now)
        })
        .await
        else {
            tracing::error!("automatic key rotation task failed");
            continue;
        };
        for result in done {
            let (key, mut event) = match result {
                AutoRotation::Rotated { key, version } => {
                    tracing::info!(key = %key, version, "key rotated automatically (auto_rotate_period)");
                    let e = Event::new("transit.keys.auto_rotate", Outcome::Success)
                        .detail("version", version);
                    (key, e)
                }
                AutoRotation::Failed { key, error } => {
                    tracing::warn!(key = %key, error = %error, "automatic rotation of a due key failed; skipped until the next check");
                    let e = Event::new("transit.keys.auto_rotate", Outcome::Error)
                        .detail("error", error.to_string());
                    (key, e)
                }
            };
            event.actor = Some(AUTO_ROTATE_ACTOR.into());
            audit_local(&state, event.detail("key", key)).await;
        }
    }
}

/// The security groups of the cluster port (fixed at start).
fn cluster_groups(state: &AppState) -> Vec<String> {
    state
        .snapshot
        .load()
        .config
        .cluster
        .as_ref()
        .map(|c| c.security_groups.clone())
        .unwrap_or_default()
}
