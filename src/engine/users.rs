//! Password hashing (argon2id) and the password rules.
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::crypto;
use super::EngineError;

/// Below this an offline guess of a stolen hash is cheap even with argon2id.
pub const MIN_PASSWORD_LEN: usize = 8;
/// argon2 accepts more, but nobody types this much and it bounds the work.
pub const MAX_PASSWORD_LEN: usize = 1024;

pub fn validate_username(name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(
            "usernames are 1-64 characters of A-Z a-z 0-9 - _ .".into(),
        ))
    }
}

pub fn validate_password(username: &str, password: &str) -> Result<(), EngineError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "passwords must be at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "passwords must be at most {MAX_PASSWORD_LEN} bytes"
        )));
    }
    if password == username {
        return Err(EngineError::InvalidRequest(
            "the password may not be the username".into(),
        ));
    }
    Ok(())
}

pub fn hash_password(password: &str) -> Result<String, EngineError> {
    let salt_bytes = crypto::random_bytes(16)?;
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| EngineError::Internal(format!("argon2 salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| EngineError::Internal(format!("argon2 hash: {e}")))
}

/// Constant-time in the comparison (argon2's verifier) and the same cost
/// whatever the outcome.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Spends the same argon2 work as a real check, so an unknown user, a locked
/// one, or a refused officer login cannot be told apart by timing.
pub fn burn_equal_time(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = DUMMY.get_or_init(|| {
        // A hash of random bytes nobody knows; if hashing failed the verify
        // below fails fast, which only costs timing uniformity, not safety.
        let pw = crypto::random_bytes(24)
            .map(|b| hex::encode(&*b))
            .unwrap_or_default();
        hash_password(&pw).unwrap_or_default()
    });
    let _ = verify_password(password, phc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_wrong_passwords_fail() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsf", &h));
        assert!(!verify_password("correct horse", "garbage"));
    }

    #[test]
    fn password_rules() {
        assert!(validate_password("alice", "long enough").is_ok());
        assert!(validate_password("alice", "short").is_err());
        assert!(validate_password("alice-long", "alice-long").is_err());
        assert!(validate_username("alice.b-1").is_ok());
        assert!(validate_username("alice/b").is_err());
        assert!(validate_username("").is_err());
    }
}
