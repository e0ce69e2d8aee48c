//! The subcommands: argument structs and what each does.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferry_repo::{InitOptions, KdfParams, Manifest, Repository, Source};
use serde::Serialize;

use crate::common::{human_bytes, parse_size, passphrase_from, print_json, progress_bar, progress_callback, RepoArgs};
use crate::errors::{exit, IntegrityFailure, Refused};
use crate::ingest::{ingest, IngestParams};
use crate::rbd::{backup_rbd, restore_rbd, CephArgs, RbdBackupOptions, RbdSpec};
use crate::restore::{restore_to_file, restore_to_stream, RestoreOptions, RestoreReport, StreamFormat};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository (config and a first key slot).
    Init(InitArgs),
    /// Back up an RBD image (rbd:POOL/IMAGE) or an export-diff stream (--diff FILE|-).
    Backup(BackupArgs),
    /// Rebuild a backup as a full volume: raw file, block device, stdout, or an import-diff stream.
    Restore(RestoreArgs),
    /// Check the source cluster and the repository, and say precisely what is wrong.
    Doctor(crate::doctor::DoctorArgs),
    /// List volumes and their backup chains.
    Ls(LsArgs),
    /// Prove chains complete, manifests authentic, chunks present (and optionally intact).
    Audit(crate::audit::AuditArgs),
    /// Manage the passphrases (key slots) that open the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The local index cache.
    #[command(subcommand)]
    Index(IndexCommand),
}

pub async fn run(cmd: Command, repo: RepoArgs, ceph: CephArgs) -> Result<u8> {
    match cmd {
        Command::Init(a) => init(a, repo).await,
        Command::Backup(a) => backup(a, repo, &ceph).await,
        Command::Restore(a) => restore(a, repo, &ceph).await,
        Command::Doctor(a) => crate::doctor::doctor(a, repo, &ceph).await,
        Command::Ls(a) => ls(a, repo).await,
        Command::Audit(a) => crate::audit::audit(a, repo).await,
        Command::Key(a) => key(a, repo).await,
        Command::Index(a) => index(a, repo).await,
    }
}

// ---------------------------------------------------------------- init

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Default block size of new volumes (RBD's object size, 4 MiB, is the best choice).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    block_size: u64,
    /// zstd level for chunks (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    /// A label for the first key slot (who or what holds this passphrase).
    #[arg(long, default_value = "initial")]
    label: String,
    #[arg(long)]
    json: bool,
}

async fn init(a: InitArgs, r: RepoArgs) -> Result<u8> {
    let store = r.store()?;
    let pass = r.passphrase()?;
    let opts = InitOptions {
        block_size: a.block_size,
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

// ---------------------------------------------------------------- backup

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// rbd:POOL/IMAGE: snapshot the image, stream `rbd export-diff --whole-object` from the last
    /// backup's snapshot, commit, then remove older ferry-* snapshots.
    source: Option<String>,
    /// Volume name the backup belongs to (letters, digits, '.', '_', '-'); for rbd:POOL/IMAGE
    /// the default is POOL.IMAGE.
    #[arg(long)]
    volume: Option<String>,
    /// Back up an export-diff stream instead: a file, or '-' for stdin
    /// (e.g. `rbd export-diff ... - | ferry backup --volume V --diff -`).
    #[arg(long, conflicts_with = "source")]
    diff: Option<PathBuf>,
    /// rbd source: make a full backup even if the base snapshot exists.
    #[arg(long)]
    full: bool,
    /// rbd source: lease duration of the per-image lock (renewed while the backup runs).
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    lease_seconds: u64,
    /// rbd source: after an incremental, re-read this many blocks the diff called unchanged
    /// from the new snapshot and check them against the parent backup; on a mismatch the
    /// incremental is discarded and a full backup taken (0 disables).
    #[arg(long, default_value_t = 8, value_name = "BLOCKS")]
    verify_blocks: usize,
    /// Build on this backup (ID or prefix) instead of the volume's newest one.
    #[arg(long)]
    parent: Option<String>,
    /// Block size of a new volume (default: the repository's); a chain keeps its block size.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Labels to record in the manifest, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Blocks in flight (hashing, compressing, uploading).
    #[arg(long, default_value_t = default_jobs())]
    jobs: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get() * 3).unwrap_or(6).clamp(4, 16)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

#[derive(Serialize)]
struct BackupOutput<'a> {
    volume: &'a str,
    backup_id: &'a str,
    object: String,
    kind: &'a str,
    from_snap: &'a Option<String>,
    to_snap: &'a Option<String>,
    parent: &'a Option<String>,
    image_size: u64,
    block_size: u64,
    stats: &'a ferry_repo::BackupStats,
    throughput_mib_s: f64,
}

