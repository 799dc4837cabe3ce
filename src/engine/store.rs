//! The sealed, crash-safe store: users and key rings in one redb file.
//!
//! Every value is sealed with AES-256-GCM under the master key, with the
//! record's identity (format version, table, name) as associated data, so a
//! sealed value copied onto another record does not open. redb commits with
//! `Durability::Immediate`: once `put_*` returns, the record survives
//! `kill -9` and power loss.
//!
//! The records' master key is itself stored only wrapped (AES-256-GCM)
//! under a key-encryption key (KEK), in the `meta` table with a generation
//! number: the KEK is `master.key` (mode 0600) in the default auto-unseal
//! mode, or comes from the operator in sealed mode ([`super::seal`]).
//! Because the wrapped master key lives in the same database as the
//! records, [`Store::rotate_master`] re-seals every record and replaces the
//! wrapped key in ONE write transaction: a crash leaves the old generation
//! or the new one, never a mix. A store written before the wrapped key
//! existed (no `master_key` in `meta`) uses the KEK as its master key until
//! its first rotation.
//!
//! The `audit` table holds one sealed record, the audit log's head (see
//! `crate::audit`); [`read_audit_head_offline`] reads it from a stopped
//! server's store without writing anything (`hsmgate audit verify`).
//!
//! [`MasterKey::destroy_file`] and [`shred_file`] are half of zeroization
//! (the other half is dropping the keys from memory).
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError};
use super::seal::SealParams;
use super::secret::SecretBytes;

/// Bumped whenever the record layout changes; part of every record's AAD.
pub const FORMAT_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// The audit log's head witness: one record, [`AUDIT_HEAD`], sealed like
/// every other value (its AAD names table and record, so it cannot be
/// swapped with another sealed value).
const AUDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("audit");
const AUDIT_HEAD: &str = "head";

/// The audit log's head as the store keeps it: the last record's sequence
/// number and the hex SHA-256 of its line (see `crate::audit::Head`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHeadRecord {
    pub seq: u64,
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store database error: {0}")]
    Database(#[from] redb::Error),
    #[error(
        "record {table}/{name} does not open under this master key (tampered, moved or wrong key)"
    )]
    Unseal { table: &'static str, name: String },
    #[error("record {table}/{name} is malformed: {detail}")]
    Malformed {
        table: &'static str,
        name: String,
        detail: String,
    },
    #[error("store format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedFormat { found: u32 },
    #[error("master key file {0} is readable by group or others; refusing it (chmod 600)")]
    MasterKeyPermissions(PathBuf),
    #[error("master key file {0} is not 32 bytes")]
    MasterKeyLength(PathBuf),
    #[error("crypto failure while sealing: {0}")]
    Crypto(#[from] CryptoError),
    /// The KEK given (passphrase, shares or key file) does not open the
    /// wrapped master key.
    #[error("the unseal key does not open this store's master key")]
    WrongKek,
    #[error("store metadata is malformed: {0}")]
    Meta(String),
    /// The database was closed by an I/O failure and could not be reopened yet.
    #[error("the store is closed after an I/O failure and could not be reopened yet")]
    Closed,
    /// A test hook stopped a master-key rotation before its commit.
    #[cfg(test)]
    #[error("rotation interrupted by the test hook")]
    Interrupted,
}

impl StoreError {
    /// An I/O failure of the data dir (disk full, read-only, device error),
    /// or redb refusing writes after one (`PreviousIo`, until the process
    /// restarts and redb repairs the file): the store is intact but cannot
    /// be written now.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. }
                | StoreError::Closed
                | StoreError::Database(redb::Error::Io(_) | redb::Error::PreviousIo)
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Database(e.into()))
    };
}

mod replicated;
pub use replicated::{
    digest, Conflict, Expect, ForUpdate, RecordOp, ReplicatedState, SealedRecord, Table,
};

/// The 256-bit key every stored secret is sealed under.
pub struct MasterKey(SecretBytes);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn generate() -> Result<MasterKey, StoreError> {
        let bytes = crypto::random_bytes(32)?;
        Ok(MasterKey(SecretBytes::from_slice(&bytes)))
    }

    /// A master key received from a cluster member (32 bytes).
    pub fn from_secret(secret: SecretBytes) -> Result<MasterKey, StoreError> {
        if secret.expose_secret().len() != 32 {
            return Err(StoreError::Meta("a cluster key is 32 bytes".into()));
        }
        Ok(MasterKey(secret))
    }

    pub fn into_secret(self) -> SecretBytes {
        self.0
    }

    /// Reads the key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<MasterKey, StoreError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(StoreError::MasterKeyPermissions(path.to_path_buf()));
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
        if bytes.len() != 32 {
            return Err(StoreError::MasterKeyLength(path.to_path_buf()));
        }
        Ok(MasterKey(SecretBytes::from_slice(&bytes)))
    }

    /// Writes the key with write-temp, fsync, rename, so a crash leaves
    /// either no key file or a whole one.
    pub fn persist(&self, path: &Path) -> Result<(), StoreError> {
        write_atomic(path, self.0.expose_secret(), 0o600)
    }

    /// Overwrites the key file in place, syncs, then removes it. On
    /// journaling or copy-on-write file systems and SSDs the old blocks may
    /// survive: docs/SECURITY.md says so; sealed mode is the complete answer.
    pub fn destroy_file(path: &Path) -> Result<(), StoreError> {
        shred_file(path)
    }
}

/// Writes `bytes` to `path` through a temporary file: write, fsync, rename,
/// fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_parent(path)
}

