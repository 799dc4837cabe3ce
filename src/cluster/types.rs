//! The Raft types hsmgate instantiates openraft with. Only this module and
//! its siblings name openraft; the rest of the crate sees `crate::cluster`.
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::engine::store::RecordOp;

/// One log entry's payload: a batch of sealed record changes that applies
/// whole or not at all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub ops: Vec<RecordOp>,
    /// HMAC-SHA256 of `ops` under a key derived from the cluster key
    /// (`Engine::entry_mac`), hex: checked by every member on apply. For a
    /// rotation: the tag of `rotate` (`Engine::cluster_key_rotation`).
    pub mac: String,
    /// A cluster-key rotation (then `ops` is empty): the new cluster key
    /// sealed under a key derived from the current one, base64. Only the
    /// leader proposes one; the cluster port refuses it from anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate: Option<String>,
}

/// What applying an entry gave: `conflict` names the record whose
/// precondition failed (then nothing of the batch applied, on any member).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub conflict: Option<String>,
}

openraft::declare_raft_types!(
    /// hsmgate's Raft configuration: node ids are the operators' `node_id`s,
    /// a node is its cluster address, snapshots are in-memory JSON.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;

/// A read failure of the log or state machine, as openraft wants it.
pub fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::IO {
        source: openraft::StorageIOError::read(openraft::AnyError::error(e.to_string())),
    }
}

/// A write failure of the log or state machine, as openraft wants it.
pub fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::IO {
        source: openraft::StorageIOError::write(openraft::AnyError::error(e.to_string())),
    }
}
