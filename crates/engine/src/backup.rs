//! Backup: an export-diff stream → fixed blocks → chunks → a committed manifest.
//!
//! The stream is parsed on a blocking thread that assembles blocks in order (the diff's
//! extents ascend) and hands finished blocks to async workers that hash, deduplicate,
//! compress, encrypt and upload them with bounded concurrency. Blocks the stream covers only
//! partly are completed from the parent backup's chunk. The manifest is written last.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_repo::{
    is_zero, BackupDraft, BackupRef, BackupStats, BlockSize, ChunkId, Decision, DeltaRef, Index, Manifest, Repository, Session, Source,
};
use rbd_diff::{DiffHeader, DiffReader, Record as DiffRecord};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::chunks::fetch_content;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::observer::{Event, Observer, Operation};

/// What the caller knows before the stream is read.
pub(crate) struct IngestParams {
    pub volume: String,
    /// Block size for a volume without backups (a chain keeps its parent's block size).
    pub block_size: BlockSize,
    /// The chain head (or a chosen parent), with its manifest.
    pub parent: Option<(BackupRef, Arc<Manifest>)>,
    /// The volume's newest backup, recorded by a full backup as the one it follows.
    pub follows: Option<String>,
    /// The backup's place in the chain: one more than the highest of the volume's backups.
    pub seq: Option<u64>,
    /// Where the data comes from (recorded in the manifest).
    pub source: Source,
    pub jobs: usize,
    pub labels: BTreeMap<String, String>,
    /// Checked after the header is read, before anything is uploaded (the rbd source insists
    /// the stream's to-snapshot is the one it created).
    pub expect_to_snap: Option<String>,
    /// Runs on a blocking thread with the finished block map just before the commit; an
    /// error aborts the backup (the rbd source checks its lease and re-reads blocks the diff
    /// called unchanged).
    pub verify: Option<Verifier>,
    /// The backup's session (begun before the parent was read: FORMAT.md §12).
    pub session: Arc<Session>,
    /// Stops the ingest when cancelled: nothing is committed (see [`Cancelled`]).
    pub cancel: Option<CancellationToken>,
    /// Store partly changed blocks as deltas on the parent's content (FORMAT.md §14).
    pub deltas: bool,
    /// The exact changed extents per block (offsets within the block), from a source that
    /// streams whole blocks (the RBD source: `export-diff --whole-object` for the data, `rbd
    /// diff` for the extents): a whole block with entries here may be stored as a delta of
    /// those ranges on the parent's content.
    pub block_extents: Option<BlockExtents>,
    /// Filled with a random sample of this backup's new delta blocks and their extents
    /// before the verifier runs (the RBD source checks them against both snapshots).
    pub delta_sample: Option<DeltaSample>,
}

/// Up to `cap` delta blocks of a backup, chosen uniformly at random: (block, extents).
#[derive(Debug, Default)]
pub(crate) struct DeltaSampleInner {
    pub cap: usize,
    pub seen: u64,
    pub picks: Vec<(u64, Vec<(u32, u32)>)>,
}

/// Shared between the ingest (writes) and the verifier (reads).
pub(crate) type DeltaSample = Arc<Mutex<DeltaSampleInner>>;

impl DeltaSampleInner {
    /// Reservoir sampling: every delta block ends up in `picks` with equal probability.
    fn offer(&mut self, index: u64, extents: Vec<(u32, u32)>) {
        use rand::Rng;
        self.seen += 1;
        if self.picks.len() < self.cap {
            self.picks.push((index, extents));
        } else if self.cap > 0 {
            let j = rand::rng().random_range(0..self.seen);
            if (j as usize) < self.cap {
                self.picks[j as usize] = (index, extents);
            }
        }
    }
}

/// Exact changed extents per block index: (offset in the block, length), ascending.
pub(crate) type BlockExtents = Arc<BTreeMap<u64, Vec<(u32, u32)>>>;

/// The backup was stopped by its caller's cancellation token before its commit (a daemon
/// shutting down); nothing was committed.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled before its commit")
    }
}

impl std::error::Error for Cancelled {}

impl Cancelled {
    /// The error a cancelled backup fails with.
    pub(crate) fn error() -> Error {
        Error::new(ErrorKind::Failed, "the backup was cancelled", Some(Box::new(Cancelled)))
    }
}

/// The pre-commit check: sees the draft (its complete block map) before it is committed.
/// It returns the time by which the manifest PUT must be answered (the RBD source: before its
/// lease lapses), if any.
pub(crate) type Verifier = Box<dyn FnOnce(&mut BackupDraft) -> Result<Option<std::time::Instant>> + Send>;

/// What the parser thread hands to the workers.
enum Work {
    /// Block content (len = block length; may be all zero). `delta`: the block was changed
    /// only in these ranges (offset, length) since the parent's content `base`, so it may be
    /// stored as a delta on it.
    Block {
        index: u64,
        data: Vec<u8>,
        delta: Option<(ChunkId, Vec<(u32, u32)>)>,
    },
    /// Block known to be all zero without looking (covered by one `z`).
    Hole { index: u64 },
}

#[derive(Default)]
struct ParseStats {
    stream_bytes: u64,
    data_bytes: u64,
    zeroed_bytes: u64,
    blocks_changed: u64,
    blocks_partial: u64,
    bytes_read_blocks: u64,
}