/// Overwrites a file with random bytes (in 1 MiB chunks), syncs, removes
/// it and syncs the directory. The store goes this way on zeroization, so
/// the wrapped master key and sealed records are overwritten in place, not
/// merely unlinked (the same caveat as [`MasterKey::destroy_file`] applies
/// to copy-on-write file systems and SSD remapping).
pub fn shred_file(path: &Path) -> Result<(), StoreError> {
    match OpenOptions::new().write(true).open(path) {
        Ok(mut f) => {
            let mut left = f.metadata().map_err(io_err(path))?.len();
            while left > 0 {
                let n = left.min(1 << 20) as usize;
                let noise = crypto::random_bytes(n)?;
                f.write_all(&noise).map_err(io_err(path))?;
                left -= n as u64;
            }
            f.sync_all().map_err(io_err(path))?;
            drop(f);
            fs::remove_file(path).map_err(io_err(path))?;
            sync_parent(path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// The stored form of a user. Sealed as a whole: the password hash is not
/// key material, but nobody reading the data dir should get to crack it.
#[derive(Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub username: String,
    pub role: super::Role,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Attempts counted since the last success. Written before the password
    /// is checked, so a crash mid-check counts as a failure, never as a reset.
    pub consecutive_failures: u32,
    pub locked: bool,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("username", &self.username)
            .field("role", &self.role)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

/// A record's name and its opened plaintext (wiped on drop).
pub type Unsealed = (String, Zeroizing<Vec<u8>>);

/// The store's keys while it is open: the records' master key, the KEK it
/// is wrapped under, its generation, and the seal the KEK comes from (which
/// a rekey replaces together with the KEK).
struct Keys {
    master: MasterKey,
    kek: SecretBytes,
    generation: u64,
    params: SealParams,
    /// A Shamir rekey begun and not yet verified (memory only; see
    /// [`Store::rekey_begin`]). A rotation, a seal or a restart drops it.
    pending: Option<PendingRekey>,
}

/// The new seal of a begun rekey and the master key wrapped under its KEK
/// (not the KEK itself: only the new shares rebuild it).
struct PendingRekey {
    params: SealParams,
    wrapped: Vec<u8>,
    generation: u64,
}

pub struct Store {
    /// `None` only after an I/O failure closed it and reopening failed;
    /// the next operation tries again ([`Store::recover`]).
    db: RwLock<Option<Database>>,
    path: PathBuf,
    /// Read-locked by every seal/unseal (and held across a write's commit),
    /// write-locked by a master-key rotation: no record is ever sealed under
    /// a key that is about to be replaced.
    keys: RwLock<Keys>,
}

/// An open store whose master key is not (yet) available: the engine's
/// `sealed` state. Holds the database (and its file lock) and reads only
/// the plaintext metadata.
pub struct LockedStore {
    db: Database,
    path: PathBuf,
}

const META_SEAL: &str = "seal";
const META_MASTER: &str = "master_key";
const META_GENERATION: &str = "master_generation";

fn wrap_aad(params: &SealParams, generation: u64) -> Vec<u8> {
    format!(
        "hsmgate/v{FORMAT_VERSION}/meta/master_key/{}/{generation}",
        params.type_name()
    )
    .into_bytes()
}

fn wrap_master(
    kek: &SecretBytes,
    master: &MasterKey,
    params: &SealParams,
    generation: u64,
) -> Result<Vec<u8>, StoreError> {
    Ok(crypto::aes_gcm_seal_with_nonce(
        kek.expose_secret(),
        nonce()?,
        master.0.expose_secret(),
        &wrap_aad(params, generation),
    )?)
}

impl Store {
    /// Creates a fresh store, replacing any file at `path`: a new random
    /// master key, wrapped under `kek`, generation 1.
    pub fn create(path: &Path, kek: SecretBytes, params: SealParams) -> Result<Store, StoreError> {
        Store::create_with(path, kek, params, &[], &[])
    }

    /// Creates a fresh store holding `users` and `rings`. Built under a
    /// temporary name and renamed into place once its one transaction has
    /// committed: a crash leaves no store or a whole one (init's admin user
    /// and a restore's records are never half there).
    pub fn create_with(
        path: &Path,
        kek: SecretBytes,
        params: SealParams,
        users: &[UserRecord],
        rings: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<Store, StoreError> {
        Store::create_full(path, kek, params, MasterKey::generate()?, users, rings)
    }

    /// Creates an empty store whose master key is `master` (a cluster
    /// member joining: the cluster key, received from a member), wrapped
    /// under this node's own `kek`.
    pub fn create_member(
        path: &Path,
        kek: SecretBytes,
        params: SealParams,
        master: MasterKey,
    ) -> Result<Store, StoreError> {
        Store::create_full(path, kek, params, master, &[], &[])
    }

    /// A copy of the master key, for a cluster member to hand to a node
    /// joining the cluster (`crate::cluster`: only over the mutually
    /// authenticated cluster channel, to a node whose init token the
    /// crypto officer presented).
    pub fn cluster_key(&self) -> MasterKey {
        MasterKey(self.read_keys().master.0.duplicate())
    }

    fn create_full(
        path: &Path,
        kek: SecretBytes,
        params: SealParams,
        master: MasterKey,
        users: &[UserRecord],
        rings: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<Store, StoreError> {
        let tmp = path.with_extension("redb.tmp");
        for p in [path, tmp.as_path()] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(p)(e)),
            }
        }
        let wrapped = wrap_master(&kek, &master, &params, 1)?;
        let seal_json = serde_json::to_vec(&params).map_err(|e| StoreError::Meta(e.to_string()))?;
        let mut sealed = Vec::with_capacity(users.len() + rings.len());
        for u in users {
            let json =
                Zeroizing::new(serde_json::to_vec(u).map_err(|e| StoreError::Malformed {
                    table: "users",
                    name: u.username.clone(),
                    detail: e.to_string(),
                })?);
            sealed.push((
                USERS,
                u.username.clone(),
                seal_record(&master, "users", &u.username, &json)?,
            ));
        }
        for (name, plain) in rings {
            sealed.push((
                KEYS,
                name.clone(),
                seal_record(&master, "keys", name, plain)?,
            ));
        }
        let db = db_err!(Database::create(&tmp))?;
        let txn = db_err!(db.begin_write())?;
        {
            let mut meta = db_err!(txn.open_table(META))?;
            db_err!(meta.insert("format_version", FORMAT_VERSION.to_be_bytes().as_slice()))?;
            db_err!(meta.insert(META_SEAL, seal_json.as_slice()))?;
            db_err!(meta.insert(META_MASTER, wrapped.as_slice()))?;
            db_err!(meta.insert(META_GENERATION, 1u64.to_be_bytes().as_slice()))?;
            db_err!(txn.open_table(USERS))?;
            db_err!(txn.open_table(KEYS))?;
            for (def, name, value) in &sealed {
                let mut t = db_err!(txn.open_table(*def))?;
                db_err!(t.insert(name.as_str(), value.as_slice()))?;
            }
        }
        db_err!(txn.commit())?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_parent(path)?;
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            keys: RwLock::new(Keys {
                master,
                kek,
                generation: 1,
                params,
                pending: None,
            }),
        })
    }

    /// Opens with a known KEK (auto mode, tests).
    pub fn open(path: &Path, kek: SecretBytes) -> Result<Store, StoreError> {
        LockedStore::open(path)?.unlock(kek).map_err(|(_, e)| e)
    }

    /// Drops the keys (wiped on drop), keeping the database open.
    pub fn lock(self) -> Result<LockedStore, StoreError> {
        let path = self.path;
        match self.db.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(db) => Ok(LockedStore { db, path }),
            None => LockedStore::open(&path),
        }
    }

    /// Runs `f` on the open database; an I/O failure (or redb's
    /// `PreviousIo` after one) closes and reopens the database, which is
    /// how redb recovers: the next write can succeed once the disk has
    /// room again, without a restart.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.db.read().unwrap_or_else(|e| e.into_inner()).is_none() {
            self.recover();
        }
        let result = {
            let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(db) => f(db),
                None => Err(StoreError::Closed),
            }
        };
        if matches!(&result, Err(e) if e.is_io()) {
            self.recover();
        }
        result
    }

    /// Closes and reopens the database (redb repairs it on open). Waits
    /// for every operation in flight. On failure the store stays closed
    /// and the next operation tries again.
    fn recover(&self) {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        *guard = None;
        match Database::open(&self.path) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "store reopened after an I/O failure");
                *guard = Some(db);
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "store cannot be reopened; retrying at the next operation");
            }
        }
    }

    pub fn seal_params(&self) -> SealParams {
        self.read_keys().params.clone()
    }

    pub fn generation(&self) -> u64 {
        self.read_keys().generation
    }

    fn read_keys(&self) -> RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_keys(&self) -> RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-seals every record under a new master key and replaces the
    /// wrapped master key, in one write transaction (see the module docs).
    /// `new_kek` also replaces the KEK (auto mode's key file rotation);
    /// `None` keeps it (the operator's passphrase or shares stay valid).
    /// Returns the new generation. Transit keeps working meanwhile (key
    /// rings are in memory); store reads and writes wait for the commit.
    pub fn rotate_master(&self, new_kek: Option<SecretBytes>) -> Result<u64, StoreError> {
        self.rotate_master_inner(new_kek, None)
    }

    fn rotate_master_inner(
        &self,
        new_kek: Option<SecretBytes>,
        interrupt_after: Option<usize>,
    ) -> Result<u64, StoreError> {
        let mut keys = self.write_keys();
        let new_master = MasterKey::generate()?;
        self.reseal_under(&mut keys, new_master, new_kek, &|_| Ok(()), interrupt_after)
    }

    /// Re-seals every record under `new_master`, wraps it under `new_kek`
    /// (or the current KEK) as the next generation, and runs `extra` in the
    /// same write transaction; then swaps the keys in memory. The caller
    /// holds the keys' write lock (`keys`).
    fn reseal_under(
        &self,
        keys: &mut Keys,
        new_master: MasterKey,
        new_kek: Option<SecretBytes>,
        extra: &dyn Fn(&redb::WriteTransaction) -> Result<(), StoreError>,
        interrupt_after: Option<usize>,
    ) -> Result<u64, StoreError> {
        let kek = new_kek.unwrap_or_else(|| keys.kek.duplicate());
        let generation = keys.generation + 1;
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            let mut done = 0usize;
            for (def, table_name) in [
                (USERS, "users"),
                (KEYS, "keys"),
                (AUDIT, "audit"),
                (replicated::COUNTERS, "counters"),
            ] {
                let mut t = db_err!(txn.open_table(def))?;
                let mut resealed = Vec::new();
                for entry in db_err!(t.iter())? {
                    let (k, v) = db_err!(entry)?;
                    let name = k.value().to_string();
                    let plain = open_record(&keys.master, table_name, &name, v.value())?;
                    let sealed = seal_record(&new_master, table_name, &name, &plain)?;
                    resealed.push((name, sealed));
                }
                for (name, sealed) in resealed {
                    db_err!(t.insert(name.as_str(), sealed.as_slice()))?;
                    done += 1;
                    if interrupt_after.is_some_and(|n| done >= n) {
                        // Dropping the transaction uncommitted is what a crash
                        // here leaves behind.
                        #[cfg(test)]
                        return Err(StoreError::Interrupted);
                    }
                }
            }
            let wrapped = wrap_master(&kek, &new_master, &keys.params, generation)?;
            {
                let mut meta = db_err!(txn.open_table(META))?;
                db_err!(meta.insert(META_MASTER, wrapped.as_slice()))?;
                db_err!(meta.insert(META_GENERATION, generation.to_be_bytes().as_slice()))?;
            }
            extra(&txn)?;
            db_err!(txn.commit())
        })?;
        let params = keys.params.clone();
        // A pending rekey wrapped the old master key: dropped.
        *keys = Keys {
            master: new_master,
            kek,
            generation,
            params,
            pending: None,
        };
        Ok(generation)
    }

    /// Rekey: the same master key (and records) wrapped under a new KEK
    /// from a new seal (a new passphrase, or a new Shamir split). The
    /// caller proves it holds the current seal's secret by handing over the
    /// KEK it rebuilds, compared in constant time with the one that opened
    /// this store. The new seal parameters and the re-wrapped master key
    /// are written in one transaction: after a crash the store opens with
    /// the old secret or the new one, never neither.
    pub fn rekey(
        &self,
        current_kek: &SecretBytes,
        new_kek: SecretBytes,
        new_params: SealParams,
    ) -> Result<(), StoreError> {
        let mut keys = self.write_keys();
        check_rekey(&keys, current_kek, &new_params)?;
        let wrapped = wrap_master(&new_kek, &keys.master, &new_params, keys.generation)?;
        self.commit_rekey(&mut keys, new_kek, new_params, wrapped)
    }

    /// First half of a verified rekey (Shamir): checks the current KEK and
    /// keeps the new seal and the master key wrapped under the new KEK in
    /// memory only. Nothing is written: until [`Store::rekey_commit`] the
    /// current secret keeps opening the store, so new shares that never
    /// reach their holders (a lost response, a crash) lose nothing.
    pub fn rekey_begin(
        &self,
        current_kek: &SecretBytes,
        new_kek: &SecretBytes,
        new_params: SealParams,
    ) -> Result<(), StoreError> {
        let mut keys = self.write_keys();
        check_rekey(&keys, current_kek, &new_params)?;
        let wrapped = wrap_master(new_kek, &keys.master, &new_params, keys.generation)?;
        keys.pending = Some(PendingRekey {
            params: new_params,
            wrapped,
            generation: keys.generation,
        });
        Ok(())
    }

    /// The seal of the pending rekey, if one was begun.
    pub fn pending_rekey(&self) -> Option<SealParams> {
        self.read_keys().pending.as_ref().map(|p| p.params.clone())
    }

    /// Second half: `new_kek`, rebuilt from the new shares, must open the
    /// pending wrapped master key; then the new seal is written (one
    /// transaction, as [`Store::rekey`]). A wrong KEK leaves it pending.
    pub fn rekey_commit(&self, new_kek: SecretBytes) -> Result<SealParams, StoreError> {
        let mut keys = self.write_keys();
        let Some(pending) = keys.pending.as_ref() else {
            return Err(StoreError::Meta("no rekey is pending".into()));
        };
        if pending.generation != keys.generation {
            keys.pending = None;
            return Err(StoreError::Meta(
                "the master key was rotated since the rekey began; begin again".into(),
            ));
        }
        let opened = unwrap_master(
            &new_kek,
            Some(pending.wrapped.clone()),
            &pending.params,
            pending.generation,
        )?;
        {
            use subtle::ConstantTimeEq as _;
            if opened
                .0
                .expose_secret()
                .ct_eq(keys.master.0.expose_secret())
                .unwrap_u8()
                != 1
            {
                return Err(StoreError::WrongKek);
            }
        }
        let PendingRekey {
            params, wrapped, ..
        } = keys
            .pending
            .take()
            .ok_or_else(|| StoreError::Meta("no rekey is pending".into()))?;
        self.commit_rekey(&mut keys, new_kek, params.clone(), wrapped)?;
        Ok(params)
    }

    fn commit_rekey(
        &self,
        keys: &mut Keys,
        new_kek: SecretBytes,
        new_params: SealParams,
        wrapped: Vec<u8>,
    ) -> Result<(), StoreError> {
        let seal_json =
            serde_json::to_vec(&new_params).map_err(|e| StoreError::Meta(e.to_string()))?;
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            {
                let mut meta = db_err!(txn.open_table(META))?;
                db_err!(meta.insert(META_SEAL, seal_json.as_slice()))?;
                db_err!(meta.insert(META_MASTER, wrapped.as_slice()))?;
            }
            db_err!(txn.commit())
        })?;
        keys.kek = new_kek;
        keys.params = new_params;
        keys.pending = None;
        Ok(())
    }

    /// A consistent snapshot of every record's plaintext (for backups):
    /// one read transaction, both tables.
    pub fn snapshot(&self) -> Result<(Vec<UserRecord>, Vec<Unsealed>), StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let mut users = Vec::new();
            let mut rings = Vec::new();
            {
                let t = db_err!(txn.open_table(USERS))?;
                for entry in db_err!(t.iter())? {
                    let (k, v) = db_err!(entry)?;
                    let name = k.value().to_string();
                    let plain = open_record(&keys.master, "users", &name, v.value())?;
                    users.push(decode("users", &name, &plain)?);
                }
            }
            {
                let t = db_err!(txn.open_table(KEYS))?;
                for entry in db_err!(t.iter())? {
                    let (k, v) = db_err!(entry)?;
                    let name = k.value().to_string();
                    let plain = open_record(&keys.master, "keys", &name, v.value())?;
                    rings.push((name, plain));
                }
            }
            Ok((users, rings))
        })
    }

    /// Seals one record's plaintext under the master key, bound to its identity.
    pub fn seal(&self, table: &str, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        seal_record(&self.read_keys().master, table, name, plaintext)
    }

    pub fn unseal(
        &self,
        table: &'static str,
        name: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        open_record(&self.read_keys().master, table, name, sealed)
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        plaintext: &[u8],
    ) -> Result<(), StoreError> {
        // Held through the commit: a rotation cannot slip in between.
        let keys = self.read_keys();
        let sealed = seal_record(&keys.master, table.name(), name, plaintext)?;
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            {
                let mut t = db_err!(txn.open_table(table))?;
                db_err!(t.insert(name, sealed.as_slice()))?;
            }
            db_err!(txn.commit())
        })
    }

    fn get(
        &self,
        table: TableDefinition<&'static str, &'static [u8]>,
        table_name: &'static str,
        name: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(table))?;
            match db_err!(t.get(name))? {
                Some(v) => Ok(Some(open_record(
                    &keys.master,
                    table_name,
                    name,
                    v.value(),
                )?)),
                None => Ok(None),
            }
        })
    }
    fn all(
        &self,
        table: TableDefinition<&'static str, &'static [u8]>,
        table_name: &'static str,
    ) -> Result<Vec<Unsealed>, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(table))?;
            let mut out = Vec::new();
            for entry in db_err!(t.iter())? {
                let (k, v) = db_err!(entry)?;
                let name = k.value().to_string();
                let plain = open_record(&keys.master, table_name, &name, v.value())?;
                out.push((name, plain));
            }
            Ok(out)
        })
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, name: &str) -> Result<bool, StoreError> {
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            let existed = {
                let mut t = db_err!(txn.open_table(table))?;
                let removed = db_err!(t.remove(name))?;
                removed.is_some()
            };
            db_err!(txn.commit())?;
            Ok(existed)
        })
    }

    pub fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let json = Zeroizing::new(serde_json::to_vec(user).map_err(|e| StoreError::Malformed {
            table: "users",
            name: user.username.clone(),
            detail: e.to_string(),
        })?);
        self.put(USERS, &user.username, &json)
    }

    /// A user record, with this node's local failure counters laid over
    /// it when it has any (a cluster member; see [`Store::put_user_counters`]).
    pub fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(USERS))?;
            let Some(v) = db_err!(t.get(name))? else {
                return Ok(None);
            };
            let plain = open_record(&keys.master, "users", name, v.value())?;
            let mut user: UserRecord = decode("users", name, &plain)?;
            self.overlay_counters(&txn, &keys.master, &mut user)?;
            Ok(Some(user))
        })
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(USERS))?;
            let mut out = Vec::new();
            for entry in db_err!(t.iter())? {
                let (k, v) = db_err!(entry)?;
                let name = k.value().to_string();
                let plain = open_record(&keys.master, "users", &name, v.value())?;
                let mut user: UserRecord = decode("users", &name, &plain)?;
                self.overlay_counters(&txn, &keys.master, &mut user)?;
                out.push(user);
            }
            Ok(out)
        })
    }

    /// Stores a key ring's serialized form (already a `Zeroizing` buffer:
    /// it holds key material in the clear until sealed).
    pub fn put_key(&self, name: &str, plaintext: &[u8]) -> Result<(), StoreError> {
        self.put(KEYS, name, plaintext)
    }

    pub fn keys(&self) -> Result<Vec<Unsealed>, StoreError> {
        self.all(KEYS, "keys")
    }

    pub fn delete_key(&self, name: &str) -> Result<bool, StoreError> {
        self.delete(KEYS, name)
    }

    /// One key record's opened plaintext (the engine's reserved records,
    /// such as the transit wrapping key, are read this way on demand).
    pub fn get_key(&self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get(KEYS, "keys", name)
    }

    pub fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        self.delete(USERS, name)
    }

    /// Replaces the audit head witness (one small sealed record, one
    /// committed transaction).
    pub fn put_audit_head(&self, head: &AuditHeadRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(head).map_err(|e| StoreError::Malformed {
            table: "audit",
            name: AUDIT_HEAD.into(),
            detail: e.to_string(),
        })?;
        self.put(AUDIT, AUDIT_HEAD, &json)
    }

    /// The audit head witness, if one was ever written (a store created
    /// before it existed, or by a restore, has none).
    pub fn audit_head(&self) -> Result<Option<AuditHeadRecord>, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            read_audit_head(&txn, &keys.master)
        })
    }

    #[cfg(test)]
    fn raw_put(&self, table: TableDefinition<&str, &[u8]>, name: &str, bytes: &[u8]) {
        self.with_db(|db| {
            let txn = db.begin_write().unwrap();
            txn.open_table(table).unwrap().insert(name, bytes).unwrap();
            txn.commit().unwrap();
            Ok(())
        })
        .unwrap();
    }

    #[cfg(test)]
    fn raw_get(&self, table: TableDefinition<&str, &[u8]>, name: &str) -> Vec<u8> {
        self.with_db(|db| {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(table).unwrap();
            let v = t.get(name).unwrap().unwrap().value().to_vec();
            Ok(v)
        })
        .unwrap()
    }
}

