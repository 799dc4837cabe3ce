//! The software HSM engine: its state machine (uninitialized → active →
//! zeroized), users and their login counters, the sealed store, key rings
//! and the operations on them.
//!
//! The engine enforces its own rules whatever the caller: the role checks,
//! the consecutive-failure counters (counted *before* the password is
//! checked, in the same per-user critical section), and zeroization. The
//! gateway only tells it facts it cannot know itself: which channel a login
//! came through and whether the peer sits on an admin network.
//!
//! Blocking: `login`, `init`, `create_user` and key generation do real work
//! (argon2, key generation, fsync); async callers run them on a blocking thread.
pub mod auto_rotate;
pub mod backup;
pub mod crypto;
pub mod keyring;
pub mod replication;
pub mod seal;
#[cfg(test)]
mod seal_tests;
pub mod secret;
pub mod store;
pub mod transit_backup;
pub mod users;
pub mod wrap;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::EngineConfig;
use crypto::{CryptoError, ExportKind, HashAlgorithm, KeyType, SignOptions};
use keyring::{KeyConfigChange, KeyOptions, KeyRing};
use seal::{SealMode, SealParams};
use secret::{SecretBytes, SecretString};
use store::{Expect, LockedStore, MasterKey, RecordOp, Store, StoreError, Table, UserRecord};

pub use replication::Replicator;

pub const ADMIN_USERNAME: &str = "admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Administers users and the HSM; does not use keys (as in CloudHSM).
    CryptoOfficer,
    /// Uses keys.
    CryptoUser,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::CryptoOfficer => "crypto-officer",
            Role::CryptoUser => "crypto-user",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Uninitialized,
    /// Initialized in a sealed mode, its master key not yet supplied
    /// (`POST /v1/hsm/unseal`).
    Sealed,
    Active,
    Zeroized,
}

impl EngineState {
    pub fn as_str(&self) -> &'static str {
        match self {
            EngineState::Uninitialized => "uninitialized",
            EngineState::Sealed => "sealed",
            EngineState::Active => "active",
            EngineState::Zeroized => "zeroized",
        }
    }
}

/// The way a login reached the engine: the normal listeners, or the
/// break-glass listener. The login guard keeps the crypto officer's last
/// attempts for break-glass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    FrontDoor,
    BreakGlass,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is {0:?}, not active")]
    NotActive(EngineState),
    #[error("the engine is already initialized")]
    AlreadyInitialized,
    #[error("the init token is missing or wrong")]
    InvalidInitToken,
    /// One variant for every login failure: the caller must not learn why.
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error(
        "login refused by the login guard: the crypto officer has {attempts_left} attempt(s) left \
         before the HSM zeroizes, and the front door never spends the last {reserve}; log in \
         through the break-glass listener (a success there resets the count)"
    )]
    GuardRefused { attempts_left: u32, reserve: u32 },
    #[error("permission denied")]
    PermissionDenied,
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    #[error("user {0:?} not found")]
    UserNotFound(String),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("key {0:?} exists with another type")]
    KeyTypeMismatch(String),
    #[error("deletion is not allowed for key {0:?}: set deletion_allowed in its config first")]
    DeletionNotAllowed(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// The unseal secret did not open the master key (wrong passphrase or
    /// shares); counted in `unseal_failures`, nothing else changes.
    #[error("unseal failed: {0}")]
    UnsealFailed(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("storage failure: {0}")]
    Storage(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A record changed between this write's read and its commit (another
    /// cluster member wrote it); retried once after catching up.
    #[error("{0}")]
    Conflict(String),
    /// The cluster cannot commit now (no leader, no quorum, leader unreachable).
    #[error("cluster unavailable: {0}")]
    Cluster(String),
}

/// Who is calling, as established by a session token or an app JWT.
#[derive(Debug, Clone)]
pub struct Principal {
    pub username: String,
    pub role: Role,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// Policies an app JWT's role maps to (empty for HSM users), carried for
    /// the access-policy phase.
    pub app_policies: Vec<String>,
}

impl Principal {
    /// An app authenticated by a JWT: it uses keys like a crypto user and
    /// can never administer (`crate::auth` builds it).
    pub fn app(name: String, policies: Vec<String>, expires_at: SystemTime) -> Principal {
        Principal {
            username: name,
            role: Role::CryptoUser,
            issued_at: SystemTime::now(),
            expires_at,
            app_policies: policies,
        }
    }

    pub fn policies(&self) -> Vec<String> {
        let mut p = vec![self.role.as_str().to_string()];
        p.extend(self.app_policies.iter().cloned());
        p
    }
}

/// What a successful login hands back.
pub struct LoginSuccess {
    pub token: SecretString,
    pub principal: Principal,
}

pub struct LoginRequest<'a> {
    pub username: &'a str,
    pub password: &'a SecretString,
    pub channel: Channel,
    /// Whether the peer is on an admin network. A crypto-officer login from
    /// elsewhere fails like a wrong password and counts nothing.
    pub officer_allowed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserStatus {
    pub username: String,
    pub role: Role,
    pub consecutive_failures: u32,
    pub attempts_left: u32,
    pub locked: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: EngineState,
    /// How many times this data dir has been zeroized, ever.
    pub zeroizations: u64,
    pub zeroize_after_failures: u32,
    pub lock_user_after_failures: u32,
    pub login_guard_reserve: u32,
    pub users: Vec<UserStatus>,
    pub keys: usize,
    /// `auto`, `passphrase` or `shamir` (the store's seal; config's before init).
    pub seal_type: &'static str,
    /// Wrong unseal attempts since this process started (memory only).
    pub unseal_failures: u64,
    /// The master key's generation (1 at init, +1 per rotation); 0 unless active.
    pub master_key_generation: u64,
}

/// `sys/seal-status` in Vault's shape.
#[derive(Debug, Clone, Serialize)]
pub struct SealStatus {
    #[serde(rename = "type")]
    pub seal_type: &'static str,
    pub initialized: bool,
    pub sealed: bool,
    pub t: u8,
    pub n: u8,
    pub progress: usize,
    pub nonce: String,
    pub version: &'static str,
    pub migration: bool,
    pub recovery_seal: bool,
    pub storage_type: &'static str,
    /// hsmgate's own state name (`sealed`, `active`, `zeroized`, ...).
    pub engine_state: &'static str,
}

/// What init hands back once: the unseal shares in Shamir mode.
#[derive(Debug, Default)]
pub struct InitOutcome {
    pub seal_type: &'static str,
    /// base64 Shamir shares (Vault's `keys_base64`); empty in other modes.
    pub shares: Vec<String>,
}

/// Survives zeroization: the engine's lifecycle, written atomically.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    state: EngineState,
    zeroizations: u64,
    last_zeroized_at: Option<u64>,
}

struct Paths {
    store: PathBuf,
    /// A store being created (init, restore) before its rename into place;
    /// a crash can leave one behind, shredded at the next start.
    store_tmp: PathBuf,
    master_key: PathBuf,
    /// Auto mode's next key file during a master-key rotation.
    master_key_next: PathBuf,
    state: PathBuf,
    init_token: PathBuf,
}

struct Active {
    store: Store,
    keys: RwLock<HashMap<String, Arc<KeyRing>>>,
}

impl Active {
    /// Opens every key ring of an unlocked store.
    fn load(store: Store) -> Result<Active, EngineError> {
        let keys = load_rings(&store)?;
        Ok(Active {
            store,
            keys: RwLock::new(keys),
        })
    }
}

