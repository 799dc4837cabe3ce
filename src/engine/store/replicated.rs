//! The store's replicated half: the record-level changes a cluster agrees
//! on (`crate::cluster`) and that a single node applies the same way.
//!
//! A [`RecordOp`] carries a record already **sealed** under the master key
//! (in a cluster, the cluster key every member holds), so the bytes that
//! travel through the Raft log, rest in it and in snapshots are ciphertext,
//! and every member stores the same bytes. Each op names what the record
//! must be before it applies ([`Expect`]): the SHA-256 of the sealed bytes
//! the writer read, or absent. A batch applies whole or not at all, in one
//! redb transaction together with the state machine's own metadata, so a
//! node that crashes mid-apply has applied the entry or not, never half of it.
//! Because every member holds the same bytes, the outcome of a batch is the
//! same on every member (a deterministic state machine).
//!
//! Login-failure counters are not replicated (a physical HSM counts its own
//! failures): in a cluster they live in the local `counters` table and
//! overlay the replicated user record ([`Store::put_user_counters`]).
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    decode, open_record, seal_record, MasterKey, Store, StoreError, UserRecord, KEYS, USERS,
};

/// Local, never replicated: per-user failure counters of this node.
pub(super) const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
/// The replicated state machine's own metadata (opaque to the store:
/// the last applied log id and the membership, as `crate::cluster` encodes them).
const RAFT_SM: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_sm");

/// The tables a cluster replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Keys,
    Users,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Keys => "keys",
            Table::Users => "users",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Keys => KEYS,
            Table::Users => USERS,
        }
    }
}

/// What a record must be for an op to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Whatever it is (no precondition).
    Any,
    /// Not there.
    Absent,
    /// The SHA-256 of the sealed bytes the writer read.
    Digest(#[serde(with = "hex_digest")] [u8; 32]),
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex::decode(&s).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("digest is not 32 bytes"))
    }
}

/// One change to one sealed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOp {
    pub table: Table,
    pub name: String,
    /// The sealed record to store, or `None` to delete it.
    #[serde(with = "opt_b64")]
    pub sealed: Option<Vec<u8>>,
    pub expect: Expect,
    /// A user record whose write also clears every node's local failure
    /// counters for that user (password reset and change).
    #[serde(default)]
    pub clear_counters: bool,
}

mod opt_b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Why a batch did not apply: the first op whose precondition failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("record {table}/{name} changed since it was read (a concurrent write); nothing was changed, try again")]
pub struct Conflict {
    pub table: &'static str,
    pub name: String,
}

/// A record read for an update: its digest (the op's [`Expect`]) and its
/// opened plaintext.
pub struct ForUpdate {
    pub expect: Expect,
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

/// Every replicated record, sealed, with the state machine's metadata,
/// from one read transaction (a Raft snapshot's contents).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReplicatedState {
    pub records: Vec<SealedRecord>,
    #[serde(with = "opt_b64")]
    pub applied: Option<Vec<u8>>,
    #[serde(with = "opt_b64")]
    pub membership: Option<Vec<u8>>,
    /// The exporter's cluster key id ([`Store::key_id`]); absent in
    /// snapshots from before cluster-key rotation existed.
    #[serde(default, with = "opt_b64")]
    pub key_id: Option<Vec<u8>>,
    /// The last cluster-key rotation ([`Rotation`], JSON), so a member one
    /// rotation behind can install a snapshot taken after it.
    #[serde(default, with = "opt_b64")]
    pub rotation: Option<Vec<u8>>,
}

/// What a cluster-key rotation leaves in the state machine's metadata
/// (not sealed: it is itself a wrapped key): the id of the key it replaced
/// and the new key sealed under a key derived from the old one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rotation {
    #[serde(with = "b64")]
    pub from: Vec<u8>,
    #[serde(with = "b64")]
    pub wrapped: Vec<u8>,
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        STANDARD
            .decode(String::deserialize(d)?)
            .map_err(serde::de::Error::custom)
    }
}

/// One replicated record as stored: sealed bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedRecord {
    pub table: Table,
    pub name: String,
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
}

const SM_APPLIED: &str = "applied";
const SM_MEMBERSHIP: &str = "membership";
const SM_ROTATION: &str = "rotation";
/// The purpose a rotation's wrapping key is derived for.
const ROTATION_WRAP: &str = "cluster-key-rotation";

/// A key derived from `master` for `purpose` (HMAC-SHA256).
fn derived(master: &MasterKey, purpose: &str) -> MasterKey {
    use aws_lc_rs::hmac;
    let root = hmac::Key::new(hmac::HMAC_SHA256, master.0.expose_secret());
    let tag = hmac::sign(&root, format!("hsmgate/v1/{purpose}").as_bytes());
    MasterKey(crate::engine::secret::SecretBytes::from_slice(tag.as_ref()))
}

