//! The primary side: back up an RBD image through `rbd export-diff`, restore into an RBD
//! image through `rbd import-diff`, and the snapshot rotation that keeps exactly one
//! `ferry-*` base snapshot per image.
//!
//! Order matters (DESIGN §6): snapshot, stream, commit the manifest, and only then remove
//! older ferry snapshots. Any failure before the commit removes the new snapshot and leaves
//! the base and every committed backup untouched.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ferry_ceph::{CephConfig, Cluster, RbdCli};
use ferry_repo::{BackupRef, Manifest, Source};

use crate::common::{progress_bar, progress_callback, Ctx};
use crate::errors::Refused;
use crate::ingest::{ingest, IngestParams};

/// How to reach the Ceph cluster (defaults: $CEPH_ARGS / $CEPH_CONF, /etc/ceph, client.admin).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Ceph options")]
pub struct CephArgs {
    /// ceph.conf of the cluster.
    #[arg(long, env = "CEPH_CONF", global = true)]
    pub ceph_conf: Option<PathBuf>,
    /// Keyring with the client's key.
    #[arg(long, env = "CEPH_KEYRING", global = true)]
    pub ceph_keyring: Option<PathBuf>,
    /// Ceph client id (the part after "client."), default admin.
    #[arg(long, env = "FERRY_CEPH_ID", global = true)]
    pub ceph_id: Option<String>,
    /// The rbd program to run (default: rbd on PATH).
    #[arg(long, env = "FERRY_RBD_PROGRAM", global = true, hide = true)]
    pub rbd_program: Option<PathBuf>,
}

impl CephArgs {
    pub fn config(&self) -> CephConfig {
        CephConfig {
            conf: self.ceph_conf.clone(),
            keyring: self.ceph_keyring.clone(),
            client_id: self.ceph_id.clone(),
        }
    }

    pub fn rbd(&self) -> RbdCli {
        let cli = RbdCli::new(self.config());
        match &self.rbd_program {
            Some(p) => cli.with_program(p.clone()),
            None => cli,
        }
    }
}

/// `rbd:POOL/IMAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub image: String,
}

impl RbdSpec {
    pub fn parse(s: &str) -> Option<RbdSpec> {
        let rest = s.strip_prefix("rbd:")?;
        let (pool, image) = rest.split_once('/')?;
        if pool.is_empty() || image.is_empty() || image.contains('/') || image.contains('@') {
            return None;
        }
        Some(RbdSpec {
            pool: pool.to_string(),
            image: image.to_string(),
        })
    }

    /// Default volume name: `POOL.IMAGE`.
    pub fn volume(&self) -> String {
        format!("{}.{}", self.pool, self.image)
    }
}

impl std::fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

pub const SNAP_PREFIX: &str = "ferry-";

fn new_snap_name() -> String {
    format!("{SNAP_PREFIX}{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"))
}

pub struct RbdBackupOptions {
    pub volume: Option<String>,
    pub full: bool,
    pub jobs: usize,
    pub labels: BTreeMap<String, String>,
    pub lease: Option<Duration>,
    pub quiet: bool,
    /// Blocks the diff called unchanged to re-read and check after an incremental (0: none).
    pub verify_blocks: usize,
}

/// What happened besides the backup itself (printed with the summary).
#[derive(Debug, Default, serde::Serialize)]
pub struct RbdBackupNotes {
    pub snapshot: String,
    pub base_snapshot: Option<String>,
    pub full_reason: Option<String>,
    pub removed_snapshots: Vec<String>,
}

