//! Restore: a manifest's block map → a raw volume (file, block device, stdout) or an
//! export-diff stream for `rbd import-diff`.
//!
//! Chunks are fetched and decoded with many requests in flight; file targets take positional
//! writes in any order, streams keep block order. Every chunk's ID is re-checked after
//! decryption; a bad or missing chunk is reported with its block and offset.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_repo::{decode_chunk, ChunkId, Manifest, Repository, MAX_BLOCK_SIZE};
use futures::StreamExt;
use rbd_diff::{DiffHeader, DiffWriter};
use serde::Serialize;

/// Downloads, verifies and decodes one chunk.
pub async fn fetch_block(repo: &Repository, id: &ChunkId) -> Result<Vec<u8>, ferry_repo::Error> {
    let object = Vec::from(repo.get_chunk_object(id).await?);
    let key = repo.key().clone();
    let id = *id;
    // Decoding is CPU work: at most one per core at a time, however many downloads are in
    // flight, so memory stays bounded.
    let _permit = cpu_permit().await;
    tokio::task::spawn_blocking(move || decode_chunk(&key, &id, object, MAX_BLOCK_SIZE as usize))
        .await
        .unwrap_or_else(|e| {
            Err(ferry_repo::Error::Io {
                context: "decode worker".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// A permit for CPU-heavy work (hashing, compression, encryption): one per core.
pub async fn cpu_permit() -> tokio::sync::SemaphorePermit<'static> {
    static CPU: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let sem = CPU.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)));
    // The semaphore is never closed.
    sem.acquire().await.unwrap_or_else(|_| unreachable!("CPU semaphore closed"))
}

/// A block that could not be restored.
#[derive(Debug, Clone, Serialize)]
pub struct BlockFailure {
    pub block: u64,
    pub offset: u64,
    pub chunk: String,
    pub error: String,
}

impl std::fmt::Display for BlockFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {} (offset {}), chunk {}: {}",
            self.block, self.offset, self.chunk, self.error
        )
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RestoreReport {
    pub image_size: u64,
    pub blocks: u64,
    pub blocks_written: u64,
    pub blocks_hole: u64,
    pub bytes_written: u64,
    pub failures: Vec<BlockFailure>,
    pub duration_ms: u64,
}

pub struct RestoreOptions {
    pub jobs: usize,
    pub best_effort: bool,
    /// Holes must be written as zeros (block devices, overwriting an existing file).
    pub write_holes: bool,
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

fn failure(m: &Manifest, index: u64, id: &ChunkId, e: &ferry_repo::Error) -> BlockFailure {
    BlockFailure {
        block: index,
        offset: index * m.meta.block_size,
        chunk: id.to_hex(),
        error: e.to_string(),
    }
}

/// Restores into a file or block device with positional writes, out of order.
pub async fn restore_to_file(
    repo: Arc<Repository>,
    manifest: Arc<Manifest>,
    file: Arc<std::fs::File>,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let mut report = RestoreReport {
        image_size: manifest.meta.image_size,
        blocks: manifest.blocks.len() as u64,
        ..Default::default()
    };
    let zeros: Arc<Vec<u8>> = Arc::new(if opts.write_holes {
        vec![0u8; manifest.meta.block_size as usize]
    } else {
        Vec::new()
    });
    let mut done = 0u64;
    let jobs = (0..manifest.blocks.len() as u64).map(|i| {
        let repo = repo.clone();
        let manifest = manifest.clone();
        let file = file.clone();
        let zeros = zeros.clone();
        async move {
            let offset = i * manifest.meta.block_size;
            let len = manifest.block_len(i) as usize;
            match manifest.blocks[i as usize] {
                None if zeros.is_empty() => Ok::<_, BlockErr>((i, 0u64, true)),
                None => {
                    tokio::task::spawn_blocking(move || file.write_all_at(&zeros[..len], offset)).await??;
                    Ok((i, len as u64, true))
                }
                Some(id) => {
                    let data = fetch_block(&repo, &id)
                        .await
                        .map_err(|e| BlockErr::Failure(failure(&manifest, i, &id, &e)))?;
                    let n = data.len().min(len);
                    let pad = if n < len && !zeros.is_empty() { len - n } else { 0 };
                    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        file.write_all_at(&data[..n], offset)?;
                        if pad > 0 {
                            file.write_all_at(&zeros[..pad], offset + n as u64)?;
                        }
                        Ok(())
                    })
                    .await??;
                    Ok((i, (n + pad) as u64, false))
                }
            }
        }
    });
    let mut results = futures::stream::iter(jobs).buffer_unordered(opts.jobs.max(1));
    while let Some(r) = results.next().await {
        match r {
            Ok((_, n, hole)) => {
                if hole {
                    report.blocks_hole += 1;
                } else {
                    report.blocks_written += 1;
                }
                report.bytes_written += n;
            }
            Err(BlockErr::Failure(f)) => {
                report.failures.push(f);
                if !opts.best_effort && report.failures.len() >= 1000 {
                    break;
                }
            }
            Err(BlockErr::Fatal(e)) => return Err(e),
        }
        done += 1;
        if let Some(cb) = &opts.progress {
            cb(done * manifest.meta.block_size);
        }
    }
    report.failures.sort_by_key(|f| f.block);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Why a block was not restored: a damaged/missing chunk (reported, maybe skipped) or a
/// failure of the target itself (stops the restore).
enum BlockErr {
    Failure(BlockFailure),
    Fatal(anyhow::Error),
}

impl From<std::io::Error> for BlockErr {
    fn from(e: std::io::Error) -> Self {
        BlockErr::Fatal(anyhow::Error::new(e).context("writing the restore target"))
    }
}