fn backup_output<'a>(r: &ferry_repo::BackupRef, m: &'a Manifest) -> BackupOutput<'a> {
    let s = &m.meta.stats;
    let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
    let mib_s = s.stream_bytes as f64 / (1 << 20) as f64 / secs;
    let kind = if m.meta.from_snap.is_some() { "incremental" } else { "full" };
    BackupOutput {
        volume: &m.meta.volume,
        backup_id: &m.meta.backup_id,
        object: r.key(),
        kind,
        from_snap: &m.meta.from_snap,
        to_snap: &m.meta.to_snap,
        parent: &m.meta.parent,
        image_size: m.meta.image_size,
        block_size: m.meta.block_size,
        stats: s,
        throughput_mib_s: (mib_s * 10.0).round() / 10.0,
    }
}

pub fn print_backup_summary(r: &ferry_repo::BackupRef, m: &Manifest, json: bool) -> Result<()> {
    if json {
        return print_json(&backup_output(r, m));
    }
    let s = &m.meta.stats;
    let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
    let mib_s = s.stream_bytes as f64 / (1 << 20) as f64 / secs;
    let kind = if m.meta.from_snap.is_some() { "incremental" } else { "full" };
    println!(
        "backup {} of volume '{}' committed ({kind}: {} -> {})",
        m.meta.backup_id,
        m.meta.volume,
        m.meta.from_snap.as_deref().unwrap_or("(start)"),
        m.meta.to_snap.as_deref().unwrap_or("(head)")
    );
    println!(
        "  image     {} in {} blocks of {}",
        human_bytes(m.meta.image_size),
        m.blocks.len(),
        human_bytes(m.meta.block_size)
    );
    println!(
        "  read      {} of diff stream ({} data, {} zeroed)",
        human_bytes(s.stream_bytes),
        human_bytes(s.data_bytes),
        human_bytes(s.zeroed_bytes)
    );
    println!(
        "  blocks    {} changed: {} new, {} deduplicated ({} found in repository), {} zero; {} completed from parent",
        s.blocks_changed, s.blocks_new, s.blocks_dedup, s.blocks_found_in_repo, s.blocks_zero, s.blocks_partial
    );
    println!(
        "  stored    {} uploaded for {} of new data",
        human_bytes(s.bytes_uploaded),
        human_bytes(s.bytes_new)
    );
    println!("  time      {secs:.2} s, {mib_s:.1} MiB/s");
    Ok(())
}

