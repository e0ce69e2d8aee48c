//! Chunk I/O shared by the pipelines: fetch and verify one block.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_repo::{delta_chain, ChunkId, Delta, DeltaRef, Repository};

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

/// Downloads and opens delta object `object`, checking it is the delta of `target` on `base`
/// (decoding on the CPU pool).
pub async fn fetch_delta(repo: &Arc<Repository>, object: &ChunkId, target: &ChunkId, base: &ChunkId) -> Result<Delta, ferry_repo::Error> {
    let bytes = Vec::from(repo.get_chunk_object(object).await?);
    let (repo, object, target, base) = (repo.clone(), *object, *target, *base);
    crate::cpu::run(move || repo.decode_delta(&object, &target, &base, bytes))
        .await
        .unwrap_or_else(|e| {
            Err(ferry_repo::Error::Io {
                context: "decode worker".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// A block's content could not be produced: which object failed, and why.
#[derive(Debug)]
pub struct ContentError {
    /// The object at fault (a whole chunk or a delta object), or the newest delta when the
    /// applied chain does not hash to the block's content ID.
    pub object: ChunkId,
    /// Why.
    pub error: Box<ferry_repo::Error>,
}

/// [`delta_chain`] with its failure (a table too deep: never from a manifest that decoded) as
/// the content's error.
fn chain_of(deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> Result<(Vec<(ChunkId, DeltaRef)>, ChunkId), ContentError> {
    delta_chain(deltas, id).map_err(|reason| ContentError {
        object: *id,
        error: Box::new(ferry_repo::Error::DeltaDecode {
            path: id.object_key(),
            reason,
        }),
    })
}

/// Every object the content `id` needs under `deltas`, newest delta first, the whole chunk
/// last.
pub fn block_objects(deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> Result<Vec<ChunkId>, ContentError> {
    let (chain, whole) = chain_of(deltas, id)?;
    Ok(chain.iter().map(|(_, d)| d.object).chain(std::iter::once(whole)).collect())
}

/// Produces the content `id` under a manifest's delta table: a whole chunk, or a whole chunk
/// and the deltas on it (all fetched at once), applied oldest first; the result must hash to
/// `id`.
pub async fn fetch_content(repo: &Arc<Repository>, deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> Result<Vec<u8>, ContentError> {
    if !deltas.contains_key(id) {
        return fetch_block(repo, id).await.map_err(|error| ContentError {
            object: *id,
            error: Box::new(error),
        });
    }
    let (chain, whole) = chain_of(deltas, id)?;
    let base = async {
        fetch_block(repo, &whole).await.map_err(|error| ContentError {
            object: whole,
            error: Box::new(error),
        })
    };
    let fetches = chain.iter().map(|(target, d)| {
        let (target, d) = (*target, *d);
        async move {
            fetch_delta(repo, &d.object, &target, &d.base).await.map_err(|error| ContentError {
                object: d.object,
                error: Box::new(error),
            })
        }
    });
    let (base, applied) = futures::join!(base, futures::future::try_join_all(fetches));
    let (mut content, applied) = (base?, applied?);
    let (repo2, newest, target) = (repo.clone(), chain[0].1.object, *id);
    crate::cpu::run(move || {
        for delta in applied.iter().rev() {
            content = delta.apply(content);
        }
        let actual = repo2.chunk_id(&content);
        if actual != target {
            return Err(ContentError {
                object: newest,
                error: Box::new(ferry_repo::Error::DeltaDecode {
                    path: newest.object_key(),
                    reason: format!("its chain gives content {actual}, not {target}"),
                }),
            });
        }
        Ok(content)
    })
    .await
    .map_err(|e| ContentError {
        object: newest,
        error: Box::new(ferry_repo::Error::Io {
            context: "decode worker".into(),
            source: std::io::Error::other(e.to_string()),
        }),
    })?
}
