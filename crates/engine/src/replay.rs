//! Standby replay: keep an RBD image in the DR cluster current with a volume's newest backup,
//! from the bucket alone (the clusters never talk to each other).
//!
//! The first replay restores the backup in full (`rbd import-diff` of the whole map); the
//! image gets the backup's snapshot name. Each later replay finds the backup the image is at
//! — its metadata `ferry.standby.backup`, and its newest snapshot, which must be that
//! backup's — and streams to `rbd import-diff` only the blocks whose content differs between
//! that backup's map and the newest one's (plus every block written to the image since its
//! snapshot, when that is allowed), from the old snapshot to the new one: the image then
//! carries the same snapshot names as the source. Old standby snapshots are removed only
//! after the new one exists, so the base of the next replay is never dropped.
//!
//! An image written since its last replay has **diverged**: refused unless `force` (then the
//! written blocks are rewritten from the backup too). A replay that stopped half-way leaves
//! `ferry.replay.pending` on the image: the next replay knows the writes since the snapshot
//! are its own and rewrites them without `force`.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use ferry_ceph::RbdCli;
use ferry_repo::{BackupSpec, Manifest};
use futures::StreamExt;
use rbd_diff::{DiffHeader, DiffWriter};
use serde::Serialize;

use crate::chunks::fetch_content;
use crate::cpu::blocking;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::observer::{Event, Operation};
use crate::rbd::{Ceph, RbdImage};
use crate::restore::RestoreOptions;
use crate::Engine;

/// Image metadata key: the backup ID the standby image is at.
pub const META_BACKUP: &str = "ferry.standby.backup";
/// Image metadata key: the volume the standby image follows.
pub const META_VOLUME: &str = "ferry.standby.volume";
/// Image metadata key: a replay to this backup ID began and has not finished.
pub const META_PENDING: &str = "ferry.replay.pending";

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The backup to bring the image to (default: the newest).
    pub backup: BackupSpec,
    /// Overwrite an image that diverged (written since its last replay) or that is not a
    /// standby of this volume.
    pub force: bool,
    /// Chunks in flight.
    pub jobs: usize,
    /// Standby snapshots to keep (≥ 1: the newest is the next replay's base).
    pub keep_snapshots: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            backup: BackupSpec::Latest,
            force: false,
            jobs: crate::default_jobs(),
            keep_snapshots: 1,
        }
    }
}

/// What a replay did.
#[derive(Debug, Serialize, Clone, Default)]
pub struct ReplayReport {
    /// The standby image.
    pub image: String,
    /// The volume.
    pub volume: String,
    /// `full` (first replay, or a forced one), `incremental`, or `up-to-date`.
    pub kind: &'static str,
    /// The backup the image is at now.
    pub backup_id: String,
    /// Its snapshot on the image.
    pub snapshot: String,
    /// The backup the image was at before (incremental).
    pub from_backup: Option<String>,
    /// Blocks written with data.
    pub blocks_written: u64,
    /// Blocks written as zeros (holes).
    pub blocks_zeroed: u64,
    /// Blocks rewritten because the image had been written since its snapshot.
    pub blocks_diverged: u64,
    /// Data bytes sent to `rbd import-diff`.
    pub bytes_written: u64,
    /// Standby snapshots removed after the replay.
    pub snapshots_removed: Vec<String>,
    /// Wall time.
    pub duration_ms: u64,
}

/// The snapshot a backup's replay leaves on the standby image: the source snapshot's name
/// (a diff stream without one: `ferry-<backup id>`).
pub fn standby_snapshot(m: &Manifest) -> String {
    snapshot_of(&m.meta)
}

fn snapshot_of(meta: &ferry_repo::ManifestMeta) -> String {
    meta.to_snap.clone().unwrap_or_else(|| format!("ferry-{}", meta.backup_id))
}

