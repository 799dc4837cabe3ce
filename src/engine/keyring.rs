//! Named key rings: versions of one key, their policy knobs, and the Vault
//! ciphertext/signature format (`vault:v{N}:base64`).
use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{KeyMaterial, KeyType};
use super::secret::SecretBytes;
use super::EngineError;

/// One version of a key. No `Debug`: it carries key material.
pub struct KeyVersion {
    /// Unix seconds.
    pub created: u64,
    pub material: KeyMaterial,
}

/// A key ring as the engine holds it. Cloning is cheap (versions are shared)
/// so updates are copy-on-write: build the new ring, persist it, publish it.
#[derive(Clone)]
pub struct KeyRing {
    pub name: String,
    pub key_type: KeyType,
    pub versions: BTreeMap<u32, Arc<KeyVersion>>,
    pub latest_version: u32,
    /// Ciphertexts and signatures older than this are refused (Vault's knob
    /// for retiring compromised versions).
    pub min_decryption_version: u32,
    /// 0 means "latest".
    pub min_encryption_version: u32,
    pub deletion_allowed: bool,
    pub exportable: bool,
    pub allow_plaintext_backup: bool,
    /// Every operation derives a per-`context` key (HKDF-SHA256).
    pub derived: bool,
    /// Deterministic encryption per (plaintext, context); needs `derived`.
    pub convergent_encryption: bool,
    /// Versions below this were trimmed away for good.
    pub min_available_version: u32,
    /// The material came from outside (Vault's `keys/:name/import`, or an
    /// unwrap): shown as Vault's `imported_key`.
    pub imported_key: bool,
    /// Vault's `allow_rotation` for imported keys: whether the engine may
    /// add a generated version to a ring whose material came from outside.
    pub allow_rotation: bool,
    /// A key-encryption key that may wrap other keys out (PKCS#11
    /// `CKA_WRAP`). Set at creation only; such a key does no data
    /// encryption (key separation, see docs/TRANSIT.md).
    pub allow_wrap: bool,
    /// A key-encryption key that may unwrap keys in (PKCS#11 `CKA_UNWRAP`).
    pub allow_unwrap: bool,
    /// Vault's `auto_rotate_period`, in seconds: the server rotates the key
    /// once its latest version is this old (0: never). Either 0 or at least
    /// [`MIN_AUTO_ROTATE_PERIOD`]; see [`KeyRing::due_for_rotation`].
    pub auto_rotate_period: u64,
}

/// Vault's floor for `auto_rotate_period` (one hour): a shorter non-zero
/// period is refused wherever a period is set.
pub const MIN_AUTO_ROTATE_PERIOD: u64 = 3600;

/// Vault's rule for `auto_rotate_period`: 0 (off) or at least an hour.
pub fn validate_auto_rotate_period(seconds: u64) -> Result<(), EngineError> {
    if seconds != 0 && seconds < MIN_AUTO_ROTATE_PERIOD {
        return Err(EngineError::InvalidRequest(format!(
            "auto rotate period must be 0 to disable or at least an hour \
             ({MIN_AUTO_ROTATE_PERIOD} seconds); got {seconds} seconds"
        )));
    }
    Ok(())
}

/// The material an operation uses: the version's own, or one derived from it
/// for the request's context.
pub enum Material<'a> {
    Stored(&'a KeyMaterial),
    Derived(KeyMaterial),
}

impl std::ops::Deref for Material<'_> {
    type Target = KeyMaterial;
    fn deref(&self) -> &KeyMaterial {
        match self {
            Material::Stored(m) => m,
            Material::Derived(m) => m,
        }
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("name", &self.name)
            .field("key_type", &self.key_type)
            .field("latest_version", &self.latest_version)
            .finish_non_exhaustive()
    }
}

/// Parameters for creating a key (a subset of Vault's `keys/:name` body).
#[derive(Debug, Clone)]
pub struct KeyOptions {
    pub key_type: KeyType,
    pub exportable: bool,
    pub allow_plaintext_backup: bool,
    pub derived: bool,
    pub convergent_encryption: bool,
    /// See [`KeyRing::allow_wrap`].
    pub allow_wrap: bool,
    /// See [`KeyRing::allow_unwrap`].
    pub allow_unwrap: bool,
    /// See [`KeyRing::allow_rotation`]; only meaningful for imported keys.
    pub allow_rotation: bool,
    /// See [`KeyRing::auto_rotate_period`] (seconds, 0: off).
    pub auto_rotate_period: u64,
}

impl KeyOptions {
    pub fn new(key_type: KeyType) -> KeyOptions {
        KeyOptions {
            key_type,
            exportable: false,
            allow_plaintext_backup: false,
            derived: false,
            convergent_encryption: false,
            allow_wrap: false,
            allow_unwrap: false,
            allow_rotation: false,
            auto_rotate_period: 0,
        }
    }

    /// Vault's rules for `derived` and `convergent_encryption`.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.convergent_encryption && !self.derived {
            return Err(EngineError::InvalidRequest(
                "convergent encryption requires derivation to be enabled".into(),
            ));
        }
        if self.derived && !self.key_type.supports_derivation() {
            return Err(EngineError::InvalidRequest(format!(
                "key derivation is not supported for key type {}",
                self.key_type
            )));
        }
        if self.convergent_encryption && !self.key_type.is_aead() {
            return Err(EngineError::InvalidRequest(format!(
                "convergent encryption is not supported for key type {}",
                self.key_type
            )));
        }
        if (self.allow_wrap || self.allow_unwrap)
            && (self.key_type != KeyType::Aes256Gcm96 || self.derived)
        {
            return Err(EngineError::InvalidRequest(
                "allow_wrap and allow_unwrap need a non-derived aes256-gcm96 key \
                 (AES-256 key wrap)"
                    .into(),
            ));
        }
        validate_auto_rotate_period(self.auto_rotate_period)
    }
}

/// Changes accepted by `keys/:name/config`; `None` leaves a knob unchanged.
#[derive(Debug, Clone, Default)]
pub struct KeyConfigChange {
    pub min_decryption_version: Option<u32>,
    pub min_encryption_version: Option<u32>,
    pub deletion_allowed: Option<bool>,
    pub exportable: Option<bool>,
    pub allow_plaintext_backup: Option<bool>,
    /// Seconds; `Some(0)` turns automatic rotation off.
    pub auto_rotate_period: Option<u64>,
}

/// Key names end up in URLs, logs and record identities: keep them boring.
pub fn validate_name(name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(
            "key names are 1-128 characters of A-Z a-z 0-9 - _ . and may not start with '.'".into(),
        ))
    }
}

impl KeyRing {
    pub fn new(name: &str, opts: &KeyOptions, now: u64) -> Result<KeyRing, EngineError> {
        opts.validate()?;
        let material = KeyMaterial::generate(opts.key_type)?;
        Self::with_material(name, opts, material, false, now)
    }

