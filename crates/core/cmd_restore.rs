//! `ferry restore`: a backup back as a file, block device, stream, or RBD image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use ferry_engine::{FileTarget, RbdImage, RestoreIncomplete, RestoreOptions, RestoreReport, RestoreTarget, StreamFormat, StreamTarget};
use ferry_repo::{BackupRef, BackupSpec, Manifest};
use serde::Serialize;

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::{human_bytes, print_json, requests_line, Progress};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    /// The volume's bytes.
    Raw,
    /// An `rbd export-diff` v1 stream, for `rbd import-diff - POOL/IMAGE`.
    ImportDiff,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// VOLUME or VOLUME@BACKUP: BACKUP is 'latest', a backup ID or unique prefix (4+ digits), a snapshot
    /// name, a time (the newest backup made at or before it), or explicitly id:PREFIX /
    /// snap:NAME / at:TIME (a bare word that is two of these is refused).
    target: String,
    /// The newest backup made at or before TIME: RFC 3339 (2026-11-30T02:00:00Z), or
    /// YYYY-MM-DDTHH:MM(:SS) in UTC, or a date alone (the end of that day, UTC).
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Where to write: a file (sparse), a block device, '-' for stdout, or rbd:POOL/IMAGE.
    #[arg(long)]
    to: PathBuf,
    #[arg(long, value_enum, default_value_t = OutFormat::Raw)]
    format: OutFormat,
    /// With --format import-diff or rbd:POOL/IMAGE: the to-snapshot the stream names
    /// (import-diff then creates it); default: the backup's snapshot for RBD targets.
    #[arg(long)]
    snap_name: Option<String>,
    /// Overwrite an existing non-empty file or an existing RBD image.
    #[arg(long)]
    force: bool,
    /// Write every block that can be read, report the rest (exit code 3), instead of failing.
    #[arg(long)]
    best_effort: bool,
    /// Chunk downloads in flight (blocks are decoded as they arrive, a few more than one per
    /// core at once); more hide a distant store's latency, each holds one stored chunk in memory.
    #[arg(long, default_value_t = ferry_engine::default_downloads())]
    jobs: usize,
    /// With --to rbd:POOL/IMAGE: make the image usable at once, before its data is copied.
    /// ferry serves the backup over HTTP and prepares an import-only live migration from it
    /// (Ceph 16.2+); a line says when the image is usable, then ferry copies the rest
    /// (`rbd migration execute`), commits, and exits. Keep it running until then: reads of
    /// data not yet copied go through it.
    #[arg(long)]
    instant: bool,
    /// With --instant: the address to serve on (every client of the image must reach it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0", requires = "instant")]
    listen: std::net::SocketAddr,
    /// With --instant: the host name in the image's source URL (default: the --listen address).
    #[arg(long, value_name = "HOST", requires = "instant")]
    url_host: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RestoreArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let (volume, mut spec) = BackupSpec::split_target(&a.target)?;
    if let Some(at) = &a.at {
        if a.target.contains('@') {
            return Err(ferry_repo::Error::InvalidArgument(format!(
                "'{}' names a backup after '@' and --at names another way: give one of them",
                a.target
            ))
            .into());
        }
        spec = BackupSpec::parse(Some(&format!("at:{at}")))?;
    }
    let engine = r.engine(Progress::new(a.json)).await?;
    let (br, manifest) = engine.resolve(volume, &spec).await?;
    let to = a.to.to_string_lossy().to_string();
    let format = match a.format {
        OutFormat::Raw => StreamFormat::Raw,
        OutFormat::ImportDiff => StreamFormat::ImportDiff,
    };
    if a.instant {
        let Some(image) = RbdImage::parse(&to) else {
            anyhow::bail!("--instant restores into an RBD image: --to rbd:POOL/IMAGE");
        };
        let prepared = engine
            .instant_restore(
                &ceph.ceph(),
                manifest.clone(),
                &image,
                &ferry_engine::InstantOptions {
                    listen: a.listen,
                    url_host: a.url_host.clone(),
                },
            )
            .await?;
        let usable = prepared.usable_after().as_secs_f64();
        if a.json {
            eprintln!("ferry: rbd:{image} is usable after {usable:.2} s; copying the rest");
        } else {
            use std::io::Write;
            println!(
                "rbd:{image} is usable after {usable:.2} s ({}@{}); copying the rest in the background — keep ferry running",
                br.volume, manifest.meta.backup_id
            );
            let _ = std::io::stdout().flush();
        }
        let report = prepared.complete().await?;
        if a.json {
            print_json(&serde_json::json!({
                "volume": br.volume,
                "backup_id": manifest.meta.backup_id,
                "to": to,
                "instant": report,
                "requests": engine.repository().store().requests(),
            }))?;
        } else {
            println!(
                "rbd:{image} complete after {:.2} s: {} served in {} requests, {} blocks fetched; the migration is committed",
                report.complete_after_s,
                human_bytes(report.bytes_served),
                report.requests,
                report.blocks_fetched
            );
        }
        return Ok(exit::OK);
    }
    let target: Box<dyn RestoreTarget> = if let Some(image) = RbdImage::parse(&to) {
        Box::new(engine.rbd_target(&ceph.ceph(), &image, a.force, a.snap_name.clone()))
    } else if to == "-" {
        Box::new(StreamTarget::new("-", stdout_unbuffered()?, format, a.snap_name.clone()))
    } else if format == StreamFormat::ImportDiff {
        Box::new(StreamTarget::file(&a.to, a.force, format, a.snap_name.clone()))
    } else {
        Box::new(FileTarget::new(&a.to, a.force))
    };
    let opts = RestoreOptions {
        jobs: a.jobs,
        best_effort: a.best_effort,
        quarantine: true,
    };
    match engine.restore(manifest.clone(), target, &opts).await {
        Ok(report) => {
            let requests = engine.repository().store().requests();
            print_restore(&br, &manifest, &report, &a, true, &requests)?;
            Ok(exit::OK)
        }
        Err(e) => {
            // A machine reader gets the report of what was written, then the error.
            if let (true, Some(RestoreIncomplete(report))) = (a.json, e.find::<RestoreIncomplete>()) {
                let requests = engine.repository().store().requests();
                print_restore(&br, &manifest, report, &a, false, &requests)?;
            }
            Err(anyhow::Error::new(e).context(format!("restore of {}", a.target)))
        }
    }
}

