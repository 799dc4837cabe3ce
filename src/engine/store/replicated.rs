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

use super::{decode, open_record, Store, StoreError, UserRecord, KEYS, USERS};

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
        let root = hmac::Key::new(hmac::HMAC_SHA256, keys.master.0.expose_secret());
        let derived = hmac::sign(&root, format!("hsmgate/v1/{purpose}").as_bytes());
        let key = hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref());
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
        self.with_db(|db| {
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
            }
            Ok(state)
        })
    }

    /// Replaces every replicated record and the metadata with `state` (a
    /// Raft snapshot being installed), in one transaction. Every record
    /// must open under this store's master key first: a snapshot sealed
    /// under another key is refused whole and changes nothing.
    pub fn install_replicated(&self, state: &ReplicatedState) -> Result<(), StoreError> {
        let keys = self.read_keys();
        for r in &state.records {
            open_record(&keys.master, r.table.name(), &r.name, &r.sealed)?;
        }
        self.with_db(|db| {
            let txn = db_err!(db.begin_write())?;
            for table in [Table::Keys, Table::Users] {
                let mut t = db_err!(txn.open_table(table.def()))?;
                db_err!(t.retain(|_, _| false))?;
            }
            for r in &state.records {
                let mut t = db_err!(txn.open_table(r.table.def()))?;
                db_err!(t.insert(r.name.as_str(), r.sealed.as_slice()))?;
            }
            {
                let mut sm = db_err!(txn.open_table(RAFT_SM))?;
                db_err!(sm.retain(|_, _| false))?;
                if let Some(a) = &state.applied {
                    db_err!(sm.insert(SM_APPLIED, a.as_slice()))?;
                }
                if let Some(m) = &state.membership {
                    db_err!(sm.insert(SM_MEMBERSHIP, m.as_slice()))?;
                }
            }
            db_err!(txn.commit())
        })
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
