//! The primary side: back up an RBD image through `rbd export-diff`, restore into an RBD
//! image through `rbd import-diff`, and the snapshot rotation that keeps the newest
//! `--keep-snapshots` ferry snapshots of each repository and volume on the image.
//!
//! Order matters: snapshot, stream, commit the manifest, and only then remove older ferry
//! snapshots of this repository and volume (see [`plan_rotation`]). Any failure before the
//! commit removes the new snapshot and leaves the base and every committed backup untouched.
//! Every Ceph call blocks, so each runs on the blocking pool, never on an async worker thread.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_ceph::{CephConfig, Cluster, ExportDiff, ImportDiff, RbdCli};
use ferry_repo::{BackupDraft, BlockSize, Manifest, Source};

use crate::backup::{ingest, BackupOutcome, IngestParams, Verifier};
use crate::cpu::blocking;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::observer::warn;
use crate::restore::{Layout, RestoreTarget, StreamFormat};
use crate::Engine;

/// How to reach the source Ceph cluster.
#[derive(Debug, Clone, Default)]
pub struct Ceph {
    /// Conf file, keyring, client id.
    pub config: CephConfig,
    /// The `rbd` program to run (default: `rbd` on PATH).
    pub rbd_program: Option<PathBuf>,
}

impl Ceph {
    /// The `rbd` command-line driver with these settings.
    pub fn rbd(&self) -> RbdCli {
        let cli = RbdCli::new(self.config.clone());
        match &self.rbd_program {
            Some(p) => cli.with_program(p.clone()),
            None => cli,
        }
    }
}

/// An RBD image, `rbd:POOL/IMAGE` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbdImage {
    /// The pool.
    pub pool: String,
    /// The image name.
    pub image: String,
}

impl RbdImage {
    /// Parses `rbd:POOL/IMAGE`; `None` if `s` is not of that form.
    pub fn parse(s: &str) -> Option<RbdImage> {
        let rest = s.strip_prefix("rbd:")?;
        let (pool, image) = rest.split_once('/')?;
        if pool.is_empty() || image.is_empty() || image.contains('/') || image.contains('@') {
            return None;
        }
        Some(RbdImage {
            pool: pool.to_string(),
            image: image.to_string(),
        })
    }

    /// Default volume name: `POOL.IMAGE`.
    pub fn volume(&self) -> String {
        format!("{}.{}", self.pool, self.image)
    }
}

impl std::fmt::Display for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

/// Lease time kept in reserve at the commit: the manifest PUT must be answered this long before
/// the lease would lapse (else its outcome is settled by the fence, FORMAT.md §12.2).
const COMMIT_MARGIN: Duration = Duration::from_secs(1);

/// Prefix of the snapshots ferry creates (and rotates).
pub const SNAP_PREFIX: &str = "ferry-";

/// The time part of a snapshot name: UTC, `%Y%m%dT%H%M%S%.3fZ` (`20260101T000000.000Z`).
const SNAP_TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.3fZ";

/// The owner part of the snapshot names of one repository and volume:
/// `<first 8 hex digits of the repository ID>-<first 8 hex digits of BLAKE3(volume name)>`.
/// A repository ID that does not start with 8 lowercase hex digits (never written by
/// ferry) is replaced by the first 8 hex digits of its BLAKE3 hash, so the name stays valid.
pub fn snap_owner(repository_id: &str, volume: &str) -> String {
    let repo = match repository_id.get(..8) {
        Some(p) if is_hex8(p) => p.to_string(),
        _ => blake3::hash(repository_id.as_bytes()).to_hex()[..8].to_string(),
    };
    format!("{repo}-{}", &blake3::hash(volume.as_bytes()).to_hex()[..8])
}

/// A new snapshot name of `owner` ([`snap_owner`]) at `time`:
/// `ferry-<repo8>-<volume8>-<%Y%m%dT%H%M%S%.3fZ>`, 44 characters.
pub fn snap_name(owner: &str, time: chrono::DateTime<chrono::Utc>) -> String {
    format!("{SNAP_PREFIX}{owner}-{}", time.format(SNAP_TIME_FORMAT))
}

/// A snapshot name ferry made, parsed ([`parse_snap_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapName<'a> {
    /// `ferry-<time>`, as ferry named snapshots before names carried an owner: whose it is
    /// cannot be told from the name.
    Legacy,
    /// `ferry-<repo8>-<volume8>-<time>`; `owner` is `<repo8>-<volume8>`.
    Owned {
        /// The repository and volume the snapshot belongs to ([`snap_owner`]).
        owner: &'a str,
    },
}

fn is_hex8(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `YYYYMMDDTHHMMSS.mmmZ`, digits checked (not the calendar).
fn is_snap_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 => c == b'T',
            15 => c == b'.',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Parses a snapshot name of the forms ferry creates; `None` for anything else (a user's
/// snapshot, even one that starts with `ferry-`).
pub fn parse_snap_name(name: &str) -> Option<SnapName<'_>> {
    let rest = name.strip_prefix(SNAP_PREFIX)?;
    if is_snap_time(rest) {
        return Some(SnapName::Legacy);
    }
    if rest.len() != 8 + 1 + 8 + 1 + 20 {
        return None;
    }
    let (owner, time) = rest.split_at(17);
    let ok = is_hex8(&owner[..8]) && &owner[8..9] == "-" && is_hex8(&owner[9..]) && time.starts_with('-');
    (ok && is_snap_time(&time[1..])).then_some(SnapName::Owned { owner })
}

/// What rotation does after a commit ([`plan_rotation`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationPlan {
    /// Snapshots to remove, oldest first.
    pub remove: Vec<String>,
    /// Committed snapshots of this repository and volume kept besides the new one, newest first.
    pub keep: Vec<String>,
    /// Snapshots of this repository and volume that would go but are protected: left alone,
    /// newest first.
    pub protected: Vec<String>,
}