/// Backs up `spec`: snapshot, export-diff from the base, ingest, commit, rotate snapshots.
pub async fn backup_rbd(
    ctx: &Ctx,
    ceph: &CephArgs,
    spec: &RbdSpec,
    opts: RbdBackupOptions,
) -> Result<(BackupRef, Manifest, RbdBackupNotes)> {
    let cfg = ceph.config();
    let rbd = ceph.rbd();
    let volume = opts.volume.clone().unwrap_or_else(|| spec.volume());
    ferry_repo::validate_volume_name(&volume)?;

    // Exclusivity per image, across machines: a RADOS lock with a lease, renewed while we run.
    let (cluster, lease) = {
        let cfg = cfg.clone();
        let spec = spec.clone();
        let lease_for = opts.lease;
        tokio::task::spawn_blocking(move || -> Result<(Cluster, Option<ferry_ceph::Lease>)> {
            let cluster = Cluster::connect(&cfg).context("connecting to the Ceph cluster")?;
            let lease = match lease_for {
                None => None,
                Some(d) => {
                    let who = format!("ferry backup on {} pid {}", hostname(), std::process::id());
                    match cluster.lease(&spec.pool, &format!("ferry.lease.{}", spec.image), d, &who) {
                        Ok(l) => Some(l),
                        Err(ferry_ceph::Error::LeaseHeld { holder, .. }) => {
                            bail!(Refused(format!(
                                "another backup of {spec} is running ({holder}); not starting a second one"
                            )))
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("taking the backup lease of {spec}"))),
                    }
                }
            };
            Ok((cluster, lease))
        })
        .await??
    };
    let cluster = Arc::new(cluster);
    let lease = lease.map(Arc::new);
    let mut result = backup_locked(ctx, &rbd, &cluster, lease.clone(), spec, &volume, &opts, opts.full).await;
    if let Err(e) = &result {
        if let Some(v) = e.downcast_ref::<DiffVerificationFailed>() {
            // librbd's diff missed changes: the incremental was not committed; take a full one.
            tracing::warn!("{v}; taking a full backup instead");
            let why = v.to_string();
            result = backup_locked(ctx, &rbd, &cluster, lease.clone(), spec, &volume, &opts, true)
                .await
                .map(|(r, m, mut notes)| {
                    notes.full_reason = Some(format!("{why}; the incremental was discarded"));
                    (r, m, notes)
                });
        }
    }
    if let Some(l) = lease.and_then(|l| Arc::try_unwrap(l).ok()) {
        let healthy = l.is_healthy();
        let _ = tokio::task::spawn_blocking(move || l.release()).await;
        if !healthy && result.is_ok() {
            tracing::warn!("the backup lease of {spec} could not always be renewed; check for a concurrent backup");
        }
    }
    result
}

/// The diff called blocks unchanged that are not (DESIGN §2: Ceph's diff machinery has had
/// such bugs).
#[derive(Debug)]
pub struct DiffVerificationFailed(pub String);

impl std::fmt::Display for DiffVerificationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiffVerificationFailed {}