async fn backup(a: BackupArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    if let Some(src) = &a.source {
        let spec = RbdSpec::parse(src).ok_or_else(|| anyhow::anyhow!("'{src}' is not a source: use rbd:POOL/IMAGE (or --diff FILE)"))?;
        let ctx = r.open().await?;
        let opts = RbdBackupOptions {
            volume: a.volume.clone(),
            full: a.full,
            jobs: a.jobs,
            labels: a.labels.into_iter().collect(),
            lease: (a.lease_seconds > 0).then(|| std::time::Duration::from_secs(a.lease_seconds)),
            quiet: a.json,
            verify_blocks: a.verify_blocks,
        };
        let (br, m, notes) = backup_rbd(&ctx, ceph, &spec, opts)
            .await
            .with_context(|| format!("backup of rbd:{spec} failed; nothing was committed"))?;
        if a.json {
            let mut v = serde_json::to_value(backup_output(&br, &m))?;
            v["rbd"] = serde_json::to_value(&notes)?;
            print_json(&v)?;
        } else {
            if let Some(why) = &notes.full_reason {
                println!("full backup: {why}");
            }
            print_backup_summary(&br, &m, false)?;
            println!(
                "  snapshot  {spec}@{} is the base of the next backup; removed: {}",
                notes.snapshot,
                if notes.removed_snapshots.is_empty() {
                    "-".to_string()
                } else {
                    notes.removed_snapshots.join(", ")
                }
            );
        }
        return Ok(exit::OK);
    }
    let (Some(volume), Some(diff)) = (a.volume.clone(), a.diff.clone()) else {
        bail!("give rbd:POOL/IMAGE, or --volume NAME with --diff FILE|-");
    };
    ferry_repo::validate_volume_name(&volume)?;
    let ctx = r.open().await?;
    let chain = ctx.chain(&volume).await?;
    let parent = match &a.parent {
        Some(spec) => Some(ctx.resolve(&volume, Some(spec)).await?),
        None => match chain.last() {
            Some(s) => Some((s.backup.clone(), ctx.repo.read_manifest(&s.backup).await?)),
            None => None,
        },
    };
    let (reader, total): (Box<dyn Read + Send>, Option<u64>) = if diff.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(&diff).with_context(|| format!("opening diff stream {}", diff.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let pb = progress_bar(total, "backup", a.json);
    let progress = progress_callback(&pb);
    let params = IngestParams {
        volume: volume.clone(),
        block_size: a.block_size.unwrap_or(ctx.repo.config().block_size),
        parent,
        source: Source {
            kind: "diff-stream".into(),
            ..Default::default()
        },
        zstd_level: ctx.repo.config().zstd_level,
        jobs: a.jobs,
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        progress,
        expect_to_snap: None,
        verify: None,
    };
    let result = ingest(ctx.repo.clone(), ctx.index.clone(), reader, |_, _| Ok(()), params).await;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let (br, m) = result.with_context(|| format!("backup of volume '{}' failed; nothing was committed", volume))?;
    print_backup_summary(&br, &m, a.json)?;
    Ok(exit::OK)
}

// ---------------------------------------------------------------- restore

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    /// The volume's bytes.
    Raw,
    /// An `rbd export-diff` v1 stream, for `rbd import-diff - POOL/IMAGE`.
    ImportDiff,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// VOLUME or VOLUME@BACKUP (backup ID or prefix, snapshot name, or 'latest').
    target: String,
    /// Where to write: a file (sparse), a block device, or '-' for stdout.
    #[arg(long)]
    to: PathBuf,
    #[arg(long, value_enum, default_value_t = OutFormat::Raw)]
    format: OutFormat,
    /// With --format import-diff: name the to-snapshot in the stream (import-diff then creates it).
    #[arg(long)]
    snap_name: Option<String>,
    /// Overwrite an existing non-empty file.
    #[arg(long)]
    force: bool,
    /// Write every block that can be read, report the rest (exit code 3), instead of failing.
    #[arg(long)]
    best_effort: bool,
    /// Chunks in flight.
    #[arg(long, default_value_t = default_jobs())]
    jobs: usize,
    #[arg(long)]
    json: bool,
}

fn split_target(t: &str) -> (&str, Option<&str>) {
    match t.split_once('@') {
        Some((v, b)) => (v, Some(b)),
        None => (t, None),
    }
}

async fn restore(a: RestoreArgs, r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let (volume, spec) = split_target(&a.target);
    let ctx = r.open().await?;
    let (br, manifest) = ctx.resolve(volume, spec).await?;
    let manifest = Arc::new(manifest);
    let to_stdout = a.to.as_os_str() == "-";
    let pb = progress_bar(Some(manifest.meta.image_size), "restore", a.json);
    let progress = progress_callback(&pb);
    let mut opts = RestoreOptions {
        jobs: a.jobs,
        best_effort: a.best_effort,
        write_holes: false,
        progress,
    };
    let mut created_file: Option<PathBuf> = None;
    let rbd_target = a.to.to_str().and_then(RbdSpec::parse);
    let result = if let Some(spec) = &rbd_target {
        let snap = a.snap_name.clone().or_else(|| manifest.meta.to_snap.clone());
        restore_rbd(ctx.repo.clone(), manifest.clone(), ceph, spec, a.force, snap, &opts).await
    } else if to_stdout || a.format == OutFormat::ImportDiff {
        let fmt = match a.format {
            OutFormat::Raw => StreamFormat::Raw,
            OutFormat::ImportDiff => StreamFormat::ImportDiff,
        };
        let out: Box<dyn std::io::Write + Send> = if to_stdout {
            Box::new(std::io::stdout())
        } else {
            Box::new(open_target(&a.to, a.force, &mut created_file)?.0)
        };
        restore_to_stream(ctx.repo.clone(), manifest.clone(), out, fmt, a.snap_name.clone(), &opts)
            .await
            .map(|(rep, _)| rep)
    } else {
        let (file, is_dev) = open_target(&a.to, a.force, &mut created_file)?;
        if is_dev {
            opts.write_holes = true;
            let dev_len = block_device_size(&file)?;
            if dev_len < manifest.meta.image_size {
                bail!(Refused(format!(
                    "block device {} holds {} bytes, the backup needs {}",
                    a.to.display(),
                    dev_len,
                    manifest.meta.image_size
                )));
            }
        } else {
            // Sparse: size first, then write only the blocks that hold data.
            file.set_len(manifest.meta.image_size)
                .with_context(|| format!("sizing {}", a.to.display()))?;
        }
        let file = Arc::new(file);
        let res = restore_to_file(ctx.repo.clone(), manifest.clone(), file.clone(), &opts).await;
        if res.is_ok() {
            file.sync_all().with_context(|| format!("syncing {}", a.to.display()))?;
        }
        res
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = match result {
        Ok(rep) => rep,
        Err(e) => {
            if let (Some(f), false) = (&created_file, a.best_effort) {
                let _ = std::fs::remove_file(f);
            }
            return Err(e.context(format!("restore of {} failed", a.target)));
        }
    };
    print_restore(&br, &manifest, &report, &a)?;
    if !report.failures.is_empty() {
        if let (Some(f), false) = (&created_file, a.best_effort) {
            let _ = std::fs::remove_file(f);
        }
        if rbd_target.is_some() && !a.best_effort {
            // restore_rbd already removed an image it created.
        }
        let what = if a.best_effort {
            "written with these blocks missing"
        } else {
            "failed; the partial output was removed"
        };
        let list: Vec<String> = report.failures.iter().take(20).map(|f| format!("  {f}")).collect();
        bail!(IntegrityFailure(format!(
            "restore of {} {what}: {} bad block(s):\n{}{}",
            a.target,
            report.failures.len(),
            list.join("\n"),
            if report.failures.len() > 20 { "\n  ..." } else { "" }
        )));
    }
    Ok(exit::OK)
}

fn print_restore(br: &ferry_repo::BackupRef, m: &Manifest, rep: &RestoreReport, a: &RestoreArgs) -> Result<()> {
    if a.json {
        #[derive(Serialize)]
        struct Out<'a> {
            volume: &'a str,
            backup_id: &'a str,
            to: String,
            format: String,
            report: &'a RestoreReport,
        }
        return print_json(&Out {
            volume: &br.volume,
            backup_id: &m.meta.backup_id,
            to: a.to.display().to_string(),
            format: format!("{:?}", a.format).to_lowercase(),
            report: rep,
        });
    }
    // Human output goes to stderr when the data goes to stdout.
    let secs = (rep.duration_ms as f64 / 1000.0).max(0.001);
    let line = format!(
        "restored {}@{} ({}) to {}: {} blocks written, {} holes, {} in {:.2} s ({:.1} MiB/s)",
        br.volume,
        m.meta.backup_id,
        m.meta.to_snap.as_deref().unwrap_or("-"),
        a.to.display(),
        rep.blocks_written,
        rep.blocks_hole,
        human_bytes(rep.image_size),
        secs,
        rep.image_size as f64 / (1 << 20) as f64 / secs
    );
    if a.to.as_os_str() == "-" {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Opens a restore target; returns the file and whether it is a block device.
fn open_target(path: &std::path::Path, force: bool, created: &mut Option<PathBuf>) -> Result<(std::fs::File, bool)> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening block device {}", path.display()))?;
            Ok((f, true))
        }
        Ok(md) if md.is_file() && md.len() > 0 && !force => bail!(Refused(format!(
            "{} exists and is not empty; use --force to overwrite it",
            path.display()
        ))),
        Ok(md) if md.is_dir() => bail!(Refused(format!("{} is a directory", path.display()))),
        Ok(_) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok((f, false))
        }
        Err(_) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            *created = Some(path.to_path_buf());
            Ok((f, false))
        }
    }
}

