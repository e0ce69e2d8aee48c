//! Letting backups go: protect, unprotect, forget, and prune by a retention policy.
//!
//! Deleting a backup deletes its manifest only. Every manifest is a complete block map, so no
//! other backup depends on it; its chunks stay in the bucket until a garbage collection finds
//! them referenced by no manifest. A protected backup (a marker in the bucket, so it survives
//! the loss of every local index) is never forgotten or pruned; the marker is checked again
//! right before each delete. The newest backup of a volume is never pruned: it is the base of
//! the next incremental.

use std::collections::BTreeMap;

use ferry_repo::retention::{self, Candidate, Decision, KeepPolicy, Reason};
use ferry_repo::{BackupRef, BackupSpec, BackupSummary};
use serde::Serialize;

use crate::error::{Error, Result, ResultExt};
use crate::observer::{Event, Operation};
use crate::Engine;

/// One backup in a forget or prune report.
#[derive(Debug, Clone, Serialize)]
pub struct BackupFate {
    /// The volume.
    pub volume: String,
    /// The backup ID.
    pub backup_id: String,
    /// When it was committed.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Its to-snapshot.
    pub to_snap: Option<String>,
    /// Whether it stays.
    pub keep: bool,
    /// Why it stays (empty when it goes).
    pub reasons: Vec<Reason>,
    /// Whether its manifest was deleted (false in a dry run).
    pub deleted: bool,
}

/// What `prune` decided and did, per volume.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// True when nothing was deleted on purpose.
    pub dry_run: bool,
    /// Per volume, every readable backup, oldest first.
    pub volumes: BTreeMap<String, Vec<BackupFate>>,
    /// Backups removed (or, in a dry run, that would be).
    pub removed: usize,
    /// Backups kept.
    pub kept: usize,
    /// Manifests that could not be read: never judged, never deleted.
    pub unreadable: Vec<String>,
}

fn fate(s: &BackupSummary, d: Option<&Decision>) -> BackupFate {
    BackupFate {
        volume: s.backup.volume.clone(),
        backup_id: s.meta.backup_id.clone(),
        created: s.meta.created,
        to_snap: s.meta.to_snap.clone(),
        keep: d.is_none_or(|d| d.keep),
        reasons: d.map(|d| d.reasons.clone()).unwrap_or_default(),
        deleted: false,
    }
}

impl Engine {
    /// Protects the backup `spec` names; returns it and whether it was newly protected.
    pub async fn protect(&self, volume: &str, spec: &BackupSpec, note: &str) -> Result<(BackupRef, bool)> {
        let (r, _) = self.resolve(volume, spec).await?;
        let created = self
            .repo
            .protect(&r, note)
            .await
            .with_context(|| format!("protecting backup {} of volume '{volume}'", r.backup_id()))?;
        Ok((r, created))
    }

    /// Removes the protection of the backup `spec` names; returns it and whether it was
    /// protected.
    pub async fn unprotect(&self, volume: &str, spec: &BackupSpec) -> Result<(BackupRef, bool)> {
        let (r, _) = self.resolve(volume, spec).await?;
        let was = self
            .repo
            .unprotect(&r)
            .await
            .with_context(|| format!("unprotecting backup {} of volume '{volume}'", r.backup_id()))?;
        Ok((r, was))
    }

    /// Forgets the backups `specs` name in `volume`. Every spec is resolved and checked first:
    /// if any is unknown or protected, nothing is deleted (refused).
    pub async fn forget(&self, volume: &str, specs: &[BackupSpec], dry_run: bool) -> Result<Vec<BackupFate>> {
        let chain = self.chain(volume).await?;
        let mut chosen: Vec<&BackupSummary> = Vec::new();
        for spec in specs {
            let b = chain.resolve(volume, spec)?;
            if chain.is_protected(&b.backup) {
                return Err(Error::from(ferry_repo::Error::Protected {
                    volume: volume.to_string(),
                    backup: b.meta.backup_id.clone(),
                })
                .context("nothing was forgotten"));
            }
            if !chosen.iter().any(|c| c.backup == b.backup) {
                chosen.push(b);
            }
        }
        let mut out = Vec::new();
        for b in chosen {
            let mut f = fate(b, None);
            f.keep = false;
            if !dry_run {
                self.repo
                    .forget(&b.backup)
                    .await
                    .with_context(|| format!("forgetting backup {} of volume '{volume}'", b.meta.backup_id))?;
                f.deleted = true;
            }
            out.push(f);
        }
        if !dry_run {
            self.refresh_index().await;
        }
        Ok(out)
    }

