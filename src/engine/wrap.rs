//! Key wrap and import: one key version wrapped out under an engine
//! key-encryption key (AES key wrap, RFC 3394 "KW" or RFC 5649 "KWP", via
//! the `aes-kw` crate), a wrapped key unwrapped in as a new key ring, and
//! Vault's BYOK import (`transit/wrapping_key`, `keys/:name/import`,
//! `keys/:name/import_version`): PKCS#11's `CKM_RSA_AES_KEY_WRAP`, an
//! ephemeral AES-256 key under RSA-OAEP followed by the target key under
//! AES-KWP with that ephemeral key.
//!
//! The rules (docs/TRANSIT.md, "Key wrap and import"):
//! - wrap and unwrap are crypto-user operations, like every key use;
//! - the key-encryption key must be an aes256-gcm96 key created with
//!   `allow_wrap` (to wrap out) or `allow_unwrap` (to unwrap in), PKCS#11's
//!   `CKA_WRAP`/`CKA_UNWRAP`; such a key encrypts no data;
//! - a key that is not `exportable` never leaves, wrapped or not;
//! - every unwrap or import failure after the length checks is one error,
//!   so the engine is no padding or integrity oracle.
//!
//! The wrapped payload is what PKCS#11 and Vault carry: the raw key for
//! AES, ChaCha20 and HMAC keys, a PKCS#8 PrivateKeyInfo (DER) for Ed25519,
//! ECDSA and RSA keys.
use std::sync::Arc;

use aes_kw::{KeyInit, KwAes128, KwAes192, KwAes256, KwpAes128, KwpAes192, KwpAes256};
use aws_lc_rs::encoding::{AsBigEndian, AsDer};
use aws_lc_rs::rsa::{
    OaepAlgorithm, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384,
    OAEP_SHA512_MGF1SHA512,
};
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use zeroize::Zeroizing;

use super::crypto::{self, CryptoError, KeyMaterial, KeyType};
use super::keyring::{KeyOptions, KeyRing};
use super::secret::SecretBytes;
use super::{lock, now_unix, Engine, EngineError, Principal, Role};

/// The store record holding Vault's transit wrapping key. Key names may not
/// start with '.', so no user key can take or reach this name; the engine
/// keeps it out of the key map.
pub const VAULT_WRAPPING_KEY: &str = ".transit-wrapping-key";

/// Vault's wrapping key is RSA-4096: its OAEP block is the first 512 bytes
/// of an import ciphertext.
const WRAPPING_KEY_TYPE: KeyType = KeyType::Rsa4096;

/// Largest wrapped key accepted (an RSA-4096 PKCS#8 is about 2.4 KiB).
const MAX_WRAPPED_LEN: usize = 16 * 1024;

/// One message for every failure inside an unwrap: which step failed (OAEP
/// padding, the ephemeral key's length, the KW/KWP integrity check) is
/// exactly what a padding-oracle attacker wants to learn.
const UNWRAP_FAILED: &str =
    "the wrapped key could not be unwrapped (wrong wrapping key, mechanism, hash function, or corrupt data)";

/// AES key wrap mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 3394 / NIST SP 800-38F KW: keys of a multiple of 8 bytes, at least 16.
    AesKw,
    /// RFC 5649 / NIST SP 800-38F KWP: keys of any length from 1 byte.
    AesKwp,
}

impl Mechanism {
    pub fn parse(s: &str) -> Result<Mechanism, EngineError> {
        match s {
            "aes-kw" => Ok(Mechanism::AesKw),
            "aes-kwp" => Ok(Mechanism::AesKwp),
            other => Err(EngineError::InvalidRequest(format!(
                "unknown mechanism {other:?}: use \"aes-kwp\" (RFC 5649) or \"aes-kw\" (RFC 3394)"
            ))),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Mechanism::AesKw => "aes-kw",
            Mechanism::AesKwp => "aes-kwp",
        }
    }
}

