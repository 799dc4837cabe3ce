//! The config validator: any main file plus any policy file must give a
//! `Config` or a list of file:line errors, never a panic or a hang.
//!
//! Input: main-file text, a NUL byte, security-group/rate-limit file text.
#![no_main]
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (main, policy) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(main), Ok(policy)) = (std::str::from_utf8(main), std::str::from_utf8(policy)) else {
        return;
    };
    // Paths must stay inside the fuzzer's world: no file reads from input.
    if main.contains("file") || policy.contains("file") {
        return;
    }
    let policies = [(PathBuf::from("policies/fuzz.toml"), policy.to_string())];
    match hsmgate::config::load_from_str(Path::new("fuzz.toml"), main, &policies) {
        Ok(_) => {}
        Err(errors) => {
            // Every error renders, and there is at least one.
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                let _ = e.to_string();
            }
        }
    }
});
