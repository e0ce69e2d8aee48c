//! Chunk I/O shared by the pipelines: fetch and verify one block.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_repo::{delta_chain, ChunkId, DeltaRef, Repository};

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

/// A block's objects as downloaded, not yet opened: what [`download_content`] gives and
/// [`open_content`] turns into the content. Pipelines keep many downloads in flight (the
/// store's latency) while only as many blocks as there are cores are opened at once.
pub struct Downloaded {
    /// The content ID the objects must produce.
    id: ChunkId,
    /// The whole chunk under the deltas (the block's own chunk when it has none) and its bytes.
    whole: (ChunkId, Vec<u8>),
    /// The deltas on it, newest first: (the content each produces, its entry, its bytes).
    deltas: Vec<(ChunkId, DeltaRef, Vec<u8>)>,
}

fn content_error(object: ChunkId) -> impl FnOnce(ferry_repo::Error) -> ContentError {
    move |error| ContentError {
        object,
        error: Box::new(error),
    }
}

fn worker_failed(object: ChunkId, what: String) -> ContentError {
    ContentError {
        object,
        error: Box::new(ferry_repo::Error::Io {
            context: "decode worker".into(),
            source: std::io::Error::other(what),
        }),
    }
}

/// Downloads every object the content `id` needs under `deltas` (all at once), without
/// opening them.
pub async fn download_content(
    repo: &Arc<Repository>,
    deltas: &BTreeMap<ChunkId, DeltaRef>,
    id: &ChunkId,
) -> Result<Downloaded, ContentError> {
    let get = |object: ChunkId| async move { repo.get_chunk_object(&object).await.map(Vec::from).map_err(content_error(object)) };
    if !deltas.contains_key(id) {
        return Ok(Downloaded {
            id: *id,
            whole: (*id, get(*id).await?),
            deltas: Vec::new(),
        });
    }
    let (chain, whole) = chain_of(deltas, id)?;
    let fetches = chain.iter().map(|(target, d)| {
        let (target, d) = (*target, *d);
        async move { Ok::<_, ContentError>((target, d, get(d.object).await?)) }
    });
    let (base, applied) = futures::join!(get(whole), futures::future::try_join_all(fetches));
    Ok(Downloaded {
        id: *id,
        whole: (whole, base?),
        deltas: applied?,
    })
}

/// [`download_content`] as a task of its own, so that the download proceeds while the
/// pipeline that asked for it is busy elsewhere (a stream stage polls its futures only when
/// its consumer asks for more). Dropping the future aborts the download.
pub async fn download_in_background(
    repo: Arc<Repository>,
    manifest: Arc<ferry_repo::Manifest>,
    id: ChunkId,
) -> Result<Downloaded, ContentError> {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(async move { download_content(&repo, &manifest.deltas, &id).await }));
    (&mut task.0).await.unwrap_or_else(|e| Err(worker_failed(id, e.to_string())))
}

/// Opens what [`download_content`] fetched — decrypts, decompresses, applies the deltas
/// oldest first — and checks the result hashes to the block's content ID. CPU work: on the
/// blocking pool under a CPU permit.
pub async fn open_content(repo: &Arc<Repository>, d: Downloaded) -> Result<Vec<u8>, ContentError> {
    // A worker that fails names the object it was given first (the whole chunk).
    let target = d.whole.0;
    let _permit = crate::cpu::permit().await.map_err(|e| worker_failed(target, e.to_string()))?;
    let repo = repo.clone();
    tokio::task::spawn_blocking(move || {
        let Downloaded { id, whole, deltas } = d;
        let mut content = repo.decode_chunk(&whole.0, whole.1).map_err(content_error(whole.0))?;
        if deltas.is_empty() {
            return Ok(content);
        }
        let newest = deltas[0].1.object;
        for (target, entry, bytes) in deltas.into_iter().rev() {
            let delta = repo
                .decode_delta(&entry.object, &target, &entry.base, bytes)
                .map_err(content_error(entry.object))?;
            content = delta.apply(content);
        }
        let actual = repo.chunk_id(&content);
        if actual != id {
            return Err(ContentError {
                object: newest,
                error: Box::new(ferry_repo::Error::DeltaDecode {
                    path: newest.object_key(),
                    reason: format!("its chain gives content {actual}, not {id}"),
                }),
            });
        }
        Ok(content)
    })
    .await
    .unwrap_or_else(|e| Err(worker_failed(target, e.to_string())))
}

/// Produces the content `id` under a manifest's delta table: a whole chunk, or a whole chunk
/// and the deltas on it (all fetched at once), applied oldest first; the result must hash to
/// `id`.
pub async fn fetch_content(repo: &Arc<Repository>, deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> Result<Vec<u8>, ContentError> {
    let downloaded = download_content(repo, deltas, id).await?;
    open_content(repo, downloaded).await
}
