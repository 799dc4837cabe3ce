//! The config lifecycle after start: reload the whole config tree (config
//! file, `policies_dir`, prefix-list files, TLS certificate and key, JWT key
//! files) on SIGHUP and when one of its files changes.
//!
//! One reload, all or nothing:
//!
//! 1. [`validate`]: parse and validate the tree, and load the configured TLS
//!    certificate and key. `hsmgate check` runs this same function.
//! 2. [`fixed_changes`]: refuse changes to what was bound at start (listener
//!    sockets, data dir, engine, audit log, metrics listener).
//! 3. Build a new [`Snapshot`] (netfilter tries, rustls config, metrics
//!    filter, the tree's SHA-256) and swap it in with one store. Requests
//!    load the snapshot once, so each sees the old rules or the new, never a
//!    mix; the next request on a kept-alive connection sees the new rules
//!    (revocation cuts it), and the next TLS handshake the new certificate.
//!
//! Any error rejects the whole change: every error is logged with its
//! file:line:column, `hsmgate_config_reloads_total{outcome="failure"}` is
//! bumped, a `config.reload` failure is audited, and the old snapshot keeps
//! serving. A file-change event whose tree hashes the same as the running one
//! reloads nothing (editors touch files); SIGHUP always reloads.
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use super::{audit_local, tls, AppState, Snapshot};
use crate::audit::{Event, Outcome};
use crate::config::{self, Config, ConfigError, ConfigErrors};

/// Quiet time after the last file event before reloading: an editor's
/// save (write temp, rename, chmod) or a deploy tool copying several files
/// lands as one reload.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// A tree that never stops changing is still reloaded this often.
const DEBOUNCE_MAX: Duration = Duration::from_secs(5);

/// Where the config tree comes from, and what the command line overrode.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// `serve --data-dir`: applied to every reload as at start, so the file's
    /// `engine.data_dir` cannot differ from the running one just because the
    /// command line overrode it.
    pub data_dir_override: Option<PathBuf>,
}

/// A config tree that passed [`validate`].
pub struct Validated {
    pub config: Config,
    /// The configured certificate and key, loaded; `None` when the tree uses
    /// the generated self-signed certificate in the data dir.
    pub cert: Option<tls::ServerCert>,
}

/// What `hsmgate check` and every reload run: parse and validate the tree
/// (every error, with file:line:column), then load the configured TLS
/// certificate and key (a key that does not match its certificate, or that
/// group/others can read, is an error here, not at the next handshake).
pub fn validate(path: &Path) -> Result<Validated, ConfigErrors> {
    let config = config::load(path)?;
    let cert = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => Some(
            tls::load_or_generate(&config)
                .map_err(|e| ConfigErrors(vec![tls_error(&e, cert, key)]))?,
        ),
        _ => None,
    };
    if let Some(cluster) = &config.cluster {
        // The same checks the cluster port makes at start: readable PEM,
        // a certificate naming this node id, a key that matches it.
        crate::cluster::check_tls(cluster).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: cluster.cert_file.clone(),
                line: None,
                column: None,
                message: e.to_string(),
            }])
        })?;
    }
    if let Some(upstream) = &config.upstream {
        // The pool's TLS at start: readable roots, a key matching its certificate.
        crate::upstream::check_tls(upstream).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: upstream.ca_file.clone(),
                line: None,
                column: None,
                message: e.to_string(),
            }])
        })?;
    }
    Ok(Validated { config, cert })
}

fn tls_error(e: &tls::TlsError, cert: &Path, key: &Path) -> ConfigError {
    let file = match e {
        tls::TlsError::Read { path, .. }
        | tls::TlsError::NoCertificate(path)
        | tls::TlsError::KeyPermissions(path) => path.clone(),
        tls::TlsError::Rustls(_) => key.to_path_buf(),
        _ => cert.to_path_buf(),
    };
    ConfigError {
        file,
        line: None,
        column: None,
        message: format!("TLS: {e}"),
    }
}

