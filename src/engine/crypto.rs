//! Key types and the cryptographic operations the engine runs on them.
//!
//! This module knows nothing of storage or HTTP: it turns key material into
//! ciphertexts, signatures and MACs and back. Every primitive comes from
//! aws-lc-rs; AES-GCM sealing happens in exactly one function,
//! [`aes_gcm_seal_with_nonce`], so the known-answer tests cover the path the
//! engine and the store really use.
use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING, ED25519,
};
use aws_lc_rs::{digest, hmac};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::engine::secret::SecretBytes;

/// AES-256 key length, also the length of every generated HMAC key and seed.
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("unknown key type \"{0}\" (supported: aes256-gcm96, ed25519, ecdsa-p256, hmac)")]
    UnsupportedKeyType(String),
    #[error("unsupported hash algorithm \"{0}\"")]
    UnsupportedHash(String),
    #[error("key type {key_type} does not support {op}")]
    OperationNotSupported { op: &'static str, key_type: KeyType },
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyType {
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "hmac")]
    Hmac,
}

impl KeyType {
    pub const ALL: [KeyType; 4] = [
        KeyType::Aes256Gcm96,
        KeyType::Ed25519,
        KeyType::EcdsaP256,
        KeyType::Hmac,
    ];

    /// The name Vault uses on the wire and in key listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyType::Aes256Gcm96 => "aes256-gcm96",
            KeyType::Ed25519 => "ed25519",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Hmac => "hmac",
        }
    }

    pub fn parse(s: &str) -> Result<KeyType, CryptoError> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| CryptoError::UnsupportedKeyType(s.to_owned()))
    }

    pub fn supports_encryption(&self) -> bool {
        matches!(self, KeyType::Aes256Gcm96)
    }

    pub fn supports_signing(&self) -> bool {
        matches!(self, KeyType::Ed25519 | KeyType::EcdsaP256)
    }

    /// Reported in key metadata the way Vault reports it; derivation itself
    /// is not implemented here.
    pub fn supports_derivation(&self) -> bool {
        matches!(self, KeyType::Aes256Gcm96 | KeyType::Ed25519)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha2_256,
    Sha2_384,
    Sha2_512,
}

impl HashAlgorithm {
    /// Vault's names, plus the short forms its `hmac` path also accepts.
    pub fn parse(s: &str) -> Result<HashAlgorithm, CryptoError> {
        match s {
            "sha2-256" | "sha256" => Ok(HashAlgorithm::Sha2_256),
            "sha2-384" | "sha384" => Ok(HashAlgorithm::Sha2_384),
            "sha2-512" | "sha512" => Ok(HashAlgorithm::Sha2_512),
            other => Err(CryptoError::UnsupportedHash(other.to_owned())),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            HashAlgorithm::Sha2_256 => "sha2-256",
            HashAlgorithm::Sha2_384 => "sha2-384",
            HashAlgorithm::Sha2_512 => "sha2-512",
        }
    }

    fn hmac_algorithm(self) -> hmac::Algorithm {
        match self {
            HashAlgorithm::Sha2_256 => hmac::HMAC_SHA256,
            HashAlgorithm::Sha2_384 => hmac::HMAC_SHA384,
            HashAlgorithm::Sha2_512 => hmac::HMAC_SHA512,
        }
    }
}

/// A public key as Vault's `keys/:name` response shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Vault's `name` field: "ed25519" or "P-256".
    pub name: &'static str,
    pub public_key: String,
}

/// Material for one key version.
pub struct KeyMaterial {
    pub key_type: KeyType,
    /// aes256-gcm96: 32-byte key; ed25519: the 32-byte RFC 8032 seed;
    /// ecdsa-p256: PKCS#8 v1 DER document; hmac: the HMAC key.
    pub secret: SecretBytes,
    /// Every version carries its own HMAC key, as Vault does, so `hmac/:name`
    /// works on any key type. For the `hmac` type it equals `secret`.
    pub hmac_key: SecretBytes,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl KeyMaterial {
    pub fn generate(key_type: KeyType) -> Result<KeyMaterial, CryptoError> {
        let secret = match key_type {
            // Any 32 bytes are a valid AES key, HMAC key or RFC 8032 seed.
            // Storing the Ed25519 seed rather than PKCS#8 keeps it in the
            // form RFC 8032 vectors and Vault's raw export use.
            KeyType::Aes256Gcm96 | KeyType::Ed25519 | KeyType::Hmac => random_secret()?,
            KeyType::EcdsaP256 => {
                // The rng argument is ignored by aws-lc-rs (it uses its own
                // DRBG), but the signature wants one.
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_ASN1_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| CryptoError::KeyGeneration)?;
                // `doc` zeroizes its own buffer on drop.
                SecretBytes::from_slice(doc.as_ref())
            }
        };
        let hmac_key = match key_type {
            KeyType::Hmac => secret.duplicate(),
            _ => random_secret()?,
        };
        Ok(KeyMaterial {
            key_type,
            secret,
            hmac_key,
        })
    }

