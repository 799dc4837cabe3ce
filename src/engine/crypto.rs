//! Key types and the cryptographic operations the engine runs on them.
//!
//! This module knows nothing of storage or HTTP: it turns key material into
//! ciphertexts, signatures and MACs and back. Every primitive comes from
//! aws-lc-rs; AEAD sealing happens in exactly one function,
//! [`aead_seal_with`] (reached through [`aead_seal`] by the store), so the
//! known-answer and Wycheproof tests cover the path the engine and the store
//! really use.
//!
//! Keys are prepared once, when a version is loaded or generated, and kept
//! beside their stored bytes: asymmetric keys parsed (parsing an RSA key
//! costs more than signing with it), AEAD keys with their key schedule, the
//! HMAC-SHA256 key with its padded-key state (per call these cost as much as
//! sealing 1 KiB; benches/engine.rs). aws-lc frees (and clears) those
//! structures on drop.
use std::fmt;

use aws_lc_rs::aead::{
    Aad, Algorithm as AeadAlgorithm, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM,
    CHACHA20_POLY1305, NONCE_LEN,
};
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    KeySize, OaepAlgorithm, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    PrivateDecryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, EcdsaVerificationAlgorithm, Ed25519KeyPair, KeyPair,
    ParsedPublicKey, RsaEncoding, RsaKeyPair, RsaParameters, RsaPssSaltLength, UnparsedPublicKey,
    VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_P521_SHA512_ASN1,
    ECDSA_P521_SHA512_ASN1_SIGNING, ED25519, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512, RSA_PKCS1_SHA256, RSA_PKCS1_SHA384,
    RSA_PKCS1_SHA512, RSA_PSS_2048_8192_SHA256, RSA_PSS_2048_8192_SHA384, RSA_PSS_2048_8192_SHA512,
    RSA_PSS_SHA256, RSA_PSS_SHA384, RSA_PSS_SHA512,
};
use aws_lc_rs::{hkdf, hmac};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::engine::secret::SecretBytes;

/// AES-256 key length, also the length of every generated HMAC key and seed.
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "unknown key type \"{0}\" (supported: aes128-gcm96, aes256-gcm96, chacha20-poly1305, \
         hmac, ed25519, ecdsa-p256, ecdsa-p384, ecdsa-p521, rsa-2048, rsa-3072, rsa-4096)"
    )]
    UnsupportedKeyType(String),
    #[error("unsupported hash algorithm \"{0}\"")]
    UnsupportedHash(String),
    #[error("key type {key_type} does not support {op}")]
    OperationNotSupported { op: &'static str, key_type: KeyType },
    #[error("{0}")]
    InvalidInput(String),
    #[error("key material is malformed or has the wrong length for its key type")]
    InvalidKeyMaterial,
    /// Deliberately one variant without detail: telling a caller whether the
    /// blob was short, the tag wrong or the AAD different helps only an attacker.
    #[error("cipher: message authentication failed")]
    DecryptionFailed,
    #[error("the system random number generator failed")]
    RandomFailure,
    #[error("key generation failed")]
    KeyGeneration,
    /// A version imported with only its public key (Vault's `public_key`
    /// import) was asked for something only a full key pair can do.
    #[error(
        "this key version holds only a public key (imported with public_key): it can verify \
         signatures (and, for RSA, encrypt) but not {op}; supply its private key with \
         keys/:name/import_version to complete it"
    )]
    PublicKeyOnly { op: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyType {
    #[serde(rename = "aes128-gcm96")]
    Aes128Gcm96,
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
    #[serde(rename = "hmac")]
    Hmac,
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    #[serde(rename = "ecdsa-p521")]
    EcdsaP521,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

/// The three ECDSA curves: signing key algorithm, verification algorithm,
/// the byte length of the group order (for digest fitting and JWS `r‖s`).
#[derive(Clone, Copy)]
struct Curve {
    name: &'static str,
    signing: &'static EcdsaSigningAlgorithm,
    verifying: &'static EcdsaVerificationAlgorithm,
    /// The digest the aws-lc-rs algorithm is bound to; every other hash is
    /// fitted to it (see [`fit_digest`]).
    native: &'static digest::Algorithm,
    scalar_len: usize,
}

const P256: Curve = Curve {
    name: "P-256",
    signing: &ECDSA_P256_SHA256_ASN1_SIGNING,
    verifying: &ECDSA_P256_SHA256_ASN1,
    native: &digest::SHA256,
    scalar_len: 32,
};
const P384: Curve = Curve {
    name: "P-384",
    signing: &ECDSA_P384_SHA384_ASN1_SIGNING,
    verifying: &ECDSA_P384_SHA384_ASN1,
    native: &digest::SHA384,
    scalar_len: 48,
};
const P521: Curve = Curve {
    name: "P-521",
    signing: &ECDSA_P521_SHA512_ASN1_SIGNING,
    verifying: &ECDSA_P521_SHA512_ASN1,
    native: &digest::SHA512,
    scalar_len: 66,
};

impl KeyType {
    pub const ALL: [KeyType; 11] = [
        KeyType::Aes128Gcm96,
        KeyType::Aes256Gcm96,
        KeyType::Chacha20Poly1305,
        KeyType::Hmac,
        KeyType::Ed25519,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::EcdsaP521,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name Vault uses on the wire and in key listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyType::Aes128Gcm96 => "aes128-gcm96",
            KeyType::Aes256Gcm96 => "aes256-gcm96",
            KeyType::Chacha20Poly1305 => "chacha20-poly1305",
            KeyType::Hmac => "hmac",
            KeyType::Ed25519 => "ed25519",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::EcdsaP521 => "ecdsa-p521",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    pub fn parse(s: &str) -> Result<KeyType, CryptoError> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| CryptoError::UnsupportedKeyType(s.to_owned()))
    }

    /// The AEAD for symmetric encryption types.
    fn aead(&self) -> Option<&'static AeadAlgorithm> {
        match self {
            KeyType::Aes128Gcm96 => Some(&AES_128_GCM),
            KeyType::Aes256Gcm96 => Some(&AES_256_GCM),
            KeyType::Chacha20Poly1305 => Some(&CHACHA20_POLY1305),
            _ => None,
        }
    }

    /// The aws-lc-rs signing algorithm of an ECDSA type.
    pub fn ecdsa_signing(&self) -> Option<&'static EcdsaSigningAlgorithm> {
        self.curve().map(|c| c.signing)
    }

    fn curve(&self) -> Option<Curve> {
        match self {
            KeyType::EcdsaP256 => Some(P256),
            KeyType::EcdsaP384 => Some(P384),
            KeyType::EcdsaP521 => Some(P521),
            _ => None,
        }
    }

    fn rsa_size(&self) -> Option<KeySize> {
        match self {
            KeyType::Rsa2048 => Some(KeySize::Rsa2048),
            KeyType::Rsa3072 => Some(KeySize::Rsa3072),
            KeyType::Rsa4096 => Some(KeySize::Rsa4096),
            _ => None,
        }
    }

    pub fn is_rsa(&self) -> bool {
        self.rsa_size().is_some()
    }

    /// Symmetric AEAD types: the ones with derivation, convergent encryption
    /// and a raw `encryption-key` export.
    pub fn is_aead(&self) -> bool {
        self.aead().is_some()
    }

    pub fn supports_encryption(&self) -> bool {
        self.is_aead() || self.is_rsa()
    }

    pub fn supports_signing(&self) -> bool {
        matches!(self, KeyType::Ed25519) || self.curve().is_some() || self.is_rsa()
    }

    /// As in Vault: the AEAD types and ed25519 may be derived.
    pub fn supports_derivation(&self) -> bool {
        self.is_aead() || matches!(self, KeyType::Ed25519)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha2_224,
    Sha2_256,
    Sha2_384,
    Sha2_512,
    Sha3_256,
    Sha3_384,
    Sha3_512,
}

impl HashAlgorithm {
    /// Vault's names, plus the short forms its `hmac` path also accepts.
    pub fn parse(s: &str) -> Result<HashAlgorithm, CryptoError> {
        match s {
            "sha2-224" | "sha224" => Ok(HashAlgorithm::Sha2_224),
            "sha2-256" | "sha256" => Ok(HashAlgorithm::Sha2_256),
            "sha2-384" | "sha384" => Ok(HashAlgorithm::Sha2_384),
            "sha2-512" | "sha512" => Ok(HashAlgorithm::Sha2_512),
            "sha3-256" => Ok(HashAlgorithm::Sha3_256),
            "sha3-384" => Ok(HashAlgorithm::Sha3_384),
            "sha3-512" => Ok(HashAlgorithm::Sha3_512),
            other => Err(CryptoError::UnsupportedHash(other.to_owned())),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            HashAlgorithm::Sha2_224 => "sha2-224",
            HashAlgorithm::Sha2_256 => "sha2-256",
            HashAlgorithm::Sha2_384 => "sha2-384",
            HashAlgorithm::Sha2_512 => "sha2-512",
            HashAlgorithm::Sha3_256 => "sha3-256",
            HashAlgorithm::Sha3_384 => "sha3-384",
            HashAlgorithm::Sha3_512 => "sha3-512",
        }
    }

    fn digest_algorithm(self) -> &'static digest::Algorithm {
        match self {
            HashAlgorithm::Sha2_224 => &digest::SHA224,
            HashAlgorithm::Sha2_256 => &digest::SHA256,
            HashAlgorithm::Sha2_384 => &digest::SHA384,
            HashAlgorithm::Sha2_512 => &digest::SHA512,
            HashAlgorithm::Sha3_256 => &digest::SHA3_256,
            HashAlgorithm::Sha3_384 => &digest::SHA3_384,
            HashAlgorithm::Sha3_512 => &digest::SHA3_512,
        }
    }

    pub fn output_len(self) -> usize {
        self.digest_algorithm().output_len()
    }

    fn hmac_algorithm(self) -> Result<hmac::Algorithm, CryptoError> {
        match self {
            HashAlgorithm::Sha2_224 => Ok(hmac::HMAC_SHA224),
            HashAlgorithm::Sha2_256 => Ok(hmac::HMAC_SHA256),
            HashAlgorithm::Sha2_384 => Ok(hmac::HMAC_SHA384),
            HashAlgorithm::Sha2_512 => Ok(hmac::HMAC_SHA512),
            other => Err(CryptoError::UnsupportedHash(format!(
                "{} (HMAC takes sha2-224, sha2-256, sha2-384 or sha2-512)",
                other.as_str()
            ))),
        }
    }

    /// RSA signing encodings exist for SHA-2 256/384/512 only.
    fn rsa(
        self,
        padding: RsaPadding,
    ) -> Result<(&'static dyn RsaEncoding, &'static [&'static RsaParameters]), CryptoError> {
        const PSS256_MAX: RsaParameters =
            RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);
        const PSS384_MAX: RsaParameters =
            RSA_PSS_2048_8192_SHA384.with_pss_salt_length(RsaPssSaltLength::Max);
        const PSS512_MAX: RsaParameters =
            RSA_PSS_2048_8192_SHA512.with_pss_salt_length(RsaPssSaltLength::Max);
        Ok(match (padding, self) {
            (RsaPadding::Pss, HashAlgorithm::Sha2_256) => {
                (&RSA_PSS_SHA256, &[&RSA_PSS_2048_8192_SHA256, &PSS256_MAX])
            }
            (RsaPadding::Pss, HashAlgorithm::Sha2_384) => {
                (&RSA_PSS_SHA384, &[&RSA_PSS_2048_8192_SHA384, &PSS384_MAX])
            }
            (RsaPadding::Pss, HashAlgorithm::Sha2_512) => {
                (&RSA_PSS_SHA512, &[&RSA_PSS_2048_8192_SHA512, &PSS512_MAX])
            }
            (RsaPadding::Pkcs1v15, HashAlgorithm::Sha2_256) => {
                (&RSA_PKCS1_SHA256, &[&RSA_PKCS1_2048_8192_SHA256])
            }
            (RsaPadding::Pkcs1v15, HashAlgorithm::Sha2_384) => {
                (&RSA_PKCS1_SHA384, &[&RSA_PKCS1_2048_8192_SHA384])
            }
            (RsaPadding::Pkcs1v15, HashAlgorithm::Sha2_512) => {
                (&RSA_PKCS1_SHA512, &[&RSA_PKCS1_2048_8192_SHA512])
            }
            (_, other) => {
                return Err(CryptoError::UnsupportedHash(format!(
                    "{} (RSA signatures take sha2-256, sha2-384 or sha2-512)",
                    other.as_str()
                )))
            }
        })
    }
}