/// Settings bound at start that a reload must not change: one message per
/// change, naming the setting and saying that a restart applies it.
///
/// Listener sockets (count, order, name, address, channel), the metrics
/// listener's address and on/off, the data dir, the `[engine]` settings (the
/// engine holds its counters under them) and the `[audit]` log (its file and
/// sync policy are open) cannot change at runtime. Everything else (security
/// groups, prefix and deny lists, per-listener groups, limits, rate limits,
/// JWT issuers, TLS certificate and key, the metrics listener's groups, and
/// any policy type added later that lives in the snapshot) reloads.
pub fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    let restart = "restart hsmgate to apply it";
    let mut out = Vec::new();
    if old.data_dir != new.data_dir {
        out.push(format!(
            "engine.data_dir changed ({} -> {}): the engine's store is open; {restart}",
            old.data_dir.display(),
            new.data_dir.display()
        ));
    }
    if old.engine != new.engine {
        out.push(format!(
            "[engine] settings changed (login thresholds, guard reserve, session TTL, seal, \
             backups or auto-rotate checks): the engine runs under the values it opened \
             with; {restart}"
        ));
    }
    if old.upstream != new.upstream {
        out.push(format!(
            "[upstream] changed (nodes, certificates or timing): the pool was built at \
             start; {restart}"
        ));
    }
    if old.cluster != new.cluster {
        out.push(format!(
            "[cluster] changed (node id, port, certificates, groups or timing): the node \
             joined its cluster with the values it started with; {restart}"
        ));
    }
    if old.listeners.len() != new.listeners.len() {
        out.push(format!(
            "the number of [[listener]] tables changed ({} -> {}): sockets are bound at \
             start; {restart}",
            old.listeners.len(),
            new.listeners.len()
        ));
    } else {
        for (o, n) in old.listeners.iter().zip(&new.listeners) {
            if o.name != n.name {
                out.push(format!(
                    "listener {:?} was renamed to {:?} (listeners are matched by position): \
                     {restart}",
                    o.name, n.name
                ));
            } else if o.address != n.address {
                out.push(format!(
                    "listener {:?}: address changed ({} -> {}): sockets are bound at start; \
                     {restart}",
                    o.name, o.address, n.address
                ));
            } else if o.channel != n.channel {
                out.push(format!(
                    "listener {:?}: channel changed (front-door <-> break-glass): which door a \
                     socket is never changes under open connections; {restart}",
                    o.name
                ));
            }
        }
    }
    if old.audit != new.audit {
        out.push(format!(
            "[audit] changed (path, fsync or key_use): the audit log is open; {restart}"
        ));
    }
    if old.metrics.enabled != new.metrics.enabled || old.metrics.address != new.metrics.address {
        out.push(format!(
            "[metrics] enabled or address changed: the metrics socket is bound at start; \
             {restart} (security_groups reload)"
        ));
    }
    out
}

/// SHA-256 of the config tree's bytes: what `hsmgate check` prints and
/// `hsmgate_config_info{sha256}` exports, so an operator can tell which tree
/// a node runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigDigest([u8; 32]);

impl ConfigDigest {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 16 hex digits: the metric label.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl std::fmt::Debug for ConfigDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigDigest({})", self.short())
    }
}

/// The files a config tree is made of, found from a loaded [`Config`].
#[derive(Debug, Clone, Default)]
pub struct Tree {
    main: PathBuf,
    /// `policies_dir`, resolved: every `*.toml` in it is part of the tree.
    policies_dir: Option<PathBuf>,
    /// Prefix-list files, the TLS certificate and key, JWT key files.
    files: BTreeSet<PathBuf>,
    /// Of `files`, those whose bytes are secret: watched but not hashed (a
    /// hash of key material has no business in a metric label).
    secret: BTreeSet<PathBuf>,
}

impl Tree {
    pub fn of(config: &Config) -> Tree {
        let main = config.source_path.clone();
        let base = main.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut tree = Tree {
            main: main.clone(),
            ..Tree::default()
        };
        // `Config` keeps resolved paths only for what the gateway uses; the
        // policies dir and the JWT key files are read off the main file again.
        if let Some(raw) = std::fs::read_to_string(&main)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
        {
            if let Some(dir) = raw.get("policies_dir").and_then(|v| v.as_str()) {
                tree.policies_dir = Some(base.join(dir));
            }
            let issuers = raw.get("jwt_issuer").and_then(|v| v.as_array());
            for issuer in issuers.into_iter().flatten() {
                if let Some(f) = issuer.get("jwks_file").and_then(|v| v.as_str()) {
                    tree.files.insert(base.join(f));
                }
                let keys = issuer.get("public_keys").and_then(|v| v.as_array());
                for k in keys.into_iter().flatten() {
                    if let Some(f) = k.get("file").and_then(|v| v.as_str()) {
                        tree.files.insert(base.join(f));
                    }
                }
            }
        }
        for list in config.prefix_lists.values() {
            if let Some(f) = &list.file {
                tree.files.insert(f.clone());
            }
        }
        if let Some(cert) = &config.tls.cert_file {
            tree.files.insert(cert.clone());
        }
        for auth in config
            .listeners
            .iter()
            .filter_map(|l| l.client_auth.as_ref())
        {
            tree.files.insert(auth.ca_file.clone());
        }
        if let Some(key) = &config.tls.key_file {
            tree.files.insert(key.clone());
            tree.secret.insert(key.clone());
        }
        tree
    }

