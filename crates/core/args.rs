//! Options shared by every command: where the repository is and how to open it, how to
//! reach the Ceph cluster. Turns them into an [`Engine`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_engine::{Ceph, Engine, Error as EngineError, ErrorKind, Observer};
use ferry_repo::{open_store, Index, Repository, Store, StoreOptions};
use zeroize::Zeroizing;

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
    /// Keep retrying a store request that fails transiently (5xx, resets, timeouts) for up
    /// to this many seconds, with exponential backoff, before giving up (exit 1).
    #[arg(long, env = "FERRY_STORE_DEADLINE", global = true, value_name = "SECONDS")]
    pub store_deadline: Option<u64>,
    /// Upload bandwidth limit shared by all connections, bytes per second (e.g. 50M).
    #[arg(long, env = "FERRY_LIMIT_UPLOAD", global = true, value_parser = parse_rate, value_name = "BYTES_PER_S")]
    pub limit_upload: Option<u64>,
    /// How often a running backup looks for a garbage collection to acknowledge, in seconds
    /// (default 10; a GC waits --ack-timeout for the answer).
    #[arg(long, env = "FERRY_GC_WATCH", global = true, value_name = "SECONDS", value_parser = parse_seconds)]
    pub gc_watch: Option<std::time::Duration>,
}

pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1e7 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a number of seconds greater than 0")),
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match crate::output::parse_size(s)? {
        0 => Err("an upload limit of 0 would stop every upload; omit the option for no limit".into()),
        n => Ok(n),
    }
}

/// Environment variable that turns on the store fault injector (tests only; see
/// `ferry_repo::FaultPlan` for the syntax). Naming it is the explicit opt-in.
pub const FAULTS_ENV: &str = "FERRY_TEST_FAULTS";

impl RepoArgs {
    pub fn url(&self) -> Result<&str> {
        match &self.repo {
            Some(u) => Ok(u),
            None => bail!("no repository given: use --repo URL or set FERRY_REPO"),
        }
    }

    pub fn store(&self) -> Result<Store> {
        self.store_at(self.url()?)
    }

    /// A store at another URL with the same options (a sync's destination).
    pub fn store_at(&self, url: &str) -> Result<Store> {
        let faults = match std::env::var(FAULTS_ENV) {
            Ok(plan) if !plan.trim().is_empty() => {
                let plan = ferry_repo::FaultPlan::parse(&plan).map_err(|e| anyhow::anyhow!("${FAULTS_ENV}: {e}"))?;
                eprintln!("ferry: warning: ${FAULTS_ENV} is set: injecting store faults ({plan})");
                Some(plan)
            }
            _ => None,
        };
        let opts = StoreOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            allow_http: self.s3_allow_http.then_some(true),
            max_retries: self.store_retries,
            upload_limit: self.limit_upload,
            faults,
            ..Default::default()
        };
        Ok(open_store(url, &opts)?)
    }

    pub fn passphrase(&self) -> Result<Zeroizing<Vec<u8>>> {
        passphrase_from(self.password_file.as_deref(), "FERRY_PASSWORD", "Repository passphrase: ")
    }

    /// Opens the repository with the passphrase.
    pub async fn open_repository(&self) -> Result<Repository> {
        let store = self.store()?;
        let pass = self.passphrase()?;
        Repository::open(store, &pass)
            .await
            .with_context(|| format!("opening repository {}", self.url().unwrap_or("?")))
    }

    /// Opens the repository and the index (not yet synced) as an engine.
    pub async fn engine(&self, observer: Arc<dyn Observer>) -> Result<Engine> {
        let mut repo = self.open_repository().await?;
        if let Some(secs) = self.store_deadline {
            repo = repo.with_retry(ferry_repo::RetryPolicy {
                deadline: std::time::Duration::from_secs(secs),
                ..Default::default()
            });
        }
        let index = if self.no_index {
            Index::temporary()?
        } else {
            let dir = self.index_dir.clone().unwrap_or_else(default_index_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating index directory {}", dir.display()))?;
            match Index::open_or_rebuild(&dir, repo.id()) {
                Ok((i, rebuilt)) => {
                    if let Some(why) = rebuilt {
                        eprintln!("ferry: warning: {why}");
                    }
                    i
                }
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
        let mut session = ferry_repo::SessionOptions::default();
        if let Some(d) = self.gc_watch {
            session.poll = d;
        }
        Ok(Engine::new(repo, index).with_observer(observer).with_session_options(session))
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
pub fn passphrase_from(file: Option<&std::path::Path>, env: &str, prompt: &str) -> Result<Zeroizing<Vec<u8>>> {
    if let Some(f) = file {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(f).with_context(|| format!("reading passphrase file {}", f.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            return Err(EngineError::new(
                ErrorKind::Auth,
                format!(
                    "passphrase file {} can be read by others (mode {:o}); `chmod 600` it",
                    f.display(),
                    md.permissions().mode() & 0o777
                ),
                None,
            )
            .into());
        }
        let s = Zeroizing::new(std::fs::read(f).with_context(|| format!("reading passphrase file {}", f.display()))?);
        let s = Zeroizing::new(s.strip_suffix(b"\n").unwrap_or(&s).to_vec());
        if s.is_empty() {
            bail!("passphrase file {} is empty", f.display());
        }
        return Ok(s);
    }
    if let Ok(v) = std::env::var(env) {
        if v.is_empty() {
            bail!("${env} is set but empty");
        }
        return Ok(Zeroizing::new(v.into_bytes()));
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(prompt).context("reading passphrase")?;
        return Ok(Zeroizing::new(p.into_bytes()));
    }
    Err(EngineError::new(
        ErrorKind::Auth,
        format!("no passphrase: set ${env}, use --password-file, or run on a terminal"),
        None,
    )
    .into())
}

/// How to reach the Ceph cluster (defaults: $CEPH_ARGS / $CEPH_CONF, /etc/ceph, client.admin).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Ceph options")]
pub struct CephArgs {
    /// ceph.conf of the cluster.
    #[arg(long, env = "CEPH_CONF", global = true)]
    pub ceph_conf: Option<PathBuf>,
    /// Keyring with the client's key.
    #[arg(long, env = "CEPH_KEYRING", global = true)]
    pub ceph_keyring: Option<PathBuf>,
    /// Ceph client id (the part after "client."), default admin.
    #[arg(long, env = "FERRY_CEPH_ID", global = true)]
    pub ceph_id: Option<String>,
    /// The rbd program to run (default: rbd on PATH).
    #[arg(long, env = "FERRY_RBD_PROGRAM", global = true, hide = true)]
    pub rbd_program: Option<PathBuf>,
}

impl CephArgs {
    pub fn ceph(&self) -> Ceph {
        Ceph {
            config: ferry_ceph::CephConfig {
                conf: self.ceph_conf.clone(),
                keyring: self.ceph_keyring.clone(),
                client_id: self.ceph_id.clone(),
            },
            rbd_program: self.rbd_program.clone(),
        }
    }
}