    /// `[engine] non_exportable_is_final`: a key created without
    /// `exportable` or `allow_plaintext_backup` never gets either (each is
    /// a way for the key to leave in plaintext). Checked before
    /// [`KeyRing::reconfigured`] when the switch is on.
    pub fn refuse_opening_up(&self, change: &KeyConfigChange) -> Result<(), EngineError> {
        for (asked, has, what) in [
            (change.exportable, self.exportable, "exportable"),
            (
                change.allow_plaintext_backup,
                self.allow_plaintext_backup,
                "allow_plaintext_backup",
            ),
        ] {
            if asked == Some(true) && !has {
                return Err(EngineError::InvalidRequest(format!(
                    "key {:?} was created without {what}, and with \
                     engine.non_exportable_is_final on it can never be given it",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// A ring whose first version is `material` (generated, or imported:
    /// `imported` marks Vault's `imported_key`).
    pub fn with_material(
        name: &str,
        opts: &KeyOptions,
        material: KeyMaterial,
        imported: bool,
        now: u64,
    ) -> Result<KeyRing, EngineError> {
        opts.validate()?;
        if material.key_type != opts.key_type {
            return Err(EngineError::KeyTypeMismatch(name.into()));
        }
        if imported {
            refuse_auto_rotation_without_rotation(opts.allow_rotation, opts.auto_rotate_period)?;
        }
        let mut versions = BTreeMap::new();
        versions.insert(
            1,
            Arc::new(KeyVersion {
                created: now,
                material,
            }),
        );
        Ok(KeyRing {
            name: name.to_string(),
            key_type: opts.key_type,
            versions,
            latest_version: 1,
            min_decryption_version: 1,
            min_encryption_version: 0,
            deletion_allowed: false,
            exportable: opts.exportable,
            allow_plaintext_backup: opts.allow_plaintext_backup,
            derived: opts.derived,
            convergent_encryption: opts.convergent_encryption,
            min_available_version: 0,
            imported_key: imported,
            allow_rotation: !imported || opts.allow_rotation,
            allow_wrap: opts.allow_wrap,
            allow_unwrap: opts.allow_unwrap,
            auto_rotate_period: opts.auto_rotate_period,
        })
    }

    /// Whether automatic rotation is due at `now` (Unix seconds): it is on
    /// and the latest version is at least `auto_rotate_period` old (Vault's
    /// `rotateIfRequired`). A clock set back makes nothing due. Whether the
    /// key may be rotated at all is [`KeyRing::rotated`]'s to decide.
    pub fn due_for_rotation(&self, now: u64) -> bool {
        if self.auto_rotate_period == 0 {
            return false;
        }
        self.versions
            .get(&self.latest_version)
            .is_some_and(|v| now >= v.created.saturating_add(self.auto_rotate_period))
    }

    /// An imported key gets generated versions only with `allow_rotation`.
    pub fn may_rotate(&self) -> bool {
        !self.imported_key || self.allow_rotation
    }

    /// Vault's `import_version` with imported `material` (a full key, or a
    /// public key only), following Vault's rules (`ImportPublicOrPrivate`,
    /// `KeyVersionCanBeUpdated`, `ImportPrivateKeyForVersion`):
    /// - `version` given: that version must hold only a public key, and
    ///   `material` must be the matching private key, which completes it
    ///   (same version number, creation time and HMAC key); anything else is
    ///   refused;
    /// - no `version`, a private key, and the latest version public-only
    ///   with the matching public key: the latest version is completed;
    /// - otherwise `material` becomes a new latest version.
    ///
    /// Nothing else ever gives a public-key-only version a private key.
    pub fn with_import(
        &self,
        material: KeyMaterial,
        version: Option<u32>,
        now: u64,
    ) -> Result<KeyRing, EngineError> {
        if material.key_type != self.key_type {
            return Err(EngineError::KeyTypeMismatch(self.name.clone()));
        }
        if material.is_public_only() && self.derived {
            return Err(EngineError::InvalidRequest(format!(
                "key {:?} is derived: a derived {} key is an HKDF key, not a key pair, so \
                 a public key alone cannot be imported into it",
                self.name, self.key_type
            )));
        }
        let complete = |v: u32, kv: &KeyVersion, material: &KeyMaterial| {
            let done = kv.material.with_private_key(material)?;
            let mut next = self.clone();
            next.versions.insert(
                v,
                Arc::new(KeyVersion {
                    created: kv.created,
                    material: done,
                }),
            );
            Ok::<KeyRing, EngineError>(next)
        };
        if let Some(v) = version {
            let (_, kv) = self.version(v)?;
            if !self.key_type.supports_signing() {
                return Err(EngineError::InvalidRequest(format!(
                    "key type {} has no public keys: import_version with version only \
                     completes a public-key-only version; omit version to add a new one",
                    self.key_type
                )));
            }
            if !kv.material.is_public_only() {
                return Err(EngineError::InvalidRequest(format!(
                    "version {v} already holds its private key: it cannot be updated"
                )));
            }
            if material.is_public_only() {
                return Err(EngineError::InvalidRequest(format!(
                    "version {v} already holds a public key: only its private key (ciphertext) \
                     can be imported into it"
                )));
            }
            return complete(v, kv, &material);
        }
        if !material.is_public_only() {
            if let Some(latest) = self.versions.get(&self.latest_version) {
                if latest.material.is_public_only() {
                    // Vault: a private key that does not match the latest
                    // public-only version becomes a new version instead.
                    if let Ok(next) = complete(self.latest_version, latest, &material) {
                        return Ok(next);
                    }
                }
            }
        }
        let mut next = self.clone();
        next.latest_version += 1;
        next.versions.insert(
            next.latest_version,
            Arc::new(KeyVersion {
                created: now,
                material,
            }),
        );
        Ok(next)
    }

    /// Vault's `keys/:name/trim`: drops every version below
    /// `min_available`, for good. Allowed only up to the lesser of
    /// min_decryption_version and min_encryption_version, and not while
    /// either is 0 ("latest"/unset).
    pub fn trimmed(&self, min_available: u32) -> Result<KeyRing, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if min_available == 0 {
            return bad("min_available_version must be positive".into());
        }
        if self.min_encryption_version == 0 || self.min_decryption_version == 0 {
            return bad(
                "trim is not allowed while min_encryption_version or min_decryption_version is 0;                  set both in keys/:name/config first"
                    .into(),
            );
        }
        if min_available > self.min_encryption_version {
            return bad("cannot set min_available_version above min_encryption_version".into());
        }
        if min_available > self.min_decryption_version {
            return bad("cannot set min_available_version above min_decryption_version".into());
        }
        if min_available < self.min_available_version {
            return bad(
                "min_available_version cannot go below its current value: trimmed versions are gone"
                    .into(),
            );
        }
        let mut next = self.clone();
        next.versions.retain(|v, _| *v >= min_available);
        next.min_available_version = min_available;
        Ok(next)
    }

    /// The material for a request: derived from `context` for derived keys
    /// (where a context is required), the version's own otherwise.
    pub fn material<'a>(
        &self,
        kv: &'a KeyVersion,
        context: Option<&[u8]>,
    ) -> Result<Material<'a>, EngineError> {
        if !self.derived {
            return Ok(Material::Stored(&kv.material));
        }
        Ok(Material::Derived(
            kv.material.derive(context.unwrap_or_default())?,
        ))
    }

    pub fn rotated(&self, now: u64) -> Result<KeyRing, EngineError> {
        if !self.may_rotate() {
            return Err(EngineError::InvalidRequest(
                "imported keys are not rotated unless imported with allow_rotation; \
                 use keys/:name/import_version to add a version"
                    .into(),
            ));
        }
        let mut next = self.clone();
        next.latest_version += 1;
        next.versions.insert(
            next.latest_version,
            Arc::new(KeyVersion {
                created: now,
                material: KeyMaterial::generate(self.key_type)?,
            }),
        );
        Ok(next)
    }

    pub fn reconfigured(&self, change: &KeyConfigChange) -> Result<KeyRing, EngineError> {
        let mut next = self.clone();
        if let Some(v) = change.min_decryption_version {
            if v != 0 && v < self.min_available_version {
                return Err(EngineError::InvalidRequest(format!(
                    "min_decryption_version cannot be below min_available_version ({}): those versions were trimmed",
                    self.min_available_version
                )));
            }
            if v == 0 || v > self.latest_version {
                return Err(EngineError::InvalidRequest(format!(
                    "min_decryption_version must be between 1 and the latest version ({})",
                    self.latest_version
                )));
            }
            next.min_decryption_version = v;
        }
        if let Some(v) = change.min_encryption_version {
            if v != 0 && v < self.min_available_version {
                return Err(EngineError::InvalidRequest(format!(
                    "min_encryption_version cannot be below min_available_version ({})",
                    self.min_available_version
                )));
            }
            if v > self.latest_version {
                return Err(EngineError::InvalidRequest(format!(
                    "min_encryption_version must be 0 or at most the latest version ({})",
                    self.latest_version
                )));
            }
            next.min_encryption_version = v;
        }
        if next.min_encryption_version != 0
            && next.min_encryption_version < next.min_decryption_version
        {
            return Err(EngineError::InvalidRequest(
                "min_encryption_version must be 0 or at least min_decryption_version".into(),
            ));
        }
        if let Some(v) = change.deletion_allowed {
            next.deletion_allowed = v;
        }
        // As in Vault, these two only ever open up: a key that has been
        // exportable may already be out, so "un-exporting" it would lie.
        // (Whether they may open up at all: [`KeyRing::refuse_opening_up`].)
        if let Some(v) = change.exportable {
            if !v && self.exportable {
                return Err(EngineError::InvalidRequest(
                    "exportable cannot be disabled once enabled".into(),
                ));
            }
            next.exportable = v;
        }
        if let Some(v) = change.allow_plaintext_backup {
            if !v && self.allow_plaintext_backup {
                return Err(EngineError::InvalidRequest(
                    "allow_plaintext_backup cannot be disabled once enabled".into(),
                ));
            }
            next.allow_plaintext_backup = v;
        }
        if let Some(v) = change.auto_rotate_period {
            validate_auto_rotate_period(v)?;
            if self.imported_key {
                refuse_auto_rotation_without_rotation(self.allow_rotation, v)?;
            }
            next.auto_rotate_period = v;
        }
        Ok(next)
    }

    /// Key separation: a key-encryption key (`allow_wrap`/`allow_unwrap`)
    /// wraps keys and encrypts no data, so no data path can be turned into
    /// a way to wrap or unwrap keys (the classic PKCS#11 wrap/decrypt attack).
    pub fn refuse_key_encryption_key(&self) -> Result<(), EngineError> {
        if self.allow_wrap || self.allow_unwrap {
            return Err(EngineError::InvalidRequest(format!(
                "key {:?} is a key-encryption key (allow_wrap/allow_unwrap): it wraps and \
                 unwraps keys and does no data encryption",
                self.name
            )));
        }
        Ok(())
    }

    /// Refuses `op` on a key type that does not support it, naming both.
    pub fn ensure(&self, supported: bool, op: &'static str) -> Result<(), EngineError> {
        if supported {
            Ok(())
        } else {
            Err(super::crypto::CryptoError::OperationNotSupported {
                op,
                key_type: self.key_type,
            }
            .into())
        }
    }

    /// The version new ciphertexts and signatures use.
    pub fn encryption_version(
        &self,
        requested: Option<u32>,
    ) -> Result<(u32, &KeyVersion), EngineError> {
        let v = requested.filter(|v| *v != 0).unwrap_or(self.latest_version);
        if v > self.latest_version {
            return Err(EngineError::InvalidRequest(format!(
                "requested version {v} is newer than the latest version {}",
                self.latest_version
            )));
        }
        if self.min_encryption_version != 0 && v < self.min_encryption_version {
            return Err(EngineError::InvalidRequest(format!(
                "requested version {v} is older than min_encryption_version {}",
                self.min_encryption_version
            )));
        }
        self.version(v)
    }

    /// The version that may open or verify an existing ciphertext/signature.
    pub fn decryption_version(&self, v: u32) -> Result<&KeyVersion, EngineError> {
        if v < self.min_decryption_version {
            return Err(EngineError::InvalidRequest(format!(
                "ciphertext or signature version {v} is disallowed by policy (min_decryption_version {})",
                self.min_decryption_version
            )));
        }
        if v > self.latest_version {
            return Err(EngineError::InvalidRequest(format!(
                "invalid version {v}: the key's latest version is {}",
                self.latest_version
            )));
        }
        self.version(v).map(|(_, kv)| kv)
    }

    fn version(&self, v: u32) -> Result<(u32, &KeyVersion), EngineError> {
        self.versions
            .get(&v)
            .map(|kv| (v, kv.as_ref()))
            .ok_or_else(|| {
                if v < self.min_available_version {
                    EngineError::InvalidRequest(format!(
                        "key version {v} has been trimmed (min_available_version {})",
                        self.min_available_version
                    ))
                } else {
                    EngineError::InvalidRequest(format!("key version {v} does not exist"))
                }
            })
    }

    /// Serializes the ring for sealing. The buffer holds key material in the
    /// clear and is wiped on drop.
    pub fn to_record(&self) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let record = KeyRingRecord {
            format: RECORD_FORMAT,
            derived: self.derived,
            convergent_encryption: self.convergent_encryption,
            min_available_version: self.min_available_version,
            imported_key: self.imported_key,
            allow_rotation: self.allow_rotation,
            allow_wrap: self.allow_wrap,
            allow_unwrap: self.allow_unwrap,
            auto_rotate_period: self.auto_rotate_period,
            name: self.name.clone(),
            key_type: self.key_type,
            latest_version: self.latest_version,
            min_decryption_version: self.min_decryption_version,
            min_encryption_version: self.min_encryption_version,
            deletion_allowed: self.deletion_allowed,
            exportable: self.exportable,
            allow_plaintext_backup: self.allow_plaintext_backup,
            versions: self
                .versions
                .iter()
                .map(|(v, kv)| {
                    let public_key = if kv.material.is_public_only() {
                        let spki = kv.material.public_key_spki()?.ok_or_else(|| {
                            EngineError::Internal("a public-only version without a key".into())
                        })?;
                        Some(STANDARD.encode(spki))
                    } else {
                        None
                    };
                    Ok(VersionRecord {
                        version: *v,
                        created: kv.created,
                        secret: Zeroizing::new(STANDARD.encode(kv.material.secret.expose_secret())),
                        hmac_key: Zeroizing::new(
                            STANDARD.encode(kv.material.hmac_key.expose_secret()),
                        ),
                        public_key,
                    })
                })
                .collect::<Result<_, EngineError>>()?,
        };
        serde_json::to_vec(&record)
            .map(Zeroizing::new)
            .map_err(|e| EngineError::Internal(format!("serializing key ring: {e}")))
    }

    /// A ring from a Transit backup's record (untrusted input): renamed to
    /// `rename` when given, held to the rules creation holds options to,
    /// and refused unless it carries `exportable` and
    /// `allow_plaintext_backup` (a backup only ever comes from such a key).
    pub fn from_backup(bytes: &[u8], rename: Option<&str>) -> Result<KeyRing, EngineError> {
        let bad = |why: String| EngineError::InvalidRequest(format!("invalid backup: {why}"));
        let mut record: KeyRingRecord =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("the key record: {e}")))?;
        if let Some(name) = rename {
            record.name = name.to_string();
        }
        validate_name(&record.name)?;
        let bytes = Zeroizing::new(
            serde_json::to_vec(&record).map_err(|e| bad(format!("the key record: {e}")))?,
        );
        let ring = KeyRing::from_record(&record.name, &bytes).map_err(|e| match e {
            EngineError::Internal(m) => bad(m),
            e => bad(e.to_string()),
        })?;
        KeyOptions {
            key_type: ring.key_type,
            exportable: ring.exportable,
            allow_plaintext_backup: ring.allow_plaintext_backup,
            derived: ring.derived,
            convergent_encryption: ring.convergent_encryption,
            allow_wrap: ring.allow_wrap,
            allow_unwrap: ring.allow_unwrap,
            allow_rotation: ring.allow_rotation,
            auto_rotate_period: ring.auto_rotate_period,
        }
        .validate()?;
        if ring.imported_key {
            refuse_auto_rotation_without_rotation(ring.allow_rotation, ring.auto_rotate_period)?;
        }
        if !ring.exportable || !ring.allow_plaintext_backup {
            return Err(bad(
                "the key is not marked exportable and allow_plaintext_backup".into(),
            ));
        }
        if ring.min_decryption_version > ring.latest_version
            || ring.min_encryption_version > ring.latest_version
        {
            return Err(bad(
                "its minimum versions are past its latest version".into()
            ));
        }
        Ok(ring)
    }