    /// The policy files as `config::load` picks them: `*.toml`, no dotfiles,
    /// no directories, sorted.
    fn policy_files(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.policies_dir else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_policy_name(p) && !p.is_dir())
            .collect();
        out.sort();
        out
    }

    /// Hashes every file of the tree (path, length, bytes; secret files by
    /// path only), in a fixed order.
    pub fn digest(&self) -> std::io::Result<ConfigDigest> {
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut add = |path: &Path, secret: bool| -> std::io::Result<()> {
            let name = path.as_os_str().as_encoded_bytes();
            h.update(&(name.len() as u64).to_be_bytes());
            h.update(name);
            if secret {
                h.update(&u64::MAX.to_be_bytes());
            } else {
                let bytes = std::fs::read(path)?;
                h.update(&(bytes.len() as u64).to_be_bytes());
                h.update(&bytes);
            }
            Ok(())
        };
        add(&self.main, false)?;
        for p in self.policy_files() {
            add(&p, false)?;
        }
        for p in &self.files {
            add(p, self.secret.contains(p))?;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        Ok(ConfigDigest(out))
    }

    /// Directory → which of its entries belong to the tree. Directories,
    /// not files, are watched: editors and deploy tools replace files by
    /// rename, which a watch on the file itself would miss.
    fn watch_plan(&self) -> BTreeMap<PathBuf, DirRule> {
        let mut plan: BTreeMap<PathBuf, DirRule> = BTreeMap::new();
        let mut file = |path: &Path| {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return;
            };
            plan.entry(canonical_dir(dir))
                .or_default()
                .names
                .insert(name.to_os_string());
        };
        file(&self.main);
        for f in &self.files {
            file(f);
        }
        if let Some(dir) = &self.policies_dir {
            plan.entry(canonical_dir(dir)).or_default().policies = true;
        }
        plan
    }
}

/// The entries of one watched directory that belong to the tree.
#[derive(Debug, Default, Clone)]
struct DirRule {
    names: BTreeSet<OsString>,
    /// The policies dir: any `*.toml` that is not a dotfile.
    policies: bool,
}

impl DirRule {
    fn matches(&self, path: &Path, name: &std::ffi::OsStr) -> bool {
        // `..data`: Kubernetes swaps a mounted ConfigMap by renaming it.
        self.names.contains(name) || name == "..data" || (self.policies && is_policy_name(path))
    }
}

fn canonical_dir(dir: &Path) -> PathBuf {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

fn is_policy_name(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    !hidden && p.extension().is_some_and(|e| e == "toml")
}

/// The reload metrics. One `hsmgate_config_info` series at a time: the
/// loaded tree's hash is its label, replaced on each successful reload.
#[derive(Clone)]
pub struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: Gauge,
    last_successful: IntGauge,
    info: IntGaugeVec,
}

