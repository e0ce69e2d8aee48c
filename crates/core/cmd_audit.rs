//! `ferry audit`: prove manifests authentic, chains continuous, chunks present and intact.
//! Findings print as `FINDING` lines (exit 3); information (a forgotten parent, a fork) as
//! `INFO` lines after them, which never change the exit code.

use anyhow::Result;
use clap::Args;
use ferry_engine::{AuditOptions, Error as EngineError};

use crate::args::RepoArgs;
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
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: AuditArgs, r: RepoArgs) -> Result<u8> {
    let engine = r.engine(Progress::new(true)).await?;
    let opts = AuditOptions {
        volumes: a.volumes,
        read_data_percent: a.read_data.unwrap_or(0.0),
        jobs: a.jobs,
        quarantine: !a.no_quarantine,
    };
    let report = engine.audit(&opts).await?;
    let requests = engine.repository().store().requests();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = serde_json::to_value(requests)?;
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
        }
    }
    if !report.ok {
        return Err(EngineError::integrity(format!("audit found {} problem(s)", report.findings.len())).into());
    }
    Ok(exit::OK)
}
