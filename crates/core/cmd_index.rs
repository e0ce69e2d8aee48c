//! `ferry index`: the local index cache.

use anyhow::Result;
use clap::Subcommand;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{print_json, Progress};

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Recreate the local index from the bucket.
    Rebuild {
        /// Print the sync report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: IndexCommand, r: RepoArgs) -> Result<u8> {
    match cmd {
        IndexCommand::Rebuild { json } => {
            let engine = r.engine(Progress::new(json)).await?;
            let index = engine.index();
            index.clear()?;
            let rep = index.sync(engine.repository()).await?;
            if json {
                let mut v = serde_json::to_value(&rep)?;
                v["requests"] = serde_json::to_value(engine.repository().store().requests())?;
                print_json(&v)?;
            } else {
                println!(
                    "index {} rebuilt: {} backups, {} known chunks",
                    index.path(),
                    rep.backups,
                    index.chunk_count()
                );
            }
        }
    }
    Ok(exit::OK)
}
