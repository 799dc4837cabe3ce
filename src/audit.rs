//! The audit log: append-only JSON lines, each record hash-chained to the
//! one before it, verifiable offline (`hsmgate audit verify`).
//!
//! Every line is one [`Record`]. Its `prev` field is the hex SHA-256 of the
//! previous line's exact bytes (without the newline); the first record's is
//! 64 zeros. Changing a byte breaks the next record's `prev`, deleting or
//! swapping records breaks the `seq` run, and only truncation at the end
//! leaves a valid chain, so the *head* (last sequence number and its hash)
//! is also written, after each sync, to a sidecar file `<log>.head`,
//! copied by the server into the engine's sealed store (a witness a
//! rewritten sidecar cannot forge: `gateway::keep_store_head`,
//! `Engine::record_audit_head`), and exported as a metric so an off-host
//! Prometheus keeps a witness too.
//! The log and its head live in the data dir by default and survive
//! zeroization, which removes only `store.redb` and `master.key`.
//!
//! Durability: a record is written before the request that caused it is
//! answered, so `kill -9` never loses an acknowledged record. With
//! `fsync = "every"` each record is also synced (power loss) before the
//! answer; with `fsync = "batched"` security and admin records are still
//! synced at once and key-use records are synced by [`AuditLog::flush`] on
//! a timer. Requests hand their records to one writer thread
//! ([`AuditLog::append_all`]): a group commit, one `write` and at most one
//! `fdatasync` per round for every request queued meanwhile.
//!
//! A write failure marks the log failed: admin requests are refused until a
//! write succeeds again (`healthy`, [`AuditLog::recover`]), so no admin
//! action goes unaudited. The first record written after a failure is an
//! `audit.resumed` record saying how many records were lost meanwhile, so
//! the gap itself is in the chain.
//!
//! With `key_use = "per_minute"` Transit operations are counted in memory
//! per (principal, key, operation) and written as one `transit.key_use`
//! record per minute ([`AuditLog::roll_key_use`], on the flush timer and at
//! shutdown); a `kill -9` loses at most the current minute's counts.
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::engine::crypto;
use crate::engine::store;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// When records reach the disk platter, not only the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every record is synced before the request is answered.
    Every,
    /// Security and admin records are synced at once; key-use records at
    /// the next timer flush (at most `interval` later).
    Batched { interval: Duration },
}

/// Which Transit operations leave a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUseLevel {
    /// One record per Transit operation: principal, key, operation, outcome.
    All,
    /// One record per (principal, key, operation) per wall-clock minute,
    /// with its success and failure counts. Denials keep a record each.
    PerMinute,
    /// No key-use records (HSM API calls, logins and denials are still recorded).
    Off,
}

/// The `[audit]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The log file; `None` means `<data dir>/audit.log`.
    pub path: Option<PathBuf>,
    pub fsync: FsyncPolicy,
    pub key_use: KeyUseLevel,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            fsync: FsyncPolicy::Every,
            key_use: KeyUseLevel::All,
        }
    }
}

impl AuditConfig {
    pub fn log_path(&self, data_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| data_dir.join("audit.log"))
    }
}

/// The head sidecar of a log: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".head");
    log.with_file_name(name)
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit head {path}: {detail}")]
    Head { path: PathBuf, detail: String },
    #[error(
        "audit log {path} does not match its stored head ({detail}); it was truncated or \
         replaced. Keep both files as evidence, move them aside, and start again to begin a new log"
    )]
    HeadMismatch { path: PathBuf, detail: String },
    #[error("audit log {path} is broken at record {seq}: {detail}; run `hsmgate audit verify`")]
    Broken {
        path: PathBuf,
        seq: u64,
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    /// Wrong credentials, bad input, or an engine error.
    Failure,
    /// Refused by policy: network, role, missing token.
    Denied,
    /// Refused by the login guard (the crypto officer's reserve).
    Refused,
    /// The server failed (5xx).
    Error,
}

/// One line of the log. Field order is the serialization order; the chain
/// hashes the line's bytes as written, so no canonical form is needed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The user (or login name) acting; `null` when nobody is identified.
    pub actor: Option<String>,
    /// The TCP peer, or `local` for the server itself.
    pub source: String,
    /// e.g. `hsm.login`, `hsm.zeroize`, `transit.encrypt`, `engine.zeroized`.
    pub action: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Action-specific facts (key name, HTTP status, attempts left, cause).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
    /// Hex SHA-256 of the previous line.
    pub prev: String,
}

/// What a caller hands to [`AuditLog::append`]; the log adds seq, time, prev.
#[derive(Debug, Clone)]
pub struct Event {
    pub actor: Option<String>,
    pub source: Option<IpAddr>,
    pub action: String,
    pub outcome: Outcome,
    pub request_id: Option<String>,
    pub detail: serde_json::Map<String, serde_json::Value>,
    /// Security and admin events are synced at once under any policy.
    pub urgent: bool,
}

