//! `ferry sync`: copy backups to a second repository — another bucket, region or provider —
//! as ciphertext. The destination becomes the same repository (same ID, same key slots: the
//! same passphrases open it); manifests and the objects they need are copied as stored, each
//! verified (opened, decompressed, its ID recomputed) before it is written. Only what is
//! missing travels, so a sync that stopped is resumed by running it again.
//!
//! The copy writes into the destination exactly like a backup (FORMAT.md §12.2, §15): a
//! session of its own per attempt — never shared, never adopted — named like the source's
//! manifest (after an interrupted attempt, the same backup ID a microsecond later, the
//! manifest then sealed for that name), objects decided under it (and waiting for a running
//! sweep of the destination's GC), the objects of the destination's copy of the previous
//! backup inherited, the manifest written once and last. So `ferry gc` on the copy is as safe
//! beside a sync as beside backups.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_repo::{copy_attempts, copy_name, BackupRef, ChunkId, CopyAttempt, Decision, Repository, Session, SessionOptions};
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::observer::{Event, Observer, Operation};

/// What to copy.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Volumes to copy (empty: all).
    pub volumes: Vec<String>,
    /// Objects copied at once.
    pub jobs: usize,
    /// Copy a backup even though an unfinished attempt by a process that may still run (on
    /// another host) exists. Safe for the protocol (each attempt has its own session), but if
    /// that process is alive, the copy may end up holding the backup twice.
    pub takeover: bool,
}

/// A backup the sync did not copy, and why.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct SyncSkip {
    /// `damaged`: the backup's manifest or an object it needs is missing or damaged in the
    /// source (audit the source); `unsupported`: its manifest format is newer than this
    /// ferry; `busy`: another sync may be copying it (run again later); `fenced`: a GC of the
    /// destination stopped this run's copy (the next sync copies it again); `forgotten`:
    /// copied before and forgotten in the destination since (not brought back while the
    /// destination remembers the copy); `vanished`: deleted from the source meanwhile.
    pub kind: &'static str,
    /// The volume.
    pub volume: String,
    /// The backup ID.
    pub backup: String,
    /// Why it was not copied.
    pub reason: String,
}

/// What a sync did.
#[derive(Debug, Serialize, Default, Clone)]
pub struct SyncOutcome {
    /// The destination URL.
    pub destination: String,
    /// The destination was empty and became a copy of the repository.
    pub repository_created: bool,
    /// Key slots copied.
    pub key_slots_copied: usize,
    /// Backups copied by this run.
    pub backups_copied: usize,
    /// Backups the destination had already.
    pub backups_present: usize,
    /// Objects (chunks, delta objects) copied.
    pub objects_copied: u64,
    /// Objects the destination had already (found by HEAD, or inherited from the copy of the
    /// previous backup).
    pub objects_present: u64,
    /// Bytes of objects and manifests copied.
    pub bytes_copied: u64,
    /// Protection markers copied.
    pub protections_copied: usize,
    /// Backups not copied, and why (see [`SyncSkip::kind`]).
    pub skipped: Vec<SyncSkip>,
}

/// Copies what `dst` lacks (see the module documentation). `dst` must already be this
/// repository ([`Repository::copy_identity`], then opened).
pub(crate) async fn sync(
    src: Arc<Repository>,
    dst: Arc<Repository>,
    observer: Arc<dyn Observer>,
    session_opts: SessionOptions,
    opts: &SyncOptions,
) -> Result<SyncOutcome> {
    if src.id() != dst.id() {
        return Err(Error::refused(format!(
            "{} is another repository (ID {}) than {} (ID {})",
            dst.url(),
            dst.id(),
            src.url(),
            src.id()
        )));
    }
    for v in &opts.volumes {
        ferry_repo::validate_volume_name(v)?;
    }
    observer.event(Event::Started {
        op: Operation::Sync,
        total: None,
    });
    let r = run(&src, &dst, observer.as_ref(), session_opts, opts).await;
    observer.event(Event::Finished { op: Operation::Sync });
    r
}