    /// Collects garbage: deletes every chunk no manifest references, safely beside running
    /// backups, prunes and other GCs (FORMAT.md §12). Progress: [`Operation::Gc`] in chunks
    /// deleted.
    pub async fn gc(&self, opts: &ferry_repo::GcOptions) -> Result<ferry_repo::GcReport> {
        let observer = self.observer.clone();
        let started = std::sync::atomic::AtomicBool::new(false);
        let progress = move |e: ferry_repo::GcEvent| match e {
            ferry_repo::GcEvent::Phase(p) => tracing::info!("garbage collection: {p}"),
            ferry_repo::GcEvent::Deleted { done, total } => {
                if !started.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    observer.event(Event::Started {
                        op: Operation::Gc,
                        total: Some(total),
                    });
                }
                observer.event(Event::Progress { op: Operation::Gc, done });
            }
        };
        let result = ferry_repo::collect_garbage(&self.repo, opts, &progress).await;
        self.observer.event(Event::Finished { op: Operation::Gc });
        match result {
            Ok(r) => Ok(r),
            Err(e) if e.is_integrity() => Err(Error::from(e)
                .context("garbage collection stopped before deleting anything: a manifest cannot be read, so its chunks are unknown")),
            Err(e) => Err(Error::from(e).context("garbage collection")),
        }
    }

    /// Applies `policy` to each of `volumes` (all when empty) and deletes what it does not
    /// keep (nothing with `dry_run`).
    pub async fn prune(&self, volumes: &[String], policy: &KeepPolicy, dry_run: bool) -> Result<PruneReport> {
        if policy.is_empty() {
            return Err(Error::refused(
                "no keep option given: prune would keep only the newest backup of each volume; give at least one",
            ));
        }
        for v in volumes {
            ferry_repo::validate_volume_name(v)?;
        }
        let report = self.index.sync(&self.repo).await.context("reading backups from the repository")?;
        let all = self.index.backups(None)?;
        let mut by_volume: BTreeMap<String, Vec<BackupSummary>> = BTreeMap::new();
        for b in all {
            if volumes.is_empty() || volumes.contains(&b.backup.volume) {
                by_volume.entry(b.backup.volume.clone()).or_default().push(b);
            }
        }
        for v in volumes {
            if !by_volume.contains_key(v) {
                return Err(Error::refused(format!("volume '{v}' has no backups in {}", self.repo.url())));
            }
        }
        let mut out = PruneReport {
            dry_run,
            ..Default::default()
        };
        for (r, e) in &report.unreadable {
            if volumes.is_empty() || volumes.contains(&r.volume) {
                out.unreadable.push(format!("{} {}: {e}", r.volume, r.backup_id()));
            }
        }
        for (volume, backups) in by_volume {
            let candidates: Vec<Candidate> = backups
                .iter()
                .enumerate()
                // The index lists each volume in chain order: newest by links, not clocks.
                .map(|(i, b)| Candidate {
                    id: b.meta.backup_id.clone(),
                    time: b.meta.created,
                    protected: report.protected.contains(&b.backup),
                    rank: Some(i as u64),
                })
                .collect();
            let decisions = retention::apply(policy, &candidates).map_err(|e| Error::refused(e.to_string()))?;
            let mut fates = Vec::new();
            for (b, d) in backups.iter().zip(&decisions) {
                let mut f = fate(b, Some(d));
                if f.keep {
                    out.kept += 1;
                } else {
                    out.removed += 1;
                    if !dry_run {
                        // The marker is checked again right before the delete (forget does).
                        match self.repo.forget(&b.backup).await {
                            Ok(()) => f.deleted = true,
                            Err(ferry_repo::Error::Protected { .. }) => {
                                f.keep = true;
                                f.reasons = vec![Reason::Protected];
                                out.removed -= 1;
                                out.kept += 1;
                            }
                            // Forgotten meanwhile by someone else: gone is what we wanted.
                            Err(ferry_repo::Error::NotFound { .. }) => {}
                            Err(e) => {
                                return Err(Error::from(e).context(format!(
                                    "pruning backup {} of volume '{volume}' ({} removed so far)",
                                    b.meta.backup_id,
                                    out.removed - 1
                                )))
                            }
                        }
                    }
                }
                fates.push(f);
            }
            out.volumes.insert(volume, fates);
        }
        if !dry_run {
            self.refresh_index().await;
        }
        Ok(out)
    }

    /// Brings the index in line after deletions (a failure only warns: it is a cache).
    async fn refresh_index(&self) {
        if let Err(e) = self.index.sync(&self.repo).await {
            crate::observer::warn(self.observer.as_ref(), &format!("the local index was not refreshed: {e}"));
        }
    }
}
