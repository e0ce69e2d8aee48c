//! Restore: a manifest's block map → a [`RestoreTarget`]: a raw volume (file, block device,
//! a stream such as stdout) or an export-diff stream (for `rbd import-diff`, or an RBD image).
//!
//! Chunks are fetched and decoded with many requests in flight; positional targets take
//! writes in any order, ordered targets get the blocks in order. Every chunk's ID is
//! re-checked after decryption; a bad or missing chunk is reported with its block and offset.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferry_repo::{ChunkId, Manifest, Repository};
use futures::StreamExt;
use rbd_diff::{DiffHeader, DiffWriter};
use serde::Serialize;

use crate::chunks::{download_in_background, open_content, ContentError};
use crate::error::{Error, ErrorKind, Result};
use crate::observer::{Event, Observer, Operation};

/// A block that could not be restored.
#[derive(Debug, Clone, Serialize)]
pub struct BlockFailure {
    /// Block index.
    pub block: u64,
    /// Byte offset of the block in the volume.
    pub offset: u64,
    /// The object at fault: the block's chunk, or an object of its delta chain.
    pub chunk: String,
    /// Why it could not be read.
    pub error: String,
    /// The kind of failure (integrity or transient).
    pub kind: ErrorKind,
    /// The chunk is missing (not damaged).
    pub missing: bool,
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

/// What a restore did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RestoreReport {
    /// Size of the volume.
    pub image_size: u64,
    /// Blocks in the map.
    pub blocks: u64,
    /// Blocks written from chunks.
    pub blocks_written: u64,
    /// Holes (written as zeros, or skipped on sparse targets).
    pub blocks_hole: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Blocks that could not be restored.
    pub failures: Vec<BlockFailure>,
    /// Wall time.
    pub duration_ms: u64,
}

/// The report of a restore that did not restore every block, as the cause of its error.
#[derive(Debug, Clone)]
pub struct RestoreIncomplete(pub RestoreReport);

impl std::fmt::Display for RestoreIncomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "restore incomplete: {} block(s) failed", self.0.failures.len())
    }
}

impl std::error::Error for RestoreIncomplete {}

/// How a restore runs.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Chunk downloads in flight (blocks are opened as they arrive: one per core plus one, two
    /// per core plus one for an ordered target).
    pub jobs: usize,
    /// Write every block that can be read (bad ones as zeros) and keep the output, instead of
    /// stopping and removing it. The restore still fails (integrity), naming the bad blocks.
    pub best_effort: bool,
    /// Quarantine chunks found missing or corrupt (FORMAT.md §13), so the next backup that
    /// has their blocks uploads them again. Best effort: a read-only credential only warns.
    pub quarantine: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            jobs: crate::default_downloads(),
            best_effort: false,
            quarantine: true,
        }
    }
}

/// Output format of an ordered restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamFormat {
    /// The volume's bytes.
    Raw,
    /// An `rbd export-diff` v1 stream for `rbd import-diff`.
    ImportDiff,
}

/// How a target takes blocks, as it says when opened.
pub enum Layout {
    /// Blocks are written at their offsets, in any order, many at a time.
    Positional {
        /// The file or block device.
        file: Arc<std::fs::File>,
        /// Holes must be written as zeros (block devices, overwritten files).
        write_holes: bool,
    },
    /// Bytes arrive in order through [`RestoreTarget::write`].
    Ordered {
        /// Raw bytes or an import-diff stream.
        format: StreamFormat,
        /// With [`StreamFormat::ImportDiff`]: the to-snapshot the stream names.
        snap_name: Option<String>,
    },
}

/// Where a restore goes. The engine calls [`open`](RestoreTarget::open) once, then writes,
/// then either [`finish`](RestoreTarget::finish) (every block written) or
/// [`abandon`](RestoreTarget::abandon) (the restore failed: remove what must not be mistaken
/// for a complete restore). All methods run on the blocking pool and may block.
pub trait RestoreTarget: Send {
    /// The target as the user named it (for messages).
    fn describe(&self) -> String;
    /// Prepares the target for `manifest` (checks sizes, creates files or images).
    fn open(&mut self, manifest: &Manifest) -> Result<Layout>;
    /// The next bytes of an ordered target.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let _ = buf;
        Err(std::io::Error::other("this target takes positional writes"))
    }
    /// Every block was written: flush, sync, wait for the consumer.
    fn finish(&mut self) -> Result<()>;
    /// The restore failed: undo what `open` created, so an incomplete restore cannot be
    /// mistaken for a complete one. Must be safe in any state. Returns what was undone
    /// ("removed the partial file …"), or `None` when nothing could be (a stream).
    fn abandon(&mut self) -> Option<String>;
}