    pub fn from_record(name: &str, bytes: &[u8]) -> Result<KeyRing, EngineError> {
        let malformed = |detail: String| {
            EngineError::Internal(format!("stored key {name} is malformed: {detail}"))
        };
        let record: KeyRingRecord =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if record.name != name {
            return Err(malformed("record name does not match its key".into()));
        }
        if record.format > RECORD_FORMAT {
            return Err(malformed(format!(
                "record format {} is newer than this build understands ({RECORD_FORMAT})",
                record.format
            )));
        }
        let mut versions = BTreeMap::new();
        for v in &record.versions {
            let secret = Zeroizing::new(
                STANDARD
                    .decode(v.secret.as_bytes())
                    .map_err(|e| malformed(e.to_string()))?,
            );
            let hmac = Zeroizing::new(
                STANDARD
                    .decode(v.hmac_key.as_bytes())
                    .map_err(|e| malformed(e.to_string()))?,
            );
            // A version holds its key material or (format 5) only a
            // public key: never both, never neither.
            let material = match (&v.public_key, secret.is_empty()) {
                (None, false) => KeyMaterial::from_parts(
                    record.key_type,
                    SecretBytes::from_slice(&secret),
                    SecretBytes::from_slice(&hmac),
                )?,
                (Some(public), true) if record.format >= 5 && !record.derived => {
                    let spki = STANDARD
                        .decode(public.as_bytes())
                        .map_err(|e| malformed(e.to_string()))?;
                    KeyMaterial::public_only(
                        record.key_type,
                        &spki,
                        SecretBytes::from_slice(&hmac),
                    )?
                }
                (Some(_), _) => {
                    return Err(malformed(format!(
                        "version {} holds a public key beside a secret, in a derived key or \
                         in a format {} record",
                        v.version, record.format
                    )))
                }
                (None, true) => return Err(malformed(format!("version {} has no key", v.version))),
            };
            versions.insert(
                v.version,
                Arc::new(KeyVersion {
                    created: v.created,
                    material,
                }),
            );
        }
        if !versions.contains_key(&record.latest_version) {
            return Err(malformed("latest version missing".into()));
        }
        Ok(KeyRing {
            name: record.name,
            key_type: record.key_type,
            versions,
            latest_version: record.latest_version,
            min_decryption_version: record.min_decryption_version,
            min_encryption_version: record.min_encryption_version,
            deletion_allowed: record.deletion_allowed,
            exportable: record.exportable,
            allow_plaintext_backup: record.allow_plaintext_backup,
            derived: record.derived,
            convergent_encryption: record.convergent_encryption,
            min_available_version: record.min_available_version,
            imported_key: record.imported_key,
            allow_rotation: record.allow_rotation,
            allow_wrap: record.allow_wrap,
            allow_unwrap: record.allow_unwrap,
            auto_rotate_period: record.auto_rotate_period,
        })
    }
}