/// Which snapshots go after a backup of `owner` ([`snap_owner`]) committed `new`.
///
/// `snaps` is the image's snapshot listing taken before `new` was created; `committed` holds
/// the to-snapshots of this volume's backups in this repository that were taken from this
/// very image (same image ID and cluster fsid). A snapshot is *ours* when it is named
/// `ferry-<owner>-<time>`, or when it has the legacy form `ferry-<time>` and is in
/// `committed` (our chain made it; any other legacy snapshot may be another repository's
/// base and is never touched). Of ours, the `keep - 1` newest committed ones (by snapshot
/// ID, i.e. creation order) stay with `new`, which always stays; protected ones are never
/// removed and do not count; every other one of ours is removed (older committed ones, and
/// leftovers of runs that never committed). Snapshots of other owners and users' snapshots
/// are never touched.
pub fn plan_rotation(snaps: &[ferry_ceph::SnapInfo], owner: &str, new: &str, committed: &BTreeSet<String>, keep: usize) -> RotationPlan {
    let ours = |name: &str| match parse_snap_name(name) {
        Some(SnapName::Owned { owner: o }) => o == owner,
        Some(SnapName::Legacy) => committed.contains(name),
        None => false,
    };
    let mut mine: Vec<&ferry_ceph::SnapInfo> = snaps.iter().filter(|s| s.name != new && ours(&s.name)).collect();
    mine.sort_by_key(|s| std::cmp::Reverse(s.id));
    let mut plan = RotationPlan::default();
    for s in mine {
        if s.protected {
            plan.protected.push(s.name.clone());
        } else if committed.contains(&s.name) && plan.keep.len() + 1 < keep {
            plan.keep.push(s.name.clone());
        } else {
            plan.remove.push(s.name.clone());
        }
    }
    plan.remove.reverse();
    plan
}

/// How an RBD backup runs.
#[derive(Debug, Clone)]
pub struct RbdBackupOptions {
    /// Volume name (default `POOL.IMAGE`).
    pub volume: Option<String>,
    /// Full backup even if the base snapshot exists.
    pub full: bool,
    /// Blocks in flight.
    pub jobs: usize,
    /// Labels recorded in the manifest.
    pub labels: BTreeMap<String, String>,
    /// Lease duration of the per-image lock (`None`: no lease).
    pub lease: Option<Duration>,
    /// Blocks the diff called unchanged to re-read and check after an incremental (0: none).
    pub verify_blocks: usize,
    /// Committed snapshots of this repository and volume to keep on the image after a
    /// backup, the new one included (at least 1: the newest is the next base). Snapshots of
    /// other repositories and volumes, users' and protected ones are never removed.
    pub keep_snapshots: usize,
    /// Commands around the snapshot (e.g. a filesystem freeze and thaw in the guest).
    pub hooks: Option<Arc<dyn SnapshotHooks>>,
    /// Skip the backup, failing with [`UpToDate`], when the volume's newest backup was
    /// committed at or after this time — checked under the lease, so several schedulers
    /// sharing the volumes back each one up once per tick.
    pub unless_backed_up_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Stops the backup before its commit (a daemon shutting down): the new snapshot is
    /// removed, the lease released, nothing committed ([`crate::Cancelled`]).
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// Store partly changed blocks as deltas of their changed bytes (FORMAT.md §14; an
    /// incremental then reads the exact export-diff); false: whole objects, whole blocks.
    pub deltas: bool,
}

/// Commands run around the snapshot of an RBD backup, under its lease: `before_snapshot`
/// right before it is taken (an error cancels the backup), `after_snapshot` right after —
/// always, also when `before_snapshot` or the snapshot failed, so a freeze is released.
pub trait SnapshotHooks: Send + Sync + std::fmt::Debug {
    /// Runs right before the snapshot; an error (its message) cancels the backup.
    fn before_snapshot(&self) -> futures::future::BoxFuture<'_, std::result::Result<(), String>>;
    /// Runs right after the snapshot (or after a failed `before_snapshot`); failures are
    /// the hook's to report.
    fn after_snapshot(&self) -> futures::future::BoxFuture<'_, ()>;
}

/// Another backup of the image holds its lease (the cause of a refused RBD backup).
#[derive(Debug)]
pub struct BackupRunning {
    /// The lease holder's description.
    pub holder: String,
}

impl std::fmt::Display for BackupRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the backup lease is held by {}", self.holder)
    }
}

impl std::error::Error for BackupRunning {}

/// The volume was backed up at or after [`RbdBackupOptions::unless_backed_up_since`]
/// (the cause of a refused RBD backup): nothing was done.
#[derive(Debug)]
pub struct UpToDate {
    /// The newest backup.
    pub backup_id: String,
    /// When it was committed.
    pub created: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Display for UpToDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backup {} was made at {}", self.backup_id, self.created.to_rfc3339())
    }
}

impl std::error::Error for UpToDate {}

impl Default for RbdBackupOptions {
    fn default() -> Self {
        RbdBackupOptions {
            volume: None,
            full: false,
            jobs: crate::default_jobs(),
            labels: BTreeMap::new(),
            lease: Some(Duration::from_secs(60)),
            verify_blocks: 8,
            keep_snapshots: 1,
            hooks: None,
            unless_backed_up_since: None,
            cancel: None,
            deltas: true,
        }
    }
}

/// What happened besides the backup itself.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RbdBackupNotes {
    /// The snapshot the backup is of (the base of the next one).
    pub snapshot: String,
    /// The snapshot the incremental started from.
    pub base_snapshot: Option<String>,
    /// Why the backup is a full one.
    pub full_reason: Option<String>,
    /// Older ferry snapshots of this repository and volume removed after the commit.
    pub removed_snapshots: Vec<String>,
    /// Ferry snapshots of this repository and volume left on the image: the new one, up to
    /// `keep_snapshots - 1` older committed ones (newest first), then protected ones (a
    /// snapshot whose removal failed is only warned about).
    pub kept_snapshots: Vec<String>,
    /// Blocks the diff did not touch whose chunk was quarantined (missing or corrupt): re-read
    /// from the new snapshot and uploaded again.
    pub blocks_healed: u64,
}

/// The result of an RBD backup.
#[derive(Debug, Clone)]
pub struct RbdBackupOutcome {
    /// The committed backup.
    pub outcome: BackupOutcome,
    /// Snapshots and the reason for a full backup.
    pub notes: RbdBackupNotes,
}

/// The diff called blocks unchanged that are not (Ceph's diff machinery has had such bugs).
#[derive(Debug)]
pub(crate) struct DiffVerificationFailed(pub(crate) String);

impl std::fmt::Display for DiffVerificationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiffVerificationFailed {}

/// This boot and pid namespace (`<boot id>/pid:[<inode>]`): a pid names a process only within
/// both. Empty when either cannot be read.
fn boot_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string());
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string());
    match (boot, ns) {
        (Ok(b), Ok(n)) if !b.is_empty() => format!("{b}/{n}").replace(' ', "_"),
        _ => String::new(),
    }
}