/// Wraps `key` under `kek` (16, 24 or 32 bytes).
pub fn aes_wrap(kek: &[u8], mechanism: Mechanism, key: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let bad_kek = || CryptoError::InvalidKeyMaterial;
    let len = match mechanism {
        Mechanism::AesKw => {
            // RFC 3394 §2: at least two 64-bit blocks.
            if key.len() < 16 || key.len() % 8 != 0 {
                return Err(CryptoError::InvalidInput(format!(
                    "aes-kw wraps keys of a multiple of 8 bytes and at least 16; this key is {} \
                     bytes: use aes-kwp",
                    key.len()
                )));
            }
            key.len() + 8
        }
        Mechanism::AesKwp => {
            if key.is_empty() || key.len() > MAX_WRAPPED_LEN {
                return Err(CryptoError::InvalidInput(format!(
                    "aes-kwp wraps keys of 1 to {MAX_WRAPPED_LEN} bytes"
                )));
            }
            key.len().div_ceil(8) * 8 + 8
        }
    };
    let mut out = vec![0u8; len];
    let res = match (mechanism, kek.len()) {
        (Mechanism::AesKw, 16) => KwAes128::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKw, 24) => KwAes192::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKw, 32) => KwAes256::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 16) => KwpAes128::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 24) => KwpAes192::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 32) => KwpAes256::new_from_slice(kek)
            .map_err(|_| bad_kek())?
            .wrap_key(key, &mut out)
            .map(<[u8]>::len),
        _ => return Err(bad_kek()),
    };
    let n = res.map_err(|e| CryptoError::InvalidInput(format!("{}: {e}", mechanism.as_str())))?;
    out.truncate(n);
    Ok(out)
}

/// Unwraps `wrapped` under `kek`. Every integrity or length failure is the
/// same [`CryptoError::DecryptionFailed`].
pub fn aes_unwrap(
    kek: &[u8],
    mechanism: Mechanism,
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let fail = || CryptoError::DecryptionFailed;
    // KW needs at least 3 semiblocks (RFC 3394: n >= 2), KWP at least 2.
    let min = match mechanism {
        Mechanism::AesKw => 24,
        Mechanism::AesKwp => 16,
    };
    if wrapped.len() < min || wrapped.len() % 8 != 0 || wrapped.len() > MAX_WRAPPED_LEN + 16 {
        return Err(fail());
    }
    let mut out = Zeroizing::new(vec![0u8; wrapped.len()]);
    let n = match (mechanism, kek.len()) {
        (Mechanism::AesKw, 16) => KwAes128::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKw, 24) => KwAes192::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKw, 32) => KwAes256::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 16) => KwpAes128::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 24) => KwpAes192::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        (Mechanism::AesKwp, 32) => KwpAes256::new_from_slice(kek)
            .map_err(|_| fail())?
            .unwrap_key(wrapped, &mut out)
            .map(<[u8]>::len),
        _ => return Err(CryptoError::InvalidKeyMaterial),
    }
    .map_err(|_| fail())?;
    out.truncate(n);
    Ok(out)
}

/// The hash of Vault's `hash_function` (OAEP and its MGF1 use the same one,
/// as Go's `rsa.DecryptOAEP` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    Sha1,
    /// Not in aws-lc-rs: decrypted through aws-lc's EVP API by the
    /// `oaep-sha224` crate (crates/oaep-sha224).
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl OaepHash {
    /// Vault's names, case-insensitive; SHA256 when absent.
    pub fn parse(s: Option<&str>) -> Result<OaepHash, EngineError> {
        match s.map(str::to_ascii_uppercase).as_deref() {
            None | Some("") | Some("SHA256") => Ok(OaepHash::Sha256),
            Some("SHA1") => Ok(OaepHash::Sha1),
            Some("SHA224") => Ok(OaepHash::Sha224),
            Some("SHA384") => Ok(OaepHash::Sha384),
            Some("SHA512") => Ok(OaepHash::Sha512),
            Some(other) => Err(EngineError::InvalidRequest(format!(
                "unknown hash function: {other} (use SHA1, SHA224, SHA256, SHA384 or SHA512)"
            ))),
        }
    }

    /// aws-lc-rs's algorithm for this hash; `None` for SHA-224, which
    /// aws-lc-rs does not offer (see [`rsa_oaep_decrypt`]).
    pub fn algorithm(self) -> Option<&'static OaepAlgorithm> {
        match self {
            OaepHash::Sha1 => Some(&OAEP_SHA1_MGF1SHA1),
            OaepHash::Sha224 => None,
            OaepHash::Sha256 => Some(&OAEP_SHA256_MGF1SHA256),
            OaepHash::Sha384 => Some(&OAEP_SHA384_MGF1SHA384),
            OaepHash::Sha512 => Some(&OAEP_SHA512_MGF1SHA512),
        }
    }
}

