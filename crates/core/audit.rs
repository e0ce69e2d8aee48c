//! `ferry audit`: prove chains complete, manifests authentic, chunks present and intact.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use clap::Args;
use ferry_repo::{BackupRef, ChunkId, Manifest};
use futures::StreamExt;
use serde::Serialize;

use crate::common::{print_json, RepoArgs};
use crate::errors::{exit, IntegrityFailure};
use crate::restore::fetch_block;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Volumes to audit (default: all).
    volumes: Vec<String>,
    /// Also download, decrypt and re-hash chunks: all of them, or PERCENT of them (sampled).
    #[arg(long, num_args = 0..=1, default_missing_value = "100", value_name = "PERCENT")]
    read_data: Option<f64>,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    jobs: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize, Clone)]
pub struct Finding {
    pub kind: &'static str,
    pub volume: String,
    pub backup: Option<String>,
    pub detail: String,
}

#[derive(Debug, Serialize, Default)]
struct VolumeReport {
    backups: usize,
    full: usize,
    incremental: usize,
    newest: Option<String>,
}

#[derive(Debug, Serialize, Default)]
struct AuditReport {
    repository: String,
    volumes: BTreeMap<String, VolumeReport>,
    manifests_checked: usize,
    chunks_referenced: usize,
    chunks_present: usize,
    chunks_read: usize,
    findings: Vec<Finding>,
    ok: bool,
}

pub async fn audit(a: AuditArgs, r: RepoArgs) -> Result<u8> {
    let ctx = r.open().await?;
    let repo = ctx.repo.clone();
    let mut refs = repo.list_backups(None).await?;
    if !a.volumes.is_empty() {
        for v in &a.volumes {
            ferry_repo::validate_volume_name(v)?;
        }
        refs.retain(|b| a.volumes.contains(&b.volume));
    }
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
    .buffered(a.jobs.max(1));
    while let Some((b, m)) = reads.next().await {
        report.manifests_checked += 1;
        match m {
            Ok(m) => manifests.push((b, m)),
            // An unreachable store is not a finding about the data: stop with exit 1.
            Err(e)
                if !(e.is_integrity() || matches!(e, ferry_repo::Error::NotFound { .. } | ferry_repo::Error::UnsupportedFormat { .. })) =>
            {
                return Err(anyhow::Error::new(e).context(format!("audit could not read manifest {}", b.key())))
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
                Some(p) if p.meta.block_size != m.meta.block_size => report.findings.push(finding(format!("block size {} differs from parent's {}", m.meta.block_size, p.meta.block_size))),
                Some(_) => {}
            }
        }
    }
    // 3. Every referenced chunk exists (and, with --read-data, decodes to its ID).
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
    let percent = a.read_data.unwrap_or(0.0).clamp(0.0, 100.0);
    let read_key = blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let checks = chunk_refs.iter().map(|(id, (vol, backup, block))| {
        let repo = repo.clone();
        // Sample by a per-run keyed hash of the ID: uniform, and different each run.
        let sample = percent >= 100.0
            || (percent > 0.0
                && (u64::from_le_bytes(
                    blake3::keyed_hash(read_key.as_bytes(), &id.0).as_bytes()[..8]
                        .try_into()
                        .unwrap_or([0; 8]),
                ) % 10_000)
                    < (percent * 100.0) as u64);
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
    let mut results = futures::stream::iter(checks).buffer_unordered(a.jobs.max(1));
    while let Some((id, vol, backup, block, res)) = results.next().await {
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
            Err(e) => return Err(anyhow::Error::new(e).context("audit could not check the repository")),
        }
    }
    report.ok = report.findings.is_empty();
    if a.json {
        print_json(&report)?;
    } else {
        println!("{:<24} {:>8} {:>6} {:>12}  NEWEST", "VOLUME", "BACKUPS", "FULL", "INCREMENTAL");
        for (v, s) in &report.volumes {
            println!(
                "{:<24} {:>8} {:>6} {:>12}  {}",
                v,
                s.backups,
                s.full,
                s.incremental,
                s.newest.as_deref().unwrap_or("-")
            );
        }
        println!(
            "{} manifests checked, {} chunks referenced, {} present, {} read and verified",
            report.manifests_checked, report.chunks_referenced, report.chunks_present, report.chunks_read
        );
        for f in &report.findings {
            println!(
                "FINDING [{}] {} {}: {}",
                f.kind,
                f.volume,
                f.backup.as_deref().unwrap_or("-"),
                f.detail
            );
        }
        if report.ok {
            println!("audit passed: chains complete, manifests authentic, all chunks present");
        }
    }
    if !report.ok {
        bail!(IntegrityFailure(format!("audit found {} problem(s)", report.findings.len())));
    }
    Ok(exit::OK)
}