/// Reads and opens the audit head record in `txn`; a missing table (a
/// store from before it existed) is no head.
fn read_audit_head(
    txn: &redb::ReadTransaction,
    master: &MasterKey,
) -> Result<Option<AuditHeadRecord>, StoreError> {
    let t = match txn.open_table(AUDIT) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(StoreError::Database(e.into())),
    };
    match db_err!(t.get(AUDIT_HEAD))? {
        Some(v) => {
            let plain = open_record(master, "audit", AUDIT_HEAD, v.value())?;
            decode("audit", AUDIT_HEAD, &plain).map(Some)
        }
        None => Ok(None),
    }
}

/// Why [`read_audit_head_offline`] could not read the head.
#[derive(Debug, thiserror::Error)]
pub enum OfflineHeadError {
    /// A server (or another process) has the store open for writing.
    #[error("the store is in use by a running server (stop it to compare the store's head)")]
    InUse,
    /// redb would have to repair the file (not shut down cleanly); the
    /// read-only open never writes, so it does not.
    #[error(
        "the store was not shut down cleanly and needs a repair (start and stop the server once)"
    )]
    NeedsRepair,
    /// Passphrase or Shamir mode: the master key needs the operator's KEK.
    #[error("the store is sealed ({0} mode): its master key is not available offline")]
    Sealed(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads the audit head witness from a stopped server's store without
/// changing anything: the database is opened read-only (a shared lock that
/// a running server's exclusive lock refuses; no repair, no write), and the
/// master key is unwrapped in memory with `kek` (auto mode's `master.key`).
/// Used by `hsmgate audit verify`.
pub fn read_audit_head_offline(
    path: &Path,
    kek: Option<SecretBytes>,
) -> Result<Option<AuditHeadRecord>, OfflineHeadError> {
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OfflineHeadError::InUse),
        Err(redb::DatabaseError::RepairAborted) => return Err(OfflineHeadError::NeedsRepair),
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
            return Err(io_err(path)(e).into())
        }
        Err(e) => return Err(StoreError::Database(e.into()).into()),
    };
    let txn = db_err!(db.begin_read())?;
    let meta = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        let t = db_err!(txn.open_table(META))?;
        let v = db_err!(t.get(key))?.map(|v| v.value().to_vec());
        Ok(v)
    };
    let found = meta("format_version")?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0);
    if found != FORMAT_VERSION {
        return Err(StoreError::UnsupportedFormat { found }.into());
    }
    let params = parse_seal_params(meta(META_SEAL)?)?;
    if !matches!(params, SealParams::Auto) {
        return Err(OfflineHeadError::Sealed(params.type_name()));
    }
    let Some(kek) = kek else {
        return Err(OfflineHeadError::Sealed("auto, but no master.key"));
    };
    let generation = parse_generation(meta(META_GENERATION)?);
    let master = unwrap_master(&kek, meta(META_MASTER)?, &params, generation)?;
    Ok(read_audit_head(&txn, &master)?)
}