/// RSA-OAEP decryption of an import's OAEP block with `hash` for OAEP and
/// MGF1 and no label (Go's `rsa.DecryptOAEP`, Vault's import): aws-lc-rs
/// for SHA-1/256/384/512, aws-lc's EVP API for SHA-224. Every failure is
/// [`CryptoError::DecryptionFailed`].
pub fn rsa_oaep_decrypt(
    key: &KeyMaterial,
    hash: OaepHash,
    block: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    match hash.algorithm() {
        Some(alg) => key.rsa_oaep_decrypt_with(alg, block),
        None => key.rsa_oaep_sha224_decrypt(block),
    }
}

/// `CKM_RSA_AES_KEY_WRAP` unwrap, Vault's import format:
/// RSA-OAEP(ephemeral AES-256 key) ‖ AES-KWP(ephemeral key, target key).
pub fn rsa_aes_unwrap(
    wrapping: &KeyMaterial,
    hash: OaepHash,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EngineError> {
    let rsa_len = wrapping
        .rsa_modulus_len()
        .ok_or_else(|| EngineError::Internal("the wrapping key is not an RSA key".into()))?;
    if ciphertext.len() <= rsa_len {
        return Err(EngineError::InvalidRequest(format!(
            "provided ciphertext is too short: it must hold the {rsa_len}-byte RSA-OAEP block \
             followed by the AES-KWP-wrapped key"
        )));
    }
    if ciphertext.len() > rsa_len + MAX_WRAPPED_LEN + 16 {
        return Err(EngineError::InvalidRequest(
            "provided ciphertext is too long".into(),
        ));
    }
    let (rsa_block, wrapped) = ciphertext.split_at(rsa_len);
    let failed = || EngineError::InvalidRequest(UNWRAP_FAILED.into());
    let ephemeral = rsa_oaep_decrypt(wrapping, hash, rsa_block).map_err(|_| failed())?;
    if ephemeral.len() != 32 {
        return Err(failed());
    }
    aes_unwrap(&ephemeral, Mechanism::AesKwp, wrapped).map_err(|_| failed())
}

/// The payload that represents one key version when wrapped: the raw key
/// (AEAD and HMAC types), PKCS#8 v1 DER (Ed25519, ECDSA, RSA).
pub fn key_payload(material: &KeyMaterial) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if material.is_public_only() {
        return Err(CryptoError::PublicKeyOnly {
            op: "wrapping (a wrap carries the private key)",
        });
    }
    let secret = material.secret.expose_secret();
    match material.key_type {
        KeyType::Ed25519 => {
            // RFC 8410 OneAsymmetricKey v1: SEQUENCE { 0, { id-Ed25519 },
            // OCTET STRING { OCTET STRING seed } }.
            const PREFIX: [u8; 16] = [
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            let mut out = Zeroizing::new(Vec::with_capacity(48));
            out.extend_from_slice(&PREFIX);
            out.extend_from_slice(secret);
            Ok(out)
        }
        _ => Ok(Zeroizing::new(secret.to_vec())),
    }
}

/// Builds key material of `key_type` from an imported payload (the format
/// of [`key_payload`]), refusing anything that is not a valid key of that
/// exact type and size. AEAD and asymmetric keys get a fresh HMAC key, as
/// Vault gives imported keys.
pub fn material_from_payload(
    key_type: KeyType,
    payload: &[u8],
) -> Result<KeyMaterial, EngineError> {
    let wrong = || {
        EngineError::InvalidRequest(format!(
            "the imported key is not a valid {key_type} key (expected {})",
            match key_type {
                KeyType::Aes128Gcm96 => "16 raw bytes",
                KeyType::Aes256Gcm96 | KeyType::Chacha20Poly1305 => "32 raw bytes",
                KeyType::Hmac => "raw bytes",
                _ => "a PKCS#8 PrivateKeyInfo in DER",
            }
        ))
    };
    let hmac_key = || -> Result<SecretBytes, EngineError> {
        let raw = crypto::random_bytes(32)?;
        Ok(SecretBytes::from_slice(&raw))
    };
    let secret = match key_type {
        KeyType::Hmac => {
            if payload.is_empty() {
                return Err(wrong());
            }
            let secret = SecretBytes::from_slice(payload);
            let dup = secret.duplicate();
            return KeyMaterial::from_parts(key_type, secret, dup).map_err(|_| wrong());
        }
        KeyType::Ed25519 => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(payload).map_err(|_| wrong())?;
            let seed = pair.seed().map_err(|_| wrong())?;
            let bin = seed.as_be_bytes().map_err(|_| wrong())?;
            SecretBytes::from_slice(bin.as_ref())
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::EcdsaP521 => {
            let alg = key_type.ecdsa_signing().ok_or_else(wrong)?;
            // Normalised to the engine's own PKCS#8 v1 form.
            let pair = EcdsaKeyPair::from_pkcs8(alg, payload).map_err(|_| wrong())?;
            let doc = pair.to_pkcs8v1().map_err(|_| wrong())?;
            SecretBytes::from_slice(doc.as_ref())
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let pair = RsaKeyPair::from_pkcs8(payload).map_err(|_| wrong())?;
            let doc = pair.as_der().map_err(|_| wrong())?;
            SecretBytes::from_slice(doc.as_ref())
        }
        KeyType::Aes128Gcm96 | KeyType::Aes256Gcm96 | KeyType::Chacha20Poly1305 => {
            SecretBytes::from_slice(payload)
        }
    };
    KeyMaterial::from_parts(key_type, secret, hmac_key()?).map_err(|_| wrong())
}

/// A key version wrapped out of the engine.
pub struct WrappedKey {
    pub key_type: KeyType,
    /// The version of the wrapped key.
    pub version: u32,
    /// The version of the key-encryption key used.
    pub wrapping_key_version: u32,
    pub mechanism: Mechanism,
    /// The KW/KWP output (not secret: it is ciphertext).
    pub wrapped: Vec<u8>,
}

/// What a Vault import (`keys/:name/import`, `import_version`) brings in:
/// `ciphertext` (the private key wrapped for the transit wrapping key) or
/// `public_key` (a PEM SubjectPublicKeyInfo, a verification-only version).
pub enum ImportSource {
    Wrapped { ciphertext: Vec<u8>, hash: OaepHash },
    PublicKey(String),
}

/// What an unwrap or import brings in, besides the key itself.
pub struct Unwrap<'a> {
    pub wrapping_key: &'a str,
    pub wrapping_key_version: Option<u32>,
    pub mechanism: Mechanism,
    pub wrapped: &'a [u8],
}

