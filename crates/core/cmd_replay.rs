//! `ferry replay VOLUME --onto rbd:POOL/IMAGE`: keep a warm standby image current.

use anyhow::{bail, Result};
use clap::Args;
use ferry_engine::{RbdImage, ReplayOptions};
use ferry_repo::BackupSpec;

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::{human_bytes, print_json, Progress};

/// Brings a standby RBD image in this (the DR) cluster to a backup of VOLUME — the newest, or
/// VOLUME@BACKUP — from the bucket alone. The first run restores the backup in full; later
/// runs write only the blocks that differ between the backup the image is at (its newest
/// snapshot) and the new one, through `rbd import-diff`, so the image carries the source's
/// snapshot names. Older standby snapshots go only once the new one exists. An image written
/// since its last replay is refused (exit 5) unless --force; a replay that stopped half-way is
/// repaired by the next one.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The volume, optionally @BACKUP (default: its newest backup).
    target: String,
    /// The standby image: rbd:POOL/IMAGE (created by the first replay).
    #[arg(long, value_name = "rbd:POOL/IMAGE")]
    onto: String,
    /// Overwrite an image that was written since its last replay (the written blocks are
    /// rewritten from the backup), or that is not a standby of this volume (full restore).
    #[arg(long)]
    force: bool,
    /// Standby snapshots to keep on the image (the newest is the next replay's base).
    #[arg(long, default_value_t = 1)]
    keep_snapshots: usize,
    /// Chunks in flight.
    #[arg(long, default_value_t = ferry_engine::default_jobs())]
    jobs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: ReplayArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let Some(image) = RbdImage::parse(&a.onto) else {
        bail!("--onto must be rbd:POOL/IMAGE, not '{}'", a.onto);
    };
    let (volume, spec) = BackupSpec::split_target(&a.target)?;
    let engine = r.engine(Progress::new(a.json)).await?;
    let opts = ReplayOptions {
        backup: spec,
        force: a.force,
        jobs: a.jobs,
        keep_snapshots: a.keep_snapshots,
    };
    let report = engine.replay(&ceph.ceph(), volume, &image, &opts).await?;
    if a.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        match report.kind {
            "up-to-date" => println!(
                "{} is at {volume}@{} (@{}): up to date",
                report.image, report.backup_id, report.snapshot
            ),
            kind => {
                println!(
                    "{} is at {volume}@{} (@{}) after a {kind} replay{}: {} block(s) written, {} zeroed, {}{} in {:.2} s",
                    report.image,
                    report.backup_id,
                    report.snapshot,
                    report.from_backup.as_deref().map(|b| format!(" from {b}")).unwrap_or_default(),
                    report.blocks_written,
                    report.blocks_zeroed,
                    human_bytes(report.bytes_written),
                    if report.blocks_diverged > 0 {
                        format!(
                            "; {} block(s) written on the standby since its snapshot rewritten",
                            report.blocks_diverged
                        )
                    } else {
                        String::new()
                    },
                    report.duration_ms as f64 / 1000.0
                );
            }
        }
        for s in &report.snapshots_removed {
            println!("removed the old standby snapshot {}@{s}", report.image);
        }
    }
    Ok(exit::OK)
}
