//! ferry's pipelines as a library: backup of export-diff streams and RBD images, restore into
//! files, block devices, streams and RBD images, and audit — with no argument parsing, no
//! printing and no exit codes. The `ferry` binary and the daemon are thin callers.
//!
//! ```no_run
//! # async fn demo(repo: ferry_repo::Repository, index: ferry_repo::Index) -> ferry_engine::Result<()> {
//! use ferry_engine::{Engine, FileTarget, RestoreOptions, StreamBackupOptions};
//! let engine = Engine::new(repo, index);
//! let stream = std::fs::File::open("full.diff").map_err(|e| ferry_engine::Error::failed(e.to_string()))?;
//! let b = engine.backup_stream(stream, StreamBackupOptions::new("vm-1")).await?;
//! let (_, manifest) = engine.resolve("vm-1", &ferry_repo::BackupSpec::Latest).await?;
//! engine.restore(manifest, Box::new(FileTarget::new("/tmp/vm-1.raw", false)), &RestoreOptions::default()).await?;
//! # let _ = b; Ok(()) }
//! ```
//!
//! Errors say what a caller must know ([`ErrorKind`]); progress and results go to an
//! [`Observer`]. CPU work runs on the blocking pool under one permit per core; every Ceph
//! call and every blocking write runs on the blocking pool, never on an async worker.

#![deny(missing_docs)]

mod audit;
mod backup;
mod chunks;
mod compare;
mod cpu;
pub mod error;
mod lifecycle;
pub mod observer;
mod rbd;
mod replay;
mod restore;
mod serve;
mod sync;
mod target;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use ferry_repo::{BackupRef, BackupSpec, BlockSize, Chain, Index, Manifest, Repository, Session, SessionOptions, Source};

pub use audit::{AuditOptions, AuditReport, Finding, VolumeReport};
pub use backup::{BackupOutcome, Cancelled, CommitOutcomeUnknown};
pub use compare::{CompareOptions, SourceComparison, MAX_BLOCK_FINDINGS};
pub use error::{Error, ErrorKind, Result, ResultExt};
pub use lifecycle::{BackupFate, PruneReport};
pub use observer::{Event, NoObserver, Observer, Operation, Recorder};
pub use rbd::{
    BackupRunning, Ceph, RbdBackupNotes, RbdBackupOptions, RbdBackupOutcome, RbdImage, RbdTarget, SnapshotHooks, UpToDate, SNAP_PREFIX,
};
pub use replay::{standby_snapshot, ReplayOptions, ReplayReport, META_BACKUP, META_PENDING, META_VOLUME};
pub use restore::{BlockFailure, Layout, RestoreIncomplete, RestoreOptions, RestoreReport, RestoreTarget, StreamFormat};
pub use serve::{new_token, serve_http, serve_nbd, serve_nbd_unix, BackupImage, InstantOptions, InstantReport, InstantRestore, ServeStats};
pub use sync::{SyncOptions, SyncOutcome, SyncSkip};
pub use target::{partial_path, FileTarget, StreamTarget};
pub use tokio_util::sync::CancellationToken;

/// Default number of blocks in flight: two per core plus one, 4 to 16 — one per core being
/// encoded, about as many uploading, one waiting; each holds a block and its encoded copy, so
/// more only costs memory once the cores are busy (peak RSS is held under 128 MiB).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2 + 1)
        .unwrap_or(5)
        .clamp(4, 16)
}

/// Default number of chunk downloads a restore keeps in flight: four per core, 8 to 16. A
/// download holds only the stored bytes (about half a block on typical data); blocks are
/// opened one per core, so these hide the store's latency, not add CPU work.
pub fn default_downloads() -> usize {
    std::thread::available_parallelism().map(|n| n.get() * 4).unwrap_or(8).clamp(8, 16)
}

/// An opened repository, its local index, and who is watching.
#[derive(Clone)]
pub struct Engine {
    repo: Arc<Repository>,
    index: Arc<Index>,
    observer: Arc<dyn Observer>,
    session: SessionOptions,
}

/// How a backup of an export-diff stream runs.
#[derive(Debug, Clone)]
pub struct StreamBackupOptions {
    /// The volume the backup belongs to.
    pub volume: String,
    /// Build on this backup instead of the volume's newest one.
    pub parent: Option<BackupSpec>,
    /// Block size of a new volume (default: the repository's); a chain keeps its own.
    pub block_size: Option<BlockSize>,
    /// Labels recorded in the manifest.
    pub labels: BTreeMap<String, String>,
    /// Blocks in flight.
    pub jobs: usize,
    /// The stream's length, if known (for progress).
    pub total: Option<u64>,
    /// Store partly changed blocks as deltas (FORMAT.md §14); false: always whole.
    pub deltas: bool,
}

