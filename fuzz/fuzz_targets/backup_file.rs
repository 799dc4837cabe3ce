//! The backup-file reader (`engine::backup::open`), which restore runs on a
//! file an operator hands it.
//!
//! Input: first byte picks the mode.
//! - 0: the rest is a file: it must be refused (nobody without the pinned
//!   signing key produces an acceptable file), without a panic.
//! - 1: the rest is signed with the pinned key (a stolen signing key, or a
//!   bug in our own writer): everything after the signature check must
//!   refuse or accept cleanly, never panic.
//! - 2: the rest becomes key-ring records; write → open must round-trip
//!   them exactly, and the same file with one byte flipped (position from
//!   the input) must be refused.
#![no_main]
use std::sync::OnceLock;

use aws_lc_rs::signature::Ed25519KeyPair;
use hsmgate::engine::backup::{keygen, open, write, Contents, NewKeys};
use hsmgate::engine::store::UserRecord;
use hsmgate::engine::Role;
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fn keys() -> &'static (NewKeys, Ed25519KeyPair) {
    static KEYS: OnceLock<(NewKeys, Ed25519KeyPair)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let k = keygen().expect("keygen");
        let signer = Ed25519KeyPair::from_pkcs8(&k.signer_pkcs8).expect("signer");
        (k, signer)
    })
}

fn admin() -> UserRecord {
    UserRecord {
        username: "admin".into(),
        role: Role::CryptoOfficer,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
        consecutive_failures: 0,
        locked: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (k, signer) = keys();
    let pinned = [k.signer_public];
    match mode % 3 {
        0 => {
            assert!(open(rest, &k.custodian_private, &pinned).is_err());
        }
        1 => {
            let mut file = rest.to_vec();
            let sig = signer.sign(&file);
            file.extend_from_slice(sig.as_ref());
            let _ = open(&file, &k.custodian_private, &pinned);
        }
        _ => {
            let (flip, records) = match rest.split_first() {
                Some((&f, r)) => (f as usize, r),
                None => (0, rest),
            };
            let rings: Vec<(String, Zeroizing<Vec<u8>>)> = records
                .split(|&b| b == 0xFF)
                // A stored record is never empty (and KWP wraps ≥ 1 byte).
                .filter(|r| !r.is_empty())
                .enumerate()
                .map(|(i, r)| (format!("k{i}"), Zeroizing::new(r.to_vec())))
                .collect();
            let contents = Contents {
                users: vec![admin()],
                rings,
            };
            let file = write(
                &contents,
                &k.custodian_public,
                &k.signer_pkcs8,
                1_700_000_000,
            )
            .expect("write");
            let (summary, back) = open(&file, &k.custodian_private, &pinned).expect("round trip");
            assert_eq!(summary.keys, contents.rings.len());
            assert_eq!(back.users.len(), 1);
            assert_eq!(back.rings.len(), contents.rings.len());
            for ((n1, r1), (n2, r2)) in contents.rings.iter().zip(&back.rings) {
                assert_eq!(n1, n2);
                assert_eq!(r1.as_slice(), r2.as_slice());
            }
            let mut bad = file.clone();
            let at = flip * 7919 % bad.len();
            bad[at] ^= 0x01;
            assert!(
                open(&bad, &k.custodian_private, &pinned).is_err(),
                "flipped byte {at} accepted"
            );
        }
    }
});
