//! ferry — carries Ceph RBD volumes to object storage in another datacenter and brings them
//! back. This is the binary's edge: argument parsing, configuration, output and exit codes,
//! one file per command (`cmd_*.rs`). The pipelines live in `ferry-engine`, the repository
//! in `ferry-repo`, the diff codec in `rbd-diff`, the Ceph driver in `ferry-ceph`.

// Doc comments of the argument structs are `--help` text (plain text, URLs included).
#![allow(rustdoc::bare_urls, rustdoc::invalid_html_tags)]

mod args;
mod cmd_audit;
mod cmd_backup;
mod cmd_doctor;
mod cmd_forget;
mod cmd_gc;
mod cmd_index;
mod cmd_init;
mod cmd_key;
mod cmd_ls;
mod cmd_protect;
mod cmd_prune;
mod cmd_replay;
mod cmd_restore;
mod cmd_serve;
mod cmd_status;
mod cmd_sync;
mod cmd_worker;
mod config;
mod errors;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::args::{CephArgs, RepoArgs};

const AFTER_HELP: &str = "\
Environment:
  FERRY_CONFIG          TOML file with defaults (instead of --config)
  FERRY_REPO            repository URL (instead of --repo)
  FERRY_PASSWORD        repository passphrase (or --password-file / FERRY_PASSWORD_FILE, or a prompt)
  FERRY_INDEX_DIR       local index cache directory
  FERRY_LIMIT_UPLOAD    upload bandwidth limit, bytes per second (instead of --limit-upload)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT, AWS_REGION, AWS_ALLOW_HTTP
                        S3 / Ceph RGW access (standard AWS variables)
  CEPH_CONF, CEPH_KEYRING, CEPH_ARGS, FERRY_CEPH_ID
                        the source Ceph cluster (rbd:POOL/IMAGE sources and targets)

Exit codes:
  0 success   1 failure (I/O, network, invalid input)   2 usage
  3 integrity problem (tampered, corrupt or missing data; audit findings)
  4 wrong or missing passphrase   5 refused (broken chain, existing target, held lease)";

/// Back up Ceph RBD volumes to object storage, restore them, and audit the backups.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    ceph: CephArgs,
    /// TOML file with defaults for repository, S3 and Ceph settings (see config/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// More log output (-v, -vv); logs go to stderr and never contain secrets.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log format: text, or json (one object per line, for log collectors).
    #[arg(long, env = "FERRY_LOG_FORMAT", global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository (config and a first key slot).
    Init(cmd_init::InitArgs),
    /// Back up an RBD image (rbd:POOL/IMAGE) or an export-diff stream (--diff FILE|-).
    Backup(cmd_backup::BackupArgs),
    /// Rebuild a backup as a full volume: raw file, block device, stdout, RBD image, or an
    /// import-diff stream.
    Restore(cmd_restore::RestoreArgs),
    /// Check the source cluster and the repository, and say precisely what is wrong.
    Doctor(cmd_doctor::DoctorArgs),
    /// List volumes and their backup chains.
    Ls(cmd_ls::LsArgs),
    /// Prove manifests authentic, chains continuous, chunks present (and optionally intact).
    Audit(cmd_audit::AuditArgs),
    /// Delete chosen backups (never a protected one); their chunks stay until GC.
    Forget(cmd_forget::ForgetArgs),
    /// Apply a retention policy to volumes and forget the backups it does not keep.
    Prune(cmd_prune::PruneArgs),
    /// Delete chunks no backup references (safe while backups, prunes and other GCs run).
    Gc(cmd_gc::GcArgs),
    /// Protect a backup: it is never forgotten or pruned (the mark lives in the bucket).
    Protect(cmd_protect::ProtectArgs),
    /// Remove a backup's protection.
    Unprotect(cmd_protect::UnprotectArgs),
    /// Manage the passphrases (key slots) that open the repository.
    #[command(subcommand)]
    Key(cmd_key::KeyCommand),
    /// The local index cache.
    #[command(subcommand)]
    Index(cmd_index::IndexCommand),
    /// Run scheduled backups, retention, GC and restore drills from a configuration
    /// (--config FILE; see config/worker.toml), with /metrics and /healthz.
    Worker(cmd_worker::WorkerArgs),
    /// Show what the worker of a configuration last did: per volume the last backup, the
    /// next run and the last error.
    Status(cmd_status::StatusArgs),
    /// Copy backups a second repository lacks (another bucket, region or provider), as
    /// ciphertext: the copy opens with the same passphrases; resumable.
    Sync(cmd_sync::SyncArgs),
    /// Keep a warm standby RBD image in this cluster current with a volume's newest backup:
    /// writes only what changed, from the bucket alone.
    Replay(cmd_replay::ReplayArgs),
    /// Serve a backup as a read-only raw image over HTTP with range requests (token in the
    /// path), without restoring it.
    Serve(cmd_serve::ServeArgs),
}