    /// Rebuilds a version from stored bytes, refusing anything that would not
    /// work for its type, so a corrupt record fails here and not mid-request.
    pub fn from_parts(
        key_type: KeyType,
        secret: SecretBytes,
        hmac_key: SecretBytes,
    ) -> Result<KeyMaterial, CryptoError> {
        let secret_ok = match key_type {
            KeyType::Aes256Gcm96 => secret.len() == KEY_LEN,
            KeyType::Ed25519 => {
                secret.len() == KEY_LEN
                    && Ed25519KeyPair::from_seed_unchecked(secret.expose_secret()).is_ok()
            }
            KeyType::EcdsaP256 => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, secret.expose_secret())
                    .is_ok()
            }
            // HMAC takes keys of any length (RFC 2104); imported keys and the
            // RFC 4231 vectors are not 32 bytes. Empty means corruption.
            KeyType::Hmac => !secret.is_empty(),
        };
        let hmac_ok = match key_type {
            KeyType::Hmac => secret.ct_eq(hmac_key.expose_secret()),
            _ => hmac_key.len() == KEY_LEN,
        };
        if !(secret_ok && hmac_ok) {
            return Err(CryptoError::InvalidKeyMaterial);
        }
        Ok(KeyMaterial {
            key_type,
            secret,
            hmac_key,
        })
    }

    /// For asymmetric types, the public key as Vault shows it: ed25519 as
    /// base64 of the raw 32 bytes, ecdsa-p256 as a PEM SubjectPublicKeyInfo.
    pub fn public_key(&self) -> Result<Option<PublicKey>, CryptoError> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        match self.key_type {
            KeyType::Ed25519 => Ok(Some(PublicKey {
                name: "ed25519",
                public_key: b64.encode(self.ed25519()?.public_key().as_ref()),
            })),
            KeyType::EcdsaP256 => {
                let der = self
                    .ecdsa()?
                    .public_key()
                    .as_der()
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Ok(Some(PublicKey {
                    name: "P-256",
                    public_key: pem_public_key(der.as_ref()),
                }))
            }
            KeyType::Aes256Gcm96 | KeyType::Hmac => Ok(None),
        }
    }

    /// AES-256-GCM under a fresh random 96-bit nonce; returns
    /// nonce ‖ ciphertext ‖ tag, the layout Vault puts inside `vault:vN:`.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.require(self.key_type.supports_encryption(), "encryption")?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::RandomFailure)?;
        aes_gcm_seal_with_nonce(self.secret.expose_secret(), nonce, plaintext, aad)
    }

    pub fn decrypt(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.require(self.key_type.supports_encryption(), "decryption")?;
        aes_gcm_open(self.secret.expose_secret(), blob, aad)
    }

    /// ed25519 signs the raw input and ignores `hash`, as Vault does.
    /// ecdsa-p256 signs SHA-256(input) in ASN.1 DER; aws-lc-rs offers no
    /// P-256 signing with another digest, so other hashes are refused.
    pub fn sign(&self, input: &[u8], hash: HashAlgorithm) -> Result<Vec<u8>, CryptoError> {
        match self.key_type {
            KeyType::Ed25519 => Ok(self.ed25519()?.sign(input).as_ref().to_vec()),
            KeyType::EcdsaP256 => {
                ecdsa_hash_supported(hash)?;
                // The rng argument is ignored by aws-lc-rs.
                let sig = self
                    .ecdsa()?
                    .sign(&SystemRandom::new(), input)
                    .map_err(|_| CryptoError::InvalidKeyMaterial)?;
                Ok(sig.as_ref().to_vec())
            }
            KeyType::Aes256Gcm96 | KeyType::Hmac => Err(self.unsupported("signing")),
        }
    }

    /// `Ok(false)` for any signature that does not verify, malformed ones
    /// included; `Err` only when the type or hash cannot verify at all.
    pub fn verify(
        &self,
        input: &[u8],
        signature: &[u8],
        hash: HashAlgorithm,
    ) -> Result<bool, CryptoError> {
        let valid = match self.key_type {
            KeyType::Ed25519 => {
                let pair = self.ed25519()?;
                UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref())
                    .verify(input, signature)
                    .is_ok()
            }
            KeyType::EcdsaP256 => {
                // Same hashes as `sign`, so a caller never gets a signature
                // it could not also have produced here.
                ecdsa_hash_supported(hash)?;
                let pair = self.ecdsa()?;
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref())
                    .verify(input, signature)
                    .is_ok()
            }
            KeyType::Aes256Gcm96 | KeyType::Hmac => return Err(self.unsupported("verification")),
        };
        Ok(valid)
    }

    pub fn hmac(&self, input: &[u8], hash: HashAlgorithm) -> Vec<u8> {
        let key = hmac::Key::new(hash.hmac_algorithm(), self.hmac_key.expose_secret());
        hmac::sign(&key, input).as_ref().to_vec()
    }

    /// Constant time: `hmac::verify` compares without early exit.
    pub fn verify_hmac(&self, input: &[u8], mac: &[u8], hash: HashAlgorithm) -> bool {
        let key = hmac::Key::new(hash.hmac_algorithm(), self.hmac_key.expose_secret());
        hmac::verify(&key, input, mac).is_ok()
    }

    fn require(&self, supported: bool, op: &'static str) -> Result<(), CryptoError> {
        if supported {
            Ok(())
        } else {
            Err(self.unsupported(op))
        }
    }

    fn unsupported(&self, op: &'static str) -> CryptoError {
        CryptoError::OperationNotSupported {
            op,
            key_type: self.key_type,
        }
    }

    // The fields are public, so material may not have passed `from_parts`:
    // parsing failures are errors here, never panics.
    fn ed25519(&self) -> Result<Ed25519KeyPair, CryptoError> {
        if self.secret.len() != KEY_LEN {
            return Err(CryptoError::InvalidKeyMaterial);
        }
        Ed25519KeyPair::from_seed_unchecked(self.secret.expose_secret())
            .map_err(|_| CryptoError::InvalidKeyMaterial)
    }

    fn ecdsa(&self) -> Result<EcdsaKeyPair, CryptoError> {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, self.secret.expose_secret())
            .map_err(|_| CryptoError::InvalidKeyMaterial)
    }
}