/// True when a lease cookie (`ferry backup on HOST pid PID boot BOOT#…`) names a process of
/// this host and boot that no longer exists. Anything else — another host, an older ferry's
/// cookie without a boot ID, a live process — is not provably gone.
fn holder_is_dead_here(cookie: &str) -> bool {
    let desc = cookie.split('#').next().unwrap_or("");
    let Some(rest) = desc.strip_prefix("ferry backup on ") else {
        return false;
    };
    let parts: Vec<&str> = rest.split(' ').collect();
    let [host, "pid", pid, "boot", boot] = parts.as_slice() else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else { return false };
    let me = boot_id();
    if *host != hostname() || me.is_empty() || *boot != me || pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

impl Engine {
    /// Backs up `image`: lease, snapshot, export-diff from the base, ingest, commit, rotate
    /// snapshots, release.
    pub async fn backup_rbd(&self, ceph: &Ceph, image: &RbdImage, opts: RbdBackupOptions) -> Result<RbdBackupOutcome> {
        self.backup_rbd_leased(ceph, image, opts)
            .await
            .map_err(|e| crate::backup::failed_backup(e, &format!("backup of rbd:{image}")))
    }

    async fn backup_rbd_leased(&self, ceph: &Ceph, image: &RbdImage, opts: RbdBackupOptions) -> Result<RbdBackupOutcome> {
        let volume = opts.volume.clone().unwrap_or_else(|| image.volume());
        ferry_repo::validate_volume_name(&volume)?;
        if opts.keep_snapshots == 0 {
            return Err(Error::refused(
                "keep_snapshots must be at least 1: the newest snapshot is the base of the next backup",
            ));
        }

        // Exclusivity per image, across machines: a RADOS lock with a lease, renewed while we run.
        let (cluster, lease) = {
            let cfg = ceph.config.clone();
            let spec = image.clone();
            let lease_for = opts.lease;
            blocking(move || -> Result<(Cluster, Option<ferry_ceph::Lease>)> {
                let cluster = Cluster::connect(&cfg).context("connecting to the Ceph cluster")?;
                let lease = match lease_for {
                    None => None,
                    Some(d) => {
                        let who = format!("ferry backup on {} pid {} boot {}", hostname(), std::process::id(), boot_id());
                        let object = format!("ferry.lease.{}", spec.image);
                        let mut took_over = false;
                        loop {
                            match cluster.lease(&spec.pool, &object, d, &who) {
                                Ok(l) => break Some(l),
                                // A holder that is provably gone (a dead process of this very host
                                // and boot) does not block for its whole lease: break its lock only.
                                Err(ferry_ceph::Error::LeaseHeld { .. })
                                    if !took_over
                                        && cluster.break_dead_leases(&spec.pool, &object, holder_is_dead_here).unwrap_or(0) > 0 =>
                                {
                                    took_over = true;
                                    tracing::warn!("took over the backup lease of {spec} from a ferry process of this host that is gone");
                                }
                                Err(ferry_ceph::Error::LeaseHeld { holder, .. }) => {
                                    return Err(Error::new(
                                        ErrorKind::Refused,
                                        format!("another backup of {spec} is running ({holder}); not starting a second one"),
                                        Some(Box::new(BackupRunning { holder })),
                                    ))
                                }
                                Err(e) => return Err(Error::from(e).context(format!("taking the backup lease of {spec}"))),
                            }
                        }
                    }
                };
                Ok((cluster, lease))
            })
            .await?
        };
        let cluster = Arc::new(cluster);
        let lease = lease.map(Arc::new);
        let run = RbdRun {
            engine: self,
            rbd: ceph.rbd(),
            cluster: cluster.clone(),
            lease: lease.clone(),
            image,
            volume: &volume,
            opts: &opts,
        };
        let mut result = run.backup(opts.full).await;
        if let Err(e) = &result {
            if let Some(v) = e.find::<DiffVerificationFailed>() {
                // librbd's diff missed changes: the incremental was not committed; take a full one.
                let why = v.to_string();
                warn(self.observer.as_ref(), &format!("{why}; taking a full backup instead"));
                result = run.backup(true).await.map(|mut o| {
                    o.notes.full_reason = Some(format!("{why}; the incremental was discarded"));
                    o
                });
            }
        }
        drop(run);
        if let Some(l) = lease.and_then(|l| Arc::try_unwrap(l).ok()) {
            let healthy = l.is_healthy();
            let _ = tokio::task::spawn_blocking(move || l.release()).await;
            if !healthy && result.is_ok() {
                warn(
                    self.observer.as_ref(),
                    &format!("the backup lease of {image} could not always be renewed; check for a concurrent backup"),
                );
            }
        }
        // Dropping the last handle shuts librados down, which blocks.
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        result
    }

    /// A restore target for `image` (see [`RbdTarget`]).
    pub fn rbd_target(&self, ceph: &Ceph, image: &RbdImage, force: bool, snap_name: Option<String>) -> RbdTarget {
        RbdTarget {
            rbd: ceph.rbd(),
            image: image.clone(),
            force,
            snap_name,
            created: false,
            import: None,
        }
    }
}

/// One backup attempt under a held lease.
struct RbdRun<'a> {
    engine: &'a Engine,
    rbd: RbdCli,
    cluster: Arc<Cluster>,
    lease: Option<Arc<ferry_ceph::Lease>>,
    image: &'a RbdImage,
    volume: &'a str,
    opts: &'a RbdBackupOptions,
}