/// Vault's `signature_algorithm` for RSA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RsaPadding {
    #[default]
    Pss,
    Pkcs1v15,
}

impl RsaPadding {
    pub fn parse(s: &str) -> Result<RsaPadding, CryptoError> {
        match s {
            "pss" => Ok(RsaPadding::Pss),
            "pkcs1v15" => Ok(RsaPadding::Pkcs1v15),
            other => Err(CryptoError::InvalidInput(format!(
                "unsupported signature_algorithm {other:?} (use pss or pkcs1v15)"
            ))),
        }
    }
}

/// How a signature is made or checked, beyond the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignOptions {
    pub hash: HashAlgorithm,
    /// The input already is the digest (Vault's `prehashed`).
    pub prehashed: bool,
    pub rsa_padding: RsaPadding,
}

impl From<HashAlgorithm> for SignOptions {
    fn from(hash: HashAlgorithm) -> Self {
        SignOptions {
            hash,
            prehashed: false,
            rsa_padding: RsaPadding::Pss,
        }
    }
}

/// What `export/:type/:name` hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    EncryptionKey,
    SigningKey,
    HmacKey,
    PublicKey,
}

impl ExportKind {
    pub fn parse(s: &str) -> Option<ExportKind> {
        match s {
            "encryption-key" => Some(ExportKind::EncryptionKey),
            "signing-key" => Some(ExportKind::SigningKey),
            "hmac-key" => Some(ExportKind::HmacKey),
            "public-key" => Some(ExportKind::PublicKey),
            _ => None,
        }
    }
}

/// A public key as Vault's `keys/:name` response shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Vault's `name` field: "ed25519", "P-256", "rsa-2048", ...
    pub name: &'static str,
    pub public_key: String,
}

/// The parsed form of an asymmetric key, built once per version.
enum Parsed {
    Symmetric,
    Ed25519(Ed25519KeyPair),
    Ecdsa(EcdsaKeyPair, Curve),
    Rsa(Box<(RsaKeyPair, OaepPrivateDecryptingKey)>),
    /// A version imported with only its public key: no private key object
    /// exists, so every signing, decryption and private-export path has
    /// nothing to work with (they match the variants above).
    PublicOnly(Box<PublicOnly>),
}

/// The public key of a public-key-only version.
struct PublicOnly {
    /// SubjectPublicKeyInfo DER as aws-lc marshals it: the stored form, and
    /// what a private key supplied later is compared with.
    spki: Vec<u8>,
    /// What verification takes: the raw 32 bytes (Ed25519), the
    /// uncompressed point (ECDSA), the PKCS#1 RSAPublicKey (RSA).
    raw: Vec<u8>,
    curve: Option<Curve>,
    /// RSA: the key prepared for OAEP encryption.
    rsa: Option<OaepPublicEncryptingKey>,
}

/// Material for one key version.
pub struct KeyMaterial {
    pub key_type: KeyType,
    /// AEAD types: the raw key; ed25519: the 32-byte RFC 8032 seed;
    /// ecdsa and rsa: a PKCS#8 v1 DER document; hmac: the HMAC key.
    pub secret: SecretBytes,
    /// Every version carries its own HMAC key, as Vault does, so `hmac/:name`
    /// works on any key type. For the `hmac` type it equals `secret`.
    pub hmac_key: SecretBytes,
    parsed: Parsed,
    /// AEAD types: the prepared key (`secret` with its key schedule).
    /// Boxed: aws-lc's contexts are large and inline.
    aead: Option<Box<LessSafeKey>>,
    /// `hmac_key` prepared for HMAC-SHA256, the default hash.
    hmac_sha256: Box<hmac::Key>,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

fn aead_key_len(alg: &'static AeadAlgorithm) -> usize {
    alg.key_len()
}

impl KeyMaterial {
    /// Generates a version. RSA-4096 takes seconds: callers run this on a
    /// blocking thread.
    pub fn generate(key_type: KeyType) -> Result<KeyMaterial, CryptoError> {
        let secret = if let Some(alg) = key_type.aead() {
            SecretBytes::new(std::mem::take(&mut *random_bytes(aead_key_len(alg))?))
        } else if let Some(curve) = key_type.curve() {
            // The rng argument is ignored by aws-lc-rs (it uses its own DRBG).
            let doc = EcdsaKeyPair::generate_pkcs8(curve.signing, &SystemRandom::new())
                .map_err(|_| CryptoError::KeyGeneration)?;
            // `doc` zeroizes its own buffer on drop.
            SecretBytes::from_slice(doc.as_ref())
        } else if let Some(size) = key_type.rsa_size() {
            let pair = RsaKeyPair::generate(size).map_err(|_| CryptoError::KeyGeneration)?;
            let doc: Pkcs8V1Der<'static> = pair.as_der().map_err(|_| CryptoError::KeyGeneration)?;
            SecretBytes::from_slice(doc.as_ref())
        } else {
            // Ed25519 and HMAC: any 32 bytes are a valid RFC 8032 seed or
            // HMAC key. The seed is what RFC 8032 vectors use.
            random_secret()?
        };
        let hmac_key = match key_type {
            KeyType::Hmac => secret.duplicate(),
            _ => random_secret()?,
        };
        Self::from_parts(key_type, secret, hmac_key)
    }

    /// Rebuilds a version from stored bytes, refusing anything that would not
    /// work for its type, so a corrupt record fails here and not mid-request.
    pub fn from_parts(
        key_type: KeyType,
        secret: SecretBytes,
        hmac_key: SecretBytes,
    ) -> Result<KeyMaterial, CryptoError> {
        let bad = |_| CryptoError::InvalidKeyMaterial;
        let parsed = if let Some(alg) = key_type.aead() {
            if secret.len() != aead_key_len(alg) {
                return Err(CryptoError::InvalidKeyMaterial);
            }
            Parsed::Symmetric
        } else if let Some(curve) = key_type.curve() {
            Parsed::Ecdsa(
                EcdsaKeyPair::from_pkcs8(curve.signing, secret.expose_secret()).map_err(bad)?,
                curve,
            )
        } else if let Some(size) = key_type.rsa_size() {
            let pair = RsaKeyPair::from_pkcs8(secret.expose_secret()).map_err(bad)?;
            if pair.public_modulus_len() != size.len() {
                return Err(CryptoError::InvalidKeyMaterial);
            }
            let dec = PrivateDecryptingKey::from_pkcs8(secret.expose_secret()).map_err(bad)?;
            let dec =
                OaepPrivateDecryptingKey::new(dec).map_err(|_| CryptoError::InvalidKeyMaterial)?;
            Parsed::Rsa(Box::new((pair, dec)))
        } else if key_type == KeyType::Ed25519 {
            if secret.len() != KEY_LEN {
                return Err(CryptoError::InvalidKeyMaterial);
            }
            Parsed::Ed25519(
                Ed25519KeyPair::from_seed_unchecked(secret.expose_secret()).map_err(bad)?,
            )
        } else {
            // HMAC takes keys of any length (RFC 2104); imported keys and the
            // RFC 4231 vectors are not 32 bytes. Empty means corruption.
            if secret.is_empty() {
                return Err(CryptoError::InvalidKeyMaterial);
            }
            Parsed::Symmetric
        };
        let hmac_ok = match key_type {
            KeyType::Hmac => secret.ct_eq(hmac_key.expose_secret()),
            _ => hmac_key.len() == KEY_LEN,
        };
        if !hmac_ok {
            return Err(CryptoError::InvalidKeyMaterial);
        }
        let aead = match key_type.aead() {
            Some(alg) => Some(Box::new(aead_key(alg, secret.expose_secret())?)),
            None => None,
        };
        let hmac_sha256 = Box::new(hmac::Key::new(hmac::HMAC_SHA256, hmac_key.expose_secret()));
        Ok(KeyMaterial {
            key_type,
            secret,
            hmac_key,
            parsed,
            aead,
            hmac_sha256,
        })
    }

    /// A public-key-only version (Vault's `keys/:name/import` with
    /// `public_key`) from a PEM SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`),
    /// checked against `key_type` (key kind, curve, modulus size) with an
    /// error that says what is wrong. The version gets a fresh HMAC key, as
    /// Vault gives it, used once the private key is supplied.
    pub fn public_only_from_pem(key_type: KeyType, pem: &str) -> Result<KeyMaterial, CryptoError> {
        if !key_type.supports_signing() {
            return Err(CryptoError::InvalidInput(format!(
                "key type {key_type} does not support public_key import (only ed25519, \
                 ecdsa-p256/p384/p521 and rsa-2048/3072/4096 keys have public keys)"
            )));
        }
        let der = public_key_pem_der(pem)?;
        let public = parse_public_only(key_type, &der)?;
        Self::with_public(key_type, public, random_secret()?)
    }

    /// Rebuilds a public-key-only version from its stored SubjectPublicKeyInfo,
    /// held to the checks of an import (a Transit backup is untrusted input).
    pub fn public_only(
        key_type: KeyType,
        spki: &[u8],
        hmac_key: SecretBytes,
    ) -> Result<KeyMaterial, CryptoError> {
        let public =
            parse_public_only(key_type, spki).map_err(|_| CryptoError::InvalidKeyMaterial)?;
        Self::with_public(key_type, public, hmac_key)
    }