fn parse_seal_params(bytes: Option<Vec<u8>>) -> Result<SealParams, StoreError> {
    match bytes {
        None => Ok(SealParams::Auto),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Meta(format!("seal parameters: {e}"))),
    }
}

/// A rekey needs the KEK that opened this store (compared in constant
/// time) and keeps the seal type.
fn check_rekey(
    keys: &Keys,
    current_kek: &SecretBytes,
    new_params: &SealParams,
) -> Result<(), StoreError> {
    use subtle::ConstantTimeEq as _;
    let same = current_kek
        .expose_secret()
        .ct_eq(keys.kek.expose_secret())
        .unwrap_u8()
        == 1;
    if !same {
        return Err(StoreError::WrongKek);
    }
    if new_params.type_name() != keys.params.type_name() {
        return Err(StoreError::Meta(
            "a rekey keeps the seal type; changing it is backup, zeroize, init, restore".into(),
        ));
    }
    Ok(())
}

fn parse_generation(bytes: Option<Vec<u8>>) -> u64 {
    bytes
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Opens the wrapped master key with `kek` (or, in the legacy layout with
/// no wrapped key, uses the KEK itself).
fn unwrap_master(
    kek: &SecretBytes,
    wrapped: Option<Vec<u8>>,
    params: &SealParams,
    generation: u64,
) -> Result<MasterKey, StoreError> {
    match wrapped {
        None => Ok(MasterKey(kek.duplicate())),
        Some(w) => {
            match crypto::aes_gcm_open(kek.expose_secret(), &w, &wrap_aad(params, generation)) {
                Ok(plain) if plain.len() == 32 => Ok(MasterKey(SecretBytes::from_slice(&plain))),
                Ok(_) => Err(StoreError::Meta("master key is not 32 bytes".into())),
                Err(_) => Err(StoreError::WrongKek),
            }
        }
    }
}

fn record_aad(table: &str, name: &str) -> Vec<u8> {
    format!("hsmgate/v{FORMAT_VERSION}/{table}/{name}").into_bytes()
}

fn seal_record(
    master: &MasterKey,
    table: &str,
    name: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, StoreError> {
    Ok(crypto::aes_gcm_seal_with_nonce(
        master.0.expose_secret(),
        nonce()?,
        plaintext,
        &record_aad(table, name),
    )?)
}

fn open_record(
    master: &MasterKey,
    table: &'static str,
    name: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    crypto::aes_gcm_open(master.0.expose_secret(), sealed, &record_aad(table, name)).map_err(|_| {
        StoreError::Unseal {
            table,
            name: name.to_string(),
        }
    })
}

impl LockedStore {
    /// Opens the database and checks its format; no key needed.
    pub fn open(path: &Path) -> Result<LockedStore, StoreError> {
        let db = db_err!(Database::open(path))?;
        let txn = db_err!(db.begin_read())?;
        let meta = db_err!(txn.open_table(META))?;
        let found = db_err!(meta.get("format_version"))?
            .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        if found != FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat { found });
        }
        drop(meta);
        drop(txn);
        Ok(LockedStore {
            db,
            path: path.to_path_buf(),
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = db_err!(self.db.begin_read())?;
        let meta = db_err!(txn.open_table(META))?;
        let v = db_err!(meta.get(key))?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// How this store is sealed. A store from before seal modes existed
    /// records nothing and is `auto`.
    pub fn seal_params(&self) -> Result<SealParams, StoreError> {
        parse_seal_params(self.meta(META_SEAL)?)
    }

    /// Opens the wrapped master key with `kek`. On failure the locked store
    /// comes back, unchanged, with the error.
    // The error hands the store back (a wrong unseal must not close it);
    // it is rare and moved once, so its size does not matter.
    #[allow(clippy::result_large_err)]
    pub fn unlock(self, kek: SecretBytes) -> Result<Store, (LockedStore, StoreError)> {
        let params = match self.seal_params() {
            Ok(p) => p,
            Err(e) => return Err((self, e)),
        };
        let wrapped = match self.meta(META_MASTER) {
            Ok(w) => w,
            Err(e) => return Err((self, e)),
        };
        let generation = match self.meta(META_GENERATION) {
            Ok(g) => parse_generation(g),
            Err(e) => return Err((self, e)),
        };
        let master = match unwrap_master(&kek, wrapped, &params, generation) {
            Ok(m) => m,
            Err(e) => return Err((self, e)),
        };
        Ok(Store {
            db: RwLock::new(Some(self.db)),
            path: self.path,
            keys: RwLock::new(Keys {
                master,
                kek,
                generation,
                params,
                pending: None,
            }),
        })
    }
}

fn nonce() -> Result<[u8; 12], StoreError> {
    let bytes = crypto::random_bytes(12)?;
    let mut n = [0u8; 12];
    n.copy_from_slice(&bytes);
    Ok(n)
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    name: &str,
    plain: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(plain).map_err(|e| StoreError::Malformed {
        table,
        name: name.to_string(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Role;

    fn user(name: &str) -> UserRecord {
        UserRecord {
            username: name.into(),
            role: Role::CryptoUser,
            password_hash: "$argon2id$fake".into(),
            consecutive_failures: 2,
            locked: false,
        }
    }

    /// Three members of one cluster: stores sharing one master key, each
    /// under its own KEK.
    fn members(dir: &Path, n: usize) -> Vec<Store> {
        let first = Store::create(&dir.join("m0.redb"), kek(), SealParams::Auto).unwrap();
        let mut out = vec![];
        for i in 1..n {
            let m = Store::create_member(
                &dir.join(format!("m{i}.redb")),
                kek(),
                SealParams::Auto,
                first.cluster_key(),
            )
            .unwrap();
            out.push(m);
        }
        out.insert(0, first);
        out
    }

    fn put_everywhere(stores: &[&Store], name: &str) {
        let op = stores[0]
            .user_op(&user(name), Expect::Absent, true)
            .unwrap();
        for s in stores {
            s.apply_ops(std::slice::from_ref(&op), None, None)
                .unwrap()
                .unwrap();
        }
    }

    #[test]
    fn a_cluster_key_rotation_reseals_every_member_and_a_stale_snapshot_catches_up_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let stores = members(dir.path(), 3);
        let (a, b, c) = (&stores[0], &stores[1], &stores[2]);
        put_everywhere(&[a, b, c], "alice");
        let old_id = a.key_id();
        let old_key = a.cluster_key();
        let wrapped = a.next_cluster_key().unwrap();
        // a and b apply the rotation; c is down.
        for s in [a, b] {
            assert!(s
                .rotate_cluster_key(&wrapped, Some(b"1"), None)
                .unwrap()
                .is_ok());
            assert_eq!(s.get_user("alice").unwrap().unwrap().username, "alice");
        }
        assert_eq!(a.key_id(), b.key_id());
        assert_ne!(a.key_id(), old_id);
        // Deny: a record written after the rotation does not open under the
        // key a departed member kept.
        put_everywhere(&[a, b], "bob");
        let sealed = a.export_replicated().unwrap();
        let bob = sealed.records.iter().find(|r| r.name == "bob").unwrap();
        assert!(open_record(&old_key, "users", "bob", &bob.sealed).is_err());
        // Replaying the rotation (its key now opens nothing) is a refused no-op.
        assert!(a
            .rotate_cluster_key(&wrapped, Some(b"2"), None)
            .unwrap()
            .is_err());
        assert_eq!(a.get_user("bob").unwrap().unwrap().username, "bob");
        // Allow: c, one rotation behind, installs a snapshot taken after it.
        c.install_replicated(&sealed).unwrap();
        assert_eq!(c.key_id(), a.key_id());
        assert_eq!(c.get_user("bob").unwrap().unwrap().username, "bob");
        // Deny: a member two rotations behind must rejoin; nothing changes.
        let d = Store::create_member(
            &dir.path().join("d.redb"),
            kek(),
            SealParams::Auto,
            MasterKey(old_key.0.duplicate()),
        )
        .unwrap();
        let wrapped2 = a.next_cluster_key().unwrap();
        a.rotate_cluster_key(&wrapped2, Some(b"3"), None)
            .unwrap()
            .unwrap();
        let err = d.install_replicated(&a.export_replicated().unwrap());
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("more than one rotation"));
        assert_eq!(d.key_id(), old_id);
    }

    #[test]
    fn round_trips_a_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&dir.path().join("s.redb"), kek(), SealParams::Auto).unwrap();
        store.put_user(&user("alice")).unwrap();
        let got = store.get_user("alice").unwrap().unwrap();
        assert_eq!(got.consecutive_failures, 2);
        assert!(store.get_user("bob").unwrap().is_none());
    }

    #[test]
    fn a_sealed_value_moved_to_another_record_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&dir.path().join("s.redb"), kek(), SealParams::Auto).unwrap();
        store.put_user(&user("alice")).unwrap();
        store.put_user(&user("bob")).unwrap();
        // An attacker with write access copies alice's sealed record over bob's.
        let alice_sealed = store.raw_get(USERS, "alice");
        store.raw_put(USERS, "bob", &alice_sealed);
        assert!(matches!(
            store.get_user("bob"),
            Err(StoreError::Unseal { .. })
        ));
        // The same bytes still open where they belong.
        assert!(store.get_user("alice").unwrap().is_some());
        // And across tables.
        store.raw_put(KEYS, "alice", &alice_sealed);
        assert!(matches!(store.keys(), Err(StoreError::Unseal { .. })));
    }

    fn kek() -> SecretBytes {
        MasterKey::generate().unwrap().into_secret()
    }

    #[test]
    fn another_kek_opens_nothing_and_the_store_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let right = kek();
        let store = Store::create(&path, right.duplicate(), SealParams::Auto).unwrap();
        store.put_user(&user("alice")).unwrap();
        drop(store);
        let locked = LockedStore::open(&path).unwrap();
        let (locked, err) = locked.unlock(kek()).err().unwrap();
        assert!(matches!(err, StoreError::WrongKek));
        let store = locked.unlock(right).ok().unwrap();
        assert!(store.get_user("alice").unwrap().is_some());
    }

    #[test]
    fn the_seal_parameters_are_kept_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let params = SealParams::Shamir {
            threshold: 2,
            shares: 3,
        };
        drop(Store::create(&path, kek(), params.clone()).unwrap());
        assert_eq!(
            LockedStore::open(&path).unwrap().seal_params().unwrap(),
            params
        );
    }

    /// Rekey: the old KEK stops opening the store, the new one opens it with
    /// every record and the new parameters; a wrong current KEK or a change
    /// of seal type is refused and changes nothing.
    #[test]
    fn a_rekey_rewraps_the_same_master_key_under_the_new_kek_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let old = kek();
        let old_params = SealParams::Shamir {
            threshold: 2,
            shares: 3,
        };
        let store = Store::create(&path, old.duplicate(), old_params.clone()).unwrap();
        store.put_key("k", b"ring").unwrap();
        let sealed_before = store.raw_get(KEYS, "k");
        let new = kek();
        let new_params = SealParams::Shamir {
            threshold: 3,
            shares: 5,
        };
        // Deny: a KEK that is not the current one.
        assert!(matches!(
            store.rekey(&kek(), new.duplicate(), new_params.clone()),
            Err(StoreError::WrongKek)
        ));
        // Deny: another seal type.
        assert!(store
            .rekey(&old, new.duplicate(), SealParams::Auto)
            .is_err());
        assert_eq!(store.seal_params(), old_params);
        // Allow.
        store
            .rekey(&old, new.duplicate(), new_params.clone())
            .unwrap();
        assert_eq!(store.seal_params(), new_params);
        assert_eq!(store.generation(), 1, "a rekey is not a rotation");
        assert_eq!(store.raw_get(KEYS, "k"), sealed_before, "records untouched");
        drop(store);
        let locked = LockedStore::open(&path).unwrap();
        assert_eq!(locked.seal_params().unwrap(), new_params);
        let (locked, err) = locked.unlock(old).err().unwrap();
        assert!(matches!(err, StoreError::WrongKek));
        let store = locked.unlock(new).ok().unwrap();
        assert_eq!(store.get_key("k").unwrap().unwrap().as_slice(), b"ring");
    }

    /// A verified rekey writes nothing until the new KEK comes back; a
    /// wrong one leaves it pending, a rotation drops it.
    #[test]
    fn a_begun_rekey_changes_nothing_until_committed_with_the_new_kek() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let old = kek();
        let params = |t| SealParams::Shamir {
            threshold: t,
            shares: 5,
        };
        let store = Store::create(&path, old.duplicate(), params(2)).unwrap();
        store.put_key("k", b"ring").unwrap();
        let new = kek();
        assert!(matches!(
            store.rekey_begin(&kek(), &new, params(3)),
            Err(StoreError::WrongKek)
        ));
        store.rekey_begin(&old, &new, params(3)).unwrap();
        assert_eq!(store.pending_rekey(), Some(params(3)));
        assert_eq!(store.seal_params(), params(2), "nothing applied yet");
        assert!(matches!(
            store.rekey_commit(kek()),
            Err(StoreError::WrongKek)
        ));
        assert_eq!(store.pending_rekey(), Some(params(3)), "still pending");
        // A rotation re-wraps a new master key: the pending one is stale.
        store.rotate_master(None).unwrap();
        assert_eq!(store.pending_rekey(), None);
        assert!(store.rekey_commit(new.duplicate()).is_err());
        // Begin again, commit with the new KEK: only it opens the store.
        store.rekey_begin(&old, &new, params(3)).unwrap();
        assert_eq!(store.rekey_commit(new.duplicate()).unwrap(), params(3));
        drop(store);
        let locked = LockedStore::open(&path).unwrap();
        assert_eq!(locked.seal_params().unwrap(), params(3));
        let (locked, err) = locked.unlock(old).err().unwrap();
        assert!(matches!(err, StoreError::WrongKek));
        let store = locked.unlock(new).ok().unwrap();
        assert_eq!(store.get_key("k").unwrap().unwrap().as_slice(), b"ring");
    }

    /// Many records under the old key; every one reads back after rotation
    /// and after reopening with the same KEK; the old master key is gone.
    #[test]
    fn rotation_reseals_every_record_under_a_new_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = kek();
        let store = Store::create(&path, k.duplicate(), SealParams::Auto).unwrap();
        for i in 0..20 {
            store.put_user(&user(&format!("u{i}"))).unwrap();
            store
                .put_key(&format!("k{i}"), format!("ring {i}").as_bytes())
                .unwrap();
        }
        let before = store.raw_get(KEYS, "k3");
        assert_eq!(store.generation(), 1);
        assert_eq!(store.rotate_master(None).unwrap(), 2);
        assert_ne!(
            store.raw_get(KEYS, "k3"),
            before,
            "record was not re-sealed"
        );
        assert_eq!(store.users().unwrap().len(), 20);
        drop(store);
        let store = Store::open(&path, k).unwrap();
        assert_eq!(store.generation(), 2);
        let keys = store.keys().unwrap();
        assert_eq!(keys.len(), 20);
        assert!(keys
            .iter()
            .any(|(n, p)| n == "k7" && p.as_slice() == b"ring 7"));
    }

    /// A rotation that stops midway (the test hook returns before commit,
    /// dropping the transaction as a crash would) leaves the old generation:
    /// the store opens with the same KEK and every record reads.
    #[test]
    fn an_interrupted_rotation_leaves_the_old_generation_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = kek();
        let store = Store::create(&path, k.duplicate(), SealParams::Auto).unwrap();
        for i in 0..10 {
            store
                .put_key(&format!("k{i}"), format!("ring {i}").as_bytes())
                .unwrap();
        }
        let err = store.rotate_master_inner(Some(kek()), Some(5)).unwrap_err();
        assert!(matches!(err, StoreError::Interrupted));
        // Still usable in-process.
        assert_eq!(store.keys().unwrap().len(), 10);
        store.put_key("after", b"x").unwrap();
        drop(store);
        let store = Store::open(&path, k.duplicate()).unwrap();
        assert_eq!(store.generation(), 1);
        assert_eq!(store.keys().unwrap().len(), 11);
        // And a complete rotation afterwards works.
        assert_eq!(store.rotate_master(None).unwrap(), 2);
        drop(store);
        assert_eq!(Store::open(&path, k).unwrap().keys().unwrap().len(), 11);
    }

    /// A store in the pre-seal layout (records sealed directly under the
    /// key file's key) still opens, and its first rotation moves it to the
    /// wrapped layout.
    #[test]
    fn a_legacy_store_opens_and_rotates_into_the_wrapped_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = kek();
        let store = Store::create(&path, k.duplicate(), SealParams::Auto).unwrap();
        // Rewrite into the legacy layout: records under the KEK itself, no
        // wrapped key or generation in meta.
        {
            let legacy = MasterKey(k.duplicate());
            let sealed = seal_record(&legacy, "keys", "old", b"legacy ring").unwrap();
            store.raw_put(KEYS, "old", &sealed);
            store
                .with_db(|db| {
                    let txn = db.begin_write().unwrap();
                    {
                        let mut meta = txn.open_table(META).unwrap();
                        meta.remove(META_MASTER).unwrap();
                        meta.remove(META_GENERATION).unwrap();
                        meta.remove(META_SEAL).unwrap();
                    }
                    txn.commit().unwrap();
                    Ok(())
                })
                .unwrap();
        }
        drop(store);
        let store = Store::open(&path, k.duplicate()).unwrap();
        assert_eq!(store.keys().unwrap()[0].1.as_slice(), b"legacy ring");
        store.rotate_master(None).unwrap();
        drop(store);
        let store = Store::open(&path, k).unwrap();
        assert_eq!(store.keys().unwrap()[0].1.as_slice(), b"legacy ring");
    }

    /// The audit head witness round-trips, survives a master-key rotation,
    /// reads offline (read-only) only while no one holds the store, and a
    /// sealed value copied onto it from another record does not open.
    #[test]
    fn the_audit_head_round_trips_and_reads_offline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let k = kek();
        let store = Store::create(&path, k.duplicate(), SealParams::Auto).unwrap();
        assert_eq!(store.audit_head().unwrap(), None);
        let head = AuditHeadRecord {
            seq: 42,
            hash: "ab".repeat(32),
        };
        store.put_audit_head(&head).unwrap();
        assert_eq!(store.audit_head().unwrap(), Some(head.clone()));
        assert!(matches!(
            read_audit_head_offline(&path, Some(k.duplicate())),
            Err(OfflineHeadError::InUse)
        ));
        store.rotate_master(None).unwrap();
        assert_eq!(store.audit_head().unwrap(), Some(head.clone()));
        drop(store);
        assert_eq!(
            read_audit_head_offline(&path, Some(k.duplicate())).unwrap(),
            Some(head.clone())
        );
        assert!(matches!(
            read_audit_head_offline(&path, Some(kek())),
            Err(OfflineHeadError::Store(StoreError::WrongKek))
        ));
        // The offline read changed nothing: the store opens and holds it.
        let store = Store::open(&path, k.duplicate()).unwrap();
        assert_eq!(store.audit_head().unwrap(), Some(head));
        store.put_user(&user("alice")).unwrap();
        let alice = store.raw_get(USERS, "alice");
        store.raw_put(AUDIT, AUDIT_HEAD, &alice);
        assert!(matches!(
            store.audit_head(),
            Err(StoreError::Unseal { table: "audit", .. })
        ));
    }

    #[test]
    fn a_sealed_mode_store_head_is_not_read_offline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let params = SealParams::Shamir {
            threshold: 2,
            shares: 3,
        };
        drop(Store::create(&path, kek(), params).unwrap());
        assert!(matches!(
            read_audit_head_offline(&path, Some(kek())),
            Err(OfflineHeadError::Sealed(_))
        ));
    }

    #[test]
    fn shred_overwrites_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        shred_file(&path).unwrap();
        assert!(!path.exists());
        shred_file(&path).unwrap();
    }

    #[test]
    fn master_key_file_is_0600_and_group_readable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::generate().unwrap().persist(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(MasterKey::load(&path).is_ok());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            MasterKey::load(&path),
            Err(StoreError::MasterKeyPermissions(_))
        ));
        MasterKey::destroy_file(&path).unwrap();
        assert!(!path.exists());
    }
}
