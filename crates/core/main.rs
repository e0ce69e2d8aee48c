//! ferry — carries Ceph RBD volumes to object storage in another datacenter and brings them
//! back. This is the binary's edge: argument parsing, output, exit codes. The pipelines live
//! in the modules below; the repository and the diff codec are crates of their own.

mod audit;
mod commands;
mod common;
mod config;
mod doctor;
mod errors;
mod ingest;
mod rbd;
mod restore;

use std::process::ExitCode;

use clap::Parser;

use crate::common::RepoArgs;

const AFTER_HELP: &str = "\
Environment:
  FERRY_CONFIG          TOML file with defaults (instead of --config)
  FERRY_REPO            repository URL (instead of --repo)
  FERRY_PASSWORD        repository passphrase (or --password-file / FERRY_PASSWORD_FILE, or a prompt)
  FERRY_INDEX_DIR       local index cache directory
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
    ceph: rbd::CephArgs,
    /// TOML file with defaults for repository, S3 and Ceph settings (see config/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// More log output (-v, -vv); logs go to stderr and never contain secrets.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: commands::Command,
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

fn main() -> ExitCode {
    tune_allocator();
    let mut cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info,ferry=debug",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &cli.config {
        match config::ConfigFile::load(path) {
            Ok(c) => c.apply(&mut cli.repo, &mut cli.ceph),
            Err(e) => return errors::report(&e),
        }
    }
    match rt.block_on(commands::run(cli.command, cli.repo, cli.ceph)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => errors::report(&e),
    }
}
