//! Garbage collection safe beside running backups (FORMAT.md §12; docs/design/gc-protocol.md).
//!
//! A GC run claims a generation (`gc/<gen>/run`; one at a time), marks every chunk a present
//! manifest references, publishes the candidates (`gc/<gen>/sweep`), then settles every backup
//! session that may have decided to reuse a candidate: it reads its manifest, takes its
//! acknowledgement (`sessions/…/ack/<gen>`), or fences its manifest key (a 0-byte create-only
//! PUT, after which that backup can never commit). Only then are the unreferenced candidates
//! deleted, in batches, and `gc/<gen>/end` written.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::object::{decode_sealed, encode_sealed, ObjectKind};
use crate::repo::{get_bytes_limited, p, put_create, BackupRef, Repository};

/// Generations kept in `gc/` after a run (older ones are removed; indexes compare
/// generation numbers, they need no history).
const GENS_KEPT: u64 = 16;
/// Largest candidate / deleted / ack set object: 2^26 IDs (1 PiB of 16 MiB blocks…) plus the
/// envelope.
const MAX_SET_OBJECT: u64 = (1 << 26) * 32 + 4096;
/// Largest plaintext of a set object.
const MAX_SET_LEN: usize = (1 << 26) * 32;

/// `gc/<gen 20 digits>/<what>`.
pub(crate) fn gen_key(gen: u64, what: &str) -> String {
    format!("gc/{gen:020}/{what}")
}

/// The objects of one GC generation that a listing of `gc/` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GenState {
    /// `run`: the generation was claimed.
    pub run: bool,
    /// `sweep`: its candidate set was published.
    pub sweep: bool,
    /// `end`: its sweep finished.
    pub end: bool,
    /// `abandoned`: a later GC found it dead; it sends no more deletes.
    pub abandoned: bool,
}

impl GenState {
    /// Candidates published and the sweep not over: backups must not reuse them.
    pub fn active(&self) -> bool {
        self.sweep && !self.over()
    }
    /// Ended or abandoned.
    pub fn over(&self) -> bool {
        self.end || self.abandoned
    }
    /// Claimed and not over.
    pub fn running(&self) -> bool {
        self.run && !self.over()
    }
}

/// Lists `gc/`: every generation's objects.
pub(crate) async fn list_gens(repo: &Repository) -> Result<BTreeMap<u64, GenState>> {
    let metas = repo.list_prefix("gc").await?;
    let mut gens: BTreeMap<u64, GenState> = BTreeMap::new();
    for m in metas {
        let parts: Vec<_> = m.location.parts().collect();
        if parts.len() != 3 {
            continue;
        }
        let Ok(gen) = parts[1].as_ref().parse::<u64>() else {
            continue;
        };
        let st = gens.entry(gen).or_default();
        match parts[2].as_ref() {
            "run" => st.run = true,
            "sweep" => st.sweep = true,
            "end" => st.end = true,
            "abandoned" => st.abandoned = true,
            _ => {}
        }
    }
    Ok(gens)
}

/// Seals and writes a protocol record create-only (retried); `false` if it existed.
pub(crate) async fn put_record(repo: &Repository, key: &str, payload: &[u8]) -> Result<bool> {
    let sealed = bytes::Bytes::from(encode_sealed(
        repo.seal_key(),
        ObjectKind::GcRecord,
        key.as_bytes(),
        payload,
        Some(1),
    )?);
    repo.retry_policy()
        .run(
            || format!("writing {key}"),
            || put_create(repo.store().inner.as_ref(), key, sealed.clone()),
        )
        .await
}

/// Reads and opens a protocol record (retried).
pub(crate) async fn get_record(repo: &Repository, key: &str) -> Result<Vec<u8>> {
    let bytes = repo
        .retry_policy()
        .run(
            || format!("reading {key}"),
            || get_bytes_limited(repo.store().inner.as_ref(), key, MAX_SET_OBJECT),
        )
        .await?;
    decode_sealed(
        repo.seal_key(),
        ObjectKind::GcRecord,
        key.as_bytes(),
        Vec::from(bytes),
        MAX_SET_LEN,
        key,
    )
}

/// A set of chunk IDs as a record body: the 32-byte IDs, concatenated.
pub(crate) fn encode_ids<'a>(ids: impl IntoIterator<Item = &'a ChunkId>) -> Vec<u8> {
    ids.into_iter().flat_map(|id| id.0).collect()
}

