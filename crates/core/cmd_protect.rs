//! `ferry protect` / `ferry unprotect`: a protected backup is never forgotten or pruned.

use anyhow::Result;
use clap::Args;
use ferry_repo::BackupSpec;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{print_json, Progress};

#[derive(Args, Debug)]
pub struct ProtectArgs {
    /// VOLUME@BACKUP (BACKUP as for restore).
    target: String,
    /// Why (recorded in the marker, for the next operator).
    #[arg(long, default_value = "")]
    note: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct UnprotectArgs {
    /// VOLUME@BACKUP (BACKUP as for restore).
    target: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn protect(a: ProtectArgs, r: RepoArgs) -> Result<u8> {
    let (volume, spec) = BackupSpec::split_target(&a.target)?;
    let engine = r.engine(Progress::new(a.json)).await?;
    let (b, created) = engine.protect(volume, &spec, &a.note).await?;
    if a.json {
        print_json(&serde_json::json!({"volume": b.volume, "backup_id": b.backup_id(), "protected": true, "changed": created}))?;
    } else if created {
        println!("backup {} of volume '{}' is protected", b.backup_id(), b.volume);
    } else {
        println!("backup {} of volume '{}' was already protected", b.backup_id(), b.volume);
    }
    Ok(exit::OK)
}

pub async fn unprotect(a: UnprotectArgs, r: RepoArgs) -> Result<u8> {
    let (volume, spec) = BackupSpec::split_target(&a.target)?;
    let engine = r.engine(Progress::new(a.json)).await?;
    let (b, was) = engine.unprotect(volume, &spec).await?;
    if a.json {
        print_json(&serde_json::json!({"volume": b.volume, "backup_id": b.backup_id(), "protected": false, "changed": was}))?;
    } else if was {
        println!("backup {} of volume '{}' is no longer protected", b.backup_id(), b.volume);
    } else {
        println!("backup {} of volume '{}' was not protected", b.backup_id(), b.volume);
    }
    Ok(exit::OK)
}