impl RbdRun<'_> {
    async fn backup(&self, full: bool) -> Result<RbdBackupOutcome> {
        let spec = self.image.clone();
        let (rbd, cluster) = (self.rbd.clone(), self.cluster.clone());
        let (info, fsid, snaps) = {
            let spec = spec.clone();
            blocking(move || {
                // Two `rbd` commands (a process and a cluster connection each, ~0.1 s): side by
                // side.
                let (info, snaps) = std::thread::scope(|s| {
                    let snaps = s.spawn(|| rbd.snap_list(&spec.pool, &spec.image));
                    let info = rbd.info(&spec.pool, &spec.image);
                    (info, snaps.join())
                });
                let info = info.with_context(|| format!("reading image info of {spec}"))?;
                let snaps = snaps
                    .map_err(|_| Error::failed("the snapshot listing thread panicked"))?
                    .with_context(|| format!("listing snapshots of {spec}"))?;
                let fsid = cluster.fsid().context("reading the cluster fsid")?;
                Ok((info, fsid, snaps))
            })
            .await?
        };
        // Under the lease, before any session (a skipped run leaves nothing in the bucket):
        // was this tick's backup made already, by another worker?
        if let Some(since) = self.opts.unless_backed_up_since {
            let chain = self.engine.chain(self.volume).await?;
            if let Some(head) = chain.head().filter(|h| h.meta.created >= since) {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!("volume '{}' was backed up since {}", self.volume, since.to_rfc3339()),
                    Some(Box::new(UpToDate {
                        backup_id: head.meta.backup_id.clone(),
                        created: head.meta.created,
                    })),
                ));
            }
        }
        if self.opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(crate::backup::Cancelled::error());
        }
        // The session first: every piece of evidence (parent, index, HEAD) comes after it.
        let session = self.engine.begin_session(self.volume).await?;
        // Until the ingest owns the session, a failure fences its name here, at once.
        macro_rules! or_abort {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => {
                        session.abort().await;
                        return Err(Error::from(e));
                    }
                }
            };
        }
        let chain = or_abort!(self.engine.chain(self.volume).await);
        let mut notes = RbdBackupNotes::default();

        // The base: the newest committed backup's to-snapshot, if it is still on this very image.
        let mut parent = None;
        match chain.head() {
            None => notes.full_reason = Some("first backup of this volume".into()),
            Some(_) if full && self.opts.full => notes.full_reason = Some("--full was given".into()),
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
                        let m = or_abort!(self.engine.repo.read_manifest(&head.backup).await);
                        parent = Some((head.backup.clone(), Arc::new(m)));
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

        // Whole-object diffs line up with the image's objects when blocks are objects.
        let block_size = or_abort!(BlockSize::new(info.object_size)
            .map_err(|e| Error::from(e).context(format!("the object size of {spec} cannot be a block size"))));
        let owner = snap_owner(self.engine.repo.id(), self.volume);
        let snap = snap_name(&owner, chrono::Utc::now());
        // The hooks bracket the snapshot alone: the after-hook runs at once, whatever happened
        // — in a task of its own, so a caller that drops this backup midway (a daemon giving
        // up on it) cannot skip the after-hook (a thaw).
        let snapped = {
            let (rbd, spec, snap, hooks) = (self.rbd.clone(), spec.clone(), snap.clone(), self.opts.hooks.clone());
            tokio::spawn(async move {
                let prepared = match &hooks {
                    Some(h) => h.before_snapshot().await.map_err(|why| {
                        Error::new(
                            ErrorKind::Refused,
                            format!("the pre-snapshot hook of {spec} failed: {why}; no snapshot was taken"),
                            None,
                        )
                    }),
                    None => Ok(()),
                };
                let created = match prepared {
                    Ok(()) => {
                        let spec = spec.clone();
                        blocking(move || {
                            rbd.snap_create(&spec.pool, &spec.image, &snap)
                                .with_context(|| format!("creating snapshot {spec}@{snap}"))
                        })
                        .await
                    }
                    Err(e) => Err(e),
                };
                if let Some(h) = &hooks {
                    h.after_snapshot().await;
                }
                created
            })
        };
        let created = snapped.await.map_err(Error::from).and_then(|r| r);
        or_abort!(created);
        // Whole objects are read (rbd streams them fast, in parallel); for an incremental the
        // exact extents that changed come from `rbd diff` (metadata, no data), so a block
        // written in a few places is stored as a delta of those bytes (FORMAT.md §14).
        // The extents only make deltas possible: when they cannot be had (a failure, a chain
        // whose block size is not this image's object size), every block is stored whole.
        let parent_block_size = parent.as_ref().map(|(_, m)| m.meta.block_size);
        let block_extents = match (&notes.base_snapshot, self.opts.deltas) {
            (Some(base), true) if parent_block_size == Some(block_size) => {
                // A listing of a large image without fast-diff can take long: an hour, not
                // the metadata commands' deadline.
                let rbd = self.rbd.clone().with_command_timeout(Duration::from_secs(3600));
                let (spec2, snap2, base) = (spec.clone(), snap.clone(), base.clone());
                let listed = blocking(move || {
                    rbd.diff_extents(&spec2.pool, &spec2.image, &snap2, &base)
                        .with_context(|| format!("listing the changed extents of {spec2}@{snap2} since {base}"))
                })
                .await;
                match listed {
                    Ok(extents) => Some(Arc::new(extents_by_block(&extents, block_size.get()))),
                    Err(e) => {
                        warn(
                            self.engine.observer.as_ref(),
                            &format!("{e}; changed blocks are stored whole this time"),
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let export = or_abort!({
            let (rbd, spec, snap, base) = (self.rbd.clone(), spec.clone(), snap.clone(), notes.base_snapshot.clone());
            blocking(
                move || match rbd.export_diff(&spec.pool, &spec.image, &snap, base.as_deref(), true) {
                    Ok(e) => Ok(e),
                    Err(e) => {
                        let _ = rbd.snap_remove(&spec.pool, &spec.image, &snap);
                        Err(Error::from(e).context(format!("starting rbd export-diff of {spec}@{snap}")))
                    }
                },
            )
            .await
        });
        notes.snapshot = snap.clone();
        let healed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Uploads stop as soon as the lease is unhealthy (its renewal failed or is overdue):
        // work done without the image held exclusively could never be committed anyway.
        let stop = self.opts.cancel.as_ref().map(|c| c.child_token()).unwrap_or_default();
        let lease_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let (lease, stop, lost) = (self.lease.clone(), stop.clone(), lease_lost.clone());
            tokio::spawn(async move {
                let Some(lease) = lease else { return };
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if !lease.is_healthy() {
                        lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        stop.cancel();
                        return;
                    }
                }
            })
        };
        let delta_sample: crate::backup::DeltaSample = Arc::new(std::sync::Mutex::new(crate::backup::DeltaSampleInner {
            cap: self.opts.verify_blocks,
            ..Default::default()
        }));
        let params = IngestParams {
            volume: self.volume.to_string(),
            block_size,
            parent: parent.clone(),
            follows: chain.head().map(|h| h.meta.backup_id.clone()),
            seq: Some(chain.backups.iter().filter_map(|b| b.meta.seq).max().unwrap_or(0) + 1),
            source: Source {
                kind: "rbd".into(),
                cluster_fsid: Some(fsid.clone()),
                pool: Some(spec.pool.clone()),
                image: Some(spec.image.clone()),
                image_id: Some(info.id.clone()),
                object_size: Some(info.object_size),
            },
            jobs: self.opts.jobs,
            labels: self.opts.labels.clone(),
            expect_to_snap: Some(snap.clone()),
            verify: Some(self.verifier(
                parent.map(|(_, m)| m),
                notes.base_snapshot.clone(),
                &snap,
                session.clone(),
                healed.clone(),
                delta_sample.clone(),
            )),
            session: session.clone(),
            cancel: Some(stop.clone()),
            deltas: self.opts.deltas,
            delta_sample: Some(delta_sample.clone()),
            block_extents,
        };
        // A cancelled backup (shutdown, lost lease) kills export-diff at once: a stalled one
        // would otherwise hold the parser in a read. The pid is only signalled while the child
        // is not yet reaped (the lock orders the kill before `wait`), so it cannot be reused.
        let unreaped = Arc::new(std::sync::Mutex::new(export.process_group()));
        let killer = {
            let (stop, unreaped) = (stop.clone(), unreaped.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                if let Some(group) = *unreaped.lock().unwrap_or_else(|p| p.into_inner()) {
                    // SAFETY: kill(2) on our own child's process group; the child has not been
                    // waited for, so the group ID is still its own.
                    unsafe {
                        libc::kill(-(group as i32), libc::SIGKILL);
                    }
                }
            })
        };
        let finish = {
            let unreaped = unreaped.clone();
            move |mut export: ExportDiff, complete: bool| -> Result<()> {
                if !complete {
                    export.kill();
                }
                unreaped.lock().unwrap_or_else(|p| p.into_inner()).take();
                export
                    .wait()
                    .map_err(|e| Error::new(ErrorKind::Source, format!("rbd export-diff failed: {e}"), None))
            }
        };
        let e = self.engine;
        let result = ingest(e.repo.clone(), e.index.clone(), e.observer.clone(), export, None, finish, params).await;
        watch.abort();
        killer.abort();
        let result = match result {
            Err(err) if lease_lost.load(std::sync::atomic::Ordering::Relaxed) && err.find::<crate::backup::Cancelled>().is_some() => {
                Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "the backup lease of {spec} was lost mid-backup ({}); uploads stopped, nothing committed",
                        self.lease
                            .as_ref()
                            .and_then(|l| l.failure())
                            .unwrap_or_else(|| "renewal overdue".into())
                    ),
                    None,
                ))
            }
            r => r,
        };
        let outcome = match result {
            Ok(v) => v,
            Err(err) if err.find::<crate::backup::CommitOutcomeUnknown>().is_some() => {
                // Maybe committed: the new snapshot may be the base of a committed backup.
                warn(
                    e.observer.as_ref(),
                    &format!("keeping snapshot {spec}@{snap}: the backup based on it may be committed"),
                );
                return Err(err);
            }
            Err(err) => {
                // Not committed: drop the new snapshot, keep the base for the next try.
                let (rbd, spec2, snap2) = (self.rbd.clone(), spec.clone(), snap.clone());
                let removed = blocking(move || Ok(rbd.snap_remove(&spec2.pool, &spec2.image, &snap2))).await?;
                if let Err(rm) = removed {
                    warn(
                        e.observer.as_ref(),
                        &format!("could not remove snapshot {spec}@{snap} of the failed backup: {rm}"),
                    );
                }
                return Err(err);
            }
        };
        // Committed. Now older snapshots of this repository and volume may go; the new one is
        // the next base. Never a user's snapshot, never a protected one, never another
        // repository's or volume's.
        let committed: BTreeSet<String> = chain
            .backups
            .iter()
            .filter(|b| {
                b.meta.source.image_id.as_deref() == Some(info.id.as_str()) && b.meta.source.cluster_fsid.as_deref() == Some(fsid.as_str())
            })
            .filter_map(|b| b.meta.to_snap.clone())
            .collect();
        let mut plan = plan_rotation(&snaps, &owner, &snap, &committed, self.opts.keep_snapshots);
        // Snapshots are removed only while the image is still ours: another backup of it may
        // have started once our lease lapsed, and its base must stay.
        if let Some(l) = self.lease.clone() {
            if !plan.remove.is_empty() && !blocking(move || Ok(l.renew_now())).await.unwrap_or(false) {
                warn(
                    e.observer.as_ref(),
                    &format!(
                        "the backup lease of {spec} was lost after the commit; older snapshots are left for the next backup: {}",
                        plan.remove.join(", ")
                    ),
                );
                plan.keep.append(&mut plan.remove);
            }
        }
        let (rbd, spec2) = (self.rbd.clone(), spec.clone());
        let to_remove = plan.remove.clone();
        let (removed, warnings) = blocking(move || {
            let mut removed = Vec::new();
            let mut warnings = Vec::new();
            for name in &to_remove {
                match rbd.snap_remove(&spec2.pool, &spec2.image, name) {
                    Ok(()) => removed.push(name.clone()),
                    Err(err) => warnings.push(format!("could not remove old snapshot {spec2}@{name}: {err}")),
                }
            }
            Ok((removed, warnings))
        })
        .await?;
        for p in &plan.protected {
            warn(e.observer.as_ref(), &format!("keeping protected snapshot {spec}@{p}"));
        }
        for w in &warnings {
            warn(e.observer.as_ref(), w);
        }
        notes.blocks_healed = healed.load(std::sync::atomic::Ordering::Relaxed);
        notes.kept_snapshots = std::iter::once(snap.clone()).chain(plan.keep).chain(plan.protected).collect();
        notes.removed_snapshots = removed;
        Ok(RbdBackupOutcome { outcome, notes })
    }

    /// The pre-commit check: the lease still held, and a sample of unchanged blocks re-read.
    #[allow(clippy::too_many_arguments)]
    fn verifier(
        &self,
        parent: Option<Arc<Manifest>>,
        base_snap: Option<String>,
        snap: &str,
        session: Arc<ferry_repo::Session>,
        healed: Arc<std::sync::atomic::AtomicU64>,
        delta_sample: crate::backup::DeltaSample,
    ) -> Verifier {
        let sample = parent.filter(|_| self.opts.verify_blocks > 0);
        let (cluster, spec, snap, repo, n, lease) = (
            self.cluster.clone(),
            self.image.clone(),
            snap.to_string(),
            self.engine.repo.clone(),
            self.opts.verify_blocks,
            self.lease.clone(),
        );
        Box::new(move |draft: &mut BackupDraft| {
            // Blocks the diff did not touch but whose chunk is quarantined: read them again.
            let n_healed = heal_quarantined(&cluster, &spec, &snap, draft, &session, &repo)?;
            healed.store(n_healed, std::sync::atomic::Ordering::Relaxed);
            if let Some(pm) = &sample {
                verify_unchanged(&cluster, &spec, &snap, pm, draft, n, &repo)?;
                if let Some(base) = &base_snap {
                    let picks = std::mem::take(
                        &mut delta_sample
                            .lock()
                            .map_err(|_| Error::failed("the delta sample's lock was poisoned"))?
                            .picks,
                    );
                    verify_deltas(&cluster, &spec, base, &snap, pm, draft, &picks, &repo)?;
                }
            }
            // Commit only while we still hold the image exclusively: ask the cluster now, the
            // last thing before the commit (a lock broken since the last periodic renewal is
            // found here), and give the manifest PUT only the lease time that is left.
            let Some(l) = &lease else { return Ok(None) };
            if !l.renew_now() {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "the backup lease of {spec} was lost ({}); not committing",
                        l.failure().unwrap_or_else(|| "renewal overdue".into())
                    ),
                    None,
                ));
            }
            let left = l.time_left();
            if left < COMMIT_MARGIN * 2 {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "the backup lease of {spec} has {:.1} s left, too little to commit in; not committing",
                        left.as_secs_f64()
                    ),
                    None,
                ));
            }
            Ok(Some(std::time::Instant::now() + (left - COMMIT_MARGIN)))
        })
    }
}

