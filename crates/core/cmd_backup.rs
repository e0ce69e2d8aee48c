//! `ferry backup`: an RBD image (snapshot, export-diff, commit, rotate) or an export-diff
//! stream from a file or stdin.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_engine::{BackupOutcome, RbdBackupOptions, RbdImage, StreamBackupOptions};
use ferry_repo::{BackupSpec, BlockSize, Manifest};
use serde::Serialize;

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::{human_bytes, parse_size, print_json, requests_line, Progress};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// rbd:POOL/IMAGE: snapshot the image (ferry-<repo>-<volume>-<UTC time>), stream
    /// `rbd export-diff --whole-object` from the last backup's snapshot, commit, then remove
    /// older ferry snapshots of this repository and volume (see --keep-snapshots).
    source: Option<String>,
    /// Volume name the backup belongs to (letters, digits, '.', '_', '-'); for rbd:POOL/IMAGE
    /// the default is POOL.IMAGE.
    #[arg(long)]
    volume: Option<String>,
    /// Back up an export-diff stream instead: a file, or '-' for stdin
    /// (e.g. `rbd export-diff ... - | ferry backup --volume V --diff -`).
    #[arg(long, conflicts_with = "source")]
    diff: Option<PathBuf>,
    /// rbd source: make a full backup even if the base snapshot exists.
    #[arg(long)]
    full: bool,
    /// rbd source: lease duration of the per-image lock (renewed while the backup runs).
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    lease_seconds: u64,
    /// rbd source: after an incremental, re-read this many blocks the diff called unchanged
    /// from the new snapshot and check them against the parent backup; on a mismatch the
    /// incremental is discarded and a full backup taken (0 disables).
    #[arg(long, default_value_t = 8, value_name = "BLOCKS")]
    verify_blocks: usize,
    /// rbd source: ferry snapshots of this repository and volume to keep on the image after
    /// the commit, the new one included (older ones are for fast local rollback). Other
    /// repositories', other volumes', users' and protected snapshots are never removed.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "diff")]
    keep_snapshots: u32,
    /// Store every changed block whole, never as a delta of its changed bytes (FORMAT.md §14):
    /// uploads whole blocks (unchanged blocks a chain already stores as deltas stay so).
    #[arg(long)]
    no_deltas: bool,
    /// --diff streams: build on this backup (ID, id:PREFIX, snap:NAME) instead of the
    /// volume's newest one.
    #[arg(long, conflicts_with = "source")]
    parent: Option<String>,
    /// --diff streams: block size of a new volume (default: the repository's); a chain keeps
    /// its block size. RBD backups use the image's object size.
    #[arg(long, value_parser = parse_size, conflicts_with = "source")]
    block_size: Option<u64>,
    /// Labels to record in the manifest, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Blocks in flight (hashing, compressing, uploading).
    #[arg(long, default_value_t = ferry_engine::default_jobs())]
    jobs: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

#[derive(Serialize)]
struct BackupOutput<'a> {
    volume: &'a str,
    backup_id: &'a str,
    object: String,
    kind: &'a str,
    from_snap: &'a Option<String>,
    to_snap: &'a Option<String>,
    parent: &'a Option<String>,
    image_size: u64,
    block_size: u64,
    stats: &'a ferry_repo::BackupStats,
    throughput_mib_s: f64,
    requests: ferry_repo::RequestStats,
    /// ferry's own peak resident memory (not the export's), when known.
    peak_rss_bytes: Option<u64>,
}

fn kind(m: &Manifest) -> &'static str {
    if m.meta.from_snap.is_some() {
        "incremental"
    } else {
        "full"
    }
}

fn mib_s(m: &Manifest) -> (f64, f64) {
    let s = &m.meta.stats;
    let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
    (secs, s.stream_bytes as f64 / (1 << 20) as f64 / secs)
}

fn backup_output(o: &BackupOutcome, requests: ferry_repo::RequestStats) -> BackupOutput<'_> {
    let m = &o.manifest;
    let (_, mib_s) = mib_s(m);
    BackupOutput {
        volume: &m.meta.volume,
        backup_id: &m.meta.backup_id,
        object: o.backup.key(),
        kind: kind(m),
        from_snap: &m.meta.from_snap,
        to_snap: &m.meta.to_snap,
        parent: &m.meta.parent,
        image_size: m.meta.image_size,
        block_size: m.meta.block_size.get(),
        stats: &m.meta.stats,
        throughput_mib_s: (mib_s * 10.0).round() / 10.0,
        requests,
        peak_rss_bytes: crate::output::peak_rss_bytes(),
    }
}