pub(crate) async fn replay(engine: &Engine, ceph: &Ceph, volume: &str, image: &RbdImage, opts: &ReplayOptions) -> Result<ReplayReport> {
    let started = std::time::Instant::now();
    if opts.keep_snapshots == 0 {
        return Err(Error::refused(
            "keep_snapshots must be at least 1: the newest snapshot is the next replay's base",
        ));
    }
    let (_, target) = engine.resolve(volume, &opts.backup).await?;
    let snap = standby_snapshot(&target);
    let rbd = ceph.rbd();
    let mut report = ReplayReport {
        image: image.to_string(),
        volume: volume.to_string(),
        backup_id: target.meta.backup_id.clone(),
        snapshot: snap.clone(),
        ..Default::default()
    };
    let state = {
        let (rbd, image) = (rbd.clone(), image.clone());
        blocking(move || standby_state(&rbd, &image)).await?
    };
    let chain = engine.chain(volume).await?;
    let known: HashSet<String> = chain.backups.iter().map(|b| snapshot_of(&b.meta)).collect();
    let Some(state) = state else {
        // First replay: a full restore that names the snapshot.
        full(engine, ceph, image, &target, &snap, false, known, opts, &mut report).await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    };
    // Which backup is the image at?
    let newest_snap = state.snaps.last().map(|s| s.name.clone());
    let base = match (&state.meta_backup, &newest_snap) {
        (_, None) => None,
        (Some(id), Some(n))
            if state.meta_volume.as_deref() == Some(volume)
                && chain.backups.iter().any(|b| &b.meta.backup_id == id && snapshot_of(&b.meta) == *n) =>
        {
            chain.backups.iter().find(|b| &b.meta.backup_id == id)
        }
        // A replay to the pending backup whose import finished (its snapshot is the newest)
        // but that stopped before recording it.
        (Some(_), Some(n))
            if state.meta_volume.as_deref() == Some(volume)
                && state
                    .pending
                    .as_deref()
                    .and_then(|p| p.split(' ').nth(1))
                    .is_some_and(|t| chain.backups.iter().any(|b| b.meta.backup_id == t && snapshot_of(&b.meta) == *n)) =>
        {
            let t = state.pending.as_deref().and_then(|p| p.split(' ').nth(1)).unwrap_or_default();
            chain.backups.iter().find(|b| b.meta.backup_id == t)
        }
        // Restored by `ferry restore --to rbd:` (no metadata): the newest snapshot names it.
        (None, Some(n)) => chain.backups.iter().rev().find(|b| snapshot_of(&b.meta) == *n),
        _ => None,
    };
    let Some(base) = base else {
        if !opts.force {
            return Err(Error::refused(format!(
                "RBD image {image} is not a standby of volume '{volume}': {}; use --force to overwrite it with a full restore",
                match (&newest_snap, &state.meta_volume) {
                    (None, _) => "it has no snapshot".to_string(),
                    (Some(_), Some(v)) if v != volume => format!("it follows volume '{v}'"),
                    (Some(n), _) => format!("its newest snapshot '{n}' is not a backup of this volume"),
                }
            )));
        };
        full(engine, ceph, image, &target, &snap, true, known, opts, &mut report).await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    };
    let base_snap = newest_snap.unwrap_or_default();
    report.from_backup = Some(base.meta.backup_id.clone());
    // Written since the snapshot?
    let written = {
        let (rbd, image, s) = (rbd.clone(), image.clone(), base_snap.clone());
        blocking(move || {
            rbd.head_diff_extents(&image.pool, &image.image, &s)
                .with_context(|| format!("listing what was written to {image} since @{s}"))
        })
        .await?
    };
    let base_manifest = engine.repository().read_manifest(&base.backup).await?;
    let bs = target.meta.block_size.get();
    // What differs on the image since its snapshot: written extents, and a size change (a
    // shrunk head lost what was beyond its end; `rbd diff` of the head cannot show that).
    let snap_size = state.snaps.last().map(|s| s.size).unwrap_or(base_manifest.meta.image_size);
    let mut diverged: BTreeSet<u64> = BTreeSet::new();
    for e in &written {
        if e.length == 0 {
            continue;
        }
        let (first, last) = (e.offset / bs, (e.offset + e.length - 1) / bs);
        diverged.extend(first..=last);
    }
    if state.head_size != snap_size {
        let (lo, hi) = (state.head_size.min(snap_size), state.head_size.max(snap_size));
        diverged.extend(lo / bs..hi.div_ceil(bs));
    }
    if !diverged.is_empty() && !opts.force {
        // Our own interrupted replay (the pending mark names this base and its target): only
        // the blocks that replay was writing may differ.
        let ours = match state.pending.as_deref().and_then(|p| p.split_once(' ')) {
            Some((from, to)) if from == base.meta.backup_id => match chain.backups.iter().find(|b| b.meta.backup_id == to) {
                Some(t) => {
                    let pending = engine.repository().read_manifest(&t.backup).await?;
                    let theirs: BTreeSet<u64> = changed_blocks(&base_manifest, &pending).into_iter().collect();
                    let beyond = base_manifest.meta.image_size.min(pending.meta.image_size) / bs;
                    diverged.iter().all(|i| theirs.contains(i) || *i >= beyond)
                }
                None => false,
            },
            _ => false,
        };
        if !ours {
            let bytes: u64 = written.iter().map(|e| e.length).sum();
            return Err(Error::refused(format!(
                "RBD image {image} has diverged since its snapshot @{base_snap} (backup {}): {bytes} bytes in {} extents written{}; use --force to overwrite them from the backup",
                base.meta.backup_id,
                written.len(),
                if state.head_size != snap_size {
                    format!(", and resized from {snap_size} to {} bytes", state.head_size)
                } else {
                    String::new()
                }
            )));
        }
    }
    let changed: BTreeSet<u64> = changed_blocks(&base_manifest, &target).into_iter().collect();
    let mut blocks: Vec<u64> = Vec::new();
    for i in 0..target.blocks.len() as u64 {
        let (c, d) = (changed.contains(&i), diverged.contains(&i));
        if c || d {
            blocks.push(i);
            if d && !c {
                report.blocks_diverged += 1;
            }
        }
    }
    if blocks.is_empty() && base.meta.backup_id == target.meta.backup_id && state.head_size == target.meta.image_size {
        report.kind = "up-to-date";
        // Records where the image is (a replay that stopped after its import had not), clears
        // a pending mark.
        if state.meta_backup.as_deref() != Some(target.meta.backup_id.as_str()) || state.pending.is_some() {
            finish(&rbd, image, volume, &target, known, opts, &mut report).await?;
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }
    if base.meta.backup_id == target.meta.backup_id {
        // Only diverged blocks to rewrite, onto the same snapshot: rbd import-diff cannot end at
        // a snapshot that exists, so the stream names none and the head is repaired.
        report.kind = "repaired";
    } else {
        report.kind = "incremental";
    }
    {
        let (rbd, image) = (rbd.clone(), image.clone());
        let mark = format!("{} {}", base.meta.backup_id, target.meta.backup_id);
        blocking(move || {
            rbd.meta_set(&image.pool, &image.image, META_PENDING, &mark)
                .with_context(|| format!("marking the replay on {image}"))
        })
        .await?;
    }
    let to_snap = (report.kind == "incremental").then(|| snap.clone());
    stream_blocks(
        engine,
        &rbd,
        image,
        &target,
        &blocks,
        Some(base_snap.clone()),
        to_snap,
        opts,
        &mut report,
    )
    .await?;
    finish(&rbd, image, volume, &target, known, opts, &mut report).await?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Blocks of `to` whose content differs from `from`'s (all of them when the block sizes
/// differ; beyond `from`'s end only data blocks: a grown image reads zeros there).
fn changed_blocks(from: &Manifest, to: &Manifest) -> Vec<u64> {
    let same_layout = from.meta.block_size == to.meta.block_size;
    (0..to.blocks.len() as u64)
        .filter(|&i| {
            let now = to.blocks[i as usize];
            if !same_layout {
                true
            } else if (i as usize) < from.blocks.len() {
                from.blocks[i as usize] != now || from.block_len(i) != to.block_len(i)
            } else {
                now.is_some()
            }
        })
        .collect()
}

/// What the image says about itself.
struct StandbyState {
    /// The image's (head's) size now.
    head_size: u64,
    /// User snapshots, oldest first (by id).
    snaps: Vec<ferry_ceph::SnapInfo>,
    meta_backup: Option<String>,
    meta_volume: Option<String>,
    pending: Option<String>,
}

fn standby_state(rbd: &RbdCli, image: &RbdImage) -> Result<Option<StandbyState>> {
    let head_size = match rbd.info(&image.pool, &image.image) {
        Ok(i) => i.size,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(crate::Error::from(e).context(format!("looking up {image}"))),
    };
    let mut snaps = rbd
        .snap_list(&image.pool, &image.image)
        .with_context(|| format!("listing snapshots of {image}"))?;
    snaps.sort_by_key(|s| s.id);
    let mut meta = rbd
        .meta_list(&image.pool, &image.image)
        .with_context(|| format!("reading the metadata of {image}"))?;
    Ok(Some(StandbyState {
        head_size,
        snaps,
        meta_backup: meta.remove(META_BACKUP),
        meta_volume: meta.remove(META_VOLUME),
        pending: meta.remove(META_PENDING),
    }))
}

#[allow(clippy::too_many_arguments)]
async fn full(
    engine: &Engine,
    ceph: &Ceph,
    image: &RbdImage,
    target: &Arc<Manifest>,
    snap: &str,
    force: bool,
    known: HashSet<String>,
    opts: &ReplayOptions,
    report: &mut ReplayReport,
) -> Result<()> {
    report.kind = "full";
    let t = engine.rbd_target(ceph, image, force, Some(snap.to_string()));
    let r = engine
        .restore(
            target.clone(),
            Box::new(t),
            &RestoreOptions {
                jobs: opts.jobs,
                ..Default::default()
            },
        )
        .await?;
    report.blocks_written = r.blocks_written;
    report.blocks_zeroed = r.blocks_hole;
    report.bytes_written = r.bytes_written;
    finish(&ceph.rbd(), image, &target.meta.volume, target, known, opts, report).await
}

/// After a replay that reached its snapshot: record where the image is, clear the pending
/// mark, then remove older standby snapshots (`known`: the names a backup of this volume
/// leaves), keeping the `keep_snapshots` newest — never the new one, never a protected or a
/// foreign one.
async fn finish(
    rbd: &RbdCli,
    image: &RbdImage,
    volume: &str,
    target: &Manifest,
    known: HashSet<String>,
    opts: &ReplayOptions,
    report: &mut ReplayReport,
) -> Result<()> {
    let (rbd, image, volume) = (rbd.clone(), image.clone(), volume.to_string());
    let (id, snap, keep) = (target.meta.backup_id.clone(), standby_snapshot(target), opts.keep_snapshots);
    report.snapshots_removed = blocking(move || {
        let mut snaps = rbd
            .snap_list(&image.pool, &image.image)
            .with_context(|| format!("listing snapshots of {image}"))?;
        snaps.sort_by_key(|s| s.id);
        let Some(pos) = snaps.iter().position(|s| s.name == snap) else {
            return Err(Error::new(
                ErrorKind::Source,
                format!("rbd import-diff into {image} finished but snapshot @{snap} is not there"),
                None,
            ));
        };
        rbd.meta_set(&image.pool, &image.image, META_VOLUME, &volume)
            .with_context(|| format!("recording the standby on {image}"))?;
        rbd.meta_set(&image.pool, &image.image, META_BACKUP, &id)
            .with_context(|| format!("recording the standby on {image}"))?;
        if rbd
            .meta_list(&image.pool, &image.image)
            .with_context(|| format!("reading the metadata of {image}"))?
            .contains_key(META_PENDING)
        {
            rbd.meta_remove(&image.pool, &image.image, META_PENDING)
                .with_context(|| format!("clearing {META_PENDING} on {image}"))?;
        }
        // Older standby snapshots of this volume, newest first; the new one counts as kept.
        let older: Vec<&ferry_ceph::SnapInfo> = snaps[..pos]
            .iter()
            .rev()
            .filter(|s| known.contains(&s.name) && !s.protected)
            .collect();
        let mut removed = Vec::new();
        for s in older.into_iter().skip(keep.saturating_sub(1)) {
            rbd.snap_remove(&image.pool, &image.image, &s.name)
                .with_context(|| format!("removing the old standby snapshot {image}@{}", s.name))?;
            removed.push(s.name.clone());
        }
        Ok(removed)
    })
    .await?;
    Ok(())
}

/// Streams the listed blocks of `target` to `rbd import-diff` (from `from_snap`, to
/// `to_snap`), fetching ahead in order.
#[allow(clippy::too_many_arguments)]
async fn stream_blocks(
    engine: &Engine,
    rbd: &RbdCli,
    image: &RbdImage,
    target: &Arc<Manifest>,
    blocks: &[u64],
    from_snap: Option<String>,
    to_snap: Option<String>,
    opts: &ReplayOptions,
    report: &mut ReplayReport,
) -> Result<()> {
    let bs = target.meta.block_size.get();
    let size = target.meta.image_size;
    let observer = engine.observer.clone();
    observer.event(Event::Started {
        op: Operation::Restore,
        total: Some(blocks.len() as u64 * bs),
    });
    let import = {
        let (rbd, image) = (rbd.clone(), image.clone());
        blocking(move || {
            rbd.import_diff(&image.pool, &image.image)
                .with_context(|| format!("starting rbd import-diff into {image}"))
        })
        .await?
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Option<Vec<u8>>)>(4);
    let header = DiffHeader {
        from_snap,
        to_snap,
        image_size: size,
        protected: None,
    };
    let expected = blocks.len();
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, ferry_ceph::ImportDiff)> {
        let dw = |e: rbd_diff::Error| Error::new(ErrorKind::Failed, "writing the replay stream", Some(Box::new(e)));
        let mut import = import;
        let mut written = 0u64;
        let res = (|| {
            let out = std::io::BufWriter::with_capacity(1 << 20, &mut import);
            let mut w = DiffWriter::new(out, &header).map_err(dw)?;
            let mut received = 0usize;
            while let Some((i, data)) = rx.blocking_recv() {
                received += 1;
                let off = i * bs;
                let len = (size - off).min(bs);
                let d = data.as_deref().unwrap_or(&[]);
                let n = (d.len() as u64).min(len);
                if n > 0 {
                    w.write_data(off, &d[..n as usize]).map_err(dw)?;
                    written += n;
                }
                if n < len {
                    w.write_zero(off + n, len - n).map_err(dw)?;
                }
            }
            // Never end a short stream: `e` makes rbd import-diff create the to-snapshot.
            if received != expected {
                return Err(Error::failed(format!(
                    "replay stream cut short after {received} of {expected} blocks; no end record written"
                )));
            }
            let mut out = w.finish().map_err(dw)?;
            std::io::Write::flush(&mut out).map_err(|e| Error::new(ErrorKind::Failed, "writing the replay stream", Some(Box::new(e))))?;
            Ok(())
        })();
        match res {
            Ok(()) => Ok((written, import)),
            Err(e) => {
                // Close the stream without its end record and let rbd import-diff fail on its
                // own (a killed one leaves its watch on the image for the OSD's watch timeout,
                // which stalls the next metadata update); it creates no snapshot either way.
                let _ = import.finish();
                Err(e)
            }
        }
    });
    let repo = engine.repository().clone();
    let mut fetches = futures::stream::iter(blocks.iter().copied())
        .map(|i| {
            let (repo, target) = (repo.clone(), target.clone());
            async move {
                match target.blocks[i as usize] {
                    None => Ok((i, None)),
                    Some(id) => fetch_content(&repo, &target.deltas, &id)
                        .await
                        .map(|d| (i, Some(d)))
                        .map_err(|e| (i, e)),
                }
            }
        })
        .buffered(opts.jobs.max(1));
    let mut failed = None;
    let mut done = 0u64;
    while let Some(r) = fetches.next().await {
        match r {
            Ok((i, data)) => {
                match &data {
                    Some(_) => report.blocks_written += 1,
                    None => report.blocks_zeroed += 1,
                }
                if tx.send((i, data)).await.is_err() {
                    break;
                }
                done += 1;
                observer.event(Event::Progress {
                    op: Operation::Restore,
                    done: done * bs,
                });
            }
            Err((i, e)) => {
                let kind = match &*e.error {
                    ferry_repo::Error::NotFound { .. } => ErrorKind::Integrity,
                    other => crate::error::repo_error_kind(other),
                };
                failed = Some(Error::new(
                    kind,
                    format!("block {i} (object {}) could not be read: {}", e.object, e.error),
                    None,
                ));
                break;
            }
        }
    }
    drop(tx);
    observer.event(Event::Finished { op: Operation::Restore });
    let written = writer.await?;
    if let Some(e) = failed {
        // The writer saw the channel close early: a stream without its end record, which
        // rbd import-diff refuses. Kill it if it still runs.
        if let Ok((_, mut import)) = written {
            import.kill();
        }
        return Err(e.context(format!("replay into {image} stopped; the next replay repairs it")));
    }
    let (n, import) = written?;
    report.bytes_written = n;
    blocking(move || {
        import
            .finish()
            .map_err(|e| Error::new(ErrorKind::Source, format!("rbd import-diff failed: {e}"), None))
    })
    .await
}
