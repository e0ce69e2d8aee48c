//! `ferry sync --to URL`: copy backups to a second repository as ciphertext.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::SyncOptions;
use ferry_repo::Repository;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{human_bytes, print_json, requests_line, Progress};

/// Copies the backups a second repository lacks — another bucket, region or provider — with
/// the chunks they need, as stored: nothing is decrypted for good or re-encrypted, and the
/// copy opens with the same passphrases (its key slots are copied too). Every object is
/// verified before it is written; only what is missing travels, so an interrupted sync is
/// resumed by running it again. The destination is written like a backup writes, so
/// `ferry gc` there is safe beside a sync. Nothing is ever deleted from the destination:
/// prune it with its own policy (a backup pruned there but still in the source is copied
/// again by the next sync). The destination uses the same store options (--s3-endpoint,
/// credentials) as the source.
///
/// Exit codes: 0 everything copied (or skipped as forgotten at the copy or vanished from the
/// source: see the report); 1 a store failed, or a backup could not be copied this time
/// (another sync may be copying it, a GC of the copy stopped it, a newer format); 3 a backup
/// is damaged in the source; 5 the destination is another repository.
#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The second repository's URL (empty, or an earlier copy of this repository).
    #[arg(long, value_name = "URL")]
    to: String,
    /// Volumes to copy (default: all).
    volumes: Vec<String>,
    /// Objects copied at once.
    #[arg(long, default_value_t = 16)]
    jobs: usize,
    /// Copy a backup whose unfinished copy was begun by a process that may still run on
    /// another host (a dead process of this host never holds a backup back; a GC of the copy
    /// ends a dead one's attempt). Only when you know it is gone: else the copy may hold the
    /// backup twice.
    #[arg(long)]
    takeover: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: SyncArgs, r: RepoArgs) -> Result<u8> {
    let engine = r.engine(Progress::new(a.json)).await?;
    let dst_store = r.store_at(&a.to)?;
    let identity = engine
        .repository()
        .copy_identity(&dst_store)
        .await
        .with_context(|| format!("preparing {} as a copy of {}", a.to, engine.repository().url()))?;
    let pass = r.passphrase()?;
    let mut dst = Repository::open(dst_store, &pass)
        .await
        .with_context(|| format!("opening repository {}", a.to))?;
    dst = dst.with_retry(engine.repository().retry_policy());
    let dst = Arc::new(dst);
    let opts = SyncOptions {
        volumes: a.volumes,
        jobs: a.jobs,
        takeover: a.takeover,
    };
    let mut out = engine.sync_to(dst.clone(), &opts).await?;
    out.repository_created = identity.created;
    out.key_slots_copied = identity.key_slots_copied;
    let (src_req, dst_req) = (engine.repository().store().requests(), dst.store().requests());
    if a.json {
        let mut v = serde_json::to_value(&out)?;
        v["requests"] = serde_json::json!({ "source": src_req, "destination": dst_req });
        print_json(&v)?;
    } else {
        if out.repository_created {
            println!("{} is now a copy of repository {} (same passphrases)", out.destination, dst.id());
        }
        println!(
            "{} backup(s) copied, {} already there; {} object(s) copied ({}), {} already there",
            out.backups_copied,
            out.backups_present,
            out.objects_copied,
            human_bytes(out.bytes_copied),
            out.objects_present
        );
        if out.key_slots_copied > 0 || out.protections_copied > 0 {
            println!(
                "{} key slot(s) and {} protection marker(s) copied",
                out.key_slots_copied, out.protections_copied
            );
        }
        for s in &out.skipped {
            println!("SKIPPED [{}] {} {}: {}", s.kind, s.volume, s.backup, s.reason);
        }
        println!("source requests: {}", requests_line(&src_req));
        println!("destination requests: {}", requests_line(&dst_req));
    }
    Ok(if out.skipped.iter().any(|s| s.kind == "damaged") {
        exit::INTEGRITY
    } else if out.skipped.iter().any(|s| matches!(s.kind, "busy" | "fenced" | "unsupported")) {
        exit::FAILURE
    } else {
        exit::OK
    })
}
