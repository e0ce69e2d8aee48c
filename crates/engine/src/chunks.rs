//! Chunk I/O shared by the pipelines: fetch and verify one block.

use std::sync::Arc;

use ferry_repo::{ChunkId, Repository};

/// Downloads, decrypts, decompresses and verifies one chunk (its content must hash to `id`).
/// Decoding runs on the blocking pool under a CPU permit.
pub async fn fetch_block(repo: &Arc<Repository>, id: &ChunkId) -> Result<Vec<u8>, ferry_repo::Error> {
    let object = Vec::from(repo.get_chunk_object(id).await?);
    let worker_failed = |what: String| ferry_repo::Error::Io {
        context: "decode worker".into(),
        source: std::io::Error::other(what),
    };
    let _permit = crate::cpu::permit().await.map_err(|e| worker_failed(e.to_string()))?;
    let (repo, id) = (repo.clone(), *id);
    tokio::task::spawn_blocking(move || repo.decode_chunk(&id, object))
        .await
        .unwrap_or_else(|e| Err(worker_failed(e.to_string())))
}