fn failure(m: &Manifest, index: u64, ce: &ContentError) -> BlockFailure {
    let (id, e) = (&ce.object, &*ce.error);
    BlockFailure {
        block: index,
        offset: index * m.meta.block_size.get(),
        chunk: id.to_hex(),
        error: e.to_string(),
        // A chunk the manifest references and the store does not have is missing data.
        kind: match e {
            ferry_repo::Error::NotFound { .. } => ErrorKind::Integrity,
            e => crate::error::repo_error_kind(e),
        },
        missing: matches!(e, ferry_repo::Error::NotFound { .. }),
    }
}

/// Restores `manifest` into `target`. Fails with [`ErrorKind::Integrity`] (and a
/// [`RestoreIncomplete`] cause carrying the report) when blocks could not be restored.
pub(crate) async fn restore(
    repo: Arc<Repository>,
    observer: Arc<dyn Observer>,
    manifest: Arc<Manifest>,
    target: Box<dyn RestoreTarget>,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    observer.event(Event::Started {
        op: Operation::Restore,
        total: Some(manifest.meta.image_size),
    });
    let result = run(repo, observer.clone(), manifest, target, opts).await;
    observer.event(Event::Finished { op: Operation::Restore });
    result
}

async fn run(
    repo: Arc<Repository>,
    observer: Arc<dyn Observer>,
    manifest: Arc<Manifest>,
    target: Box<dyn RestoreTarget>,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let what = target.describe();
    let (mut target, layout) = {
        let m = manifest.clone();
        crate::cpu::blocking(move || {
            let mut target = target;
            match target.open(&m) {
                Ok(l) => Ok((target, l)),
                Err(e) => {
                    let _ = target.abandon();
                    Err(e)
                }
            }
        })
        .await?
    };
    let outcome = match layout {
        Layout::Positional { file, write_holes } => {
            restore_positional(repo.clone(), observer.as_ref(), manifest.clone(), file, write_holes, opts).await
        }
        Layout::Ordered { format, snap_name } => {
            let (res, t) = restore_ordered(repo.clone(), observer.as_ref(), manifest.clone(), target, format, snap_name, opts).await?;
            target = t;
            res
        }
    };
    let mut report = match outcome {
        Ok(r) => r,
        Err(e) => {
            let undone = if opts.best_effort {
                None
            } else {
                crate::cpu::blocking(move || Ok(target.abandon())).await?
            };
            return Err(e.context(format!("restore to {what} failed{}", undo_note(undone))));
        }
    };
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.failures.sort_by_key(|f| f.block);
    let how = if report.failures.is_empty() || opts.best_effort {
        let finished = crate::cpu::blocking(move || {
            let r = target.finish();
            Ok((r, target))
        })
        .await?;
        if let (Err(e), mut t) = finished {
            let undone = if opts.best_effort {
                None
            } else {
                crate::cpu::blocking(move || Ok(t.abandon())).await?
            };
            return Err(e.context(format!("restore to {what} failed{}", undo_note(undone))));
        }
        if report.failures.is_empty() {
            return Ok(report);
        }
        "written with these blocks missing".to_string()
    } else {
        let undone = crate::cpu::blocking(move || Ok(target.abandon())).await?;
        format!("failed{}", undo_note(undone))
    };
    if opts.quarantine {
        let mut bad: BTreeMap<String, bool> = BTreeMap::new();
        for f in report.failures.iter().filter(|f| f.kind == ErrorKind::Integrity) {
            bad.insert(f.chunk.clone(), f.missing);
        }
        for (hex, missing) in bad {
            let Some(id) = ChunkId::from_hex(&hex) else { continue };
            let reason = if missing { "restore: missing" } else { "restore: corrupt" };
            if let Err(e) = repo.quarantine(&id, reason, !missing).await {
                crate::observer::warn(observer.as_ref(), &format!("could not quarantine chunk {hex}: {e}"));
            }
        }
    }
    let list: Vec<String> = report.failures.iter().take(20).map(|f| format!("  {f}")).collect();
    // Bad data is integrity; if every failure was the store being unavailable, say so.
    let (kind, what_failed) = if report.failures.iter().all(|f| f.kind == ErrorKind::Transient) {
        (ErrorKind::Transient, "block(s) could not be fetched (the store is unavailable)")
    } else if report.failures.iter().all(|f| f.kind == ErrorKind::Integrity) {
        (ErrorKind::Integrity, "bad block(s)")
    } else {
        (ErrorKind::Integrity, "block(s) failed, some damaged, some unreachable")
    };
    let message = format!(
        "restore to {what} {how}: {} {what_failed}:\n{}{}",
        report.failures.len(),
        list.join("\n"),
        if report.failures.len() > 20 { "\n  ..." } else { "" }
    );
    Err(Error::new(kind, message, Some(Box::new(RestoreIncomplete(report)))))
}