impl ReloadMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<ReloadMetrics> {
        use crate::metrics::registered;
        let reloads = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "hsmgate_config_reloads_total",
                    "Config reloads (SIGHUP or file change) by outcome; a failure keeps the old config serving.",
                ),
                &["outcome"],
            )?,
        )?;
        for outcome in ["success", "failure"] {
            reloads.with_label_values(&[outcome]);
        }
        let last_success = registered(
            r,
            Gauge::new(
                "hsmgate_config_last_reload_success_timestamp_seconds",
                "When the running config was loaded (start or last successful reload), Unix time.",
            )?,
        )?;
        let last_successful = crate::metrics::gauge(
            r,
            "hsmgate_config_last_reload_successful",
            "1 if the last config load or reload succeeded, 0 if it was rejected.",
        )?;
        let info = crate::metrics::gauge_vec(
            r,
            "hsmgate_config_info",
            "Always 1; sha256 is the first 16 hex digits of the running config tree's SHA-256 (as hsmgate check prints it).",
            &["sha256"],
        )?;
        Ok(ReloadMetrics {
            reloads,
            last_success,
            last_successful,
            info,
        })
    }

    /// A tree is running: at start, or after a successful reload.
    fn loaded(&self, digest: &ConfigDigest) {
        self.info.reset();
        self.info.with_label_values(&[&digest.short()]).set(1);
        self.last_success.set(unix_now());
        self.last_successful.set(1);
    }

    fn reloaded(&self, digest: &ConfigDigest) {
        self.reloads.with_label_values(&["success"]).inc();
        self.loaded(digest);
    }

    fn rejected(&self) {
        self.reloads.with_label_values(&["failure"]).inc();
        self.last_successful.set(0);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Why a reload happened (audited and logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file-change",
        }
    }
}

/// A snapshot ready to swap in.
pub struct Prepared {
    pub snapshot: Snapshot,
    pub tree: Tree,
}

/// Phases 1–3 of a reload, off the async runtime (file I/O, trie builds,
/// 1M-line prefix lists): everything but the swap.
pub fn prepare(source: &ConfigSource, current: &Config) -> Result<Prepared, Vec<ConfigError>> {
    let Validated { mut config, cert } = validate(&source.path).map_err(|e| e.0)?;
    if let Some(dir) = &source.data_dir_override {
        config.data_dir = dir.clone();
    }
    let fixed = fixed_changes(current, &config);
    if !fixed.is_empty() {
        return Err(fixed
            .into_iter()
            .map(|message| ConfigError {
                file: source.path.clone(),
                line: None,
                column: None,
                message,
            })
            .collect());
    }
    let cert = match cert {
        Some(c) => c,
        // The generated certificate in the data dir: re-read, so replacing
        // it there (and reloading) also takes effect.
        None => tls::load_or_generate(&config).map_err(|e| {
            vec![ConfigError {
                file: config.data_dir.join("tls"),
                line: None,
                column: None,
                message: format!("TLS: {e}"),
            }]
        })?,
    };
    let tree = Tree::of(&config);
    let digest = tree.digest().map_err(|e| {
        vec![ConfigError {
            file: source.path.clone(),
            line: None,
            column: None,
            message: format!("hashing the config tree: {e}"),
        }]
    })?;
    let snapshot = Snapshot::new(config, cert.server_config(), digest).map_err(|e| {
        let file = match &e {
            tls::TlsError::ClientCa { path, .. } => path.clone(),
            _ => source.path.clone(),
        };
        vec![ConfigError {
            file,
            line: None,
            column: None,
            message: format!("TLS: {e}"),
        }]
    })?;
    Ok(Prepared { snapshot, tree })
}

/// File events that matter, as plain wake-ups (the reload reads the files).
struct Changes {
    rx: mpsc::Receiver<()>,
    plan: Arc<Mutex<BTreeMap<PathBuf, DirRule>>>,
    watcher: Option<RecommendedWatcher>,
}

impl Changes {
    fn new() -> Changes {
        let (tx, rx) = mpsc::channel(1);
        let plan: Arc<Mutex<BTreeMap<PathBuf, DirRule>>> = Arc::default();
        let filter = plan.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Our own reads of the tree are Access events: never a trigger.
            let relevant = match event.kind {
                EventKind::Access(notify::event::AccessKind::Close(
                    notify::event::AccessMode::Write,
                )) => true,
                EventKind::Access(_) => false,
                _ => true,
            };
            if !relevant {
                return;
            }
            // Poisoning cannot leave the plan half-written (it is replaced whole).
            let plan = filter.lock().unwrap_or_else(|e| e.into_inner());
            let hit = event.paths.iter().any(|p| {
                let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                    return false;
                };
                plan.get(dir).is_some_and(|rule| rule.matches(p, name))
            });
            if hit {
                // Full: a wake-up is already pending, which is enough.
                let _ = tx.try_send(());
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "config file watcher unavailable; reload with SIGHUP");
                None
            }
        };
        Changes { rx, plan, watcher }
    }

    /// Watches the directories of `tree` (and stops watching the others).
    fn follow(&mut self, tree: &Tree) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let new = tree.watch_plan();
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        for dir in plan.keys() {
            if !new.contains_key(dir) {
                let _ = watcher.unwatch(dir);
            }
        }
        for dir in new.keys() {
            // Watching again is harmless and re-arms a directory that was
            // deleted and created again.
            let _ = watcher.unwatch(dir);
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch config directory; reload with SIGHUP");
            }
        }
        *plan = new;
    }
}