fn load_rings(store: &Store) -> Result<HashMap<String, Arc<KeyRing>>, EngineError> {
    let mut keys = HashMap::new();
    for (name, bytes) in store.keys()? {
        // Reserved records (names no user key can take) are not key rings
        // for Transit; their owners read them on demand.
        if name.starts_with('.') {
            continue;
        }
        let ring = KeyRing::from_record(&name, &bytes)?;
        keys.insert(name, Arc::new(ring));
    }
    Ok(keys)
}

fn new_nonce() -> Result<String, EngineError> {
    Ok(hex::encode(&*crypto::random_bytes(16)?))
}

struct Inner {
    state: EngineState,
    active: Option<Active>,
    /// Present exactly while uninitialized or zeroized.
    init_token: Option<SecretBytes>,
    zeroizations: u64,
    /// The store while sealed: open, keys unknown.
    locked: Option<LockedStore>,
    /// The store's seal, once there is a store.
    seal_params: Option<SealParams>,
    /// Shamir shares given so far (memory only; cleared by success,
    /// failure, reset, seal and restart).
    unseal_shares: Vec<Zeroizing<Vec<u8>>>,
    /// Vault's unseal nonce: names the current share collection.
    unseal_nonce: String,
    unseal_failures: u64,
}

impl Inner {
    /// The one-time init token, compared in constant time (init and restore
    /// both need it).
    fn check_init_token(&self, init_token: &SecretString) -> Result<(), EngineError> {
        let token_ok = self
            .init_token
            .as_ref()
            .is_some_and(|t| t.ct_eq(init_token.expose_secret().as_bytes()));
        if token_ok {
            Ok(())
        } else {
            Err(EngineError::InvalidInitToken)
        }
    }
}

pub struct Engine {
    paths: Paths,
    config: EngineConfig,
    inner: RwLock<Inner>,
    /// One lock per existing user: a login holds it from the count through
    /// the password check, so concurrent attempts are strictly sequential.
    user_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Session tokens by SHA-256 of the token (never the token itself).
    sessions: Mutex<HashMap<[u8; 32], Principal>>,
    /// Serializes key ring updates (create/rotate/config/delete) so two
    /// writers cannot lose each other's version.
    key_writes: Mutex<()>,
    /// Set when this engine is a cluster member (`crate::cluster`).
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// Cluster session tokens logged out anywhere in the cluster (SHA-256
    /// of the token), from the replicated `.revoked.` records.
    revoked: Mutex<std::collections::HashSet<[u8; 32]>>,
}