/// Re-reads up to `count` blocks that the new manifest shares with its parent from the new
/// snapshot and checks they still hash to the parent's chunk IDs.
fn verify_unchanged(
    cluster: &Cluster,
    spec: &RbdSpec,
    snap: &str,
    parent: &Manifest,
    new: &Manifest,
    count: usize,
    key: &ferry_repo::MasterKey,
) -> Result<()> {
    use rand::seq::IndexedRandom;
    let candidates: Vec<usize> = (0..new.blocks.len().min(parent.blocks.len()))
        .filter(|&i| new.blocks[i] == parent.blocks[i] && new.block_len(i as u64) == parent.block_len(i as u64))
        .collect();
    let sample: Vec<usize> = candidates.choose_multiple(&mut rand::rng(), count).copied().collect();
    if sample.is_empty() {
        return Ok(());
    }
    let mut reader = cluster
        .open_snapshot(&spec.pool, &spec.image, snap)
        .with_context(|| format!("opening {spec}@{snap} to verify the diff"))?;
    let mut buf = vec![0u8; new.meta.block_size as usize];
    let mut bad = Vec::new();
    for &i in &sample {
        let len = new.block_len(i as u64) as usize;
        let n = reader.read(i as u64 * new.meta.block_size, &mut buf[..len])?;
        let data = &buf[..n];
        let actual = if ferry_repo::is_zero(data) {
            None
        } else {
            Some(ferry_repo::ChunkId::of(key, data))
        };
        // Candidates have the same block length in both manifests, so the stored chunk is the
        // whole block: compare IDs directly.
        if new.blocks[i] != actual {
            bad.push(i);
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_unstable();
    Err(DiffVerificationFailed(format!(
        "diff verification failed: {} of {} sampled blocks that the export-diff of {spec}@{snap} called unchanged differ from the parent backup (blocks {bad:?})",
        bad.len(),
        sample.len()
    ))
    .into())
}

#[allow(clippy::too_many_arguments)]
async fn backup_locked(
    ctx: &Ctx,
    rbd: &RbdCli,
    cluster: &Arc<Cluster>,
    lease: Option<Arc<ferry_ceph::Lease>>,
    spec: &RbdSpec,
    volume: &str,
    opts: &RbdBackupOptions,
    full: bool,
) -> Result<(BackupRef, Manifest, RbdBackupNotes)> {
    let (pool, image) = (spec.pool.as_str(), spec.image.as_str());
    let info = rbd.info(pool, image).with_context(|| format!("reading image info of {spec}"))?;
    let fsid = cluster.fsid().context("reading the cluster fsid")?;
    let snaps = rbd.snap_list(pool, image).with_context(|| format!("listing snapshots of {spec}"))?;
    let chain = ctx.chain(volume).await?;
    let mut notes = RbdBackupNotes::default();

    // The base: the newest committed backup's to-snapshot, if it is still on this very image.
    let mut parent = None;
    match chain.last() {
        None => notes.full_reason = Some("first backup of this volume".into()),
        Some(_) if full && opts.full => notes.full_reason = Some("--full was given".into()),
        Some(_) if full => notes.full_reason = Some("full backup requested".into()),
        Some(head) => {
            let same_image = head.meta.source.image_id.as_deref() == Some(info.id.as_str())
                && head.meta.source.cluster_fsid.as_deref() == Some(fsid.as_str());
            match &head.meta.to_snap {
                _ if !same_image => {
                    notes.full_reason = Some(format!(
                        "the newest backup {} is of another image (ID or cluster differs)",
                        head.meta.backup_id
                    ))
                }
                Some(base) if snaps.iter().any(|s| &s.name == base) => {
                    notes.base_snapshot = Some(base.clone());
                    parent = Some((head.backup.clone(), ctx.repo.read_manifest(&head.backup).await?));
                }
                Some(base) => {
                    notes.full_reason = Some(format!(
                        "base snapshot {spec}@{base} of backup {} no longer exists",
                        head.meta.backup_id
                    ))
                }
                None => notes.full_reason = Some(format!("the newest backup {} has no to-snapshot", head.meta.backup_id)),
            }
        }
    }

    let parent_manifest: Option<Arc<Manifest>> = parent.as_ref().map(|(_, m)| Arc::new(m.clone()));
    let snap = new_snap_name();
    rbd.snap_create(pool, image, &snap)
        .with_context(|| format!("creating snapshot {spec}@{snap}"))?;
    notes.snapshot = snap.clone();
    let export = match rbd.export_diff(pool, image, &snap, notes.base_snapshot.as_deref(), true) {
        Ok(e) => e,
        Err(e) => {
            let _ = rbd.snap_remove(pool, image, &snap);
            return Err(anyhow::Error::new(e).context(format!("starting rbd export-diff of {spec}@{snap}")));
        }
    };
    let pb = progress_bar(None, "backup", opts.quiet);
    let progress = progress_callback(&pb);
    let params = IngestParams {
        volume: volume.to_string(),
        // Whole-object diffs line up with the image's objects when blocks are objects.
        block_size: info.object_size,
        parent,
        source: Source {
            kind: "rbd".into(),
            cluster_fsid: Some(fsid),
            pool: Some(pool.to_string()),
            image: Some(image.to_string()),
            image_id: Some(info.id.clone()),
            object_size: Some(info.object_size),
        },
        zstd_level: ctx.repo.config().zstd_level,
        jobs: opts.jobs,
        labels: opts.labels.clone(),
        progress,
        expect_to_snap: Some(snap.clone()),
        verify: {
            let sample = parent_manifest.clone().filter(|_| opts.verify_blocks > 0);
            let (cluster, spec, snap, key, n) = (
                cluster.clone(),
                spec.clone(),
                snap.clone(),
                ctx.repo.key().clone(),
                opts.verify_blocks,
            );
            Some(Box::new(move |m: &Manifest| {
                // Commit only while we still hold the image exclusively.
                if let Some(l) = &lease {
                    if !l.is_healthy() {
                        bail!(
                            "the backup lease of {spec} was lost ({}); not committing",
                            l.failure().unwrap_or_else(|| "renewal overdue".into())
                        );
                    }
                }
                match &sample {
                    Some(pm) => verify_unchanged(&cluster, &spec, &snap, pm, m, n, &key),
                    None => Ok(()),
                }
            }) as crate::ingest::Verifier)
        },
    };
    let finish = |mut export: ferry_ceph::ExportDiff, complete: bool| -> Result<()> {
        if !complete {
            export.kill();
        }
        export.wait().map_err(|e| anyhow!("rbd export-diff failed: {e}"))
    };
    let result = ingest(ctx.repo.clone(), ctx.index.clone(), export, finish, params).await;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let (r, m) = match result {
        Ok(v) => v,
        Err(e) => {
            // Not committed: drop the new snapshot, keep the base for the next try.
            if let Err(rm) = rbd.snap_remove(pool, image, &snap) {
                tracing::warn!("could not remove snapshot {spec}@{snap} of the failed backup: {rm}");
            }
            return Err(e);
        }
    };
    // Committed. Now older ferry snapshots may go; the new one is the next base. Never a
    // user's snapshot, never a protected one.
    for s in &snaps {
        if s.name.starts_with(SNAP_PREFIX) && s.name != snap {
            if s.protected {
                tracing::warn!("keeping protected snapshot {spec}@{}", s.name);
                continue;
            }
            match rbd.snap_remove(pool, image, &s.name) {
                Ok(()) => notes.removed_snapshots.push(s.name.clone()),
                Err(e) => tracing::warn!("could not remove old snapshot {spec}@{}: {e}", s.name),
            }
        }
    }
    Ok((r, m, notes))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// Restores a backup into an RBD image through `rbd import-diff`: creates the image (object
/// size = block size where RBD allows it) unless it exists and `force` is given. The stream
/// names `snap` as its to-snapshot, so the image gets that snapshot (a base for replays).
pub async fn restore_rbd(
    repo: Arc<ferry_repo::Repository>,
    manifest: Arc<Manifest>,
    ceph: &CephArgs,
    spec: &RbdSpec,
    force: bool,
    snap: Option<String>,
    opts: &crate::restore::RestoreOptions,
) -> Result<crate::restore::RestoreReport> {
    let rbd = ceph.rbd();
    let (pool, image) = (spec.pool.clone(), spec.image.clone());
    let exists = rbd.exists(&pool, &image).with_context(|| format!("looking up rbd:{spec}"))?;
    if exists && !force {
        bail!(Refused(format!("RBD image {spec} exists; use --force to overwrite it")));
    }
    if !exists {
        let bs = manifest.meta.block_size;
        let object_size = (bs.is_power_of_two() && (4096..=32 << 20).contains(&bs)).then_some(bs);
        rbd.create(&pool, &image, manifest.meta.image_size, object_size)
            .with_context(|| format!("creating RBD image {spec}"))?;
    }
    let import = rbd
        .import_diff(&pool, &image)
        .with_context(|| format!("starting rbd import-diff into {spec}"))?;
    let result = crate::restore::restore_to_stream(repo, manifest, import, crate::restore::StreamFormat::ImportDiff, snap, opts).await;
    let outcome = match result {
        Ok((report, import)) => tokio::task::spawn_blocking(move || import.finish())
            .await
            .context("rbd import-diff waiter panicked")?
            .map(|_| report)
            .map_err(|e| anyhow!("rbd import-diff into {spec} failed: {e}")),
        Err(e) => Err(e),
    };
    if outcome.is_err() && !exists && !opts.best_effort {
        // Never leave a half-written image that looks like a restore.
        if let Err(e) = rbd.remove(&pool, &image) {
            tracing::warn!("could not remove the incomplete image {spec}: {e}");
        }
    }
    outcome
}