fn undo_note(undone: Option<String>) -> String {
    match undone {
        Some(what) => format!("; {what}"),
        None => String::new(),
    }
}

/// Why a block was not restored: a damaged/missing chunk (reported, maybe skipped) or a
/// failure of the target itself (stops the restore).
enum BlockErr {
    Failure(BlockFailure),
    Fatal(Error),
}

impl From<std::io::Error> for BlockErr {
    fn from(e: std::io::Error) -> Self {
        BlockErr::Fatal(Error::new(ErrorKind::Failed, "writing the restore target", Some(Box::new(e))))
    }
}

impl From<tokio::task::JoinError> for BlockErr {
    fn from(e: tokio::task::JoinError) -> Self {
        BlockErr::Fatal(e.into())
    }
}

/// Positional writes, out of order (files and block devices).
async fn restore_positional(
    repo: Arc<Repository>,
    observer: &dyn Observer,
    manifest: Arc<Manifest>,
    file: Arc<std::fs::File>,
    write_holes: bool,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let bs = manifest.meta.block_size.get();
    let mut report = RestoreReport {
        image_size: manifest.meta.image_size,
        blocks: manifest.blocks.len() as u64,
        ..Default::default()
    };
    let zeros: Arc<Vec<u8>> = Arc::new(if write_holes { vec![0u8; bs as usize] } else { Vec::new() });
    let mut done = 0u64;
    // Two stages: `opts.jobs` downloads in flight (they hold only the stored bytes; the
    // store's latency is hidden behind them), and one block opened and written per core
    // (plus one being written while the others decode).
    let downloads = futures::stream::iter(0..manifest.blocks.len() as u64)
        .map(|i| {
            let repo = repo.clone();
            let manifest = manifest.clone();
            async move {
                match manifest.blocks[i as usize] {
                    None => (i, None),
                    Some(id) => (i, Some(download_in_background(repo, manifest, id).await)),
                }
            }
        })
        .buffer_unordered(opts.jobs.max(1));
    let jobs = downloads.map(|(i, downloaded)| {
        let repo = repo.clone();
        let manifest = manifest.clone();
        let file = file.clone();
        let zeros = zeros.clone();
        async move {
            let offset = i * bs;
            let len = manifest.block_len(i) as usize;
            match downloaded {
                None if zeros.is_empty() => Ok::<_, BlockErr>((0u64, true)),
                None => {
                    tokio::task::spawn_blocking(move || {
                        file.write_all_at(&zeros[..len], offset)?;
                        crate::target::start_writeback(&file, offset, len as u64);
                        std::io::Result::Ok(())
                    })
                    .await??;
                    Ok((len as u64, true))
                }
                Some(downloaded) => {
                    let data = match downloaded {
                        Ok(d) => open_content(&repo, d).await,
                        Err(e) => Err(e),
                    }
                    .map_err(|e| BlockErr::Failure(failure(&manifest, i, &e)))?;
                    let n = data.len().min(len);
                    let pad = if n < len && !zeros.is_empty() { len - n } else { 0 };
                    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        file.write_all_at(&data[..n], offset)?;
                        if pad > 0 {
                            file.write_all_at(&zeros[..pad], offset + n as u64)?;
                        }
                        crate::target::start_writeback(&file, offset, (n + pad) as u64);
                        Ok(())
                    })
                    .await??;
                    Ok(((n + pad) as u64, false))
                }
            }
        }
    });
    let mut results = jobs.buffer_unordered(open_stage(opts.jobs));
    while let Some(r) = results.next().await {
        match r {
            Ok((n, hole)) => {
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
        observer.event(Event::Progress {
            op: Operation::Restore,
            done: (done * bs).min(manifest.meta.image_size),
        });
    }
    Ok(report)
}

/// What an ordered restore emits per item: a block's content, a run of holes, or a failure.
enum Piece {
    Data(Vec<u8>),
    /// This many holes from the item's block on (coalesced: a sparse 1 TiB volume is a few
    /// runs, not 262,144 items handed from task to task).
    Holes(u64),
    Failed(BlockFailure),
}

/// The manifest's blocks as items: each data block alone, each run of holes as one.
struct Runs {
    manifest: Arc<Manifest>,
    next: u64,
}

impl Iterator for Runs {
    /// (first block, blocks, a hole run?)
    type Item = (u64, u64, bool);
    fn next(&mut self) -> Option<Self::Item> {
        let blocks = &self.manifest.blocks;
        let i = self.next;
        let first = blocks.get(i as usize)?;
        if first.is_some() {
            self.next = i + 1;
            return Some((i, 1, false));
        }
        let n = blocks[i as usize..].iter().take_while(|b| b.is_none()).count() as u64;
        self.next = i + n;
        Some((i, n, true))
    }
}

/// Yields the blocks' contents in order: `jobs` data blocks downloading ahead, a few more than
/// one per core opened as the stream reaches them ([`ordered_lookahead`]).
fn ordered_blocks(repo: Arc<Repository>, manifest: Arc<Manifest>, jobs: usize) -> impl futures::Stream<Item = (u64, Piece)> {
    let runs = Runs {
        manifest: manifest.clone(),
        next: 0,
    };
    let (repo2, manifest2) = (repo.clone(), manifest.clone());
    futures::stream::iter(runs)
        .map(move |(i, n, hole)| {
            let repo = repo.clone();
            let manifest = manifest.clone();
            async move {
                match manifest.blocks[i as usize] {
                    Some(id) if !hole => (i, n, Some(download_in_background(repo, manifest, id).await)),
                    _ => (i, n, None),
                }
            }
        })
        .buffered(jobs.max(1))
        .map(move |(i, n, downloaded)| {
            let repo = repo2.clone();
            let manifest = manifest2.clone();
            async move {
                match downloaded {
                    None => (i, Piece::Holes(n)),
                    Some(d) => match async { open_content(&repo, d?).await }.await {
                        Ok(d) => (i, Piece::Data(d)),
                        Err(e) => (i, Piece::Failed(failure(&manifest, i, &e))),
                    },
                }
            }
        })
        .buffered(ordered_lookahead(jobs))
}

/// Blocks being opened at once in an ordered restore: two per core plus one. In order, the
/// block at the head can be a slow one (text decodes at a third of the speed of random data)
/// while the blocks behind it are done: with only one more than the cores, a core then idles.
/// On 2 cores a restore into a pipe took 1.53–1.95 s with 6 against 1.65–2.08 s with 3 (nine
/// pairs); 5 and 6 were alike (2.06 and 2.01 s on average over six runs each), 5 holding one
/// block less.
fn ordered_lookahead(jobs: usize) -> usize {
    bounded_by_downloads(2 * crate::cpu::cores() + 1, jobs)
}

/// Blocks being opened (and, positional, written) at once: one per core plus one.
fn open_stage(jobs: usize) -> usize {
    bounded_by_downloads(crate::cpu::cores() + 1, jobs)
}

/// `n` blocks opened at once, never more than the downloads in flight (at least 2) nor 16 —
/// each holds a stored chunk and its block.
fn bounded_by_downloads(n: usize, jobs: usize) -> usize {
    n.min(jobs.max(2)).min(16)
}

/// `io::Write` over a target's ordered writes.
struct TargetWriter<'a>(&'a mut dyn RestoreTarget);