fn block_device_size(f: &std::fs::File) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    Ok(f.seek(SeekFrom::End(0))?)
}

// ---------------------------------------------------------------- ls

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only this volume.
    volume: Option<String>,
    #[arg(long)]
    json: bool,
}

async fn ls(a: LsArgs, r: RepoArgs) -> Result<u8> {
    let ctx = r.open().await?;
    let sync = ctx.index.sync(&ctx.repo).await.context("reading backups from the repository")?;
    if let Some(v) = &a.volume {
        ferry_repo::validate_volume_name(v)?;
    }
    let unreadable: Vec<_> = sync
        .unreadable
        .iter()
        .filter(|(r, _)| a.volume.as_deref().is_none_or(|v| v == r.volume))
        .collect();
    let backups = ctx.index.backups(a.volume.as_deref())?;
    // Listed last so the good backups are still shown; exit 3 says something is damaged.
    let damaged = || -> Result<u8> {
        if unreadable.is_empty() {
            return Ok(exit::OK);
        }
        for (r, e) in &unreadable {
            eprintln!("ferry: backup {} of volume '{}' is unreadable: {e}", r.backup_id(), r.volume);
        }
        bail!(IntegrityFailure(format!(
            "{} backup manifest(s) are damaged; run `ferry audit`",
            unreadable.len()
        )))
    };
    if a.json {
        #[derive(Serialize)]
        struct Entry<'a> {
            volume: &'a str,
            backup_id: &'a str,
            object: String,
            created: String,
            kind: &'a str,
            parent: &'a Option<String>,
            from_snap: &'a Option<String>,
            to_snap: &'a Option<String>,
            image_size: u64,
            block_size: u64,
            blocks_with_data: u64,
            source: &'a Source,
            labels: &'a BTreeMap<String, String>,
            stats: &'a ferry_repo::BackupStats,
        }
        let out: Vec<_> = backups
            .iter()
            .map(|b| Entry {
                volume: &b.meta.volume,
                backup_id: &b.meta.backup_id,
                object: b.backup.key(),
                created: b.meta.created.to_rfc3339(),
                kind: if b.meta.from_snap.is_some() { "incremental" } else { "full" },
                parent: &b.meta.parent,
                from_snap: &b.meta.from_snap,
                to_snap: &b.meta.to_snap,
                image_size: b.meta.image_size,
                block_size: b.meta.block_size,
                blocks_with_data: b.chunk_blocks,
                source: &b.meta.source,
                labels: &b.meta.labels,
                stats: &b.meta.stats,
            })
            .collect();
        print_json(&out)?;
        return damaged();
    }
    if backups.is_empty() {
        println!(
            "no backups{}",
            a.volume.as_ref().map(|v| format!(" of volume '{v}'")).unwrap_or_default()
        );
        return damaged();
    }
    println!(
        "{:<24} {:<16} {:<20} {:<5} {:<30} {:>10} {:>10} {:>10}",
        "VOLUME", "BACKUP", "CREATED (UTC)", "KIND", "SNAPSHOTS (FROM -> TO)", "SIZE", "CHANGED", "UPLOADED"
    );
    for b in &backups {
        let snaps = format!(
            "{} -> {}",
            b.meta.from_snap.as_deref().unwrap_or("-"),
            b.meta.to_snap.as_deref().unwrap_or("-")
        );
        println!(
            "{:<24} {:<16} {:<20} {:<5} {:<30} {:>10} {:>10} {:>10}",
            b.meta.volume,
            b.meta.backup_id,
            b.meta.created.format("%Y-%m-%d %H:%M:%S"),
            if b.meta.from_snap.is_some() { "incr" } else { "full" },
            snaps,
            human_bytes(b.meta.image_size),
            human_bytes(b.meta.stats.blocks_changed * b.meta.block_size),
            human_bytes(b.meta.stats.bytes_uploaded)
        );
    }
    damaged()
}