impl Engine {
    /// The persisted Vault wrapping key (RSA-4096), created on first use. It
    /// lives in the sealed store like any key, under a reserved name.
    fn vault_wrapping_ring(&self) -> Result<KeyRing, EngineError> {
        let stored = self.with_active(|a| {
            a.store
                .get_key(VAULT_WRAPPING_KEY)?
                .map(|bytes| KeyRing::from_record(VAULT_WRAPPING_KEY, &bytes))
                .transpose()
        })?;
        if let Some(ring) = stored {
            return Ok(ring);
        }
        // Created once: two first callers must not publish two keys.
        // key_writes before the state lock, the order every key write uses:
        // the other order can deadlock behind a queued writer (zeroize).
        let _serial = lock(&self.key_writes);
        let op = self.with_active(|a| {
            let read = a
                .store
                .read_for_update(super::store::Table::Keys, VAULT_WRAPPING_KEY)?;
            if let Some(bytes) = read.plaintext {
                return Ok(Err(KeyRing::from_record(VAULT_WRAPPING_KEY, &bytes)?));
            }
            let ring = KeyRing::new(
                VAULT_WRAPPING_KEY,
                &KeyOptions::new(WRAPPING_KEY_TYPE),
                now_unix(),
            )?;
            let op = a.store.put_op(
                super::store::Table::Keys,
                VAULT_WRAPPING_KEY,
                &ring.to_record()?,
                read.expect,
            )?;
            Ok(Ok((op, ring)))
        })?;
        let (op, ring) = match op {
            Err(existing) => return Ok(existing),
            Ok(new) => new,
        };
        match self.commit(vec![op]) {
            // Another cluster member created it first: use theirs.
            Err(EngineError::Conflict(_)) => {
                self.catch_up()?;
                let bytes = self
                    .with_active(|a| Ok(a.store.get_key(VAULT_WRAPPING_KEY)?))?
                    .ok_or_else(|| EngineError::Internal("wrapping key vanished".into()))?;
                return KeyRing::from_record(VAULT_WRAPPING_KEY, &bytes);
            }
            r => r?,
        }
        tracing::info!("transit wrapping key (RSA-4096) created");
        Ok(ring)
    }