impl StreamBackupOptions {
    /// Defaults for `volume`.
    pub fn new(volume: impl Into<String>) -> StreamBackupOptions {
        StreamBackupOptions {
            volume: volume.into(),
            parent: None,
            block_size: None,
            labels: BTreeMap::new(),
            jobs: default_jobs(),
            total: None,
            deltas: true,
        }
    }
}

impl Engine {
    /// An engine over an opened repository and its index, observed by nobody.
    pub fn new(repo: Repository, index: Index) -> Engine {
        // The index's entries hold manifest metadata: sealed like the bucket's copy.
        index.set_key(repo.index_key());
        Engine {
            repo: Arc::new(repo),
            index: Arc::new(index),
            observer: Arc::new(NoObserver),
            session: SessionOptions::default(),
        }
    }

    /// The same engine with backups watching for garbage collection as `opts` says.
    pub fn with_session_options(mut self, opts: SessionOptions) -> Engine {
        self.session = opts;
        self
    }

    /// Begins a backup session (FORMAT.md §12) and brings the index's GC generation up to
    /// what the session observed, so chunk entries from before a GC are checked again.
    pub(crate) async fn begin_session(&self, volume: &str) -> Result<Arc<Session>> {
        let session = Session::begin(&self.repo, volume, self.session)
            .await
            .context("beginning a backup session")?;
        self.index
            .advance_gc_gen(session.observed_gen())
            .context("updating the local index's GC generation")?;
        Ok(Arc::new(session))
    }