async fn run(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    observer: &dyn Observer,
    session_opts: SessionOptions,
    opts: &SyncOptions,
) -> Result<SyncOutcome> {
    let mut out = SyncOutcome {
        destination: dst.url().to_string(),
        ..Default::default()
    };
    let source = src.list_volumes(None).await.context("listing the source's backups")?;
    let there = dst.list_volumes(None).await.context("listing the destination's backups")?;
    let present: HashSet<&BackupRef> = there.backups.iter().collect();
    let bytes_done = AtomicU64::new(0);
    // Per volume, the newest backup the destination has (or got from this run) before each
    // one copied: its objects are inherited.
    let mut newest_there: BTreeMap<String, Vec<BackupRef>> = BTreeMap::new();
    for b in &there.backups {
        newest_there.entry(b.volume.clone()).or_default().push(b.clone());
    }
    let present_ids: HashSet<(&str, &str)> = there.backups.iter().map(|b| (b.volume.as_str(), b.backup_id())).collect();
    let mut attempts: BTreeMap<String, BTreeMap<String, Vec<CopyAttempt>>> = BTreeMap::new();
    for b in &source.backups {
        if !opts.volumes.is_empty() && !opts.volumes.contains(&b.volume) {
            continue;
        }
        let skip = |kind: &'static str, reason: String| SyncSkip {
            kind,
            volume: b.volume.clone(),
            backup: b.backup_id().to_string(),
            reason,
        };
        if present.contains(b) || present_ids.contains(&(b.volume.as_str(), b.backup_id())) {
            out.backups_present += 1;
        } else {
            if !attempts.contains_key(&b.volume) {
                let a = copy_attempts(dst, &b.volume)
                    .await
                    .with_context(|| format!("listing the destination's sessions of volume '{}'", b.volume))?;
                attempts.insert(b.volume.clone(), a);
            }
            let earlier: &[CopyAttempt] = attempts
                .get(&b.volume)
                .and_then(|a| a.get(b.backup_id()))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if earlier.iter().any(|a| a.ended) {
                out.skipped.push(skip(
                    "forgotten",
                    "copied here before and forgotten here since; not copied again".into(),
                ));
                continue;
            }
            if let Some(a) = earlier.iter().find(|a| a.maybe_alive && !there.fenced.contains(&a.backup)) {
                if !opts.takeover {
                    out.skipped.push(skip(
                        "busy",
                        format!(
                            "another sync may be copying it (session {}); if that process is gone, a GC of the destination ends it, or run with --takeover",
                            a.backup.key()
                        ),
                    ));
                    continue;
                }
            }
            let used: HashSet<&str> = earlier
                .iter()
                .map(|a| a.backup.name.as_str())
                .chain(there.fenced.iter().filter(|f| f.volume == b.volume).map(|f| f.name.as_str()))
                .collect();
            let parent = newest_there
                .get(&b.volume)
                .and_then(|list| list.iter().filter(|p| p.name < b.name).max())
                .cloned();
            match copy_backup(
                src,
                dst,
                b,
                &used,
                parent.as_ref(),
                session_opts,
                opts,
                observer,
                &bytes_done,
                &mut out,
            )
            .await
            {
                Ok(r) => {
                    out.backups_copied += 1;
                    newest_there.entry(b.volume.clone()).or_default().push(r);
                }
                Err(Skip(kind, reason)) => {
                    out.skipped.push(skip(kind, reason));
                    continue;
                }
                Err(Fail(e)) => return Err(e),
            }
        }
        if source.protected.contains(b) && !there.protected.contains(b) {
            match src.get_protection_object(b).await {
                Ok(Some(marker)) => {
                    if dst
                        .put_protection_object(b, marker)
                        .await
                        .with_context(|| format!("copying the protection marker of {}", b.key()))?
                    {
                        out.protections_copied += 1;
                    }
                }
                Ok(None) => {}
                Err(e) if e.is_integrity() => crate::observer::warn(
                    observer,
                    &format!(
                        "the protection marker of {} is damaged in the source and was not copied: {e}",
                        b.key()
                    ),
                ),
                Err(e) => return Err(Error::from(e).context(format!("reading the protection marker of {}", b.key()))),
            }
        }
    }
    out.bytes_copied = bytes_done.load(Ordering::Relaxed);
    Ok(out)
}