    fn with_public(
        key_type: KeyType,
        public: PublicOnly,
        hmac_key: SecretBytes,
    ) -> Result<KeyMaterial, CryptoError> {
        if !key_type.supports_signing() || hmac_key.len() != KEY_LEN {
            return Err(CryptoError::InvalidKeyMaterial);
        }
        let hmac_sha256 = Box::new(hmac::Key::new(hmac::HMAC_SHA256, hmac_key.expose_secret()));
        Ok(KeyMaterial {
            key_type,
            secret: SecretBytes::new(Vec::new()),
            hmac_key,
            parsed: Parsed::PublicOnly(Box::new(public)),
            aead: None,
            hmac_sha256,
        })
    }

    /// The raw public key of a full RSA version (PKCS#1), for tests.
    #[cfg(test)]
    fn public_key_raw(&self) -> &[u8] {
        match &self.parsed {
            Parsed::Rsa(rsa) => rsa.0.public_key().as_ref(),
            _ => &[],
        }
    }

    /// Whether this version holds only a public key.
    pub fn is_public_only(&self) -> bool {
        matches!(self.parsed, Parsed::PublicOnly(_))
    }

    /// The SubjectPublicKeyInfo (DER, aws-lc's canonical encoding) of an
    /// asymmetric version, `None` for symmetric ones. Two versions hold the
    /// same public key exactly when these are equal.
    pub fn public_key_spki(&self) -> Result<Option<Vec<u8>>, CryptoError> {
        let (alg, raw): (&'static dyn VerificationAlgorithm, &[u8]) = match &self.parsed {
            Parsed::Symmetric => return Ok(None),
            Parsed::PublicOnly(p) => return Ok(Some(p.spki.clone())),
            Parsed::Ed25519(pair) => (&ED25519, pair.public_key().as_ref()),
            Parsed::Ecdsa(pair, curve) => (curve.verifying, pair.public_key().as_ref()),
            Parsed::Rsa(rsa) => (&RSA_PKCS1_2048_8192_SHA256, rsa.0.public_key().as_ref()),
        };
        canonical_spki(alg, raw).map(Some)
    }

    /// This public-key-only version completed with `private`, a full key of
    /// the same type whose public key must be this version's (Vault's
    /// `ImportPrivateKeyForVersion`: "key pair does not match" otherwise).
    /// The version keeps its HMAC key.
    pub fn with_private_key(&self, private: &KeyMaterial) -> Result<KeyMaterial, CryptoError> {
        if !self.is_public_only() || private.is_public_only() || private.key_type != self.key_type {
            return Err(CryptoError::InvalidInput(
                "a private key can only complete a public-key-only version of its own type".into(),
            ));
        }
        if private.public_key_spki()? != self.public_key_spki()? {
            return Err(CryptoError::InvalidInput(
                "cannot import key, key pair does not match: the private key's public key is \
                 not this version's public key"
                    .into(),
            ));
        }
        Self::from_parts(
            self.key_type,
            private.secret.duplicate(),
            self.hmac_key.duplicate(),
        )
    }

    /// A key derived for one `context` (Vault's derived keys, KDF
    /// `hkdf_sha256`): HKDF-SHA256 with an empty salt, the version's key as
    /// input keying material and the context as info. The HMAC key stays the
    /// version's own.
    pub fn derive(&self, context: &[u8]) -> Result<KeyMaterial, CryptoError> {
        self.refuse_public_only("key derivation")?;
        if !self.key_type.supports_derivation() {
            return Err(self.unsupported("key derivation"));
        }
        if context.is_empty() {
            return Err(CryptoError::InvalidInput(
                "missing 'context' for key derivation; the key was created using a derived key, \
                 which means additional, per-request information must be included in order to \
                 perform operations with the key"
                    .into(),
            ));
        }
        let len = match self.key_type.aead() {
            Some(alg) => aead_key_len(alg),
            None => KEY_LEN,
        };
        let derived = hkdf_sha256(self.secret.expose_secret(), context, len)?;
        Self::from_parts(self.key_type, derived, self.hmac_key.duplicate())
    }

    /// For asymmetric types, the public key as Vault shows it: ed25519 as
    /// base64 of the raw 32 bytes, ECDSA and RSA as a PEM SubjectPublicKeyInfo.
    pub fn public_key(&self) -> Result<Option<PublicKey>, CryptoError> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        Ok(match &self.parsed {
            Parsed::Symmetric => None,
            Parsed::Ed25519(pair) => Some(PublicKey {
                name: "ed25519",
                public_key: b64.encode(pair.public_key().as_ref()),
            }),
            Parsed::Ecdsa(pair, curve) => {
                let der = pair
                    .public_key()
                    .as_der()
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Some(PublicKey {
                    name: curve.name,
                    public_key: pem("PUBLIC KEY", der.as_ref()),
                })
            }
            Parsed::Rsa(rsa) => {
                let der = rsa
                    .0
                    .public_key()
                    .as_der()
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Some(PublicKey {
                    name: self.key_type.as_str(),
                    public_key: pem("PUBLIC KEY", der.as_ref()),
                })
            }
            // The same strings a full key of the type shows.
            Parsed::PublicOnly(p) => Some(match (self.key_type, &p.curve) {
                (KeyType::Ed25519, _) => PublicKey {
                    name: "ed25519",
                    public_key: b64.encode(&p.raw),
                },
                (_, Some(curve)) => PublicKey {
                    name: curve.name,
                    public_key: pem("PUBLIC KEY", &p.spki),
                },
                _ => PublicKey {
                    name: self.key_type.as_str(),
                    public_key: pem("PUBLIC KEY", &p.spki),
                },
            }),
        })
    }

