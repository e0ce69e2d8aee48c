//! Quarantine: chunks an audit or a restore found missing or corrupt (FORMAT.md §13).
//!
//! `quarantine/<chunk id hex>` is a sealed record saying why; a corrupt chunk object is
//! deleted after its bytes are kept as `quarantine/<chunk id hex>.object` (for forensics), so
//! the create-only upload of the next backup that has the block can put a good copy back.
//! Backups treat a quarantined chunk as unknown (HEAD, never the index), RBD incrementals
//! re-read blocks that reference one, and the backup that uploads it again removes the record.

use std::collections::HashSet;

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::gc::put_record;
use crate::repo::{p, Repository};

/// What a read of a chunk object found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// No object.
    Missing,
    /// The object decodes to content with this ID.
    Good,
    /// The object exists but does not decode to this ID (damaged or not authentic).
    Corrupt,
}

#[derive(Serialize, Deserialize)]
struct Record {
    reason: String,
    found: chrono::DateTime<chrono::Utc>,
}

fn record_key(id: &ChunkId) -> String {
    format!("quarantine/{}", id.to_hex())
}

impl Repository {
    /// Quarantines chunk `id` (`corrupt`: its object exists but fails to decode; it is copied
    /// aside and deleted). Idempotent.
    pub async fn quarantine(&self, id: &ChunkId, reason: &str, corrupt: bool) -> Result<()> {
        let body = serde_json::to_vec(&Record {
            reason: reason.to_string(),
            found: chrono::Utc::now(),
        })
        .map_err(|source| Error::Json {
            context: "encoding a quarantine record".into(),
            source,
        })?;
        put_record(self, &record_key(id), &body).await?;
        // Delete only what is still corrupt: a good copy may have been stored since it was read.
        if corrupt && self.chunk_state(id).await? == ChunkState::Corrupt {
            let (from, to) = (p(&id.object_key()), p(&format!("{}.object", record_key(id))));
            match self.store().inner.copy(&from, &to).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::store("copy", &from, e)),
            }
            match self.store().inner.delete(&from).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::store("delete", &from, e)),
            }
        }
        Ok(())
    }

    /// Reads and decodes a chunk object (a HEAD cannot tell a corrupt copy from a good one).
    pub async fn chunk_state(&self, id: &ChunkId) -> Result<ChunkState> {
        let object = match self.get_chunk_object(id).await {
            Ok(b) => b,
            Err(Error::NotFound { .. }) => return Ok(ChunkState::Missing),
            Err(e) if e.is_integrity() => return Ok(ChunkState::Corrupt),
            Err(e) => return Err(e),
        };
        let (repo, id) = (self.clone(), *id);
        // A delta object (kind 07) is checked as one: authentic, payload hashing to its ID.
        let is_delta = object.get(5) == Some(&(crate::object::ObjectKind::Delta as u8));
        match tokio::task::spawn_blocking(move || {
            if is_delta {
                repo.open_delta(&id, Vec::from(object)).map(|_| ())
            } else {
                repo.decode_chunk(&id, Vec::from(object)).map(|_| ())
            }
        })
        .await
        {
            Ok(Ok(_)) => Ok(ChunkState::Good),
            Ok(Err(e)) if e.is_integrity() => Ok(ChunkState::Corrupt),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Io {
                context: "decoding a chunk".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Stores a good copy of a quarantined chunk: nothing if a good one is there, an upload if
    /// none is, the damaged object deleted first if it is still there. Returns whether this
    /// call stored it. Drops the quarantine record once a good copy is there.
    pub async fn restore_quarantined(&self, id: &ChunkId, encoded: Vec<u8>) -> Result<bool> {
        let stored = match self.chunk_state(id).await? {
            ChunkState::Good => false,
            ChunkState::Missing => self.put_chunk(id, encoded).await?,
            ChunkState::Corrupt => {
                let path = p(&id.object_key());
                match self.store().inner.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Error::store("delete", &path, e)),
                }
                self.put_chunk(id, encoded).await?
            }
        };
        let _ = self.release_quarantine(id).await;
        Ok(stored)
    }

    /// The quarantined chunk IDs (one LIST).
    pub async fn quarantined(&self) -> Result<HashSet<ChunkId>> {
        let metas = self.list_prefix("quarantine").await?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename().and_then(ChunkId::from_hex))
            .collect())
    }

    /// Removes a chunk's quarantine record (it was uploaded again); its kept object stays.
    pub async fn release_quarantine(&self, id: &ChunkId) -> Result<()> {
        let path = p(&record_key(id));
        match self.store().inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store("delete", &path, e)),
        }
    }
}