// ---------------------------------------------------------------- key

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List key slots.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a passphrase (new one from $FERRY_NEW_PASSWORD, --new-password-file or a prompt).
    Add {
        #[arg(long, env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Remove a key slot by ID (never the last one).
    Remove { id: String },
    /// Change the passphrase: adds a slot for the new one, then removes the current one's slot.
    Passwd {
        #[arg(long, env = "FERRY_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
}

fn new_passphrase(file: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let p = passphrase_from(file, "FERRY_NEW_PASSWORD", "New passphrase: ")?;
    if file.is_none() && std::env::var_os("FERRY_NEW_PASSWORD").is_none() {
        let again = passphrase_from(None, "FERRY_NEW_PASSWORD", "Repeat new passphrase: ")?;
        if again != p {
            bail!(Refused("the passphrases differ".into()));
        }
    }
    Ok(p)
}

async fn key(cmd: KeyCommand, r: RepoArgs) -> Result<u8> {
    let store = r.store()?;
    let repo = Repository::open(store.clone(), &r.passphrase()?)
        .await
        .context("opening repository")?;
    match cmd {
        KeyCommand::List { json } => {
            let slots = Repository::read_key_slots(&store).await?;
            let current = repo.slot_for(&r.passphrase()?).await?;
            if json {
                #[derive(Serialize)]
                struct S<'a> {
                    id: &'a str,
                    created: String,
                    label: &'a str,
                    kdf: &'a KdfParams,
                    current: bool,
                }
                let out: Vec<_> = slots
                    .iter()
                    .map(|s| S {
                        id: &s.id,
                        created: s.created.to_rfc3339(),
                        label: &s.label,
                        kdf: &s.kdf,
                        current: current.as_deref() == Some(s.id.as_str()),
                    })
                    .collect();
                print_json(&out)?;
            } else {
                println!("{:<2}{:<18} {:<26} {:<24} KDF", "", "ID", "CREATED", "LABEL");
                for s in &slots {
                    println!(
                        "{:<2}{:<18} {:<26} {:<24} argon2id m={}KiB t={} p={}",
                        if current.as_deref() == Some(s.id.as_str()) { "*" } else { "" },
                        s.id,
                        s.created.format("%Y-%m-%d %H:%M:%S UTC"),
                        s.label,
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
            let old = repo
                .slot_for(&r.passphrase()?)
                .await?
                .context("the current passphrase opens no slot")?;
            let p = new_passphrase(new_password_file.as_deref())?;
            let id = repo.add_key_slot(&p, "passwd", KdfParams::argon2id_default()).await?;
            repo.remove_key_slot(&old).await?;
            println!("passphrase changed: key slot {old} replaced by {id}");
        }
    }
    Ok(exit::OK)
}

// ---------------------------------------------------------------- index

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Recreate the local index from the bucket.
    Rebuild {
        #[arg(long)]
        json: bool,
    },
}

async fn index(cmd: IndexCommand, r: RepoArgs) -> Result<u8> {
    let ctx = r.open().await?;
    match cmd {
        IndexCommand::Rebuild { json } => {
            ctx.index.clear()?;
            let rep = ctx.index.sync(&ctx.repo).await?;
            if json {
                print_json(&rep)?;
            } else {
                println!(
                    "index {} rebuilt: {} backups, {} known chunks",
                    ctx.index.path(),
                    rep.backups,
                    ctx.index.chunk_count()
                );
            }
        }
    }
    Ok(exit::OK)
}