// A poisoned lock means a panic mid-update of in-memory state; the durable
// truth is the store, so carrying on with the inner value is sound.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    /// The engine of a gateway that has none (`[upstream]`): never
    /// initialized, owning no file (every path is empty, so a stray write
    /// fails instead of landing anywhere), and reached by no route — the
    /// gateway forwards every request to remote nodes (`crate::upstream`).
    pub fn absent(config: EngineConfig) -> Engine {
        let none = PathBuf::new();
        let paths = Paths {
            store: none.clone(),
            store_tmp: none.clone(),
            master_key: none.clone(),
            master_key_next: none.clone(),
            state: none.clone(),
            init_token: none,
        };
        Engine::with_paths(paths, config, 0)
    }

    /// Whether this is [`Engine::absent`] (a gateway's).
    pub fn is_absent(&self) -> bool {
        self.paths.store.as_os_str().is_empty()
    }

    fn with_paths(paths: Paths, config: EngineConfig, zeroizations: u64) -> Engine {
        Engine {
            config,
            inner: RwLock::new(Inner {
                state: EngineState::Uninitialized,
                active: None,
                init_token: None,
                zeroizations,
                locked: None,
                seal_params: None,
                unseal_shares: Vec::new(),
                unseal_nonce: String::new(),
                unseal_failures: 0,
            }),
            user_locks: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            key_writes: Mutex::new(()),
            replicator: std::sync::OnceLock::new(),
            revoked: Mutex::new(std::collections::HashSet::new()),
            paths,
        }
    }

    /// Opens (or creates) the engine in `data_dir`, finishing any zeroization
    /// a crash interrupted, and writing a fresh init token when the engine
    /// has no owner.
    pub fn open(data_dir: &Path, config: EngineConfig) -> Result<Engine, EngineError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| {
                EngineError::Internal(format!("creating data dir {}: {e}", data_dir.display()))
            })?;
        let paths = Paths {
            store: data_dir.join("store.redb"),
            store_tmp: data_dir.join("store.redb.tmp"),
            master_key: data_dir.join("master.key"),
            master_key_next: data_dir.join("master.key.next"),
            state: data_dir.join("engine-state.json"),
            init_token: data_dir.join("init-token"),
        };
        let state_file = read_state_file(&paths.state)?;
        let zeroizations = state_file.as_ref().map(|s| s.zeroizations).unwrap_or(0);
        let engine = Engine::with_paths(paths, config, zeroizations);
        let has_key = engine.paths.master_key.exists() || engine.paths.master_key_next.exists();
        let has_store = engine.paths.store.exists();
        let marked_zeroized = matches!(&state_file, Some(s) if s.state == EngineState::Zeroized);
        let mut inner = write(&engine.inner);
        let mut erase = false;
        if !marked_zeroized && has_store {
            let locked = LockedStore::open(&engine.paths.store)?;
            let params = locked.seal_params()?;
            if !params.matches(&engine.config.seal) {
                return Err(EngineError::Internal(format!(
                    "the data dir's store is sealed in {} mode but the config says seal = \"{}\"; \
                     refusing to start (a seal mode is chosen at init and kept until zeroization)",
                    params.type_name(),
                    engine.config.seal.as_str()
                )));
            }
            inner.seal_params = Some(params.clone());
            match params {
                SealParams::Auto if has_key => {
                    let store = engine.unlock_auto(locked)?;
                    inner.active = Some(Active::load(store)?);
                    inner.state = EngineState::Active;
                }
                SealParams::Auto => {
                    drop(locked);
                    erase = true;
                }
                SealParams::Passphrase { .. } | SealParams::Shamir { .. } => {
                    MasterKey::destroy_file(&engine.paths.master_key)?;
                    MasterKey::destroy_file(&engine.paths.master_key_next)?;
                    inner.locked = Some(locked);
                    inner.state = EngineState::Sealed;
                    inner.unseal_nonce = new_nonce()?;
                    tracing::warn!(
                        seal = params.type_name(),
                        "engine is sealed: POST /v1/hsm/unseal (or PUT /v1/sys/unseal) to open it"
                    );
                }
            }
            if inner.state != EngineState::Uninitialized {
                // An init that crashed after its last durable step leaves a token behind.
                let _ = fs::remove_file(&engine.paths.init_token);
            }
        } else if marked_zeroized || state_file.is_some() || has_store {
            erase = true;
        } else {
            // Never initialized (or an init crashed before its store existed).
            MasterKey::destroy_file(&engine.paths.master_key)?;
            MasterKey::destroy_file(&engine.paths.master_key_next)?;
            store::shred_file(&engine.paths.store_tmp)?;
            inner.state = EngineState::Uninitialized;
            engine.issue_init_token(&mut inner)?;
        }
        if erase {
            // Zeroized, or an interrupted zeroization, or a store whose key
            // is gone (crypto-erased): finish the erase.
            if !marked_zeroized {
                tracing::warn!("store or master key missing: treating the engine as zeroized");
                engine.write_state(EngineState::Zeroized, inner.zeroizations, Some(now_unix()))?;
            }
            MasterKey::destroy_file(&engine.paths.master_key)?;
            MasterKey::destroy_file(&engine.paths.master_key_next)?;
            store::shred_file(&engine.paths.store)?;
            store::shred_file(&engine.paths.store_tmp)?;
            inner.state = EngineState::Zeroized;
            engine.issue_init_token(&mut inner)?;
        }
        drop(inner);
        Ok(engine)
    }

    pub fn state(&self) -> EngineState {
        read(&self.inner).state
    }

    pub fn init_token_path(&self) -> &Path {
        &self.paths.init_token
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn write_state(
        &self,
        state: EngineState,
        zeroizations: u64,
        last: Option<u64>,
    ) -> Result<(), EngineError> {
        let file = StateFile {
            format: 1,
            state,
            zeroizations,
            last_zeroized_at: last,
        };
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|e| EngineError::Internal(e.to_string()))?;
        store::write_atomic(&self.paths.state, &bytes, 0o600)?;
        Ok(())
    }

    fn issue_init_token(&self, inner: &mut Inner) -> Result<(), EngineError> {
        let raw = crypto::random_bytes(32)?;
        let token = Zeroizing::new(URL_SAFE_NO_PAD.encode(&*raw));
        store::write_atomic(&self.paths.init_token, token.as_bytes(), 0o600)?;
        inner.init_token = Some(SecretBytes::from_slice(token.as_bytes()));
        tracing::warn!(
            path = %self.paths.init_token.display(),
            "engine has no owner: init token written (mode 0600); POST /v1/hsm/init with it"
        );
        Ok(())
    }

    /// Takes ownership of an uninitialized or zeroized engine: sets the crypto
    /// officer's password. Needs the current init token from the data dir.
    /// Auto seal mode only; see [`Engine::init_with`].
    pub fn init(
        &self,
        admin_password: &SecretString,
        init_token: &SecretString,
    ) -> Result<(), EngineError> {
        self.init_with(admin_password, init_token, None).map(|_| ())
    }

    /// Init in any seal mode: `passphrase` is required exactly in passphrase
    /// mode; Shamir mode returns the shares (the only time they exist
    /// outside the operators' hands).
    pub fn init_with(
        &self,
        admin_password: &SecretString,
        init_token: &SecretString,
        passphrase: Option<&SecretString>,
    ) -> Result<InitOutcome, EngineError> {
        let mut inner = write(&self.inner);
        if matches!(inner.state, EngineState::Active | EngineState::Sealed) {
            return Err(EngineError::AlreadyInitialized);
        }
        inner.check_init_token(init_token)?;
        users::validate_password(
            ADMIN_USERNAME,
            admin_password.expose_secret(),
            self.config.min_password_length,
        )?;
        let (params, kek, shares) = self.new_seal(Some(admin_password), passphrase)?;
        let hash = users::hash_password(admin_password.expose_secret())?;
        let admin = UserRecord {
            username: ADMIN_USERNAME.into(),
            role: Role::CryptoOfficer,
            password_hash: hash,
            consecutive_failures: 0,
            locked: false,
        };
        self.take_ownership(&mut inner, params, kek, &[admin], &[])?;
        tracing::info!(seal = self.seal_type(&inner), "engine initialized");
        let outcome = InitOutcome {
            seal_type: self.seal_type(&inner),
            shares,
        };
        drop(inner);
        self.notify_activated(true);
        Ok(outcome)
    }

    /// The seal for a new store, per config: (parameters, KEK, shares).
    fn new_seal(
        &self,
        admin_password: Option<&SecretString>,
        passphrase: Option<&SecretString>,
    ) -> Result<(SealParams, SecretBytes, Vec<String>), EngineError> {
        let mode = self.config.seal;
        Ok(match (mode, passphrase) {
            (SealMode::Auto, None) => (
                SealParams::Auto,
                MasterKey::generate()?.into_secret(),
                Vec::new(),
            ),
            (SealMode::Passphrase, Some(p)) => {
                if admin_password.is_some_and(|a| a.expose_secret() == p.expose_secret()) {
                    return Err(EngineError::InvalidRequest(
                        "the unseal passphrase must differ from the admin password".into(),
                    ));
                }
                let (params, kek) = seal::new_passphrase_seal(p.expose_secret())?;
                (params, kek, Vec::new())
            }
            (SealMode::Passphrase, None) => {
                return Err(EngineError::InvalidRequest(
                    "seal = \"passphrase\": init and restore need unseal_passphrase".into(),
                ))
            }
            (SealMode::Shamir { threshold, shares }, None) => {
                seal::new_shamir_seal(threshold, shares)?
            }
            (SealMode::Auto | SealMode::Shamir { .. }, Some(_)) => {
                return Err(EngineError::InvalidRequest(format!(
                    "unseal_passphrase is only for seal = \"passphrase\" (this engine: {})",
                    mode.as_str()
                )))
            }
        })
    }

    /// The durable steps of init and restore: key file (auto mode), the
    /// store with its first records (one transaction, renamed into place),
    /// the state file, the init token gone. A crash before the store is in
    /// place leaves an unowned engine (the stray key file is removed at the
    /// next start); after it, an owned one.
    fn take_ownership(
        &self,
        inner: &mut Inner,
        params: SealParams,
        kek: SecretBytes,
        users: &[UserRecord],
        rings: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<(), EngineError> {
        if params == SealParams::Auto {
            store::write_atomic(&self.paths.master_key, kek.expose_secret(), 0o600)?;
        }
        let store = Store::create_with(&self.paths.store, kek, params.clone(), users, rings)?;
        let keys = load_rings(&store)?;
        self.write_state(EngineState::Active, inner.zeroizations, None)?;
        remove_if_exists(&self.paths.init_token)?;
        inner.init_token = None;
        inner.active = Some(Active {
            store,
            keys: RwLock::new(keys),
        });
        inner.state = EngineState::Active;
        inner.seal_params = Some(params);
        lock(&self.user_locks).clear();
        Ok(())
    }

    /// Auto mode: the key file opens the store. A rotation that committed
    /// under `master.key.next` but crashed before renaming it is finished
    /// here; one that crashed before its commit leaves a stray next file,
    /// destroyed here.
    fn unlock_auto(&self, locked: LockedStore) -> Result<Store, EngineError> {
        let mut locked = locked;
        if self.paths.master_key.exists() {
            let kek = MasterKey::load(&self.paths.master_key)?.into_secret();
            match locked.unlock(kek) {
                Ok(store) => {
                    MasterKey::destroy_file(&self.paths.master_key_next)?;
                    return Ok(store);
                }
                Err((l, StoreError::WrongKek)) if self.paths.master_key_next.exists() => {
                    locked = l;
                }
                Err((_, e)) => return Err(e.into()),
            }
        }
        let kek = MasterKey::load(&self.paths.master_key_next)?.into_secret();
        let store = locked.unlock(kek).map_err(|(_, e)| e)?;
        tracing::warn!("finishing an interrupted master-key rotation (master.key.next)");
        self.promote_next_key_file()?;
        Ok(store)
    }

    /// `master.key.next` becomes `master.key`; the old key's blocks are
    /// overwritten first.
    fn promote_next_key_file(&self) -> Result<(), EngineError> {
        MasterKey::destroy_file(&self.paths.master_key)?;
        fs::rename(&self.paths.master_key_next, &self.paths.master_key).map_err(|e| {
            EngineError::Internal(format!(
                "renaming {}: {e}",
                self.paths.master_key_next.display()
            ))
        })?;
        if let Some(dir) = self.paths.master_key.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| EngineError::Internal(format!("syncing {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    // ----- seal -------------------------------------------------------

    fn seal_type(&self, inner: &Inner) -> &'static str {
        inner
            .seal_params
            .as_ref()
            .map(|p| p.type_name())
            .unwrap_or(self.config.seal.as_str())
    }

    /// `sys/seal-status`.
    pub fn seal_status(&self) -> SealStatus {
        let inner = read(&self.inner);
        self.seal_status_of(&inner)
    }

    fn seal_status_of(&self, inner: &Inner) -> SealStatus {
        let (t, n) = match (&inner.seal_params, self.config.seal) {
            (Some(p), _) => p.t_n(),
            (None, SealMode::Shamir { threshold, shares }) => (threshold, shares),
            (None, _) => (1, 1),
        };
        let sealed = inner.state != EngineState::Active;
        SealStatus {
            seal_type: self.seal_type(inner),
            initialized: matches!(inner.state, EngineState::Active | EngineState::Sealed),
            sealed,
            t,
            n,
            progress: inner.unseal_shares.len(),
            nonce: if inner.state == EngineState::Sealed {
                inner.unseal_nonce.clone()
            } else {
                String::new()
            },
            version: concat!("hsmgate-", env!("CARGO_PKG_VERSION")),
            migration: false,
            recovery_seal: false,
            storage_type: "redb",
            engine_state: inner.state.as_str(),
        }
    }

    /// Supplies the unseal secret: the passphrase, or one Shamir share per
    /// call (Vault's `key`). `reset` drops the shares given so far. A wrong
    /// secret is refused with [`EngineError::UnsealFailed`], counted in
    /// `unseal_failures` (memory only: the secret is not a login, so it
    /// locks and zeroizes nothing), and clears the share collection.
    /// Blocking (argon2 in passphrase mode).
    pub fn unseal(
        &self,
        key: Option<&SecretString>,
        reset: bool,
    ) -> Result<SealStatus, EngineError> {
        let mut inner = write(&self.inner);
        if reset {
            inner.unseal_shares.clear();
            if inner.state == EngineState::Sealed {
                inner.unseal_nonce = new_nonce()?;
            }
            return Ok(self.seal_status_of(&inner));
        }
        match inner.state {
            EngineState::Sealed => {}
            // Vault answers an unseal of an unsealed server with its status.
            EngineState::Active => return Ok(self.seal_status_of(&inner)),
            other => return Err(EngineError::NotActive(other)),
        }
        let key = key.ok_or_else(|| {
            EngineError::InvalidRequest("unseal needs \"key\" (or \"reset\": true)".into())
        })?;
        let params = inner
            .seal_params
            .clone()
            .ok_or_else(|| EngineError::Internal("sealed without seal parameters".into()))?;
        let kek = match &params {
            SealParams::Passphrase { .. } => seal::passphrase_kek(&params, key.expose_secret())?,
            SealParams::Shamir { threshold, .. } => {
                let share = seal::decode_share(key.expose_secret())?;
                if inner.unseal_shares.iter().any(|s| s[0] == share[0]) {
                    return Err(EngineError::InvalidRequest(
                        "a share with this index was already given in this unseal".into(),
                    ));
                }
                inner.unseal_shares.push(share);
                if inner.unseal_shares.len() < *threshold as usize {
                    return Ok(self.seal_status_of(&inner));
                }
                let shares = std::mem::take(&mut inner.unseal_shares);
                seal::combine_shares(*threshold, &shares)?
            }
            SealParams::Auto => {
                return Err(EngineError::Internal("auto seal is never sealed".into()))
            }
        };
        let locked = match inner.locked.take() {
            Some(l) => l,
            None => LockedStore::open(&self.paths.store)?,
        };
        match locked.unlock(kek) {
            Ok(store) => {
                // A record that does not open leaves the engine sealed, store kept.
                let rings = match load_rings(&store) {
                    Ok(r) => r,
                    Err(e) => {
                        inner.locked = store.lock().ok();
                        return Err(e);
                    }
                };
                inner.active = Some(Active {
                    store,
                    keys: RwLock::new(rings),
                });
                inner.state = EngineState::Active;
                inner.unseal_shares.clear();
                inner.unseal_nonce.clear();
                tracing::warn!(seal = params.type_name(), "engine unsealed");
                Ok(self.seal_status_of(&inner))
            }
            Err((locked, e)) => {
                inner.locked = Some(locked);
                inner.unseal_shares.clear();
                inner.unseal_nonce = new_nonce()?;
                match e {
                    StoreError::WrongKek => {
                        inner.unseal_failures += 1;
                        tracing::warn!(
                            failures = inner.unseal_failures,
                            "unseal failed: wrong passphrase or shares"
                        );
                        Err(EngineError::UnsealFailed(match params {
                            SealParams::Shamir { .. } => {
                                "the shares given do not rebuild this store's key; \
                                 the collected shares were discarded, start again"
                                    .into()
                            }
                            _ => "the passphrase does not open this store's key".into(),
                        }))
                    }
                    other => Err(other.into()),
                }
            }
        }
    }

    /// The crypto officer seals the engine: keys and sessions leave memory;
    /// the store stays, wrapped, until the next unseal.
    pub fn seal(&self, by: &Principal) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        let mut inner = write(&self.inner);
        if inner.state != EngineState::Active {
            return Err(EngineError::NotActive(inner.state));
        }
        if matches!(inner.seal_params, Some(SealParams::Auto) | None) {
            return Err(EngineError::InvalidRequest(
                "sealing needs seal = \"passphrase\" or \"shamir\": in auto mode the key file \
                 beside the store would unseal it at the next start"
                    .into(),
            ));
        }
        let active = inner
            .active
            .take()
            .ok_or_else(|| EngineError::Internal("active without a store".into()))?;
        // Dropping the key rings and the store's keys wipes them.
        let Active { store, keys } = active;
        drop(keys);
        // Sealed whatever happens next: keys are gone from memory. A store
        // that cannot be reopened here is reopened by the next unseal.
        inner.state = EngineState::Sealed;
        inner.locked = store.lock().ok();
        inner.unseal_shares.clear();
        inner.unseal_nonce = new_nonce()?;
        lock(&self.sessions).clear();
        lock(&self.user_locks).clear();
        tracing::warn!(user = %by.username, "engine sealed by the crypto officer");
        Ok(())
    }

    /// Re-seals every record under a new master key (one store transaction;
    /// see [`Store::rotate_master`]). In auto mode the key file is replaced
    /// too, through `master.key.next` so a crash at any point leaves a data
    /// dir that opens. Returns the new generation.
    pub fn rotate_master_key(&self, by: &Principal) -> Result<u64, EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        if self.clustered() {
            return Err(EngineError::InvalidRequest(
                "a cluster member's master key is the cluster key: rotating it on one node \
                 would cut it off from the others; rotate it for the whole cluster with \
                 POST /v1/hsm/cluster/rotate-key on the leader"
                    .into(),
            ));
        }
        // key_writes before the state lock, the order update_ring uses: the
        // other order can deadlock behind a queued writer (zeroize).
        let _serial = lock(&self.key_writes);
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        let auto = active.store.seal_params() == SealParams::Auto;
        let generation = if auto {
            let next = MasterKey::generate()?.into_secret();
            store::write_atomic(&self.paths.master_key_next, next.expose_secret(), 0o600)?;
            match active.store.rotate_master(Some(next)) {
                Ok(g) => {
                    self.promote_next_key_file()?;
                    g
                }
                Err(e) => {
                    let _ = MasterKey::destroy_file(&self.paths.master_key_next);
                    return Err(e.into());
                }
            }
        } else {
            active.store.rotate_master(None)?
        };
        tracing::warn!(user = %by.username, generation, "master key rotated");
        Ok(generation)
    }

    fn user_lock(&self, username: &str) -> Arc<Mutex<()>> {
        lock(&self.user_locks)
            .entry(username.to_string())
            .or_default()
            .clone()
    }

    /// What `status` and the user list show of a user (never its hash).
    fn user_status(&self, u: UserRecord) -> UserStatus {
        UserStatus {
            attempts_left: self
                .threshold(u.role)
                .saturating_sub(u.consecutive_failures),
            username: u.username,
            role: u.role,
            consecutive_failures: u.consecutive_failures,
            locked: u.locked,
        }
    }

    fn threshold(&self, role: Role) -> u32 {
        match role {
            Role::CryptoOfficer => self.config.zeroize_after_failures,
            Role::CryptoUser => self.config.lock_user_after_failures,
        }
    }

    /// Logs a user in. The attempt is counted and made durable before the
    /// password is checked; the per-user lock makes count-then-check one
    /// step, so concurrent attempts can neither skip the count nor race past
    /// the threshold. The threshold-th consecutive failed crypto-officer
    /// login zeroizes the engine; a crypto user's locks that user.
    pub fn login(&self, req: LoginRequest<'_>) -> Result<LoginSuccess, EngineError> {
        let password = req.password.expose_secret();
        // Refuse to count anything for a name that does not exist, and do
        // not create locks for it (the lock map is bounded by real users).
        let exists = {
            let inner = read(&self.inner);
            let active = inner
                .active
                .as_ref()
                .ok_or(EngineError::NotActive(inner.state))?;
            active.store.get_user(req.username)?.is_some()
        };
        if !exists || users::validate_username(req.username).is_err() {
            users::burn_equal_time(password);
            return Err(EngineError::InvalidCredentials);
        }
        let user_lock = self.user_lock(req.username);
        let _serial = lock(&user_lock);

        // Count the attempt (durably) before looking at the password.
        let (record, attempt) = {
            let inner = read(&self.inner);
            let active = inner
                .active
                .as_ref()
                .ok_or(EngineError::NotActive(inner.state))?;
            let Some(mut record) = active.store.get_user(req.username)? else {
                drop(inner);
                users::burn_equal_time(password);
                return Err(EngineError::InvalidCredentials);
            };
            if record.role == Role::CryptoOfficer && !req.officer_allowed {
                drop(inner);
                tracing::warn!(
                    user = req.username,
                    "crypto-officer login from a non-admin network refused; nothing counted"
                );
                users::burn_equal_time(password);
                return Err(EngineError::InvalidCredentials);
            }
            if record.locked {
                drop(inner);
                tracing::warn!(user = req.username, "login to a locked user refused");
                users::burn_equal_time(password);
                return Err(EngineError::InvalidCredentials);
            }
            // The login guard: checked and counted in this one critical
            // section, so concurrent attempts cannot race past the reserve.
            if record.role == Role::CryptoOfficer && req.channel == Channel::FrontDoor {
                let left = self
                    .config
                    .zeroize_after_failures
                    .saturating_sub(record.consecutive_failures);
                let reserve = self.config.login_guard_reserve;
                if left <= reserve {
                    drop(inner);
                    tracing::warn!(
                        user = req.username,
                        attempts_left = left,
                        "login guard refused a front-door crypto-officer login; nothing counted"
                    );
                    return Err(EngineError::GuardRefused {
                        attempts_left: left,
                        reserve,
                    });
                }
            }
            record.consecutive_failures = record.consecutive_failures.saturating_add(1);
            self.save_counters(&active.store, &record)?;
            let attempt = record.consecutive_failures;
            (record, attempt)
        };

        let ok = users::verify_password(password, &record.password_hash);

        let inner = read(&self.inner);
        let Some(active) = inner.active.as_ref() else {
            return Err(EngineError::NotActive(inner.state));
        };
        let mut record = record;
        if ok {
            record.consecutive_failures = 0;
            self.save_counters(&active.store, &record)?;
            drop(inner);
            return self.new_session(&record);
        }
        let threshold = self.threshold(record.role);
        tracing::warn!(user = req.username, attempt, threshold, "failed login");
        if attempt >= threshold {
            match record.role {
                Role::CryptoOfficer => {
                    drop(inner);
                    // Still under this user's lock: no other officer attempt
                    // can slip in between, and zeroize_locked is idempotent
                    // on state (it only runs while active).
                    let mut inner = write(&self.inner);
                    if inner.state == EngineState::Active {
                        tracing::error!(
                            user = req.username,
                            attempt,
                            "crypto-officer failure threshold reached: zeroizing"
                        );
                        self.zeroize_locked(&mut inner)?;
                    }
                }
                Role::CryptoUser => {
                    record.locked = true;
                    self.save_counters(&active.store, &record)?;
                    drop(inner);
                    self.revoke_user_sessions(&record.username);
                    tracing::warn!(
                        user = req.username,
                        "crypto user locked until a crypto officer resets its password"
                    );
                }
            }
        }
        Err(EngineError::InvalidCredentials)
    }

    /// A user's failure counters, written before the password is looked
    /// at: in the user record alone, or in this node's local table on a
    /// cluster member (each member counts its own failures, DESIGN §4).
    fn save_counters(&self, store: &Store, record: &UserRecord) -> Result<(), EngineError> {
        if self.clustered() {
            store.put_user_counters(record)?;
        } else {
            store.put_user(record)?;
        }
        Ok(())
    }

    fn new_session(&self, record: &UserRecord) -> Result<LoginSuccess, EngineError> {
        let now = SystemTime::now();
        let principal = Principal {
            username: record.username.clone(),
            role: record.role,
            issued_at: now,
            expires_at: now + self.config.session_ttl,
            app_policies: Vec::new(),
        };
        let token = self.issue_session_for(principal.clone(), Some(&record.password_hash))?;
        Ok(LoginSuccess { token, principal })
    }

    /// A session token for an app principal (from `auth/jwt/login`): the
    /// same cheap lookup as an HSM session, revoked by zeroize like them.
    /// It never outlives the JWT it was exchanged for, nor the session TTL.
    pub fn open_app_session(&self, mut principal: Principal) -> Result<SecretString, EngineError> {
        let state = read(&self.inner).state;
        if state != EngineState::Active {
            return Err(EngineError::NotActive(state));
        }
        let now = SystemTime::now();
        principal.role = Role::CryptoUser;
        principal.issued_at = now;
        principal.expires_at = principal.expires_at.min(now + self.config.session_ttl);
        self.issue_session_for(principal, None)
    }

    /// Registers a fresh token for `principal`. Only the token's SHA-256 is
    /// kept; expired sessions are dropped on the way. Alone: a random
    /// token. On a cluster member: a token every member can verify
    /// (`replication::Engine::cluster_session_token`), registered here too.
    fn issue_session_for(
        &self,
        principal: Principal,
        password_hash: Option<&str>,
    ) -> Result<SecretString, EngineError> {
        let token = if self.clustered() {
            self.cluster_session_token(&principal, password_hash)?
        } else {
            let raw = crypto::random_bytes(32)?;
            SecretString::new(format!("hsm.{}", URL_SAFE_NO_PAD.encode(&*raw)))
        };
        let now = SystemTime::now();
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, p| p.expires_at > now);
        sessions.insert(crypto::sha256(token.expose_secret().as_bytes()), principal);
        Ok(token)
    }

    /// Revokes one session token (logout). Unknown tokens are ignored. A
    /// cluster token is revoked on every member (a replicated record).
    pub fn revoke_session(&self, token: &str) {
        lock(&self.sessions).remove(&crypto::sha256(token.as_bytes()));
        if self.clustered() {
            if let Err(e) = self.revoke_cluster_session(token) {
                tracing::error!(error = %e, "cluster: could not replicate a logout");
            }
        }
    }

    fn revoke_user_sessions(&self, username: &str) {
        lock(&self.sessions).retain(|_, p| p.username != username);
    }

    /// Resolves a session token to its principal.
    pub fn authenticate(&self, token: &str) -> Result<Principal, EngineError> {
        let state = read(&self.inner).state;
        if state != EngineState::Active {
            // Every session died with the old state; say why, as Vault's 503 does.
            return Err(EngineError::NotActive(state));
        }
        let digest = crypto::sha256(token.as_bytes());
        {
            let sessions = lock(&self.sessions);
            match sessions.get(&digest) {
                Some(p) if p.expires_at > SystemTime::now() => return Ok(p.clone()),
                Some(_) => return Err(EngineError::PermissionDenied),
                None => {}
            }
        }
        // A token another cluster member issued: verified once, then
        // kept like a local session (dropped by the same revocations).
        let principal = self.verify_cluster_session(token, &digest)?;
        lock(&self.sessions).insert(digest, principal.clone());
        Ok(principal)
    }

    pub fn session_ttl(&self) -> Duration {
        self.config.session_ttl
    }

    pub fn status(&self) -> Result<Status, EngineError> {
        let inner = read(&self.inner);
        let generation = inner
            .active
            .as_ref()
            .map(|a| a.store.generation())
            .unwrap_or(0);
        let (users, keys) = match inner.active.as_ref() {
            Some(active) => {
                let users = active
                    .store
                    .users()?
                    .into_iter()
                    .map(|u| self.user_status(u))
                    .collect();
                (users, read(&active.keys).len())
            }
            None => (Vec::new(), 0),
        };
        Ok(Status {
            state: inner.state,
            zeroizations: inner.zeroizations,
            zeroize_after_failures: self.config.zeroize_after_failures,
            lock_user_after_failures: self.config.lock_user_after_failures,
            login_guard_reserve: self.config.login_guard_reserve,
            users,
            keys,
            seal_type: self.seal_type(&inner),
            unseal_failures: inner.unseal_failures,
            master_key_generation: generation,
        })
    }

    /// The type of every stored key ring (for the keys-by-type metric);
    /// empty unless active. Names stay inside the engine.
    pub fn key_types(&self) -> Vec<crypto::KeyType> {
        self.with_active(|a| Ok(read(&a.keys).values().map(|r| r.key_type).collect()))
            .unwrap_or_default()
    }

    /// The type of key `name`, if it exists (for metric labels; no role check
    /// because nothing but the type leaves the engine).
    pub fn key_type_of(&self, name: &str) -> Option<crypto::KeyType> {
        self.with_active(|a| Ok(read(&a.keys).get(name).map(|r| r.key_type)))
            .ok()
            .flatten()
    }

    fn require(principal: &Principal, role: Role) -> Result<(), EngineError> {
        if principal.role == role {
            Ok(())
        } else {
            Err(EngineError::PermissionDenied)
        }
    }

    /// The crypto officer adds a crypto user.
    pub fn create_user(
        &self,
        by: &Principal,
        username: &str,
        password: &SecretString,
        role: Role,
    ) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        if role != Role::CryptoUser {
            return Err(EngineError::InvalidRequest(
                "only crypto users can be created; the crypto officer is set by init".into(),
            ));
        }
        users::validate_username(username)?;
        users::validate_password(
            username,
            password.expose_secret(),
            self.config.min_password_length,
        )?;
        let hash = users::hash_password(password.expose_secret())?;
        // key_writes before the state lock, the order every key write uses:
        // the other order can deadlock behind a queued writer (zeroize).
        let _serial = lock(&self.key_writes);
        let clustered = self.clustered();
        let op = self.with_active(|a| {
            if a.store.get_user(username)?.is_some() {
                return Err(EngineError::UserExists(username.into()));
            }
            let record = UserRecord {
                username: username.into(),
                role,
                password_hash: hash.clone(),
                consecutive_failures: 0,
                locked: false,
            };
            let mut op = a.store.user_op(&record, Expect::Absent, clustered)?;
            op.clear_counters = true;
            Ok(op)
        })?;
        match self.commit(vec![op]) {
            // Only the user record's own precondition means "exists"; an
            // entry refused for another reason (a cluster-key rotation
            // committed first) keeps its "try again".
            Err(EngineError::Conflict(c)) if c.starts_with("record users/") => {
                Err(EngineError::UserExists(username.into()))
            }
            r => r,
        }
    }

    /// The crypto officer resets a crypto user's password, which also
    /// clears its failure count and unlocks it.
    pub fn reset_password(
        &self,
        by: &Principal,
        username: &str,
        password: &SecretString,
    ) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        users::validate_password(
            username,
            password.expose_secret(),
            self.config.min_password_length,
        )?;
        let hash = users::hash_password(password.expose_secret())?;
        let user_lock = self.user_lock(username);
        let _serial = lock(&user_lock);
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        let mut record = active
            .store
            .get_user(username)?
            .ok_or_else(|| EngineError::UserNotFound(username.into()))?;
        if record.role != Role::CryptoUser {
            return Err(EngineError::InvalidRequest(
                "only crypto users' passwords can be reset this way".into(),
            ));
        }
        // The policy refuses the previous password (an argon2 check).
        if users::verify_password(password.expose_secret(), &record.password_hash) {
            return Err(users::same_password());
        }
        record.password_hash = hash;
        record.consecutive_failures = 0;
        record.locked = false;
        let expect = active.store.read_for_update(Table::Users, username)?.expect;
        let mut op = active.store.user_op(&record, expect, self.clustered())?;
        op.clear_counters = true;
        drop(inner);
        self.commit(vec![op])?;
        self.revoke_user_sessions(username);
        Ok(())
    }

    /// Deliberate zeroization by the crypto officer.
    pub fn zeroize(&self, by: &Principal) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        let mut inner = write(&self.inner);
        if inner.state != EngineState::Active {
            return Err(EngineError::NotActive(inner.state));
        }
        tracing::error!(user = %by.username, "zeroize requested by the crypto officer");
        self.zeroize_locked(&mut inner)
    }

    /// Crypto-erase. The state file goes first, so a crash anywhere after it
    /// resumes the erase at the next start instead of reviving the keys.
    fn zeroize_locked(&self, inner: &mut Inner) -> Result<(), EngineError> {
        let zeroizations = inner.zeroizations + 1;
        let marked = self.write_state(EngineState::Zeroized, zeroizations, Some(now_unix()));
        if let Err(e) = &marked {
            tracing::error!(error = %e, "could not record zeroization; erasing anyway");
        }
        let key_gone = MasterKey::destroy_file(&self.paths.master_key)
            .and(MasterKey::destroy_file(&self.paths.master_key_next));
        // Dropping the store and key rings wipes the master key and every
        // key's material from memory (zeroize on drop).
        inner.active = None;
        inner.locked = None;
        inner.seal_params = None;
        inner.unseal_shares.clear();
        inner.state = EngineState::Zeroized;
        inner.zeroizations = zeroizations;
        lock(&self.sessions).clear();
        lock(&self.revoked).clear();
        lock(&self.user_locks).clear();
        // Overwritten, not just unlinked: in sealed mode the store holds the
        // wrapped master key, and the passphrase or shares still exist.
        let store_gone =
            store::shred_file(&self.paths.store).and(store::shred_file(&self.paths.store_tmp));
        tracing::error!(zeroizations, "engine zeroized");
        self.notify_zeroized();
        self.issue_init_token(inner)?;
        key_gone?;
        store_gone?;
        Ok(())
    }

    // ----- audit head witness ----------------------------------------

    /// Keeps the audit log's head in the sealed store, a second witness
    /// beside the `<log>.head` sidecar (`hsmgate audit verify` compares
    /// both). Only while active: uninitialized, sealed and zeroized engines
    /// have no store to write to, and this returns `Ok(false)`. The head
    /// never moves backwards: a lower sequence number than the stored one
    /// means the log lost records, and overwriting the witness would erase
    /// the evidence, so it is refused.
    pub fn record_audit_head(&self, seq: u64, hash: &str) -> Result<bool, EngineError> {
        let inner = read(&self.inner);
        let Some(active) = inner.active.as_ref() else {
            return Ok(false);
        };
        if let Some(stored) = active.store.audit_head()? {
            if stored.seq == seq && stored.hash == hash {
                return Ok(true);
            }
            if stored.seq > seq {
                return Err(EngineError::Internal(format!(
                    "the store's audit head is record {} but the log's is {seq}: refusing to \
                     move the witness backwards (was the audit log truncated? run \
                     `hsmgate audit verify`)",
                    stored.seq
                )));
            }
        }
        active.store.put_audit_head(&store::AuditHeadRecord {
            seq,
            hash: hash.to_string(),
        })?;
        Ok(true)
    }

    /// The audit head the store holds, while active.
    pub fn audit_head(&self) -> Result<Option<store::AuditHeadRecord>, EngineError> {
        self.with_active(|a| Ok(a.store.audit_head()?))
    }

    // ----- keys -------------------------------------------------------

    fn with_active<T>(
        &self,
        f: impl FnOnce(&Active) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let inner = read(&self.inner);
        let active = inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(inner.state))?;
        f(active)
    }

    fn ring(&self, by: &Principal, name: &str) -> Result<Arc<KeyRing>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        let found = self.with_active(|a| Ok(read(&a.keys).get(name).cloned()))?;
        if let Some(ring) = found {
            return Ok(ring);
        }
        if !self.clustered() {
            return Err(EngineError::KeyNotFound(name.into()));
        }
        // Read-your-writes across members: a key another member created
        // a moment ago is not "not found" here until the leader says so.
        self.catch_up()?;
        self.with_active(|a| {
            read(&a.keys)
                .get(name)
                .cloned()
                .ok_or_else(|| EngineError::KeyNotFound(name.into()))
        })
    }

    /// Persists a new version of a ring, then publishes it. Runs under
    /// `key_writes`; the closure sees the current ring (if any), read from
    /// the store with its digest, so the write applies only over that
    /// version (a cluster member that lost a race catches up and runs the
    /// closure once more).
    fn update_ring(
        &self,
        by: &Principal,
        name: &str,
        mut f: impl FnMut(Option<&KeyRing>) -> Result<Option<KeyRing>, EngineError>,
    ) -> Result<Arc<KeyRing>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        keyring::validate_name(name)?;
        let _serial = lock(&self.key_writes);
        let mut retried = false;
        loop {
            let (op, current) = self.with_active(|a| {
                let read = a.store.read_for_update(Table::Keys, name)?;
                let current = match &read.plaintext {
                    Some(plain) => Some(KeyRing::from_record(name, plain)?),
                    None => None,
                };
                match f(current.as_ref())? {
                    Some(next) => {
                        let op =
                            a.store
                                .put_op(Table::Keys, name, &next.to_record()?, read.expect)?;
                        Ok((Some(op), None))
                    }
                    None => Ok((None, current)),
                }
            })?;
            let Some(op) = op else {
                return self
                    .with_active(|a| Ok(read(&a.keys).get(name).cloned()))?
                    .or_else(|| current.map(Arc::new))
                    .ok_or_else(|| EngineError::KeyNotFound(name.into()));
            };
            match self.commit(vec![op]) {
                Err(EngineError::Conflict(_)) if !retried => {
                    retried = true;
                    self.catch_up()?;
                    continue;
                }
                r => r?,
            }
            return self.with_active(|a| {
                read(&a.keys)
                    .get(name)
                    .cloned()
                    .ok_or_else(|| EngineError::KeyNotFound(name.into()))
            });
        }
    }

    /// Creates a key ring. As in Vault, creating an existing key of the same
    /// type changes nothing and succeeds.
    pub fn create_key(
        &self,
        by: &Principal,
        name: &str,
        opts: &KeyOptions,
    ) -> Result<Arc<KeyRing>, EngineError> {
        self.update_ring(by, name, |current| match current {
            Some(ring) if ring.key_type == opts.key_type => Ok(None),
            Some(_) => Err(EngineError::KeyTypeMismatch(name.into())),
            None => KeyRing::new(name, opts, now_unix()).map(Some),
        })
    }

    pub fn read_key(&self, by: &Principal, name: &str) -> Result<Arc<KeyRing>, EngineError> {
        self.ring(by, name)
    }

    pub fn list_keys(&self, by: &Principal) -> Result<Vec<String>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        self.with_active(|a| {
            let mut names: Vec<String> = read(&a.keys).keys().cloned().collect();
            names.sort();
            Ok(names)
        })
    }

    pub fn rotate_key(&self, by: &Principal, name: &str) -> Result<Arc<KeyRing>, EngineError> {
        self.update_ring(by, name, |current| {
            let ring = current.ok_or_else(|| EngineError::KeyNotFound(name.into()))?;
            ring.rotated(now_unix()).map(Some)
        })
    }

    pub fn configure_key(
        &self,
        by: &Principal,
        name: &str,
        change: &KeyConfigChange,
    ) -> Result<Arc<KeyRing>, EngineError> {
        let opening_up_refused = self.config.non_exportable_is_final;
        self.update_ring(by, name, |current| {
            let ring = current.ok_or_else(|| EngineError::KeyNotFound(name.into()))?;
            if opening_up_refused {
                ring.refuse_opening_up(change)?;
            }
            ring.reconfigured(change).map(Some)
        })
    }

    pub fn delete_key(&self, by: &Principal, name: &str) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoUser)?;
        if name.starts_with('.') {
            return Err(EngineError::KeyNotFound(name.into()));
        }
        let _serial = lock(&self.key_writes);
        let op = self.with_active(|a| {
            let read = a.store.read_for_update(Table::Keys, name)?;
            let plain = read
                .plaintext
                .ok_or_else(|| EngineError::KeyNotFound(name.into()))?;
            if !KeyRing::from_record(name, &plain)?.deletion_allowed {
                return Err(EngineError::DeletionNotAllowed(name.into()));
            }
            Ok(RecordOp {
                table: Table::Keys,
                name: name.to_string(),
                sealed: None,
                expect: read.expect,
                clear_counters: false,
            })
        })?;
        self.commit(vec![op])
    }

    /// Vault's `keys/:name/trim`.
    pub fn trim_key(
        &self,
        by: &Principal,
        name: &str,
        min_available_version: u32,
    ) -> Result<Arc<KeyRing>, EngineError> {
        self.update_ring(by, name, |current| {
            let ring = current.ok_or_else(|| EngineError::KeyNotFound(name.into()))?;
            ring.trimmed(min_available_version).map(Some)
        })
    }

    /// Encrypts with the latest (or requested) version: `vault:vN:...`.
    pub fn encrypt(
        &self,
        by: &Principal,
        name: &str,
        plaintext: &[u8],
        aad: &[u8],
        context: Option<&[u8]>,
        version: Option<u32>,
    ) -> Result<(String, u32), EngineError> {
        let ring = self.ring(by, name)?;
        encrypt_with(&ring, plaintext, aad, context, version)
    }

    pub fn decrypt(
        &self,
        by: &Principal,
        name: &str,
        ciphertext: &str,
        aad: &[u8],
        context: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let ring = self.ring(by, name)?;
        decrypt_with(&ring, ciphertext, aad, context)
    }

    /// Vault's `rewrap`: decrypts and encrypts again under the latest (or
    /// requested) version without the plaintext leaving the engine.
    pub fn rewrap(
        &self,
        by: &Principal,
        name: &str,
        ciphertext: &str,
        aad: &[u8],
        context: Option<&[u8]>,
        version: Option<u32>,
    ) -> Result<(String, u32), EngineError> {
        let ring = self.ring(by, name)?;
        let plaintext = decrypt_with(&ring, ciphertext, aad, context)?;
        encrypt_with(&ring, &plaintext, aad, context, version)
    }

    /// Vault's `datakey/{plaintext|wrapped}`: a fresh random key of `bits`
    /// (128, 256 or 512), returned with its ciphertext under this key.
    pub fn data_key(
        &self,
        by: &Principal,
        name: &str,
        bits: u32,
        aad: &[u8],
        context: Option<&[u8]>,
        version: Option<u32>,
    ) -> Result<(Zeroizing<Vec<u8>>, String, u32), EngineError> {
        if !matches!(bits, 128 | 256 | 512) {
            return Err(EngineError::InvalidRequest(
                "invalid bit length: bits must be 128, 256 or 512".into(),
            ));
        }
        let ring = self.ring(by, name)?;
        let key = crypto::random_bytes(bits as usize / 8)?;
        let (ciphertext, v) = encrypt_with(&ring, &key, aad, context, version)?;
        Ok((key, ciphertext, v))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        &self,
        by: &Principal,
        name: &str,
        input: &[u8],
        opts: SignOptions,
        context: Option<&[u8]>,
        version: Option<u32>,
        jws: bool,
    ) -> Result<(String, u32), EngineError> {
        let ring = self.ring(by, name)?;
        ring.ensure(ring.key_type.supports_signing(), "signing")?;
        let (v, kv) = ring.encryption_version(version)?;
        let material = ring.material(kv, context)?;
        let sig = material.sign(input, opts)?;
        if jws {
            let sig = material.signature_to_jws(&sig)?;
            Ok((keyring::format_vault_jws(v, &sig), v))
        } else {
            Ok((keyring::format_vault(v, &sig), v))
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        by: &Principal,
        name: &str,
        input: &[u8],
        signature: &str,
        opts: SignOptions,
        context: Option<&[u8]>,
        jws: bool,
    ) -> Result<bool, EngineError> {
        let ring = self.ring(by, name)?;
        ring.ensure(ring.key_type.supports_signing(), "verification")?;
        let (v, sig) = if jws {
            keyring::parse_vault_jws(signature, "signature")?
        } else {
            keyring::parse_vault(signature, "signature")?
        };
        let kv = ring.decryption_version(v)?;
        let material = ring.material(kv, context)?;
        let sig = if jws {
            match material.signature_from_jws(&sig) {
                Some(der) => der,
                None => return Ok(false),
            }
        } else {
            sig
        };
        Ok(material.verify(input, &sig, opts)?)
    }

    pub fn hmac(
        &self,
        by: &Principal,
        name: &str,
        input: &[u8],
        hash: HashAlgorithm,
        version: Option<u32>,
    ) -> Result<(String, u32), EngineError> {
        let ring = self.ring(by, name)?;
        let (v, kv) = ring.encryption_version(version)?;
        Ok((keyring::format_vault(v, &kv.material.hmac(input, hash)?), v))
    }

    pub fn verify_hmac(
        &self,
        by: &Principal,
        name: &str,
        input: &[u8],
        mac: &str,
        hash: HashAlgorithm,
    ) -> Result<bool, EngineError> {
        let ring = self.ring(by, name)?;
        let (v, mac) = keyring::parse_vault(mac, "hmac")?;
        let kv = ring.decryption_version(v)?;
        Ok(kv.material.verify_hmac(input, &mac, hash)?)
    }

    /// Vault's `export/:type/:name(/:version)`: only for keys marked
    /// `exportable` (public keys excepted), every available version or one.
    pub fn export_key(
        &self,
        by: &Principal,
        name: &str,
        kind: ExportKind,
        version: Option<u32>,
    ) -> Result<(KeyType, ExportedVersions), EngineError> {
        let ring = self.ring(by, name)?;
        if kind != ExportKind::PublicKey && !ring.exportable {
            return Err(EngineError::InvalidRequest(format!(
                "key {name:?} is not exportable"
            )));
        }
        let allowed = match kind {
            ExportKind::EncryptionKey => ring.key_type.supports_encryption(),
            ExportKind::SigningKey | ExportKind::PublicKey => ring.key_type.supports_signing(),
            ExportKind::HmacKey => true,
        };
        ring.ensure(allowed, "this export type")?;
        let versions: Vec<u32> = match version {
            Some(v) => {
                ring.decryption_version(v)?;
                vec![v]
            }
            None => ring.versions.keys().copied().collect(),
        };
        let mut out = Vec::with_capacity(versions.len());
        for v in versions {
            let kv = ring.decryption_version(v)?;
            out.push((v, kv.material.export(kind)?));
        }
        Ok((ring.key_type, out))
    }

    /// Vault's `transit/hash`: stateless, but a crypto-user operation.
    pub fn hash(
        &self,
        by: &Principal,
        alg: HashAlgorithm,
        input: &[u8],
    ) -> Result<Vec<u8>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        self.with_active(|_| Ok(crypto::hash(alg, input)))
    }

    /// Random bytes for a crypto user (Vault's `transit/random`).
    pub fn random(&self, by: &Principal, n: usize) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        self.with_active(|_| Ok(crypto::random_bytes(n)?))
    }
}

