//! Many HSMs: engine nodes replicating their key store with Raft.
//!
//! openraft (pinned, `=0.9.25`) is used only inside this module: the rest
//! of the crate sees [`Cluster`] and the engine's
//! [`crate::engine::Replicator`] hook. The replicated state machine is the
//! engine's store (key rings and users, sealed under the cluster key, which
//! is every member's store master key); login-failure counters stay local
//! to each node (DESIGN §4). See docs/CLUSTER.md for the design, the join
//! protocol and its threat model.
//!
//! - `types`: the Raft type configuration (entries are batches of sealed
//!   record ops).
//! - `log_store`: the Raft log and vote in `<data_dir>/raft.redb`.
//! - `state_machine`: applies entries through the engine; snapshots are
//!   the store's replicated tables.
//! - `network`: HTTP/2 over mutual TLS to other members.
//! - `server`: the cluster port (default 8201): Raft RPCs, forwarded
//!   writes and read-index, join, status; node certificates only.
//! - `certs`: roles in certificates, and `hsmgate cluster certs`.
//! - `metrics`: the `hsmgate_cluster_*` gauges and the task refreshing them
//!   (on the leader it also probes each voter: who holds the keys).
// openraft's storage and RPC error types are as large as openraft makes
// them; its traits fix them as our return types.
#![allow(clippy::result_large_err)]

pub mod certs;
mod log_store;
pub mod metrics;
mod network;
mod server;
mod state_machine;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::engine::secret::{SecretBytes, SecretString};
use crate::engine::store::RecordOp;
use crate::engine::{Engine, EngineError, EngineState, Replicator};
use network::{NetError, Peers};
use types::{Raft, Request};

pub use server::serve;

/// `[cluster]` in the main config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id (≥ 1), unique in the cluster and named in its certificate.
    pub node_id: u64,
    /// The cluster port's bind address (default 127.0.0.1:8201).
    pub address: SocketAddr,
    /// The address other members dial (default: `address`).
    pub advertise: String,
    /// The cluster CA (PEM): the only issuer members and gateways trust.
    pub ca_file: PathBuf,
    /// This node's certificate (role `urn:hsmgate:node:<node_id>`) and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Who may connect to the cluster port (security groups from policies/).
    pub security_groups: Vec<String>,
    /// Raft timing (milliseconds): heartbeat and election timeout range.
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster TLS: {0}")]
    Tls(String),
    #[error("binding the cluster port {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cluster: {0}")]
    Raft(String),
}

/// The cluster port's default (DESIGN §5).
pub const DEFAULT_PORT: u16 = 8201;

/// How long a write waits for a leader and a commit before giving up (503).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a read waits to catch up with the leader.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Cluster RPCs that are not Raft's own.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's view of its cluster, for `GET /v1/hsm/cluster` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub advertise: String,
    /// `leader`, `follower`, `candidate`, `learner`, `shutdown`, or
    /// `stopped` when this node runs no Raft (not initialized, zeroized).
    pub raft_state: String,
    pub engine_state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Every member's address, by id.
    pub nodes: BTreeMap<u64, String>,
    /// Leader only: each member's last replicated index.
    pub replication: BTreeMap<u64, Option<u64>>,
    /// The first 8 bytes (hex) of this member's cluster key id: equal on
    /// every member that has applied the same rotations.
    #[serde(default)]
    pub cluster_key_id: Option<String>,
}

/// Answers on the cluster port.
#[derive(Debug, Serialize, Deserialize)]
enum WriteAnswer {
    Applied {
        index: u64,
        conflict: Option<String>,
    },
    NotLeader {
        leader: Option<(u64, String)>,
    },
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
enum IndexAnswer {
    Index(Option<u64>),
    NotLeader { leader: Option<(u64, String)> },
    Failed(String),
}

#[derive(Serialize, Deserialize)]
struct JoinRequest {
    init_token: Zeroizing<String>,
    /// base64 of the 32-byte cluster key.
    cluster_key: Zeroizing<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Done {
    Ok,
    Failed(String),
}

/// A running cluster member.
pub struct Cluster {
    cfg: ClusterConfig,
    engine: Arc<Engine>,
    raft: RwLock<Option<Raft>>,
    peers: Arc<Peers>,
    log_path: PathBuf,
    raft_config: Arc<openraft::Config>,
    handle: tokio::runtime::Handle,
    starting: tokio::sync::Mutex<()>,
    server_tls: Arc<rustls::ServerConfig>,
}

/// The engine's hook into the cluster (sync: engine writes run on blocking threads).
struct Hook(Arc<Cluster>);

impl Replicator for Hook {
    fn replicate(&self, ops: Vec<RecordOp>) -> Result<(), EngineError> {
        let c = self.0.clone();
        block(&self.0.handle, async move { c.write(ops).await })
    }