/// Why one backup's copy stopped: skip it (and say why), or stop the sync.
enum CopyError {
    Skip(&'static str, String),
    Fail(Error),
}
use CopyError::{Fail, Skip};

impl From<Error> for CopyError {
    fn from(e: Error) -> Self {
        Fail(e)
    }
}

/// Copies one backup; returns the name it was committed under.
#[allow(clippy::too_many_arguments)]
async fn copy_backup(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    b: &BackupRef,
    used: &HashSet<&str>,
    parent: Option<&BackupRef>,
    session_opts: SessionOptions,
    opts: &SyncOptions,
    observer: &dyn Observer,
    bytes_done: &AtomicU64,
    out: &mut SyncOutcome,
) -> std::result::Result<BackupRef, CopyError> {
    let (sealed, m) = match src.read_manifest_object(b).await {
        Ok(x) => x,
        // Forgotten in the source since the listing: nothing to copy.
        Err(ferry_repo::Error::NotFound { .. } | ferry_repo::Error::Fenced { .. }) => {
            return Err(Skip("vanished", "deleted from the source while the sync ran".into()))
        }
        Err(e @ ferry_repo::Error::UnsupportedFormat { .. }) => return Err(Skip("unsupported", e.to_string())),
        Err(e) if e.is_integrity() => return Err(Skip("damaged", format!("its manifest in the source cannot be used: {e}"))),
        Err(e) => return Err(Fail(Error::from(e).context(format!("reading manifest {}", b.key())))),
    };
    // A session of its own: the source's name first, else the next free attempt name.
    let mut session = None;
    for k in 0..1000u32 {
        let Some(name) = copy_name(&b.name, k) else {
            return Err(Fail(Error::failed(format!("manifest name {} cannot be parsed", b.name))));
        };
        if used.contains(name.as_str()) {
            continue;
        }
        let r = BackupRef {
            volume: b.volume.clone(),
            name,
        };
        match Session::begin_named(dst, r, m.meta.created, session_opts).await {
            Ok(Some(s)) => {
                session = Some(s);
                break;
            }
            // Taken since the listing: another sync has just begun copying it.
            Ok(None) => return Err(Skip("busy", "another sync began copying it at the same time".into())),
            Err(e) => return Err(Fail(Error::from(e).context(format!("beginning the copy of {}", b.key())))),
        }
    }
    let Some(session) = session else {
        return Err(Fail(Error::failed(format!("1000 earlier attempts to copy {}", b.key()))));
    };
    let session = Arc::new(session);
    let r = copy_into(src, dst, b, &sealed, &m, &session, parent, opts, observer, bytes_done, out).await;
    if r.is_err() {
        // Its own name only: the next attempt takes another.
        session.abort().await;
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn copy_into(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    b: &BackupRef,
    sealed: &bytes::Bytes,
    m: &ferry_repo::Manifest,
    session: &Arc<Session>,
    parent: Option<&BackupRef>,
    opts: &SyncOptions,
    observer: &dyn Observer,
    bytes_done: &AtomicU64,
    out: &mut SyncOutcome,
) -> std::result::Result<BackupRef, CopyError> {
    // After the session, the destination's copy of the previous backup: its objects are
    // referenced without a HEAD, like a backup's parent (a sweep that lists them is settled
    // before the commit); never one in quarantine there.
    let mut wanted: Vec<ChunkId> = m.objects().collect::<HashSet<_>>().into_iter().collect();
    wanted.sort();
    if let Some(p) = parent {
        match dst.read_manifest(p).await {
            Ok(pm) => {
                let theirs: HashSet<ChunkId> = pm.objects().filter(|id| !session.quarantined().contains(id)).collect();
                let (inherited, rest): (Vec<ChunkId>, Vec<ChunkId>) = wanted.into_iter().partition(|id| theirs.contains(id));
                session.inherit(inherited.iter()).map_err(Error::from)?;
                out.objects_present += inherited.len() as u64;
                wanted = rest;
            }
            Err(ferry_repo::Error::NotFound { .. } | ferry_repo::Error::Fenced { .. }) => {}
            Err(e) => return Err(Fail(Error::from(e).context(format!("reading the destination's {}", p.key())))),
        }
    }
    // Delta objects are checked as what they are (their ID, target and base).
    let delta_of: BTreeMap<ChunkId, (ChunkId, ChunkId)> = m.deltas.iter().map(|(t, d)| (d.object, (*t, d.base))).collect();
    let results: Vec<std::result::Result<bool, CopyError>> = futures::stream::iter(wanted.into_iter().map(|id| {
        let (src, dst, session) = (src.clone(), dst.clone(), session.clone());
        let delta = delta_of.get(&id).copied();
        async move {
            let r = copy_object(&src, &dst, &session, id, delta).await;
            if let Ok(Some(n)) = &r {
                let d = bytes_done.fetch_add(*n, Ordering::Relaxed) + n;
                observer.event(Event::Progress {
                    op: Operation::Sync,
                    done: d,
                });
            }
            r.map(|n| n.is_some())
        }
    }))
    .buffer_unordered(opts.jobs.max(1))
    .collect()
    .await;
    let mut missing_in_source = false;
    for r in results {
        match r {
            Ok(true) => out.objects_copied += 1,
            Ok(false) => out.objects_present += 1,
            Err(Skip("missing", _)) => missing_in_source = true,
            Err(e) => return Err(e),
        }
    }
    if missing_in_source {
        // Missing because the backup was forgotten in the source and a GC there took its
        // objects meanwhile (vanished), or because the source is damaged.
        return Err(match src.read_manifest(b).await {
            Err(ferry_repo::Error::NotFound { .. } | ferry_repo::Error::Fenced { .. }) => {
                Skip("vanished", "deleted from the source while the sync ran".into())
            }
            Err(e) if e.is_transient() => Fail(Error::from(e).context(format!("reading manifest {}", b.key()))),
            _ => Skip("damaged", "objects it needs are missing in the source (audit the source)".into()),
        });
    }
    session.settle_inherited().await.map_err(|e| match e {
        // An inherited object a sweep of the destination deleted: the next run copies it.
        e @ ferry_repo::Error::ChunkMissing { .. } => Fail(Error::new(
            ErrorKind::Transient,
            format!(
                "copying {}: a garbage collection in the destination deleted an object it needs while it was copied; run the sync again",
                b.key()
            ),
            Some(Box::new(e)),
        )),
        e => Fail(Error::from(e)),
    })?;
    let len = sealed.len() as u64;
    match dst.commit_copy(b, sealed.clone(), m, session).await {
        Ok(r) => {
            bytes_done.fetch_add(len, Ordering::Relaxed);
            Ok(r)
        }
        Err(e @ ferry_repo::Error::Fenced { .. }) => Err(Skip(
            "fenced",
            format!("a garbage collection in the destination stopped the copy (the next sync copies it again): {e}"),
        )),
        Err(e) => Err(Fail(Error::from(e).context(format!("committing the copy of {}", b.key())))),
    }
}

/// Makes sure object `id` is in the destination: decided under the copy's session (waiting
/// for a sweep that lists it), HEAD, and if missing read from the source, verified, written.
/// `Some(bytes)` when it was copied.
async fn copy_object(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    session: &Session,
    id: ChunkId,
    delta: Option<(ChunkId, ChunkId)>,
) -> std::result::Result<Option<u64>, CopyError> {
    // A candidate of a running sweep waits for its end, then is decided again.
    while let Decision::Wait(gen) = session.decide(&id).map_err(Error::from)? {
        session.wait_over(gen).await.map_err(Error::from)?;
    }
    if dst
        .chunk_exists(&id)
        .await
        .with_context(|| format!("looking for object {id} in the destination"))?
    {
        return Ok(None);
    }
    let bytes = match src.get_chunk_object(&id).await {
        Ok(b) => b,
        Err(e) if e.is_integrity() || matches!(e, ferry_repo::Error::NotFound { .. }) => {
            return Err(Skip(
                "damaged",
                format!("object {id} it needs is missing or damaged in the source: {e}"),
            ))
        }
        Err(e) => return Err(Fail(Error::from(e).context(format!("reading object {id} from the source")))),
    };
    let n = bytes.len() as u64;
    // Verified before it is written: opened, decompressed, its ID recomputed.
    let check = {
        let (src, bytes) = (src.clone(), Vec::from(bytes.clone()));
        crate::cpu::run(move || match delta {
            Some((target, base)) => src.decode_delta(&id, &target, &base, bytes).map(|_| ()),
            None => src.decode_chunk(&id, bytes).map(|_| ()),
        })
        .await?
    };
    if let Err(e) = check {
        return Err(Skip("damaged", format!("object {id} it needs is damaged in the source: {e}")));
    }
    dst.put_chunk(&id, Vec::from(bytes))
        .await
        .with_context(|| format!("writing object {id} to the destination"))?;
    Ok(Some(n))
}
