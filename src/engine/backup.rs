//! Encrypted, signed backups (format and threat model: docs/BACKUP.md).
//!
//! ```text
//! "HSMGBAK\x01"                       8 bytes, magic + format version 1
//! header_len  u32 BE, header           JSON (below), at most 64 KiB
//! payload_len u64 BE, payload          AES-256-GCM(payload key, nonce,
//!                                        JSON of every record; stored as
//!                                        nonce || ciphertext || tag,
//!                                        AAD = magic || header_len || header)
//! signature                             64 bytes, Ed25519 over everything before it
//! ```
//!
//! A fresh random 256-bit backup key per file. Every record (user, key
//! ring) is wrapped with AES-KWP (RFC 5649) under the backup key; the
//! record list (names included) is then encrypted with AES-256-GCM under a
//! payload key derived from the backup key (HKDF-SHA256). The backup key is
//! wrapped for the custodian: ephemeral X25519 with the custodian's public
//! key (from config), HKDF-SHA256 over the shared secret and both public
//! keys, AES-KWP. The running server holds only the custodian's *public*
//! key, so it can write backups and cannot read them. The whole file is
//! signed with the backup signing key (`[backup] signing_key_file`);
//! restore accepts only files signed by a key pinned in config
//! (`[backup] trusted_signers`), so neither a network peer nor anyone who
//! merely knows the custodian's public key can make a file that restores.
use aws_lc_rs::agreement::{self, EphemeralPrivateKey, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto;
use super::keyring::KeyRing;
use super::secret::SecretString;
use super::store::UserRecord;
use super::{Engine, EngineError, EngineState, InitOutcome, Principal, Role};

pub const MAGIC: &[u8; 8] = b"HSMGBAK\x01";
const MAX_HEADER: usize = 64 * 1024;
const SIG_LEN: usize = 64;
const WRAP_INFO: &[u8] = b"hsmgate backup v1 custodian wrap";
const PAYLOAD_INFO: &[u8] = b"hsmgate backup v1 payload";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not an hsmgate backup (bad magic or unsupported format version)")]
    Magic,
    #[error("the backup file is truncated or has trailing bytes")]
    Truncated,
    #[error("the backup header is malformed: {0}")]
    Header(String),
    #[error(
        "the backup's signature does not verify under any key in [backup] trusted_signers \
         (tampered, forged, or signed by a key this server does not trust)"
    )]
    BadSignature,
    #[error("[backup] trusted_signers is empty: this server trusts no backup")]
    NoTrustedSigners,
    #[error("this backup was made for another custodian key")]
    WrongCustodian,
    #[error("the custodian key does not open this backup")]
    Unwrap,
    #[error("the backup's contents are malformed: {0}")]
    Contents(String),
    #[error("backup key material is invalid: {0}")]
    Key(String),
    #[error("crypto failure: {0}")]
    Crypto(String),
}

/// What a backup holds: every user and every key ring record.
pub struct Contents {
    pub users: Vec<UserRecord>,
    /// (name, serialized key ring) as the store keeps them.
    pub rings: Vec<(String, Zeroizing<Vec<u8>>)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: u32,
    created_at: u64,
    generator: String,
    key_wrap: String,
    payload_cipher: String,
    custodian_public_key: String,
    ephemeral_public_key: String,
    wrapped_backup_key: String,
    signer_public_key: String,
    users: usize,
    keys: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    table: String,
    name: String,
    /// base64 AES-KWP(backup key, record plaintext).
    wrapped: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    entries: Vec<Entry>,
}

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn unb64(field: &str, s: &str) -> Result<Vec<u8>, BackupError> {
    STANDARD
        .decode(s)
        .map_err(|_| BackupError::Header(format!("{field} is not base64")))
}

fn crypto_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BackupError {
    move |e| BackupError::Crypto(format!("{what}: {e}"))
}

fn kwp_wrap(key: &[u8], plain: &[u8]) -> Result<Vec<u8>, BackupError> {
    let kek = AesKek::new(&AES_256, key).map_err(crypto_err("kwp key"))?;
    let mut out = vec![0u8; plain.len() + 15];
    let n = kek
        .wrap_with_padding(plain, &mut out)
        .map_err(crypto_err("kwp wrap"))?
        .len();
    out.truncate(n);
    Ok(out)
}

