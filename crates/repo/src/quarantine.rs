//! Quarantine: chunks an audit or a restore found missing or corrupt (FORMAT.md §13).
//!
//! `quarantine/<chunk id hex>` is a sealed record saying why; a corrupt chunk object is
//! deleted after its bytes are kept as `quarantine/<chunk id hex>.object` (for forensics), so
//! the create-only upload of the next backup that has the block can put a good copy back.
//! Backups treat a quarantined chunk as unknown (HEAD, never the index), RBD incrementals
//! re-read blocks that reference one, and the backup that uploads it again removes the record.

use std::collections::HashSet;

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::gc::put_record;
use crate::repo::{p, Repository};

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
        if corrupt {
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

    /// The quarantined chunk IDs (one LIST).
    pub async fn quarantined(&self) -> Result<HashSet<ChunkId>> {
        let prefix = p("quarantine");
        let metas: Vec<_> = self
            .retry_policy()
            .run(
                || "listing quarantine/".to_string(),
                || async {
                    self.store()
                        .inner
                        .list(Some(&prefix))
                        .try_collect::<Vec<_>>()
                        .await
                        .map_err(|e| Error::store("list", &prefix, e))
                },
            )
            .await?;
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
