//! `ferry ls`: volumes and their backup chains.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::Error as EngineError;
use ferry_repo::Source;
use serde::Serialize;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{human_bytes, print_json, Progress};

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only this volume.
    volume: Option<String>,
    /// Print the backups as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: LsArgs, r: RepoArgs) -> Result<u8> {
    if let Some(v) = &a.volume {
        ferry_repo::validate_volume_name(v)?;
    }
    let engine = r.engine(Progress::new(a.json)).await?;
    let index = engine.index();
    let sync = index
        .sync(engine.repository())
        .await
        .context("reading backups from the repository")?;
    let unreadable: Vec<_> = sync
        .unreadable
        .iter()
        .filter(|(r, _)| a.volume.as_deref().is_none_or(|v| v == r.volume))
        .collect();
    let backups = index.backups(a.volume.as_deref())?;
    // Listed last so the good backups are still shown; exit 3 says something is damaged.
    let damaged = || -> Result<u8> {
        if unreadable.is_empty() {
            return Ok(exit::OK);
        }
        for (r, e) in &unreadable {
            eprintln!("ferry: backup {} of volume '{}' is unreadable: {e}", r.backup_id(), r.volume);
        }
        Err(EngineError::integrity(format!("{} backup manifest(s) are damaged; run `ferry audit`", unreadable.len())).into())
    };
    if a.json {
        #[derive(Serialize)]
        struct Entry<'a> {
            volume: &'a str,
            backup_id: &'a str,
            object: String,
            created: String,
            kind: &'a str,
            parent: &'a Option<String>,
            from_snap: &'a Option<String>,
            to_snap: &'a Option<String>,
            image_size: u64,
            block_size: u64,
            blocks_with_data: u64,
            source: &'a Source,
            labels: &'a BTreeMap<String, String>,
            stats: &'a ferry_repo::BackupStats,
            /// `ferry protect`: never forgotten or pruned.
            protected: bool,
        }
        let out: Vec<_> = backups
            .iter()
            .map(|b| Entry {
                volume: &b.meta.volume,
                backup_id: &b.meta.backup_id,
                object: b.backup.key(),
                created: b.meta.created.to_rfc3339(),
                kind: if b.meta.from_snap.is_some() { "incremental" } else { "full" },
                parent: &b.meta.parent,
                from_snap: &b.meta.from_snap,
                to_snap: &b.meta.to_snap,
                image_size: b.meta.image_size,
                block_size: b.meta.block_size.get(),
                blocks_with_data: b.chunk_blocks,
                source: &b.meta.source,
                labels: &b.meta.labels,
                stats: &b.meta.stats,
                protected: sync.protected.contains(&b.backup),
            })
            .collect();
        print_json(&out)?;
        return damaged();
    }
    if backups.is_empty() {
        println!(
            "no backups{}",
            a.volume.as_ref().map(|v| format!(" of volume '{v}'")).unwrap_or_default()
        );
        return damaged();
    }
    println!(
        "{:<24} {:<16} {:<20} {:<5} {:<4} {:<30} {:>10} {:>10} {:>10}",
        "VOLUME", "BACKUP", "CREATED (UTC)", "KIND", "PROT", "SNAPSHOTS (FROM -> TO)", "SIZE", "CHANGED", "UPLOADED"
    );
    for b in &backups {
        let snaps = format!(
            "{} -> {}",
            b.meta.from_snap.as_deref().unwrap_or("-"),
            b.meta.to_snap.as_deref().unwrap_or("-")
        );
        println!(
            "{:<24} {:<16} {:<20} {:<5} {:<4} {:<30} {:>10} {:>10} {:>10}",
            b.meta.volume,
            b.meta.backup_id,
            b.meta.created.format("%Y-%m-%d %H:%M:%S"),
            if b.meta.from_snap.is_some() { "incr" } else { "full" },
            if sync.protected.contains(&b.backup) { "yes" } else { "" },
            snaps,
            human_bytes(b.meta.image_size),
            human_bytes(b.meta.stats.blocks_changed * b.meta.block_size.get()),
            human_bytes(b.meta.stats.bytes_uploaded)
        );
    }
    damaged()
}
