//! Audit: prove chains complete, manifests authentic, chunks present (and, sampled, intact).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ferry_repo::{BackupRef, ChunkId, Manifest, Repository};
use futures::StreamExt;
use serde::Serialize;

use crate::chunks::fetch_block;
use crate::error::{Error, Result};
use crate::observer::{Event, Observer, Operation};

/// What to audit.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Volumes to audit (empty: all).
    pub volumes: Vec<String>,
    /// Percentage of chunks to download and verify (0: only check they exist).
    pub read_data_percent: f64,
    /// Requests in flight.
    pub jobs: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            volumes: Vec::new(),
            read_data_percent: 0.0,
            jobs: 16,
        }
    }
}

/// One problem found.
#[derive(Debug, Serialize, Clone)]
pub struct Finding {
    /// `manifest`, `chain`, `missing-chunk` or `corrupt-chunk`.
    pub kind: &'static str,
    /// The volume.
    pub volume: String,
    /// The backup, if the finding concerns one.
    pub backup: Option<String>,
    /// What is wrong.
    pub detail: String,
}

/// Per-volume counts.
#[derive(Debug, Serialize, Default, Clone)]
pub struct VolumeReport {
    /// Readable backups.
    pub backups: usize,
    /// Full backups.
    pub full: usize,
    /// Incremental backups.
    pub incremental: usize,
    /// The newest backup's ID.
    pub newest: Option<String>,
}

/// The audit's result; `ok` is true when there are no findings.
#[derive(Debug, Serialize, Default, Clone)]
pub struct AuditReport {
    /// The repository URL.
    pub repository: String,
    /// Per-volume counts.
    pub volumes: BTreeMap<String, VolumeReport>,
    /// Manifests read.
    pub manifests_checked: usize,
    /// Distinct chunks referenced by the manifests.
    pub chunks_referenced: usize,
    /// Chunks found present.
    pub chunks_present: usize,
    /// Chunks downloaded and verified.
    pub chunks_read: usize,
    /// The problems found.
    pub findings: Vec<Finding>,
    /// No findings.
    pub ok: bool,
}

/// Runs the audit. Findings are data (the report); an unreachable store is an error.
pub(crate) async fn audit(repo: Arc<Repository>, observer: Arc<dyn Observer>, opts: &AuditOptions) -> Result<AuditReport> {
    observer.event(Event::Started {
        op: Operation::Audit,
        total: None,
    });
    let r = run(repo, observer.as_ref(), opts).await;
    observer.event(Event::Finished { op: Operation::Audit });
    r
}