/// Reloads on SIGHUP and file changes until stopped. Built in
/// `Server::bind`, so SIGHUP is handled (not fatal) before the server says
/// it is listening.
pub struct Reloader {
    source: ConfigSource,
    metrics: ReloadMetrics,
    hangup: Option<Signal>,
    changes: Changes,
    tree: Tree,
    /// The last attempt failed: a file change back to the running tree must
    /// still reload, so the failure state clears.
    failing: bool,
}

impl Reloader {
    pub fn new(source: ConfigSource, metrics: ReloadMetrics, initial: &Snapshot) -> Reloader {
        let hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        };
        let tree = Tree::of(&initial.config);
        let mut changes = Changes::new();
        changes.follow(&tree);
        metrics.loaded(&initial.digest);
        Reloader {
            source,
            metrics,
            hangup,
            changes,
            tree,
            failing: false,
        }
    }

    pub fn set_data_dir_override(&mut self, dir: Option<PathBuf>) {
        self.source.data_dir_override = dir;
    }

    pub async fn run(mut self, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
        loop {
            let trigger = tokio::select! {
                _ = stop.changed() => return,
                Some(()) = recv_signal(&mut self.hangup) => Trigger::Signal,
                Some(()) = self.changes.rx.recv() => {
                    let first = tokio::time::Instant::now();
                    loop {
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = self.changes.rx.recv() => {
                                if first.elapsed() >= DEBOUNCE_MAX { break; }
                            }
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                        }
                    }
                    Trigger::FileChange
                }
            };
            self.reload(&state, trigger).await;
        }
    }

    /// One reload attempt, start to finish (also logged, counted, audited).
    pub async fn reload(&mut self, state: &Arc<AppState>, trigger: Trigger) {
        let current = state.snapshot.load_full();
        if trigger == Trigger::FileChange && !self.failing {
            let tree = self.tree.clone();
            let unchanged = tokio::task::spawn_blocking(move || tree.digest())
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|d| d == current.digest);
            if unchanged {
                tracing::debug!("config files touched but unchanged; nothing to reload");
                return;
            }
        }
        let source = self.source.clone();
        let config = current.config.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare(&source, &config))
            .await
            .unwrap_or_else(|e| {
                Err(vec![ConfigError {
                    file: self.source.path.clone(),
                    line: None,
                    column: None,
                    message: format!("reload task failed: {e}"),
                }])
            });
        match prepared {
            Ok(Prepared { snapshot, tree }) => {
                let digest = snapshot.digest;
                // The one swap: every later request and handshake sees it.
                state.snapshot.store(Arc::new(snapshot));
                self.metrics.reloaded(&digest);
                self.failing = false;
                self.changes.follow(&tree);
                self.tree = tree;
                tracing::info!(
                    trigger = trigger.as_str(),
                    sha256 = %digest.short(),
                    changed = digest != current.digest,
                    "config reloaded"
                );
                let event = Event::new("config.reload", Outcome::Success)
                    .detail("trigger", trigger.as_str())
                    .detail("sha256", digest.hex())
                    .detail("previous_sha256", current.digest.hex())
                    .detail("errors", 0u64);
                audit_local(state, event).await;
            }
            Err(errors) => {
                self.metrics.rejected();
                self.failing = true;
                for e in &errors {
                    tracing::error!(trigger = trigger.as_str(), "config reload: {e}");
                }
                tracing::error!(
                    trigger = trigger.as_str(),
                    errors = errors.len(),
                    sha256 = %current.digest.short(),
                    "config reload rejected; the running config (unchanged) keeps serving"
                );
                // Where, not what: messages can quote config values.
                let at: Vec<serde_json::Value> = errors
                    .iter()
                    .take(10)
                    .map(|e| {
                        let mut s = e.file.display().to_string();
                        if let Some(l) = e.line {
                            s.push_str(&format!(":{l}"));
                        }
                        serde_json::Value::String(s)
                    })
                    .collect();
                let event = Event::new("config.reload", Outcome::Failure)
                    .detail("trigger", trigger.as_str())
                    .detail("running_sha256", current.digest.hex())
                    .detail("errors", errors.len() as u64)
                    .detail("at", at);
                audit_local(state, event).await;
            }
        }
    }
}

