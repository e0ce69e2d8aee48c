//! What every command needs: the repository (URL, store options, passphrase), the local
//! index, sizes and output helpers.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_repo::{open_store, BackupRef, BackupSummary, Index, Manifest, Repository, Store, StoreOptions};

use crate::errors::Refused;

/// Options shared by every command that touches a repository.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Repository options")]
pub struct RepoArgs {
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, short = 'r', env = "FERRY_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the passphrase from this file (else $FERRY_PASSWORD, else a prompt).
    #[arg(long, env = "FERRY_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Directory of the local index cache (default: $XDG_CACHE_HOME/ferry or ~/.cache/ferry).
    #[arg(long, env = "FERRY_INDEX_DIR", global = true)]
    pub index_dir: Option<PathBuf>,
    /// Do not use the on-disk index: read everything from the bucket.
    #[arg(long, global = true)]
    pub no_index: bool,
    /// S3 endpoint (e.g. http://rgw.example:7480 for Ceph RGW); default $AWS_ENDPOINT.
    #[arg(long, env = "FERRY_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region; default $AWS_REGION or us-east-1.
    #[arg(long, env = "FERRY_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint (on-premise RGW); default $AWS_ALLOW_HTTP.
    #[arg(long, global = true)]
    pub s3_allow_http: bool,
    /// Retries of a failed store request.
    #[arg(long, env = "FERRY_STORE_RETRIES", global = true)]
    pub store_retries: Option<usize>,
}

impl RepoArgs {
    pub fn url(&self) -> Result<&str> {
        match &self.repo {
            Some(u) => Ok(u),
            None => bail!("no repository given: use --repo URL or set FERRY_REPO"),
        }
    }

    pub fn store(&self) -> Result<Store> {
        let opts = StoreOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            allow_http: self.s3_allow_http.then_some(true),
            max_retries: self.store_retries,
            ..Default::default()
        };
        Ok(open_store(self.url()?, &opts)?)
    }

    pub fn passphrase(&self) -> Result<Vec<u8>> {
        passphrase_from(self.password_file.as_deref(), "FERRY_PASSWORD", "Repository passphrase: ")
    }

    /// Opens the repository and the index (not yet synced).
    pub async fn open(&self) -> Result<Ctx> {
        let store = self.store()?;
        let pass = self.passphrase()?;
        let repo = Repository::open(store, &pass)
            .await
            .with_context(|| format!("opening repository {}", self.url().unwrap_or("?")))?;
        let index = if self.no_index {
            Index::temporary()?
        } else {
            let dir = self.index_dir.clone().unwrap_or_else(default_index_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating index directory {}", dir.display()))?;
            match Index::open(&dir, repo.id()) {
                Ok(i) => i,
                // The index is a cache: while another ferry process holds it, work from the
                // bucket with a private in-memory index rather than wait or fail.
                Err(e) if e.is_index_locked() => {
                    tracing::info!(
                        "local index {} is in use by another ferry process; using a temporary one",
                        dir.display()
                    );
                    Index::temporary()?
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Ctx {
            repo: Arc::new(repo),
            index: Arc::new(index),
        })
    }
}

pub fn default_index_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ferry");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("ferry"),
        None => PathBuf::from(".ferry-index"),
    }
}

/// Reads a secret from a file, an environment variable or an interactive prompt — never
/// from the command line, so it stays out of `ps` and shell history.
pub fn passphrase_from(file: Option<&std::path::Path>, env: &str, prompt: &str) -> Result<Vec<u8>> {
    if let Some(f) = file {
        let s = std::fs::read(f).with_context(|| format!("reading passphrase file {}", f.display()))?;
        let s = s.strip_suffix(b"\n").unwrap_or(&s).to_vec();
        if s.is_empty() {
            bail!("passphrase file {} is empty", f.display());
        }
        return Ok(s);
    }
    if let Ok(v) = std::env::var(env) {
        if v.is_empty() {
            bail!("${env} is set but empty");
        }
        return Ok(v.into_bytes());
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(prompt).context("reading passphrase")?;
        return Ok(p.into_bytes());
    }
    Err(anyhow::Error::new(ferry_repo::Error::WrongPassword { slots: 0 })
        .context(format!("no passphrase: set ${env}, use --password-file, or run on a terminal")))
}

pub struct Ctx {
    pub repo: Arc<Repository>,
    pub index: Arc<Index>,
}

impl Ctx {
    /// Syncs the index with the bucket and returns the summaries of one volume (oldest first).
    pub async fn chain(&self, volume: &str) -> Result<Vec<BackupSummary>> {
        ferry_repo::validate_volume_name(volume)?;
        let report = self.index.sync(&self.repo).await.context("reading backups from the repository")?;
        for (r, e) in report.unreadable.iter().filter(|(r, _)| r.volume == volume) {
            eprintln!(
                "ferry: warning: backup {} of volume '{volume}' is unreadable and left out: {e}",
                r.backup_id()
            );
        }
        Ok(self.index.backups(Some(volume))?)
    }

    /// Resolves `spec` (backup ID or unique prefix, to-snapshot name, `latest`) within a volume.
    pub async fn resolve(&self, volume: &str, spec: Option<&str>) -> Result<(BackupRef, Manifest)> {
        let chain = self.chain(volume).await?;
        if chain.is_empty() {
            bail!(Refused(format!("volume '{volume}' has no backups in {}", self.repo.url())));
        }
        let found: Vec<&BackupSummary> = match spec {
            None | Some("latest") => chain.last().into_iter().collect(),
            Some(s) => {
                let by_id: Vec<_> = chain.iter().filter(|b| b.meta.backup_id.starts_with(s)).collect();
                if by_id.is_empty() {
                    chain.iter().filter(|b| b.meta.to_snap.as_deref() == Some(s)).collect()
                } else {
                    by_id
                }
            }
        };
        match found.as_slice() {
            [one] => {
                let m = self.repo.read_manifest(&one.backup).await?;
                Ok((one.backup.clone(), m))
            }
            [] => bail!(Refused(format!("volume '{volume}' has no backup '{}'", spec.unwrap_or("latest")))),
            many => bail!(Refused(format!(
                "'{}' matches {} backups of '{volume}'; give more of the ID",
                spec.unwrap_or(""),
                many.len()
            ))),
        }
    }
}

/// Parses sizes like 4194304, 4M, 4MiB, 1G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        u => return Err(format!("unknown size unit '{u}'")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A byte progress bar on stderr when it is a terminal (and not in --json mode).
pub fn progress_bar(total: Option<u64>, what: &str, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = if total.is_some() {
        "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} [{elapsed_precise}] {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(st) = indicatif::ProgressStyle::with_template(style) {
        pb.set_style(st);
    }
    pb.set_message(what.to_string());
    Some(pb)
}

/// Progress reporting for the pipelines: moves the bar, if there is one.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

pub fn progress_callback(pb: &Option<indicatif::ProgressBar>) -> Option<Progress> {
    pb.clone().map(|pb| std::sync::Arc::new(move |n| pb.set_position(n)) as Progress)
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
