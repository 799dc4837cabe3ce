//! Users: password hashing (argon2id), the password policy, and the
//! crypto officer's user management (list, delete) and every user's own
//! password change.
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::crypto;
use super::secret::SecretString;
use super::{lock, read, Engine, EngineError, LoginRequest, LoginSuccess, Principal, Role};
use super::{Channel, UserStatus};

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

/// The password policy: at least `min_len` characters (the configured
/// `engine.min_password_length`, never below [`MIN_PASSWORD_LEN`]), at most
/// [`MAX_PASSWORD_LEN`] bytes, not the username. (Refusing the previous
/// password needs the old hash: see [`same_password`].)
pub fn validate_password(
    username: &str,
    password: &str,
    min_len: usize,
) -> Result<(), EngineError> {
    let min_len = min_len.max(MIN_PASSWORD_LEN);
    if password.chars().count() < min_len {
        return Err(EngineError::InvalidRequest(format!(
            "passwords must be at least {min_len} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "passwords must be at most {MAX_PASSWORD_LEN} bytes"
        )));
    }
    if password.eq_ignore_ascii_case(username) {
        return Err(EngineError::InvalidRequest(
            "the password may not be the username".into(),
        ));
    }
    Ok(())
}

/// The policy's refusal of a new password equal to the one it replaces.
pub fn same_password() -> EngineError {
    EngineError::InvalidRequest("the new password must differ from the previous one".into())
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

/// The change-password request: the caller's old and new password and the
/// facts the login path needs (channel, admin network).
pub struct PasswordChange<'a> {
    pub old_password: &'a SecretString,
    pub new_password: &'a SecretString,
    pub channel: Channel,
    pub officer_allowed: bool,
}

impl Engine {
    /// Every user, for the crypto officer: name, role, failure count,
    /// attempts left, locked. Never a hash.
    pub fn list_users(&self, by: &Principal) -> Result<Vec<UserStatus>, EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        let mut users = self.with_active(|a| Ok(a.store.users()?))?;
        users.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(users.into_iter().map(|u| self.user_status(u)).collect())
    }

    /// The crypto officer deletes a crypto user; its sessions die at once.
    /// The crypto officer itself cannot be deleted (it owns the engine).
    /// Runs under the user's login lock, so a login in flight finishes
    /// before the record goes and cannot write it back afterwards.
    pub fn delete_user(&self, by: &Principal, username: &str) -> Result<(), EngineError> {
        Self::require(by, Role::CryptoOfficer)?;
        validate_username(username)?;
        let user_lock = self.user_lock(username);
        {
            let _serial = lock(&user_lock);
            let inner = read(&self.inner);
            let active = inner
                .active
                .as_ref()
                .ok_or(EngineError::NotActive(inner.state))?;
            let record = active
                .store
                .get_user(username)?
                .ok_or_else(|| EngineError::UserNotFound(username.into()))?;
            if record.role != Role::CryptoUser {
                return Err(EngineError::InvalidRequest(
                    "only crypto users can be deleted; the crypto officer owns the engine \
                     (zeroize to start over)"
                        .into(),
                ));
            }
            let expect = active
                .store
                .read_for_update(super::store::Table::Users, username)?
                .expect;
            drop(inner);
            self.commit(vec![super::store::RecordOp {
                table: super::store::Table::Users,
                name: username.to_string(),
                sealed: None,
                expect,
                clear_counters: true,
            }])?;
            self.revoke_user_sessions(username);
        }
        lock(&self.user_locks).remove(username);
        tracing::warn!(user = username, by = %by.username, "crypto user deleted");
        Ok(())
    }

    /// A user (crypto officer or crypto user) changes its own password.
    ///
    /// The old password is checked by [`Engine::login`] itself: the attempt
    /// is counted before the check, the login guard and the admin-network
    /// rule apply, a crypto user locks and the crypto officer zeroizes at
    /// the threshold. So this route is no way around the failure counter.
    /// On success every session of the user is revoked and one new session
    /// is returned.
    pub fn change_password(
        &self,
        by: &Principal,
        change: PasswordChange<'_>,
    ) -> Result<LoginSuccess, EngineError> {
        // Apps (JWT principals) have no password here; their names are not
        // valid usernames, so this also keeps them off the login path.
        if validate_username(&by.username).is_err() || !by.app_policies.is_empty() {
            return Err(EngineError::PermissionDenied);
        }
        let new = change.new_password.expose_secret();
        // The policy first: it needs no secret, so a refusal counts nothing.
        validate_password(&by.username, new, self.config.min_password_length)?;
        if new == change.old_password.expose_secret() {
            return Err(same_password());
        }
        let hash = hash_password(new)?;
        // The hash the old password must match: if it changes between the
        // check and the write (a concurrent reset), the write is refused.
        let before = self
            .with_active(|a| Ok(a.store.get_user(&by.username)?))?
            .map(|r| r.password_hash);
        let checked = self.login(LoginRequest {
            username: &by.username,
            password: change.old_password,
            channel: change.channel,
            officer_allowed: change.officer_allowed,
        })?;
        self.revoke_session(checked.token.expose_secret());
        let user_lock = self.user_lock(&by.username);
        let _serial = lock(&user_lock);
        let record = {
            let inner = read(&self.inner);
            let active = inner
                .active
                .as_ref()
                .ok_or(EngineError::NotActive(inner.state))?;
            let Some(mut record) = active.store.get_user(&by.username)? else {
                return Err(EngineError::UserNotFound(by.username.clone()));
            };
            if Some(&record.password_hash) != before.as_ref() {
                return Err(EngineError::InvalidRequest(
                    "the password changed while this request ran; try again".into(),
                ));
            }
            record.password_hash = hash;
            record.consecutive_failures = 0;
            let expect = active
                .store
                .read_for_update(super::store::Table::Users, &by.username)?
                .expect;
            let mut op = active.store.user_op(&record, expect, self.clustered())?;
            op.clear_counters = true;
            drop(inner);
            self.commit(vec![op])?;
            record
        };
        self.revoke_user_sessions(&record.username);
        tracing::info!(user = %record.username, "password changed by its user");
        self.new_session(&record)
    }
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
        assert!(validate_password("alice", "long enough", 8).is_ok());
        assert!(validate_password("alice", "long enough", 12).is_err());
        assert!(validate_password("alice", "short", 8).is_err());
        assert!(
            validate_password("alice", "short", 0).is_err(),
            "8 is the floor"
        );
        assert!(validate_password("alice-long", "alice-long", 8).is_err());
        assert!(validate_password("alice-long", "ALICE-LONG", 8).is_err());
        assert!(validate_username("alice.b-1").is_ok());
        assert!(validate_username("alice/b").is_err());
        assert!(validate_username("").is_err());
    }
}