impl From<tokio::task::JoinError> for BlockErr {
    fn from(e: tokio::task::JoinError) -> Self {
        BlockErr::Fatal(anyhow::Error::new(e).context("restore worker panicked"))
    }
}

/// What an ordered stream emits per block.
enum Piece {
    Data(Vec<u8>),
    Hole,
    Failed(BlockFailure),
}

/// Yields every block's content in order, fetching `jobs` ahead.
fn ordered_blocks(repo: Arc<Repository>, manifest: Arc<Manifest>, jobs: usize) -> impl futures::Stream<Item = (u64, Piece)> {
    futures::stream::iter(0..manifest.blocks.len() as u64)
        .map(move |i| {
            let repo = repo.clone();
            let manifest = manifest.clone();
            async move {
                match manifest.blocks[i as usize] {
                    None => (i, Piece::Hole),
                    Some(id) => match fetch_block(&repo, &id).await {
                        Ok(d) => (i, Piece::Data(d)),
                        Err(e) => (i, Piece::Failed(failure(&manifest, i, &id, &e))),
                    },
                }
            }
        })
        .buffered(jobs.max(1))
}

/// Output format of a stream restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    Raw,
    ImportDiff,
}

/// Restores to a sequential writer (stdout, a pipe into `rbd import-diff`). A failed block
/// stops the stream unless `best_effort` (then it is written as zeros and reported).
pub async fn restore_to_stream<W: Write + Send + 'static>(
    repo: Arc<Repository>,
    manifest: Arc<Manifest>,
    out: W,
    format: StreamFormat,
    snap_name: Option<String>,
    opts: &RestoreOptions,
) -> Result<(RestoreReport, W)> {
    let started = std::time::Instant::now();
    let bs = manifest.meta.block_size;
    let size = manifest.meta.image_size;
    let mut report = RestoreReport {
        image_size: size,
        blocks: manifest.blocks.len() as u64,
        ..Default::default()
    };
    // Writes happen on a blocking thread fed through a small channel: stdout may block.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Option<Vec<u8>>)>(4);
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, W)> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
        let zeros = vec![0u8; bs as usize];
        let mut written = 0u64;
        match format {
            StreamFormat::Raw => {
                while let Some((i, data)) = rx.blocking_recv() {
                    let len = (size - i * bs).min(bs) as usize;
                    let d = data.as_deref().unwrap_or(&[]);
                    let n = d.len().min(len);
                    out.write_all(&d[..n])?;
                    out.write_all(&zeros[..len - n])?;
                    written += len as u64;
                }
                out.flush()?;
                Ok((written, out.into_inner().map_err(|e| e.into_error())?))
            }
            StreamFormat::ImportDiff => {
                let header = DiffHeader {
                    from_snap: None,
                    to_snap: snap_name,
                    image_size: size,
                    protected: None,
                };
                let mut w = DiffWriter::new(out, &header)?;
                // Runs of holes (and zero tails) become one `z` each.
                let mut zero_run: Option<(u64, u64)> = None;
                let mut received = 0u64;
                while let Some((i, data)) = rx.blocking_recv() {
                    received += 1;
                    let off = i * bs;
                    let len = (size - off).min(bs);
                    let d = data.as_deref().unwrap_or(&[]);
                    let n = (d.len() as u64).min(len);
                    if n > 0 {
                        if let Some((zo, zl)) = zero_run.take() {
                            w.write_zero(zo, zl)?;
                        }
                        w.write_data(off, &d[..n as usize])?;
                        written += n;
                    }
                    if n < len {
                        match &mut zero_run {
                            Some((zo, zl)) if *zo + *zl == off + n => *zl += len - n,
                            _ => {
                                if let Some((zo, zl)) = zero_run.take() {
                                    w.write_zero(zo, zl)?;
                                }
                                zero_run = Some((off + n, len - n));
                            }
                        }
                    }
                }
                // Never end a short stream with `e`: rbd import-diff would take it as complete.
                if received != size.div_ceil(bs) {
                    anyhow::bail!("restore stream cut short after {received} blocks; no end record written");
                }
                if let Some((zo, zl)) = zero_run.take() {
                    w.write_zero(zo, zl)?;
                }
                let mut out = w.finish()?;
                out.flush()?;
                Ok((written, out.into_inner().map_err(|e| e.into_error())?))
            }
        }
    });
    let mut blocks = std::pin::pin!(ordered_blocks(repo, manifest.clone(), opts.jobs));
    let mut stop: Option<anyhow::Error> = None;
    while let Some((i, piece)) = blocks.next().await {
        let data = match piece {
            Piece::Hole => {
                report.blocks_hole += 1;
                None
            }
            Piece::Data(d) => {
                report.blocks_written += 1;
                Some(d)
            }
            Piece::Failed(f) => {
                let msg = f.to_string();
                report.failures.push(f);
                if !opts.best_effort {
                    stop = Some(anyhow::anyhow!("restore stopped at {msg}"));
                    break;
                }
                None
            }
        };
        if tx.send((i, data)).await.is_err() {
            break;
        }
        if let Some(cb) = &opts.progress {
            cb((i + 1) * bs);
        }
    }
    drop(tx);
    let written = writer.await.context("restore writer panicked")?;
    if let Some(e) = stop {
        // The writer saw a short stream; what matters is the block failure.
        let _ = written;
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Err(e.context(RestoreFailed(report)));
    }
    let (written, out) = written.context("writing the restore stream")?;
    report.bytes_written = written;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok((report, out))
}

/// Carries the partial report of a stream restore that stopped at a bad block.
#[derive(Debug)]
pub struct RestoreFailed(pub RestoreReport);

impl std::fmt::Display for RestoreFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "restore incomplete: {} block(s) failed", self.0.failures.len())
    }
}

impl std::error::Error for RestoreFailed {}
