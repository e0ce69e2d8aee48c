//! `ferry status --config FILE`: what the worker of that configuration last knew — per
//! volume the last backup, the next run and the last error — from `status.json` in its state
//! directory. Needs neither the passphrase nor the bucket.

use std::path::PathBuf;

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::Args;
use ferry_worker::state::WorkerState;
use ferry_worker::WorkerConfig;

use crate::errors::exit;
use crate::output::print_json;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the state as JSON.
    #[arg(long)]
    json: bool,
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else { return "never".into() };
    let s = (now - t).num_seconds();
    let rel = match s {
        s if s < 0 => format!("in {}", span(-s)),
        s => format!("{} ago", span(s)),
    };
    format!("{} ({rel})", t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"))
}

fn span(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

pub async fn run(a: StatusArgs, config: Option<PathBuf>) -> Result<u8> {
    let Some(path) = config else {
        eprintln!("ferry: error: ferry status reads the worker's configuration: --config FILE (or FERRY_CONFIG)");
        return Ok(exit::USAGE);
    };
    let cfg = match WorkerConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return Ok(exit::USAGE);
        }
    };
    let dir = &cfg.worker.state_dir;
    let state = match WorkerState::load(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ferry: error: no worker state in {} ({e}): has `ferry worker --config {}` run on this machine?",
                dir.display(),
                path.display()
            );
            return Ok(exit::FAILURE);
        }
    };
    let running = alive(state.pid);
    if a.json {
        let mut v = serde_json::to_value(&state)?;
        v["worker_running"] = running.into();
        print_json(&v)?;
        return Ok(exit::OK);
    }
    let now = Utc::now();
    println!(
        "worker pid {} {} (state of {}), repository {}",
        state.pid,
        if running { "running" } else { "not running" },
        ago(state.updated, now),
        state.repository
    );
    let mut failing = 0;
    for (name, v) in state.volumes.iter().filter(|(_, v)| v.selected) {
        println!("{name}  ({}/{}, selection '{}')", v.pool, v.image, v.selection);
        println!(
            "  last backup  {}{}",
            ago(v.last_success, now),
            v.last_backup_id.as_deref().map(|i| format!(" {i}")).unwrap_or_default()
        );
        let result = match (v.running, v.last_result) {
            (true, _) => "running now".to_string(),
            (false, Some(r)) => format!("{} ({:.1} s)", r.as_str(), v.last_duration_seconds),
            (false, None) => "-".into(),
        };
        println!("  last run     {} — {result}", ago(v.last_attempt, now));
        println!("  next run     {}", ago(v.next_run, now));
        if let Some(e) = &v.last_error {
            failing += 1;
            println!("  last error   {e}");
        }
        if let Some(d) = &v.drill {
            println!(
                "  drill        {} — {} in {:.1} s{}",
                ago(Some(d.time), now),
                if d.ok { "restored" } else { "FAILED" },
                d.seconds,
                d.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
    }
    for (sel, problems) in &state.problems {
        for p in problems {
            println!("selection '{sel}': {p}");
        }
    }
    for (k, st) in &state.standbys {
        if st.last_run.is_some() && !st.ok {
            failing += 1;
        }
        println!(
            "standby {k} of {}: last replay {}{}, next {}",
            st.volume,
            ago(st.last_run, now),
            match (&st.error, &st.backup_id) {
                (Some(e), _) => format!(" FAILED: {e}"),
                (None, Some(b)) => format!(" ({}, at backup {b})", st.kind.as_deref().unwrap_or("-")),
                _ => String::new(),
            },
            ago(st.next_run, now)
        );
    }
    if state.gc.last_run.is_some() || state.gc.next_run.is_some() {
        println!(
            "garbage collection: last {}{}, next {}",
            ago(state.gc.last_run, now),
            match (&state.gc.error, state.gc.last_run) {
                (Some(e), _) => format!(" FAILED: {e}"),
                (None, Some(_)) => format!(" ({} chunks, {} bytes)", state.gc.chunks, state.gc.bytes),
                _ => String::new(),
            },
            ago(state.gc.next_run, now)
        );
    }
    Ok(if failing > 0 { exit::FAILURE } else { exit::OK })
}