/// Re-reads from the new snapshot every block of the map whose chunk is quarantined (FORMAT.md
/// §13), uploads it again and puts its ID in the map: the chain heals without a full backup.
fn heal_quarantined(
    cluster: &Cluster,
    spec: &RbdImage,
    snap: &str,
    draft: &mut BackupDraft,
    session: &ferry_repo::Session,
    repo: &Arc<ferry_repo::Repository>,
) -> Result<u64> {
    let q = session.quarantined();
    // A block needs its whole delta chain: a quarantined base heals every block on it.
    let targets: Vec<usize> = (0..draft.blocks.len())
        .filter(|&i| {
            draft.blocks[i].is_some_and(|id| {
                crate::chunks::block_objects(&draft.deltas, &id)
                    .map(|objects| objects.iter().any(|o| q.contains(o)))
                    .unwrap_or(true)
            })
        })
        .collect();
    if targets.is_empty() {
        return Ok(0);
    }
    let bs = draft.block_size.get();
    let rt = tokio::runtime::Handle::current();
    let mut reader = cluster
        .open_snapshot(&spec.pool, &spec.image, snap)
        .with_context(|| format!("opening {spec}@{snap} to re-read blocks of quarantined chunks"))?;
    let mut buf = vec![0u8; bs as usize];
    for &i in &targets {
        let len = draft.image_size.saturating_sub(i as u64 * bs).min(bs) as usize;
        let n = reader.read(i as u64 * bs, &mut buf[..len])?;
        let data = &buf[..n];
        if ferry_repo::is_zero(data) {
            draft.blocks[i] = None;
            continue;
        }
        let id = repo.chunk_id(data);
        // Stored whole from now on: the content's delta (if any) is not needed by this map.
        draft.deltas.remove(&id);
        while let ferry_repo::Decision::Wait(gen) = session.decide(&id)? {
            rt.block_on(session.wait_over(gen))?;
        }
        let bytes = repo.encode_chunk(id, data)?;
        if q.contains(&id) {
            // Read, not HEAD: a corrupt copy must not pass for the chunk.
            rt.block_on(repo.restore_quarantined(&id, bytes))
                .with_context(|| format!("storing chunk {id} of block {i} again"))?;
        } else if !rt
            .block_on(repo.chunk_exists(&id))
            .with_context(|| format!("checking for chunk {id} (block {i})"))?
        {
            rt.block_on(repo.put_chunk(&id, bytes))
                .with_context(|| format!("uploading chunk {id} of block {i} again"))?;
        }
        draft.blocks[i] = Some(id);
    }
    Ok(targets.len() as u64)
}

