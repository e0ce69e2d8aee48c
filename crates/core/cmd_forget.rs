//! `ferry forget`: delete chosen backups (their manifests; chunks stay until GC).

use anyhow::Result;
use clap::Args;
use ferry_repo::BackupSpec;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{print_json, Progress};

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// VOLUME@BACKUP, one or more (BACKUP as for restore: an ID or prefix, a snapshot name,
    /// id:PREFIX, snap:NAME, latest). All must be of one volume.
    #[arg(required = true, num_args = 1..)]
    backups: Vec<String>,
    /// Say what would be forgotten; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: ForgetArgs, r: RepoArgs) -> Result<u8> {
    let mut volume: Option<&str> = None;
    let mut specs = Vec::new();
    for t in &a.backups {
        let (v, spec) = BackupSpec::split_target(t)?;
        if !t.contains('@') {
            anyhow::bail!(ferry_engine::Error::new(
                ferry_engine::ErrorKind::Usage,
                format!("'{t}' names no backup: use VOLUME@BACKUP (forget never takes a whole volume implicitly)"),
                None
            ));
        }
        match volume {
            Some(prev) if prev != v => anyhow::bail!(ferry_engine::Error::new(
                ferry_engine::ErrorKind::Usage,
                format!("backups of two volumes ('{prev}', '{v}'): forget one volume at a time"),
                None
            )),
            _ => volume = Some(v),
        }
        specs.push(spec);
    }
    let volume = volume.unwrap_or_default();
    let engine = r.engine(Progress::new(a.json)).await?;
    let gone = engine.forget(volume, &specs, a.dry_run).await?;
    if a.json {
        print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "backups": gone,
            "requests": engine.repository().store().requests(),
        }))?;
    } else {
        for f in &gone {
            println!(
                "{} backup {} of volume '{}' ({})",
                if a.dry_run { "would forget" } else { "forgot" },
                f.backup_id,
                f.volume,
                f.to_snap.as_deref().unwrap_or("-")
            );
        }
        if !a.dry_run {
            println!("their chunks stay in the repository until a garbage collection finds them unused");
        }
    }
    Ok(exit::OK)
}