    /// Vault's `GET transit/wrapping_key`: the RSA-4096 public key, PEM.
    /// Blocking on first use (RSA-4096 generation).
    pub fn vault_wrapping_key(&self, by: &Principal) -> Result<String, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        let ring = self.vault_wrapping_ring()?;
        let kv = &ring.versions[&ring.latest_version];
        kv.material
            .public_key()?
            .map(|pk| pk.public_key)
            .ok_or_else(|| EngineError::Internal("the wrapping key has no public key".into()))
    }

    fn vault_unwrap(
        &self,
        ciphertext: &[u8],
        hash: OaepHash,
    ) -> Result<Zeroizing<Vec<u8>>, EngineError> {
        let ring = self.vault_wrapping_ring()?;
        let kv = &ring.versions[&ring.latest_version];
        rsa_aes_unwrap(&kv.material, hash, ciphertext)
    }

    /// Vault's `keys/:name/import`: a new key ring from material wrapped
    /// for the transit wrapping key. Refused if the name exists, as in Vault.
    pub fn import_key(
        &self,
        by: &Principal,
        name: &str,
        opts: &KeyOptions,
        ciphertext: &[u8],
        hash: OaepHash,
    ) -> Result<Arc<KeyRing>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        opts.validate()?;
        refuse_convergent(opts)?;
        self.refuse_existing(name)?;
        let payload = self.vault_unwrap(ciphertext, hash)?;
        let material = material_from_payload(opts.key_type, &payload)?;
        self.insert_imported(by, name, opts, material)
    }

    /// Vault's `keys/:name/import` with `public_key`: a new key ring whose
    /// first version holds only a public key. It verifies (and, RSA,
    /// encrypts); nothing signs or decrypts with it until
    /// `import_version` supplies the matching private key.
    pub fn import_public_key(
        &self,
        by: &Principal,
        name: &str,
        opts: &KeyOptions,
        pem: &str,
    ) -> Result<Arc<KeyRing>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        opts.validate()?;
        refuse_convergent(opts)?;
        if opts.derived {
            // Vault's rule: a derived ed25519 key is an HKDF key, not a pair.
            return Err(EngineError::InvalidRequest(
                "a public key alone cannot be imported as a derived key (a derived key is an \
                 HKDF key, not a key pair)"
                    .into(),
            ));
        }
        self.refuse_existing(name)?;
        let material = KeyMaterial::public_only_from_pem(opts.key_type, pem)?;
        self.insert_imported(by, name, opts, material)
    }

    /// Vault's `keys/:name/import_version`: a new latest version of an
    /// imported key, or the private key of a public-key-only version
    /// (`version`, or the latest when it matches); the rules are
    /// [`KeyRing::with_import`]'s.
    pub fn import_key_version(
        &self,
        by: &Principal,
        name: &str,
        source: &ImportSource,
        version: Option<u32>,
    ) -> Result<Arc<KeyRing>, EngineError> {
        let ring = self.ring(by, name)?;
        if !ring.imported_key {
            return Err(EngineError::InvalidRequest(
                "the import_version endpoint can only be used with an imported key".into(),
            ));
        }
        let material = match source {
            ImportSource::Wrapped { ciphertext, hash } => {
                let payload = self.vault_unwrap(ciphertext, *hash)?;
                material_from_payload(ring.key_type, &payload)?
            }
            ImportSource::PublicKey(pem) => KeyMaterial::public_only_from_pem(ring.key_type, pem)?,
        };
        let mut material = Some(material);
        self.update_ring(by, name, |current| {
            let ring = current.ok_or_else(|| EngineError::KeyNotFound(name.into()))?;
            let material = material.take().ok_or_else(changed_meanwhile)?;
            ring.with_import(material, version, now_unix()).map(Some)
        })
    }

    /// Wraps one version (default: latest) of `name` under the
    /// key-encryption key `kek` (created with `allow_wrap`). Only for
    /// exportable keys.
    pub fn wrap_key(
        &self,
        by: &Principal,
        name: &str,
        version: Option<u32>,
        kek: &str,
        kek_version: Option<u32>,
        mechanism: Mechanism,
    ) -> Result<WrappedKey, EngineError> {
        let ring = self.ring(by, name)?;
        let kek_ring = self.ring(by, kek)?;
        if !kek_ring.allow_wrap {
            return Err(EngineError::InvalidRequest(format!(
                "key {kek:?} is not a wrapping key: create an aes256-gcm96 key with allow_wrap"
            )));
        }
        if !ring.exportable {
            return Err(EngineError::InvalidRequest(format!(
                "key {name:?} is not exportable: a non-exportable key never leaves the engine, \
                 wrapped or not"
            )));
        }
        let v = version.unwrap_or(ring.latest_version);
        let kv = ring.decryption_version(v)?;
        let (kek_v, kek_kv) = kek_ring.encryption_version(kek_version)?;
        let payload = key_payload(&kv.material)?;
        let wrapped = aes_wrap(kek_kv.material.secret.expose_secret(), mechanism, &payload)?;
        Ok(WrappedKey {
            key_type: ring.key_type,
            version: v,
            wrapping_key_version: kek_v,
            mechanism,
            wrapped,
        })
    }

    /// Unwraps a key under the key-encryption key `unwrap.wrapping_key`
    /// (created with `allow_unwrap`) into a new key ring `name`.
    pub fn unwrap_key(
        &self,
        by: &Principal,
        name: &str,
        opts: &KeyOptions,
        unwrap: &Unwrap<'_>,
    ) -> Result<Arc<KeyRing>, EngineError> {
        Self::require(by, Role::CryptoUser)?;
        opts.validate()?;
        refuse_convergent(opts)?;
        let kek_ring = self.ring(by, unwrap.wrapping_key)?;
        if !kek_ring.allow_unwrap {
            return Err(EngineError::InvalidRequest(format!(
                "key {:?} is not an unwrapping key: create an aes256-gcm96 key with allow_unwrap",
                unwrap.wrapping_key
            )));
        }
        self.refuse_existing(name)?;
        let kv = kek_ring.decryption_version(
            unwrap
                .wrapping_key_version
                .unwrap_or(kek_ring.latest_version),
        )?;
        let payload = aes_unwrap(
            kv.material.secret.expose_secret(),
            unwrap.mechanism,
            unwrap.wrapped,
        )
        .map_err(|_| EngineError::InvalidRequest(UNWRAP_FAILED.into()))?;
        let material = material_from_payload(opts.key_type, &payload)?;
        self.insert_imported(by, name, opts, material)
    }

    fn refuse_existing(&self, name: &str) -> Result<(), EngineError> {
        super::keyring::validate_name(name)?;
        let exists = self.with_active(|a| Ok(super::read(&a.keys).contains_key(name)))?;
        if exists {
            return Err(EngineError::InvalidRequest(format!(
                "key {name:?} exists: import and unwrap create new keys only \
                 (use keys/:name/import_version for a new version of an imported key)"
            )));
        }
        Ok(())
    }

    fn insert_imported(
        &self,
        by: &Principal,
        name: &str,
        opts: &KeyOptions,
        material: KeyMaterial,
    ) -> Result<Arc<KeyRing>, EngineError> {
        let mut material = Some(material);
        self.update_ring(by, name, |current| match current {
            // Checked again under the write lock: a concurrent create wins.
            Some(_) => Err(EngineError::InvalidRequest(format!(
                "key {name:?} exists: import and unwrap create new keys only"
            ))),
            None => {
                let material = material.take().ok_or_else(changed_meanwhile)?;
                KeyRing::with_material(name, opts, material, true, now_unix()).map(Some)
            }
        })
    }
}