impl Event {
    pub fn new(action: impl Into<String>, outcome: Outcome) -> Event {
        Event {
            actor: None,
            source: None,
            action: action.into(),
            outcome,
            request_id: None,
            detail: serde_json::Map::new(),
            urgent: true,
        }
    }

    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Event {
        self.detail.insert(key.to_string(), value.into());
        self
    }
}

/// The last record: its sequence number and the hex SHA-256 of its line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

struct Writer {
    file: File,
    head: Head,
    /// The last write failed; admin requests are refused until one succeeds.
    failed: bool,
    /// Records that could not be written since the last one that was; the
    /// next record written is preceded by an `audit.resumed` record naming
    /// this count.
    lost: u64,
}

/// Distinct (principal, key, operation) entries counted per minute; uses
/// beyond are counted in one overflow record, so a flood of new key names
/// costs bounded memory and bounded records.
pub const KEY_USE_MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct UseCount {
    success: u64,
    failure: u64,
}

/// One wall-clock minute of key-use counts (`key_use = "per_minute"`).
#[derive(Debug, Default)]
struct KeyUseWindow {
    /// Unix time / 60 of the minute counted.
    minute: u64,
    counts: HashMap<(Option<String>, Option<String>, &'static str), UseCount>,
    overflow: UseCount,
}

#[derive(Debug, Default)]
struct KeyUseWindows {
    current: Option<KeyUseWindow>,
    /// Minutes that ended while requests were still counting; written at
    /// the next roll. At most a few (the timer rolls every second or so).
    finished: Vec<KeyUseWindow>,
}

/// Group commit: the highest sequence number known to be on disk, with its
/// head file. One thread syncs at a time; records written meanwhile ride on
/// the next sync, so concurrent requests share fsyncs instead of queueing
/// one fsync each behind the writer lock.
struct Synced {
    seq: u64,
    /// The sequence number the head file names, and when it was written.
    /// The head follows the log at most `HEAD_INTERVAL` behind while
    /// records flow (and exactly after `flush`): it costs two of the three
    /// fsyncs of a group, and `verify` accepts a head behind the log.
    head_seq: u64,
    head_written: Option<std::time::Instant>,
    /// The head the head file names: records up to it are synced.
    head: Option<Head>,
}

/// How far the head checkpoint may lag the synced log while records flow.
const HEAD_INTERVAL: Duration = Duration::from_millis(100);
/// With `fsync = "every"` a timer still flushes a lagging head this often.
const HEAD_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    fsync: FsyncPolicy,
    key_use: KeyUseLevel,
    writer: Mutex<Writer>,
    synced: Mutex<Synced>,
    key_use_windows: Mutex<KeyUseWindows>,
    /// The writer thread's queue ([`AuditLog::start_writer`]).
    queue: OnceLock<mpsc::Sender<Job>>,
}

/// One caller's records for the writer thread, and where its answer goes.
struct Job {
    events: Vec<Event>,
    done: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

/// Most callers' records one writer round takes (one `write`, one sync).
const MAX_ROUND: usize = 1024;

/// The writer thread: waits for records, then takes everything queued
/// (up to [`MAX_ROUND`] callers) as one round. Ends when the log is gone.
fn writer_thread(log: Weak<AuditLog>, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_ROUND {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // Dropping the jobs answers their callers "closed".
        let Some(log) = log.upgrade() else { return };
        // A panic in one round (a bug) must not end the thread and with it
        // every later record: that round's callers get "closed" (their
        // answer channels drop) and the next round starts afresh.
        let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            log.write_round(jobs);
        }));
        if round.is_err() {
            tracing::error!("audit writer: a round panicked; its records count as unwritten");
        }
    }
}

fn closed(path: &Path) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("the audit writer is not running"),
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Closing the log writes the head checkpoint up to the last record, so
/// only a crash can leave the head behind the log.
impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "audit log: final flush failed");
        }
    }
}

fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let base = crate::api::rfc3339(d.as_secs());
    // base is "YYYY-MM-DDTHH:MM:SSZ"; insert the milliseconds before the Z.
    format!("{}.{:03}Z", base.trim_end_matches('Z'), d.subsec_millis())
}

fn unix_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60
}

fn resumed_event(lost: u64) -> Event {
    Event::new("audit.resumed", Outcome::Success).detail("lost_records", lost)
}

fn sha256_hex(line: &[u8]) -> String {
    hex::encode(crypto::sha256(line))
}