fn print_summary(o: &BackupOutcome, requests: &ferry_repo::RequestStats) {
    let m = &o.manifest;
    let s = &m.meta.stats;
    let (secs, mib_s) = mib_s(m);
    println!(
        "backup {} of volume '{}' committed ({}: {} -> {})",
        m.meta.backup_id,
        m.meta.volume,
        kind(m),
        m.meta.from_snap.as_deref().unwrap_or("(start)"),
        m.meta.to_snap.as_deref().unwrap_or("(head)")
    );
    println!(
        "  image     {} in {} blocks of {}",
        human_bytes(m.meta.image_size),
        m.blocks.len(),
        human_bytes(m.meta.block_size.get())
    );
    println!(
        "  read      {} of diff stream ({} data, {} zeroed)",
        human_bytes(s.stream_bytes),
        human_bytes(s.data_bytes),
        human_bytes(s.zeroed_bytes)
    );
    println!(
        "  blocks    {} changed: {} new ({} as deltas of {} changed bytes), {} deduplicated ({} found in repository), {} zero",
        s.blocks_changed,
        s.blocks_new,
        s.blocks_delta,
        human_bytes(s.bytes_delta),
        s.blocks_dedup,
        s.blocks_found_in_repo,
        s.blocks_zero
    );
    if s.blocks_partial > 0 {
        println!(
            "  partial   {} blocks changed in part, completed by reading {} more",
            s.blocks_partial,
            human_bytes(s.bytes_read_blocks)
        );
    }
    println!(
        "  stored    {} uploaded for {} of new data",
        human_bytes(s.bytes_uploaded),
        human_bytes(s.bytes_new)
    );
    println!("  time      {secs:.2} s, {mib_s:.1} MiB/s");
    println!("  requests  {}", requests_line(requests));
}

pub async fn run(a: BackupArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let progress = Progress::new(a.json);
    if let Some(src) = &a.source {
        let image = RbdImage::parse(src).ok_or_else(|| anyhow::anyhow!("'{src}' is not a source: use rbd:POOL/IMAGE (or --diff FILE)"))?;
        let engine = r.engine(progress).await?;
        let opts = RbdBackupOptions {
            volume: a.volume.clone(),
            full: a.full,
            jobs: a.jobs,
            labels: a.labels.into_iter().collect(),
            lease: (a.lease_seconds > 0).then(|| Duration::from_secs(a.lease_seconds)),
            verify_blocks: a.verify_blocks,
            keep_snapshots: a.keep_snapshots as usize,
            deltas: !a.no_deltas,
            ..Default::default()
        };
        let done = engine.backup_rbd(&ceph.ceph(), &image, opts).await?;
        let requests = engine.repository().store().requests();
        if a.json {
            let mut v = serde_json::to_value(backup_output(&done.outcome, requests))?;
            v["rbd"] = serde_json::to_value(&done.notes)?;
            print_json(&v)?;
        } else {
            if let Some(why) = &done.notes.full_reason {
                println!("full backup: {why}");
            }
            print_summary(&done.outcome, &requests);
            let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
            println!(
                "  snapshot  {image}@{} is the base of the next backup; removed: {}",
                done.notes.snapshot,
                list(&done.notes.removed_snapshots)
            );
            if done.notes.blocks_healed > 0 {
                println!(
                    "  healed    {} block(s) whose chunk was quarantined, read again from the snapshot",
                    done.notes.blocks_healed
                );
            }
            if done.notes.kept_snapshots.len() > 1 {
                println!("  kept      {}", list(&done.notes.kept_snapshots[1..]));
            }
        }
        return Ok(exit::OK);
    }
    let (Some(volume), Some(diff)) = (a.volume.clone(), a.diff.clone()) else {
        bail!("give rbd:POOL/IMAGE, or --volume NAME with --diff FILE|-");
    };
    ferry_repo::validate_volume_name(&volume)?;
    let block_size = a.block_size.map(BlockSize::new).transpose()?;
    let parent = a.parent.as_deref().map(|p| BackupSpec::parse(Some(p))).transpose()?;
    let engine = r.engine(progress).await?;
    let (reader, total): (Box<dyn Read + Send>, Option<u64>) = if diff.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(&diff).with_context(|| format!("opening diff stream {}", diff.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let opts = StreamBackupOptions {
        volume,
        parent,
        block_size,
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        jobs: a.jobs,
        total,
        deltas: !a.no_deltas,
    };
    let done = engine.backup_stream(reader, opts).await?;
    let requests = engine.repository().store().requests();
    if a.json {
        print_json(&backup_output(&done, requests))?;
    } else {
        print_summary(&done, &requests);
    }
    Ok(exit::OK)
}