/// Exported key versions: (version, key in Vault's export format), wiped on drop.
pub type ExportedVersions = Vec<(u32, Zeroizing<String>)>;

fn encrypt_with(
    ring: &KeyRing,
    plaintext: &[u8],
    aad: &[u8],
    context: Option<&[u8]>,
    version: Option<u32>,
) -> Result<(String, u32), EngineError> {
    ring.ensure(ring.key_type.supports_encryption(), "encryption")?;
    ring.refuse_key_encryption_key()?;
    let (v, kv) = ring.encryption_version(version)?;
    let material = ring.material(kv, context)?;
    let blob = if ring.convergent_encryption {
        material.encrypt_convergent(plaintext, aad, context.unwrap_or_default())?
    } else {
        material.encrypt(plaintext, aad)?
    };
    Ok((keyring::format_vault(v, &blob), v))
}

fn decrypt_with(
    ring: &KeyRing,
    ciphertext: &str,
    aad: &[u8],
    context: Option<&[u8]>,
) -> Result<Zeroizing<Vec<u8>>, EngineError> {
    ring.ensure(ring.key_type.supports_encryption(), "decryption")?;
    ring.refuse_key_encryption_key()?;
    let (v, blob) = keyring::parse_vault(ciphertext, "ciphertext")?;
    let kv = ring.decryption_version(v)?;
    Ok(ring.material(kv, context)?.decrypt(&blob, aad)?)
}

fn read_state_file(path: &Path) -> Result<Option<StateFile>, EngineError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            EngineError::Internal(format!(
                "{} is not a valid engine state file ({e}); refusing to guess the engine's state",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), EngineError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(EngineError::Internal(format!(
            "removing {}: {e}",
            path.display()
        ))),
    }
}