async fn run(repo: Arc<Repository>, observer: &dyn Observer, opts: &AuditOptions) -> Result<AuditReport> {
    let mut refs = repo.list_backups(None).await?;
    if !opts.volumes.is_empty() {
        for v in &opts.volumes {
            ferry_repo::validate_volume_name(v)?;
        }
        refs.retain(|b| opts.volumes.contains(&b.volume));
    }
    let jobs = opts.jobs.max(1);
    let mut report = AuditReport {
        repository: repo.url().to_string(),
        ..Default::default()
    };
    // 1. Every manifest must decrypt, authenticate and decode.
    let mut manifests: Vec<(BackupRef, Manifest)> = Vec::new();
    let mut reads = futures::stream::iter(refs.into_iter().map(|b| {
        let repo = repo.clone();
        async move {
            let m = repo.read_manifest(&b).await;
            (b, m)
        }
    }))
    .buffered(jobs);
    while let Some((b, m)) = reads.next().await {
        report.manifests_checked += 1;
        match m {
            Ok(m) => manifests.push((b, m)),
            // An unreachable store is not a finding about the data: stop.
            Err(e)
                if !(e.is_integrity() || matches!(e, ferry_repo::Error::NotFound { .. } | ferry_repo::Error::UnsupportedFormat { .. })) =>
            {
                return Err(Error::from(e).context(format!("audit could not read manifest {}", b.key())))
            }
            Err(e) => report.findings.push(Finding {
                kind: "manifest",
                volume: b.volume.clone(),
                backup: Some(b.backup_id().to_string()),
                detail: e.to_string(),
            }),
        }
    }
    // 2. Chains: every incremental's parent exists and its to-snapshot is our from-snapshot.
    let by_id: HashMap<(String, String), &Manifest> = manifests
        .iter()
        .map(|(b, m)| ((b.volume.clone(), m.meta.backup_id.clone()), m))
        .collect();
    for (b, m) in &manifests {
        let v = report.volumes.entry(b.volume.clone()).or_default();
        v.backups += 1;
        if m.meta.from_snap.is_some() {
            v.incremental += 1;
        } else {
            v.full += 1;
        }
        v.newest = Some(m.meta.backup_id.clone());
        if let Some(from) = &m.meta.from_snap {
            let finding = |detail: String| Finding {
                kind: "chain",
                volume: b.volume.clone(),
                backup: Some(m.meta.backup_id.clone()),
                detail,
            };
            match m.meta.parent.as_ref().and_then(|p| by_id.get(&(b.volume.clone(), p.clone()))) {
                None => report.findings.push(finding(format!(
                    "incremental from '{from}' but its parent backup {} is not in the repository (its blocks are complete in this manifest, the chain link is broken)",
                    m.meta.parent.as_deref().unwrap_or("(none recorded)")
                ))),
                Some(p) if p.meta.to_snap.as_deref() != Some(from.as_str()) => report.findings.push(finding(format!(
                    "from-snapshot '{from}' differs from parent {}'s to-snapshot {:?}",
                    p.meta.backup_id, p.meta.to_snap
                ))),
                Some(p) if p.meta.block_size != m.meta.block_size => report.findings.push(finding(format!(
                    "block size {} differs from parent's {}",
                    m.meta.block_size.get(),
                    p.meta.block_size.get()
                ))),
                Some(_) => {}
            }
        }
    }
    // 3. Every referenced chunk exists (and, sampled, decodes to its ID).
    let mut chunk_refs: HashMap<ChunkId, (String, String, u64)> = HashMap::new();
    for (b, m) in &manifests {
        for (i, id) in m.blocks.iter().enumerate() {
            if let Some(id) = id {
                chunk_refs
                    .entry(*id)
                    .or_insert_with(|| (b.volume.clone(), m.meta.backup_id.clone(), i as u64));
            }
        }
    }
    report.chunks_referenced = chunk_refs.len();
    let percent = opts.read_data_percent.clamp(0.0, 100.0);
    let read_key = blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let checks = chunk_refs.iter().map(|(id, (vol, backup, block))| {
        let repo = repo.clone();
        // Sample by a per-run keyed hash of the ID: uniform, and different each run.
        let h = blake3::keyed_hash(read_key.as_bytes(), &id.0);
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.as_bytes()[..8]);
        let sample = percent >= 100.0 || (percent > 0.0 && (u64::from_le_bytes(first) % 10_000) < (percent * 100.0) as u64);
        async move {
            let res = if sample {
                fetch_block(&repo, id).await.map(|_| true)
            } else {
                repo.chunk_exists(id).await.and_then(|e| {
                    if e {
                        Ok(false)
                    } else {
                        Err(ferry_repo::Error::NotFound { path: id.object_key() })
                    }
                })
            };
            (id, vol, backup, *block, res)
        }
    });
    let mut results = futures::stream::iter(checks).buffer_unordered(jobs);
    let mut done = 0u64;
    while let Some((id, vol, backup, block, res)) = results.next().await {
        done += 1;
        observer.event(Event::Progress {
            op: Operation::Audit,
            done,
        });
        match res {
            Ok(read) => {
                report.chunks_present += 1;
                if read {
                    report.chunks_read += 1;
                }
            }
            Err(ferry_repo::Error::NotFound { .. }) => report.findings.push(Finding {
                kind: "missing-chunk",
                volume: vol.clone(),
                backup: Some(backup.clone()),
                detail: format!("chunk {id} (first referenced by block {block}) is missing"),
            }),
            Err(e) if e.is_integrity() => report.findings.push(Finding {
                kind: "corrupt-chunk",
                volume: vol.clone(),
                backup: Some(backup.clone()),
                detail: format!("chunk {id} (first referenced by block {block}): {e}"),
            }),
            Err(e) => return Err(Error::from(e).context("audit could not check the repository")),
        }
    }
    report.ok = report.findings.is_empty();
    Ok(report)
}