/// Vault's import rule: an imported key can be set to rotate automatically
/// only when it may be rotated at all (`allow_rotation`). Refused rather
/// than stored and skipped, so a caller never believes a key rotates when
/// it never will.
fn refuse_auto_rotation_without_rotation(
    allow_rotation: bool,
    auto_rotate_period: u64,
) -> Result<(), EngineError> {
    if auto_rotate_period != 0 && !allow_rotation {
        return Err(EngineError::InvalidRequest(
            "allow_rotation must be set to true if auto-rotation is enabled \
             (an imported key without it is never rotated)"
                .into(),
        ));
    }
    Ok(())
}

/// The key ring record layout. 1: the first layout (no `format` field, read
/// as 1). 2: adds `derived`, `convergent_encryption`, `min_available_version`
/// (absent in format 1 records, read as false/false/0). 3: adds
/// `imported_key`, `allow_rotation`, `allow_wrap`, `allow_unwrap` (absent
/// before: false, true, false, false). 4: adds `auto_rotate_period`
/// (absent before: 0, off). 5: a version may hold only a public key
/// (Vault's `public_key` import): `public_key` (base64 of the DER
/// SubjectPublicKeyInfo) instead of `secret`; absent before, where every
/// version has its `secret`.
const RECORD_FORMAT: u32 = 5;

