//! `ferry init`: a new repository (config and a first key slot).

use anyhow::{Context, Result};
use clap::Args;
use ferry_repo::{BlockSize, InitOptions, KdfParams, Repository};

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{parse_size, print_json};

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Default block size of new volumes: a power of two from 4K to 64M (RBD's object size,
    /// 4 MiB, is the best choice).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    block_size: u64,
    /// zstd level for chunks (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    /// A label for the first key slot (who or what holds this passphrase).
    #[arg(long, default_value = "initial")]
    label: String,
    /// Print the new repository's config as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: InitArgs, r: RepoArgs) -> Result<u8> {
    let block_size = BlockSize::new(a.block_size)?;
    let store = r.store()?;
    let pass = r.passphrase()?;
    let opts = InitOptions {
        block_size,
        zstd_level: a.compression_level,
        kdf: KdfParams::argon2id_default(),
        label: a.label,
    };
    let repo = Repository::init(store, &pass, opts)
        .await
        .with_context(|| format!("creating repository at {}", r.url().unwrap_or("?")))?;
    if a.json {
        print_json(repo.config())?;
    } else {
        println!("created ferry repository {} at {}", repo.id(), repo.url());
        println!("keep the passphrase safe: without it the backups cannot be read");
    }
    Ok(exit::OK)
}
