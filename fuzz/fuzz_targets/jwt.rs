//! The JWT path: any bearer string, or any header/claims JSON wrapped into a
//! token shape, is verified or refused — never a panic, never accepted
//! without a signature from a configured key.
//!
//! Input: first byte picks the mode; 0 = the rest is the raw token; else the
//! rest is `header JSON 0xFF claims JSON 0xFF signature bytes`, each part
//! base64url-encoded into `h.c.s` (so the fuzzer reaches the JSON and
//! algorithm logic instead of dying in base64).
#![no_main]
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hsmgate::auth::JwtIssuers;
use libfuzzer_sys::fuzz_target;

fn issuers() -> &'static JwtIssuers {
    static ISSUERS: OnceLock<(tempfile::TempDir, JwtIssuers)> = OnceLock::new();
    &ISSUERS
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
            let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            std::fs::write(dir.path().join("rsa.pem"), rsa.public_key_pem()).unwrap();
            std::fs::write(dir.path().join("ec.pem"), ec.public_key_pem()).unwrap();
            let p = |f: &str| dir.path().join(f).display().to_string();
            let main = format!(
                r#"policies_dir = "policies"
[[listener]]
name = "api"
address = "127.0.0.1:0"
security_groups = ["apps"]
[[jwt_issuer]]
name = "ci"
issuer = "https://ci.example"
audiences = ["hsmgate"]
algorithms = ["RS256", "ES256"]
public_keys = [{{ kid = "rsa1", file = "{}" }}, {{ kid = "ec1", file = "{}" }}]
[[jwt_issuer.role]]
name = "payments"
bound_claims = {{ team = ["payments"] }}
"#,
                p("rsa.pem"),
                p("ec.pem")
            );
            let policies = [(
                dir.path().join("policies/sg.toml"),
                "[group.apps]\nrules = [{ source = \"127.0.0.1/32\" }]\n".to_string(),
            )];
            let config =
                hsmgate::config::load_from_str(&dir.path().join("hsmgate.toml"), &main, &policies)
                    .unwrap_or_else(|e| {
                        let lines: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
                        panic!("fuzz config: {}", lines.join("; "))
                    });
            (dir, config.jwt)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode == 0 {
        match std::str::from_utf8(rest) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    } else {
        let mut parts = rest.splitn(3, |&b| b == 0xFF);
        let h = parts.next().unwrap_or_default();
        let c = parts.next().unwrap_or_default();
        let s = parts.next().unwrap_or_default();
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(h),
            URL_SAFE_NO_PAD.encode(c),
            URL_SAFE_NO_PAD.encode(s)
        )
    };
    // Nothing the fuzzer builds carries a signature by a configured key.
    if let Ok(identity) = issuers().verify(&token, None) {
        panic!("forged token accepted: {token:?} -> {}", identity.user);
    }
    let _ = issuers().verify(&token, Some("payments"));
});