fn kwp_unwrap(key: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let kek = AesKek::new(&AES_256, key).map_err(crypto_err("kwp key"))?;
    let mut out = Zeroizing::new(vec![0u8; wrapped.len()]);
    let n = kek
        .unwrap_with_padding(wrapped, &mut out)
        .map_err(|_| BackupError::Unwrap)?
        .len();
    out.truncate(n);
    Ok(out)
}

/// HKDF-SHA256 of the X25519 shared secret, bound to both public keys.
fn custodian_kek(
    shared: &[u8],
    eph_pub: &[u8],
    custodian_pub: &[u8],
) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let mut info = WRAP_INFO.to_vec();
    info.extend_from_slice(eph_pub);
    info.extend_from_slice(custodian_pub);
    let k = crypto::hkdf_sha256(shared, &info, 32).map_err(crypto_err("hkdf"))?;
    Ok(Zeroizing::new(k.expose_secret().to_vec()))
}

fn payload_key(backup_key: &[u8]) -> Result<Zeroizing<Vec<u8>>, BackupError> {
    let k = crypto::hkdf_sha256(backup_key, PAYLOAD_INFO, 32).map_err(crypto_err("hkdf"))?;
    Ok(Zeroizing::new(k.expose_secret().to_vec()))
}

/// The public half of an X25519 private key (raw 32 bytes).
pub fn x25519_public(private: &[u8]) -> Result<[u8; 32], BackupError> {
    let key = PrivateKey::from_private_key(&X25519, private)
        .map_err(|_| BackupError::Key("a custodian key is 32 raw X25519 bytes".into()))?;
    let public = key.compute_public_key().map_err(crypto_err("x25519"))?;
    public
        .as_ref()
        .try_into()
        .map_err(|_| BackupError::Key("x25519 public key length".into()))
}

/// A new custodian key (X25519, raw private bytes) and signing key
/// (Ed25519 PKCS#8), with their public keys: `hsmgate backup-keygen`.
pub struct NewKeys {
    pub custodian_private: Zeroizing<Vec<u8>>,
    pub custodian_public: [u8; 32],
    pub signer_pkcs8: Zeroizing<Vec<u8>>,
    pub signer_public: [u8; 32],
}

pub fn keygen() -> Result<NewKeys, BackupError> {
    let custodian_private = crypto::random_bytes(32).map_err(crypto_err("random"))?;
    let custodian_public = x25519_public(&custodian_private)?;
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(crypto_err("ed25519"))?;
    let signer_pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
    let signer_public = signer_public_key(&signer_pkcs8)?;
    Ok(NewKeys {
        custodian_private,
        custodian_public,
        signer_pkcs8,
        signer_public,
    })
}

/// The public key of an Ed25519 PKCS#8 signing key.
pub fn signer_public_key(pkcs8: &[u8]) -> Result<[u8; 32], BackupError> {
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8)
        .map_err(|e| BackupError::Key(format!("signing key is not Ed25519 PKCS#8: {e}")))?;
    kp.public_key()
        .as_ref()
        .try_into()
        .map_err(|_| BackupError::Key("ed25519 public key length".into()))
}

