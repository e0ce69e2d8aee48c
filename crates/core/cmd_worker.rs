//! `ferry worker --config FILE`: scheduled backups, retention, GC, drills and metrics
//! (`ferry_worker`); `--check` prints the plan, `--once` runs every selection now and exits.
//! Signals: SIGTERM/SIGINT stop (running backups get `worker.stop_timeout`), SIGHUP reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::{Event, Observer};
use ferry_worker::{Control, WorkerConfig};

use crate::args::{CephArgs, RepoArgs};
use crate::errors::exit;
use crate::output::print_json;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Check the configuration, open the repository, resolve every selection against its
    /// cluster and print the plan (volumes, next runs); start nothing.
    #[arg(long, conflicts_with = "once")]
    check: bool,
    /// Run every selection once now (backup, retention, drills) and exit: 0 when every volume
    /// was backed up, 1 otherwise. For cron users and tests.
    #[arg(long)]
    once: bool,
    /// Print --check and --once results as JSON.
    #[arg(long)]
    json: bool,
}

/// Engine warnings go to the log (a daemon has no terminal).
struct LogObserver;

impl Observer for LogObserver {
    fn event(&self, e: Event<'_>) {
        if let Event::Warning { message } = e {
            tracing::warn!("{message}");
        }
    }
}

fn load(path: &Path, ceph: &CephArgs) -> Result<WorkerConfig, ferry_worker::ConfigError> {
    let mut cfg = WorkerConfig::load(path)?;
    // The default cluster falls back to the flags and CEPH_* variables; every cluster uses
    // the rbd program given on the command line (if any).
    for (name, c) in cfg.clusters.iter_mut() {
        if name == "default" {
            c.config.conf = c.config.conf.take().or(ceph.ceph_conf.clone());
            c.config.keyring = c.config.keyring.take().or(ceph.ceph_keyring.clone());
            c.config.client_id = c.config.client_id.take().or(ceph.ceph_id.clone());
        }
        c.rbd_program = ceph.rbd_program.clone();
    }
    Ok(cfg)
}

pub async fn run(a: WorkerArgs, config: Option<PathBuf>, mut r: RepoArgs, ceph: &CephArgs) -> Result<u8> {
    let Some(path) = config else {
        eprintln!("ferry: error: ferry worker needs its configuration: --config FILE (or FERRY_CONFIG); see config/worker.toml");
        return Ok(exit::USAGE);
    };
    let cfg = match load(&path, ceph) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return Ok(exit::USAGE);
        }
    };
    if r.repo.is_none() {
        eprintln!(
            "ferry: error: configuration {}: repository.url: missing (or give --repo / FERRY_REPO)",
            path.display()
        );
        return Ok(exit::USAGE);
    }
    if let Some(f) = &r.password_file {
        if let Err(e) = std::fs::File::open(f) {
            eprintln!(
                "ferry: error: configuration {}: repository.password_file: {} cannot be read: {e}",
                path.display(),
                f.display()
            );
            return Ok(exit::USAGE);
        }
    }
    // Bandwidth windows need a limiter from the start; the worker sets its rate at once.
    if cfg.worker.bandwidth.is_limited() && r.limit_upload.is_none() {
        r.limit_upload = Some(u64::MAX);
    }
    let engine = r.engine(Arc::new(LogObserver)).await?;
    let worker = ferry_worker::Worker::new(engine, cfg.clone());

    if a.check {
        let plan = ferry_worker::plan(&cfg).await;
        if a.json {
            print_json(&plan)?;
        } else {
            println!("configuration {} is valid; repository {} opens", path.display(), r.url()?);
            println!("{:<40} {:<16} {:<32} NEXT RUN", "VOLUME", "SELECTION", "IMAGE");
            for v in &plan.volumes {
                let next = v
                    .next_run
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S %Z").to_string())
                    .unwrap_or("-".into());
                println!("{:<40} {:<16} {:<32} {next}", v.volume, v.selection, v.image);
            }
            for st in &cfg.standbys {
                println!(
                    "standby rbd:{}/{} (cluster {}) follows {}, next replay {}",
                    st.pool,
                    st.image,
                    st.cluster,
                    st.volume,
                    ferry_worker::next_tick(&st.schedule, chrono::Local::now())
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S %Z").to_string())
                        .unwrap_or("-".into())
                );
            }
            if let Some(t) = plan.gc_next_run {
                println!("garbage collection next runs {}", t.format("%Y-%m-%d %H:%M:%S %Z"));
            }
            for p in &plan.problems {
                println!("problem: {p}");
            }
        }
        return Ok(if plan.problems.is_empty() { exit::OK } else { exit::FAILURE });
    }

    if a.once {
        let report = worker.run_once().await;
        if a.json {
            print_json(&report)?;
        } else {
            for (volume, (res, err)) in &report.volumes {
                match err {
                    Some(e) => println!("{volume}: {} — {e}", res.as_str()),
                    None => println!("{volume}: {}", res.as_str()),
                }
            }
            for (standby, (res, err)) in &report.standbys {
                match err {
                    Some(e) => println!("standby {standby}: {} — {e}", res.as_str()),
                    None => println!("standby {standby}: {}", res.as_str()),
                }
            }
            for p in &report.problems {
                println!("problem: {p}");
            }
        }
        return Ok(if report.ok() { exit::OK } else { exit::FAILURE });
    }

    // The daemon.
    if let Some(addr) = cfg.worker.metrics {
        let (bound, _task) = ferry_worker::http::serve(addr, worker.clone())
            .await
            .with_context(|| format!("serving metrics on {addr} (worker.metrics)"))?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let shutdown = ferry_engine::CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let (shutdown, path, ceph) = (shutdown.clone(), path.clone(), ceph.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::warn!("SIGTERM: stopping"); shutdown.cancel(); }
                    _ = int.recv() => { tracing::warn!("SIGINT: stopping"); shutdown.cancel(); }
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading {}", path.display());
                        let _ = reload_tx.send(load(&path, &ceph));
                    }
                }
            }
        });
    }
    tracing::info!(
        "ferry worker started: {} selection(s), repository {}, state in {}",
        cfg.selections.len(),
        r.url()?,
        cfg.worker.state_dir.display()
    );
    worker
        .run(Control {
            shutdown,
            reload: reload_rx,
        })
        .await;
    tracing::info!("ferry worker stopped");
    Ok(exit::OK)
}