async fn run(cmd: Command, config: Option<std::path::PathBuf>, repo: RepoArgs, ceph: CephArgs) -> anyhow::Result<u8> {
    match cmd {
        Command::Worker(a) => cmd_worker::run(a, config, repo, &ceph).await,
        Command::Status(a) => cmd_status::run(a, config).await,
        Command::Init(a) => cmd_init::run(a, repo).await,
        Command::Backup(a) => cmd_backup::run(a, repo, &ceph).await,
        Command::Restore(a) => cmd_restore::run(a, repo, &ceph).await,
        Command::Doctor(a) => cmd_doctor::run(a, repo, &ceph).await,
        Command::Ls(a) => cmd_ls::run(a, repo).await,
        Command::Audit(a) => cmd_audit::run(a, repo, &ceph).await,
        Command::Forget(a) => cmd_forget::run(a, repo).await,
        Command::Prune(a) => cmd_prune::run(a, repo).await,
        Command::Gc(a) => cmd_gc::run(a, repo).await,
        Command::Protect(a) => cmd_protect::protect(a, repo).await,
        Command::Unprotect(a) => cmd_protect::unprotect(a, repo).await,
        Command::Key(a) => cmd_key::run(a, repo).await,
        Command::Index(a) => cmd_index::run(a, repo).await,
        Command::Sync(a) => cmd_sync::run(a, repo).await,
        Command::Replay(a) => cmd_replay::run(a, repo, &ceph).await,
        Command::Serve(a) => cmd_serve::run(a, repo).await,
    }
}

/// Large block buffers come and go on many threads. glibc's default of one arena per thread
/// keeps freed 4 MiB buffers resident in each (peak RSS 170-210 MB on a 2 GiB backup or
/// restore); mmap-ing every buffer instead costs seconds of page faults. Two arenas keep RSS
/// near 120 MB with the defaults' system time. FERRY_MALLOC_DEFAULTS=1 turns this off for
/// comparison.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("FERRY_MALLOC_DEFAULTS").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The process holds the repository's master key and the passphrase: no core dump may carry
/// them to disk (RLIMIT_CORE 0), and no other process of the same user may read its memory
/// (not dumpable: ptrace and /proc/PID/mem are refused). FERRY_ALLOW_CORE_DUMPS=1 keeps both
/// for debugging.
fn harden_process() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("FERRY_ALLOW_CORE_DUMPS").is_none() {
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: setrlimit and prctl only change this process's own limits and flags.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
    }
}

fn main() -> ExitCode {
    harden_process();
    tune_allocator();
    // Everything ferry creates — the index, a file:// repository's objects, restored
    // volumes — holds data or metadata of the volumes: private to its owner.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let mut cli = Cli::parse();
    // The worker's log is its output: info by default.
    let quiet = if matches!(cli.command, Command::Worker(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = match cli.verbose {
        0 => quiet,
        1 => "info,ferry=debug",
        _ => "debug",
    };
    let env_filter =
        tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(env_filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::fmt()
            .with_env_filter(env_filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_path = cli.config.clone();
    if let Some(path) = &cli.config {
        match config::ConfigFile::load(path) {
            Ok(c) => c.apply(&mut cli.repo, &mut cli.ceph),
            Err(e) => return errors::report(&e),
        }
    }
    match rt.block_on(run(cli.command, config_path, cli.repo, cli.ceph)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => errors::report(&e),
    }
}