/// Re-reads up to `count` blocks that the new map shares with its parent from the new
/// snapshot and checks they still hash to the parent's chunk IDs.
fn verify_unchanged(
    cluster: &Cluster,
    spec: &RbdImage,
    snap: &str,
    parent: &Manifest,
    new: &BackupDraft,
    count: usize,
    repo: &Arc<ferry_repo::Repository>,
) -> Result<()> {
    use rand::seq::IndexedRandom;
    let bs = new.block_size.get();
    let block_len = |size: u64, i: usize| size.saturating_sub(i as u64 * bs).min(bs);
    let candidates: Vec<usize> = (0..new.blocks.len().min(parent.blocks.len()))
        .filter(|&i| {
            new.blocks[i] == parent.blocks[i]
                && parent.meta.block_size == new.block_size
                && block_len(new.image_size, i) == parent.block_len(i as u64)
        })
        .collect();
    let sample: Vec<usize> = candidates.choose_multiple(&mut rand::rng(), count).copied().collect();
    if sample.is_empty() {
        return Ok(());
    }
    let mut reader = cluster
        .open_snapshot(&spec.pool, &spec.image, snap)
        .with_context(|| format!("opening {spec}@{snap} to verify the diff"))?;
    let mut buf = vec![0u8; bs as usize];
    let mut bad = Vec::new();
    for &i in &sample {
        let len = block_len(new.image_size, i) as usize;
        let n = reader.read(i as u64 * bs, &mut buf[..len])?;
        let data = &buf[..n];
        let actual = if ferry_repo::is_zero(data) {
            None
        } else {
            Some(repo.chunk_id(data))
        };
        if new.blocks[i] == actual {
            continue;
        }
        // The stored chunk may be shorter than the block (a block cut by a shrink keeps its
        // short chunk after a regrow; the rest reads as zeros): compare the content itself.
        if let Some(id) = &new.blocks[i] {
            let chunk = tokio::runtime::Handle::current()
                .block_on(crate::chunks::fetch_content(repo, &new.deltas, id))
                .map_err(|e| Error::from(*e.error))
                .with_context(|| format!("reading content {id} of block {i} to verify the diff"))?;
            if chunk.len() < data.len() && data[..chunk.len()] == chunk[..] && ferry_repo::is_zero(&data[chunk.len()..]) {
                continue;
            }
        }
        bad.push(i);
    }
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_unstable();
    let msg = format!(
        "diff verification failed: {} of {} sampled blocks that the export-diff of {spec}@{snap} called unchanged differ from the parent backup (blocks {bad:?})",
        bad.len(),
        sample.len()
    );
    Err(Error::new(
        ErrorKind::Source,
        msg.clone(),
        Some(Box::new(DiffVerificationFailed(msg))),
    ))
}

/// The changed extents per block (offsets within the block), merged where they touch; a block
/// with more than [`MAX_EXTENTS_PER_BLOCK`] is left out (stored whole: its extent table would
/// cost more than it saves).
fn extents_by_block(extents: &[ferry_ceph::DiffExtent], block_size: u64) -> BTreeMap<u64, Vec<(u32, u32)>> {
    let mut sorted: Vec<&ferry_ceph::DiffExtent> = extents.iter().collect();
    sorted.sort_by_key(|e| e.offset);
    let mut out: BTreeMap<u64, Vec<(u32, u32)>> = BTreeMap::new();
    for e in sorted {
        let (mut off, end) = (e.offset, e.offset.saturating_add(e.length));
        while off < end {
            let block = off / block_size;
            let start = off - block * block_size;
            let len = (block_size - start).min(end - off);
            let v = out.entry(block).or_default();
            match v.last_mut() {
                // Sorted by offset: a range that starts within or right after the last one
                // extends it.
                Some(last) if last.0 as u64 + last.1 as u64 >= start => {
                    let new_end = (start + len).max(last.0 as u64 + last.1 as u64);
                    last.1 = (new_end - last.0 as u64) as u32;
                }
                _ => v.push((start as u32, len as u32)),
            }
            off += len;
        }
    }
    out.retain(|_, v| v.len() <= MAX_EXTENTS_PER_BLOCK);
    out
}

