//! Vault's Transit `backup/:name` and `restore(/:name)`: one key ring, every
//! version, in plaintext — so, as in Vault, only for a key that has both
//! `exportable` and `allow_plaintext_backup`.
//!
//! The backup is hsmgate's own: base64 of [`MAGIC`] followed by the key
//! ring's record (the JSON the sealed store holds, docs/TRANSIT.md
//! "Storage"). Vault's backups (its internal policy JSON) do not restore
//! here, nor ours in Vault; keys move between the two by export and BYOK
//! import. A restore checks the record as creation checks options, then
//! writes it like any key ring update (one store write).
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::keyring::KeyRing;
use super::{Engine, EngineError, Principal};

/// Names the format, so another file given to restore is refused clearly.
pub const MAGIC: &[u8] = b"hsmgate-transit-backup/1\n";

impl Engine {
    /// `GET /v1/transit/backup/:name`: base64 of the backup (key material in
    /// the clear; wiped on drop here).
    pub fn backup_transit_key(
        &self,
        by: &Principal,
        name: &str,
    ) -> Result<Zeroizing<String>, EngineError> {
        let ring = self.ring(by, name)?;
        if !ring.exportable || !ring.allow_plaintext_backup {
            return Err(EngineError::InvalidRequest(format!(
                "key {name:?} cannot be backed up: a plaintext backup needs both exportable \
                 and allow_plaintext_backup"
            )));
        }
        let record = ring.to_record()?;
        let mut plain = Zeroizing::new(Vec::with_capacity(MAGIC.len() + record.len()));
        plain.extend_from_slice(MAGIC);
        plain.extend_from_slice(&record);
        Ok(Zeroizing::new(STANDARD.encode(&*plain)))
    }

    /// `POST /v1/transit/restore(/:name)`: the ring in `backup` (base64),
    /// under `name` when given, else under the name it was backed up as.
    /// An existing key is refused unless `force`, and `force` replaces only
    /// a key with `deletion_allowed` (replacing is deleting and creating,
    /// so it takes the same permission; stricter than Vault, which lets
    /// `force` overwrite any key).
    pub fn restore_transit_key(
        &self,
        by: &Principal,
        backup_b64: &str,
        name: Option<&str>,
        force: bool,
    ) -> Result<Arc<KeyRing>, EngineError> {
        let bad = |why: &str| EngineError::InvalidRequest(format!("invalid backup: {why}"));
        let decoded = Zeroizing::new(
            STANDARD
                .decode(backup_b64.trim())
                .map_err(|_| bad("not base64"))?,
        );
        let record = decoded.strip_prefix(MAGIC).ok_or_else(|| {
            bad("not an hsmgate Transit key backup (Vault's do not restore here)")
        })?;
        let ring = KeyRing::from_backup(record, name)?;
        let target = ring.name.clone();
        // Parsed once and used once: a write that lost a race with another
        // cluster member is refused, not replayed.
        let mut ring = Some(ring);
        let mut take = move || {
            ring.take().ok_or_else(|| {
                EngineError::Conflict("the key changed while this restore ran; try again".into())
            })
        };
        self.update_ring(by, &target, |current| match current {
            None => take().map(Some),
            Some(_) if !force => Err(EngineError::InvalidRequest(format!(
                "key {target:?} already exists; restore with force: true to replace it"
            ))),
            Some(existing) if !existing.deletion_allowed => {
                Err(EngineError::InvalidRequest(format!(
                "key {:?} exists and does not have deletion_allowed; force replaces only a key \
                 that could be deleted",
                existing.name
            )))
            }
            Some(_) => take().map(Some),
        })
    }
}