/// Parses [`encode_ids`].
pub(crate) fn decode_ids(bytes: &[u8], key: &str) -> Result<Vec<ChunkId>> {
    if !bytes.len().is_multiple_of(32) {
        return Err(Error::BadObject {
            path: key.to_string(),
            reason: format!("a chunk-ID set of {} bytes (not a multiple of 32)", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            ChunkId(id)
        })
        .collect())
}

/// Who holds a GC claim or runs a backup session: enough to tell whether it is alive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Holder {
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`: a pid names a process only within one boot.
    pub boot_id: String,
    pub pid: u32,
    pub started: chrono::DateTime<chrono::Utc>,
}

impl Holder {
    pub fn me() -> Holder {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        // The pid namespace too: containers may share a hostname and a boot.
        let ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Holder {
            host: read("/proc/sys/kernel/hostname"),
            boot_id: format!("{}/{ns}", read("/proc/sys/kernel/random/boot_id")),
            pid: std::process::id(),
            started: chrono::Utc::now(),
        }
    }

    /// True when the holder is a process of this host and boot that no longer exists.
    pub fn is_dead_here(&self) -> bool {
        let me = Holder::me();
        if self.host != me.host || self.boot_id != me.boot_id || self.boot_id.contains("unknown") {
            return false;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
}

/// How a garbage collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Mark only and report what would be deleted (no object is written or deleted).
    pub dry_run: bool,
    /// How long to wait for a running backup to acknowledge the sweep before fencing it.
    pub ack_timeout: Duration,
    /// How often to look for acknowledgements.
    pub poll: Duration,
    /// Abandon a running GC claim even if its process cannot be shown dead (the operator
    /// says it is gone).
    pub takeover: bool,
    /// Chunks per DELETE batch.
    pub batch: usize,
    /// Never delete a chunk younger than this (by the store's modification time). Not needed
    /// for safety — the protocol is — only a belt over the braces; default 0.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            ack_timeout: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            takeover: false,
            batch: 1000,
            grace: Duration::ZERO,
        }
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// The generation this run claimed (`None` for a dry run).
    pub generation: Option<u64>,
    /// Nothing was written or deleted.
    pub dry_run: bool,
    /// A dead GC this run took over.
    pub took_over: Option<u64>,
    /// Manifests read by the mark.
    pub manifests: usize,
    /// Fenced manifest keys (backups that never committed).
    pub fences: usize,
    /// Chunk objects listed.
    pub chunks_total: u64,
    /// Their bytes.
    pub bytes_total: u64,
    /// Distinct chunks present manifests reference.
    pub chunks_referenced: u64,
    /// Heap bytes of the marked set (about 36 per referenced chunk).
    pub mark_bytes: u64,
    /// Chunks no manifest referenced at the mark.
    pub candidates: u64,
    /// Unreferenced chunks kept because they are younger than `--grace`.
    pub kept_young: u64,
    /// Candidates kept because a running backup had decided to use them (acks) or committed
    /// them after the mark.
    pub kept_for_backups: u64,
    /// Chunks deleted (or, in a dry run, that would be: an upper bound).
    pub chunks_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Backup sessions found running (not ended) after the mark.
    pub sessions_running: usize,
    /// Of those, how many acknowledged the sweep.
    pub sessions_acked: usize,
    /// Of those, how many committed meanwhile (their manifests were read).
    pub sessions_committed: usize,
    /// Of those, how many were fenced (did not answer in time: crashed, or hung).
    pub sessions_fenced: usize,
    /// Ended sessions whose records were removed.
    pub sessions_cleaned: usize,
    /// Old GC generations removed from `gc/`.
    pub generations_cleaned: usize,
}

/// Progress of a garbage collection, for a progress display.
#[derive(Debug, Clone, Copy)]
pub enum GcEvent {
    /// A phase began.
    Phase(&'static str),
    /// Deletion progress.
    Deleted {
        /// Chunks deleted so far.
        done: u64,
        /// Chunks to delete.
        total: u64,
    },
}

/// The referenced chunk IDs: a sorted, deduplicated array (32 bytes per chunk, allocated
/// exactly) plus a pending buffer of at most 1/8 of it, merged in place from the back when
/// full — about 36 bytes per distinct chunk at the peak (see [`MarkSet::bytes`]).
#[derive(Debug, Default)]
pub struct MarkSet {
    sorted: Vec<ChunkId>,
    pending: Vec<ChunkId>,
}

impl MarkSet {
    /// Adds a referenced chunk.
    pub fn add(&mut self, id: ChunkId) {
        if self.sorted.binary_search_by(|x| x.0.cmp(&id.0)).is_err() {
            self.pending.push(id);
            if self.pending.len() >= (self.sorted.len() / 8).max(4096) {
                self.flush();
            }
        }
    }

    /// Merges the pending buffer into the sorted array.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.pending.sort_unstable_by_key(|a| a.0);
        self.pending.dedup();
        let (n, m) = (self.sorted.len(), self.pending.len());
        self.sorted.reserve_exact(m);
        self.sorted.resize(n + m, ChunkId([0; 32]));
        let (mut i, mut j, mut k) = (n, m, n + m);
        while j > 0 {
            if i > 0 && self.sorted[i - 1].0 > self.pending[j - 1].0 {
                self.sorted[k - 1] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k - 1] = self.pending[j - 1];
                j -= 1;
            }
            k -= 1;
        }
        self.pending.clear();
    }

    /// True when `id` was added (call [`MarkSet::flush`] after the last add).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.sorted.binary_search_by(|x| x.0.cmp(&id.0)).is_ok() || self.pending.contains(id)
    }

    /// Distinct chunks (after a flush).
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty() && self.pending.is_empty()
    }

    /// Heap bytes held (capacity, not length).
    pub fn bytes(&self) -> usize {
        (self.sorted.capacity() + self.pending.capacity()) * std::mem::size_of::<ChunkId>()
    }
}

/// The marked set plus what sessions add late (few).
struct Marked {
    set: MarkSet,
    late: HashSet<ChunkId>,
}

impl Marked {
    fn contains(&self, id: &ChunkId) -> bool {
        self.set.contains(id) || self.late.contains(id)
    }
}

/// A backup session as a listing of `sessions/` shows it.
#[derive(Debug, Default)]
struct SessionEntry {
    /// Keys of its objects (session record, acks).
    keys: Vec<String>,
    /// Whether it wrote `end` after its commit (its manifest may since have been forgotten).
    ended: bool,
}

/// Parses `sessions/<volume>/<name>/…` into the backup it promised.
fn session_of(parts: &[&str]) -> Option<BackupRef> {
    (parts.len() >= 4 && parts[0] == "sessions").then(|| BackupRef {
        volume: parts[1].to_string(),
        name: parts[2].to_string(),
    })
}

async fn list_sessions(repo: &Repository) -> Result<BTreeMap<BackupRef, SessionEntry>> {
    let mut out: BTreeMap<BackupRef, SessionEntry> = BTreeMap::new();
    for m in repo.list_prefix("sessions").await? {
        let owned: Vec<String> = m.location.parts().map(|p| p.as_ref().to_string()).collect();
        let parts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let Some(r) = session_of(&parts) else { continue };
        let e = out.entry(r).or_default();
        if parts.len() == 4 && parts[3] == "end" {
            e.ended = true;
        }
        e.keys.push(m.location.to_string());
    }
    Ok(out)
}

/// Deletes keys, tolerating ones already gone.
async fn delete_keys(repo: &Repository, keys: Vec<String>) -> Result<u64> {
    let paths = futures::stream::iter(keys.into_iter().map(|k| Ok(p(&k)))).boxed();
    let mut results = repo.store().inner.delete_stream(paths);
    let mut n = 0;
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => n += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::store("delete", &p("(batch)"), e)),
        }
    }
    Ok(n)
}

/// Runs one garbage collection (see the module documentation and FORMAT.md §12).
pub async fn collect_garbage(repo: &Repository, opts: &GcOptions, progress: &(dyn Fn(GcEvent) + Send + Sync)) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // 1. Claim a generation (one GC at a time).
    let gen = if opts.dry_run {
        0
    } else {
        progress(GcEvent::Phase("claim"));
        let gens = list_gens(repo).await?;
        for (&g, _) in gens.iter().filter(|(_, st)| st.running()) {
            let holder: Option<Holder> = get_record(repo, &gen_key(g, "run"))
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let dead = holder.as_ref().is_some_and(Holder::is_dead_here);
            if dead || opts.takeover {
                put_record(repo, &gen_key(g, "abandoned"), b"").await?;
                report.took_over = Some(g);
            } else {
                let h = holder.unwrap_or_else(|| Holder {
                    host: "unknown".into(),
                    boot_id: String::new(),
                    pid: 0,
                    started: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                });
                return Err(Error::GcRunning {
                    gen: g,
                    host: h.host,
                    pid: h.pid,
                    started: h.started.to_rfc3339(),
                });
            }
        }
        let gen = gens.keys().next_back().map_or(1, |g| g + 1);
        let me = serde_json::to_vec(&Holder::me()).map_err(|source| Error::Json {
            context: "encoding a GC claim".into(),
            source,
        })?;
        // "Already exists" may be our own first attempt whose answer was lost: compare.
        if !put_record(repo, &gen_key(gen, "run"), &me).await?
            && get_record(repo, &gen_key(gen, "run")).await.ok().as_deref() != Some(me.as_slice())
        {
            return Err(Error::GcRunning {
                gen,
                host: "another host".into(),
                pid: 0,
                started: "just now".into(),
            });
        }
        report.generation = Some(gen);
        gen
    };
    let result = run_claimed(repo, opts, progress, gen, report).await;
    if result.is_err() && !opts.dry_run {
        // Never leave a claimed (or published) generation behind: backups would wait on its
        // candidates and other GCs would refuse. Best effort; the error is what matters.
        let _ = put_record(repo, &gen_key(gen, "abandoned"), b"").await;
    }
    result
}

/// Steps 2–6 of [`collect_garbage`], for the generation `gen` it claimed.
async fn run_claimed(
    repo: &Repository,
    opts: &GcOptions,
    progress: &(dyn Fn(GcEvent) + Send + Sync),
    gen: u64,
    mut report: GcReport,
) -> Result<GcReport> {
    // 2. Mark: every chunk a present manifest references.
    progress(GcEvent::Phase("mark"));
    let listing = repo.list_volumes(None).await?;
    report.fences = listing.fenced.len();
    let listed: std::collections::BTreeSet<BackupRef> = listing.backups.iter().cloned().collect();
    let mut set = MarkSet::default();
    // Owned refs: a closure over borrowed ones makes this future not `Send` for every
    // lifetime, and a daemon spawns it.
    let mut reads = futures::stream::iter(listing.backups.iter().cloned().map(|r| async move {
        let m = repo.read_manifest(&r).await;
        (r, m)
    }))
    .buffer_unordered(8);
    while let Some((r, m)) = reads.next().await {
        match m {
            Ok(m) => {
                report.manifests += 1;
                m.objects().for_each(|id| set.add(id));
            }
            Err(Error::NotFound { .. } | Error::Fenced { .. }) => {}
            // A manifest that cannot be read may reference any chunk: deleting anything now
            // could destroy what it needs. Stop before the sweep.
            Err(e) => {
                tracing::error!(
                    "manifest {} cannot be read: {e}; garbage collection stops before deleting anything",
                    r.key()
                );
                return Err(e);
            }
        }
    }
    drop(reads);
    set.flush();
    report.chunks_referenced = set.len() as u64;
    report.mark_bytes = set.bytes() as u64;
    let mut marked = Marked { set, late: HashSet::new() };
    progress(GcEvent::Phase("list chunks"));
    let mut candidates: Vec<(ChunkId, u64)> = Vec::new();
    let young = chrono::Duration::from_std(opts.grace)
        .ok()
        .and_then(|g| chrono::Utc::now().checked_sub_signed(g))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    for m in repo.list_prefix("chunks").await? {
        let Some(id) = m.location.filename().and_then(ChunkId::from_hex) else {
            continue;
        };
        report.chunks_total += 1;
        report.bytes_total += m.size;
        if !marked.contains(&id) {
            if !opts.grace.is_zero() && m.last_modified > young {
                report.kept_young += 1;
            } else {
                candidates.push((id, m.size));
            }
        }
    }
    report.candidates = candidates.len() as u64;
    if opts.dry_run {
        report.chunks_deleted = report.candidates;
        report.bytes_freed = candidates.iter().map(|(_, s)| s).sum();
        return Ok(report);
    }

    // 3. Publish the candidates; from here on running backups treat them as absent.
    progress(GcEvent::Phase("publish"));
    put_record(repo, &gen_key(gen, "sweep"), &encode_ids(candidates.iter().map(|(id, _)| id))).await?;

    // 4. Settle every session: read its manifest, take its ack, or fence it.
    progress(GcEvent::Phase("sessions"));
    let mut ended: Vec<String> = Vec::new();
    let mut waiting: Vec<(BackupRef, Vec<String>)> = Vec::new();
    for (r, e) in list_sessions(repo).await? {
        if listing.fenced.contains(&r) {
            // Aborted, or fenced by an earlier GC: it can never commit.
            ended.extend(e.keys);
            continue;
        }
        // A manifest in the listing does not end a session: until it writes `end`, the
        // backup may still be settling its commit. `settle` reads the manifest at once.
        if e.ended && listed.contains(&r) {
            // Committed before the mark listed (and read) its manifest.
            ended.extend(e.keys);
            continue;
        }
        if e.ended {
            // Committed after the listing (or gone since): read what is there.
            match repo.read_manifest(&r).await {
                Ok(m) => marked.late.extend(m.objects()),
                Err(Error::NotFound { .. } | Error::Fenced { .. }) => {}
                Err(err) => return Err(err),
            }
            ended.extend(e.keys);
            continue;
        }
        report.sessions_running += 1;
        waiting.push((r, e.keys));
    }
    let deadline = Instant::now() + opts.ack_timeout;
    loop {
        let mut still = Vec::new();
        for (r, keys) in std::mem::take(&mut waiting) {
            match settle(repo, &r, gen, &mut marked).await? {
                Settled::Committed => {
                    report.sessions_committed += 1;
                    ended.extend(keys);
                }
                Settled::Fenced => ended.extend(keys),
                Settled::Acked => report.sessions_acked += 1,
                Settled::Open => still.push((r, keys)),
            }
        }
        waiting = still;
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(opts.poll).await;
    }
    for (r, keys) in waiting {
        // No answer in time: fence the session's manifest key; after this it can never commit.
        let key = r.key();
        let fenced = repo
            .retry_policy()
            .run(
                || format!("fencing {key}"),
                || put_create(repo.store().inner.as_ref(), &key, bytes::Bytes::new()),
            )
            .await?;
        if fenced {
            report.sessions_fenced += 1;
        } else {
            // The key was taken meanwhile: by its manifest (committed after all) or a fence.
            // Anything unreadable stops the GC before it deletes: its chunks are unknown.
            match repo.read_manifest(&r).await {
                Ok(m) => {
                    report.sessions_committed += 1;
                    marked.late.extend(m.objects());
                }
                Err(Error::Fenced { .. } | Error::NotFound { .. }) => report.sessions_fenced += 1,
                Err(e) => return Err(e),
            }
        }
        ended.extend(keys);
    }

    // 5. Sweep what nothing references.
    let doomed: Vec<(ChunkId, u64)> = candidates.into_iter().filter(|(id, _)| !marked.contains(id)).collect();
    report.kept_for_backups = report.candidates - doomed.len() as u64;
    progress(GcEvent::Phase("sweep"));
    let total = doomed.len() as u64;
    let mut done = 0u64;
    for batch in doomed.chunks(opts.batch.max(1)) {
        let keys: Vec<String> = batch.iter().map(|(id, _)| id.object_key()).collect();
        // A GC that was taken over sends no more deletes: checked before every attempt.
        repo.retry_policy()
            .run(
                || format!("deleting {} chunks", keys.len()),
                || async {
                    not_abandoned(repo, gen, done).await?;
                    delete_keys(repo, keys.clone()).await
                },
            )
            .await?;
        done += batch.len() as u64;
        report.chunks_deleted = done;
        report.bytes_freed += batch.iter().map(|(_, s)| s).sum::<u64>();
        progress(GcEvent::Deleted { done, total });
    }

    // 6. Clean up: records of ended sessions (no other GC can need them: one runs at a time),
    // then the end record, then old generations.
    progress(GcEvent::Phase("cleanup"));
    report.sessions_cleaned = ended.iter().filter(|k| k.ends_with("/session")).count();
    not_abandoned(repo, gen, done).await?;
    // A session's `end` goes last, so a partial cleanup never leaves an unended-looking session.
    let (ends, rest): (Vec<String>, Vec<String>) = ended.into_iter().partition(|k| k.ends_with("/end"));
    delete_keys(repo, rest).await?;
    delete_keys(repo, ends).await?;
    not_abandoned(repo, gen, done).await?;
    // Only now is the sweep over: the next GC cannot claim while this one still cleans up.
    put_record(repo, &gen_key(gen, "end"), &encode_ids(doomed.iter().map(|(id, _)| id))).await?;
    let old: Vec<String> = repo
        .list_prefix("gc")
        .await?
        .into_iter()
        .filter_map(|m| {
            let parts: Vec<_> = m.location.parts().collect();
            let g = parts.get(1)?.as_ref().parse::<u64>().ok()?;
            (g + GENS_KEPT <= gen).then(|| m.location.to_string())
        })
        .collect();
    report.generations_cleaned = old.iter().filter(|k| k.ends_with("/run")).count();
    // `sweep` and `run` before `end`: a partial cleanup never leaves an old generation that
    // looks active or running.
    // `abandoned` markers stay for good (0 bytes each, one per takeover): a GC taken over
    // while alive that resumes after its generation was cleaned up must still find it.
    let old: Vec<String> = old.into_iter().filter(|k| !k.ends_with("/abandoned")).collect();
    let (last, first): (Vec<String>, Vec<String>) = old.into_iter().partition(|k| k.ends_with("/end"));
    delete_keys(repo, first).await?;
    delete_keys(repo, last).await?;
    Ok(report)
}

/// Fails if generation `gen` was taken over (`gc/<gen>/abandoned` exists).
async fn not_abandoned(repo: &Repository, gen: u64, done: u64) -> Result<()> {
    let path = p(&gen_key(gen, "abandoned"));
    match repo.store().inner.head(&path).await {
        Ok(_) => Err(Error::InvalidArgument(format!(
            "garbage collection {gen} was taken over by another GC; stopped after deleting {done} chunks"
        ))),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::store("head", &path, e)),
    }
}

enum Settled {
    Committed,
    Fenced,
    Acked,
    Open,
}

/// One look at a running session: committed (its chunks join the marked set), fenced, acked
/// (its ack's chunks join the marked set), or still open.
async fn settle(repo: &Repository, r: &BackupRef, gen: u64, marked: &mut Marked) -> Result<Settled> {
    match repo.read_manifest(r).await {
        Ok(m) => {
            marked.late.extend(m.objects());
            return Ok(Settled::Committed);
        }
        Err(Error::Fenced { .. }) => return Ok(Settled::Fenced),
        Err(Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let key = format!("sessions/{}/{}/ack/{gen:020}", r.volume, r.name);
    match get_record(repo, &key).await {
        Ok(body) => {
            marked.late.extend(decode_ids(&body, &key)?);
            Ok(Settled::Acked)
        }
        Err(Error::NotFound { .. }) => Ok(Settled::Open),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        b[8..16].copy_from_slice(&n.to_le_bytes());
        ChunkId(b)
    }

    /// The mark-memory goal: at most 40 bytes per referenced chunk, measured on a million
    /// distinct IDs each referenced by three "manifests".
    #[test]
    fn a_million_chunks_cost_at_most_40_bytes_each_to_mark() {
        let n = 1_000_000u64;
        let mut set = MarkSet::default();
        let mut peak = 0;
        for round in 0..3u64 {
            for i in 0..n {
                set.add(id((i * 7 + round * 13) % n));
                if i % 4096 == 0 {
                    peak = peak.max(set.bytes());
                }
            }
        }
        set.flush();
        peak = peak.max(set.bytes());
        assert_eq!(set.len() as u64, n);
        let per = peak as f64 / n as f64;
        eprintln!("mark memory: {per:.1} bytes per chunk at the peak ({} MiB per million)", peak >> 20);
        assert!(per <= 40.0, "{per} bytes per chunk");
        for i in (0..n).step_by(9973) {
            assert!(set.contains(&id(i)));
        }
        assert!(!set.contains(&id(n + 1)));
    }

    #[test]
    fn merge_keeps_order_and_dedups() {
        let mut set = MarkSet::default();
        for i in (0..200_000u64).rev() {
            set.add(id(i % 150_000));
        }
        set.flush();
        assert_eq!(set.len(), 150_000);
        assert!(set.sorted.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