fn print_restore(
    br: &BackupRef,
    m: &Manifest,
    rep: &RestoreReport,
    a: &RestoreArgs,
    ok: bool,
    requests: &ferry_repo::RequestStats,
) -> Result<()> {
    if a.json {
        #[derive(Serialize)]
        struct Out<'a> {
            volume: &'a str,
            backup_id: &'a str,
            to: String,
            format: String,
            ok: bool,
            report: &'a RestoreReport,
            requests: &'a ferry_repo::RequestStats,
            peak_rss_bytes: Option<u64>,
        }
        let out = Out {
            volume: &br.volume,
            backup_id: &m.meta.backup_id,
            to: a.to.display().to_string(),
            format: format!("{:?}", a.format).to_lowercase(),
            ok,
            report: rep,
            requests,
            peak_rss_bytes: crate::output::peak_rss_bytes(),
        };
        // The data went to stdout: the report goes to stderr, never into the image's stream.
        if a.to.as_os_str() == "-" {
            eprintln!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        return print_json(&out);
    }
    // Human output goes to stderr when the data goes to stdout.
    let secs = (rep.duration_ms as f64 / 1000.0).max(0.001);
    let line = format!(
        "restored {}@{} ({}) to {}: {} blocks written, {} holes, {} in {:.2} s ({:.1} MiB/s)",
        br.volume,
        m.meta.backup_id,
        m.meta.to_snap.as_deref().unwrap_or("-"),
        a.to.display(),
        rep.blocks_written,
        rep.blocks_hole,
        human_bytes(rep.image_size),
        secs,
        rep.image_size as f64 / (1 << 20) as f64 / secs
    );
    let line = format!("{line}\n  requests  {}", requests_line(requests));
    if a.to.as_os_str() == "-" {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Standard output as a plain file descriptor: `std::io::stdout()` is line-buffered and scans
/// every byte of a multi-GiB image for newlines; the restore buffers its writes itself.
fn stdout_unbuffered() -> Result<Box<dyn std::io::Write + Send>> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating standard output")?;
    Ok(Box::new(std::fs::File::from(fd)))
}
