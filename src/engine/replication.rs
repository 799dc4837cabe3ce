//! Where the engine's writes go: the local store, or a cluster.
//!
//! Every change to a replicated record (key rings, users) is built as
//! sealed [`RecordOp`]s and handed to [`Engine::commit`]. On a single node
//! the ops apply to the local store at once; on a cluster member they go to
//! the [`Replicator`] (`crate::cluster`), which commits them through Raft
//! and returns once this node has applied them. Either way the in-memory
//! key rings are refreshed from the applied ops ([`Engine::apply_ops`]), the
//! one path by which rings enter the cache after a write — so a follower
//! applying the leader's entries and a single node writing its own end up
//! in the same state.
//!
//! Nothing here holds the engine's state lock while waiting for a cluster:
//! applying an entry takes it (read), and a queued zeroize (write) would
//! otherwise wait behind a reader that waits for the apply.
use std::sync::Arc;

use super::store::{Conflict, MasterKey, RecordOp, ReplicatedState, Store, Table};
use super::{
    keyring::KeyRing, lock, read, write, Active, Engine, EngineError, EngineState, SealParams,
};
use crate::engine::secret::{SecretBytes, SecretString};

/// The purpose of the key that authenticates Raft entries.
const ENTRY_MAC: &str = "cluster/entry-mac";
/// What a cluster-key rotation entry's tag is derived for.
const ROTATION_MAC: &str = "cluster/rotation-mac";
/// The purpose of the key that authenticates cluster session tokens.
const SESSION_MAC: &str = "cluster/session-mac";
/// Reserved key-table records naming logged-out cluster tokens:
/// `.revoked.<hex SHA-256 of the token>`, value: its expiry (unix seconds).
const REVOKED_PREFIX: &str = ".revoked.";
const CLUSTER_TOKEN_PREFIX: &str = "hsmc.";

