//! `vault:vN:...` ciphertext and signature strings, standard and JWS
//! marshaling: any string parses or is refused with an error, and what
//! parses re-encodes to the same bytes.
//!
//! Input: first byte's low bit set → the rest follows `vault:v` (so the
//! fuzzer spends its time past the prefix); clear → the rest as is.
#![no_main]
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return;
    };
    let s = if mode & 1 == 1 {
        format!("vault:v{rest}")
    } else {
        rest.to_string()
    };
    if let Ok((version, bytes)) = hsmgate::engine::keyring::parse_vault(&s, "ciphertext") {
        assert!(version >= 1, "version 0 accepted from {s:?}");
        // Whatever parses is exactly `vault:v<version>:<base64 of bytes>`
        // up to the version's spelling (leading zeros, '+').
        let body = s.rsplit_once(':').map(|(_, b)| b).unwrap();
        assert_eq!(STANDARD.encode(&bytes), body, "{s:?}");
    }
    if let Ok((version, bytes)) = hsmgate::engine::keyring::parse_vault_jws(&s, "signature") {
        assert!(version >= 1, "version 0 accepted from {s:?}");
        let body = s.rsplit_once(':').map(|(_, b)| b).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(&bytes), body, "{s:?}");
    }
});