fn yes() -> bool {
    true
}

fn record_format_1() -> u32 {
    1
}

#[derive(Serialize, Deserialize)]
struct KeyRingRecord {
    #[serde(default = "record_format_1")]
    format: u32,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    convergent_encryption: bool,
    #[serde(default)]
    min_available_version: u32,
    #[serde(default)]
    imported_key: bool,
    #[serde(default = "yes")]
    allow_rotation: bool,
    #[serde(default)]
    allow_wrap: bool,
    #[serde(default)]
    allow_unwrap: bool,
    #[serde(default)]
    auto_rotate_period: u64,
    name: String,
    key_type: KeyType,
    latest_version: u32,
    min_decryption_version: u32,
    min_encryption_version: u32,
    deletion_allowed: bool,
    exportable: bool,
    allow_plaintext_backup: bool,
    versions: Vec<VersionRecord>,
}

#[derive(Serialize, Deserialize)]
struct VersionRecord {
    version: u32,
    created: u64,
    /// Empty (and not written) for a public-key-only version.
    #[serde(default, skip_serializing_if = "is_empty")]
    secret: Zeroizing<String>,
    hmac_key: Zeroizing<String>,
    /// Format 5: base64 of the DER SubjectPublicKeyInfo of a version that
    /// holds only a public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
}

fn is_empty(s: &Zeroizing<String>) -> bool {
    s.is_empty()
}

/// `vault:v{N}:` + standard base64, Vault's envelope for ciphertexts,
/// signatures and HMACs. The base64 is SIMD (`base64-simd`: on a 1 KiB
/// ciphertext the scalar encoder cost as much as AES-GCM itself); the
/// output is the same padded standard alphabet (tested against `base64`).
pub fn format_vault(version: u32, bytes: &[u8]) -> String {
    // One allocation of the final size instead of encode + format!.
    let mut out = String::with_capacity(20 + bytes.len().div_ceil(3) * 4);
    out.push_str("vault:v");
    out.push_str(&version.to_string());
    out.push(':');
    base64_simd::STANDARD.encode_append(bytes, &mut out);
    out
}

/// Decodes padded standard base64 with SIMD (`base64-simd`): Transit's hot
/// inputs (plaintexts, `vault:` ciphertexts) are kilobytes, and the scalar
/// decoder cost 2% of the server's CPU under encrypt load. It accepts
/// exactly what `base64`'s `STANDARD` engine accepts — padding required,
/// the unused bits of the last symbol zero (so a ciphertext has one
/// spelling), no whitespace — which `simd_decode_accepts_exactly_what_base64_accepts`
/// checks differentially.
pub fn decode_b64(text: &[u8]) -> Option<Vec<u8>> {
    base64_simd::STANDARD.decode_to_vec(text).ok()
}

/// Vault's `marshaling_algorithm: jws`: URL-safe base64 without padding.
pub fn format_vault_jws(version: u32, bytes: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("vault:v{version}:{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn parse_vault_jws(s: &str, what: &str) -> Result<(u32, Vec<u8>), EngineError> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (version, body) = split_vault(s, what)?;
    let bytes = URL_SAFE_NO_PAD.decode(body.as_bytes()).map_err(|_| {
        EngineError::InvalidRequest(format!(
            "invalid {what}: the payload is not URL-safe base64 without padding (jws)"
        ))
    })?;
    Ok((version, bytes))
}

fn split_vault<'s>(s: &'s str, what: &str) -> Result<(u32, &'s str), EngineError> {
    let bad = |why: &str| EngineError::InvalidRequest(format!("invalid {what}: {why}"));
    let rest = s
        .strip_prefix("vault:v")
        .ok_or_else(|| bad("it must start with \"vault:v\""))?;
    let (version, body) = rest
        .split_once(':')
        .ok_or_else(|| bad("missing ':' after the version"))?;
    let version: u32 = version
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("the version is not a positive number"))?;
    Ok((version, body))
}