/// What a cluster session token carries (MAC'd; not secret, not encrypted:
/// names, role, times, policies and a digest of the password hash).
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionClaims {
    u: String,
    r: super::Role,
    iat: u64,
    exp: u64,
    #[serde(default)]
    p: Vec<String>,
    /// HSM users: hex of the first 16 bytes of SHA-256(password hash), so
    /// a password reset or change ends every token issued before it.
    #[serde(default)]
    h: Option<String>,
    /// An app principal (`auth/jwt/login`): no HSM user behind it.
    #[serde(default)]
    a: bool,
    /// Random: two logins in the same second get different tokens.
    n: String,
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn password_tag(hash: &str) -> String {
    hex::encode(&crate::engine::crypto::sha256(hash.as_bytes())[..16])
}

/// A cluster, as the engine sees it (implemented by `crate::cluster`).
pub trait Replicator: Send + Sync {
    /// Commits `ops` as one entry through the cluster's leader; returns
    /// once the entry is committed and applied on this node. A failed
    /// precondition comes back as [`EngineError::Conflict`].
    fn replicate(&self, ops: Vec<RecordOp>) -> Result<(), EngineError>;
    /// Waits until this node has applied everything the leader had
    /// committed when this was called (a linearizable read point).
    fn catch_up(&self) -> Result<(), EngineError>;
    /// The engine became active. `fresh`: a new store (init, restore) that
    /// starts a new cluster; otherwise a restart or a join.
    fn activated(&self, fresh: bool);
    /// The engine zeroized itself: leave the cluster's traffic, erase the
    /// local Raft log (its entries are sealed under the cluster key).
    fn zeroized(&self);
}

impl Engine {
    /// Makes this engine a cluster member: from now on its writes go
    /// through `r`. Set once, at start, before any request.
    pub fn set_replicator(&self, r: Arc<dyn Replicator>) {
        let _ = self.replicator.set(r);
    }

    /// Whether writes go through a cluster.
    pub fn clustered(&self) -> bool {
        self.replicator.get().is_some()
    }

    /// Applies `ops` (one batch, all or nothing): through the cluster when
    /// there is one, else to the local store. Callers hold no state lock.
    pub(super) fn commit(&self, ops: Vec<RecordOp>) -> Result<(), EngineError> {
        if let Some(r) = self.replicator.get() {
            return r.replicate(ops);
        }
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        match active.store.apply_ops(&ops, None, None)? {
            Ok(()) => {
                self.refresh(active, &ops);
                Ok(())
            }
            Err(c) => Err(EngineError::Conflict(c.to_string())),
        }
    }

    /// On a cluster member: waits until this node has seen every write the
    /// leader has committed (used before answering "not found", so a key
    /// created through another member is never a 404 here). A no-op alone.
    pub(super) fn catch_up(&self) -> Result<(), EngineError> {
        match self.replicator.get() {
            Some(r) => r.catch_up(),
            None => Ok(()),
        }
    }

    /// The cluster's state machine: applies one committed entry's ops and
    /// its metadata (`applied`, `membership`: opaque here) in one store
    /// transaction. `Ok(Err(conflict))` is a deterministic refusal (the
    /// same on every member), not a failure.
    ///
    /// `mac` (entries with ops) must be [`Engine::entry_mac`] of `ops`: an
    /// entry that does not carry a member's tag (forged by someone with a
    /// node certificate but without the cluster key) applies as a refused
    /// no-op, the same on every member.
    pub fn apply_replicated(
        &self,
        ops: &[RecordOp],
        mac: &[u8],
        applied: &[u8],
        membership: Option<&[u8]>,
    ) -> Result<Result<(), Conflict>, EngineError> {
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        let authentic = ops.is_empty() || {
            let bytes =
                serde_json::to_vec(ops).map_err(|e| EngineError::Internal(e.to_string()))?;
            active.store.verify_mac(ENTRY_MAC, &bytes, mac)
        };
        if !authentic {
            tracing::error!(
                ops = ops.len(),
                "cluster: an entry without a valid member tag was refused (forged by a \
                 certificate holder without the cluster key, or tagged under the key a \
                 rotation just replaced)"
            );
            return refuse_entry(&active.store, applied, membership);
        }
        let outcome = active.store.apply_ops(ops, Some(applied), membership)?;
        if outcome.is_ok() {
            self.refresh(active, ops);
        }
        Ok(outcome)
    }

    /// A cluster-key rotation entry's payload and tag: a fresh key sealed
    /// under a key derived from the current cluster key, and an HMAC over
    /// it under another (only members can make either).
    pub fn cluster_key_rotation(&self) -> Result<(Vec<u8>, [u8; 32]), EngineError> {
        self.with_active(|a| {
            let wrapped = a.store.next_cluster_key()?;
            let mac = a.store.mac(ROTATION_MAC, &wrapped);
            Ok((wrapped, mac))
        })
    }

    /// The state machine's side of a cluster-key rotation (see
    /// [`crate::engine::store::Store::rotate_cluster_key`]): every record
    /// re-sealed under the new key in one transaction, then every session
    /// on this member ends — cluster session tokens are tagged under the
    /// cluster key, and the point of rotating is that a member that left
    /// (zeroized, removed, or stolen with its disk) holds only the old one.
    /// An entry whose tag does not verify applies as a refused no-op.
    pub fn apply_rotation(
        &self,
        wrapped: &[u8],
        mac: &[u8],
        applied: &[u8],
        membership: Option<&[u8]>,
    ) -> Result<Result<(), Conflict>, EngineError> {
        let outcome = self.with_active(|active| {
            if !active.store.verify_mac(ROTATION_MAC, wrapped, mac) {
                tracing::error!(
                    "cluster: a key rotation entry without a valid member tag was refused"
                );
                return refuse_entry(&active.store, applied, membership);
            }
            let rotated = active
                .store
                .rotate_cluster_key(wrapped, Some(applied), membership)?;
            Ok(rotated.map(|generation| {
                tracing::warn!(
                    generation,
                    "cluster: the cluster key was rotated; every record is re-sealed under the \
                     new key and every session ended"
                );
            }))
        })?;
        if outcome.is_ok() {
            lock(&self.sessions).clear();
        }
        Ok(outcome)
    }

    /// This member's cluster key id (public: names the key, not the key).
    pub fn cluster_key_id(&self) -> Result<String, EngineError> {
        self.with_active(|a| Ok(hex::encode(&a.store.key_id()[..8])))
    }

    /// The tag that authenticates a batch of ops as written by a member
    /// (one that holds the cluster key), for the Raft entry carrying it.
    pub fn entry_mac(&self, ops: &[RecordOp]) -> Result<[u8; 32], EngineError> {
        let bytes = serde_json::to_vec(ops).map_err(|e| EngineError::Internal(e.to_string()))?;
        self.with_active(|a| Ok(a.store.mac(ENTRY_MAC, &bytes)))
    }

    /// A session token every member can verify: `hsmc.<claims>.<tag>`,
    /// base64url, the tag an HMAC under a key derived from the cluster key.
    pub(super) fn cluster_session_token(
        &self,
        principal: &super::Principal,
        password_hash: Option<&str>,
    ) -> Result<SecretString, EngineError> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let claims = SessionClaims {
            u: principal.username.clone(),
            r: principal.role,
            iat: unix(principal.issued_at),
            exp: unix(principal.expires_at),
            p: principal.app_policies.clone(),
            h: password_hash.map(password_tag),
            a: password_hash.is_none(),
            n: hex::encode(&*crate::engine::crypto::random_bytes(12)?),
        };
        let body = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).map_err(|e| EngineError::Internal(e.to_string()))?);
        let tag = self.with_active(|a| Ok(a.store.mac(SESSION_MAC, body.as_bytes())))?;
        Ok(SecretString::new(format!(
            "{CLUSTER_TOKEN_PREFIX}{body}.{}",
            URL_SAFE_NO_PAD.encode(tag)
        )))
    }

    /// Verifies a cluster session token issued by any member: its tag,
    /// expiry, no replicated logout; for an HSM user, that the user still
    /// exists with that role and password and is not locked on this node.
    pub(super) fn verify_cluster_session(
        &self,
        token: &str,
        digest: &[u8; 32],
    ) -> Result<super::Principal, EngineError> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let denied = || EngineError::PermissionDenied;
        if !self.clustered() {
            return Err(denied());
        }
        let rest = token
            .strip_prefix(CLUSTER_TOKEN_PREFIX)
            .ok_or_else(denied)?;
        let (body, tag) = rest.split_once('.').ok_or_else(denied)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| denied())?;
        let authentic =
            self.with_active(|a| Ok(a.store.verify_mac(SESSION_MAC, body.as_bytes(), &tag)))?;
        if !authentic {
            return Err(denied());
        }
        let claims: SessionClaims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(denied)?;
        let now = unix(std::time::SystemTime::now());
        if claims.exp <= now || lock(&self.revoked).contains(digest) {
            return Err(denied());
        }
        if let Some(h) = &claims.h {
            let user = self
                .with_active(|a| Ok(a.store.get_user(&claims.u)?))?
                .ok_or_else(denied)?;
            if user.role != claims.r || user.locked || password_tag(&user.password_hash) != *h {
                return Err(denied());
            }
        } else if !claims.a {
            // Neither an HSM user nor an app: nothing this engine issues.
            return Err(denied());
        }
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        Ok(super::Principal {
            username: claims.u,
            role: claims.r,
            issued_at: at(claims.iat),
            expires_at: at(claims.exp),
            app_policies: claims.p,
        })
    }

    /// Logs a cluster token out on every member: a replicated record
    /// naming its digest (kept until the store is re-created; one small
    /// record per logout).
    pub(super) fn revoke_cluster_session(&self, token: &str) -> Result<(), EngineError> {
        if !token.starts_with(CLUSTER_TOKEN_PREFIX) {
            return Ok(());
        }
        let digest = crate::engine::crypto::sha256(token.as_bytes());
        let name = format!("{REVOKED_PREFIX}{}", hex::encode(digest));
        let op = self.with_active(|a| {
            Ok(a.store.put_op(
                Table::Keys,
                &name,
                unix(std::time::SystemTime::now()).to_string().as_bytes(),
                super::store::Expect::Any,
            )?)
        })?;
        lock(&self.revoked).insert(digest);
        self.commit(vec![op])
    }

    /// Deletes the replicated logout records that no token can need any
    /// more: a record is written at logout and a session lives at most
    /// [`crate::config::MAX_SESSION_TTL_SECS`], so once that long (and a
    /// day of clock-skew margin) has passed, the token it revokes has
    /// expired on every member whatever its TTL. One batch, replicated like
    /// any write; a record that changed meanwhile is left for the next
    /// pass. Run on the leader by the server's timer. Returns how many
    /// records were deleted.
    pub fn prune_logouts(&self, now: u64) -> Result<usize, EngineError> {
        const MARGIN_SECS: u64 = 86_400;
        if self.state() != super::EngineState::Active {
            return Ok(0);
        }
        let names =
            self.with_active(|a| Ok(a.store.names_with_prefix(Table::Keys, REVOKED_PREFIX)?))?;
        let mut ops = Vec::new();
        for name in names {
            let read = self.with_active(|a| Ok(a.store.read_for_update(Table::Keys, &name)?))?;
            let logged_out = read
                .plaintext
                .as_deref()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|t| t.parse::<u64>().ok());
            let Some(at) = logged_out else { continue };
            if now > at.saturating_add(crate::config::MAX_SESSION_TTL_SECS + MARGIN_SECS) {
                ops.push(RecordOp {
                    table: Table::Keys,
                    name,
                    sealed: None,
                    expect: read.expect,
                    clear_counters: false,
                });
            }
        }
        let pruned = ops.len();
        if pruned > 0 {
            self.commit(ops)?;
            self.reload_revocations()?;
        }
        Ok(pruned)
    }

    /// Re-reads the replicated logouts (activation, snapshot install).
    pub fn reload_revocations(&self) -> Result<(), EngineError> {
        let names =
            self.with_active(|a| Ok(a.store.names_with_prefix(Table::Keys, REVOKED_PREFIX)?))?;
        let mut set = std::collections::HashSet::new();
        for name in names {
            if let Some(d) = revoked_digest(&name) {
                set.insert(d);
            }
        }
        *lock(&self.revoked) = set;
        Ok(())
    }

    /// The state machine's stored metadata (last applied, membership).
    #[allow(clippy::type_complexity)]
    pub fn replicated_meta(&self) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>), EngineError> {
        self.with_active(|a| Ok(a.store.sm_meta()?))
    }

    /// Every replicated record, sealed, with the metadata (a snapshot).
    pub fn replicated_state(&self) -> Result<ReplicatedState, EngineError> {
        self.with_active(|a| Ok(a.store.export_replicated()?))
    }

    /// Installs a snapshot: replaces every replicated record, then reloads
    /// the key rings and drops every session (users may have changed).
    ///
    /// Takes no `key_writes`: a local write may be holding it while it
    /// waits for this very state machine to apply its entry. Installs and
    /// applies are serialized by the state machine itself, and a local
    /// write racing an install fails its precondition and is recomputed.
    pub fn install_replicated(&self, state: &ReplicatedState) -> Result<(), EngineError> {
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        active.store.install_replicated(state)?;
        let rings = super::load_rings(&active.store)?;
        *write(&active.keys) = rings;
        drop(inner);
        lock(&self.sessions).clear();
        self.reload_revocations()
    }

    /// The cluster key (this store's master key), for a node joining.
    pub fn cluster_key(&self) -> Result<MasterKey, EngineError> {
        self.with_active(|a| Ok(a.store.cluster_key()))
    }

    /// Joins a cluster: an uninitialized or zeroized node, given its own
    /// init token (proof that the crypto officer has this machine's data
    /// dir) and the cluster key by a member, creates an empty store whose
    /// master key is the cluster key (wrapped under a fresh local key
    /// file) and becomes active; its records then arrive by Raft snapshot.
    /// Auto seal mode only.
    pub fn join_cluster(
        &self,
        init_token: &SecretString,
        cluster_key: SecretBytes,
    ) -> Result<(), EngineError> {
        let master = MasterKey::from_secret(cluster_key)?;
        {
            let mut inner = write(&self.inner);
            if matches!(inner.state, EngineState::Active | EngineState::Sealed) {
                return Err(EngineError::AlreadyInitialized);
            }
            inner.check_init_token(init_token)?;
            if self.config.seal != super::SealMode::Auto {
                return Err(EngineError::InvalidRequest(
                    "cluster members use seal = \"auto\" in this version".into(),
                ));
            }
            let kek = MasterKey::generate()?.into_secret();
            super::store::write_atomic(&self.paths.master_key, kek.expose_secret(), 0o600)?;
            let store = Store::create_member(&self.paths.store, kek, SealParams::Auto, master)?;
            self.write_state(EngineState::Active, inner.zeroizations, None)?;
            super::remove_if_exists(&self.paths.init_token)?;
            inner.init_token = None;
            inner.active = Some(Active::load(store)?);
            inner.state = EngineState::Active;
            inner.seal_params = Some(SealParams::Auto);
            lock(&self.user_locks).clear();
        }
        tracing::warn!("joined a cluster: records arrive from the leader");
        if let Some(r) = self.replicator.get() {
            r.activated(false);
        }
        Ok(())
    }

    /// Tells the cluster the engine became active (after the state lock is released).
    pub(super) fn notify_activated(&self, fresh: bool) {
        if let Some(r) = self.replicator.get() {
            r.activated(fresh);
        }
    }

    /// Tells the cluster the engine zeroized.
    pub(super) fn notify_zeroized(&self) {
        if let Some(r) = self.replicator.get() {
            r.zeroized();
        }
    }

    /// Brings the cache in line with applied ops: key rings re-read from
    /// their sealed records (reserved `.` records are not rings); deleted
    /// users and reset passwords end that user's sessions on this node.
    fn refresh(&self, active: &Active, ops: &[RecordOp]) {
        for op in ops {
            match op.table {
                Table::Keys if op.name.starts_with(REVOKED_PREFIX) => {
                    if let Some(d) = revoked_digest(&op.name) {
                        lock(&self.revoked).insert(d);
                        lock(&self.sessions).remove(&d);
                    }
                }
                Table::Keys if op.name.starts_with('.') => {}
                Table::Keys => {
                    let ring = op.sealed.as_ref().and_then(|sealed| {
                        let plain = active.store.unseal("keys", &op.name, sealed).ok()?;
                        match KeyRing::from_record(&op.name, &plain) {
                            Ok(r) => Some(Arc::new(r)),
                            Err(e) => {
                                tracing::error!(key = %op.name, error = %e, "applied key record does not parse");
                                None
                            }
                        }
                    });
                    match ring {
                        Some(r) => {
                            write(&active.keys).insert(op.name.clone(), r);
                        }
                        None => {
                            write(&active.keys).remove(&op.name);
                        }
                    }
                }
                Table::Users => {
                    if op.sealed.is_none() || op.clear_counters {
                        self.revoke_user_sessions(&op.name);
                    }
                }
            }
        }
    }
}