/// An import's key material is used once: a write that lost a race with
/// another cluster member is not replayed with it.
fn changed_meanwhile() -> EngineError {
    EngineError::Conflict("the key changed while this import ran; try again".into())
}

fn refuse_convergent(opts: &KeyOptions) -> Result<(), EngineError> {
    if opts.convergent_encryption {
        return Err(EngineError::InvalidRequest(
            "import cannot be used on keys with convergent encryption enabled".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 3394 §4.1 and §4.6, RFC 5649 §6.
    #[test]
    fn rfc_known_answers() {
        let kek128 = unhex("000102030405060708090A0B0C0D0E0F");
        let key128 = unhex("00112233445566778899AABBCCDDEEFF");
        let w = aes_wrap(&kek128, Mechanism::AesKw, &key128).unwrap();
        assert_eq!(w, unhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"));
        assert_eq!(
            &*aes_unwrap(&kek128, Mechanism::AesKw, &w).unwrap(),
            &key128[..]
        );
        let kek256 = unhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
        let key256 = unhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F");
        let w = aes_wrap(&kek256, Mechanism::AesKw, &key256).unwrap();
        assert_eq!(
            w,
            unhex(
                "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
            )
        );
        let kek192 = unhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8");
        let w = aes_wrap(&kek192, Mechanism::AesKwp, &unhex("466f7250617369")).unwrap();
        assert_eq!(w, unhex("afbeb0f07dfbf5419200f2ccb50bb24f"));
        let w = aes_wrap(
            &kek192,
            Mechanism::AesKwp,
            &unhex("c37b7e6492584340bed12207808941155068f738"),
        )
        .unwrap();
        assert_eq!(
            w,
            unhex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
        );
        assert_eq!(
            &*aes_unwrap(&kek192, Mechanism::AesKwp, &w).unwrap(),
            &unhex("c37b7e6492584340bed12207808941155068f738")[..]
        );
    }

    #[test]
    fn tampering_and_wrong_keys_fail_alike() {
        let kek = [7u8; 32];
        let w = aes_wrap(&kek, Mechanism::AesKwp, b"a key of odd length").unwrap();
        let mut bad = w.clone();
        bad[3] ^= 1;
        for (k, m, c) in [
            (&kek[..], Mechanism::AesKwp, &bad[..]),
            (&[8u8; 32][..], Mechanism::AesKwp, &w[..]),
            (&kek[..], Mechanism::AesKw, &w[..]),
            (&kek[..], Mechanism::AesKwp, &w[..8]),
        ] {
            assert!(matches!(
                aes_unwrap(k, m, c),
                Err(CryptoError::DecryptionFailed)
            ));
        }
        assert!(aes_wrap(&kek, Mechanism::AesKw, b"seventeen bytes!!").is_err());
        assert!(aes_wrap(&kek, Mechanism::AesKw, &[0u8; 8]).is_err());
    }

    #[test]
    fn every_key_type_round_trips_through_its_payload() {
        for t in KeyType::ALL {
            if matches!(t, KeyType::Rsa3072 | KeyType::Rsa4096) {
                continue; // slow to generate; rsa-2048 covers the path
            }
            let m = KeyMaterial::generate(t).unwrap();
            let payload = key_payload(&m).unwrap();
            let back = material_from_payload(t, &payload).unwrap();
            assert_eq!(back.secret.expose_secret(), m.secret.expose_secret(), "{t}");
        }
        // A key of another type or size is refused.
        let p256 = key_payload(&KeyMaterial::generate(KeyType::EcdsaP256).unwrap()).unwrap();
        assert!(material_from_payload(KeyType::EcdsaP384, &p256).is_err());
        assert!(material_from_payload(KeyType::Rsa2048, &p256).is_err());
        assert!(material_from_payload(KeyType::Aes256Gcm96, &[1u8; 16]).is_err());
        assert!(material_from_payload(KeyType::Aes128Gcm96, &[1u8; 16]).is_ok());
        assert!(material_from_payload(KeyType::Ed25519, &[1u8; 32]).is_err());
    }

    #[test]
    fn a_public_only_version_has_no_payload_to_wrap() {
        let pair = KeyMaterial::generate(KeyType::Ed25519).unwrap();
        let spki = pair.public_key_spki().unwrap().unwrap();
        let public =
            KeyMaterial::public_only(KeyType::Ed25519, &spki, SecretBytes::from_slice(&[3u8; 32]))
                .unwrap();
        assert!(matches!(
            key_payload(&public),
            Err(CryptoError::PublicKeyOnly { .. })
        ));
        assert!(key_payload(&pair).is_ok());
    }

    #[test]
    fn mechanisms_and_hashes_parse() {
        assert_eq!(Mechanism::parse("aes-kwp").unwrap(), Mechanism::AesKwp);
        assert!(Mechanism::parse("AES-KWP").is_err());
        assert_eq!(OaepHash::parse(None).unwrap(), OaepHash::Sha256);
        assert_eq!(OaepHash::parse(Some("sha1")).unwrap(), OaepHash::Sha1);
        assert_eq!(OaepHash::parse(Some("Sha224")).unwrap(), OaepHash::Sha224);
        assert!(OaepHash::parse(Some("MD5")).is_err());
    }
}