fn ecdsa_hash_supported(hash: HashAlgorithm) -> Result<(), CryptoError> {
    match hash {
        HashAlgorithm::Sha2_256 => Ok(()),
        other => Err(CryptoError::UnsupportedHash(other.as_str().to_owned())),
    }
}

/// PEM the way Go's `pem.EncodeToMemory` writes it, which is what Vault returns.
fn pem_public_key(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for (i, c) in body.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            pem.push('\n');
        }
        pem.push(c);
    }
    pem.push_str("\n-----END PUBLIC KEY-----\n");
    pem
}

fn aes_key(key: &[u8]) -> Result<LessSafeKey, CryptoError> {
    if key.len() != KEY_LEN {
        return Err(CryptoError::InvalidKeyMaterial);
    }
    let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError::InvalidKeyMaterial)?;
    Ok(LessSafeKey::new(key))
}

/// The one place AES-256-GCM sealing happens. Returns nonce ‖ ct ‖ tag.
/// The caller guarantees the nonce is never reused under `key`.
pub(crate) fn aes_gcm_seal_with_nonce(
    key: &[u8],
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = aes_key(key)?;
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
        // Only possible for inputs beyond GCM's 64 GiB limit.
        .map_err(|_| CryptoError::InvalidKeyMaterial)?;
    out.extend_from_slice(tag.as_ref());
    Ok(std::mem::take(&mut *out))
}

pub(crate) fn aes_gcm_open(
    key: &[u8],
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let key = aes_key(key)?;
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

pub fn random_bytes(n: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| CryptoError::RandomFailure)?;
    Ok(buf)
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
                let mac = material.hmac(&data, hash);
                assert_eq!(hex::encode(&mac), want);
                assert!(material.verify_hmac(&data, &mac, hash));
                let mut bad = mac.clone();
                bad[0] ^= 0x01;
                assert!(!material.verify_hmac(&data, &bad, hash));
                assert!(!material.verify_hmac(&data, &mac[..mac.len() - 1], hash));
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
        for hash in [HashAlgorithm::Sha2_384, HashAlgorithm::Sha2_512] {
            assert!(matches!(
                key.sign(b"x", hash),
                Err(CryptoError::UnsupportedHash(_))
            ));
            assert!(matches!(
                key.verify(b"x", &sig, hash),
                Err(CryptoError::UnsupportedHash(_))
            ));
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
            matches!(KeyType::parse("rsa-2048"), Err(CryptoError::UnsupportedKeyType(s)) if s == "rsa-2048")
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
    fn sha256_and_random_bytes() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *random_bytes(32).unwrap());
    }
}