/// A block being assembled: its bytes and which ranges the stream covered.
struct Pending {
    index: u64,
    data: Vec<u8>,
    covered: Vec<(u64, u64)>,
}

impl Pending {
    fn cover(&mut self, start: u64, end: u64) {
        match self.covered.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.covered.push((start, end)),
        }
    }
    fn covered_len(&self) -> u64 {
        self.covered.iter().map(|(s, e)| e - s).sum()
    }
}

/// A pending block's covered ranges as delta extents (block offsets fit in u32: blocks are at
/// most 64 MiB).
fn extents(covered: &[(u64, u64)]) -> Vec<(u32, u32)> {
    covered.iter().map(|&(s, e)| (s as u32, (e - s) as u32)).collect()
}

/// The blocking half: parses and assembles blocks.
struct Assembler<'a> {
    repo: &'a Arc<Repository>,
    rt: tokio::runtime::Handle,
    block_size: u64,
    image_size: u64,
    base: &'a [Option<ChunkId>],
    /// The parent's delta table (how its contents are stored).
    base_deltas: &'a BTreeMap<ChunkId, DeltaRef>,
    /// Exact changed extents of whole blocks (see [`IngestParams::block_extents`]).
    block_extents: Option<BlockExtents>,
    /// The next block index whose absence from the stream [`Assembler::check_skipped`] checks.
    extents_cursor: u64,
    parent_size: u64,
    pending: Option<Pending>,
    tx: mpsc::Sender<Work>,
    stats: ParseStats,
    /// Whether the last block of the new image was written by the stream (blocks are finished
    /// in ascending order, so this is all the shrink rule needs; memory stays independent of
    /// the claimed image size).
    last_touched: bool,
    /// Set when a send failed because the workers stopped (their error is the cause).
    workers_stopped: bool,
}