impl Write for TargetWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes the ordered stream on a blocking thread that owns the target; returns it after.
#[allow(clippy::too_many_arguments)]
async fn restore_ordered(
    repo: Arc<Repository>,
    observer: &dyn Observer,
    manifest: Arc<Manifest>,
    target: Box<dyn RestoreTarget>,
    format: StreamFormat,
    snap_name: Option<String>,
    opts: &RestoreOptions,
) -> Result<(Result<RestoreReport>, Box<dyn RestoreTarget>)> {
    let bs = manifest.meta.block_size.get();
    let size = manifest.meta.image_size;
    let mut report = RestoreReport {
        image_size: size,
        blocks: manifest.blocks.len() as u64,
        ..Default::default()
    };
    // Writes happen on a blocking thread fed through a small channel: the target may block.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, u64, Option<Vec<u8>>)>(2);
    let writer = tokio::task::spawn_blocking(move || {
        let mut target = target;
        let res = write_ordered(&mut *target, &mut rx, format, snap_name, size, bs);
        (res, target)
    });
    let mut blocks = std::pin::pin!(ordered_blocks(repo, manifest.clone(), opts.jobs));
    let mut stop: Option<String> = None;
    while let Some((i, piece)) = blocks.next().await {
        let mut count = 1;
        let data = match piece {
            Piece::Holes(n) => {
                report.blocks_hole += n;
                count = n;
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
                    stop = Some(msg);
                    break;
                }
                None
            }
        };
        if tx.send((i, count, data)).await.is_err() {
            break;
        }
        observer.event(Event::Progress {
            op: Operation::Restore,
            done: ((i + count) * bs).min(size),
        });
    }
    drop(tx);
    let (written, target) = writer.await?;
    if stop.is_some() {
        // The writer saw a short stream; what matters is the block failure (reported by the
        // caller from `report.failures`).
        return Ok((Ok(report), target));
    }
    match written {
        Ok(n) => {
            report.bytes_written = n;
            Ok((Ok(report), target))
        }
        Err(e) => Ok((Err(e), target)),
    }
}