    /// Encrypts with a fresh random nonce (AEAD types: nonce ‖ ct ‖ tag) or
    /// RSA-OAEP-SHA256 (the raw RSA ciphertext; RSA takes no associated data).
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if let Parsed::Rsa(rsa) = &self.parsed {
            if !aad.is_empty() {
                return Err(CryptoError::InvalidInput(
                    "associated_data is not supported with RSA keys".into(),
                ));
            }
            return rsa_oaep_encrypt(&rsa.0, plaintext);
        }
        if let Parsed::PublicOnly(p) = &self.parsed {
            let Some(key) = &p.rsa else {
                return Err(self.unsupported("encryption"));
            };
            if !aad.is_empty() {
                return Err(CryptoError::InvalidInput(
                    "associated_data is not supported with RSA keys".into(),
                ));
            }
            return rsa_oaep_encrypt_with(key, plaintext);
        }
        let key = self.prepared_aead("encryption")?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::RandomFailure)?;
        aead_seal_with(key, nonce, plaintext, aad)
    }

    /// Convergent encryption: the nonce is HMAC-SHA256 of the plaintext under
    /// a key derived (HKDF-SHA256) from the version's HMAC key and the
    /// context, so equal (plaintext, context) pairs give equal ciphertexts.
    pub fn encrypt_convergent(
        &self,
        plaintext: &[u8],
        aad: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let sealing_key = self.prepared_aead("convergent encryption")?;
        let nonce_key = hkdf_sha256(self.hmac_key.expose_secret(), context, KEY_LEN)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, nonce_key.expose_secret());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(aad);
        ctx.update(&(aad.len() as u64).to_be_bytes());
        ctx.update(plaintext);
        let tag = ctx.sign();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
        aead_seal_with(sealing_key, nonce, plaintext, aad)
    }

    /// One error for every failure (see [`CryptoError::DecryptionFailed`]).
    pub fn decrypt(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.refuse_public_only("decryption")?;
        if let Parsed::Rsa(_) = &self.parsed {
            if !aad.is_empty() {
                return Err(CryptoError::InvalidInput(
                    "associated_data is not supported with RSA keys".into(),
                ));
            }
            return self.rsa_oaep_decrypt_with(&OAEP_SHA256_MGF1SHA256, blob);
        }
        aead_open_with(self.prepared_aead("decryption")?, blob, aad)
    }

    /// RSA-OAEP decryption with `alg` and no label: Transit's decrypt
    /// (SHA-256) and Vault's key import (the `hash_function` asked for).
    pub fn rsa_oaep_decrypt_with(
        &self,
        alg: &'static OaepAlgorithm,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.refuse_public_only("decryption")?;
        let Parsed::Rsa(rsa) = &self.parsed else {
            return Err(self.unsupported("RSA-OAEP decryption"));
        };
        let dec = &rsa.1;
        let mut out = Zeroizing::new(vec![0u8; dec.min_output_size()]);
        let len = dec
            .decrypt(alg, blob, &mut out, None)
            .map_err(|_| CryptoError::DecryptionFailed)?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// RSA-OAEP decryption with SHA-224 for OAEP and MGF1 and no label
    /// (Vault's import `hash_function: SHA224`), which aws-lc-rs does not
    /// offer: aws-lc's EVP API through the `oaep-sha224` crate, on this
    /// version's PKCS#8 document. One error for every failure.
    pub fn rsa_oaep_sha224_decrypt(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.refuse_public_only("decryption")?;
        let Parsed::Rsa(_) = &self.parsed else {
            return Err(self.unsupported("RSA-OAEP decryption"));
        };
        oaep_sha224::decrypt(self.secret.expose_secret(), blob)
            .map_err(|_| CryptoError::DecryptionFailed)
    }

    /// The RSA modulus length in bytes (the size of an OAEP block), or
    /// `None` for other key types.
    pub fn rsa_modulus_len(&self) -> Option<usize> {
        match &self.parsed {
            Parsed::Rsa(rsa) => Some(rsa.0.public_modulus_len()),
            _ => None,
        }
    }

    /// ed25519 signs the raw input and ignores the hash, as Vault does.
    /// ECDSA signs the digest in ASN.1 DER; RSA uses PSS (salt length = hash
    /// length) or PKCS#1 v1.5.
    pub fn sign(&self, input: &[u8], opts: impl Into<SignOptions>) -> Result<Vec<u8>, CryptoError> {
        let opts = opts.into();
        match &self.parsed {
            Parsed::Ed25519(pair) => {
                refuse_prehashed_ed25519(opts)?;
                Ok(pair.sign(input).as_ref().to_vec())
            }
            Parsed::Ecdsa(pair, curve) => {
                let digest = fit_digest(&message_digest(input, opts)?, curve)?;
                let sig = pair
                    .sign_digest(&digest)
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Ok(sig.as_ref().to_vec())
            }
            Parsed::Rsa(rsa) => {
                let (encoding, _) = opts.hash.rsa(opts.rsa_padding)?;
                let pair = &rsa.0;
                let mut sig = vec![0u8; pair.public_modulus_len()];
                if opts.prehashed {
                    let digest = message_digest(input, opts)?;
                    pair.sign_digest(encoding, &digest, &mut sig)
                } else {
                    pair.sign(encoding, &SystemRandom::new(), input, &mut sig)
                }
                .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Ok(sig)
            }
            Parsed::PublicOnly(_) => Err(CryptoError::PublicKeyOnly { op: "signing" }),
            Parsed::Symmetric => Err(self.unsupported("signing")),
        }
    }

    /// `Ok(false)` for any signature that does not verify, malformed ones
    /// included; `Err` only when the type or options cannot verify at all.
    /// RSA-PSS accepts a salt of the hash length or the maximum length
    /// (Vault's "auto" signs with the maximum).
    pub fn verify(
        &self,
        input: &[u8],
        signature: &[u8],
        opts: impl Into<SignOptions>,
    ) -> Result<bool, CryptoError> {
        let public: &[u8] = match &self.parsed {
            Parsed::Ed25519(pair) => pair.public_key().as_ref(),
            Parsed::Ecdsa(pair, _) => pair.public_key().as_ref(),
            Parsed::Rsa(rsa) => rsa.0.public_key().as_ref(),
            Parsed::PublicOnly(p) => &p.raw,
            Parsed::Symmetric => return Err(self.unsupported("verification")),
        };
        verify_with_public_key(self.key_type, public, input, signature, opts)
    }

    /// Vault's `marshaling_algorithm: jws` changes ECDSA signatures from
    /// ASN.1 DER to the fixed-width `r ‖ s` of JWS (RFC 7518 §3.4); other
    /// types' signatures are the same bytes either way.
    pub fn signature_to_jws(&self, der: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self.ecdsa_curve() {
            Some(curve) => ecdsa_der_to_fixed(der, curve.scalar_len),
            None => Ok(der.to_vec()),
        }
    }

    /// The inverse of [`Self::signature_to_jws`]; `None` for a JWS signature
    /// of the wrong length (which then simply does not verify).
    pub fn signature_from_jws(&self, jws: &[u8]) -> Option<Vec<u8>> {
        match self.ecdsa_curve() {
            Some(curve) => ecdsa_fixed_to_der(jws, curve.scalar_len),
            None => Some(jws.to_vec()),
        }
    }

    fn ecdsa_curve(&self) -> Option<&Curve> {
        match &self.parsed {
            Parsed::Ecdsa(_, curve) => Some(curve),
            Parsed::PublicOnly(p) => p.curve.as_ref(),
            _ => None,
        }
    }

    /// HMAC with the version's HMAC key. A public-key-only version holds an
    /// HMAC key (as in Vault) but hsmgate does not use it until the version
    /// is complete: such a version is a verification key, nothing else.
    pub fn hmac(&self, input: &[u8], hash: HashAlgorithm) -> Result<Vec<u8>, CryptoError> {
        self.refuse_public_only("HMAC")?;
        self.with_hmac_key(hash, |key| hmac::sign(key, input).as_ref().to_vec())
    }

    /// Runs `f` with the prepared HMAC-SHA256 key, or a fresh key for
    /// another hash.
    fn with_hmac_key<T>(
        &self,
        hash: HashAlgorithm,
        f: impl FnOnce(&hmac::Key) -> T,
    ) -> Result<T, CryptoError> {
        if matches!(hash, HashAlgorithm::Sha2_256) {
            return Ok(f(&self.hmac_sha256));
        }
        let key = hmac::Key::new(hash.hmac_algorithm()?, self.hmac_key.expose_secret());
        Ok(f(&key))
    }

    /// Constant time: `hmac::verify` compares without early exit.
    pub fn verify_hmac(
        &self,
        input: &[u8],
        mac: &[u8],
        hash: HashAlgorithm,
    ) -> Result<bool, CryptoError> {
        self.refuse_public_only("HMAC")?;
        self.with_hmac_key(hash, |key| hmac::verify(key, input, mac).is_ok())
    }

    /// The key in Vault's export format. The returned string holds key
    /// material and is wiped on drop.
    pub fn export(&self, kind: ExportKind) -> Result<Zeroizing<String>, CryptoError> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let refuse = || self.unsupported("this export type");
        if kind != ExportKind::PublicKey {
            self.refuse_public_only("export of private or HMAC key material")?;
        }
        match kind {
            ExportKind::HmacKey => Ok(Zeroizing::new(b64.encode(self.hmac_key.expose_secret()))),
            ExportKind::PublicKey => match self.public_key()? {
                Some(pk) => Ok(Zeroizing::new(pk.public_key)),
                None => Err(refuse()),
            },
            ExportKind::EncryptionKey | ExportKind::SigningKey => match &self.parsed {
                Parsed::Symmetric
                    if kind == ExportKind::EncryptionKey && self.key_type.is_aead() =>
                {
                    Ok(Zeroizing::new(b64.encode(self.secret.expose_secret())))
                }
                // Vault exports ed25519 as Go's 64-byte private key: seed ‖ public.
                Parsed::Ed25519(pair) if kind == ExportKind::SigningKey => {
                    let mut raw = Zeroizing::new(self.secret.expose_secret().to_vec());
                    raw.extend_from_slice(pair.public_key().as_ref());
                    Ok(Zeroizing::new(b64.encode(&*raw)))
                }
                Parsed::Ecdsa(pair, _) if kind == ExportKind::SigningKey => {
                    let der = pair
                        .private_key()
                        .as_der()
                        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                    Ok(Zeroizing::new(pem("EC PRIVATE KEY", der.as_ref())))
                }
                // Vault exports RSA keys as PKCS#1 for both kinds.
                Parsed::Rsa(_) => {
                    let pkcs1 = pkcs8_private_key(self.secret.expose_secret())
                        .ok_or(CryptoError::InvalidKeyMaterial)?;
                    Ok(Zeroizing::new(pem("RSA PRIVATE KEY", pkcs1)))
                }
                _ => Err(refuse()),
            },
        }
    }

    fn refuse_public_only(&self, op: &'static str) -> Result<(), CryptoError> {
        if self.is_public_only() {
            return Err(CryptoError::PublicKeyOnly { op });
        }
        Ok(())
    }

    fn prepared_aead(&self, op: &'static str) -> Result<&LessSafeKey, CryptoError> {
        self.aead.as_deref().ok_or_else(|| self.unsupported(op))
    }

    fn unsupported(&self, op: &'static str) -> CryptoError {
        CryptoError::OperationNotSupported {
            op,
            key_type: self.key_type,
        }
    }
}

/// The one verification path, for a version's own public key and for bare
/// public keys (Wycheproof vectors come without private keys). `public` is
/// the raw 32 bytes (ed25519), the uncompressed point (ECDSA) or a PKCS#1
/// RSAPublicKey (RSA).
pub fn verify_with_public_key(
    key_type: KeyType,
    public: &[u8],
    input: &[u8],
    signature: &[u8],
    opts: impl Into<SignOptions>,
) -> Result<bool, CryptoError> {
    let opts = opts.into();
    if key_type == KeyType::Ed25519 {
        refuse_prehashed_ed25519(opts)?;
        return Ok(UnparsedPublicKey::new(&ED25519, public)
            .verify(input, signature)
            .is_ok());
    }
    if let Some(curve) = key_type.curve() {
        let digest = fit_digest(&message_digest(input, opts)?, &curve)?;
        return Ok(UnparsedPublicKey::new(curve.verifying, public)
            .verify_digest(&digest, signature)
            .is_ok());
    }
    if key_type.is_rsa() {
        let (_, params) = opts.hash.rsa(opts.rsa_padding)?;
        let digest = message_digest(input, opts)?;
        return Ok(params.iter().any(|p| {
            UnparsedPublicKey::new(*p, public)
                .verify_digest(&digest, signature)
                .is_ok()
        }));
    }
    Err(CryptoError::OperationNotSupported {
        op: "verification",
        key_type,
    })
}

fn refuse_prehashed_ed25519(opts: SignOptions) -> Result<(), CryptoError> {
    if opts.prehashed {
        return Err(CryptoError::InvalidInput(
            "prehashed input is not supported with ed25519 keys".into(),
        ));
    }
    Ok(())
}

/// The digest to sign: computed here, or (prehashed) the input itself,
/// which must then have the hash's length.
fn message_digest(input: &[u8], opts: SignOptions) -> Result<Digest, CryptoError> {
    let alg = opts.hash.digest_algorithm();
    if !opts.prehashed {
        return Ok(digest::digest(alg, input));
    }
    Digest::import_less_safe(input, alg).map_err(|_| {
        CryptoError::InvalidInput(format!(
            "prehashed input must be a {}-byte {} digest",
            alg.output_len(),
            opts.hash.as_str()
        ))
    })
}

/// ECDSA signs the leftmost min(N, hashlen) bits of a digest as an integer
/// (FIPS 186-4 §6.4). aws-lc-rs binds each curve's key to one digest, so any
/// other digest is fitted to that length: truncated on the left-most bytes
/// when longer, zero-padded on the left when shorter (the integer is the
/// same). All three curves have byte-aligned native lengths that are at most
/// the order's bit length, so this is exact; Wycheproof's cross-hash vectors
/// check it.
fn fit_digest(d: &Digest, curve: &Curve) -> Result<Digest, CryptoError> {
    let n = curve.native.output_len();
    let bytes = d.as_ref();
    let fitted: Vec<u8> = if bytes.len() >= n {
        bytes[..n].to_vec()
    } else {
        let mut v = vec![0u8; n - bytes.len()];
        v.extend_from_slice(bytes);
        v
    };
    Digest::import_less_safe(&fitted, curve.native).map_err(|_| CryptoError::InvalidKeyMaterial)
}

fn rsa_oaep_encrypt(pair: &RsaKeyPair, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let public = PublicEncryptingKey::from_der(
        pair.public_key()
            .as_der()
            .map_err(|_| CryptoError::InvalidKeyMaterial)?
            .as_ref(),
    )
    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    let key = OaepPublicEncryptingKey::new(public).map_err(|_| CryptoError::InvalidKeyMaterial)?;
    rsa_oaep_encrypt_with(&key, plaintext)
}