async fn recv_signal(hangup: &mut Option<Signal>) -> Option<()> {
    match hangup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str, groups: &str) -> Config {
        config::load_from_str(
            Path::new("hsmgate.toml"),
            text,
            &[(PathBuf::from("policies/g.toml"), groups.to_string())],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    const GROUPS: &str = "[group.apps]\nrules = [{ source = \"127.0.0.1/32\" }]\n";

    fn main(address: &str, extra: &str) -> String {
        format!(
            "policies_dir = \"policies\"\n[engine]\ndata_dir = \"/tmp/x\"\n{extra}\n\
             [[listener]]\nname = \"api\"\naddress = \"{address}\"\nsecurity_groups = [\"apps\"]\n\
             admin_groups = [\"apps\"]\n"
        )
    }

    #[test]
    fn groups_and_limits_may_change() {
        let old = config(&main("127.0.0.1:8200", ""), GROUPS);
        let new = config(
            &main("127.0.0.1:8200", "[limits]\nmax_body_bytes = 2048\n"),
            "[group.apps]\nrules = [{ source = \"10.0.0.0/8\" }]\n",
        );
        assert!(fixed_changes(&old, &new).is_empty());
    }

    #[test]
    fn listener_address_and_engine_may_not_change() {
        let old = config(&main("127.0.0.1:8200", ""), GROUPS);
        let moved = config(&main("127.0.0.1:8300", ""), GROUPS);
        let msgs = fixed_changes(&old, &moved);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("address changed"), "{msgs:?}");
        let engine = config(
            &main("127.0.0.1:8200", "zeroize_after_failures = 5\n"),
            GROUPS,
        );
        let msgs = fixed_changes(&old, &engine);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("[engine]"), "{msgs:?}");
    }

    #[test]
    fn watch_plan_matches_tree_files_and_policy_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(base.join("policies")).unwrap();
        let mut tree = Tree {
            main: base.join("hsmgate.toml"),
            policies_dir: Some(base.join("policies")),
            ..Tree::default()
        };
        tree.files.insert(base.join("lists/threats.txt"));
        let plan = tree.watch_plan();
        let hit = |p: PathBuf| {
            plan.get(p.parent().unwrap())
                .is_some_and(|r| r.matches(&p, p.file_name().unwrap()))
        };
        assert!(hit(base.join("hsmgate.toml")));
        assert!(hit(base.join("policies/new.toml")));
        assert!(hit(base.join("lists/threats.txt")));
        assert!(!hit(base.join("audit.log")), "not part of the tree");
        assert!(
            !hit(base.join("policies/.new.toml.swp")),
            "editor swap file"
        );
        assert!(!hit(base.join("policies/notes.txt")));
        assert!(!hit(base.join("lists/other.txt")));
    }

    #[test]
    fn digest_covers_policy_files_and_skips_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/g.toml"), GROUPS).unwrap();
        std::fs::write(dir.path().join("key.pem"), "secret one").unwrap();
        let mut tree = Tree {
            main: dir.path().join("policies/g.toml"),
            policies_dir: Some(dir.path().join("policies")),
            ..Tree::default()
        };
        tree.files.insert(dir.path().join("key.pem"));
        tree.secret.insert(dir.path().join("key.pem"));
        let a = tree.digest().unwrap();
        std::fs::write(dir.path().join("key.pem"), "secret two").unwrap();
        assert_eq!(tree.digest().unwrap(), a, "key bytes must not be hashed");
        std::fs::write(dir.path().join("policies/h.toml"), "# new\n").unwrap();
        let b = tree.digest().unwrap();
        assert_ne!(b, a, "a new policy file changes the hash");
        std::fs::write(dir.path().join("policies/.h.toml.swp"), "x").unwrap();
        assert_eq!(tree.digest().unwrap(), b, "dotfiles are not policy files");
        assert_eq!(b.short().len(), 16);
    }
}
