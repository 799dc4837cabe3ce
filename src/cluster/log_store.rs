//! The Raft log and vote, in their own redb file (`<data_dir>/raft.redb`,
//! committed with redb's default immediate durability: an append is on disk
//! before openraft is told it is). Entries hold sealed records only (see
//! `crate::engine::store::RecordOp`); the file is shredded when the node
//! zeroizes, since its entries are sealed under the cluster key.
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{read_err, write_err, Entry, LogId, NodeId, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(path: &Path) -> Result<LogStore, redb::Error> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(META).map_err(read_err)?;
        match t.get(key).map_err(read_err)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(read_err),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        blocking(|| {
            let txn = self.db.begin_write().map_err(write_err)?;
            txn.open_table(META)
                .map_err(write_err)?
                .insert(key, bytes.as_slice())
                .map_err(write_err)?;
            txn.commit().map_err(write_err)
        })
    }
}

/// redb commits fsync: off the async worker's back.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => t.range(start..end).map_err(read_err)?,
            None => t.range(start..).map_err(read_err)?,
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get_meta(PURGED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        let last = match t.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry = serde_json::from_slice(v.value()).map_err(read_err)?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.log_id.index, serde_json::to_vec(&e).map_err(write_err)?));
        }
        let done = blocking(|| {
            let txn = self.db.begin_write().map_err(write_err)?;
            {
                let mut t = txn.open_table(LOG).map_err(write_err)?;
                for (index, bytes) in &encoded {
                    t.insert(*index, bytes.as_slice()).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)
        });
        match done {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        blocking(|| {
            let txn = self.db.begin_write().map_err(write_err)?;
            {
                let mut t = txn.open_table(LOG).map_err(write_err)?;
                t.retain_in(log_id.index.., |_, _| false)
                    .map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(PURGED, &log_id)?;
        blocking(|| {
            let txn = self.db.begin_write().map_err(write_err)?;
            {
                let mut t = txn.open_table(LOG).map_err(write_err)?;
                t.retain_in(..=log_id.index, |_, _| false)
                    .map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
    }
}
