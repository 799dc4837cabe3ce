//! The replicated state machine: the engine's store. Applying an entry is
//! one store transaction holding the entry's record ops and the last
//! applied log id (and membership), through `Engine::apply_replicated`, so
//! the engine's key rings are refreshed by the same path on every member.
//! A snapshot is every replicated record as stored (sealed) plus that
//! metadata, read in one transaction: built on demand from the store itself.
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta};

use super::types::{
    read_err, write_err, Entry, LogId, Request, Response, StorageError, StoredMembership,
    TypeConfig,
};
use crate::engine::store::ReplicatedState;
use crate::engine::Engine;

#[derive(Clone)]
pub struct StateMachine {
    engine: Arc<Engine>,
}

impl StateMachine {
    pub fn new(engine: Arc<Engine>) -> StateMachine {
        StateMachine { engine }
    }

    fn meta(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let (applied, membership) = self.engine.replicated_meta().map_err(read_err)?;
        let applied = match applied {
            Some(a) => serde_json::from_slice(&a).map_err(read_err)?,
            None => None,
        };
        let membership = match membership {
            Some(m) => serde_json::from_slice(&m).map_err(read_err)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let state =
            tokio::task::block_in_place(|| self.engine.replicated_state()).map_err(read_err)?;
        let applied: Option<LogId> = match &state.applied {
            Some(a) => serde_json::from_slice(a).map_err(read_err)?,
            None => None,
        };
        let membership: StoredMembership = match &state.membership {
            Some(m) => serde_json::from_slice(m).map_err(read_err)?,
            None => StoredMembership::default(),
        };
        let bytes = serde_json::to_vec(&state).map_err(read_err)?;
        let snapshot_id = match &applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            },
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.build()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.meta()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            let applied = serde_json::to_vec(&Some(entry.log_id)).map_err(write_err)?;
            if let EntryPayload::Normal(Request {
                rotate: Some(wrapped),
                mac,
                ..
            }) = &entry.payload
            {
                use base64::Engine as _;
                let wrapped = base64::engine::general_purpose::STANDARD
                    .decode(wrapped)
                    .unwrap_or_default();
                let mac = hex::decode(mac).unwrap_or_default();
                let outcome = tokio::task::block_in_place(|| {
                    self.engine.apply_rotation(&wrapped, &mac, &applied, None)
                })
                .map_err(write_err)?;
                out.push(Response {
                    conflict: outcome.err().map(|c| c.to_string()),
                });
                continue;
            }
            let (ops, mac, membership) = match &entry.payload {
                EntryPayload::Blank => (&[][..], Vec::new(), None),
                EntryPayload::Normal(req) => (
                    req.ops.as_slice(),
                    hex::decode(&req.mac).unwrap_or_default(),
                    None,
                ),
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    (
                        &[][..],
                        Vec::new(),
                        Some(serde_json::to_vec(&stored).map_err(write_err)?),
                    )
                }
            };
            let outcome = tokio::task::block_in_place(|| {
                self.engine
                    .apply_replicated(ops, &mac, &applied, membership.as_deref())
            })
            .map_err(write_err)?;
            out.push(Response {
                conflict: outcome.err().map(|c| c.to_string()),
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let mut state: ReplicatedState =
            serde_json::from_slice(snapshot.get_ref()).map_err(read_err)?;
        // The snapshot's own metadata is what openraft agreed on.
        state.applied = Some(serde_json::to_vec(&meta.last_log_id).map_err(write_err)?);
        state.membership = Some(serde_json::to_vec(&meta.last_membership).map_err(write_err)?);
        tokio::task::block_in_place(|| self.engine.install_replicated(&state))
            .map_err(write_err)?;
        tracing::info!(snapshot = %meta.snapshot_id, records = state.records.len(), "cluster snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshot = self.build()?;
        Ok(snapshot.meta.last_log_id.is_some().then_some(snapshot))
    }
}