/// Appends `event` as the line after `head` to `buf` (with its newline)
/// and returns the new head.
fn encode(head: &Head, event: Event, buf: &mut Vec<u8>) -> Head {
    let record = Record {
        seq: head.seq + 1,
        time: now_rfc3339(),
        actor: event.actor,
        source: event
            .source
            .map_or_else(|| "local".to_string(), |ip| ip.to_string()),
        action: event.action,
        outcome: event.outcome,
        request_id: event.request_id,
        detail: event.detail,
        prev: head.hash.clone(),
    };
    let start = buf.len();
    // Serializing a struct of strings and a JSON map into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &record);
    let hash = sha256_hex(&buf[start..]);
    buf.push(b'\n');
    Head {
        seq: record.seq,
        hash,
    }
}

pub fn read_head(path: &Path) -> Result<Option<Head>, AuditError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AuditError::Head {
                path: path.to_path_buf(),
                detail: format!("not a valid head file: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl AuditLog {
    /// Opens (or creates) the log, checks its whole chain and compares it
    /// with the stored head. A broken or truncated log is refused: writing
    /// on would overwrite the head, the evidence of the truncation.
    pub fn open(path: &Path, config: &AuditConfig) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let head_path = head_path(path);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        // A crash mid-write can leave a partial last line, never
        // acknowledged to anyone: cut it off before appending.
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_err(path))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let partial = text.len() - complete;
        if partial > 0 {
            tracing::warn!(path = %path.display(), bytes = partial, "audit log ends in a partial record (crash mid-write); removing it");
            file.set_len(complete as u64).map_err(io_err(path))?;
            file.seek(SeekFrom::End(0)).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        let report = verify_bytes(&text[..complete], read_head(&head_path)?.as_ref());
        if let Some(broken) = report.broken {
            return Err(match broken.kind {
                BreakKind::Head => AuditError::HeadMismatch {
                    path: path.to_path_buf(),
                    detail: broken.detail,
                },
                BreakKind::Chain => AuditError::Broken {
                    path: path.to_path_buf(),
                    seq: broken.seq,
                    detail: broken.detail,
                },
            });
        }
        let log = AuditLog {
            path: path.to_path_buf(),
            head_path,
            fsync: config.fsync,
            key_use: config.key_use,
            writer: Mutex::new(Writer {
                file,
                head: report.head.unwrap_or(Head {
                    seq: 0,
                    hash: GENESIS.into(),
                }),
                failed: false,
                lost: 0,
            }),
            key_use_windows: Mutex::new(KeyUseWindows::default()),
            queue: OnceLock::new(),
            // A cut partial line was synced above; everything before it was
            // read back from the file. Anything not yet synced is re-synced
            // by the first sync, which covers the whole file.
            synced: Mutex::new(Synced {
                seq: 0,
                head_seq: 0,
                head_written: None,
                head: None,
            }),
        };
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn key_use(&self) -> KeyUseLevel {
        self.key_use
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave a half-updated head:
        // the head is replaced only after its line is written.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the last write succeeded. Admin requests check this before
    /// acting, so a full disk stops admin actions instead of hiding them.
    pub fn healthy(&self) -> bool {
        !self.writer().failed
    }

    pub fn head(&self) -> Head {
        self.writer().head.clone()
    }

    /// Appends one record; returns its sequence number once it is written
    /// (and synced, as the policy and `event.urgent` demand). Blocking.
    pub fn append(&self, event: Event) -> Result<u64, AuditError> {
        let mut w = self.writer();
        if w.lost > 0 {
            let resumed = resumed_event(w.lost);
            if let Err(e) = self.write_locked(&mut w, resumed) {
                w.lost += 1;
                return Err(e);
            }
            w.lost = 0;
        }
        let urgent = event.urgent;
        let seq = match self.write_locked(&mut w, event) {
            Ok(seq) => seq,
            Err(e) => {
                w.lost += 1;
                return Err(e);
            }
        };
        drop(w);
        if urgent || self.fsync == FsyncPolicy::Every {
            self.sync_through(seq, false)?;
        }
        Ok(seq)
    }

    /// After a failure: tries to write (and sync) the `audit.resumed`
    /// record. Returns whether the log is healthy now. Blocking. Admin
    /// requests call this before they are refused, so the first one after
    /// the fault clears goes through.
    pub fn recover(&self) -> bool {
        let mut w = self.writer();
        if !w.failed {
            return true;
        }
        let lost = w.lost;
        let seq = match self.write_locked(&mut w, resumed_event(lost)) {
            Ok(seq) => seq,
            Err(_) => return false,
        };
        w.lost = 0;
        drop(w);
        self.sync_through(seq, false).is_ok()
    }

    /// Writes one line under the writer lock and moves the head.
    fn write_locked(&self, w: &mut Writer, event: Event) -> Result<u64, AuditError> {
        let mut line = Vec::new();
        let head = encode(&w.head, event, &mut line);
        self.write_lines(w, &line, head)
    }

    /// Writes already-encoded whole lines with one `write` and moves the
    /// head to `head` (the last of them). A failed write is cut back to the
    /// last whole record and marks the log failed; the head stays.
    fn write_lines(&self, w: &mut Writer, lines: &[u8], head: Head) -> Result<u64, AuditError> {
        let before = w.file.metadata().map(|m| m.len()).ok();
        if let Err(e) = w.file.write_all(lines) {
            w.failed = true;
            // A partial line would break the chain for every later record:
            // cut back to the last whole record (the next open would too).
            if let Some(len) = before {
                let _ = w.file.set_len(len);
            }
            return Err(io_err(&self.path)(e));
        }
        w.head = head;
        w.failed = false;
        Ok(w.head.seq)
    }

    /// Appends every event, in order, and answers once they are written
    /// and synced as the policy demands; returns the last sequence number.
    ///
    /// This is the request path's group commit. The records go to one
    /// writer thread, which takes everything queued since its last round,
    /// writes it with one `write`, syncs it with one `fdatasync` (when any
    /// record needs it) and then answers every caller in the round. Under
    /// load a round holds as many requests as arrived during the previous
    /// sync: each still gets `fsync = "every"`'s promise (answered only
    /// after its own record is on disk), and no request costs a thread
    /// hand-off of its own. On failure nothing in the round is
    /// acknowledged: each caller gets the error and the records count as
    /// lost (`audit.resumed` follows), as with [`AuditLog::append`].
    pub async fn append_all(&self, events: Vec<Event>) -> Result<u64, AuditError> {
        if events.is_empty() {
            return Ok(self.head().seq);
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let queue = self.queue.get().ok_or_else(|| closed(&self.path))?;
        queue
            .send(Job { events, done })
            .map_err(|_| closed(&self.path))?;
        answer.await.unwrap_or_else(|_| Err(closed(&self.path)))
    }

    /// Starts the writer thread behind [`AuditLog::append_all`]. The
    /// server calls it once, at start-up (a thread that cannot start is a
    /// start-up error, not a later surprise). The thread holds only a weak
    /// reference: dropping the log closes the queue and ends it.
    pub fn start_writer(self: &Arc<Self>) -> Result<(), AuditError> {
        if self.queue.get().is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let log = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("hsmgate-audit".into())
            .spawn(move || writer_thread(log, rx))
            .map_err(io_err(&self.path))?;
        // A second caller's thread sees its sender dropped and ends.
        let _ = self.queue.set(tx);
        Ok(())
    }

    /// One round of the writer thread: every queued caller's records in one
    /// write and at most one sync.
    fn write_round(&self, jobs: Vec<Job>) {
        let mut w = self.writer();
        let mut lines = Vec::with_capacity(jobs.len() * 320);
        let mut head = w.head.clone();
        if w.lost > 0 {
            head = encode(&head, resumed_event(w.lost), &mut lines);
        }
        let mut urgent = self.fsync == FsyncPolicy::Every;
        let mut count = 0u64;
        let mut answers = Vec::with_capacity(jobs.len());
        for job in jobs {
            for event in job.events {
                urgent |= event.urgent;
                count += 1;
                head = encode(&head, event, &mut lines);
            }
            answers.push((job.done, head.seq));
        }
        let written = self.write_lines(&mut w, &lines, head);
        match &written {
            Ok(_) => w.lost = 0,
            Err(_) => w.lost += count,
        }
        drop(w);
        let result = written.and_then(|last| {
            if urgent {
                self.sync_through(last, false)?;
            }
            Ok(last)
        });
        for (done, seq) in answers {
            let answer = match &result {
                Ok(_) => Ok(seq),
                Err(e) => Err(AuditError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::other(e.to_string()),
                }),
            };
            // A caller that went away (its request ended) needs no answer.
            let _ = done.send(answer);
        }
    }

    /// Counts one Transit operation for the per-minute key-use records.
    pub fn count_key_use(
        &self,
        actor: Option<&str>,
        key: Option<&str>,
        op: &'static str,
        success: bool,
    ) {
        self.count_key_use_at(unix_minute(), actor, key, op, success);
    }

    fn count_key_use_at(
        &self,
        minute: u64,
        actor: Option<&str>,
        key: Option<&str>,
        op: &'static str,
        success: bool,
    ) {
        let mut windows = self
            .key_use_windows
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if windows.current.as_ref().is_some_and(|w| w.minute != minute) {
            if let Some(done) = windows.current.take() {
                windows.finished.push(done);
            }
        }
        let window = windows.current.get_or_insert_with(|| KeyUseWindow {
            minute,
            ..KeyUseWindow::default()
        });
        let entry = (actor.map(str::to_string), key.map(str::to_string), op);
        let count = if let Some(c) = window.counts.get_mut(&entry) {
            c
        } else if window.counts.len() < KEY_USE_MAX_ENTRIES {
            window.counts.entry(entry).or_default()
        } else {
            &mut window.overflow
        };
        if success {
            count.success += 1;
        } else {
            count.failure += 1;
        }
    }

    /// Writes the `transit.key_use` records of every minute that has ended
    /// (all minutes when `all`, at shutdown). Returns how many records were
    /// written. Blocking.
    pub fn roll_key_use(&self, all: bool) -> Result<usize, AuditError> {
        self.roll_key_use_at(unix_minute(), all)
    }

    fn roll_key_use_at(&self, minute: u64, all: bool) -> Result<usize, AuditError> {
        let done: Vec<KeyUseWindow> = {
            let mut windows = self
                .key_use_windows
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if all || windows.current.as_ref().is_some_and(|w| w.minute < minute) {
                if let Some(w) = windows.current.take() {
                    windows.finished.push(w);
                }
            }
            std::mem::take(&mut windows.finished)
        };
        let mut written = 0;
        for window in done {
            let start = crate::api::rfc3339(window.minute * 60);
            let mut entries: Vec<_> = window.counts.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let overflow = (window.overflow != UseCount::default())
                .then_some(((None, None, "*"), window.overflow));
            for ((actor, key, op), count) in entries.into_iter().chain(overflow) {
                let action = if op == "*" {
                    "transit.key_use.overflow"
                } else {
                    "transit.key_use"
                };
                let outcome = if count.success > 0 {
                    Outcome::Success
                } else {
                    Outcome::Failure
                };
                let mut e = Event::new(action, outcome)
                    .detail("op", op)
                    .detail("count", count.success + count.failure)
                    .detail("success", count.success)
                    .detail("failure", count.failure)
                    .detail("minute", start.clone())
                    .detail("window_secs", 60u64);
                if let Some(k) = key {
                    e = e.detail("key", k);
                }
                e.actor = actor;
                e.urgent = false;
                self.append(e)?;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Makes every record up to `seq` durable, with the head file. Whoever
    /// holds `synced` syncs everything written so far, so one fsync covers
    /// all the records that queued behind it.
    fn sync_through(&self, seq: u64, force_head: bool) -> Result<(), AuditError> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if synced.seq >= seq && (!force_head || synced.head_seq >= seq) {
            return Ok(());
        }
        // Every record up to this head is already written to the file (it
        // was written under the writer lock before the head moved).
        let (head, file) = {
            let w = self.writer();
            (w.head.clone(), w.file.try_clone())
        };
        let head_due = force_head
            || synced
                .head_written
                .is_none_or(|t| t.elapsed() >= HEAD_INTERVAL);
        let mut result = Ok(());
        if synced.seq < head.seq {
            result = file.and_then(|f| f.sync_data()).map_err(io_err(&self.path));
        }
        if result.is_ok() && head_due && synced.head_seq < head.seq {
            let bytes = serde_json::to_vec(&head).unwrap_or_default();
            result =
                store::write_atomic(&self.head_path, &bytes, 0o600).map_err(|e| AuditError::Head {
                    path: self.head_path.clone(),
                    detail: e.to_string(),
                });
            if result.is_ok() {
                synced.head_seq = head.seq;
                synced.head_written = Some(std::time::Instant::now());
                synced.head = Some(head.clone());
            }
        }
        match result {
            Ok(()) => {
                synced.seq = head.seq;
                Ok(())
            }
            Err(e) => {
                self.writer().failed = true;
                Err(e)
            }
        }
    }

    /// Syncs batched records and writes the head checkpoint. Called on a
    /// timer and at shutdown.
    pub fn flush(&self) -> Result<(), AuditError> {
        let seq = self.writer().head.seq;
        self.sync_through(seq, true)
    }

    /// The last head checkpoint written to the head file: every record up
    /// to it is synced. This (not [`AuditLog::head`], which may name
    /// records a power loss would still take) is what the server copies
    /// into the engine's store, so a crash never makes the store's witness
    /// claim records the log does not have.
    pub fn durable_head(&self) -> Option<Head> {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .head
            .clone()
    }

    /// How often the server's timer calls [`AuditLog::flush`]: the batch
    /// interval, or (with every record synced) the head's catch-up interval.
    pub fn flush_interval(&self) -> Duration {
        match self.fsync {
            FsyncPolicy::Every => HEAD_FLUSH_INTERVAL,
            FsyncPolicy::Batched { interval } => interval,
        }
    }
}

// ---------------------------------------------------------------------------
// Verification (offline, and at every open).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// A record does not follow from the one before it.
    Chain,
    /// The chain is whole but disagrees with the stored head (truncation).
    Head,
}

#[derive(Debug, Clone)]
pub struct Broken {
    pub kind: BreakKind,
    /// The sequence number expected at the break (the record's position).
    pub seq: u64,
    /// 1-based line in the file.
    pub line: usize,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub records: u64,
    /// The last good record.
    pub head: Option<Head>,
    /// Whether a stored head was available and compared.
    pub head_checked: bool,
    pub broken: Option<Broken>,
}

/// Checks the chain of complete lines in `bytes`, then compares the result
/// with `stored` (when given). Reports the first break only.
pub fn verify_bytes(bytes: &[u8], stored: Option<&Head>) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut prev = GENESIS.to_string();
    let mut hashes_by_seq: Option<String> = None;
    let mut line_no = 0usize;
    let mut rest = bytes;
    while !rest.is_empty() {
        line_no += 1;
        let expected = report.records + 1;
        let (line, tail, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..], true),
            None => (rest, &rest[rest.len()..], false),
        };
        rest = tail;
        let fail = |detail: String| Broken {
            kind: BreakKind::Chain,
            seq: expected,
            line: line_no,
            detail,
        };
        if !terminated {
            report.broken = Some(fail("the last record is incomplete (no newline)".into()));
            return report;
        }
        let record: Record = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                report.broken = Some(fail(format!("not a valid audit record: {e}")));
                return report;
            }
        };
        if record.seq != expected {
            report.broken = Some(fail(format!(
                "sequence number {} where {expected} was expected (a record was removed, \
                 inserted or moved)",
                record.seq
            )));
            return report;
        }
        if record.prev != prev {
            report.broken = Some(fail(
                "its prev hash does not match the record before it (that record was altered, \
                 or records were removed or reordered)"
                    .into(),
            ));
            return report;
        }
        prev = sha256_hex(line);
        if stored.is_some_and(|h| h.seq == record.seq) {
            hashes_by_seq = Some(prev.clone());
        }
        report.records = record.seq;
        report.head = Some(Head {
            seq: record.seq,
            hash: prev.clone(),
        });
    }
    if let Some(stored) = stored {
        report.head_checked = true;
        let last = report.records;
        let detail = if stored.seq > last {
            Some(format!(
                "the stored head is record {} but the log ends at record {last}: \
                 records {}..={} are missing (cut off)",
                stored.seq,
                last + 1,
                stored.seq
            ))
        } else if stored.seq > 0 && hashes_by_seq.as_deref() != Some(stored.hash.as_str()) {
            Some(format!(
                "record {} differs from the stored head's hash (the log was rewritten)",
                stored.seq
            ))
        } else {
            None
        };
        if let Some(detail) = detail {
            report.broken = Some(Broken {
                kind: BreakKind::Head,
                seq: stored.seq.min(last + 1),
                line: line_no,
                detail,
            });
        }
    }
    report
}

