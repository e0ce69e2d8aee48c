//! `ferry audit`: prove manifests authentic, chains continuous, chunks present and intact.
//! Findings print as `FINDING` lines (exit 3); information (a forgotten parent, a fork) as
//! `INFO` lines after them, which never change the exit code. `--compare-source` also reads
//! the backups' snapshots that still exist on the cluster and compares them block by block.

use anyhow::Result;
use clap::Args;
use ferry_engine::{AuditOptions, CompareOptions, Error as EngineError, ErrorKind};

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::{print_json, requests_line, Progress};

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
    /// Do not quarantine the chunks found missing or corrupt (by default they are recorded
    /// under quarantine/ — a corrupt one moved aside — so the next backup that has their
    /// blocks uploads them again, and an RBD backup re-reads them from its snapshot).
    #[arg(long)]
    no_quarantine: bool,
    /// Download only objects no such audit verified within DURATION (e.g. 30d; implies
    /// --read-data), and record what this one verified in the bucket (verified/), so a
    /// budgeted daily audit covers the whole repository over time, oldest first.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    outdated_after: Option<std::time::Duration>,
    /// Stop downloading for verification after about this many bytes (e.g. 20G); existence
    /// checks go on. Egress costs money.
    #[arg(long, value_name = "BYTES", value_parser = crate::output::parse_size)]
    max_bytes: Option<u64>,
    /// Stop downloading for verification after this many objects (one GET each).
    #[arg(long, value_name = "N")]
    max_requests: Option<u64>,
    /// With --outdated-after: do not record what this audit verified (a read-only
    /// credential; the next audit reads the same objects again).
    #[arg(long)]
    no_record: bool,
    /// Also compare backups with their source: every backup whose snapshot still exists on
    /// the Ceph cluster (same cluster, same image) is read through librbd and each block
    /// compared with the backup's block map; a difference is a `source-mismatch` finding
    /// naming the block. Needs the cluster's settings (--ceph-conf, --ceph-keyring, --ceph-id).
    #[arg(long)]
    compare_source: bool,
    /// With --compare-source: compare PERCENT of each backup's blocks (sampled anew each run).
    #[arg(long, value_name = "PERCENT", default_value_t = 100.0, requires = "compare_source")]
    sample: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: AuditArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    if !(0.0..=100.0).contains(&a.sample) || a.sample.is_nan() {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!("--sample must be a percentage from 0 to 100, not {}", a.sample),
            None,
        )
        .into());
    }
    let engine = r.engine(Progress::new(a.json)).await?;
    let opts = AuditOptions {
        volumes: a.volumes.clone(),
        read_data_percent: a.read_data.unwrap_or(if a.outdated_after.is_some() { 100.0 } else { 0.0 }),
        jobs: a.jobs,
        quarantine: !a.no_quarantine,
        outdated_after: a.outdated_after,
        max_bytes: a.max_bytes,
        max_requests: a.max_requests,
        remember: a.outdated_after.is_some() && !a.no_record,
    };
    let mut report = engine.audit(&opts).await?;
    let source = if a.compare_source {
        let c = engine
            .compare_source(
                &ceph.ceph(),
                &CompareOptions {
                    volumes: a.volumes,
                    sample_percent: a.sample,
                },
            )
            .await?;
        report.findings.extend(c.findings.iter().cloned());
        report.info.extend(c.info.iter().cloned());
        report.ok = report.findings.is_empty();
        Some(c)
    } else {
        None
    };
    let requests = engine.repository().store().requests();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = serde_json::to_value(requests)?;
        if let Some(c) = &source {
            v["source"] = serde_json::json!({
                "backups_compared": c.backups_compared,
                "blocks_compared": c.blocks_compared,
                "bytes_read": c.bytes_read,
            });
        }
        print_json(&v)?;
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
        if report.chunks_read > 0 || report.chunks_fresh > 0 || report.budget_reached {
            println!(
                "{} verified ({}); {} verified recently by an earlier audit, not read{}",
                report.chunks_read,
                crate::output::human_bytes(report.bytes_verified),
                report.chunks_fresh,
                if report.budget_reached {
                    format!("; budget spent: {} object(s) left for the next audit", report.chunks_outdated_left)
                } else {
                    String::new()
                }
            );
        }
        if let Some(c) = &source {
            println!(
                "compared with the source: {} backup(s), {} block(s), {} read from the cluster",
                c.backups_compared,
                c.blocks_compared,
                crate::output::human_bytes(c.bytes_read)
            );
        }
        if report.manifests_vanished > 0 {
            println!(
                "{} manifest(s) deleted while the audit ran (listed, then gone): not checked",
                report.manifests_vanished
            );
        }
        for (label, list) in [("FINDING", &report.findings), ("INFO", &report.info)] {
            for f in list {
                println!(
                    "{label} [{}] {} {}: {}",
                    f.kind,
                    f.volume,
                    f.backup.as_deref().unwrap_or("-"),
                    f.detail
                );
            }
        }
        if report.quarantined > 0 {
            println!(
                "{} chunk(s) put in quarantine: the next backup that has their blocks uploads them again",
                report.quarantined
            );
        }
        println!("requests: {}", requests_line(&requests));
        if report.ok {
            println!("audit passed: manifests authentic, chains continuous, all chunks present");
            if source.as_ref().is_some_and(|c| c.backups_compared > 0) {
                println!("every compared backup equals its source snapshot");
            }
        }
    }
    if !report.ok {
        return Err(EngineError::integrity(format!("audit found {} problem(s)", report.findings.len())).into());
    }
    Ok(exit::OK)
}

fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    crate::cmd_prune::parse_duration(s)?
        .to_std()
        .map_err(|_| format!("'{s}' is not a positive duration"))
}