/// Told how far a long backup or restore has come: (stage, done, total).
/// The CLI prints it as a percentage; the API passes [`no_progress`].
pub type Progress<'a> = &'a mut dyn FnMut(&'static str, usize, usize);

/// A [`Progress`] that reports nothing.
pub fn no_progress(_: &'static str, _: usize, _: usize) {}

/// Writes a backup of `contents` for `custodian_public`, signed with `signer_pkcs8`.
pub fn write(
    contents: &Contents,
    custodian_public: &[u8; 32],
    signer_pkcs8: &[u8],
    created_at: u64,
) -> Result<Vec<u8>, BackupError> {
    write_with_progress(
        contents,
        custodian_public,
        signer_pkcs8,
        created_at,
        &mut no_progress,
    )
}

/// [`write`], reporting each record wrapped.
pub fn write_with_progress(
    contents: &Contents,
    custodian_public: &[u8; 32],
    signer_pkcs8: &[u8],
    created_at: u64,
    progress: Progress<'_>,
) -> Result<Vec<u8>, BackupError> {
    const STAGE: &str = "wrapping records";
    let total = contents.users.len() + contents.rings.len();
    progress(STAGE, 0, total);
    let signer = Ed25519KeyPair::from_pkcs8(signer_pkcs8)
        .map_err(|e| BackupError::Key(format!("signing key is not Ed25519 PKCS#8: {e}")))?;
    let backup_key = crypto::random_bytes(32).map_err(crypto_err("random"))?;

    // Every record wrapped with AES-KWP under the backup key.
    let mut entries = Vec::with_capacity(contents.users.len() + contents.rings.len());
    for u in &contents.users {
        let json = Zeroizing::new(
            serde_json::to_vec(u).map_err(|e| BackupError::Contents(e.to_string()))?,
        );
        entries.push(Entry {
            table: "users".into(),
            name: u.username.clone(),
            wrapped: b64(&kwp_wrap(&backup_key, &json)?),
        });
        progress(STAGE, entries.len(), total);
    }
    for (name, plain) in &contents.rings {
        entries.push(Entry {
            table: "keys".into(),
            name: name.clone(),
            wrapped: b64(&kwp_wrap(&backup_key, plain)?),
        });
        progress(STAGE, entries.len(), total);
    }
    let payload_plain = Zeroizing::new(
        serde_json::to_vec(&Payload { entries })
            .map_err(|e| BackupError::Contents(e.to_string()))?,
    );

    // The backup key, wrapped for the custodian.
    let rng = SystemRandom::new();
    let eph = EphemeralPrivateKey::generate(&X25519, &rng).map_err(crypto_err("x25519"))?;
    let eph_pub = eph.compute_public_key().map_err(crypto_err("x25519"))?;
    let eph_pub = eph_pub.as_ref().to_vec();
    let wrap_key = agreement::agree_ephemeral(
        eph,
        UnparsedPublicKey::new(&X25519, custodian_public),
        BackupError::Key("the custodian public key is not a valid X25519 key".into()),
        |shared| custodian_kek(shared, &eph_pub, custodian_public),
    )?;
    let wrapped_backup_key = kwp_wrap(&wrap_key, &backup_key)?;

    let nonce_bytes = crypto::random_bytes(12).map_err(crypto_err("random"))?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&nonce_bytes);
    let header = Header {
        format: 1,
        created_at,
        generator: concat!("hsmgate ", env!("CARGO_PKG_VERSION")).into(),
        key_wrap: "X25519-HKDF-SHA256/AES-256-KWP; records AES-256-KWP".into(),
        payload_cipher: "AES-256-GCM".into(),
        custodian_public_key: b64(custodian_public),
        ephemeral_public_key: b64(&eph_pub),
        wrapped_backup_key: b64(&wrapped_backup_key),
        signer_public_key: b64(signer.public_key().as_ref()),
        users: contents.users.len(),
        keys: contents.rings.len(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| BackupError::Header(e.to_string()))?;
    let mut out = Vec::with_capacity(payload_plain.len() + header.len() + 128);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    let aad = out.clone();
    let pkey = payload_key(&backup_key)?;
    let sealed = crypto::aes_gcm_seal_with_nonce(&pkey, nonce, &payload_plain, &aad)
        .map_err(crypto_err("payload"))?;
    out.extend_from_slice(&(sealed.len() as u64).to_be_bytes());
    out.extend_from_slice(&sealed);
    let sig = signer.sign(&out);
    out.extend_from_slice(sig.as_ref());
    Ok(out)
}

/// What [`open`] learns from the header before any secret is needed.
pub struct Summary {
    pub created_at: u64,
    pub users: usize,
    pub keys: usize,
}

/// Checks and decrypts a backup: structure, the signature against the
/// pinned signers, the custodian, every wrapped record. Nothing is returned
/// unless all of it holds.
pub fn open(
    bytes: &[u8],
    custodian_private: &[u8],
    trusted_signers: &[[u8; 32]],
) -> Result<(Summary, Contents), BackupError> {
    open_with_progress(bytes, custodian_private, trusted_signers, &mut no_progress)
}

/// [`open`], reporting each record unwrapped.
pub fn open_with_progress(
    bytes: &[u8],
    custodian_private: &[u8],
    trusted_signers: &[[u8; 32]],
    progress: Progress<'_>,
) -> Result<(Summary, Contents), BackupError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::Magic);
    }
    let mut at = MAGIC.len();
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, BackupError> {
        let end = at.checked_add(n).ok_or(BackupError::Truncated)?;
        if end > bytes.len() {
            return Err(BackupError::Truncated);
        }
        let r = *at..end;
        *at = end;
        Ok(r)
    };
    let hl = u32::from_be_bytes(
        bytes[take(&mut at, 4)?]
            .try_into()
            .map_err(|_| BackupError::Truncated)?,
    ) as usize;
    if hl > MAX_HEADER {
        return Err(BackupError::Header(format!(
            "header of {hl} bytes is over the {MAX_HEADER}-byte limit"
        )));
    }
    let header_range = take(&mut at, hl)?;
    let aad_end = at;
    let pl = u64::from_be_bytes(
        bytes[take(&mut at, 8)?]
            .try_into()
            .map_err(|_| BackupError::Truncated)?,
    );
    let pl = usize::try_from(pl).map_err(|_| BackupError::Truncated)?;
    let payload_range = take(&mut at, pl)?;
    let signed_end = at;
    let sig_range = take(&mut at, SIG_LEN)?;
    if at != bytes.len() {
        return Err(BackupError::Truncated);
    }

    // Authenticity first: nothing from an unsigned file is trusted further.
    if trusted_signers.is_empty() {
        return Err(BackupError::NoTrustedSigners);
    }
    let signed = &bytes[..signed_end];
    let sig = &bytes[sig_range];
    let signer_ok = trusted_signers.iter().any(|k| {
        signature::UnparsedPublicKey::new(&signature::ED25519, k)
            .verify(signed, sig)
            .is_ok()
    });
    if !signer_ok {
        return Err(BackupError::BadSignature);
    }

    let header: Header = serde_json::from_slice(&bytes[header_range])
        .map_err(|e| BackupError::Header(e.to_string()))?;
    if header.format != 1 {
        return Err(BackupError::Magic);
    }
    let custodian_public = x25519_public(custodian_private)?;
    if unb64("custodian_public_key", &header.custodian_public_key)? != custodian_public {
        return Err(BackupError::WrongCustodian);
    }
    let eph_pub = unb64("ephemeral_public_key", &header.ephemeral_public_key)?;
    let custodian = PrivateKey::from_private_key(&X25519, custodian_private)
        .map_err(|_| BackupError::Key("a custodian key is 32 raw X25519 bytes".into()))?;
    let wrap_key = agreement::agree(
        &custodian,
        UnparsedPublicKey::new(&X25519, &eph_pub),
        BackupError::Header("the ephemeral public key is not a valid X25519 key".into()),
        |shared| custodian_kek(shared, &eph_pub, &custodian_public),
    )?;
    let backup_key = kwp_unwrap(
        &wrap_key,
        &unb64("wrapped_backup_key", &header.wrapped_backup_key)?,
    )?;
    if backup_key.len() != 32 {
        return Err(BackupError::Unwrap);
    }
    let pkey = payload_key(&backup_key)?;
    // The payload is nonce || ciphertext || tag.
    let plain = crypto::aes_gcm_open(&pkey, &bytes[payload_range], &bytes[..aad_end])
        .map_err(|_| BackupError::Contents("the payload does not decrypt".into()))?;
    let payload: Payload =
        serde_json::from_slice(&plain).map_err(|e| BackupError::Contents(e.to_string()))?;
    let mut users = Vec::new();
    let mut rings = Vec::new();
    let total = payload.entries.len();
    progress("unwrapping records", 0, total);
    for (i, e) in payload.entries.into_iter().enumerate() {
        progress("unwrapping records", i, total);
        let plain = kwp_unwrap(&backup_key, &unb64("wrapped", &e.wrapped)?)?;
        match e.table.as_str() {
            "users" => {
                let u: UserRecord = serde_json::from_slice(&plain)
                    .map_err(|err| BackupError::Contents(format!("user {:?}: {err}", e.name)))?;
                if u.username != e.name {
                    return Err(BackupError::Contents(format!(
                        "user record {:?} is misfiled",
                        e.name
                    )));
                }
                users.push(u);
            }
            "keys" => rings.push((e.name, plain)),
            other => return Err(BackupError::Contents(format!("unknown table {other:?}"))),
        }
    }
    progress("unwrapping records", total, total);
    if users.len() != header.users || rings.len() != header.keys {
        return Err(BackupError::Contents(
            "record counts differ from the header".into(),
        ));
    }
    Ok((
        Summary {
            created_at: header.created_at,
            users: users.len(),
            keys: rings.len(),
        },
        Contents { users, rings },
    ))
}