impl Assembler<'_> {
    fn touch(&mut self, index: u64) -> Result<()> {
        if index + 1 == self.image_size.div_ceil(self.block_size) {
            self.last_touched = true;
        }
        self.check_skipped(index)?;
        self.extents_cursor = index + 1;
        Ok(())
    }

    /// Every block the exact extents name must come through the stream: one that is skipped
    /// (before `upto`) means the two views of the diff disagree, and the incremental is not
    /// to be trusted (the RBD source then takes a full backup).
    fn check_skipped(&self, upto: u64) -> Result<()> {
        let Some(map) = &self.block_extents else { return Ok(()) };
        if upto <= self.extents_cursor {
            return Ok(());
        }
        if let Some((&i, _)) = map.range(self.extents_cursor..upto).next() {
            let msg = format!(
                "diff verification failed: the exact extents name block {i} as changed, but the whole-object export-diff does not carry it"
            );
            return Err(Error::new(
                ErrorKind::Source,
                msg.clone(),
                Some(Box::new(crate::rbd::DiffVerificationFailed(msg))),
            ));
        }
        Ok(())
    }

    fn block_len(&self, index: u64) -> u64 {
        (self.image_size - index * self.block_size).min(self.block_size)
    }

    fn send(&mut self, w: Work) -> Result<()> {
        if self.tx.blocking_send(w).is_err() {
            self.workers_stopped = true;
            return Err(Error::failed("backup workers stopped"));
        }
        Ok(())
    }

    /// Starts (or continues) the pending block `index`.
    fn pending_for(&mut self, index: u64) -> Result<&mut Pending> {
        if self.pending.as_ref().is_some_and(|p| p.index != index) {
            self.finish_pending()?;
        }
        if self.pending.is_none() {
            let len = self.block_len(index) as usize;
            self.pending = Some(Pending {
                index,
                data: vec![0u8; len],
                covered: Vec::new(),
            });
        }
        self.pending.as_mut().ok_or_else(|| Error::failed("no pending block"))
    }

    fn finish_pending(&mut self) -> Result<()> {
        let Some(mut p) = self.pending.take() else {
            return Ok(());
        };
        let len = p.data.len() as u64;
        let mut delta = None;
        if p.covered_len() < len {
            // Partly covered: the rest is the parent's block (zeros if it was a hole), fetched
            // from the repository.
            if let Some(Some(id)) = self.base.get(p.index as usize).copied() {
                let old = self.fetch_parent(&id, p.index)?;
                let mut pos = 0u64;
                let mut gaps = Vec::new();
                for &(s, e) in &p.covered {
                    if s > pos {
                        gaps.push((pos, s));
                    }
                    pos = e;
                }
                if pos < len {
                    gaps.push((pos, len));
                }
                for (s, e) in gaps {
                    let (s, e) = (s as usize, e as usize);
                    let old_end = e.min(old.len());
                    if s < old_end {
                        p.data[s..old_end].copy_from_slice(&old[s..old_end]);
                    }
                }
                self.stats.bytes_read_blocks += len;
                self.stats.blocks_partial += 1;
                delta = Some((id, extents(&p.covered)));
            }
        } else if let (Some(map), Some(Some(id))) = (&self.block_extents, self.base.get(p.index as usize).copied()) {
            // A whole block whose exact changes are known: a delta candidate.
            if let Some(e) = map.get(&p.index).filter(|e| !e.is_empty()) {
                delta = Some((id, e.clone()));
            }
        }
        self.stats.blocks_changed += 1;
        self.touch(p.index)?;
        self.send(Work::Block {
            index: p.index,
            data: p.data,
            delta,
        })
    }

    fn fetch_parent(&self, id: &ChunkId, index: u64) -> Result<Vec<u8>> {
        self.rt
            .block_on(fetch_content(self.repo, self.base_deltas, id))
            .map_err(|e| Error::from(*e.error))
            .with_context(|| format!("reading block {index} (content {id}) of the parent backup to complete a partly changed block"))
    }

    /// Reads the next payload bytes of a `w` record at image offset `offset` (`len` left in
    /// the record) straight from the stream into the pending block: up to the end of that
    /// block or of the record, whichever comes first (the caller asks for the rest again).
    fn data_from<R: Read>(&mut self, reader: &mut DiffReader<R>, offset: u64, len: u64) -> Result<()> {
        let index = offset / self.block_size;
        let in_block = offset - index * self.block_size;
        // At most a block: fits usize.
        let n = (self.block_size - in_block).min(len) as usize;
        let at = in_block as usize;
        let p = self.pending_for(index)?;
        let got = reader.read_data(&mut p.data[at..at + n]).context("the diff stream is invalid")?;
        if got != n {
            return Err(Error::failed(format!(
                "the diff reader gave {got} bytes of a data record where {n} were left"
            )));
        }
        p.cover(in_block, in_block + n as u64);
        self.stats.data_bytes += n as u64;
        Ok(())
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.stats.zeroed_bytes += length;
        let end = offset + length;
        let mut off = offset;
        while off < end {
            let index = off / self.block_size;
            let in_block = off - index * self.block_size;
            let blen = self.block_len(index);
            let n = (blen - in_block).min(end - off);
            if in_block == 0 && n == blen && self.pending.as_ref().is_none_or(|p| p.index != index) {
                // A whole block zeroed: a hole, no buffer needed (cheap for huge discards).
                self.finish_pending()?;
                self.stats.blocks_changed += 1;
                self.touch(index)?;
                self.send(Work::Hole { index })?;
            } else {
                let p = self.pending_for(index)?;
                p.data[in_block as usize..(in_block + n) as usize].fill(0);
                p.cover(in_block, in_block + n);
            }
            off += n;
        }
        Ok(())
    }

    /// After `e`: a shrink that cut the last block in the middle must truncate its chunk, or
    /// a later grow would bring stale bytes back.
    fn finish(&mut self) -> Result<()> {
        self.finish_pending()?;
        self.check_skipped(u64::MAX)?;
        let nblocks = self.image_size.div_ceil(self.block_size);
        if nblocks > 0 && self.image_size < self.parent_size && !self.image_size.is_multiple_of(self.block_size) {
            let last = nblocks - 1;
            if !self.last_touched {
                if let Some(Some(id)) = self.base.get(last as usize) {
                    let mut old = self.fetch_parent(id, last)?;
                    old.resize(self.block_len(last) as usize, 0);
                    self.stats.blocks_changed += 1;
                    self.stats.blocks_partial += 1;
                    self.last_touched = true;
                    self.send(Work::Block {
                        index: last,
                        data: old,
                        delta: None,
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Checks the stream's from-snapshot against the chain.
pub(crate) fn check_chain(header: &DiffHeader, volume: &str, parent: Option<&(BackupRef, Arc<Manifest>)>) -> Result<()> {
    if let Some(from) = &header.from_snap {
        match parent {
            None => {
                return Err(Error::refused(format!(
                    "the stream is incremental (from snapshot '{from}') but volume '{volume}' has no backup to build on; back up a full stream first"
                )))
            }
            Some((r, m)) if m.meta.to_snap.as_deref() != Some(from.as_str()) => {
                return Err(Error::refused(format!(
                    "the stream's from-snapshot '{from}' does not match the to-snapshot '{}' of parent backup {} of volume '{volume}'; refusing to build a broken chain",
                    m.meta.to_snap.as_deref().unwrap_or("(none)"),
                    r.backup_id()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Marks a backup error after which the backup may nevertheless be committed: its manifest
/// PUT failed in a way that leaves the outcome unknown and reading back did not settle it.
/// Callers must not say "nothing was committed", and the RBD source keeps its new snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CommitOutcomeUnknown;

impl std::fmt::Display for CommitOutcomeUnknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the backup may be committed")
    }
}

impl std::error::Error for CommitOutcomeUnknown {}

/// The context for a failed backup: "nothing was committed", unless that is not known.
pub(crate) fn failed_backup(e: Error, what: &str) -> Error {
    if e.find::<CommitOutcomeUnknown>().is_some() {
        e.context(format!("{what}: the outcome of its commit is unknown"))
    } else {
        e.context(format!("{what} failed; nothing was committed"))
    }
}

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// Where the manifest is.
    pub backup: BackupRef,
    /// The committed manifest.
    pub manifest: Manifest,
}

/// Ingests one export-diff stream as a new backup and commits it.
///
/// `finish` is called on the parser thread with the source once parsing ended (the flag
/// says whether the stream was complete and valid); it checks the producer (e.g. `rbd
/// export-diff`'s exit status) and must fail if the producer failed, so nothing is committed
/// from a failed export.
pub(crate) async fn ingest<R, F>(
    repo: Arc<Repository>,
    index: Arc<Index>,
    observer: Arc<dyn Observer>,
    source: R,
    total: Option<u64>,
    finish: F,
    params: IngestParams,
) -> Result<BackupOutcome>
where
    R: Read + Send + 'static,
    F: FnOnce(R, bool) -> Result<()> + Send + 'static,
{
    observer.event(Event::Started {
        op: Operation::Backup,
        total,
    });
    let session = params.session.clone();
    let result = ingest_inner(repo, index, observer.clone(), source, finish, params).await;
    if let Err(e) = &result {
        // Not committed: fence our own manifest name so garbage collection need not wait for
        // this session. (An unknown commit outcome is left for a GC to settle.)
        if e.find::<CommitOutcomeUnknown>().is_none() {
            session.abort().await;
        }
    }
    observer.event(Event::Finished { op: Operation::Backup });
    if let Ok(o) = &result {
        observer.event(Event::Committed {
            backup: &o.backup,
            stats: &o.manifest.meta.stats,
        });
    }
    result
}

async fn ingest_inner<R, F>(
    repo: Arc<Repository>,
    index: Arc<Index>,
    observer: Arc<dyn Observer>,
    source: R,
    finish: F,
    params: IngestParams,
) -> Result<BackupOutcome>
where
    R: Read + Send + 'static,
    F: FnOnce(R, bool) -> Result<()> + Send + 'static,
{
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Work>(1);
    let parent = params.parent.clone();
    let default_block_size = params.block_size;
    let volume = params.volume.clone();
    let expect_to_snap = params.expect_to_snap.clone();
    let session = params.session.clone();
    // The parent's map is referenced as a whole (blocks the stream does not touch keep its
    // chunks): decide them now, before any sweep published later could take them.
    if let Some((_, m)) = &parent {
        let objects: Vec<ChunkId> = m.objects().collect();
        session.inherit(objects.iter())?;
    }
    // How the parent's contents are stored: deltas build on them, and a content found here
    // is reused as it is (its objects were inherited above).
    let parent_deltas: Arc<BTreeMap<ChunkId, DeltaRef>> = Arc::new(parent.as_ref().map(|(_, m)| m.deltas.clone()).unwrap_or_default());
    let block_extents = params.block_extents.clone();
    let use_deltas = params.deltas;

    // Parser thread.
    let parse = {
        let repo = repo.clone();
        let parent = parent.clone();
        let observer = observer.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> (Result<Parsed>, bool) {
            let mut source = source;
            let mut workers_stopped = false;
            let parsed = parse_stream(
                &mut source,
                &repo,
                rt,
                tx,
                parent.as_ref(),
                block_extents,
                &volume,
                expect_to_snap.as_deref(),
                default_block_size,
                observer.as_ref(),
                &mut workers_stopped,
            );
            let complete = parsed.is_ok();
            let result = match (parsed, finish(source, complete)) {
                (Ok(v), Ok(())) => Ok(v),
                (Ok(_), Err(e)) => Err(e.context("the diff stream's producer failed")),
                (Err(e), Ok(())) => Err(e),
                // The producer's failure is the cause (a cut stream fails to parse too).
                (Err(e), Err(f)) => Err(Error::new(
                    f.kind(),
                    format!("the diff stream's producer failed: {f}"),
                    Some(Box::new(e)),
                )),
            };
            (result, workers_stopped)
        })
    };

    // Workers: hash, dedup, encode, upload.
    let sem = Arc::new(Semaphore::new(params.jobs.max(1)));
    let claimed: Arc<Mutex<HashSet<ChunkId>>> = Arc::default();
    let probe: Arc<ExistenceProbe> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut results: Vec<Stored> = Vec::new();
    let mut first_error: Option<Error> = None;
    let cancel = params.cancel.clone().unwrap_or_default();
    loop {
        let work = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                // Stop at once: in-flight uploads are of content-addressed chunks (harmless
                // when cut), and dropping the receiver stops the parser and its producer.
                tasks.abort_all();
                first_error.get_or_insert(Cancelled::error());
                break;
            }
            w = rx.recv() => match w {
                Some(w) => w,
                None => break,
            },
        };
        // Reap finished tasks as we go so errors surface early and memory stays bounded.
        while let Some(done) = tasks.try_join_next() {
            match done.map_err(Error::from).and_then(|r| r) {
                Ok(r) => results.push(r),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if first_error.is_some() {
            break;
        }
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                tasks.abort_all();
                first_error.get_or_insert(Cancelled::error());
                break;
            }
            p = sem.clone().acquire_owned() => p.map_err(|_| Error::failed("the upload semaphore was closed"))?,
        };
        let repo = repo.clone();
        let index = index.clone();
        let claimed = claimed.clone();
        let session = session.clone();
        let parent_deltas = parent_deltas.clone();
        let probe = probe.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match work {
                Work::Hole { index: i } => Ok(Stored {
                    index: i,
                    id: None,
                    outcome: Outcome::Zero,
                    delta: None,
                    extents: None,
                }),
                Work::Block { index: i, data, delta } => {
                    let delta = delta.filter(|_| use_deltas);
                    let ctx = StoreCtx {
                        repo: &repo,
                        index: &index,
                        session: &session,
                        claimed: &claimed,
                        parent_deltas: &parent_deltas,
                        probe: &probe,
                    };
                    store_block(&ctx, i, data, delta).await
                }
            }
        });
    }
    drop(rx);
    let mut aborted = false;
    loop {
        let done = tokio::select! {
            biased;
            _ = cancel.cancelled(), if !aborted => {
                tasks.abort_all();
                aborted = true;
                first_error.get_or_insert(Cancelled::error());
                continue;
            }
            d = tasks.join_next() => match d {
                Some(d) => d,
                None => break,
            },
        };
        if matches!(&done, Err(e) if e.is_cancelled()) {
            continue;
        }
        match done.map_err(Error::from).and_then(|r| r) {
            Ok(r) => results.push(r),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let (parsed, workers_stopped) = parse.await?;
    // Cancelled: whatever the parser saw after that (its producer killed, the channel closed)
    // is a consequence, not the cause.
    if cancel.is_cancelled() {
        return Err(Cancelled::error());
    }
    // A parse error explains an upload stop, so report it first — unless the parser only
    // stopped because the workers did: then the workers' error is the cause.
    let parsed = match (parsed, first_error) {
        (Err(_), Some(w)) if workers_stopped => return Err(w),
        (Err(e), _) => return Err(e),
        (Ok(_), Some(e)) => return Err(e),
        (Ok(v), None) => v,
    };
    let Parsed {
        header,
        stats: pstats,
        block_size,
    } = parsed;

    // The new block map: the parent's (incremental) or holes (full), resized, then the changes.
    let nblocks = block_size.blocks_in(header.image_size) as usize;
    let mut blocks: Vec<Option<ChunkId>> = match (&header.from_snap, parent.as_ref()) {
        (Some(_), Some((_, m))) => m.blocks.clone(),
        _ => Vec::new(),
    };
    blocks.resize(nblocks, None);
    let mut stats = BackupStats {
        stream_bytes: pstats.stream_bytes,
        data_bytes: pstats.data_bytes,
        zeroed_bytes: pstats.zeroed_bytes,
        blocks_changed: pstats.blocks_changed,
        blocks_partial: pstats.blocks_partial,
        bytes_read_blocks: pstats.bytes_read_blocks,
        ..Default::default()
    };
    // The table: the parent's (an incremental's unchanged blocks keep their storage) and
    // this backup's new deltas; the commit cuts it to what the map reaches.
    // Also for a full stream over a chain: a content found in the parent's table was reused
    // as it is stored there (its objects are inherited), so its entries must come along.
    let mut deltas: BTreeMap<ChunkId, DeltaRef> = (*parent_deltas).clone();
    let mut new_deltas: Vec<(u64, Vec<(u32, u32)>)> = Vec::new();
    for Stored {
        index: i,
        id,
        outcome,
        delta,
        extents,
    } in results
    {
        blocks[i as usize] = id;
        if let (Some(id), None, Outcome::New { .. } | Outcome::FoundInRepo) = (id, &delta, &outcome) {
            // Stored (or found) whole: every reference to this content reads the chunk.
            deltas.remove(&id);
        }
        if let (Some(id), Some(d)) = (id, delta) {
            deltas.insert(id, d);
            if let (Some(_), Some(e)) = (&params.delta_sample, extents) {
                new_deltas.push((i, e));
            }
        }
        match outcome {
            Outcome::Zero => stats.blocks_zero += 1,
            Outcome::New { plain, stored } => {
                stats.blocks_new += 1;
                stats.bytes_new += plain;
                stats.bytes_uploaded += stored;
            }
            Outcome::NewDelta { plain, stored, changed } => {
                stats.blocks_new += 1;
                stats.blocks_delta += 1;
                stats.bytes_delta += changed;
                stats.bytes_new += plain;
                stats.bytes_uploaded += stored;
            }
            Outcome::Known => stats.blocks_dedup += 1,
            Outcome::FoundInRepo => {
                stats.blocks_dedup += 1;
                stats.blocks_found_in_repo += 1;
            }
        }
    }
    if let Some(s) = &params.delta_sample {
        let mut sample = s.lock().map_err(|_| Error::failed("the delta sample's lock was poisoned"))?;
        for (i, e) in new_deltas {
            sample.offer(i, e);
        }
    }
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let parent_id = match &header.from_snap {
        Some(_) => parent.as_ref().map(|p| p.0.backup_id().to_string()),
        None => None,
    };
    let draft = BackupDraft {
        volume: params.volume.clone(),
        source: params.source,
        from_snap: header.from_snap.clone(),
        to_snap: header.to_snap.clone(),
        parent: parent_id,
        follows: params.follows.clone(),
        seq: params.seq,
        image_size: header.image_size,
        block_size,
        labels: params.labels,
        protected: header.protected.unwrap_or(false),
        stats,
        blocks,
        deltas,
    };
    // Cancelled while the last uploads finished: abandon rather than commit.
    if cancel.is_cancelled() {
        return Err(Cancelled::error());
    }
    // Before the verifier: it checks the lease, which must be the last thing before the
    // commit (this may wait for a sweep).
    session
        .settle_inherited()
        .await
        .context("checking the parent's chunks after a garbage collection")?;
    let (draft, deadline) = match params.verify {
        Some(verify) => {
            let mut draft = draft;
            crate::cpu::blocking(move || verify(&mut draft).map(|d| (draft, d))).await?
        }
        None => (draft, None),
    };
    let deadline = deadline.map(tokio::time::Instant::from_std);
    let (backup, manifest) = match repo.commit_within(draft, &session, deadline).await {
        Ok(v) => v,
        Err(e @ ferry_repo::Error::CommitUnknown { .. }) => {
            return Err(Error::new(
                crate::error::ErrorKind::Transient,
                e.to_string(),
                Some(Box::new(CommitOutcomeUnknown)),
            ))
        }
        Err(e) => return Err(Error::from(e).context("committing the backup (writing its manifest)")),
    };
    // The index is a cache: a failure here does not undo the commit. (sled flushes with
    // fsync: off the async threads.)
    // Nothing after the commit may turn it into a failure.
    let indexed = {
        let (index, backup, manifest, stamp) = (index.clone(), backup.clone(), manifest.clone(), session.observed_gen());
        tokio::task::spawn_blocking(move || index.insert_backup_stamped(&backup, &manifest, stamp).and_then(|_| index.flush()))
            .await
            .map_err(Error::from)
            .and_then(|r| r.map_err(Error::from))
    };
    if let Err(e) = indexed {
        crate::observer::warn(
            observer.as_ref(),
            &format!("backup committed, but the local index was not updated: {e}"),
        );
    }
    Ok(BackupOutcome { backup, manifest })
}

enum Outcome {
    Zero,
    Known,
    FoundInRepo,
    New { plain: u64, stored: u64 },
    NewDelta { plain: u64, stored: u64, changed: u64 },
}

/// One block's result: its content ID, what storing it cost, and — when it is stored as a
/// delta — its delta table entry.
struct Stored {
    index: u64,
    id: Option<ChunkId>,
    outcome: Outcome,
    delta: Option<DeltaRef>,
    /// The delta's extents (for the verifier's sample).
    extents: Option<Vec<(u32, u32)>>,
}

/// What every block's upload shares.
struct StoreCtx<'a> {
    repo: &'a Arc<Repository>,
    index: &'a Index,
    session: &'a Session,
    claimed: &'a Mutex<HashSet<ChunkId>>,
    parent_deltas: &'a BTreeMap<ChunkId, DeltaRef>,
    probe: &'a ExistenceProbe,
}

/// Whether a HEAD before encoding and uploading a chunk pays. A HEAD that finds the chunk
/// saves its encoding and upload; one that misses costs a request (a round trip, and the
/// store's CPU). The create-only PUT answers the same question ("already exists" is the same
/// evidence, FORMAT.md §8), so while new content streams in — the last [`Self::SKIP_AFTER`]
/// chunks checked were all missing — the HEAD is skipped; the first chunk a PUT finds existing
/// turns HEADs back on. (A full backup into a new repository sends one request per chunk
/// instead of two; a retry or a cold index still HEADs what is there.)
#[derive(Debug, Default)]
pub(crate) struct ExistenceProbe {
    misses_in_row: AtomicU32,
}

impl ExistenceProbe {
    /// Missing chunks in a row after which HEADs stop.
    pub(crate) const SKIP_AFTER: u32 = 8;

    /// Whether to HEAD the next chunk.
    pub(crate) fn worth_a_head(&self) -> bool {
        self.misses_in_row.load(Relaxed) < Self::SKIP_AFTER
    }

    /// A chunk was found in the repository (by HEAD, or by the PUT's "already exists").
    pub(crate) fn found(&self) {
        self.misses_in_row.store(0, Relaxed);
    }

    /// A chunk was not there (the PUT created it).
    pub(crate) fn missing(&self) {
        let _ = self.misses_in_row.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(1)));
    }
}

/// Garbage collection first: an object a running sweep may delete waits until it is over.
async fn decide(session: &Session, id: &ChunkId, i: u64) -> Result<Decision> {
    loop {
        match session.decide(id)? {
            Decision::Wait(gen) => session.wait_over(gen).await.with_context(|| format!("block {i} (object {id})"))?,
            d => return Ok(d),
        }
    }
}

async fn store_block(ctx: &StoreCtx<'_>, i: u64, data: Vec<u8>, delta: Option<(ChunkId, Vec<(u32, u32)>)>) -> Result<Stored> {
    let StoreCtx {
        repo,
        index,
        session,
        claimed,
        parent_deltas,
        probe,
    } = *ctx;
    let (data, id) = {
        let repo = repo.clone();
        crate::cpu::run(move || {
            if is_zero(&data) {
                (data, None)
            } else {
                let id = repo.chunk_id(&data);
                (data, Some(id))
            }
        })
        .await?
    };
    let Some(id) = id else {
        return Ok(Stored {
            index: i,
            id: None,
            outcome: Outcome::Zero,
            delta: None,
            extents: None,
        });
    };
    let done = |outcome: Outcome| Stored {
        index: i,
        id: Some(id),
        outcome,
        delta: None,
        extents: None,
    };
    // Content the chain already stores as a delta (a block that changed back): reuse it as
    // it is — its objects are the parent's, inherited by the session.
    if parent_deltas.contains_key(&id) {
        let q = session.quarantined();
        let damaged = crate::chunks::block_objects(parent_deltas, &id).map_or(true, |objs| objs.iter().any(|o| q.contains(o)));
        if !damaged {
            return Ok(done(Outcome::Known));
        }
        // Something of its chain is quarantined: store the content whole (below).
    }
    let decision = decide(session, &id, i).await?;
    if decision == Decision::Go && index.has_chunk(&id)? {
        return Ok(done(Outcome::Known));
    }
    if !claimed
        .lock()
        .map_err(|_| Error::failed("the dedup set's lock was poisoned"))?
        .insert(id)
    {
        return Ok(done(Outcome::Known));
    }
    if session.quarantined().contains(&id) {
        // Found missing or corrupt by an audit or restore: a HEAD cannot tell a corrupt copy
        // from a good one, so read it; store this block's content unless a good copy is there.
        let (plain, bytes) = encode(repo, id, data).await?;
        let stored = bytes.len() as u64;
        let created = repo
            .restore_quarantined(&id, bytes)
            .await
            .with_context(|| format!("storing quarantined chunk {id} (block {i}) again"))?;
        return Ok(done(if created {
            Outcome::New { plain, stored }
        } else {
            Outcome::FoundInRepo
        }));
    }
    // Where a delta is possible the HEAD always runs: an existing whole chunk beats a delta.
    if (delta.is_some() || probe.worth_a_head())
        && repo
            .chunk_exists(&id)
            .await
            .with_context(|| format!("checking for chunk {id} (block {i})"))?
    {
        probe.found();
        return Ok(done(Outcome::FoundInRepo));
    }
    if let Some((base, extents)) = delta {
        if let Some(stored) = store_delta(ctx, i, id, &data, base, &extents).await? {
            return Ok(stored);
        }
    }
    let (plain, bytes) = encode(repo, id, data).await?;
    let stored = bytes.len() as u64;
    let created = repo
        .put_chunk(&id, bytes)
        .await
        .with_context(|| format!("uploading chunk {id} (block {i})"))?;
    Ok(done(if created {
        probe.missing();
        Outcome::New { plain, stored }
    } else {
        probe.found();
        Outcome::FoundInRepo
    }))
}

/// Stores content `id` as a delta on the parent's content `base` (FORMAT.md §14) when the
/// chain stays within its bounds — depth and total changed bytes — else `None`: store it whole.
async fn store_delta(
    ctx: &StoreCtx<'_>,
    i: u64,
    id: ChunkId,
    data: &[u8],
    base: ChunkId,
    extents: &[(u32, u32)],
) -> Result<Option<Stored>> {
    let StoreCtx {
        repo,
        index,
        session,
        parent_deltas,
        ..
    } = *ctx;
    let (chain, whole) = ferry_repo::delta_chain(parent_deltas, &base).map_err(Error::failed)?;
    // Never a delta on itself or on a chain that passes through its own content (that would
    // be a cycle: the parent stores `base` as a delta on `id`).
    if base == id || whole == id || chain.iter().any(|(t, _)| *t == id) {
        return Ok(None);
    }
    // Anything under it damaged (quarantined): the block goes whole.
    let q = session.quarantined();
    if q.contains(&whole) || chain.iter().any(|(_, d)| q.contains(&d.object)) {
        return Ok(None);
    }
    let delta = ferry_repo::Delta::from_extents(id, base, data, extents)?;
    let payload = delta.encode();
    // Bounds: depth, and payload bytes over the chain (extent tables included, so a swarm of
    // tiny extents cannot make a delta larger than its block).
    let chain_bytes: u64 = chain.iter().map(|(_, d)| d.bytes as u64).sum();
    if chain.len() + 1 > ferry_repo::delta::MAX_WRITE_DEPTH
        || chain_bytes + payload.len() as u64 > ferry_repo::delta::max_chain_bytes(data.len())
    {
        return Ok(None);
    }
    let changed: u64 = extents.iter().map(|&(_, l)| l as u64).sum();
    let plain = payload.len() as u64;
    let object = repo.delta_object_id(&payload);
    let entry = DeltaRef {
        base,
        object,
        bytes: plain as u32,
    };
    let with = |outcome: Outcome| {
        Some(Stored {
            index: i,
            id: Some(id),
            outcome,
            delta: Some(entry),
            extents: Some(extents.to_vec()),
        })
    };
    let decision = decide(session, &object, i).await?;
    if decision == Decision::Go && !q.contains(&object) && index.has_chunk(&object)? {
        return Ok(with(Outcome::Known));
    }
    let bytes = {
        let repo = repo.clone();
        crate::cpu::run(move || repo.encode_delta(&object, &delta)).await??
    };
    let stored = bytes.len() as u64;
    let created = if q.contains(&object) {
        // A damaged copy of this very delta: read it, replace it unless it is good after all.
        repo.restore_quarantined(&object, bytes)
            .await
            .with_context(|| format!("storing quarantined delta object {object} (block {i}) again"))?
    } else {
        // No HEAD first: a delta is small, and the create-only PUT says whether it existed.
        repo.put_chunk(&object, bytes)
            .await
            .with_context(|| format!("uploading delta object {object} (block {i})"))?
    };
    Ok(with(if created {
        Outcome::NewDelta { plain, stored, changed }
    } else {
        Outcome::FoundInRepo
    }))
}

/// Compresses and encrypts a block (on the CPU pool): its plaintext length and the object.
async fn encode(repo: &Arc<Repository>, id: ChunkId, data: Vec<u8>) -> Result<(u64, Vec<u8>)> {
    let plain = data.len() as u64;
    let repo = repo.clone();
    Ok((plain, crate::cpu::run(move || repo.encode_chunk(id, &data)).await??))
}

/// What the parser thread found.
struct Parsed {
    header: DiffHeader,
    stats: ParseStats,
    block_size: BlockSize,
}

/// The parser thread's work: header, chain check, block assembly.
#[allow(clippy::too_many_arguments)]
fn parse_stream<R: Read>(
    source: &mut R,
    repo: &Arc<Repository>,
    rt: tokio::runtime::Handle,
    tx: mpsc::Sender<Work>,
    parent: Option<&(BackupRef, Arc<Manifest>)>,
    block_extents: Option<BlockExtents>,
    volume: &str,
    expect_to_snap: Option<&str>,
    default_block_size: BlockSize,
    observer: &dyn Observer,
    workers_stopped: &mut bool,
) -> Result<Parsed> {
    let mut reader = DiffReader::new(source).context("reading the diff stream header")?;
    let header = reader.header().clone();
    check_chain(&header, volume, parent)?;
    if let Some(want) = expect_to_snap {
        if header.to_snap.as_deref() != Some(want) {
            return Err(Error::input(format!(
                "the diff stream's to-snapshot is {:?}, expected '{want}'",
                header.to_snap
            )));
        }
    }
    // Full stream: untouched blocks are zero. Incremental: they are the parent's, and the
    // chain keeps the parent's block size.
    let empty = BTreeMap::new();
    let (base, base_deltas, parent_size, block_size): (&[Option<ChunkId>], &BTreeMap<ChunkId, DeltaRef>, u64, BlockSize) =
        match (&header.from_snap, parent) {
            (Some(_), Some((_, m))) => (&m.blocks, &m.deltas, m.meta.image_size, m.meta.block_size),
            _ => (&[], &empty, 0, default_block_size),
        };
    if header.image_size > ferry_repo::MAX_IMAGE_SIZE || block_size.blocks_in(header.image_size) > ferry_repo::MAX_BLOCKS {
        return Err(Error::input(format!(
            "the diff stream claims an image of {} bytes; ferry takes at most {} bytes and {} blocks per volume ({} blocks of {block_size} here)",
            header.image_size,
            ferry_repo::MAX_IMAGE_SIZE,
            ferry_repo::MAX_BLOCKS,
            block_size.blocks_in(header.image_size)
        )));
    }
    let mut asm = Assembler {
        repo,
        rt,
        block_size: block_size.get(),
        image_size: header.image_size,
        base,
        base_deltas,
        block_extents,
        extents_cursor: 0,
        parent_size,
        pending: None,
        tx,
        stats: ParseStats::default(),
        last_touched: false,
        workers_stopped: false,
    };
    let result = assemble(&mut reader, &mut asm, observer);
    *workers_stopped = asm.workers_stopped;
    result?;
    asm.stats.stream_bytes = reader.position();
    observer.event(Event::Progress {
        op: Operation::Backup,
        done: asm.stats.stream_bytes,
    });
    Ok(Parsed {
        header,
        stats: asm.stats,
        block_size,
    })
}

fn assemble<R: Read>(reader: &mut DiffReader<R>, asm: &mut Assembler<'_>, observer: &dyn Observer) -> Result<()> {
    let mut last_report = 0u64;
    loop {
        match reader.next_record().context("the diff stream is invalid")? {
            // Payload bytes go from the stream into the block buffer without another copy, a
            // block's worth at a time; a zero-length record changes nothing.
            DiffRecord::Data { offset, len } if len > 0 => {
                asm.data_from(reader, offset, len)?;
            }
            DiffRecord::Data { .. } => {}
            DiffRecord::Zero { offset, length } => asm.zero(offset, length)?,
            DiffRecord::End => break,
        }
        let pos = reader.position();
        if pos - last_report >= 4 << 20 {
            observer.event(Event::Progress {
                op: Operation::Backup,
                done: pos,
            });
            last_report = pos;
        }
    }
    asm.finish()
}

#[cfg(test)]
mod tests {
    use super::ExistenceProbe;

    #[test]
    fn heads_stop_after_a_run_of_misses_and_resume_at_the_first_find() {
        let p = ExistenceProbe::default();
        for _ in 0..ExistenceProbe::SKIP_AFTER - 1 {
            assert!(p.worth_a_head());
            p.missing();
        }
        assert!(p.worth_a_head(), "one miss short of the run");
        p.missing();
        assert!(!p.worth_a_head(), "a run of misses: the PUT alone answers");
        for _ in 0..100 {
            p.missing();
        }
        assert!(!p.worth_a_head());
        p.found();
        assert!(p.worth_a_head(), "an existing chunk turns HEADs back on");
        p.missing();
        assert!(p.worth_a_head());
    }
}
