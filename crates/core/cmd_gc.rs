//! `ferry gc`: delete chunks no backup references, safely beside running backups.

use anyhow::Result;
use clap::Args;
use ferry_repo::GcOptions;

use crate::args::{parse_seconds, RepoArgs};
use crate::errors::exit;
use crate::output::{human_bytes, print_json, requests_line, Progress};

/// Deletes every chunk no manifest references. Safe while backups, prunes and other GCs of
/// ferry 0.2 or later run (FORMAT.md §12); every backup writing to the repository must be
/// ferry 0.2 or later (0.1 keeps no session a GC could see).
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Mark only: report what would be deleted (an upper bound: running backups may still
    /// claim some); write and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long to wait, in seconds, for running backups to acknowledge the sweep; a backup
    /// that does not answer in time (crashed or hung) is fenced: it can no longer commit and
    /// fails with "stopped by a garbage collection" (run it again).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    ack_timeout: std::time::Duration,
    /// Also keep unreferenced chunks younger than this (e.g. 1h, 2d; default 0). The protocol
    /// does not need it; it is a margin for stores whose listing lags.
    #[arg(long, value_name = "DURATION", value_parser = parse_grace)]
    grace: Option<std::time::Duration>,
    /// Take over from a garbage collection that holds the claim although its process is gone
    /// (a claim by a dead process of this host is taken over without this). Only when you
    /// know it is not running: a live one stops before its next batch of deletes.
    #[arg(long)]
    takeover: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    crate::cmd_prune::parse_duration(s)?
        .to_std()
        .map_err(|_| format!("'{s}' is not a positive duration"))
}

pub async fn run(a: GcArgs, r: RepoArgs) -> Result<u8> {
    let engine = r.engine(Progress::new(a.json)).await?;
    let opts = GcOptions {
        dry_run: a.dry_run,
        ack_timeout: a.ack_timeout,
        takeover: a.takeover,
        grace: a.grace.unwrap_or_default(),
        ..Default::default()
    };
    let report = engine.gc(&opts).await?;
    let requests = engine.repository().store().requests();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = serde_json::to_value(requests)?;
        print_json(&v)?;
        return Ok(exit::OK);
    }
    if let Some(g) = report.took_over {
        println!("took over from garbage collection {g}, whose process is gone");
    }
    if report.kept_young > 0 {
        println!("kept {} unreferenced chunk(s) younger than --grace", report.kept_young);
    }
    println!(
        "marked {} chunk(s) referenced by {} manifest(s); {} of {} chunk(s) ({}) in the repository were unreferenced",
        report.chunks_referenced,
        report.manifests,
        report.candidates,
        report.chunks_total,
        human_bytes(report.bytes_total)
    );
    if report.dry_run {
        println!(
            "dry run: would delete up to {} chunk(s), {} (nothing was written or deleted)",
            report.chunks_deleted,
            human_bytes(report.bytes_freed)
        );
    } else {
        println!(
            "running backups: {} ({} acknowledged, {} committed meanwhile, {} fenced); {} chunk(s) kept for them",
            report.sessions_running, report.sessions_acked, report.sessions_committed, report.sessions_fenced, report.kept_for_backups
        );
        println!(
            "deleted {} chunk(s), {} freed (generation {}); cleaned {} ended session(s)",
            report.chunks_deleted,
            human_bytes(report.bytes_freed),
            report.generation.unwrap_or(0),
            report.sessions_cleaned
        );
    }
    println!("{}", requests_line(&requests));
    Ok(exit::OK)
}