/// Reads a secret file (the backup signing key, a custodian key),
/// refusing one that group or others can read.
pub fn read_secret_file(path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, EngineError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| EngineError::InvalidRequest(format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(EngineError::InvalidRequest(format!(
            "{} is readable by group or others; refusing it (chmod 600)",
            path.display()
        )));
    }
    Ok(Zeroizing::new(std::fs::read(path).map_err(|e| {
        EngineError::InvalidRequest(format!("{}: {e}", path.display()))
    })?))
}

fn refused(e: BackupError) -> EngineError {
    EngineError::InvalidRequest(format!("backup refused: {e}"))
}

impl Engine {
    /// The crypto officer takes a backup: one consistent snapshot of every
    /// user and key ring, encrypted to the configured custodian and signed
    /// with the configured signing key. Blocking.
    pub fn backup(&self, by: &Principal) -> Result<(Summary, Vec<u8>), EngineError> {
        self.backup_with_progress(by, &mut no_progress)
    }

    /// [`Engine::backup`], reporting progress (the CLI's percentage).
    pub fn backup_with_progress(
        &self,
        by: &Principal,
        progress: Progress<'_>,
    ) -> Result<(Summary, Vec<u8>), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        let cfg = &self.config.backup;
        let custodian = cfg.custodian_public_key.ok_or_else(|| {
            EngineError::InvalidRequest(
                "backups need [backup] custodian_public_key and signing_key_file (docs/BACKUP.md)"
                    .into(),
            )
        })?;
        let key_file = cfg.signing_key_file.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(
                "backups need [backup] signing_key_file (docs/BACKUP.md)".into(),
            )
        })?;
        let pkcs8 = read_secret_file(key_file)?;
        let (users, rings) = self.with_active(|a| Ok(a.store.snapshot()?))?;
        let contents = Contents { users, rings };
        let created_at = super::now_unix();
        let bytes = write_with_progress(&contents, &custodian, &pkcs8, created_at, progress)
            .map_err(|e| EngineError::Internal(format!("writing a backup: {e}")))?;
        tracing::warn!(
            user = %by.username,
            users = contents.users.len(),
            keys = contents.rings.len(),
            "backup written"
        );
        Ok((
            Summary {
                created_at,
                users: contents.users.len(),
                keys: contents.rings.len(),
            },
            bytes,
        ))
    }

    /// One scheduled backup into `[backup] schedule_dir` (file
    /// `hsmgate-<unix seconds>.hsmbak`, 0600, written atomically), then
    /// the oldest beyond `schedule_keep` are removed. Skipped (`Ok(None)`)
    /// unless the engine is active. Blocking.
    pub fn scheduled_backup(&self) -> Result<Option<std::path::PathBuf>, EngineError> {
        let cfg = &self.config.backup;
        let Some(dir) = cfg.schedule_dir.as_ref() else {
            return Ok(None);
        };
        if self.state() != EngineState::Active {
            return Ok(None);
        }
        let scheduler = Principal {
            username: "backup-scheduler".into(),
            role: Role::CryptoOfficer,
            issued_at: std::time::SystemTime::now(),
            expires_at: std::time::SystemTime::now(),
            app_policies: Vec::new(),
        };
        let (summary, bytes) = self.backup(&scheduler)?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| EngineError::Internal(format!("{}: {e}", dir.display())))?;
        }
        let path = dir.join(format!("hsmgate-{:012}.hsmbak", summary.created_at));
        super::store::write_atomic(&path, &bytes, 0o600)?;
        let mut ours: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::Internal(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("hsmgate-") && n.ends_with(".hsmbak"))
            })
            .collect();
        ours.sort();
        let excess = ours.len().saturating_sub(cfg.schedule_keep);
        for old in &ours[..excess] {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!(path = %old.display(), error = %e, "could not remove an old scheduled backup");
            }
        }
        Ok(Some(path))
    }

    /// Restores a backup into a fresh or zeroized engine: needs the current
    /// init token, the custodian's private key, and a file signed by a
    /// pinned signer. Everything is checked (signature, custodian, every
    /// record, every key ring parses, one crypto officer) before anything
    /// is written; then the store is created with all records in one
    /// transaction. The seal is new (this engine's config); users keep
    /// their passwords and lock state, failure counts start at zero.
    pub fn restore(
        &self,
        bytes: &[u8],
        custodian_private: &[u8],
        init_token: &SecretString,
        passphrase: Option<&SecretString>,
    ) -> Result<(Summary, InitOutcome), EngineError> {
        self.restore_with_progress(
            bytes,
            custodian_private,
            init_token,
            passphrase,
            &mut no_progress,
        )
    }

    /// [`Engine::restore`], reporting progress (the CLI's percentage).
    pub fn restore_with_progress(
        &self,
        bytes: &[u8],
        custodian_private: &[u8],
        init_token: &SecretString,
        passphrase: Option<&SecretString>,
        progress: Progress<'_>,
    ) -> Result<(Summary, InitOutcome), EngineError> {
        let mut inner = super::write(&self.inner);
        if matches!(inner.state, EngineState::Active | EngineState::Sealed) {
            return Err(EngineError::InvalidRequest(
                "restore needs a fresh or zeroized engine; this one is initialized".into(),
            ));
        }
        inner.check_init_token(init_token)?;
        let (summary, mut contents) = open_with_progress(
            bytes,
            custodian_private,
            &self.config.backup.trusted_signers,
            &mut *progress,
        )
        .map_err(refused)?;
        let rings = contents.rings.len();
        for (i, (name, plain)) in contents.rings.iter().enumerate() {
            progress("checking key rings", i, rings);
            KeyRing::from_record(name, plain)
                .map_err(|e| refused(BackupError::Contents(format!("key ring {name:?}: {e}"))))?;
        }
        progress("checking key rings", rings, rings);
        let officers = contents
            .users
            .iter()
            .filter(|u| u.role == Role::CryptoOfficer)
            .count();
        if officers != 1
            || !contents
                .users
                .iter()
                .any(|u| u.username == super::ADMIN_USERNAME && u.role == Role::CryptoOfficer)
        {
            return Err(refused(BackupError::Contents(
                "a backup holds exactly one crypto officer, admin".into(),
            )));
        }
        for u in &mut contents.users {
            u.consecutive_failures = 0;
        }
        let (params, kek, shares) = self.new_seal(None, passphrase)?;
        // One transaction: nothing to count inside it.
        progress("writing the store", 0, 1);
        self.take_ownership(&mut inner, params, kek, &contents.users, &contents.rings)?;
        progress("writing the store", 1, 1);
        tracing::warn!(
            users = summary.users,
            keys = summary.keys,
            created_at = summary.created_at,
            "backup restored"
        );
        let outcome = InitOutcome {
            seal_type: self.seal_type(&inner),
            shares,
        };
        drop(inner);
        // A cluster member seeds a new cluster from the restored store.
        self.notify_activated(true);
        Ok((summary, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Role;

    fn contents() -> Contents {
        Contents {
            users: vec![UserRecord {
                username: "admin".into(),
                role: Role::CryptoOfficer,
                password_hash: "$argon2id$x".into(),
                consecutive_failures: 0,
                locked: false,
            }],
            rings: vec![("k".into(), Zeroizing::new(b"ring bytes".to_vec()))],
        }
    }

    #[test]
    fn round_trip_and_every_kind_of_bad_file_is_refused() {
        let keys = keygen().unwrap();
        let file = write(&contents(), &keys.custodian_public, &keys.signer_pkcs8, 7).unwrap();
        let trusted = [keys.signer_public];
        let (summary, got) = open(&file, &keys.custodian_private, &trusted).unwrap();
        assert_eq!((summary.users, summary.keys, summary.created_at), (1, 1, 7));
        assert_eq!(got.rings[0].1.as_slice(), b"ring bytes");
        assert_eq!(got.users[0].username, "admin");

        // Any single flipped byte, anywhere: refused.
        for i in (0..file.len()).step_by(7) {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&bad, &keys.custodian_private, &trusted).is_err(),
                "byte {i}"
            );
        }
        // Truncated or extended.
        for cut in [0, 5, 12, file.len() / 2, file.len() - 1] {
            assert!(open(&file[..cut], &keys.custodian_private, &trusted).is_err());
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            open(&longer, &keys.custodian_private, &trusted),
            Err(BackupError::Truncated)
        ));
        // Wrong custodian.
        let other = keygen().unwrap();
        assert!(matches!(
            open(&file, &other.custodian_private, &trusted),
            Err(BackupError::WrongCustodian)
        ));
        // Not pinned: a well-formed file for the right custodian signed by
        // someone else (who knows only the custodian's public key).
        let forged = write(&contents(), &keys.custodian_public, &other.signer_pkcs8, 7).unwrap();
        assert!(matches!(
            open(&forged, &keys.custodian_private, &trusted),
            Err(BackupError::BadSignature)
        ));
        assert!(matches!(
            open(&file, &keys.custodian_private, &[]),
            Err(BackupError::NoTrustedSigners)
        ));
    }
}