    fn catch_up(&self) -> Result<(), EngineError> {
        let c = self.0.clone();
        block(&self.0.handle, async move { c.catch_up().await })
    }

    fn activated(&self, fresh: bool) {
        let c = self.0.clone();
        self.0.handle.spawn(async move {
            if let Err(e) = c.start_raft(fresh).await {
                tracing::error!(error = %e, "cluster: could not start Raft");
            }
        });
    }

    fn zeroized(&self) {
        let raft = write_lock(&self.0.raft).take();
        let path = self.0.log_path.clone();
        self.0.handle.spawn(async move {
            if let Some(raft) = raft {
                let _ = raft.shutdown().await;
            }
            // Sealed under the cluster key, which this node no longer has;
            // overwritten anyway, like the store.
            if let Err(e) = crate::engine::store::shred_file(&path) {
                tracing::error!(error = %e, "cluster: could not shred the Raft log");
            }
            tracing::error!("cluster: this node zeroized; it left the cluster's traffic");
        });
    }
}

/// Runs `f` to completion from sync code: on a blocking thread directly,
/// on a runtime worker after handing its other tasks off.
fn block<T>(handle: &tokio::runtime::Handle, f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| handle.block_on(f))
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(detail: impl std::fmt::Display) -> EngineError {
    EngineError::Cluster(detail.to_string())
}

/// A write that reached a leader whose answer was lost: it may have been
/// committed. Said so, so nobody blindly repeats a non-idempotent write.
fn outcome_unknown(detail: impl std::fmt::Display) -> EngineError {
    EngineError::Cluster(format!(
        "{detail}; the write may or may not have been applied: read before retrying"
    ))
}

impl Cluster {
    /// Loads the cluster's TLS material, binds the cluster port and hooks
    /// the engine; starts Raft at once when the engine is active (a
    /// member restarting). Serve the returned listener with [`serve`].
    pub async fn start(
        cfg: ClusterConfig,
        engine: Arc<Engine>,
        data_dir: &Path,
    ) -> Result<(Arc<Cluster>, tokio::net::TcpListener), ClusterError> {
        let (server_tls, client_tls) = tls_configs(&cfg)?;
        let listener = tokio::net::TcpListener::bind(cfg.address)
            .await
            .map_err(|source| ClusterError::Bind {
                address: cfg.address,
                source,
            })?;
        let raft_config = openraft::Config {
            cluster_name: "hsmgate".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
            max_in_snapshot_log_to_keep: 100,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let source = Some(cfg.address.ip()).filter(|ip| !ip.is_unspecified());
        let cluster = Arc::new(Cluster {
            log_path: data_dir.join("raft.redb"),
            cfg,
            engine: engine.clone(),
            raft: RwLock::new(None),
            peers: Arc::new(Peers::new(client_tls, source)),
            raft_config: Arc::new(raft_config),
            handle: tokio::runtime::Handle::current(),
            starting: tokio::sync::Mutex::new(()),
            server_tls,
        });
        engine.set_replicator(Arc::new(Hook(cluster.clone())));
        match engine.state() {
            EngineState::Active => {
                // An active store that never ran Raft (no log, nothing
                // applied: restored by `hsmgate restore` while stopped, or
                // initialized before `[cluster]` was configured) founds a
                // cluster of one; otherwise Raft resumes from its log. (A
                // joining node creates its log right after the join, in
                // `start_raft`; a crash inside that instant would make it a
                // founder: zeroize it and add it again.)
                let never_clustered = !cluster.log_path.exists()
                    && engine
                        .replicated_meta()
                        .map(|(applied, _)| applied.is_none())
                        .unwrap_or(false);
                engine
                    .reload_revocations()
                    .map_err(|e| ClusterError::Raft(e.to_string()))?;
                cluster.start_raft(never_clustered).await?
            }
            _ => {
                // A log left by a zeroization that crashed before its shred.
                crate::engine::store::shred_file(&cluster.log_path)
                    .map_err(|e| ClusterError::Raft(e.to_string()))?;
            }
        }
        Ok((cluster, listener))
    }

    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// Whether this member is the leader now (scheduled backups run on
    /// the leader only).
    pub fn is_leader(&self) -> bool {
        self.raft()
            .is_some_and(|r| r.metrics().borrow().current_leader == Some(self.cfg.node_id))
    }

    fn raft(&self) -> Option<Raft> {
        read_lock(&self.raft).clone()
    }

    /// Starts this node's Raft (idempotent). `fresh`: a new store that
    /// founds a cluster of one (init, restore): initialize, then snapshot
    /// and purge the log, so members added later receive the store's first
    /// records by snapshot.
    async fn start_raft(&self, fresh: bool) -> Result<(), ClusterError> {
        let _one = self.starting.lock().await;
        let err = |e: &dyn std::fmt::Display| ClusterError::Raft(e.to_string());
        if self.raft().is_some() {
            return Ok(());
        }
        if fresh {
            crate::engine::store::shred_file(&self.log_path).map_err(|e| err(&e))?;
        }
        let path = self.log_path.clone();
        let log = tokio::task::spawn_blocking(move || log_store::LogStore::open(&path))
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?;
        let raft = Raft::new(
            self.cfg.node_id,
            self.raft_config.clone(),
            network::Network {
                peers: self.peers.clone(),
            },
            log,
            state_machine::StateMachine::new(self.engine.clone()),
        )
        .await
        .map_err(|e| err(&e))?;
        *write_lock(&self.raft) = Some(raft.clone());
        tracing::info!(node = self.cfg.node_id, fresh, "cluster: Raft started");
        if fresh {
            let me = BTreeMap::from([(self.cfg.node_id, BasicNode::new(&self.cfg.advertise))]);
            raft.initialize(me).await.map_err(|e| err(&e))?;
            raft.wait(Some(WRITE_DEADLINE))
                .current_leader(self.cfg.node_id, "founding leader")
                .await
                .map_err(|e| err(&e))?;
            raft.trigger().snapshot().await.map_err(|e| err(&e))?;
            let m = raft
                .wait(Some(WRITE_DEADLINE))
                .metrics(|m| m.snapshot.is_some(), "first snapshot")
                .await
                .map_err(|e| err(&e))?;
            if let Some(s) = m.snapshot {
                raft.trigger()
                    .purge_log(s.index)
                    .await
                    .map_err(|e| err(&e))?;
            }
            tracing::info!(node = self.cfg.node_id, "cluster: founded (one member)");
        }
        Ok(())
    }

    /// Raft, waiting a moment for it to start (right after init or join).
    async fn ready_raft(&self) -> Result<Raft, EngineError> {
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        loop {
            if let Some(r) = self.raft() {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(
                    "this node's Raft is not running; nothing was changed",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Commits `ops` through the leader; returns once applied here.
    async fn write(&self, ops: Vec<RecordOp>) -> Result<(), EngineError> {
        let raft = self.ready_raft().await?;
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        let mac = hex::encode(self.engine.entry_mac(&ops)?);
        let req = Request {
            ops,
            mac,
            rotate: None,
        };
        loop {
            let written =
                tokio::time::timeout(WRITE_DEADLINE, raft.client_write(req.clone())).await;
            let leader = match written {
                Ok(Ok(resp)) => return conflict_to_error(resp.data.conflict),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    f.leader_id.zip(f.leader_node.map(|n| n.addr))
                }
                Ok(Err(e)) => return Err(outcome_unknown(e)),
                Err(_) => {
                    return Err(outcome_unknown(
                        "this leader could not commit within 10 s (has it lost its majority?)",
                    ))
                }
            };
            if let Some((id, addr)) = leader {
                let answer: Result<WriteAnswer, NetError> = self
                    .peers
                    .call(id, &addr, "/cluster/v1/write", &req, CALL_TIMEOUT)
                    .await;
                match answer {
                    Ok(WriteAnswer::Applied { index, conflict }) => {
                        self.wait_applied(&raft, Some(index), WRITE_DEADLINE)
                            .await?;
                        return conflict_to_error(conflict);
                    }
                    Ok(WriteAnswer::Failed(e)) => return Err(outcome_unknown(e)),
                    // Never delivered: safe to try again.
                    Ok(WriteAnswer::NotLeader { .. }) | Err(NetError::Unreachable { .. }) => {}
                    Err(e) => return Err(outcome_unknown(e)),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(
                    "no leader could be reached to commit the write (is a majority of members \
                     up?); nothing was changed, retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_applied(
        &self,
        raft: &Raft,
        index: Option<u64>,
        within: Duration,
    ) -> Result<(), EngineError> {
        let Some(index) = index else { return Ok(()) };
        raft.wait(Some(within))
            .applied_index_at_least(Some(index), "read your writes")
            .await
            .map(|_| ())
            .map_err(|e| {
                unavailable(format!(
                    "the write committed, but this node has not applied it yet ({e}); it is \
                     visible on the leader"
                ))
            })
    }

    /// Waits until this node has applied what the leader has committed.
    async fn catch_up(&self) -> Result<(), EngineError> {
        let raft = self.ready_raft().await?;
        let deadline = tokio::time::Instant::now() + READ_DEADLINE;
        loop {
            let leader = match raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    f,
                ))) => f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                Err(e) => return Err(unavailable(e)),
            };
            if let Some((id, addr)) = leader {
                let answer: Result<IndexAnswer, NetError> = self
                    .peers
                    .call(id, &addr, "/cluster/v1/read-index", &(), CALL_TIMEOUT)
                    .await;
                match answer {
                    Ok(IndexAnswer::Index(index)) => {
                        return self.wait_applied(&raft, index, READ_DEADLINE).await
                    }
                    Ok(IndexAnswer::Failed(e)) => return Err(unavailable(e)),
                    Ok(IndexAnswer::NotLeader { .. }) | Err(NetError::Unreachable { .. }) => {}
                    Err(e) => return Err(unavailable(e)),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(
                    "no leader answered (is a majority of members up?)",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn leader_hint(raft: &Raft) -> Option<(u64, String)> {
        let m = raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Membership changes run on the leader, under its own officer's
    /// session: they are never forwarded, so a node certificate alone (a
    /// leaked cert file) can never ask a leader to hand the cluster key out.
    fn require_leader(&self, raft: &Raft) -> Result<(), EngineError> {
        if raft.metrics().borrow().current_leader == Some(self.cfg.node_id) {
            return Ok(());
        }
        Err(EngineError::InvalidRequest(match Self::leader_hint(raft) {
            Some((id, addr)) => format!(
                "this node is not the leader: node {id} (cluster address {addr}) is; \
                 membership changes run on the leader, with its officer's session"
            ),
            None => "there is no leader now (is a majority of members up?); retry".into(),
        }))
    }

    /// Adds (or re-adds) node `node_id` at `address`: the crypto officer
    /// authorizes it with the joining node's own init token. On the leader only.
    pub async fn add_node(
        &self,
        node_id: u64,
        address: &str,
        init_token: &SecretString,
    ) -> Result<ClusterStatus, EngineError> {
        let raft = self.ready_raft().await?;
        self.require_leader(&raft)?;
        self.add_node_as_leader(&raft, node_id, address, init_token)
            .await?;
        Ok(self.status())
    }

    async fn add_node_as_leader(
        &self,
        raft: &Raft,
        node_id: u64,
        address: &str,
        init_token: &SecretString,
    ) -> Result<(), EngineError> {
        if node_id == self.cfg.node_id || node_id == 0 {
            return Err(EngineError::InvalidRequest(format!(
                "node id {node_id} cannot be added (0 is not an id; {} is this node)",
                self.cfg.node_id
            )));
        }
        // Only a node that holds no keys may join: a live member asked to
        // join again would be cut out of its own cluster.
        let status: Result<ClusterStatus, NetError> = self
            .peers
            .call(node_id, address, "/cluster/v1/status", &(), CALL_TIMEOUT)
            .await;
        let status = status.map_err(|e| {
            EngineError::InvalidRequest(format!(
                "node {node_id} at {address} cannot be reached as node {node_id}: {e}"
            ))
        })?;
        if status.engine_state == EngineState::Active.as_str() {
            return Err(EngineError::InvalidRequest(format!(
                "node {node_id} is active (it holds keys): zeroize it first, or remove it"
            )));
        }
        // A zeroized member lost its Raft state: it leaves the membership
        // and re-enters as a new learner, never as a voter with amnesia.
        let voters: BTreeSet<u64> = voter_set(raft);
        if voters.contains(&node_id) {
            let remaining: BTreeSet<u64> =
                voters.iter().copied().filter(|v| *v != node_id).collect();
            raft.change_membership(remaining, false)
                .await
                .map_err(unavailable)?;
        }
        if voters.contains(&node_id) || status.engine_state == EngineState::Zeroized.as_str() {
            // The member zeroized; rotating makes sure nothing it might have
            // kept (before its erase) opens what is written from now on. It
            // rejoins with the new key below. (Also when an earlier attempt
            // already took it out but failed before rotating.)
            self.rotate_key_as_leader(raft).await?;
        }
        let key = self.engine.cluster_key()?.into_secret();
        let join = JoinRequest {
            init_token: Zeroizing::new(init_token.expose_secret().to_string()),
            cluster_key: Zeroizing::new(STANDARD.encode(key.expose_secret())),
        };
        let joined: Result<Done, NetError> = self
            .peers
            .call(node_id, address, "/cluster/v1/join", &join, CALL_TIMEOUT)
            .await;
        match joined {
            Ok(Done::Ok) => {}
            Ok(Done::Failed(e)) => {
                return Err(EngineError::InvalidRequest(format!(
                    "node {node_id} refused to join: {e}"
                )))
            }
            Err(e) => return Err(unavailable(e)),
        }
        raft.add_learner(node_id, BasicNode::new(address), true)
            .await
            .map_err(unavailable)?;
        let mut voters: BTreeSet<u64> = voter_set(raft);
        voters.insert(node_id);
        raft.change_membership(voters, false)
            .await
            .map_err(unavailable)?;
        tracing::warn!(node = node_id, address, "cluster: node added");
        Ok(())
    }

    /// Rotates the cluster key (on the leader only): see
    /// [`Cluster::rotate_key_as_leader`].
    pub async fn rotate_key(&self) -> Result<ClusterStatus, EngineError> {
        let raft = self.ready_raft().await?;
        self.require_leader(&raft)?;
        self.rotate_key_as_leader(&raft).await?;
        Ok(self.status())
    }

    /// Commits a cluster-key rotation: a fresh key, sealed under one
    /// derived from the current key, in one entry every member applies by
    /// re-sealing its whole store (`Engine::apply_rotation`). Run after a
    /// member leaves (removed, or a zeroized member taken out before it
    /// rejoins), so the copy of the key a departed node had (on a stolen
    /// disk, say) opens nothing written after. Every session ends.
    async fn rotate_key_as_leader(&self, raft: &Raft) -> Result<(), EngineError> {
        let engine = self.engine.clone();
        let (wrapped, mac) = tokio::task::spawn_blocking(move || engine.cluster_key_rotation())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))??;
        let req = Request {
            ops: Vec::new(),
            mac: hex::encode(mac),
            rotate: Some(STANDARD.encode(wrapped)),
        };
        let written = tokio::time::timeout(WRITE_DEADLINE, raft.client_write(req))
            .await
            .map_err(|_| {
                outcome_unknown("the key rotation could not commit within 10 s (lost majority?)")
            })?
            .map_err(outcome_unknown)?;
        conflict_to_error(written.data.conflict)?;
        tracing::warn!(
            key_id = self.engine.cluster_key_id().unwrap_or_default(),
            "cluster: cluster key rotated"
        );
        Ok(())
    }

    /// Removes node `node_id` from the membership (on the leader only).
    pub async fn remove_node(&self, node_id: u64) -> Result<ClusterStatus, EngineError> {
        let raft = self.ready_raft().await?;
        self.require_leader(&raft)?;
        self.remove_node_as_leader(&raft, node_id).await?;
        Ok(self.status())
    }

    async fn remove_node_as_leader(&self, raft: &Raft, node_id: u64) -> Result<(), EngineError> {
        let voters: BTreeSet<u64> = voter_set(raft);
        if !voters.contains(&node_id) {
            return Err(EngineError::InvalidRequest(format!(
                "node {node_id} is not a voting member"
            )));
        }
        let remaining: BTreeSet<u64> = voters.into_iter().filter(|v| *v != node_id).collect();
        if remaining.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the last member cannot be removed".into(),
            ));
        }
        raft.change_membership(remaining, false)
            .await
            .map_err(unavailable)?;
        tracing::warn!(node = node_id, "cluster: node removed");
        // What it held opens nothing written from now on.
        self.rotate_key_as_leader(raft).await
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let engine_state = self.engine.state().as_str().to_string();
        let Some(raft) = self.raft() else {
            return ClusterStatus {
                node_id: self.cfg.node_id,
                advertise: self.cfg.advertise.clone(),
                raft_state: "stopped".into(),
                engine_state,
                leader: None,
                term: 0,
                last_log_index: None,
                last_applied: None,
                voters: Vec::new(),
                learners: Vec::new(),
                nodes: BTreeMap::new(),
                replication: BTreeMap::new(),
                cluster_key_id: None,
            };
        };
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        ClusterStatus {
            node_id: self.cfg.node_id,
            advertise: self.cfg.advertise.clone(),
            raft_state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            engine_state,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            replication: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            cluster_key_id: self.engine.cluster_key_id().ok(),
        }
    }

    /// Stops Raft (shutdown).
    pub async fn stop(&self) {
        let raft = write_lock(&self.raft).take();
        if let Some(raft) = raft {
            let _ = raft.shutdown().await;
        }
    }

    pub(crate) fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.server_tls.clone()
    }

    /// The join, on the joining node: its own init token and the cluster
    /// key from the member that dialled it.
    fn accept_join(&self, req: JoinRequest) -> Result<(), EngineError> {
        let key = STANDARD
            .decode(req.cluster_key.as_bytes())
            .map_err(|_| EngineError::InvalidRequest("cluster key is not base64".into()))?;
        self.engine.join_cluster(
            &SecretString::new(req.init_token.to_string()),
            SecretBytes::new(key),
        )
    }
}

/// The voting members, as this node's Raft knows them now.
fn voter_set(raft: &Raft) -> BTreeSet<u64> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

fn conflict_to_error(conflict: Option<String>) -> Result<(), EngineError> {
    match conflict {
        None => Ok(()),
        Some(c) => Err(EngineError::Conflict(c)),
    }
}

/// Checks `[cluster]`'s TLS files as the cluster port would load them
/// (`hsmgate check` and reload validation run this).
pub fn check_tls(cfg: &ClusterConfig) -> Result<(), ClusterError> {
    tls_configs(cfg).map(|_| ())
}

/// The cluster port's server config (client certificates required, from
/// the cluster CA) and the client config for dialling members (this
/// node's certificate; servers checked against the cluster CA). TLS 1.3 only.
fn tls_configs(
    cfg: &ClusterConfig,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), ClusterError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: &dyn std::fmt::Display| ClusterError::Tls(e.to_string());
    let roots = crate::gateway::tls::read_client_ca(&cfg.ca_file)
        .map_err(|e| ClusterError::Tls(format!("{}: {e}", cfg.ca_file.display())))?;
    let roots = Arc::new(roots);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| ClusterError::Tls(format!("{}: {e}", cfg.cert_file.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ClusterError::Tls(format!("{}: {e}", cfg.cert_file.display())))?;
    let Some(leaf) = certs.first() else {
        return Err(ClusterError::Tls(format!(
            "{} holds no certificate",
            cfg.cert_file.display()
        )));
    };
    match certs::role_of(leaf) {
        Some(certs::Role::Node(id)) if id == cfg.node_id => {}
        other => {
            return Err(ClusterError::Tls(format!(
                "{} is not a certificate for node {} (it names {:?}); issue one with \
                 `hsmgate cluster certs`",
                cfg.cert_file.display(),
                cfg.node_id,
                other
            )))
        }
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| ClusterError::Tls(format!("{}: {e}", cfg.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(&e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| tls(&e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| tls(&e))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}