/// Whether the log at `path` (possibly being appended: a partial last line
/// is ignored) contains `head`: `None` when its chain is whole up to a
/// record `head.seq` whose hash is `head.hash`, else what is wrong.
pub fn log_contains(path: &Path, head: &Head) -> Result<Option<String>, AuditError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| BufReader::new(f).read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok(verify_bytes(&bytes[..complete], Some(head))
        .broken
        .map(|b| format!("record {}: {}", b.seq, b.detail)))
}

/// Verifies the log at `path` against `head` (a head file, when given and
/// present). Used by `hsmgate audit verify`.
pub fn verify_file(path: &Path, head: Option<&Path>) -> Result<VerifyReport, AuditError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| BufReader::new(f).read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let stored = match head {
        Some(h) => read_head(h)?,
        None => None,
    };
    Ok(verify_bytes(&bytes, stored.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        for i in 0..n {
            log.append(Event::new("test.event", Outcome::Success).detail("i", i as u64))
                .unwrap();
        }
        (dir, path)
    }

    #[test]
    fn a_fresh_chain_verifies_and_reopens() {
        let (_dir, path) = log_with(5);
        let report = verify_file(&path, Some(&head_path(&path))).unwrap();
        assert!(report.broken.is_none(), "{:?}", report.broken);
        assert_eq!(report.records, 5);
        assert!(report.head_checked);
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        assert_eq!(log.append(Event::new("x", Outcome::Success)).unwrap(), 6);
        let report = verify_file(&path, Some(&head_path(&path))).unwrap();
        assert!(report.broken.is_none());
    }

    #[test]
    fn the_head_checkpoint_catches_up_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        for _ in 0..5 {
            log.append(Event::new("test.event", Outcome::Success))
                .unwrap();
        }
        // While records flow the head may lag (at most HEAD_INTERVAL)...
        let lagging = read_head(&head_path(&path)).unwrap().unwrap().seq;
        assert!((1..=5).contains(&lagging), "{lagging}");
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
        // ...and a flush writes it exactly.
        log.flush().unwrap();
        assert_eq!(read_head(&head_path(&path)).unwrap().unwrap().seq, 5);
    }

    #[test]
    fn truncation_is_refused_at_open() {
        let (_dir, path) = log_with(3);
        let text = fs::read_to_string(&path).unwrap();
        let first: String = text.lines().next().unwrap().to_string() + "\n";
        fs::write(&path, first).unwrap();
        let err = AuditLog::open(&path, &AuditConfig::default()).unwrap_err();
        assert!(matches!(err, AuditError::HeadMismatch { .. }), "{err}");
    }

    #[test]
    fn a_partial_last_line_is_cut_at_open() {
        let (_dir, path) = log_with(2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"ti").unwrap();
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        assert_eq!(log.append(Event::new("x", Outcome::Success)).unwrap(), 3);
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
    }

    #[test]
    fn a_failed_write_marks_the_log_unhealthy_until_one_succeeds() {
        let (_dir, path) = log_with(2);
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        assert!(log.healthy());
        // Swap in a read-only handle: the next write fails as a full disk would.
        let good = std::mem::replace(&mut log.writer().file, File::open(&path).unwrap());
        assert!(log.append(Event::new("x", Outcome::Success)).is_err());
        assert!(!log.healthy());
        assert_eq!(
            log.head().seq,
            2,
            "a failed record must not advance the head"
        );
        log.writer().file = good;
        // Record 3 is `audit.resumed` (one record lost), then the new one.
        assert_eq!(log.append(Event::new("y", Outcome::Success)).unwrap(), 4);
        assert!(log.healthy());
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
    }

    fn records(path: &Path) -> Vec<Record> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_lost_record_is_followed_by_audit_resumed() {
        let (_dir, path) = log_with(1);
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        let good = std::mem::replace(&mut log.writer().file, File::open(&path).unwrap());
        assert!(log
            .append(Event::new("lost.one", Outcome::Success))
            .is_err());
        assert!(log
            .append(Event::new("lost.two", Outcome::Success))
            .is_err());
        // Still failing: recovery fails too, and the log stays unhealthy.
        assert!(!log.recover());
        assert!(!log.healthy());
        log.writer().file = good;
        assert!(log.recover());
        assert!(log.healthy());
        assert_eq!(
            log.append(Event::new("after", Outcome::Success)).unwrap(),
            3
        );
        let recs = records(&path);
        assert_eq!(recs[1].action, "audit.resumed");
        assert_eq!(recs[1].detail["lost_records"], 2);
        assert_eq!(recs[2].action, "after");
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
    }

    #[test]
    fn the_resumed_record_precedes_the_next_append_too() {
        let (_dir, path) = log_with(1);
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        let good = std::mem::replace(&mut log.writer().file, File::open(&path).unwrap());
        assert!(log.append(Event::new("lost", Outcome::Success)).is_err());
        log.writer().file = good;
        assert_eq!(log.append(Event::new("next", Outcome::Success)).unwrap(), 3);
        let recs = records(&path);
        assert_eq!(recs[1].action, "audit.resumed");
        assert_eq!(recs[1].detail["lost_records"], 1);
        assert_eq!(recs[2].action, "next");
    }

    fn started(path: &Path, config: &AuditConfig) -> Arc<AuditLog> {
        let log = Arc::new(AuditLog::open(path, config).unwrap());
        log.start_writer().unwrap();
        log
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_rounds_and_each_gets_its_own_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = started(&path, &AuditConfig::default());
        let callers = 64u64;
        let mut tasks = Vec::new();
        for c in 0..callers {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut last = Vec::new();
                for round in 0..10u64 {
                    let events = (0..3u64)
                        .map(|i| {
                            Event::new("test.group", Outcome::Success)
                                .detail("caller", c)
                                .detail("round", round)
                                .detail("i", i)
                        })
                        .collect();
                    last.push(log.append_all(events).await.unwrap());
                }
                last
            }));
        }
        let mut answered = Vec::new();
        for t in tasks {
            answered.extend(t.await.unwrap());
        }
        let recs = records(&path);
        assert_eq!(recs.len() as u64, callers * 10 * 3);
        // Every answer names the last of that caller's three records, which
        // precede it directly and in order: a caller's records are one run.
        answered.sort_unstable();
        answered.dedup();
        assert_eq!(answered.len() as u64, callers * 10);
        for seq in answered {
            let run = &recs[seq as usize - 3..seq as usize];
            assert_eq!(run[2].seq, seq);
            let caller = &run[0].detail["caller"];
            for (i, r) in run.iter().enumerate() {
                assert_eq!(&r.detail["caller"], caller);
                assert_eq!(r.detail["i"], i as u64);
            }
        }
        // Answered means synced (fsync = "every"): after a flush the head
        // file names the last record, and the chain verifies against it.
        log.flush().unwrap();
        let report = verify_file(&path, Some(&head_path(&path))).unwrap();
        assert!(report.broken.is_none(), "{:?}", report.broken);
        assert_eq!(report.records, callers * 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_round_acknowledges_nothing_and_audit_resumed_counts_its_records() {
        let (_dir, path) = log_with(1);
        let log = started(&path, &AuditConfig::default());
        let good = std::mem::replace(&mut log.writer().file, File::open(&path).unwrap());
        let two = vec![
            Event::new("lost.a", Outcome::Success),
            Event::new("lost.b", Outcome::Success),
        ];
        assert!(log.append_all(two).await.is_err());
        assert!(log
            .append_all(vec![Event::new("lost.c", Outcome::Success)])
            .await
            .is_err());
        assert!(!log.healthy());
        assert_eq!(log.head().seq, 1, "nothing of a failed round is kept");
        log.writer().file = good;
        let seq = log
            .append_all(vec![Event::new("after", Outcome::Success)])
            .await
            .unwrap();
        assert_eq!(seq, 3);
        assert!(log.healthy());
        let recs = records(&path);
        assert_eq!(recs[1].action, "audit.resumed");
        assert_eq!(recs[1].detail["lost_records"], 3);
        assert_eq!(recs[2].action, "after");
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
    }

    #[tokio::test]
    async fn a_log_without_its_writer_refuses_instead_of_dropping_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, &AuditConfig::default()).unwrap();
        let err = log
            .append_all(vec![Event::new("x", Outcome::Success)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not running"), "{err}");
        assert_eq!(log.head().seq, 0);
    }

    #[test]
    fn per_minute_key_use_is_one_record_per_principal_key_and_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let config = AuditConfig {
            key_use: KeyUseLevel::PerMinute,
            ..AuditConfig::default()
        };
        let log = AuditLog::open(&path, &config).unwrap();
        let minute = 29_000_000;
        for _ in 0..500 {
            log.count_key_use_at(minute, Some("app"), Some("k1"), "encrypt", true);
        }
        log.count_key_use_at(minute, Some("app"), Some("k1"), "encrypt", false);
        log.count_key_use_at(minute, Some("app"), Some("k1"), "decrypt", true);
        log.count_key_use_at(minute, Some("other"), Some("k1"), "encrypt", true);
        // The minute is not over: nothing written yet.
        assert_eq!(log.roll_key_use_at(minute, false).unwrap(), 0);
        // The next minute's first use closes the window; the roll writes it.
        log.count_key_use_at(minute + 1, Some("app"), Some("k2"), "sign", true);
        assert_eq!(log.roll_key_use_at(minute + 1, false).unwrap(), 3);
        let recs = records(&path);
        assert_eq!(recs.len(), 3);
        let enc = recs
            .iter()
            .find(|r| r.actor.as_deref() == Some("app") && r.detail["op"] == "encrypt")
            .unwrap();
        assert_eq!(enc.action, "transit.key_use");
        assert_eq!(enc.detail["key"], "k1");
        assert_eq!(enc.detail["count"], 501);
        assert_eq!(enc.detail["success"], 500);
        assert_eq!(enc.detail["failure"], 1);
        assert_eq!(enc.detail["minute"], crate::api::rfc3339(minute * 60));
        // At shutdown the current minute is written as well.
        assert_eq!(log.roll_key_use_at(minute + 1, true).unwrap(), 1);
        assert_eq!(records(&path)[3].detail["op"], "sign");
        assert!(verify_file(&path, Some(&head_path(&path)))
            .unwrap()
            .broken
            .is_none());
    }

    #[test]
    fn per_minute_key_use_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // Batched: the ten thousand records are not synced one by one.
        let config = AuditConfig {
            fsync: FsyncPolicy::Batched {
                interval: Duration::from_secs(1),
            },
            key_use: KeyUseLevel::PerMinute,
            ..AuditConfig::default()
        };
        let log = AuditLog::open(&path, &config).unwrap();
        let minute = 29_000_000;
        for i in 0..KEY_USE_MAX_ENTRIES + 50 {
            let key = format!("k{i}");
            log.count_key_use_at(minute, Some("app"), Some(&key), "encrypt", true);
        }
        {
            let windows = log.key_use_windows.lock().unwrap();
            let w = windows.current.as_ref().unwrap();
            assert_eq!(w.counts.len(), KEY_USE_MAX_ENTRIES);
            assert_eq!(w.overflow.success, 50);
        }
        let written = log.roll_key_use_at(minute, true).unwrap();
        assert_eq!(written, KEY_USE_MAX_ENTRIES + 1);
        let recs = records(&path);
        let last = recs.last().unwrap();
        assert_eq!(last.action, "transit.key_use.overflow");
        assert_eq!(last.detail["count"], 50);
    }

    #[test]
    fn time_has_milliseconds() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-01-01T00:00:00.000Z".len(), "{t}");
    }
}
