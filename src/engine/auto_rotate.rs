//! Vault's `auto_rotate_period`: which keys are due, and rotating them
//! through the same write path as `keys/:name/rotate` (`update_ring` →
//! `Engine::commit`, so versions, replication and key rings stay right).
//! The clock is the caller's: the server's timer passes the system time
//! (`gateway::Server::run`), tests pass any `now`.
use std::time::SystemTime;

use super::{read, Engine, EngineError, EngineState, Principal, Role};

/// The actor automatic rotations run as (audit records, logs).
pub const AUTO_ROTATE_ACTOR: &str = "auto-rotate";

/// One key's result in an automatic-rotation pass.
#[derive(Debug)]
pub enum AutoRotation {
    /// Rotated: `version` is the key's new latest version.
    Rotated { key: String, version: u32 },
    /// Due but not rotated (an imported key without `allow_rotation`, a
    /// storage or cluster failure); the pass went on with the next key.
    Failed { key: String, error: EngineError },
}

impl Engine {
    /// Rotates every key whose `auto_rotate_period` has elapsed at `now`
    /// (Unix seconds) since its latest version was created. Nothing while
    /// the engine is not active. Each key is re-checked under the key-write
    /// lock against its stored record, so a key rotated by hand (or by
    /// another cluster member) after the scan is not rotated twice; a key
    /// deleted meanwhile is passed over. One key's failure never stops the
    /// others. The new version's creation time is `now`.
    pub fn rotate_due_keys(&self, now: u64) -> Vec<AutoRotation> {
        if self.state() != EngineState::Active {
            return Vec::new();
        }
        let Ok(mut due) = self.with_active(|a| {
            Ok(read(&a.keys)
                .values()
                .filter(|ring| ring.due_for_rotation(now))
                .map(|ring| ring.name.clone())
                .collect::<Vec<String>>())
        }) else {
            return Vec::new();
        };
        due.sort();
        let by = Principal {
            username: AUTO_ROTATE_ACTOR.into(),
            role: Role::CryptoUser,
            issued_at: SystemTime::now(),
            expires_at: SystemTime::now(),
            app_policies: Vec::new(),
        };
        due.into_iter()
            .filter_map(|key| {
                let mut version = None;
                let done = self.update_ring(&by, &key, |current| {
                    version = None;
                    match current {
                        Some(ring) if ring.due_for_rotation(now) => {
                            let next = ring.rotated(now)?;
                            version = Some(next.latest_version);
                            Ok(Some(next))
                        }
                        // Rotated or reconfigured since the scan: not due.
                        _ => Ok(None),
                    }
                });
                match (done, version) {
                    (Ok(_), Some(version)) => Some(AutoRotation::Rotated { key, version }),
                    // Not due any more, or deleted since the scan.
                    (Ok(_), None) | (Err(EngineError::KeyNotFound(_)), None) => None,
                    (Err(error), _) => Some(AutoRotation::Failed { key, error }),
                }
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::EngineConfig;
    use crate::engine::crypto::{KeyMaterial, KeyType};
    use crate::engine::keyring::{KeyConfigChange, KeyOptions};
    use crate::engine::secret::SecretString;

    fn user() -> Principal {
        let now = SystemTime::now();
        Principal {
            username: "t".into(),
            role: Role::CryptoUser,
            issued_at: now,
            expires_at: now + Duration::from_secs(60),
            app_policies: Vec::new(),
        }
    }

    pub(crate) fn active_engine(dir: &std::path::Path) -> Engine {
        let engine = Engine::open(dir, EngineConfig::default()).unwrap();
        let token = SecretString::new(fs::read_to_string(dir.join("init-token")).unwrap());
        engine
            .init(
                &SecretString::new("correct horse battery staple".into()),
                &token,
            )
            .unwrap();
        engine
    }

    fn with_period(secs: u64) -> KeyOptions {
        KeyOptions {
            auto_rotate_period: secs,
            ..KeyOptions::new(KeyType::Aes256Gcm96)
        }
    }

    #[test]
    fn a_due_key_rotates_and_a_key_not_yet_due_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let engine = active_engine(dir.path());
        let cu = user();
        let hourly = engine
            .create_key(&cu, "hourly", &with_period(3600))
            .unwrap();
        let daily = engine
            .create_key(&cu, "daily", &with_period(86_400))
            .unwrap();
        engine
            .create_key(&cu, "manual", &KeyOptions::new(KeyType::Aes256Gcm96))
            .unwrap();
        let (old_ct, _) = engine
            .encrypt(&cu, "hourly", b"hello", b"", None, None)
            .unwrap();
        let created = hourly.versions[&1].created;
        assert_eq!(daily.versions[&1].created, created);

        // One second early: nothing is due.
        assert!(engine.rotate_due_keys(created + 3599).is_empty());
        assert_eq!(engine.read_key(&cu, "hourly").unwrap().latest_version, 1);

        // An hour on: only the hourly key rotates, once.
        let now = created + 3600;
        let done = engine.rotate_due_keys(now);
        assert!(
            matches!(done.as_slice(), [AutoRotation::Rotated { key, version: 2 }] if key == "hourly"),
            "{done:?}"
        );
        let ring = engine.read_key(&cu, "hourly").unwrap();
        assert_eq!(ring.latest_version, 2);
        assert_eq!(ring.versions[&2].created, now);
        assert_eq!(engine.read_key(&cu, "daily").unwrap().latest_version, 1);
        assert_eq!(engine.read_key(&cu, "manual").unwrap().latest_version, 1);
        // New encryptions use the new version; old ciphertexts still open.
        let (ct, v) = engine
            .encrypt(&cu, "hourly", b"hi", b"", None, None)
            .unwrap();
        assert_eq!(v, 2);
        assert!(ct.starts_with("vault:v2:"));
        assert_eq!(
            engine
                .decrypt(&cu, "hourly", &old_ct, b"", None)
                .unwrap()
                .as_slice(),
            b"hello"
        );
        // The same instant again: the new version is not yet a period old.
        assert!(engine.rotate_due_keys(now).is_empty());

        // A day on: both are due (the hourly key counts from version 2).
        let done = engine.rotate_due_keys(created + 86_400);
        let rotated: Vec<(&str, u32)> = done
            .iter()
            .map(|r| match r {
                AutoRotation::Rotated { key, version } => (key.as_str(), *version),
                AutoRotation::Failed { key, error } => panic!("{key}: {error}"),
            })
            .collect();
        assert_eq!(rotated, [("daily", 2), ("hourly", 3)]);

        // The rotation is in the store, not only in memory.
        drop(engine);
        let engine = Engine::open(dir.path(), EngineConfig::default()).unwrap();
        assert_eq!(engine.read_key(&cu, "hourly").unwrap().latest_version, 3);
    }

    #[test]
    fn turning_the_period_off_stops_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let engine = active_engine(dir.path());
        let cu = user();
        let ring = engine.create_key(&cu, "k", &with_period(3600)).unwrap();
        let created = ring.versions[&1].created;
        engine
            .configure_key(
                &cu,
                "k",
                &KeyConfigChange {
                    auto_rotate_period: Some(0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(engine.rotate_due_keys(created + 10 * 86_400).is_empty());
        assert_eq!(engine.read_key(&cu, "k").unwrap().latest_version, 1);
    }

    #[test]
    fn a_key_that_cannot_rotate_fails_alone_and_the_pass_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let engine = active_engine(dir.path());
        let cu = user();
        let a = engine.create_key(&cu, "a", &with_period(3600)).unwrap();
        let created = a.versions[&1].created;
        engine.create_key(&cu, "c", &with_period(3600)).unwrap();
        // An imported key without allow_rotation whose record says it
        // rotates (the API refuses this; a record written by hand could
        // still say it): it is reported and the others rotate.
        let opts = KeyOptions::new(KeyType::Aes256Gcm96);
        let mut fixed = crate::engine::keyring::KeyRing::with_material(
            "b",
            &opts,
            KeyMaterial::generate(KeyType::Aes256Gcm96).unwrap(),
            true,
            created,
        )
        .unwrap();
        fixed.auto_rotate_period = 3600;
        engine
            .update_ring(&cu, "b", |_| Ok(Some(fixed.clone())))
            .unwrap();

        let done = engine.rotate_due_keys(created + 3600);
        let summary: Vec<String> = done
            .iter()
            .map(|r| match r {
                AutoRotation::Rotated { key, version } => format!("{key} v{version}"),
                AutoRotation::Failed { key, error } => {
                    assert!(error.to_string().contains("allow_rotation"), "{error}");
                    format!("{key} failed")
                }
            })
            .collect();
        assert_eq!(summary, ["a v2", "b failed", "c v2"]);
        assert_eq!(engine.read_key(&cu, "b").unwrap().latest_version, 1);
    }

    #[test]
    fn nothing_rotates_while_the_engine_is_not_active() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineConfig::default()).unwrap();
        assert!(engine.rotate_due_keys(u64::MAX).is_empty());
    }
}