fn revoked_digest(name: &str) -> Option<[u8; 32]> {
    let hex_digest = name.strip_prefix(REVOKED_PREFIX)?;
    hex::decode(hex_digest).ok()?.try_into().ok()
}

/// Applies an entry that failed its tag as a no-op (the state machine's
/// metadata still advances), the same refusal on every member.
fn refuse_entry(
    store: &Store,
    applied: &[u8],
    membership: Option<&[u8]>,
) -> Result<Result<(), Conflict>, EngineError> {
    let _noop_applied = store.apply_ops(&[], Some(applied), membership)?;
    Ok(Err(Conflict {
        table: "entry",
        name: "unauthenticated".into(),
    }))
}

#[cfg(test)]
mod tests {
    use crate::engine::auto_rotate::tests::active_engine;
    use crate::engine::{EngineError, Principal, Role};

    #[test]
    fn creating_an_existing_user_says_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let engine = active_engine(dir.path());
        let now = std::time::SystemTime::now();
        let co = Principal {
            username: "admin".into(),
            role: Role::CryptoOfficer,
            issued_at: now,
            expires_at: now + std::time::Duration::from_secs(60),
            app_policies: Vec::new(),
        };
        let pw = crate::engine::secret::SecretString::new("a long enough password".into());
        engine
            .create_user(&co, "carol", &pw, Role::CryptoUser)
            .unwrap();
        assert!(matches!(
            engine.create_user(&co, "carol", &pw, Role::CryptoUser),
            Err(EngineError::UserExists(_))
        ));
    }

    #[test]
    fn a_logout_record_is_pruned_only_once_no_token_can_need_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = active_engine(dir.path());
        engine.revoke_cluster_session("hsmc.a-token").unwrap();
        let now = super::unix(std::time::SystemTime::now());
        let horizon = crate::config::MAX_SESSION_TTL_SECS + 86_400;
        // Keep: a token logged out within the longest TTL (+ margin) may
        // still be presented.
        assert_eq!(engine.prune_logouts(now + horizon - 10).unwrap(), 0);
        assert!(engine
            .revoked
            .lock()
            .unwrap()
            .contains(&crate::engine::crypto::sha256(b"hsmc.a-token")));
        // Drop: past it, the token has expired everywhere.
        assert_eq!(engine.prune_logouts(now + horizon + 10).unwrap(), 1);
        assert!(engine.revoked.lock().unwrap().is_empty());
        assert_eq!(engine.prune_logouts(now + horizon + 10).unwrap(), 0);
    }
}