/// The public id of a master key (cluster key): which key, never the key.
fn key_id_of(master: &MasterKey) -> Vec<u8> {
    use aws_lc_rs::hmac;
    let key = derived(master, "cluster-key-id");
    hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key.0.expose_secret()),
        b"",
    )
    .as_ref()
    .to_vec()
}

pub fn digest(sealed: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sealed);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Serialize, Deserialize)]
struct Counters {
    consecutive_failures: u32,
    locked: bool,
}

impl Store {
    /// HMAC-SHA256 of `data` under a key derived from the master key for
    /// `purpose` (in a cluster: from the cluster key, which only members
    /// hold). Authenticates Raft entries: a holder of a node certificate
    /// without the cluster key cannot forge a write (`crate::cluster`).
    pub fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        use aws_lc_rs::hmac;
        let keys = self.read_keys();
        let derived = derived(&keys.master, purpose);
        let key = hmac::Key::new(hmac::HMAC_SHA256, derived.0.expose_secret());
        let tag = hmac::sign(&key, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Checks a [`Store::mac`] in constant time.
    pub fn verify_mac(&self, purpose: &str, data: &[u8], tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let expected = self.mac(purpose, data);
        tag.len() == 32 && bool::from(expected.ct_eq(tag))
    }

    /// This store's cluster key id (see [`key_id_of`]).
    pub fn key_id(&self) -> Vec<u8> {
        key_id_of(&self.read_keys().master)
    }

    /// A fresh cluster key, sealed under a key derived from the current
    /// one: the payload of a rotation entry ([`Store::rotate_cluster_key`]).
    pub fn next_cluster_key(&self) -> Result<Vec<u8>, StoreError> {
        let keys = self.read_keys();
        let next = MasterKey::generate()?;
        seal_record(
            &derived(&keys.master, ROTATION_WRAP),
            "rotation",
            "next",
            next.0.expose_secret(),
        )
    }

    /// Applies a cluster-key rotation entry: the new key opened from
    /// `wrapped` with the current one, every record (replicated and local)
    /// re-sealed under it, the wrapped master key, the [`Rotation`] record
    /// and the state machine's metadata written, in ONE transaction (a
    /// crash leaves the old key or the new one, never a mix). A payload
    /// that does not open under this member's key applies as a refused
    /// no-op (the metadata still advances), like an unauthenticated entry.
    pub fn rotate_cluster_key(
        &self,
        wrapped: &[u8],
        applied: Option<&[u8]>,
        membership: Option<&[u8]>,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let mut keys = self.write_keys();
        let opened = open_record(
            &derived(&keys.master, ROTATION_WRAP),
            "rotation",
            "next",
            wrapped,
        )
        .ok()
        .filter(|k| k.len() == 32);
        let Some(next) = opened else {
            drop(keys);
            // No ops: nothing can conflict; only the metadata advances.
            let _ = self.apply_ops(&[], applied, membership)?;
            return Ok(Err(Conflict {
                table: "entry",
                name: "cluster key rotation that does not open under this member's key".into(),
            }));
        };
        let rotation = serde_json::to_vec(&Rotation {
            from: key_id_of(&keys.master),
            wrapped: wrapped.to_vec(),
        })
        .map_err(|e| StoreError::Meta(e.to_string()))?;
        let next = MasterKey(crate::engine::secret::SecretBytes::from_slice(&next));
        let generation = self.reseal_under(
            &mut keys,
            next,
            None,
            &|txn| {
                let mut sm = db_err!(txn.open_table(RAFT_SM))?;
                if let Some(a) = applied {
                    db_err!(sm.insert(SM_APPLIED, a))?;
                }
                if let Some(m) = membership {
                    db_err!(sm.insert(SM_MEMBERSHIP, m))?;
                }
                db_err!(sm.insert(SM_ROTATION, rotation.as_slice()))?;
                Ok(())
            },
            None,
        )?;
        Ok(Ok(generation))
    }

    /// Reads one replicated record for an update: its digest and plaintext.
    pub fn read_for_update(&self, table: Table, name: &str) -> Result<ForUpdate, StoreError> {
        let keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(table.def()))?;
            match db_err!(t.get(name))? {
                Some(v) => Ok(ForUpdate {
                    expect: Expect::Digest(digest(v.value())),
                    plaintext: Some(open_record(&keys.master, table.name(), name, v.value())?),
                }),
                None => Ok(ForUpdate {
                    expect: Expect::Absent,
                    plaintext: None,
                }),
            }
        })
    }

    /// Builds the op that stores `plaintext` as `table/name`, sealed now.
    pub fn put_op(
        &self,
        table: Table,
        name: &str,
        plaintext: &[u8],
        expect: Expect,
    ) -> Result<RecordOp, StoreError> {
        Ok(RecordOp {
            table,
            name: name.to_string(),
            sealed: Some(self.seal(table.name(), name, plaintext)?),
            expect,
            clear_counters: false,
        })
    }

    /// The op that stores a user record. The replicated record carries no
    /// failure counters when `strip_counters` (a cluster): they are local.
    pub fn user_op(
        &self,
        user: &UserRecord,
        expect: Expect,
        strip_counters: bool,
    ) -> Result<RecordOp, StoreError> {
        let mut record = user.clone();
        if strip_counters {
            record.consecutive_failures = 0;
            record.locked = false;
        }
        let json =
            Zeroizing::new(
                serde_json::to_vec(&record).map_err(|e| StoreError::Malformed {
                    table: "users",
                    name: user.username.clone(),
                    detail: e.to_string(),
                })?,
            );
        self.put_op(Table::Users, &user.username, &json, expect)
    }

    /// Applies a batch: every precondition checked first, then every op,
    /// then `applied`/`membership` (a cluster's state-machine metadata),
    /// in one transaction. A failed precondition applies none of the ops
    /// (the metadata still advances: the entry was applied, as a no-op).
    pub fn apply_ops(
        &self,
        ops: &[RecordOp],
        applied: Option<&[u8]>,
        membership: Option<&[u8]>,
    ) -> Result<Result<(), Conflict>, StoreError> {
        // Held through the commit: a rotation cannot slip in between.
        let _keys = self.read_keys();
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            let outcome = {
                let mut conflict = None;
                for op in ops {
                    let t = db_err!(txn.open_table(op.table.def()))?;
                    let current = db_err!(t.get(op.name.as_str()))?.map(|v| digest(v.value()));
                    let ok = match op.expect {
                        Expect::Any => true,
                        Expect::Absent => current.is_none(),
                        Expect::Digest(d) => current == Some(d),
                    };
                    if !ok {
                        conflict = Some(Conflict {
                            table: op.table.name(),
                            name: op.name.clone(),
                        });
                        break;
                    }
                }
                match conflict {
                    Some(c) => Err(c),
                    None => {
                        for op in ops {
                            let mut t = db_err!(txn.open_table(op.table.def()))?;
                            match &op.sealed {
                                Some(v) => {
                                    db_err!(t.insert(op.name.as_str(), v.as_slice()))?;
                                }
                                None => {
                                    db_err!(t.remove(op.name.as_str()))?;
                                }
                            }
                            if op.table == Table::Users
                                && (op.clear_counters || op.sealed.is_none())
                            {
                                let mut c = db_err!(txn.open_table(COUNTERS))?;
                                db_err!(c.remove(op.name.as_str()))?;
                            }
                        }
                        Ok(())
                    }
                }
            };
            {
                let mut sm = db_err!(txn.open_table(RAFT_SM))?;
                if let Some(a) = applied {
                    db_err!(sm.insert(SM_APPLIED, a))?;
                }
                if let Some(m) = membership {
                    db_err!(sm.insert(SM_MEMBERSHIP, m))?;
                }
            }
            db_err!(txn.commit())?;
            Ok(outcome)
        })
    }

    /// The state machine's metadata: (last applied, membership), as stored.
    #[allow(clippy::type_complexity)]
    pub fn sm_meta(&self) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>), StoreError> {
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let sm = match txn.open_table(RAFT_SM) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((None, None)),
                Err(e) => return Err(StoreError::Database(e.into())),
            };
            let applied = db_err!(sm.get(SM_APPLIED))?.map(|v| v.value().to_vec());
            let membership = db_err!(sm.get(SM_MEMBERSHIP))?.map(|v| v.value().to_vec());
            Ok((applied, membership))
        })
    }

    /// Every replicated record and the metadata, from one read transaction.
    pub fn export_replicated(&self) -> Result<ReplicatedState, StoreError> {
        // Held through the read: the records and the key id agree.
        let keys = self.read_keys();
        let key_id = key_id_of(&keys.master);
        self.with_db(|db| {
            let key_id = key_id.clone();
            let txn = db_err!(db.begin_read())?;
            let mut state = ReplicatedState::default();
            for table in [Table::Keys, Table::Users] {
                let t = db_err!(txn.open_table(table.def()))?;
                for entry in db_err!(t.iter())? {
                    let (k, v) = db_err!(entry)?;
                    state.records.push(SealedRecord {
                        table,
                        name: k.value().to_string(),
                        sealed: v.value().to_vec(),
                    });
                }
            }
            if let Ok(sm) = txn.open_table(RAFT_SM) {
                state.applied = db_err!(sm.get(SM_APPLIED))?.map(|v| v.value().to_vec());
                state.membership = db_err!(sm.get(SM_MEMBERSHIP))?.map(|v| v.value().to_vec());
                state.rotation = db_err!(sm.get(SM_ROTATION))?.map(|v| v.value().to_vec());
            }
            state.key_id = Some(key_id);
            Ok(state)
        })
    }

    /// Replaces every replicated record and the metadata with `state` (a
    /// Raft snapshot being installed), in one transaction. Every record
    /// must open under this store's master key first: a snapshot sealed
    /// under another key is refused whole and changes nothing. A snapshot
    /// taken one cluster-key rotation after this store's key carries that
    /// rotation: the new key is opened with the current one, and the local
    /// tables (audit head, counters) are re-sealed under it in the same
    /// transaction. Further behind, the member must be removed and re-added.
    pub fn install_replicated(&self, state: &ReplicatedState) -> Result<(), StoreError> {
        let mut keys = self.write_keys();
        let local_id = key_id_of(&keys.master);
        let next = match &state.key_id {
            Some(id) if *id != local_id => {
                let rotation: Option<Rotation> = state
                    .rotation
                    .as_ref()
                    .and_then(|r| serde_json::from_slice(r).ok());
                let next = rotation
                    .filter(|r| r.from == local_id)
                    .and_then(|r| {
                        open_record(
                            &derived(&keys.master, ROTATION_WRAP),
                            "rotation",
                            "next",
                            &r.wrapped,
                        )
                        .ok()
                    })
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| {
                        StoreError::Meta(
                            "this snapshot is sealed under a cluster key more than one rotation \
                             newer than this member's: remove this member and add it again"
                                .into(),
                        )
                    })?;
                Some(MasterKey(crate::engine::secret::SecretBytes::from_slice(
                    &next,
                )))
            }
            _ => None,
        };
        let records_key = next.as_ref().unwrap_or(&keys.master);
        for r in &state.records {
            open_record(records_key, r.table.name(), &r.name, &r.sealed)?;
        }
        let install = |txn: &redb::WriteTransaction| -> Result<(), StoreError> {
            for table in [Table::Keys, Table::Users] {
                let mut t = db_err!(txn.open_table(table.def()))?;
                db_err!(t.retain(|_, _| false))?;
            }
            for r in &state.records {
                let mut t = db_err!(txn.open_table(r.table.def()))?;
                db_err!(t.insert(r.name.as_str(), r.sealed.as_slice()))?;
            }
            let mut sm = db_err!(txn.open_table(RAFT_SM))?;
            db_err!(sm.retain(|_, _| false))?;
            for (key, value) in [
                (SM_APPLIED, &state.applied),
                (SM_MEMBERSHIP, &state.membership),
                (SM_ROTATION, &state.rotation),
            ] {
                if let Some(v) = value {
                    db_err!(sm.insert(key, v.as_slice()))?;
                }
            }
            Ok(())
        };
        match next {
            // Local tables re-sealed, replicated ones replaced: one transaction.
            Some(next) => self
                .reseal_under(&mut keys, next, None, &install, None)
                .map(|_| ()),
            None => self.with_db(|db| {
                let txn = db_err!(db.begin_write())?;
                install(&txn)?;
                db_err!(txn.commit())
            }),
        }
    }

    /// The names in `table` that start with `prefix` (no record opened).
    pub fn names_with_prefix(&self, table: Table, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.with_db(|db| {
            let txn = db_err!(db.begin_read())?;
            let t = db_err!(txn.open_table(table.def()))?;
            let mut out = Vec::new();
            for entry in db_err!(t.range(prefix..))? {
                let (k, _) = db_err!(entry)?;
                let name = k.value();
                if !name.starts_with(prefix) {
                    break;
                }
                out.push(name.to_string());
            }
            Ok(out)
        })
    }

    /// Writes this node's failure counters for a user (local table).
    pub fn put_user_counters(&self, user: &UserRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&Counters {
            consecutive_failures: user.consecutive_failures,
            locked: user.locked,
        })
        .map_err(|e| StoreError::Meta(e.to_string()))?;
        self.put(COUNTERS, &user.username, &json)
    }

    /// Overlays this node's local counters (if any) on a user record.
    pub(super) fn overlay_counters(
        &self,
        txn: &redb::ReadTransaction,
        master: &super::MasterKey,
        user: &mut UserRecord,
    ) -> Result<(), StoreError> {
        let t = match txn.open_table(COUNTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(StoreError::Database(e.into())),
        };
        if let Some(v) = db_err!(t.get(user.username.as_str()))? {
            let plain = open_record(master, "counters", &user.username, v.value())?;
            let c: Counters = decode("counters", &user.username, &plain)?;
            user.consecutive_failures = c.consecutive_failures;
            user.locked = c.locked;
        }
        Ok(())
    }
}