fn rsa_oaep_encrypt_with(
    key: &OaepPublicEncryptingKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let max = key.max_plaintext_size(&OAEP_SHA256_MGF1SHA256);
    if plaintext.len() > max {
        return Err(CryptoError::InvalidInput(format!(
            "plaintext too long for this RSA key: at most {max} bytes with OAEP-SHA256"
        )));
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let len = key
        .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
        .map_err(|_| CryptoError::InvalidKeyMaterial)?
        .len();
    out.truncate(len);
    Ok(out)
}

/// The largest `public_key` PEM accepted (an RSA-4096 SPKI is 800 bytes of PEM).
const MAX_PUBLIC_KEY_PEM: usize = 16 * 1024;

/// The DER of a `public_key` PEM: one `BEGIN PUBLIC KEY` block (RFC 7468
/// SubjectPublicKeyInfo) and nothing else but whitespace. Other labels get
/// an error naming what was sent instead (a private key above all).
fn public_key_pem_der(pem: &str) -> Result<Vec<u8>, CryptoError> {
    let bad = |why: &str| CryptoError::InvalidInput(format!("invalid public_key: {why}"));
    if pem.len() > MAX_PUBLIC_KEY_PEM {
        return Err(bad("too long for a public key"));
    }
    let text = pem.trim();
    let Some(rest) = text.strip_prefix("-----BEGIN ") else {
        return Err(bad(
            "not in PEM format (expected -----BEGIN PUBLIC KEY-----, a SubjectPublicKeyInfo)",
        ));
    };
    let Some((label, rest)) = rest.split_once("-----") else {
        return Err(bad("malformed PEM header"));
    };
    match label {
        "PUBLIC KEY" => {}
        l if l.contains("PRIVATE KEY") => {
            return Err(bad(
                "this is a private key, not a public key: send only the public key \
                 (BEGIN PUBLIC KEY), or import the private key wrapped, as ciphertext",
            ));
        }
        "RSA PUBLIC KEY" => {
            return Err(bad(
                "a PKCS#1 RSAPublicKey (BEGIN RSA PUBLIC KEY): send it as a \
                 SubjectPublicKeyInfo (BEGIN PUBLIC KEY, e.g. openssl rsa -RSAPublicKey_in -pubout)",
            ))
        }
        "CERTIFICATE" => {
            return Err(bad(
                "a certificate: send its public key (BEGIN PUBLIC KEY), e.g. from \
                 openssl x509 -pubkey -noout",
            ))
        }
        l => {
            let shown: String = l.chars().take(40).collect();
            return Err(bad(&format!(
                "unexpected PEM label {shown:?} (expected PUBLIC KEY)"
            )));
        }
    }
    let Some(body) = rest.strip_suffix("-----END PUBLIC KEY-----") else {
        return Err(bad(
            "one PEM block ending in -----END PUBLIC KEY-----, and nothing after it, expected",
        ));
    };
    if body.contains("-----") {
        return Err(bad("exactly one PEM block expected"));
    }
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| bad("the PEM body is not valid base64"))
}

/// DER of the algorithm OIDs (with tag and length) a public key may carry.
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
const DER_NULL: &[u8] = &[0x05, 0x00];

/// Reads one whole TLV (tag, length and contents) off the front of `input`.
fn der_element(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, body, rest) = der_tlv(input)?;
    let len = input.len() - rest.len();
    debug_assert!(len >= body.len());
    Some((&input[..len], rest))
}

/// A SubjectPublicKeyInfo checked against `key_type` (key kind, curve,
/// modulus size, point encoding), with an error that says what is wrong,
/// then validated by aws-lc (the ECDSA point on its curve, the RSA key's
/// modulus and exponent) and re-encoded canonically.
fn parse_public_only(key_type: KeyType, spki: &[u8]) -> Result<PublicOnly, CryptoError> {
    let bad = |why: String| CryptoError::InvalidInput(format!("invalid public_key: {why}"));
    let not_spki = || bad("not a DER SubjectPublicKeyInfo".into());
    let (0x30, body, rest) = der_tlv(spki).ok_or_else(not_spki)? else {
        return Err(not_spki());
    };
    if !rest.is_empty() {
        return Err(bad("trailing data after the SubjectPublicKeyInfo".into()));
    }
    let (0x30, alg, rest) = der_tlv(body).ok_or_else(not_spki)? else {
        return Err(not_spki());
    };
    let (0x03, bits, rest) = der_tlv(rest).ok_or_else(not_spki)? else {
        return Err(not_spki());
    };
    if !rest.is_empty() {
        return Err(not_spki());
    }
    let Some((&0, key)) = bits.split_first() else {
        return Err(not_spki());
    };
    let (oid, params) = der_element(alg).ok_or_else(not_spki)?;
    let kind = match oid {
        OID_RSA_ENCRYPTION => "an RSA",
        OID_EC_PUBLIC_KEY => "an ECDSA",
        OID_ED25519 => "an Ed25519",
        _ => "an unsupported kind of",
    };
    let wrong_kind = || bad(format!("this is {kind} public key, not a {key_type} key"));
    let curve = key_type.curve();
    let (alg, raw): (&'static dyn VerificationAlgorithm, &[u8]) = match key_type {
        KeyType::Ed25519 => {
            if oid != OID_ED25519 {
                return Err(wrong_kind());
            }
            if !params.is_empty() || key.len() != 32 {
                return Err(bad("a malformed Ed25519 public key".into()));
            }
            (&ED25519, key)
        }
        KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::EcdsaP521 => {
            let curve = curve.as_ref().ok_or_else(wrong_kind)?;
            if oid != OID_EC_PUBLIC_KEY {
                return Err(wrong_kind());
            }
            let named = match params {
                OID_P256 => "P-256",
                OID_P384 => "P-384",
                OID_P521 => "P-521",
                _ => "a curve hsmgate does not support (or explicit parameters)",
            };
            if named != curve.name {
                return Err(bad(format!(
                    "the public key is on {named}, but type {key_type} is {}",
                    curve.name
                )));
            }
            if key.first() != Some(&0x04) || key.len() != 1 + 2 * curve.scalar_len {
                return Err(bad(format!(
                    "the {} point must be uncompressed ({} bytes starting 0x04)",
                    curve.name,
                    1 + 2 * curve.scalar_len
                )));
            }
            (curve.verifying, key)
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            if oid != OID_RSA_ENCRYPTION {
                return Err(wrong_kind());
            }
            if params != DER_NULL {
                return Err(bad(
                    "rsaEncryption needs NULL parameters (RSA-PSS-only keys are not supported)"
                        .into(),
                ));
            }
            // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
            let pkcs1 = || -> Option<()> {
                let (0x30, ints, rest) = der_tlv(key)? else {
                    return None;
                };
                let (0x02, _, ints) = der_tlv(ints)? else {
                    return None;
                };
                let (0x02, _, ints) = der_tlv(ints)? else {
                    return None;
                };
                (rest.is_empty() && ints.is_empty()).then_some(())
            };
            pkcs1().ok_or_else(|| bad("a malformed RSA public key".into()))?;
            (&RSA_PKCS1_2048_8192_SHA256, key)
        }
        _ => return Err(wrong_kind()),
    };
    let canonical =
        canonical_spki(alg, raw).map_err(|_| bad(format!("not a valid {key_type} public key")))?;
    let rsa = match key_type.rsa_size() {
        Some(size) => {
            let public = PublicEncryptingKey::from_der(&canonical)
                .map_err(|_| bad(format!("not a valid {key_type} public key")))?;
            if public.key_size_bytes() != size.len() {
                return Err(bad(format!(
                    "the RSA modulus is {} bits, but type {key_type} is {} bits",
                    public.key_size_bits(),
                    size.len() * 8
                )));
            }
            Some(
                OaepPublicEncryptingKey::new(public)
                    .map_err(|_| bad(format!("not a valid {key_type} public key")))?,
            )
        }
        None => None,
    };
    Ok(PublicOnly {
        spki: canonical,
        raw: raw.to_vec(),
        curve,
        rsa,
    })
}

/// aws-lc's SubjectPublicKeyInfo for a public key in verification form
/// (raw Ed25519 key, uncompressed ECDSA point, PKCS#1 RSA key), validated
/// by aws-lc on the way.
fn canonical_spki(
    alg: &'static dyn VerificationAlgorithm,
    raw: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let parsed = ParsedPublicKey::new(alg, raw).map_err(|_| CryptoError::InvalidKeyMaterial)?;
    let der = parsed
        .as_der()
        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    Ok(der.as_ref().to_vec())
}

struct HkdfLen(usize);

impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869) with an empty salt.
pub fn hkdf_sha256(ikm: &[u8], info: &[u8], len: usize) -> Result<SecretBytes, CryptoError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(ikm);
    let info = [info];
    let okm = prk
        .expand(&info, HkdfLen(len))
        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    let mut out = vec![0u8; len];
    okm.fill(&mut out)
        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    Ok(SecretBytes::new(out))
}

/// Reads one DER TLV: (tag, contents, rest). Definite lengths only.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The `privateKey` OCTET STRING of a PKCS#8 PrivateKeyInfo: for RSA, the
/// PKCS#1 RSAPrivateKey.
fn pkcs8_private_key(pkcs8: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der_tlv(pkcs8)? else {
        return None;
    };
    let (0x02, _, rest) = der_tlv(body)? else {
        return None;
    };
    let (0x30, _, rest) = der_tlv(rest)? else {
        return None;
    };
    let (0x04, key, _) = der_tlv(rest)? else {
        return None;
    };
    Some(key)
}

fn ecdsa_der_to_fixed(der: &[u8], n: usize) -> Result<Vec<u8>, CryptoError> {
    let bad = || CryptoError::InvalidKeyMaterial;
    let (0x30, body, _) = der_tlv(der).ok_or_else(bad)? else {
        return Err(bad());
    };
    let mut out = Vec::with_capacity(2 * n);
    let mut rest = body;
    for _ in 0..2 {
        let (0x02, int, next) = der_tlv(rest).ok_or_else(bad)? else {
            return Err(bad());
        };
        let int = match int.iter().position(|b| *b != 0) {
            Some(i) => &int[i..],
            None => &[],
        };
        if int.len() > n {
            return Err(bad());
        }
        out.resize(out.len() + n - int.len(), 0);
        out.extend_from_slice(int);
        rest = next;
    }
    Ok(out)
}

fn ecdsa_fixed_to_der(fixed: &[u8], n: usize) -> Option<Vec<u8>> {
    if fixed.len() != 2 * n {
        return None;
    }
    let int = |v: &[u8]| {
        let v = match v.iter().position(|b| *b != 0) {
            Some(i) => &v[i..],
            None => &[0u8][..],
        };
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        der_len(&mut out, v.len() + pad as usize);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(&fixed[..n]), int(&fixed[n..])].concat();
    let mut out = vec![0x30];
    der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Some(out)
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

/// PEM the way Go's `pem.EncodeToMemory` writes it, which is what Vault returns.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for (i, c) in body.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            pem.push('\n');
        }
        pem.push(c);
    }
    pem.push_str(&format!("\n-----END {label}-----\n"));
    pem
}

fn aead_key(alg: &'static AeadAlgorithm, key: &[u8]) -> Result<LessSafeKey, CryptoError> {
    if key.len() != alg.key_len() {
        return Err(CryptoError::InvalidKeyMaterial);
    }
    let key = UnboundKey::new(alg, key).map_err(|_| CryptoError::InvalidKeyMaterial)?;
    Ok(LessSafeKey::new(key))
}

/// The one place AEAD sealing happens. Returns nonce ‖ ct ‖ tag.
/// The caller guarantees the nonce is never reused under `key`.
pub(crate) fn aead_seal(
    alg: &'static AeadAlgorithm,
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    aead_seal_with(&aead_key(alg, key)?, nonce, plaintext, aad)
}

/// Seals under a prepared key (see [`aead_seal`]).
fn aead_seal_with(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    // Zeroizing: until sealing succeeds the buffer holds plaintext.
    let mut out = Zeroizing::new(Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN));
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        // Only possible for inputs beyond the AEAD's length limit.
        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    out.extend_from_slice(tag.as_ref());
    Ok(std::mem::take(&mut *out))
}

