//! `ferry key`: the passphrases (key slots) that open the repository.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use ferry_engine::Error as EngineError;
use ferry_repo::{KdfParams, Repository};
use serde::Serialize;

use crate::args::{passphrase_from, RepoArgs};
use crate::errors::exit;
use crate::output::print_json;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List key slots (the one the passphrase opened is marked).
    List {
        /// Print the slots as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase (new one from $FERRY_NEW_PASSWORD, --new-password-file or a prompt).
    Add {
        /// Read the new passphrase from this file.
        #[arg(long, env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
        /// Who or what holds the new passphrase.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Remove a key slot by ID (never the last one).
    Remove {
        /// The slot's ID (see `ferry key list`).
        id: String,
    },
    /// Change the passphrase: adds a slot for the new one, then removes the current one's slot.
    Passwd {
        /// Read the new passphrase from this file.
        #[arg(long, env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
}

fn new_passphrase(file: Option<&std::path::Path>) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let p = passphrase_from(file, "FERRY_NEW_PASSWORD", "New passphrase: ")?;
    if file.is_none() && std::env::var_os("FERRY_NEW_PASSWORD").is_none() {
        let again = passphrase_from(None, "FERRY_NEW_PASSWORD", "Repeat new passphrase: ")?;
        if again != p {
            return Err(EngineError::refused("the passphrases differ").into());
        }
    }
    Ok(p)
}

pub async fn run(cmd: KeyCommand, r: RepoArgs) -> Result<u8> {
    // One passphrase prompt and one key derivation: the repository remembers the slot it opened.
    let repo = r.open_repository().await?;
    let current = repo.slot_id().to_string();
    match cmd {
        KeyCommand::List { json } => {
            let slots = Repository::read_key_slots(repo.store()).await?;
            if json {
                #[derive(Serialize)]
                struct S<'a> {
                    id: &'a str,
                    created: String,
                    label: &'a str,
                    kdf: &'a KdfParams,
                    current: bool,
                    /// "authentic", "legacy" (no MAC: label and config unchecked) or
                    /// "NOT AUTHENTIC" (changed in the bucket).
                    label_and_config: &'static str,
                }
                let out: Vec<_> = slots
                    .iter()
                    .map(|s| S {
                        id: &s.id,
                        created: s.created.to_rfc3339(),
                        label: &s.label,
                        kdf: &s.kdf,
                        current: s.id == current,
                        label_and_config: authenticity(&repo, s),
                    })
                    .collect();
                print_json(&out)?;
            } else {
                println!("{:<2}{:<18} {:<26} {:<24} {:<14} KDF", "", "ID", "CREATED", "LABEL", "AUTHENTICITY");
                for s in &slots {
                    println!(
                        "{:<2}{:<18} {:<26} {:<24} {:<14} argon2id m={}KiB t={} p={}",
                        if s.id == current { "*" } else { "" },
                        s.id,
                        s.created.format("%Y-%m-%d %H:%M:%S UTC"),
                        s.label,
                        authenticity(&repo, s),
                        s.kdf.m_cost_kib,
                        s.kdf.t_cost,
                        s.kdf.p_cost
                    );
                }
            }
        }
        KeyCommand::Add { new_password_file, label } => {
            let p = new_passphrase(new_password_file.as_deref())?;
            let id = repo.add_key_slot(&p, &label, KdfParams::argon2id_default()).await?;
            println!("added key slot {id}");
        }
        KeyCommand::Remove { id } => {
            repo.remove_key_slot(&id).await?;
            println!("removed key slot {id}");
        }
        KeyCommand::Passwd { new_password_file } => {
            let p = new_passphrase(new_password_file.as_deref())?;
            let id = repo.add_key_slot(&p, "passwd", KdfParams::argon2id_default()).await?;
            repo.remove_key_slot(&current).await?;
            println!("passphrase changed: key slot {current} replaced by {id}");
        }
    }
    Ok(exit::OK)
}

/// What `key list` says of a slot's label and the config it was made with.
fn authenticity(repo: &Repository, slot: &ferry_repo::KeySlot) -> &'static str {
    match repo.verify_slot(slot) {
        Ok(ferry_repo::SlotAuthenticity::Authentic) => "authentic",
        Ok(ferry_repo::SlotAuthenticity::Legacy) => "legacy",
        Err(_) => "NOT AUTHENTIC",
    }
}
