//! The sealed, crash-safe store: users and key rings in one redb file.
//!
//! Every value is sealed with AES-256-GCM under the master key, with the
//! record's identity (format version, table, name) as associated data, so a
//! sealed value copied onto another record does not open. redb commits with
//! `Durability::Immediate`: once `put_*` returns, the record survives
//! `kill -9` and power loss.
//!
//! The master key lives in `master.key` (mode 0600) beside the store in the
//! default auto-unseal mode; [`MasterKey::destroy_file`] is half of
//! zeroization (the other half is dropping it from memory).
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError};
use super::secret::SecretBytes;

/// Bumped whenever the record layout changes; part of every record's AAD.
pub const FORMAT_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");

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
        match OpenOptions::new().write(true).open(path) {
            Ok(mut f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(32) as usize;
                let noise = crypto::random_bytes(len.max(32))?;
                f.write_all(&noise).map_err(io_err(path))?;
                f.sync_all().map_err(io_err(path))?;
                drop(f);
                fs::remove_file(path).map_err(io_err(path))?;
                sync_parent(path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        }
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

pub struct Store {
    db: Database,
    master: MasterKey,
}

impl Store {
    /// Creates a fresh store, replacing any file at `path`.
    pub fn create(path: &Path, master: MasterKey) -> Result<Store, StoreError> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        let db = db_err!(Database::create(path))?;
        let store = Store { db, master };
        let txn = db_err!(store.db.begin_write())?;
        {
            let mut meta = db_err!(txn.open_table(META))?;
            db_err!(meta.insert("format_version", FORMAT_VERSION.to_be_bytes().as_slice()))?;
            db_err!(txn.open_table(USERS))?;
            db_err!(txn.open_table(KEYS))?;
        }
        db_err!(txn.commit())?;
        Ok(store)
    }

    pub fn open(path: &Path, master: MasterKey) -> Result<Store, StoreError> {
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
        Ok(Store { db, master })
    }

    fn aad(table: &str, name: &str) -> Vec<u8> {
        format!("hsmgate/v{FORMAT_VERSION}/{table}/{name}").into_bytes()
    }

    /// Seals one record's plaintext under the master key, bound to its identity.
    pub fn seal(&self, table: &str, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(crypto::aes_gcm_seal_with_nonce(
            self.master.0.expose_secret(),
            nonce()?,
            plaintext,
            &Self::aad(table, name),
        )?)
    }

    pub fn unseal(
        &self,
        table: &'static str,
        name: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        crypto::aes_gcm_open(
            self.master.0.expose_secret(),
            sealed,
            &Self::aad(table, name),
        )
        .map_err(|_| StoreError::Unseal {
            table,
            name: name.to_string(),
        })
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        plaintext: &[u8],
    ) -> Result<(), StoreError> {
        let sealed = self.seal(table.name(), name, plaintext)?;
        let txn = db_err!(self.db.begin_write())?;
        {
            let mut t = db_err!(txn.open_table(table))?;
            db_err!(t.insert(name, sealed.as_slice()))?;
        }
        db_err!(txn.commit())
    }

    fn get(
        &self,
        table: TableDefinition<&'static str, &'static [u8]>,
        table_name: &'static str,
        name: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let txn = db_err!(self.db.begin_read())?;
        let t = db_err!(txn.open_table(table))?;
        match db_err!(t.get(name))? {
            Some(v) => Ok(Some(self.unseal(table_name, name, v.value())?)),
            None => Ok(None),
        }
    }

    fn all(
        &self,
        table: TableDefinition<&'static str, &'static [u8]>,
        table_name: &'static str,
    ) -> Result<Vec<Unsealed>, StoreError> {
        let txn = db_err!(self.db.begin_read())?;
        let t = db_err!(txn.open_table(table))?;
        let mut out = Vec::new();
        for entry in db_err!(t.iter())? {
            let (k, v) = db_err!(entry)?;
            let name = k.value().to_string();
            let plain = self.unseal(table_name, &name, v.value())?;
            out.push((name, plain));
        }
        Ok(out)
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, name: &str) -> Result<bool, StoreError> {
        let txn = db_err!(self.db.begin_write())?;
        let existed = {
            let mut t = db_err!(txn.open_table(table))?;
            let removed = db_err!(t.remove(name))?;
            removed.is_some()
        };
        db_err!(txn.commit())?;
        Ok(existed)
    }

    pub fn put_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let json = Zeroizing::new(serde_json::to_vec(user).map_err(|e| StoreError::Malformed {
            table: "users",
            name: user.username.clone(),
            detail: e.to_string(),
        })?);
        self.put(USERS, &user.username, &json)
    }

    pub fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.get(USERS, "users", name)?
            .map(|plain| decode("users", name, &plain))
            .transpose()
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.all(USERS, "users")?
            .into_iter()
            .map(|(name, plain)| decode("users", &name, &plain))
            .collect()
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

    #[cfg(test)]
    fn raw_put(&self, table: TableDefinition<&str, &[u8]>, name: &str, bytes: &[u8]) {
        let txn = self.db.begin_write().unwrap();
        txn.open_table(table).unwrap().insert(name, bytes).unwrap();
        txn.commit().unwrap();
    }

    #[cfg(test)]
    fn raw_get(&self, table: TableDefinition<&str, &[u8]>, name: &str) -> Vec<u8> {
        let txn = self.db.begin_read().unwrap();
        let t = txn.open_table(table).unwrap();
        let v = t.get(name).unwrap().unwrap().value().to_vec();
        v
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

    #[test]
    fn round_trips_a_user() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::create(&dir.path().join("s.redb"), MasterKey::generate().unwrap()).unwrap();
        store.put_user(&user("alice")).unwrap();
        let got = store.get_user("alice").unwrap().unwrap();
        assert_eq!(got.consecutive_failures, 2);
        assert!(store.get_user("bob").unwrap().is_none());
    }

    #[test]
    fn a_sealed_value_moved_to_another_record_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::create(&dir.path().join("s.redb"), MasterKey::generate().unwrap()).unwrap();
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

    #[test]
    fn another_master_key_opens_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::create(&path, MasterKey::generate().unwrap()).unwrap();
        store.put_user(&user("alice")).unwrap();
        drop(store);
        let store = Store::open(&path, MasterKey::generate().unwrap()).unwrap();
        assert!(matches!(
            store.get_user("alice"),
            Err(StoreError::Unseal { .. })
        ));
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