pub(crate) fn aead_open(
    alg: &'static AeadAlgorithm,
    key: &[u8],
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    aead_open_with(&aead_key(alg, key)?, blob, aad)
}

fn aead_open_with(
    key: &LessSafeKey,
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::DecryptionFailed);
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::DecryptionFailed)?;
    let mut buf = Zeroizing::new(sealed.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::DecryptionFailed)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// AES-256-GCM, as the store seals records.
pub(crate) fn aes_gcm_seal_with_nonce(
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    aead_seal(&AES_256_GCM, key, nonce, plaintext, aad)
}

pub(crate) fn aes_gcm_open(
    key: &[u8],
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    aead_open(&AES_256_GCM, key, blob, aad)
}

pub fn random_bytes(n: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    fill_random(&mut buf)?;
    Ok(buf)
}

/// Fills `buf` from the system CSPRNG (aws-lc's).
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| CryptoError::RandomFailure)
}

fn random_secret() -> Result<SecretBytes, CryptoError> {
    let mut bytes = random_bytes(KEY_LEN)?;
    Ok(SecretBytes::new(std::mem::take(&mut *bytes)))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes, so the lengths match.
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// Vault's `transit/hash`.
pub fn hash(alg: HashAlgorithm, data: &[u8]) -> Vec<u8> {
    digest::digest(alg.digest_algorithm(), data)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vectors are valid hex")
    }

    fn secret(s: &str) -> SecretBytes {
        SecretBytes::new(h(s))
    }

    fn hmac_key() -> SecretBytes {
        SecretBytes::new(vec![0x11; 32])
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("PEM body is base64")
    }

    // RFC 8032 §7.1 TEST 1, 2 and 3: (seed, public key, message, signature).
    const ED25519_VECTORS: [(&str, &str, &str, &str); 3] = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac\
             18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];

    #[test]
    fn ed25519_rfc8032_known_answers() {
        for (seed, public, msg, sig) in ED25519_VECTORS {
            let key = KeyMaterial::from_parts(KeyType::Ed25519, secret(seed), hmac_key()).unwrap();
            let pk = key.public_key().unwrap().expect("ed25519 has a public key");
            assert_eq!(pk.name, "ed25519");
            assert_eq!(pk.public_key, b64(&h(public)));

            let (msg, sig) = (h(msg), h(sig));
            // The hash argument must not matter for ed25519.
            assert_eq!(key.sign(&msg, HashAlgorithm::Sha2_512).unwrap(), sig);
            assert!(key.verify(&msg, &sig, HashAlgorithm::Sha2_256).unwrap());

            // TEST 1's message is empty: "altering" it means adding a byte.
            let mut bad_msg = msg.clone();
            match bad_msg.first_mut() {
                Some(b) => *b ^= 0x01,
                None => bad_msg.push(0x00),
            }
            assert!(!key.verify(&bad_msg, &sig, HashAlgorithm::Sha2_256).unwrap());
            let mut bad_sig = sig.clone();
            bad_sig[10] ^= 0x01;
            assert!(!key.verify(&msg, &bad_sig, HashAlgorithm::Sha2_256).unwrap());
            assert!(!key
                .verify(&msg, &sig[..63], HashAlgorithm::Sha2_256)
                .unwrap());
        }
    }

    // McGrew–Viega GCM spec test cases 13–16 (AES-256):
    // (key, iv, plaintext, aad, ciphertext, tag).
    const K15: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    const P15: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                       1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
    const C15: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                       8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad";
    const GCM_VECTORS: [(&str, &str, &str, &str, &str, &str); 4] = [
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "",
            "",
            "",
            "530f8afbc74536b9a963b4f1c4cb738b",
        ),
        (
            "0000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000",
            "00000000000000000000000000000000",
            "",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            K15,
            "cafebabefacedbaddecaf888",
            P15,
            "",
            C15,
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            K15,
            "cafebabefacedbaddecaf888",
            // Test case 16 drops the last four bytes of 15's plaintext.
            P15.split_at(120).0,
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            C15.split_at(120).0,
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];

    #[test]
    fn aes_gcm_spec_known_answers() {
        for (key, iv, pt, aad, ct, tag) in GCM_VECTORS {
            let (key, pt, aad) = (h(key), h(pt), h(aad));
            let nonce: [u8; 12] = h(iv).try_into().expect("vector IVs are 96 bits");
            let expected = [nonce.to_vec(), h(ct), h(tag)].concat();

            let blob = aes_gcm_seal_with_nonce(&key, nonce, &pt, &aad).unwrap();
            assert_eq!(blob, expected);
            assert_eq!(*aes_gcm_open(&key, &blob, &aad).unwrap(), pt);

            let material =
                KeyMaterial::from_parts(KeyType::Aes256Gcm96, SecretBytes::new(key), hmac_key())
                    .unwrap();
            assert_eq!(*material.decrypt(&blob, &aad).unwrap(), pt);
        }
    }

    #[test]
    fn aes_gcm_rejects_tampering_with_one_error() {
        let key = KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap();
        let blob = key.encrypt(b"attack at dawn", b"ctx").unwrap();
        assert_eq!(*key.decrypt(&blob, b"ctx").unwrap(), b"attack at dawn");

        let mut bad_tag = blob.clone();
        *bad_tag.last_mut().unwrap() ^= 0x01; // blob is never empty: it holds a tag
        let mut bad_ct = blob.clone();
        bad_ct[NONCE_LEN] ^= 0x01;
        for (bad, aad) in [
            (&bad_tag[..], &b"ctx"[..]),
            (&bad_ct[..], &b"ctx"[..]),
            (&blob[..], &b"other"[..]),
            (&blob[..], &b""[..]),
            (&blob[..NONCE_LEN + TAG_LEN - 1], &b"ctx"[..]),
            (&blob[..5], &b"ctx"[..]),
            (&[][..], &b"ctx"[..]),
        ] {
            assert!(matches!(
                key.decrypt(bad, aad),
                Err(CryptoError::DecryptionFailed)
            ));
        }
    }

    #[test]
    fn encrypt_uses_a_fresh_nonce_each_time() {
        let key = KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap();
        let a = key.encrypt(b"same", b"").unwrap();
        let b = key.encrypt(b"same", b"").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_eq!(a.len(), NONCE_LEN + 4 + TAG_LEN);
    }

    #[test]
    fn aes_gcm_helpers_reject_wrong_key_lengths() {
        for len in [0, 16, 31, 33] {
            let key = vec![0u8; len];
            assert!(matches!(
                aes_gcm_seal_with_nonce(&key, [0; 12], b"x", b""),
                Err(CryptoError::InvalidKeyMaterial)
            ));
            assert!(matches!(
                aes_gcm_open(&key, &[0; 40], b""),
                Err(CryptoError::InvalidKeyMaterial)
            ));
        }
    }

    #[test]
    fn wrong_key_type_is_refused_with_a_clear_message() {
        let ec = KeyMaterial::generate(KeyType::EcdsaP256).unwrap();
        let err = ec.encrypt(b"x", b"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key type ecdsa-p256 does not support encryption"
        );
        let aes = KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap();
        assert!(matches!(
            aes.sign(b"x", HashAlgorithm::Sha2_256),
            Err(CryptoError::OperationNotSupported { op: "signing", .. })
        ));
        assert!(matches!(
            aes.verify(b"x", b"sig", HashAlgorithm::Sha2_256),
            Err(CryptoError::OperationNotSupported { .. })
        ));
        let mac = KeyMaterial::generate(KeyType::Hmac).unwrap();
        assert!(matches!(
            mac.decrypt(&[0; 40], b""),
            Err(CryptoError::OperationNotSupported {
                op: "decryption",
                ..
            })
        ));
    }

    // RFC 4231 test cases 1 and 2: (key, data, SHA-256, SHA-384, SHA-512).
    const HMAC_VECTORS: [(&str, &str, &str, &str, &str); 2] = [
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "4869205468657265",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c\
             faea9ea9076ede7f4af152e8b2fa9cb6",
            "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde\
             daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        ),
        (
            "4a656665",
            "7768617420646f2079612077616e7420666f72206e6f7468696e673f",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e\
             8e2240ca5e69e2c78b3239ecfab21649",
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554\
             9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        ),
    ];

    #[test]
    fn hmac_rfc4231_known_answers() {
        for (key, data, s256, s384, s512) in HMAC_VECTORS {
            let material =
                KeyMaterial::from_parts(KeyType::Hmac, secret(key), secret(key)).unwrap();
            let data = h(data);
            for (hash, want) in [
                (HashAlgorithm::Sha2_256, s256),
                (HashAlgorithm::Sha2_384, s384),
                (HashAlgorithm::Sha2_512, s512),
            ] {
                let mac = material.hmac(&data, hash).unwrap();
                assert_eq!(hex::encode(&mac), want);
                assert!(material.verify_hmac(&data, &mac, hash).unwrap());
                let mut bad = mac.clone();
                bad[0] ^= 0x01;
                assert!(!material.verify_hmac(&data, &bad, hash).unwrap());
                assert!(!material
                    .verify_hmac(&data, &mac[..mac.len() - 1], hash)
                    .unwrap());
            }
        }
    }

    #[test]
    fn ecdsa_p256_round_trip_and_pem() {
        let key = KeyMaterial::generate(KeyType::EcdsaP256).unwrap();
        let sig = key.sign(b"hello", HashAlgorithm::Sha2_256).unwrap();
        assert!(key.verify(b"hello", &sig, HashAlgorithm::Sha2_256).unwrap());
        assert!(!key.verify(b"hellp", &sig, HashAlgorithm::Sha2_256).unwrap());
        assert!(!key
            .verify(b"hello", b"not DER", HashAlgorithm::Sha2_256)
            .unwrap());
        // Other hashes are fitted to the curve (FIPS 186-4 §6.4) and checked
        // against aws-lc-rs's own verifier for that (curve, hash) pair.
        for (hash, alg) in [
            (
                HashAlgorithm::Sha2_384,
                &aws_lc_rs::signature::ECDSA_P256_SHA384_ASN1,
            ),
            (
                HashAlgorithm::Sha2_512,
                &aws_lc_rs::signature::ECDSA_P256_SHA512_ASN1,
            ),
        ] {
            let sig = key.sign(b"x", hash).unwrap();
            assert!(key.verify(b"x", &sig, hash).unwrap());
            assert!(!key.verify(b"x", &sig, HashAlgorithm::Sha2_256).unwrap());
            let der = pem_to_der(&key.public_key().unwrap().unwrap().public_key);
            let point = &der[der.len() - 65..];
            UnparsedPublicKey::new(alg, point)
                .verify(b"x", &sig)
                .expect("fitted-digest signature verifies natively");
        }

        let pk = key.public_key().unwrap().expect("ecdsa has a public key");
        assert_eq!(pk.name, "P-256");
        assert!(pk.public_key.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(pk.public_key.ends_with("\n-----END PUBLIC KEY-----\n"));
        assert!(pk.public_key.lines().all(|l| l.len() <= 64));
        let der = pem_to_der(&pk.public_key);
        assert_eq!(der.len(), 91, "P-256 SubjectPublicKeyInfo is 91 bytes");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &der)
            .verify(b"hello", &sig)
            .expect("signature verifies under the PEM public key");
    }

    /// DER-encodes an ECDSA (r, s) pair given as 32-byte big-endian values.
    fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
        let int = |v: &[u8]| {
            let pad = v[0] & 0x80 != 0;
            let mut out = vec![0x02, (v.len() + pad as usize) as u8];
            if pad {
                out.push(0);
            }
            out.extend_from_slice(v);
            out
        };
        let body = [int(r), int(s)].concat();
        [vec![0x30, body.len() as u8], body].concat()
    }

    #[test]
    fn ecdsa_p256_rfc6979_a25_verifies() {
        // RFC 6979 A.2.5: P-256 key, SHA-256, message "sample".
        let x = h("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721");
        let point = h(concat!(
            "04",
            "60fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6",
            "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299",
        ));
        let sig = der_signature(
            &h("efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716"),
            &h("f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8"),
        );
        let pkcs8 = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &x,
            &point,
        )
        .expect("RFC key pair is consistent")
        .to_pkcs8v1()
        .expect("a parsed key serializes");
        let key = KeyMaterial::from_parts(
            KeyType::EcdsaP256,
            SecretBytes::from_slice(pkcs8.as_ref()),
            hmac_key(),
        )
        .unwrap();

        let der = pem_to_der(&key.public_key().unwrap().unwrap().public_key);
        assert!(der.ends_with(&point), "SPKI carries the RFC public point");
        assert!(key
            .verify(b"sample", &sig, HashAlgorithm::Sha2_256)
            .unwrap());
        assert!(!key
            .verify(b"samplf", &sig, HashAlgorithm::Sha2_256)
            .unwrap());
    }

    #[test]
    fn generated_material_round_trips_through_from_parts() {
        for t in KeyType::ALL {
            let k = KeyMaterial::generate(t).unwrap();
            assert_eq!(k.hmac_key.len(), 32);
            if t == KeyType::Hmac {
                assert!(k.secret.ct_eq(k.hmac_key.expose_secret()));
            } else {
                assert!(!k.secret.ct_eq(k.hmac_key.expose_secret()));
            }
            let back = KeyMaterial::from_parts(t, k.secret.duplicate(), k.hmac_key.duplicate())
                .expect("generated material is valid");
            assert_eq!(back.public_key().unwrap(), k.public_key().unwrap());
            if t.supports_signing() {
                let sig = k.sign(b"m", HashAlgorithm::Sha2_256).unwrap();
                assert!(back.verify(b"m", &sig, HashAlgorithm::Sha2_256).unwrap());
            }
        }
    }

    #[test]
    fn from_parts_rejects_malformed_material() {
        let p384 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &SystemRandom::new())
                .unwrap();
        let ok_hmac = vec![0x11; 32];
        let cases = [
            (KeyType::Aes256Gcm96, vec![1; 31], ok_hmac.clone()),
            (KeyType::Aes256Gcm96, vec![1; 33], ok_hmac.clone()),
            (KeyType::Aes256Gcm96, vec![1; 32], vec![1; 16]),
            (KeyType::Ed25519, vec![1; 33], ok_hmac.clone()),
            (KeyType::Ed25519, vec![1; 64], ok_hmac.clone()),
            (
                KeyType::EcdsaP256,
                b"not a PKCS#8 document".to_vec(),
                ok_hmac.clone(),
            ),
            // Valid PKCS#8, wrong curve.
            (KeyType::EcdsaP256, p384.as_ref().to_vec(), ok_hmac.clone()),
            (KeyType::Hmac, vec![], vec![]),
            (KeyType::Hmac, vec![1; 32], vec![2; 32]),
        ];
        for (t, s, m) in cases {
            assert!(
                matches!(
                    KeyMaterial::from_parts(t, SecretBytes::new(s), SecretBytes::new(m)),
                    Err(CryptoError::InvalidKeyMaterial)
                ),
                "{t} accepted bad material"
            );
        }
    }

    #[test]
    fn debug_does_not_print_secrets() {
        let k = KeyMaterial::from_parts(
            KeyType::Aes256Gcm96,
            SecretBytes::new(vec![0xAB; 32]),
            SecretBytes::new(vec![0xCD; 32]),
        )
        .unwrap();
        let shown = format!("{k:?}");
        assert_eq!(shown, "KeyMaterial { key_type: Aes256Gcm96, .. }");
        for leak in ["171", "205", "ab", "AB", "cd"] {
            assert!(!shown.contains(leak));
        }
    }

    #[test]
    fn names_match_vault() {
        for t in KeyType::ALL {
            assert_eq!(KeyType::parse(t.as_str()).unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<KeyType>(&json).unwrap(), t);
        }
        assert!(
            matches!(KeyType::parse("rsa-1024"), Err(CryptoError::UnsupportedKeyType(s)) if s == "rsa-1024")
        );
        assert!(KeyType::Aes256Gcm96.supports_encryption() && !KeyType::Hmac.supports_encryption());
        assert!(
            KeyType::Ed25519.supports_derivation() && !KeyType::EcdsaP256.supports_derivation()
        );

        for (name, want) in [
            ("sha2-256", HashAlgorithm::Sha2_256),
            ("sha256", HashAlgorithm::Sha2_256),
            ("sha2-384", HashAlgorithm::Sha2_384),
            ("sha384", HashAlgorithm::Sha2_384),
            ("sha2-512", HashAlgorithm::Sha2_512),
            ("sha512", HashAlgorithm::Sha2_512),
        ] {
            assert_eq!(HashAlgorithm::parse(name).unwrap(), want);
            assert_eq!(HashAlgorithm::parse(want.as_str()).unwrap(), want);
        }
        assert!(matches!(
            HashAlgorithm::parse("md5"),
            Err(CryptoError::UnsupportedHash(_))
        ));
    }

    #[test]
    fn hkdf_rfc5869_case3_empty_salt_and_info() {
        let okm = hkdf_sha256(&[0x0b; 22], b"", 42).unwrap();
        assert_eq!(
            hex::encode(okm.expose_secret()),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn derivation_is_per_context_and_deterministic() {
        for t in [
            KeyType::Aes128Gcm96,
            KeyType::Chacha20Poly1305,
            KeyType::Ed25519,
        ] {
            let k = KeyMaterial::generate(t).unwrap();
            let a = k.derive(b"ctx-a").unwrap();
            assert!(a
                .secret
                .ct_eq(k.derive(b"ctx-a").unwrap().secret.expose_secret()));
            assert!(!a
                .secret
                .ct_eq(k.derive(b"ctx-b").unwrap().secret.expose_secret()));
            assert!(!a.secret.ct_eq(k.secret.expose_secret()));
            assert!(matches!(k.derive(b""), Err(CryptoError::InvalidInput(_))));
        }
        let ec = KeyMaterial::generate(KeyType::EcdsaP256).unwrap();
        assert!(ec.derive(b"x").is_err());

        let k = KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap();
        let c1 = k.encrypt_convergent(b"pt", b"", b"ctx").unwrap();
        assert_eq!(c1, k.encrypt_convergent(b"pt", b"", b"ctx").unwrap());
        assert_ne!(c1, k.encrypt_convergent(b"pt", b"", b"other").unwrap());
        assert_ne!(c1, k.encrypt_convergent(b"pt", b"aad", b"ctx").unwrap());
        assert_eq!(*k.decrypt(&c1, b"").unwrap(), b"pt");
    }

    #[test]
    fn rsa_oaep_pss_pkcs1_and_exports() {
        let k = KeyMaterial::generate(KeyType::Rsa2048).unwrap();
        let ct = k.encrypt(b"secret", b"").unwrap();
        assert_eq!(ct.len(), 256);
        assert_eq!(*k.decrypt(&ct, b"").unwrap(), b"secret");
        assert!(matches!(
            k.decrypt(&ct[1..], b""),
            Err(CryptoError::DecryptionFailed)
        ));
        assert!(k.encrypt(b"x", b"aad").is_err(), "RSA takes no AAD");
        assert!(k.encrypt(&[0u8; 191], b"").is_err(), "OAEP-SHA256 limit");
        for padding in [RsaPadding::Pss, RsaPadding::Pkcs1v15] {
            for hash in [
                HashAlgorithm::Sha2_256,
                HashAlgorithm::Sha2_384,
                HashAlgorithm::Sha2_512,
            ] {
                let opts = SignOptions {
                    hash,
                    prehashed: false,
                    rsa_padding: padding,
                };
                let sig = k.sign(b"m", opts).unwrap();
                assert!(k.verify(b"m", &sig, opts).unwrap());
                assert!(!k.verify(b"n", &sig, opts).unwrap());
                let pre = SignOptions {
                    prehashed: true,
                    ..opts
                };
                let d = hash_bytes(hash, b"m");
                assert!(k.verify(&d, &k.sign(&d, pre).unwrap(), pre).unwrap());
            }
        }
        assert!(k.sign(b"m", HashAlgorithm::Sha3_256).is_err());
        let pem = k.export(ExportKind::SigningKey).unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        let der = pem_to_der(&pem);
        assert_eq!(der[0], 0x30, "PKCS#1 RSAPrivateKey is a SEQUENCE");
        assert!(k
            .public_key()
            .unwrap()
            .unwrap()
            .public_key
            .contains("PUBLIC KEY"));
    }

    fn hash_bytes(h: HashAlgorithm, m: &[u8]) -> Vec<u8> {
        hash(h, m)
    }

    #[test]
    fn jws_ecdsa_round_trips_and_exports() {
        for (t, n) in [
            (KeyType::EcdsaP256, 64),
            (KeyType::EcdsaP384, 96),
            (KeyType::EcdsaP521, 132),
        ] {
            let k = KeyMaterial::generate(t).unwrap();
            for _ in 0..8 {
                let der = k.sign(b"m", HashAlgorithm::Sha2_256).unwrap();
                let jws = k.signature_to_jws(&der).unwrap();
                assert_eq!(jws.len(), n);
                assert_eq!(k.signature_from_jws(&jws).unwrap(), der, "{t}");
            }
            assert!(k.signature_from_jws(&[0; 10]).is_none());
            let pem = k.export(ExportKind::SigningKey).unwrap();
            assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
            assert!(k.export(ExportKind::EncryptionKey).is_err());
        }
        let ed = KeyMaterial::generate(KeyType::Ed25519).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(ed.export(ExportKind::SigningKey).unwrap().as_bytes())
            .unwrap();
        assert_eq!(&raw[..32], ed.secret.expose_secret());
        assert_eq!(
            b64(&raw[32..]),
            ed.public_key().unwrap().unwrap().public_key
        );
        let aes = KeyMaterial::generate(KeyType::Aes128Gcm96).unwrap();
        assert_eq!(aes.secret.len(), 16);
        assert!(aes.export(ExportKind::SigningKey).is_err());
    }

    #[test]
    fn sha256_and_random_bytes() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *random_bytes(32).unwrap());
    }

    /// A full key's public key as a `public_key` import sends it: PEM
    /// SubjectPublicKeyInfo (for ed25519 too).
    fn public_pem(m: &KeyMaterial) -> String {
        pem("PUBLIC KEY", &m.public_key_spki().unwrap().unwrap())
    }

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        der_len(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn public_only_versions_verify_and_encrypt_but_never_sign_decrypt_or_export() {
        for t in [
            KeyType::Ed25519,
            KeyType::EcdsaP256,
            KeyType::EcdsaP384,
            KeyType::EcdsaP521,
            KeyType::Rsa2048,
        ] {
            let full = KeyMaterial::generate(t).unwrap();
            let public = KeyMaterial::public_only_from_pem(t, &public_pem(&full))
                .unwrap_or_else(|e| panic!("{t}: {e}"));
            assert!(public.is_public_only() && !full.is_public_only());
            assert!(public.secret.is_empty(), "{t}: no private material");
            // Shown, exported and compared exactly as the full key's.
            assert_eq!(public.public_key().unwrap(), full.public_key().unwrap());
            assert_eq!(
                *public.export(ExportKind::PublicKey).unwrap(),
                *full.export(ExportKind::PublicKey).unwrap()
            );
            assert_eq!(
                public.public_key_spki().unwrap(),
                full.public_key_spki().unwrap()
            );
            // Verifies what the private key signed, and only that.
            let sig = full.sign(b"message", HashAlgorithm::Sha2_256).unwrap();
            assert!(public
                .verify(b"message", &sig, HashAlgorithm::Sha2_256)
                .unwrap());
            assert!(!public
                .verify(b"massage", &sig, HashAlgorithm::Sha2_256)
                .unwrap());
            let jws = full.signature_to_jws(&sig).unwrap();
            assert_eq!(public.signature_to_jws(&sig).unwrap(), jws, "{t}");
            assert_eq!(public.signature_from_jws(&jws).unwrap(), sig, "{t}");
            // Everything that needs the private key (or the HMAC key) fails,
            // naming why.
            let refused = |r: Result<(), CryptoError>, what: &str| match r {
                Err(CryptoError::PublicKeyOnly { .. }) => {}
                other => panic!("{t}: {what}: {other:?}"),
            };
            refused(public.sign(b"m", HashAlgorithm::Sha2_256).map(drop), "sign");
            refused(public.hmac(b"m", HashAlgorithm::Sha2_256).map(drop), "hmac");
            refused(
                public
                    .verify_hmac(b"m", &[0; 32], HashAlgorithm::Sha2_256)
                    .map(drop),
                "verify_hmac",
            );
            for kind in [
                ExportKind::SigningKey,
                ExportKind::EncryptionKey,
                ExportKind::HmacKey,
            ] {
                refused(public.export(kind).map(drop), "export");
            }
            refused(public.derive(b"ctx").map(drop), "derive");
            refused(public.decrypt(&[0; 256], b"").map(drop), "decrypt");
            refused(
                public
                    .rsa_oaep_decrypt_with(&OAEP_SHA256_MGF1SHA256, &[0; 256])
                    .map(drop),
                "rsa_oaep_decrypt_with",
            );
            refused(
                public.rsa_oaep_sha224_decrypt(&[0; 256]).map(drop),
                "rsa_oaep_sha224_decrypt",
            );
            let msg = public
                .sign(b"m", HashAlgorithm::Sha2_256)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("holds only a public key (imported with public_key)"),
                "{msg}"
            );
            if t.is_rsa() {
                let ct = public.encrypt(b"for the key holder", b"").unwrap();
                assert_eq!(&*full.decrypt(&ct, b"").unwrap(), b"for the key holder");
                assert!(public.encrypt(b"x", b"aad").is_err());
            } else {
                assert!(public.encrypt(b"x", b"").is_err());
            }
            // Stored form: the canonical SPKI, read back as itself only.
            let spki = public.public_key_spki().unwrap().unwrap();
            let back = KeyMaterial::public_only(t, &spki, public.hmac_key.duplicate()).unwrap();
            assert!(back
                .verify(b"message", &sig, HashAlgorithm::Sha2_256)
                .unwrap());
            assert!(KeyMaterial::public_only(t, &spki[1..], hmac_key()).is_err());
            assert!(KeyMaterial::public_only(t, &spki, SecretBytes::new(vec![1; 5])).is_err());
            // The matching private key completes the version (keeping its
            // HMAC key); any other key is refused.
            let done = public.with_private_key(&full).unwrap();
            assert!(!done.is_public_only());
            assert_eq!(
                done.hmac_key.expose_secret(),
                public.hmac_key.expose_secret()
            );
            let sig2 = done.sign(b"now", HashAlgorithm::Sha2_256).unwrap();
            assert!(public
                .verify(b"now", &sig2, HashAlgorithm::Sha2_256)
                .unwrap());
            let other = KeyMaterial::generate(t).unwrap();
            let err = public.with_private_key(&other).unwrap_err();
            assert!(err.to_string().contains("does not match"), "{t}: {err}");
            assert!(public.with_private_key(&public).is_err());
            assert!(full.with_private_key(&full).is_err());
        }
    }

    #[test]
    fn public_key_imports_are_checked_against_the_type() {
        let p256 = KeyMaterial::generate(KeyType::EcdsaP256).unwrap();
        let rsa = KeyMaterial::generate(KeyType::Rsa2048).unwrap();
        let ed = KeyMaterial::generate(KeyType::Ed25519).unwrap();
        let err = |t: KeyType, pem: &str| {
            KeyMaterial::public_only_from_pem(t, pem)
                .map(drop)
                .unwrap_err()
                .to_string()
        };
        let contains = |msg: String, want: &str| {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        };
        contains(err(KeyType::EcdsaP384, &public_pem(&p256)), "on P-256");
        contains(
            err(KeyType::EcdsaP521, &public_pem(&p256)),
            "type ecdsa-p521 is P-521",
        );
        contains(
            err(KeyType::Rsa2048, &public_pem(&p256)),
            "an ECDSA public key",
        );
        contains(
            err(KeyType::Ed25519, &public_pem(&rsa)),
            "an RSA public key",
        );
        contains(
            err(KeyType::EcdsaP256, &public_pem(&ed)),
            "an Ed25519 public key",
        );
        contains(
            err(KeyType::Rsa3072, &public_pem(&rsa)),
            "modulus is 2048 bits, but type rsa-3072 is 3072 bits",
        );
        contains(
            err(KeyType::Aes256Gcm96, &public_pem(&rsa)),
            "does not support public_key import",
        );
        contains(err(KeyType::Hmac, &public_pem(&rsa)), "does not support");
        // Not PEM, bad PEM, the wrong PEM.
        let pkcs8 = pem("PRIVATE KEY", p256.secret.expose_secret());
        contains(err(KeyType::EcdsaP256, &pkcs8), "this is a private key");
        contains(
            err(
                KeyType::EcdsaP256,
                &pkcs8.replace("PRIVATE KEY", "EC PRIVATE KEY"),
            ),
            "private key",
        );
        contains(
            err(
                KeyType::Rsa2048,
                &pem("RSA PUBLIC KEY", rsa.public_key_raw()),
            ),
            "PKCS#1",
        );
        contains(
            err(KeyType::Rsa2048, &pem("CERTIFICATE", b"x")),
            "certificate",
        );
        contains(
            err(KeyType::Rsa2048, &pem("X", b"x")),
            "unexpected PEM label",
        );
        // A private key's DER under a PUBLIC KEY label is no SPKI.
        contains(
            err(
                KeyType::EcdsaP256,
                &pem("PUBLIC KEY", p256.secret.expose_secret()),
            ),
            "invalid public_key",
        );
        for garbage in [
            "",
            "hello",
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
        ] {
            contains(err(KeyType::Rsa2048, garbage), "invalid public_key");
        }
        let good = public_pem(&rsa);
        assert!(KeyMaterial::public_only_from_pem(KeyType::Rsa2048, &good).is_ok());
        assert!(
            KeyMaterial::public_only_from_pem(KeyType::Rsa2048, &format!("\n  {good}\n")).is_ok(),
            "surrounding whitespace is fine"
        );
        contains(
            err(KeyType::Rsa2048, &format!("{good}{good}")),
            "exactly one PEM block",
        );
        contains(
            err(KeyType::Rsa2048, &format!("{good}junk")),
            "nothing after it",
        );
        contains(
            err(KeyType::Rsa2048, &"A".repeat(MAX_PUBLIC_KEY_PEM + 1)),
            "too long",
        );
        // DER-level damage: trailing bytes, a truncated key, a compressed or
        // off-curve point, RSA without its NULL parameters.
        let spki = p256.public_key_spki().unwrap().unwrap();
        let mut trailing = spki.clone();
        trailing.push(0);
        contains(
            err(KeyType::EcdsaP256, &pem("PUBLIC KEY", &trailing)),
            "trailing",
        );
        contains(
            err(
                KeyType::EcdsaP256,
                &pem("PUBLIC KEY", &spki[..spki.len() - 1]),
            ),
            "invalid public_key",
        );
        let (_, body, _) = der_tlv(&spki).unwrap();
        let (alg, bits) = der_element(body).unwrap();
        let (_, bits, _) = der_tlv(bits).unwrap();
        let point = &bits[1..];
        let mut compressed = vec![0, 0x02 | (point[64] & 1)];
        compressed.extend_from_slice(&point[1..33]);
        let spki_c = tlv(0x30, &[alg, &tlv(0x03, &compressed)].concat());
        contains(
            err(KeyType::EcdsaP256, &pem("PUBLIC KEY", &spki_c)),
            "uncompressed",
        );
        let mut off = bits.to_vec();
        off[64] ^= 1;
        let spki_off = tlv(0x30, &[alg, &tlv(0x03, &off)].concat());
        contains(
            err(KeyType::EcdsaP256, &pem("PUBLIC KEY", &spki_off)),
            "not a valid ecdsa-p256 public key",
        );
        let rsa_spki = rsa.public_key_spki().unwrap().unwrap();
        let (_, body, _) = der_tlv(&rsa_spki).unwrap();
        let (_, bits) = der_element(body).unwrap();
        let no_null_alg = tlv(0x30, OID_RSA_ENCRYPTION);
        let spki_nn = tlv(0x30, &[&no_null_alg[..], bits].concat());
        contains(
            err(KeyType::Rsa2048, &pem("PUBLIC KEY", &spki_nn)),
            "NULL parameters",
        );
    }
}