fn write_ordered(
    target: &mut dyn RestoreTarget,
    rx: &mut tokio::sync::mpsc::Receiver<(u64, u64, Option<Vec<u8>>)>,
    format: StreamFormat,
    snap_name: Option<String>,
    size: u64,
    bs: u64,
) -> Result<u64> {
    let io = |e: std::io::Error| Error::new(ErrorKind::Failed, "writing the restore stream", Some(Box::new(e)));
    let dw = |e: rbd_diff::Error| Error::new(ErrorKind::Failed, "writing the restore stream", Some(Box::new(e)));
    let mut out = std::io::BufWriter::with_capacity(1 << 20, TargetWriter(target));
    let zeros = vec![0u8; bs.min(1 << 20) as usize];
    let mut written = 0u64;
    // Item (first block, blocks, content): `blocks` is 1 with content; without, that many
    // blocks of zeros (holes, or a failed block under best effort).
    let span = |i: u64, count: u64| -> (u64, u64) {
        let off = i.saturating_mul(bs).min(size);
        (off, i.saturating_add(count).saturating_mul(bs).min(size) - off)
    };
    match format {
        StreamFormat::Raw => {
            while let Some((i, count, data)) = rx.blocking_recv() {
                let (_, len) = span(i, count);
                let d = data.as_deref().unwrap_or(&[]);
                let n = (d.len() as u64).min(len);
                out.write_all(&d[..n as usize]).map_err(io)?;
                let mut left = len - n;
                while left > 0 {
                    let k = left.min(zeros.len() as u64);
                    out.write_all(&zeros[..k as usize]).map_err(io)?;
                    left -= k;
                }
                written += len;
            }
            out.flush().map_err(io)?;
            Ok(written)
        }
        StreamFormat::ImportDiff => {
            let header = DiffHeader {
                from_snap: None,
                to_snap: snap_name,
                image_size: size,
                protected: None,
            };
            let mut w = DiffWriter::new(out, &header).map_err(dw)?;
            // Runs of holes (and zero tails) become one `z` each.
            let mut zero_run: Option<(u64, u64)> = None;
            let mut received = 0u64;
            while let Some((i, count, data)) = rx.blocking_recv() {
                received += count;
                let (off, len) = span(i, count);
                let d = data.as_deref().unwrap_or(&[]);
                let n = (d.len() as u64).min(len);
                if n > 0 {
                    if let Some((zo, zl)) = zero_run.take() {
                        w.write_zero(zo, zl).map_err(dw)?;
                    }
                    w.write_data(off, &d[..n as usize]).map_err(dw)?;
                    written += n;
                }
                if n < len {
                    match &mut zero_run {
                        Some((zo, zl)) if *zo + *zl == off + n => *zl += len - n,
                        _ => {
                            if let Some((zo, zl)) = zero_run.take() {
                                w.write_zero(zo, zl).map_err(dw)?;
                            }
                            zero_run = Some((off + n, len - n));
                        }
                    }
                }
            }
            // Never end a short stream with `e`: rbd import-diff would take it as complete.
            if received != size.div_ceil(bs) {
                return Err(Error::failed(format!(
                    "restore stream cut short after {received} blocks; no end record written"
                )));
            }
            if let Some((zo, zl)) = zero_run.take() {
                w.write_zero(zo, zl).map_err(dw)?;
            }
            let mut out = w.finish().map_err(dw)?;
            out.flush().map_err(io)?;
            Ok(written)
        }
    }
}