/// Most extents a delta block may have (more: the block is stored whole).
const MAX_EXTENTS_PER_BLOCK: usize = 4096;

/// Checks a sample of the blocks this incremental stored as deltas: the base snapshot's block
/// with the delta's extents taken from the new snapshot must be the new snapshot's block —
/// else the exact export-diff missed a change inside the block, and the incremental is
/// refused (a full backup follows, as for `verify_unchanged`).
#[allow(clippy::too_many_arguments)]
fn verify_deltas(
    cluster: &Cluster,
    spec: &RbdImage,
    base_snap: &str,
    snap: &str,
    parent: &Manifest,
    new: &BackupDraft,
    picks: &[(u64, Vec<(u32, u32)>)],
    repo: &Arc<ferry_repo::Repository>,
) -> Result<()> {
    if picks.is_empty() {
        return Ok(());
    }
    let bs = new.block_size.get();
    let mut old_reader = cluster
        .open_snapshot(&spec.pool, &spec.image, base_snap)
        .with_context(|| format!("opening {spec}@{base_snap} to verify deltas"))?;
    let mut new_reader = cluster
        .open_snapshot(&spec.pool, &spec.image, snap)
        .with_context(|| format!("opening {spec}@{snap} to verify deltas"))?;
    let mut bad = Vec::new();
    for (i, extents) in picks {
        let i = *i;
        let new_len = new.image_size.saturating_sub(i * bs).min(bs) as usize;
        let old_len = parent.block_len(i) as usize;
        let mut old = vec![0u8; old_len];
        let n = old_reader.read(i * bs, &mut old)?;
        old.truncate(n);
        let mut now = vec![0u8; new_len];
        let n = new_reader.read(i * bs, &mut now)?;
        now.truncate(n);
        // The old block with the new bytes in the delta's extents, as a restore builds it.
        old.resize(now.len(), 0);
        for &(o, l) in extents {
            let (o, e) = (o as usize, (o + l) as usize);
            if e <= now.len() {
                old[o..e].copy_from_slice(&now[o..e]);
            }
        }
        let expected = new.blocks.get(i as usize).copied().flatten();
        if old != now || expected != Some(repo.chunk_id(&now)) {
            bad.push(i);
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let msg = format!(
        "diff verification failed: {} of {} sampled delta blocks of {spec}@{snap} changed outside the extents the export-diff from {base_snap} reported (blocks {bad:?})",
        bad.len(),
        picks.len()
    );
    Err(Error::new(
        ErrorKind::Source,
        msg.clone(),
        Some(Box::new(DiffVerificationFailed(msg))),
    ))
}

/// A restore into an RBD image through `rbd import-diff`: creates the image (object size =
/// block size where RBD allows it) unless it exists and `force` is given. The stream names
/// `snap_name` as its to-snapshot, so the image gets that snapshot (a base for replays).
/// Abandoning removes an image ferry created.
pub struct RbdTarget {
    rbd: RbdCli,
    image: RbdImage,
    force: bool,
    snap_name: Option<String>,
    created: bool,
    import: Option<ImportDiff>,
}

impl RestoreTarget for RbdTarget {
    fn describe(&self) -> String {
        format!("rbd:{}", self.image)
    }

    fn open(&mut self, manifest: &Manifest) -> Result<Layout> {
        let (pool, image) = (&self.image.pool, &self.image.image);
        let spec = &self.image;
        let exists = self.rbd.exists(pool, image).with_context(|| format!("looking up rbd:{spec}"))?;
        if exists && !self.force {
            return Err(Error::refused(format!("RBD image {spec} exists; use --force to overwrite it")));
        }
        if !exists {
            self.rbd
                .create(pool, image, manifest.meta.image_size, manifest.meta.block_size.as_rbd_object_size())
                .with_context(|| format!("creating RBD image {spec}"))?;
            self.created = true;
        }
        let import = self
            .rbd
            .import_diff(pool, image)
            .with_context(|| format!("starting rbd import-diff into {spec}"))?;
        self.import = Some(import);
        Ok(Layout::Ordered {
            format: StreamFormat::ImportDiff,
            snap_name: self.snap_name.clone().or_else(|| manifest.meta.to_snap.clone()),
        })
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match &mut self.import {
            Some(i) => i.write_all(buf),
            None => Err(std::io::Error::other("rbd import-diff is not running")),
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self.import.take() {
            Some(i) => i
                .finish()
                .map_err(|e| Error::new(ErrorKind::Source, format!("rbd import-diff into {} failed: {e}", self.image), None)),
            None => Err(Error::failed("rbd import-diff was never started")),
        }
    }

    fn abandon(&mut self) -> Option<String> {
        if let Some(mut i) = self.import.take() {
            i.kill();
        }
        if !self.created {
            return None;
        }
        // Never leave a half-written image that looks like a restore.
        match self.rbd.remove(&self.image.pool, &self.image.image) {
            Ok(()) => {
                self.created = false;
                Some(format!("the incomplete image {} was removed", self.image))
            }
            Err(e) => Some(format!("the incomplete image {} could not be removed: {e}", self.image)),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_dead_process_of_this_host_and_boot_loses_its_lease() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("reap");
        let me = |pid: u32| format!("ferry backup on {} pid {pid} boot {}#0123abcd", hostname(), boot_id());
        assert!(holder_is_dead_here(&me(dead)));
        assert!(!holder_is_dead_here(&me(std::process::id())), "this very process");
        assert!(!holder_is_dead_here(&me(1)), "a live process");
        assert!(!holder_is_dead_here(&format!(
            "ferry backup on elsewhere pid {dead} boot {}#00",
            boot_id()
        )));
        assert!(!holder_is_dead_here(&format!(
            "ferry backup on {} pid {dead} boot other#00",
            hostname()
        )));
        assert!(
            !holder_is_dead_here(&format!("ferry backup on {} pid {dead}#00", hostname())),
            "no boot: an older ferry"
        );
        assert!(!holder_is_dead_here("garbage"));
    }

    use super::*;
    use ferry_ceph::SnapInfo;

    const A: &str = "0123abcd-89abcdef";

    fn snaps(list: &[(&str, bool)]) -> Vec<SnapInfo> {
        list.iter()
            .enumerate()
            .map(|(i, (name, protected))| SnapInfo {
                id: 10 + i as u64,
                name: name.to_string(),
                size: 1 << 20,
                protected: *protected,
                timestamp: None,
            })
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_carry_repository_and_volume() {
        let owner = snap_owner("9809379e76ec114abf4b0b04b776b759", "rbd.vm-1");
        assert_eq!(&owner[..9], "9809379e-");
        assert_eq!(&owner[9..], &blake3::hash(b"rbd.vm-1").to_hex()[..8]);
        assert_ne!(owner, snap_owner("9809379e76ec114abf4b0b04b776b759", "rbd.vm-2"));
        let t = chrono::DateTime::parse_from_rfc3339("2026-03-04T05:06:07.089Z")
            .expect("time")
            .to_utc();
        let name = snap_name(&owner, t);
        assert_eq!(name, format!("ferry-{owner}-20260304T050607.089Z"));
        assert_eq!(name.len(), 44);
        assert_eq!(parse_snap_name(&name), Some(SnapName::Owned { owner: &owner }));
        // An odd repository ID still gives a parseable name.
        let odd = snap_owner("XYZ", "v");
        assert_eq!(parse_snap_name(&snap_name(&odd, t)), Some(SnapName::Owned { owner: &odd }));
    }

    #[test]
    fn parsing_accepts_only_ferry_forms() {
        assert_eq!(parse_snap_name("ferry-20260101T000000.000Z"), Some(SnapName::Legacy));
        assert_eq!(
            parse_snap_name("ferry-0123abcd-89abcdef-20260101T000000.000Z"),
            Some(SnapName::Owned { owner: A })
        );
        for user in [
            "ferry-keep",
            "ferry-",
            "user-20260101T000000.000Z",
            "ferry-20260101T000000.000",
            "ferry-20260101T000000Z",
            "ferry-2026010XT000000.000Z",
            "ferry-0123ABCD-89abcdef-20260101T000000.000Z",
            "ferry-0123abcd_89abcdef-20260101T000000.000Z",
            "ferry-0123abcd-89abcdef-20260101T000000.000Z-x",
            "ferry-0123abc-89abcdeff-20260101T000000.000Z",
            "ferry-0123abcd-89abcdef_20260101T000000.000Z",
        ] {
            assert_eq!(parse_snap_name(user), None, "{user}");
        }
    }

    #[test]
    fn rotation_removes_only_our_older_snapshots() {
        let old = "ferry-0123abcd-89abcdef-20260101T000000.000Z";
        let base = "ferry-0123abcd-89abcdef-20260102T000000.000Z";
        let other_repo = "ferry-ffff0000-89abcdef-20260102T000000.000Z";
        let other_volume = "ferry-0123abcd-00000000-20260102T000000.000Z";
        let new = "ferry-0123abcd-89abcdef-20260103T000000.000Z";
        let list = snaps(&[
            (old, false),
            ("user-keep", false),
            (other_repo, false),
            ("ferry-20251231T000000.000Z", false),
            ("ferry-by-hand", false),
            (base, false),
            (other_volume, false),
            (new, false),
        ]);
        let plan = plan_rotation(&list, A, new, &set(&[old, base]), 1);
        assert_eq!(plan.remove, vec![old.to_string(), base.to_string()]);
        assert!(plan.keep.is_empty() && plan.protected.is_empty());
        // keep 0 behaves as 1: the new snapshot always stays.
        assert_eq!(plan_rotation(&list, A, new, &set(&[old, base]), 0), plan);
        // keep 2: the newest committed older one stays too.
        let plan = plan_rotation(&list, A, new, &set(&[old, base]), 2);
        assert_eq!(plan.keep, vec![base.to_string()]);
        assert_eq!(plan.remove, vec![old.to_string()]);
    }

    #[test]
    fn rotation_keeps_the_newest_committed_and_protected_ones() {
        let n = |d: u32| format!("ferry-{A}-202601{d:02}T000000.000Z");
        let (s1, s2, s3, s4, s5, crashed) = (n(1), n(2), n(3), n(4), n(5), n(6));
        let list = snaps(&[
            (&s1, true),
            (&s2, false),
            (&s3, false),
            (&crashed, false),
            (&s4, false),
            (&s5, false),
        ]);
        // `crashed` never committed (a run killed before its commit): removed even though newer.
        let committed = set(&[&s1, &s2, &s3, &s4]);
        let plan = plan_rotation(&list, A, &s5, &committed, 3);
        assert_eq!(plan.keep, vec![s4.clone(), s3.clone()]);
        assert_eq!(plan.remove, vec![s2.clone(), crashed.clone()]);
        assert_eq!(plan.protected, vec![s1.clone()]);
        // Order is creation order (snapshot ID), not the name.
        let mut list = list;
        list.swap(1, 2);
        for (i, s) in list.iter_mut().enumerate() {
            s.id = 10 + i as u64;
        }
        let plan = plan_rotation(&list, A, &s5, &committed, 3);
        assert_eq!(plan.keep, vec![s4.clone(), s2.clone()]);
        assert_eq!(plan.remove, vec![s3.clone(), crashed.clone()]);
    }

    /// A chain made before names carried an owner continues from its `ferry-<time>` base;
    /// after the first new backup commits, that base (our chain's to-snapshot) goes, and no
    /// other legacy snapshot does.
    #[test]
    fn a_legacy_base_of_our_chain_goes_and_other_legacy_snapshots_stay() {
        let ours = "ferry-20260101T000000.000Z";
        let theirs = "ferry-20260101T000001.000Z";
        let new = format!("ferry-{A}-20260102T000000.000Z");
        let list = snaps(&[(ours, false), (theirs, false), (&new, false)]);
        let plan = plan_rotation(&list, A, &new, &set(&[ours]), 1);
        assert_eq!(plan.remove, vec![ours.to_string()]);
        // Kept while it is within --keep-snapshots, removed when it ages out.
        let plan = plan_rotation(&list, A, &new, &set(&[ours]), 2);
        assert_eq!(plan.keep, vec![ours.to_string()]);
        assert!(plan.remove.is_empty());
        // Not in our chain (e.g. another repository's base): never touched.
        let plan = plan_rotation(&list, A, &new, &BTreeSet::new(), 1);
        assert!(plan.remove.is_empty() && plan.keep.is_empty());
    }

    fn ext(offset: u64, length: u64) -> ferry_ceph::DiffExtent {
        ferry_ceph::DiffExtent {
            offset,
            length,
            exists: true,
        }
    }

    #[test]
    fn extents_split_at_blocks_merge_and_sort() {
        let m = extents_by_block(&[ext(5000, 100), ext(4090, 20), ext(100, 10), ext(8190, 4), ext(20_000, 1)], 4096);
        assert_eq!(m[&0], vec![(100, 10), (4090, 6)]);
        assert_eq!(m[&1], vec![(0, 14), (904, 100), (4094, 2)]);
        assert_eq!(m[&2], vec![(0, 2)]);
        assert_eq!(m[&4], vec![(3616, 1)]);
        // Overlapping and touching ranges become one.
        let m = extents_by_block(&[ext(10, 10), ext(15, 10), ext(25, 5)], 4096);
        assert_eq!(m[&0], vec![(10, 20)]);
    }
}