/// Splits a `vault:v{N}:base64` string into its version and bytes.
pub fn parse_vault(s: &str, what: &str) -> Result<(u32, Vec<u8>), EngineError> {
    let bad = |why: &str| EngineError::InvalidRequest(format!("invalid {what}: {why}"));
    let (version, body) = split_vault(s, what)?;
    let bytes =
        decode_b64(body.as_bytes()).ok_or_else(|| bad("the payload is not valid base64"))?;
    Ok((version, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decode_b64` (SIMD) against `base64`'s `STANDARD` (scalar): the same
    /// verdict and the same bytes on every string of up to four symbols
    /// over an alphabet of edge cases (symbols with and without spare bits
    /// set, padding, whitespace, URL-safe and foreign bytes), and on
    /// mutations of long valid encodings (past the SIMD block sizes).
    #[test]
    fn simd_decode_accepts_exactly_what_base64_accepts() {
        let same = |text: &[u8]| {
            let scalar = STANDARD.decode(text).ok();
            assert_eq!(
                decode_b64(text),
                scalar,
                "{:?}",
                String::from_utf8_lossy(text)
            );
            scalar.is_some()
        };
        let alphabet = b"AQgwBhx/+=-_ \n\x00\xff";
        let mut accepted = 0;
        let mut text = Vec::new();
        for len in 0..=4u32 {
            for mut n in 0..alphabet.len().pow(len) {
                text.clear();
                for _ in 0..len {
                    text.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                accepted += usize::from(same(&text));
            }
        }
        // Both sides accept some (the test is not vacuous) and refuse most.
        assert!(accepted > 100, "{accepted}");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let len = (next() % 700) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut text = STANDARD.encode(&bytes).into_bytes();
            assert!(same(&text));
            if round % 3 != 0 && !text.is_empty() {
                // Change one byte to anything, or flip a low bit (a spare
                // bit when it lands on the last symbol).
                let at = (next() as usize) % text.len();
                if round % 3 == 1 {
                    text[at] = next() as u8;
                } else {
                    let last = text.iter().rposition(|&b| b != b'=').unwrap_or(0);
                    text[last] ^= 1;
                }
                same(&text);
            }
        }
    }

    #[test]
    fn vault_format_round_trips_and_rejects_garbage() {
        let s = format_vault(3, b"abc");
        assert_eq!(s, "vault:v3:YWJj");
        // The SIMD encoder writes exactly what the scalar one does, at
        // every length around its block sizes and padding cases.
        for len in (0..200).chain([1023, 1024, 1025, 1052, 4096, 65_537]) {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            assert_eq!(
                format_vault(2, &bytes),
                format!("vault:v2:{}", STANDARD.encode(&bytes)),
                "length {len}"
            );
        }
        assert_eq!(parse_vault(&s, "ciphertext").unwrap(), (3, b"abc".to_vec()));
        for bad in [
            "",
            "vault:",
            "vault:v0:YWJj",
            "vault:vx:YWJj",
            "vault:v1",
            "vault:v1:!!",
            "v1:YWJj",
        ] {
            assert!(parse_vault(bad, "ciphertext").is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("orders-key_1.v2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn records_round_trip() {
        let opts = KeyOptions::new(KeyType::Ed25519);
        let ring = KeyRing::new("k", &opts, 1).unwrap().rotated(2).unwrap();
        let bytes = ring.to_record().unwrap();
        let back = KeyRing::from_record("k", &bytes).unwrap();
        assert_eq!(back.latest_version, 2);
        let sig = back.versions[&2]
            .material
            .sign(b"m", crate::engine::crypto::HashAlgorithm::Sha2_256)
            .unwrap();
        assert!(ring.versions[&2]
            .material
            .verify(b"m", &sig, crate::engine::crypto::HashAlgorithm::Sha2_256)
            .unwrap());
        assert!(KeyRing::from_record("other", &bytes).is_err());
    }

    #[test]
    fn format_1_records_stay_readable() {
        let ring = KeyRing::new("k", &KeyOptions::new(KeyType::Aes256Gcm96), 1).unwrap();
        let bytes = ring.to_record().unwrap();
        // A record as the first layout wrote it: no format, no new fields.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let m = v.as_object_mut().unwrap();
        for k in [
            "format",
            "derived",
            "convergent_encryption",
            "min_available_version",
        ] {
            assert!(m.remove(k).is_some(), "{k} is written");
        }
        let old = serde_json::to_vec(&v).unwrap();
        let back = KeyRing::from_record("k", &old).unwrap();
        assert!(!back.derived && !back.convergent_encryption);
        assert_eq!(back.min_available_version, 0);
        let ct = ring.versions[&1].material.encrypt(b"x", b"").unwrap();
        assert_eq!(*back.versions[&1].material.decrypt(&ct, b"").unwrap(), b"x");

        // A newer layout than this build is refused, not misread.
        v["format"] = serde_json::json!(RECORD_FORMAT + 1);
        assert!(KeyRing::from_record("k", &serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn trim_follows_vaults_rules() {
        let ring = KeyRing::new("k", &KeyOptions::new(KeyType::Aes256Gcm96), 1)
            .unwrap()
            .rotated(2)
            .unwrap()
            .rotated(3)
            .unwrap();
        // min_encryption_version 0: trim refused.
        assert!(ring.trimmed(2).is_err());
        let ring = ring
            .reconfigured(&KeyConfigChange {
                min_decryption_version: Some(2),
                min_encryption_version: Some(3),
                ..Default::default()
            })
            .unwrap();
        assert!(ring.trimmed(3).is_err(), "above min_decryption_version");
        let trimmed = ring.trimmed(2).unwrap();
        assert_eq!(trimmed.versions.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert!(trimmed.decryption_version(1).is_err());
        assert!(trimmed.trimmed(1).is_err(), "cannot go back");
        let back = KeyRing::from_record("k", &trimmed.to_record().unwrap()).unwrap();
        assert_eq!(back.min_available_version, 2);
    }

    #[test]
    fn derived_options_follow_vaults_rules() {
        let ok = KeyOptions {
            derived: true,
            convergent_encryption: true,
            ..KeyOptions::new(KeyType::Chacha20Poly1305)
        };
        assert!(ok.validate().is_ok());
        for bad in [
            KeyOptions {
                convergent_encryption: true,
                ..KeyOptions::new(KeyType::Aes256Gcm96)
            },
            KeyOptions {
                derived: true,
                ..KeyOptions::new(KeyType::EcdsaP384)
            },
            KeyOptions {
                derived: true,
                convergent_encryption: true,
                ..KeyOptions::new(KeyType::Ed25519)
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_changes_are_validated() {
        let opts = KeyOptions {
            exportable: true,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        };
        let ring = KeyRing::new("k", &opts, 1).unwrap().rotated(2).unwrap();
        let ok = ring
            .reconfigured(&KeyConfigChange {
                min_decryption_version: Some(2),
                ..Default::default()
            })
            .unwrap();
        assert!(ok.decryption_version(1).is_err());
        assert!(ok.decryption_version(2).is_ok());
        for change in [
            KeyConfigChange {
                min_decryption_version: Some(3),
                ..Default::default()
            },
            KeyConfigChange {
                min_decryption_version: Some(0),
                ..Default::default()
            },
            KeyConfigChange {
                exportable: Some(false),
                ..Default::default()
            },
        ] {
            assert!(ring.reconfigured(&change).is_err());
        }
    }

    #[test]
    fn opening_up_is_refused_only_for_what_the_key_was_created_without() {
        let closed = KeyRing::new("closed", &KeyOptions::new(KeyType::Aes256Gcm96), 1).unwrap();
        for change in [
            KeyConfigChange {
                exportable: Some(true),
                ..Default::default()
            },
            KeyConfigChange {
                allow_plaintext_backup: Some(true),
                ..Default::default()
            },
        ] {
            assert!(closed.refuse_opening_up(&change).is_err());
            // Vault's behaviour when the switch is off.
            assert!(closed.reconfigured(&change).is_ok());
        }
        // Other changes, and a key created open, are left alone.
        let unrelated = KeyConfigChange {
            deletion_allowed: Some(true),
            exportable: Some(false),
            ..Default::default()
        };
        assert!(closed.refuse_opening_up(&unrelated).is_ok());
        let open = KeyRing::new(
            "open",
            &KeyOptions {
                exportable: true,
                allow_plaintext_backup: true,
                ..KeyOptions::new(KeyType::Aes256Gcm96)
            },
            1,
        )
        .unwrap();
        assert!(open
            .refuse_opening_up(&KeyConfigChange {
                exportable: Some(true),
                allow_plaintext_backup: Some(true),
                ..Default::default()
            })
            .is_ok());
    }

    #[test]
    fn auto_rotate_period_is_off_or_at_least_an_hour() {
        let ring = KeyRing::new("k", &KeyOptions::new(KeyType::Aes256Gcm96), 1).unwrap();
        assert_eq!(ring.auto_rotate_period, 0);
        for ok in [0, MIN_AUTO_ROTATE_PERIOD, 7200, u64::MAX] {
            let set = ring
                .reconfigured(&KeyConfigChange {
                    auto_rotate_period: Some(ok),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(set.auto_rotate_period, ok);
            let created = KeyOptions {
                auto_rotate_period: ok,
                ..KeyOptions::new(KeyType::Ed25519)
            };
            assert!(created.validate().is_ok(), "{ok}");
        }
        for bad in [1, 60, 1800, MIN_AUTO_ROTATE_PERIOD - 1] {
            let err = ring
                .reconfigured(&KeyConfigChange {
                    auto_rotate_period: Some(bad),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(err.to_string().contains("at least an hour"), "{err}");
            let created = KeyOptions {
                auto_rotate_period: bad,
                ..KeyOptions::new(KeyType::Ed25519)
            };
            assert!(created.validate().is_err(), "{bad}");
            assert!(KeyRing::new("k", &created, 1).is_err());
        }
    }

    #[test]
    fn a_key_is_due_once_its_latest_version_is_a_period_old() {
        let opts = KeyOptions {
            auto_rotate_period: 3600,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        };
        let ring = KeyRing::new("k", &opts, 1_000).unwrap();
        assert!(!ring.due_for_rotation(1_000));
        assert!(!ring.due_for_rotation(4_599));
        assert!(ring.due_for_rotation(4_600));
        assert!(
            !ring.due_for_rotation(0),
            "a clock set back makes nothing due"
        );
        // The latest version counts, not the first.
        let rotated = ring.rotated(4_000).unwrap();
        assert!(!rotated.due_for_rotation(4_600));
        assert!(rotated.due_for_rotation(7_600));
        // Off: never due.
        let off = KeyRing::new("off", &KeyOptions::new(KeyType::Aes256Gcm96), 1).unwrap();
        assert!(!off.due_for_rotation(u64::MAX));
        // A huge period saturates instead of wrapping round to "due".
        let huge = ring
            .reconfigured(&KeyConfigChange {
                auto_rotate_period: Some(u64::MAX),
                ..Default::default()
            })
            .unwrap();
        assert!(!huge.due_for_rotation(u64::MAX - 1));
    }

    #[test]
    fn an_imported_key_rotates_automatically_only_with_allow_rotation() {
        let material = || KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap();
        let asked = KeyOptions {
            auto_rotate_period: 3600,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        };
        assert!(KeyRing::with_material("i", &asked, material(), true, 1).is_err());
        let allowed = KeyOptions {
            allow_rotation: true,
            ..asked.clone()
        };
        let ring = KeyRing::with_material("i", &allowed, material(), true, 1).unwrap();
        assert!(ring.due_for_rotation(3_601));
        let fixed = KeyRing::with_material(
            "f",
            &KeyOptions::new(KeyType::Aes256Gcm96),
            material(),
            true,
            1,
        )
        .unwrap();
        let on = KeyConfigChange {
            auto_rotate_period: Some(3600),
            ..Default::default()
        };
        assert!(fixed.reconfigured(&on).is_err());
        let off = KeyConfigChange {
            auto_rotate_period: Some(0),
            ..Default::default()
        };
        assert!(fixed.reconfigured(&off).is_ok());
        // Even a record that somehow says so is never rotated.
        let mut forced = fixed.clone();
        forced.auto_rotate_period = 3600;
        assert!(forced.due_for_rotation(3_601));
        assert!(forced.rotated(3_601).is_err());
        // A Transit backup record saying so is refused on restore.
        forced.exportable = true;
        forced.allow_plaintext_backup = true;
        let err = KeyRing::from_backup(&forced.to_record().unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("allow_rotation"), "{err}");
        forced.auto_rotate_period = 0;
        assert!(KeyRing::from_backup(&forced.to_record().unwrap(), None).is_ok());
    }

    #[test]
    fn auto_rotate_period_survives_the_record_and_older_records_read_as_off() {
        let opts = KeyOptions {
            auto_rotate_period: 86_400,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        };
        let ring = KeyRing::new("k", &opts, 1).unwrap();
        let bytes = ring.to_record().unwrap();
        assert_eq!(
            KeyRing::from_record("k", &bytes)
                .unwrap()
                .auto_rotate_period,
            86_400
        );
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let m = v.as_object_mut().unwrap();
        assert!(m.remove("auto_rotate_period").is_some());
        m.insert("format".into(), serde_json::json!(3));
        let old = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            KeyRing::from_record("k", &old).unwrap().auto_rotate_period,
            0
        );
        // A Transit backup record is untrusted: a short period is refused.
        let open = KeyOptions {
            exportable: true,
            allow_plaintext_backup: true,
            auto_rotate_period: 3600,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        };
        let mut record: serde_json::Value =
            serde_json::from_slice(&KeyRing::new("b", &open, 1).unwrap().to_record().unwrap())
                .unwrap();
        assert!(KeyRing::from_backup(&serde_json::to_vec(&record).unwrap(), None).is_ok());
        record["auto_rotate_period"] = serde_json::json!(60);
        assert!(KeyRing::from_backup(&serde_json::to_vec(&record).unwrap(), None).is_err());
    }

    #[test]
    fn a_backup_record_restores_renamed_and_bad_ones_are_refused() {
        let open = KeyOptions {
            exportable: true,
            allow_plaintext_backup: true,
            ..KeyOptions::new(KeyType::Ed25519)
        };
        let ring = KeyRing::new("orig", &open, 1).unwrap().rotated(2).unwrap();
        let record = ring.to_record().unwrap();
        let same = KeyRing::from_backup(&record, None).unwrap();
        assert_eq!((same.name.as_str(), same.latest_version), ("orig", 2));
        let renamed = KeyRing::from_backup(&record, Some("copy")).unwrap();
        assert_eq!(renamed.name, "copy");
        assert!(KeyRing::from_backup(&record, Some(".transit-wrapping-key")).is_err());
        assert!(KeyRing::from_backup(&record[..record.len() - 2], None).is_err());
        let closed = KeyRing::new("c", &KeyOptions::new(KeyType::Ed25519), 1).unwrap();
        assert!(KeyRing::from_backup(&closed.to_record().unwrap(), None).is_err());
    }

    fn public_of(m: &KeyMaterial) -> KeyMaterial {
        let spki = m.public_key_spki().unwrap().unwrap();
        KeyMaterial::public_only(
            m.key_type,
            &spki,
            SecretBytes::from_slice(&crate::engine::crypto::random_bytes(32).unwrap()),
        )
        .unwrap()
    }

    fn signs(ring: &KeyRing, v: u32) -> bool {
        ring.versions[&v]
            .material
            .sign(b"m", crate::engine::crypto::HashAlgorithm::Sha2_256)
            .is_ok()
    }

    #[test]
    fn public_only_versions_survive_the_record_as_format_5() {
        let pair = KeyMaterial::generate(KeyType::EcdsaP256).unwrap();
        let opts = KeyOptions {
            exportable: true,
            allow_plaintext_backup: true,
            ..KeyOptions::new(KeyType::EcdsaP256)
        };
        let ring = KeyRing::with_material("p", &opts, public_of(&pair), true, 1)
            .unwrap()
            .with_import(KeyMaterial::generate(KeyType::EcdsaP256).unwrap(), None, 2)
            .unwrap();
        assert_eq!(ring.latest_version, 2);
        let bytes = ring.to_record().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["format"], 5);
        let v1 = &v["versions"][0];
        assert!(v1.get("secret").is_none(), "no secret written: {v1}");
        assert!(v1["public_key"].is_string());
        assert!(v["versions"][1].get("public_key").is_none());
        let back = KeyRing::from_record("p", &bytes).unwrap();
        assert!(back.versions[&1].material.is_public_only());
        assert!(!back.versions[&2].material.is_public_only());
        assert!(!signs(&back, 1) && signs(&back, 2));
        assert_eq!(
            back.versions[&1].material.public_key().unwrap(),
            pair.public_key().unwrap()
        );
        // A Transit backup of it restores as it was: still public-only.
        let restored = KeyRing::from_backup(&bytes, Some("copy")).unwrap();
        assert!(restored.versions[&1].material.is_public_only());

        // Records no build writes are refused rather than misread: a
        // version with both a secret and a public key (a backup cannot
        // smuggle a private key into a public-only version beside it),
        // with neither, a public key in a format 4 record or in a derived
        // key.
        let full_secret = v["versions"][1]["secret"].clone();
        let mut both = v.clone();
        both["versions"][0]["secret"] = full_secret;
        let mut neither = v.clone();
        neither["versions"][0]
            .as_object_mut()
            .unwrap()
            .remove("public_key");
        let mut old = v.clone();
        old["format"] = serde_json::json!(4);
        let mut derived = v.clone();
        derived["derived"] = serde_json::json!(true);
        for (what, bad) in [
            ("both", both),
            ("neither", neither),
            ("format 4", old),
            ("derived", derived),
        ] {
            let bad = serde_json::to_vec(&bad).unwrap();
            assert!(KeyRing::from_record("p", &bad).is_err(), "{what}");
            assert!(KeyRing::from_backup(&bad, None).is_err(), "{what}");
        }
        // A public key of another curve than the type is refused too.
        let mut curve = v.clone();
        let p384 = KeyMaterial::generate(KeyType::EcdsaP384).unwrap();
        curve["versions"][0]["public_key"] =
            serde_json::json!(STANDARD.encode(p384.public_key_spki().unwrap().unwrap()));
        assert!(KeyRing::from_record("p", &serde_json::to_vec(&curve).unwrap()).is_err());
        // Format 4 records (every version with its secret) still read.
        let full = KeyRing::new("f", &KeyOptions::new(KeyType::Ed25519), 1).unwrap();
        let mut v4: serde_json::Value = serde_json::from_slice(&full.to_record().unwrap()).unwrap();
        v4["format"] = serde_json::json!(4);
        let back = KeyRing::from_record("f", &serde_json::to_vec(&v4).unwrap()).unwrap();
        assert!(signs(&back, 1));
    }

    #[test]
    fn import_version_follows_vaults_rules_for_public_only_versions() {
        let t = KeyType::Ed25519;
        let opts = KeyOptions::new(t);
        let pair1 = KeyMaterial::generate(t).unwrap();
        let ring = KeyRing::with_material("k", &opts, public_of(&pair1), true, 1).unwrap();
        assert!(!signs(&ring, 1));
        let hmac1 = ring.versions[&1].material.hmac_key.duplicate();
        // Another public key: a new (public-only) version.
        let pair2 = KeyMaterial::generate(t).unwrap();
        let two = ring.with_import(public_of(&pair2), None, 2).unwrap();
        assert_eq!(two.latest_version, 2);
        assert!(!signs(&two, 1) && !signs(&two, 2));
        // The latest version's private key, without `version`: completes it.
        let done = two
            .with_import(
                KeyMaterial::from_parts(t, pair2.secret.duplicate(), pair2.hmac_key.duplicate())
                    .unwrap(),
                None,
                3,
            )
            .unwrap();
        assert_eq!(done.latest_version, 2, "completed, not added");
        assert!(signs(&done, 2) && !signs(&done, 1));
        assert_eq!(
            done.versions[&2].created, 2,
            "the version keeps its creation time"
        );
        // Version 1's private key without `version`: the latest is complete,
        // so it becomes a new version (Vault); with `version: 1` it
        // completes version 1, keeping its HMAC key.
        let copy1 = || {
            KeyMaterial::from_parts(t, pair1.secret.duplicate(), pair1.hmac_key.duplicate())
                .unwrap()
        };
        let added = done.with_import(copy1(), None, 4).unwrap();
        assert_eq!(added.latest_version, 3);
        assert!(!signs(&added, 1));
        let completed = done.with_import(copy1(), Some(1), 4).unwrap();
        assert_eq!(completed.latest_version, 2);
        assert!(signs(&completed, 1));
        assert_eq!(
            completed.versions[&1].material.hmac_key.expose_secret(),
            hmac1.expose_secret()
        );
        // Refused: a key that does not match; a public key into a version
        // that has one; anything into a complete version; a missing version.
        let stranger = KeyMaterial::generate(t).unwrap();
        let err = two.with_import(stranger, Some(1), 5).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(two.with_import(public_of(&pair1), Some(1), 5).is_err());
        assert!(completed.with_import(copy1(), Some(1), 5).is_err());
        assert!(two.with_import(copy1(), Some(9), 5).is_err());
        assert!(two
            .with_import(KeyMaterial::generate(KeyType::EcdsaP256).unwrap(), None, 5)
            .is_err());
        // A private key that does not match the public-only latest version
        // becomes a new version (Vault's ImportPublicOrPrivate falls through).
        let other = two
            .with_import(KeyMaterial::generate(t).unwrap(), None, 5)
            .unwrap();
        assert_eq!(other.latest_version, 3);
        assert!(!signs(&other, 2) && signs(&other, 3));
        // `version` on a symmetric key: nothing to complete.
        let aes = KeyRing::with_material(
            "a",
            &KeyOptions::new(KeyType::Aes256Gcm96),
            KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap(),
            true,
            1,
        )
        .unwrap();
        assert!(aes
            .with_import(
                KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap(),
                Some(1),
                2
            )
            .is_err());
        // A derived (ed25519) key takes no public key.
        let derived = KeyRing::with_material(
            "d",
            &KeyOptions {
                derived: true,
                ..KeyOptions::new(t)
            },
            KeyMaterial::generate(t).unwrap(),
            true,
            1,
        )
        .unwrap();
        assert!(derived.with_import(public_of(&pair1), None, 2).is_err());
    }

    #[test]
    fn a_public_only_key_rotates_only_with_allow_rotation_into_a_generated_version() {
        let t = KeyType::EcdsaP384;
        let pair = KeyMaterial::generate(t).unwrap();
        let fixed =
            KeyRing::with_material("f", &KeyOptions::new(t), public_of(&pair), true, 1).unwrap();
        assert!(
            fixed.rotated(2).is_err(),
            "Vault: no rotation without allow_rotation"
        );
        let opts = KeyOptions {
            allow_rotation: true,
            ..KeyOptions::new(t)
        };
        let rotating = KeyRing::with_material("r", &opts, public_of(&pair), true, 1).unwrap();
        let rotated = rotating.rotated(2).unwrap();
        assert_eq!(rotated.latest_version, 2);
        // The new version is the engine's own key pair; version 1 stays a
        // verification key.
        assert!(signs(&rotated, 2) && !signs(&rotated, 1));
    }
}