    /// The same engine reporting to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Engine {
        self.observer = observer;
        self
    }

    /// The repository.
    pub fn repository(&self) -> &Arc<Repository> {
        &self.repo
    }

    /// The local index (a cache of the bucket).
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// One volume's backups, oldest first, after syncing the index with the bucket. Damaged
    /// manifests are left out and reported to the observer as warnings.
    pub async fn chain(&self, volume: &str) -> Result<Chain> {
        let chain = self
            .index
            .chain(&self.repo, volume)
            .await
            .context("reading backups from the repository")?;
        for (r, e) in &chain.unreadable {
            observer::warn(
                self.observer.as_ref(),
                &format!("backup {} of volume '{volume}' is unreadable and left out: {e}", r.backup_id()),
            );
        }
        Ok(chain)
    }

    /// The backup `spec` names in `volume`, with its manifest.
    ///
    /// Damage never turns into a different answer: when the backup cannot be found and some of
    /// the volume's manifests are unreadable, or `latest` would skip a newer unreadable one,
    /// this fails with [`ErrorKind::Integrity`] instead of resolving to another backup.
    pub async fn resolve(&self, volume: &str, spec: &BackupSpec) -> Result<(BackupRef, Arc<Manifest>)> {
        let chain = self.chain(volume).await?;
        let damaged = |what: String| {
            let list: Vec<String> = chain.unreadable.iter().map(|(r, e)| format!("  {}: {e}", r.backup_id())).collect();
            Error::integrity(format!("{what}; unreadable manifests of volume '{volume}':\n{}", list.join("\n")))
        };
        let found = match chain.resolve(volume, spec) {
            Ok(found) => found,
            Err(ferry_repo::Error::NoBackups { .. } | ferry_repo::Error::NoSuchBackup { .. }) if !chain.unreadable.is_empty() => {
                return Err(damaged(format!("volume '{volume}' has no readable backup '{spec}'")));
            }
            Err(ferry_repo::Error::NoBackups { .. }) => {
                return Err(Error::refused(format!("volume '{volume}' has no backups in {}", self.repo.url())));
            }
            Err(e) => return Err(e.into()),
        };
        if *spec == BackupSpec::Latest && chain.unreadable.iter().any(|(r, _)| r.name > found.backup.name) {
            return Err(damaged(format!(
                "the newest backup of volume '{volume}' is unreadable, so 'latest' cannot be {}; name the backup to use",
                found.meta.backup_id
            )));
        }
        let m = self.repo.read_manifest(&found.backup).await?;
        Ok((found.backup.clone(), Arc::new(m)))
    }

    /// Backs up one export-diff stream (full, or incremental on the volume's newest backup or
    /// `opts.parent`) and commits it. The stream is read on a blocking thread.
    pub async fn backup_stream<R: Read + Send + 'static>(&self, stream: R, opts: StreamBackupOptions) -> Result<BackupOutcome> {
        let volume = opts.volume.clone();
        let result = async {
            ferry_repo::validate_volume_name(&volume)?;
            // The session first: every piece of evidence (parent, index, HEAD) comes after it.
            let session = self.begin_session(&volume).await?;
            // One index sync either way: `resolve` syncs for a named parent.
            let parent = async {
                Ok::<_, Error>(match &opts.parent {
                    Some(spec) => Some(self.resolve(&volume, spec).await?),
                    None => match self.chain(&volume).await?.head() {
                        Some(s) => Some((s.backup.clone(), Arc::new(self.repo.read_manifest(&s.backup).await?))),
                        None => None,
                    },
                })
            }
            .await;
            let parent = match parent {
                Ok(p) => p,
                Err(e) => {
                    // Fence our own name at once: no GC need wait for this session.
                    session.abort().await;
                    return Err(e);
                }
            };
            // The chain as the index has it now (synced just above): the head a full backup
            // follows, and the place of this one.
            let (follows, seq) = match self.index.backups(Some(&volume)) {
                Ok(known) => (
                    known.last().map(|h| h.meta.backup_id.clone()),
                    known.iter().filter_map(|b| b.meta.seq).max().unwrap_or(0) + 1,
                ),
                Err(e) => {
                    session.abort().await;
                    return Err(e.into());
                }
            };
            let params = backup::IngestParams {
                volume: volume.clone(),
                block_size: opts.block_size.unwrap_or(self.repo.config().block_size),
                follows,
                seq: Some(seq),
                parent,
                source: Source {
                    kind: "diff-stream".into(),
                    ..Default::default()
                },
                jobs: opts.jobs,
                labels: opts.labels.clone(),
                expect_to_snap: None,
                verify: None,
                session: session.clone(),
                cancel: None,
                deltas: opts.deltas,
                delta_sample: None,
                block_extents: None,
            };
            backup::ingest(
                self.repo.clone(),
                self.index.clone(),
                self.observer.clone(),
                stream,
                opts.total,
                |_, _| Ok(()),
                params,
            )
            .await
        }
        .await;
        result.map_err(|e| backup::failed_backup(e, &format!("backup of volume '{volume}'")))
    }

    /// Restores `manifest` into `target`. A restore that could not write every block fails
    /// (integrity, or transient when only the store was unavailable) and carries its report
    /// as a [`RestoreIncomplete`] cause; without `best_effort` the target is abandoned.
    pub async fn restore(&self, manifest: Arc<Manifest>, target: Box<dyn RestoreTarget>, opts: &RestoreOptions) -> Result<RestoreReport> {
        restore::restore(self.repo.clone(), self.observer.clone(), manifest, target, opts).await
    }

    /// Audits the repository (see [`AuditOptions`]); findings are in the report.
    pub async fn audit(&self, opts: &AuditOptions) -> Result<AuditReport> {
        audit::audit(self.repo.clone(), self.observer.clone(), opts).await
    }

    /// Copies every backup (of `opts.volumes`, or all) that `dst` lacks, with the objects it
    /// needs, as ciphertext (see [`SyncOptions`]). `dst` must be this repository already:
    /// [`Repository::copy_identity`] makes an empty location one, then open it.
    pub async fn sync_to(&self, dst: Arc<Repository>, opts: &SyncOptions) -> Result<SyncOutcome> {
        sync::sync(self.repo.clone(), dst, self.observer.clone(), self.session, opts).await
    }

    /// Brings the standby RBD image `image` to a backup of `volume` (the newest by default)
    /// by `rbd import-diff` of what differs (see [`ReplayOptions`]; the first replay restores
    /// in full). Refuses an image written since its last replay unless `opts.force`.
    pub async fn replay(&self, ceph: &Ceph, volume: &str, image: &RbdImage, opts: &ReplayOptions) -> Result<ReplayReport> {
        replay::replay(self, ceph, volume, image, opts).await
    }

    /// Instant restore: serves `manifest` as a raw image over HTTP and makes `image` an
    /// import-only live migration from it (`rbd migration prepare`), so the image is usable
    /// at once; [`InstantRestore::complete`] copies the rest and commits. The server lives in
    /// this process: keep it running until `complete` returns.
    pub async fn instant_restore(
        &self,
        ceph: &Ceph,
        manifest: Arc<Manifest>,
        image: &RbdImage,
        opts: &InstantOptions,
    ) -> Result<InstantRestore> {
        serve::instant(self.repo.clone(), ceph, manifest, image, opts).await
    }

    /// Compares backups with their source snapshots where those still exist on the cluster
    /// (see [`CompareOptions`]): reads the snapshots through librbd and checks every sampled
    /// block's content ID against the manifest. Differences are findings in the result.
    pub async fn compare_source(&self, ceph: &Ceph, opts: &CompareOptions) -> Result<SourceComparison> {
        compare::compare(self.repo.clone(), self.observer.clone(), ceph, opts).await
    }
}
