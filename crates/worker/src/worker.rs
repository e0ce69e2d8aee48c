//! The scheduler: selections on their cron schedules, each volume's run (lease, hooks,
//! snapshot, backup, retention, drill, notifications), garbage collection on its schedule,
//! bandwidth windows, state for `/metrics` and `ferry status`, and a clean stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Local, Utc};
use ferry_engine::{
    BackupRunning, CancellationToken, Cancelled, Ceph, Engine, ErrorKind, RbdBackupOptions, RbdImage, RestoreOptions, UpToDate,
};
use ferry_repo::BackupSpec;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::config::{ConfigError, Selection, WorkerConfig};
use crate::cron::Cron;
use crate::hooks::{humantime, notify, VolumeHooks};
use crate::http::Endpoints;
use crate::select::{resolve, Target};
use crate::state::{DrillState, Gauges, GcState, RunResult, VolumeState, WorkerState};

/// How the worker is told to stop or reload.
pub struct Control {
    /// Stop taking work; running backups get `stop_timeout` to finish, then are cancelled.
    pub shutdown: CancellationToken,
    /// New configurations (SIGHUP), or why one was refused.
    pub reload: mpsc::UnboundedReceiver<Result<WorkerConfig, ConfigError>>,
}

/// What `--once` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OnceReport {
    /// Per volume: the result and, on failure, why.
    pub volumes: BTreeMap<String, (RunResult, Option<String>)>,
    /// Problems of the selections (missing images).
    pub problems: Vec<String>,
    /// Per standby image: the result and, on failure, why.
    pub standbys: BTreeMap<String, (RunResult, Option<String>)>,
}

impl OnceReport {
    /// True when every volume succeeded (or was backed up by another worker) and no
    /// selection had problems.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.volumes.values().all(|(r, _)| *r != RunResult::Failure)
            && self.standbys.values().all(|(r, _)| *r != RunResult::Failure)
    }
}

/// One planned volume, for `--check`.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedVolume {
    /// Its selection.
    pub selection: String,
    /// `POOL/IMAGE`.
    pub image: String,
    /// The volume name.
    pub volume: String,
    /// Labels its backups get.
    pub labels: BTreeMap<String, String>,
    /// When it runs next.
    pub next_run: Option<DateTime<Local>>,
}

/// What `--check` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// Every selected image.
    pub volumes: Vec<PlannedVolume>,
    /// Problems of the selections.
    pub problems: Vec<String>,
    /// When garbage collection runs next.
    pub gc_next_run: Option<DateTime<Local>>,
}

/// The first time after `now` any of `crons` fires.
pub fn next_tick(crons: &[Cron], now: DateTime<Local>) -> Option<DateTime<Local>> {
    crons.iter().filter_map(|c| c.next_after(&now)).min()
}

/// The newest time at or before `now` any of `crons` fired (within eight years).
pub fn last_tick(crons: &[Cron], now: DateTime<Local>) -> Option<DateTime<Local>> {
    crons
        .iter()
        .filter_map(|c| {
            let mut step = chrono::Duration::minutes(1);
            let mut from = now - step;
            loop {
                match c.next_after(&from) {
                    Some(t) if t <= now => {
                        // Walk forward to the newest one at or before now.
                        let mut t = t;
                        while let Some(n) = c.next_after(&t).filter(|n| *n <= now) {
                            t = n;
                        }
                        return Some(t);
                    }
                    _ if step > chrono::Duration::days(8 * 366) => return None,
                    _ => {
                        step = step * 2;
                        from = now - step;
                    }
                }
            }
        })
        .max()
}

/// How a standby is named in the state and metrics: `rbd:POOL/IMAGE`, prefixed by its
/// cluster's name unless that is `default`.
fn standby_key(st: &crate::config::Standby) -> String {
    if st.cluster == "default" {
        format!("rbd:{}/{}", st.pool, st.image)
    } else {
        format!("{}:rbd:{}/{}", st.cluster, st.pool, st.image)
    }
}

fn ceph_for(config: &WorkerConfig, sel: &Selection) -> Ceph {
    config.clusters.get(&sel.cluster).cloned().unwrap_or_default()
}

/// Resolves a selection against its cluster (`rbd ls` on the blocking pool).
async fn resolve_selection(config: &WorkerConfig, sel: &Selection) -> crate::select::Resolved {
    let rbd = ceph_for(config, sel).rbd();
    let sel = sel.clone();
    tokio::task::spawn_blocking(move || resolve(&sel, &mut |pool| rbd.list(pool).map_err(|e| e.to_string())))
        .await
        .unwrap_or_else(|e| crate::select::Resolved {
            targets: Vec::new(),
            problems: vec![format!("resolving the selection failed: {e}")],
        })
}

/// Validates the plan against the clusters: what each selection names now, and when it runs.
pub async fn plan(config: &WorkerConfig) -> Plan {
    let now = Local::now();
    let mut plan = Plan {
        gc_next_run: config.gc.as_ref().and_then(|g| next_tick(&g.schedule, now)),
        ..Default::default()
    };
    for sel in &config.selections {
        let r = resolve_selection(config, sel).await;
        let next = next_tick(&sel.schedule, now);
        plan.problems
            .extend(r.problems.into_iter().map(|p| format!("selection '{}': {p}", sel.name)));
        for t in r.targets {
            if let Some(other) = plan.volumes.iter().find(|v| v.volume == t.volume) {
                plan.problems.push(format!(
                    "selection '{}': image {} makes volume '{}', which selection '{}' already backs up; left to that selection",
                    sel.name, t.image, t.volume, other.selection
                ));
                continue;
            }
            plan.volumes.push(PlannedVolume {
                selection: sel.name.clone(),
                image: t.image.to_string(),
                volume: t.volume,
                labels: t.labels,
                next_run: next,
            });
        }
    }
    plan
}

/// The scheduler and everything it shares with its runs.
pub struct Worker {
    engine: Engine,
    config: Mutex<Arc<WorkerConfig>>,
    state: Mutex<WorkerState>,
    heartbeat: Mutex<Instant>,
    in_flight: std::sync::atomic::AtomicUsize,
    upload: Mutex<(Instant, u64, f64)>,
    permits: Arc<Semaphore>,
    /// Cancels running backups (after the stop timeout).
    abort: CancellationToken,
    /// Set when the worker stops taking work (SIGTERM): queued runs and retries give up.
    stopping: CancellationToken,
    /// Serialises writes of `status.json`.
    save_lock: Mutex<()>,
}

impl Worker {
    /// A worker over an opened engine. `rbd_program` overrides the `rbd` tool of every
    /// cluster (tests).
    pub fn new(engine: Engine, config: WorkerConfig) -> Arc<Worker> {
        let state = WorkerState {
            pid: std::process::id(),
            started: Some(Utc::now()),
            repository: engine.repository().url().to_string(),
            ..Default::default()
        };
        Arc::new(Worker {
            permits: Arc::new(Semaphore::new(config.worker.concurrency)),
            engine,
            config: Mutex::new(Arc::new(config)),
            state: Mutex::new(state),
            heartbeat: Mutex::new(Instant::now()),
            in_flight: Default::default(),
            upload: Mutex::new((Instant::now(), 0, 0.0)),
            abort: CancellationToken::new(),
            stopping: CancellationToken::new(),
            save_lock: Mutex::new(()),
        })
    }

    fn config(&self) -> Arc<WorkerConfig> {
        self.config.lock().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut WorkerState) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn volume_state<R>(&self, volume: &str, f: impl FnOnce(&mut VolumeState) -> R) -> R {
        self.with_state(|s| f(s.volumes.entry(volume.to_string()).or_default()))
    }

    fn save_state(&self) {
        let _one_at_a_time = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.config().worker.state_dir.clone();
        let snapshot = self.with_state(|s| {
            s.updated = Some(Utc::now());
            s.clone()
        });
        if let Err(e) = snapshot.save(&dir) {
            tracing::warn!("cannot write {}/status.json: {e}", dir.display());
        }
    }

    /// Updates the upload limit for the current time window.
    fn apply_bandwidth(&self) {
        let cfg = self.config();
        let Some(limiter) = self.engine.repository().store().limiter() else {
            return;
        };
        // No limits in the configuration: a limit from the command line stays as it is.
        if !cfg.worker.bandwidth.is_limited() {
            return;
        }
        let want = cfg.worker.bandwidth.limit_at(Local::now().time());
        if limiter.rate() != want {
            tracing::info!(
                "upload limit now {}",
                want.map(|r| format!("{r} bytes/s")).unwrap_or_else(|| "unlimited".into())
            );
            limiter.set_rate(want);
        }
    }

    /// Notes what a selection names now: new volumes, volumes gone, problems. Returns the
    /// targets this selection runs: a volume another selection already backs up stays that
    /// selection's (two schedules, retentions and label sets on one chain would fight), and
    /// the clash is reported.
    fn note_selection(&self, sel: &Selection, targets: &[Target], problems: &[String], next: Option<DateTime<Local>>) -> Vec<Target> {
        let mut problems = problems.to_vec();
        let targets: Vec<Target> = self.with_state(|s| {
            targets
                .iter()
                .filter(|t| match s.volumes.get(&t.volume) {
                    Some(v) if v.selected && v.selection != sel.name => {
                        problems.push(format!(
                            "image {} makes volume '{}', which selection '{}' already backs up; left to that selection",
                            t.image, t.volume, v.selection
                        ));
                        false
                    }
                    _ => true,
                })
                .cloned()
                .collect()
        });
        let targets = &targets[..];
        let problems = &problems[..];
        let names: BTreeSet<&str> = targets.iter().map(|t| t.volume.as_str()).collect();
        self.with_state(|s| {
            for (name, v) in s.volumes.iter_mut() {
                if v.selection == sel.name && v.selected && !names.contains(name.as_str()) {
                    tracing::warn!(
                        selection = %sel.name,
                        "image {}/{} (volume '{name}') is no longer selected or no longer exists; its backups are kept",
                        v.pool,
                        v.image
                    );
                    v.selected = false;
                }
            }
            for t in targets {
                let v = s.volumes.entry(t.volume.clone()).or_default();
                if !v.selected {
                    tracing::info!(selection = %sel.name, volume = %t.volume, "selected image {}", t.image);
                }
                v.selected = true;
                v.selection = sel.name.clone();
                v.cluster = t.cluster.clone();
                v.pool = t.image.pool.clone();
                v.image = t.image.image.clone();
                v.next_run = next.map(|n| n.with_timezone(&Utc));
            }
            for p in problems {
                tracing::warn!(selection = %sel.name, "{p}");
            }
            s.problems.insert(sel.name.clone(), problems.to_vec());
        });
        targets.to_vec()
    }

    /// Fills the state from the repository: each volume's newest backup and chain length.
    async fn note_chains(&self, targets: &[Target]) {
        if let Err(e) = self.engine.index().sync(self.engine.repository()).await {
            tracing::warn!("cannot read the repository's backups: {e}");
            return;
        }
        for t in targets {
            let backups = self.engine.index().backups(Some(&t.volume)).unwrap_or_default();
            self.volume_state(&t.volume, |v| {
                v.chain_length = backups.len() as u64;
                // The head of the chain (listed in chain order), not the latest clock.
                if let Some(head) = backups.last() {
                    v.last_success = Some(head.meta.created);
                    v.last_backup_id = Some(head.meta.backup_id.clone());
                }
            });
        }
    }

    /// Runs every selection once, now, and returns what happened.
    pub async fn run_once(self: &Arc<Worker>) -> OnceReport {
        self.apply_bandwidth();
        let cfg = self.config();
        let since = Utc::now();
        let mut report = OnceReport::default();
        let mut runs = JoinSet::new();
        for sel in &cfg.selections {
            let r = resolve_selection(&cfg, sel).await;
            let targets = self.note_selection(sel, &r.targets, &r.problems, next_tick(&sel.schedule, Local::now()));
            self.note_chains(&targets).await;
            let problems = self.with_state(|s| s.problems.get(&sel.name).cloned().unwrap_or_default());
            report
                .problems
                .extend(problems.iter().map(|p| format!("selection '{}': {p}", sel.name)));
            for t in targets {
                let (w, sel) = (self.clone(), sel.clone());
                runs.spawn(async move {
                    let (res, err) = w.run_volume(&sel, &t, Some(since)).await;
                    (t.volume, res, err)
                });
            }
        }
        while let Some(done) = runs.join_next().await {
            if let Ok((volume, res, err)) = done {
                report.volumes.insert(volume, (res, err));
            }
        }
        // Standby replays after the backups (a worker that has both replays what it made).
        for st in &cfg.standbys {
            let (res, err) = self.replay(st).await;
            report.standbys.insert(standby_key(st), (res, err));
        }
        self.save_state();
        report
    }

    /// One replay of a standby image (see `Engine::replay`), recorded in the state.
    async fn replay(&self, st: &crate::config::Standby) -> (RunResult, Option<String>) {
        let started = Instant::now();
        let cfg = self.config();
        let ceph = cfg.clusters.get(&st.cluster).cloned().unwrap_or_default();
        let image = ferry_engine::RbdImage {
            pool: st.pool.clone(),
            image: st.image.clone(),
        };
        let opts = ferry_engine::ReplayOptions {
            force: st.force,
            keep_snapshots: st.keep_snapshots,
            jobs: cfg.worker.jobs,
            ..Default::default()
        };
        tracing::info!(volume = %st.volume, standby = %image, "replay started");
        let r = self.engine.replay(&ceph, &st.volume, &image, &opts).await;
        let created = match &r {
            Ok(rep) => self
                .engine
                .chain(&st.volume)
                .await
                .ok()
                .and_then(|c| c.backups.iter().find(|b| b.meta.backup_id == rep.backup_id).map(|b| b.meta.created)),
            Err(_) => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let key = standby_key(st);
        let out = self.with_state(|s| {
            let e = s.standbys.entry(key.clone()).or_default();
            e.volume = st.volume.clone();
            e.image = format!("rbd:{image}");
            e.last_run = Some(Utc::now());
            e.seconds = seconds;
            match &r {
                Ok(rep) => {
                    e.ok = true;
                    e.error = None;
                    e.backup_id = Some(rep.backup_id.clone());
                    e.backup_created = created.or(e.backup_created);
                    e.kind = Some(rep.kind.to_string());
                    (RunResult::Success, None)
                }
                Err(err) => {
                    e.ok = false;
                    e.error = Some(full(err));
                    (RunResult::Failure, Some(full(err)))
                }
            }
        });
        match &r {
            Ok(rep) => tracing::info!(
                volume = %st.volume,
                standby = %image,
                "replay done in {seconds:.1} s: {} to {} ({} blocks written)",
                rep.kind,
                rep.backup_id,
                rep.blocks_written
            ),
            Err(e) => tracing::error!(volume = %st.volume, standby = %image, "replay failed: {}", full(e)),
        }
        self.save_state();
        out
    }

    /// Runs until `control.shutdown`: selections on their schedules, missed runs once at
    /// start, GC on its schedule, reloads as they come. Returns when every run has ended.
    pub async fn run(self: &Arc<Worker>, mut control: Control) {
        let mut cfg = self.config();
        let mut runs: JoinSet<()> = JoinSet::new();
        let mut running: BTreeSet<String> = BTreeSet::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
        let mut gc_running = false;
        let (gc_tx, mut gc_rx) = mpsc::unbounded_channel::<()>();

        // Schedules: next tick per selection, per drill, and of GC.
        let now = Local::now();
        let mut next_sel: Vec<Option<DateTime<Local>>> = cfg.selections.iter().map(|s| next_tick(&s.schedule, now)).collect();
        let mut next_drill: Vec<Option<DateTime<Local>>> = cfg
            .selections
            .iter()
            .map(|s| s.drill.as_ref().and_then(|d| next_tick(&d.schedule, now)))
            .collect();
        let mut next_gc = cfg.gc.as_ref().and_then(|g| next_tick(&g.schedule, now));
        self.with_state(|s| s.gc.next_run = next_gc.map(|t| t.with_timezone(&Utc)));
        let mut next_standby: Vec<Option<DateTime<Local>>> = cfg.standbys.iter().map(|st| next_tick(&st.schedule, now)).collect();
        let mut standby_running: BTreeSet<String> = BTreeSet::new();
        let (standby_tx, mut standby_rx) = mpsc::unbounded_channel::<String>();

        // Missed runs: a volume whose newest backup is older than its selection's last tick
        // (or that has none) runs once now — with that tick as the bar, so a second worker
        // starting alongside finds the backup made and does not make another.
        let mut start_runs: Vec<(Selection, Target, DateTime<Utc>)> = Vec::new();
        for (i, sel) in cfg.selections.iter().enumerate() {
            let r = resolve_selection(&cfg, sel).await;
            let targets = self.note_selection(sel, &r.targets, &r.problems, next_sel[i]);
            self.note_chains(&targets).await;
            let tick = last_tick(&sel.schedule, now).map(|t| t.with_timezone(&Utc));
            for t in targets {
                let last = self.volume_state(&t.volume, |v| v.last_success);
                let missed = match (last, tick) {
                    (None, _) => true,
                    (Some(l), Some(tick)) => l < tick,
                    (Some(_), None) => false,
                };
                if missed {
                    let bar = tick.unwrap_or_else(Utc::now);
                    tracing::info!(selection = %sel.name, volume = %t.volume, "missed its last scheduled run; running now");
                    start_runs.push((sel.clone(), t, bar));
                }
            }
        }
        for (sel, t, since) in start_runs {
            self.spawn_run(&mut runs, &mut running, &done_tx, sel, t, since);
        }
        self.save_state();

        loop {
            *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            while let Some(r) = runs.try_join_next() {
                if let Err(e) = r {
                    tracing::error!("a worker task ended abnormally: {e}");
                }
            }
            self.apply_bandwidth();
            self.sample_upload_rate();
            let now = Local::now();
            // Due selections.
            for (i, sel) in cfg.selections.iter().enumerate() {
                let Some(tick) = next_sel[i].filter(|t| *t <= now) else { continue };
                next_sel[i] = next_tick(&sel.schedule, now);
                let r = resolve_selection(&cfg, sel).await;
                let targets = self.note_selection(sel, &r.targets, &r.problems, next_sel[i]);
                for t in targets {
                    if running.contains(&t.volume) {
                        tracing::warn!(selection = %sel.name, volume = %t.volume, "its previous run is still going; not starting another");
                        continue;
                    }
                    self.spawn_run(&mut runs, &mut running, &done_tx, sel.clone(), t, tick.with_timezone(&Utc));
                }
            }
            // Due drills.
            for (i, sel) in cfg.selections.iter().enumerate() {
                let Some(drill) = &sel.drill else { continue };
                if next_drill[i].is_none_or(|t| t > now) {
                    continue;
                }
                next_drill[i] = next_tick(&drill.schedule, now);
                let r = resolve_selection(&cfg, sel).await;
                for t in r.targets {
                    let (w, sel) = (self.clone(), sel.clone());
                    runs.spawn(async move {
                        let Ok(_permit) = w.permits.clone().acquire_owned().await else {
                            return;
                        };
                        w.drill(&sel, &t).await;
                    });
                }
            }
            // Due standby replays.
            for (i, st) in cfg.standbys.iter().enumerate() {
                if next_standby[i].is_none_or(|t| t > now) {
                    continue;
                }
                next_standby[i] = next_tick(&st.schedule, now);
                let key = standby_key(st);
                self.with_state(|s| s.standbys.entry(key.clone()).or_default().next_run = next_standby[i].map(|t| t.with_timezone(&Utc)));
                if !standby_running.insert(key.clone()) {
                    tracing::warn!(standby = %key, "its previous replay is still going; not starting another");
                    continue;
                }
                let (w, st, tx) = (self.clone(), st.clone(), standby_tx.clone());
                runs.spawn(async move {
                    let _done = DoneGuard(tx, key);
                    let Ok(_permit) = w.permits.clone().acquire_owned().await else {
                        return;
                    };
                    w.replay(&st).await;
                });
            }
            // Due GC.
            if let (Some(g), Some(t)) = (&cfg.gc, next_gc) {
                if t <= now {
                    next_gc = next_tick(&g.schedule, now);
                    if gc_running {
                        tracing::warn!("the previous garbage collection is still running; not starting another");
                    } else {
                        gc_running = true;
                        let (w, g, tx) = (self.clone(), g.clone(), gc_tx.clone());
                        runs.spawn(async move {
                            struct GcDone(mpsc::UnboundedSender<()>);
                            impl Drop for GcDone {
                                fn drop(&mut self) {
                                    let _ = self.0.send(());
                                }
                            }
                            let _done = GcDone(tx);
                            w.gc(&g).await;
                        });
                    }
                    self.with_state(|s| s.gc.next_run = next_gc.map(|t| t.with_timezone(&Utc)));
                }
            }
            self.save_state();

            // Sleep to the next due time, at most 5 s (bandwidth windows, heartbeat).
            let mut wake = Local::now() + chrono::Duration::seconds(5);
            for t in next_sel
                .iter()
                .chain(next_drill.iter())
                .chain(next_standby.iter())
                .chain(std::iter::once(&next_gc))
                .flatten()
            {
                wake = wake.min(*t);
            }
            let sleep = (wake - Local::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                // Ticks that came due go before a reload (which recomputes the schedules).
                biased;
                _ = control.shutdown.cancelled() => break,
                _ = tokio::time::sleep(sleep) => {}
                Some(v) = done_rx.recv() => { running.remove(&v); }
                Some(()) = gc_rx.recv() => { gc_running = false; }
                Some(k) = standby_rx.recv() => { standby_running.remove(&k); }
                Some(new) = control.reload.recv() => match new {
                    Ok(new) => {
                        tracing::info!("configuration reloaded from {}", new.file.display());
                        if new.worker.concurrency != cfg.worker.concurrency || new.worker.metrics != cfg.worker.metrics {
                            tracing::warn!("worker.concurrency and worker.metrics take effect at the next start");
                        }
                        let now = Local::now();
                        next_sel = new.selections.iter().map(|s| next_tick(&s.schedule, now)).collect();
                        next_drill = new.selections.iter().map(|s| s.drill.as_ref().and_then(|d| next_tick(&d.schedule, now))).collect();
                        next_gc = new.gc.as_ref().and_then(|g| next_tick(&g.schedule, now));
                        let new = Arc::new(new);
                        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = new.clone();
                        cfg = new;
                        self.with_state(|s| {
                            s.reloads += 1;
                            // Volumes of selections that are gone belong to no one now (a
                            // renamed selection takes them over below).
                            for v in s.volumes.values_mut() {
                                if !cfg.selections.iter().any(|x| x.name == v.selection) {
                                    v.selected = false;
                                }
                            }
                            s.problems.retain(|name, _| cfg.selections.iter().any(|x| &x.name == name));
                        });
                        for sel in &cfg.selections {
                            let r = resolve_selection(&cfg, sel).await;
                            let _ = self.note_selection(sel, &r.targets, &r.problems, next_tick(&sel.schedule, now));
                        }
                    }
                    Err(e) => {
                        tracing::error!("configuration not reloaded (the previous one stays): {e}");
                        self.with_state(|s| s.reload_failures += 1);
                    }
                },
            }
            while let Ok(v) = done_rx.try_recv() {
                running.remove(&v);
            }
        }

        // Stop: no new work (queued runs and retries give up); running backups get the stop
        // timeout, then are cancelled.
        self.stopping.cancel();
        self.permits.close();
        while runs.try_join_next().is_some() {}
        let n = runs.len();
        let stop = cfg.worker.stop_timeout;
        if n > 0 {
            tracing::warn!("stopping: waiting up to {} for {n} running task(s) to finish", humantime(stop));
        }
        let now = tokio::time::Instant::now();
        let deadline = now.checked_add(stop).unwrap_or(now + Duration::from_secs(86400));
        loop {
            tokio::select! {
                r = runs.join_next() => if r.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("stop timeout reached: cancelling {} running task(s); nothing they did is committed", runs.len());
                    self.abort.cancel();
                    // Cancelled backups remove their snapshot, fence their session and
                    // release their lease; give that a bounded time too.
                    let _ = tokio::time::timeout(Duration::from_secs(60), async { while runs.join_next().await.is_some() {} }).await;
                    runs.abort_all();
                    break;
                }
            }
        }
        self.save_state();
    }

    fn spawn_run(
        self: &Arc<Worker>,
        runs: &mut JoinSet<()>,
        running: &mut BTreeSet<String>,
        done: &mpsc::UnboundedSender<String>,
        sel: Selection,
        t: Target,
        since: DateTime<Utc>,
    ) {
        running.insert(t.volume.clone());
        let (w, done) = (self.clone(), done.clone());
        runs.spawn(async move {
            // Reported even if the run panics: the volume must not stay "running" forever.
            let _done = DoneGuard(done, t.volume.clone());
            w.run_volume(&sel, &t, Some(since)).await;
            w.save_state();
        });
    }

    fn sample_upload_rate(&self) {
        let up = self.engine.repository().store().requests().bytes_up;
        let mut u = self.upload.lock().unwrap_or_else(|p| p.into_inner());
        let dt = u.0.elapsed().as_secs_f64();
        if dt >= 2.0 {
            u.2 = up.saturating_sub(u.1) as f64 / dt;
            *u = (Instant::now(), up, u.2);
        }
    }

    /// One volume's run: backup (with retries), retention, drill, notification.
    async fn run_volume(&self, sel: &Selection, t: &Target, since: Option<DateTime<Utc>>) -> (RunResult, Option<String>) {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return (RunResult::Failure, Some("the worker is stopping".into()));
        };
        if self.stopping.is_cancelled() {
            return (RunResult::Failure, Some("the worker is stopping".into()));
        }
        let cfg = self.config();
        let ceph = ceph_for(&cfg, sel);
        let started = Instant::now();
        let start_time = Utc::now();
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.volume_state(&t.volume, |v| {
            v.running = true;
            v.last_attempt = Some(start_time);
        });
        let span = tracing::info_span!("run", selection = %sel.name, volume = %t.volume);
        let _ = &span;
        tracing::info!(selection = %sel.name, volume = %t.volume, "backing up {}", t.image);
        let mut env = BTreeMap::from([
            ("FERRY_VOLUME".to_string(), t.volume.clone()),
            ("FERRY_POOL".to_string(), t.image.pool.clone()),
            ("FERRY_IMAGE".to_string(), t.image.image.clone()),
            ("FERRY_SELECTION".to_string(), sel.name.clone()),
        ]);
        for (k, v) in &t.labels {
            if let Some(kind) = k.strip_prefix("openstack.") {
                env.insert(format!("FERRY_{}", kind.to_ascii_uppercase()), v.clone());
            }
        }
        let hooks = sel.hooks.clone().map(|h| {
            Arc::new(VolumeHooks {
                hooks: h,
                env: env.clone(),
            }) as Arc<dyn ferry_engine::SnapshotHooks>
        });
        let mut attempt = 0u32;
        let lease_wait_until = Instant::now() + cfg.worker.lease.saturating_mul(3);
        let result = loop {
            let opts = RbdBackupOptions {
                volume: Some(t.volume.clone()),
                full: false,
                jobs: cfg.worker.jobs,
                labels: t.labels.clone(),
                lease: Some(cfg.worker.lease),
                verify_blocks: sel.verify_blocks,
                keep_snapshots: sel.keep_snapshots,
                hooks: hooks.clone(),
                unless_backed_up_since: since,
                cancel: Some(self.abort.child_token()),
                deltas: true,
            };
            match self.engine.backup_rbd(&ceph, &t.image, opts).await {
                Ok(o) => break Ok(o),
                Err(e) if e.find::<UpToDate>().is_some() => break Err(e),
                Err(e) if e.find::<Cancelled>().is_some() => break Err(e),
                Err(e) if e.find::<BackupRunning>().is_some() && Instant::now() < lease_wait_until => {
                    // Another worker (or a dead one whose lease has not expired) has it:
                    // wait and look again; its backup, once committed, makes ours unneeded.
                    tracing::info!(volume = %t.volume, "{e}; waiting for it");
                    let pause = (cfg.worker.lease / 4).clamp(Duration::from_millis(500), Duration::from_secs(10));
                    if self.pause(pause).await {
                        continue;
                    }
                    break Err(e);
                }
                Err(e) if matches!(e.kind(), ErrorKind::Transient | ErrorKind::Source) && attempt < cfg.worker.retries => {
                    let delay = cfg.worker.retry_delay.saturating_mul(1 << attempt.min(10));
                    attempt += 1;
                    tracing::warn!(volume = %t.volume, "{}; retry {attempt} of {} in {}", full(&e), cfg.worker.retries, humantime(delay));
                    if self.pause(delay).await {
                        continue;
                    }
                    break Err(e);
                }
                Err(e) => break Err(e),
            }
        };
        let duration = started.elapsed().as_secs_f64();
        let (res, err) = match result {
            Ok(done) => {
                let m = &done.outcome.manifest;
                let s = &m.meta.stats;
                tracing::info!(
                    volume = %t.volume,
                    backup = %m.meta.backup_id,
                    "backup committed: {} read, {} uploaded, {duration:.1} s",
                    s.stream_bytes,
                    s.bytes_uploaded
                );
                self.volume_state(&t.volume, |v| {
                    v.last_success = Some(m.meta.created);
                    v.last_backup_id = Some(m.meta.backup_id.clone());
                    v.backups_total += 1;
                    v.read_bytes_total += s.stream_bytes;
                    v.new_bytes_total += s.bytes_new;
                    v.deduplicated_bytes_total += s.blocks_dedup * m.meta.block_size.get();
                    v.uploaded_bytes_total += s.bytes_uploaded;
                    v.backups_since_drill += 1;
                });
                let mut warning = None;
                if let Some(keep) = &sel.keep {
                    match self.engine.prune(std::slice::from_ref(&t.volume), keep, false).await {
                        Ok(r) if r.removed > 0 => tracing::info!(volume = %t.volume, "retention removed {} backup(s)", r.removed),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(volume = %t.volume, "retention failed (the backup is committed): {}", full(&e));
                            warning = Some(format!("retention failed: {}", full(&e)));
                        }
                    }
                }
                let n = self.engine.index().backups(Some(&t.volume)).map(|b| b.len() as u64).unwrap_or(0);
                self.volume_state(&t.volume, |v| v.chain_length = n);
                notify(
                    &sel.notify.on_success,
                    &serde_json::json!({
                        "event": "backup.success",
                        "selection": sel.name,
                        "volume": t.volume,
                        "pool": t.image.pool,
                        "image": t.image.image,
                        "backup_id": m.meta.backup_id,
                        "kind": if m.meta.from_snap.is_some() { "incremental" } else { "full" },
                        "seconds": duration,
                        "stats": s,
                        "warning": warning,
                        "time": Utc::now().to_rfc3339(),
                    }),
                    sel.notify.timeout,
                )
                .await;
                (RunResult::Success, warning)
            }
            Err(e) if e.find::<BackupRunning>().is_some() && !self.stopping.is_cancelled() => {
                // Still held after three lease periods: another worker's backup is running
                // (and renewing its lease). Not a failure of ours; its result is its own.
                tracing::info!(volume = %t.volume, "still being backed up by another worker: {}", full(&e));
                (RunResult::Skipped, None)
            }
            Err(e) if e.find::<UpToDate>().is_some() => {
                let u = e.find::<UpToDate>().map(|u| (u.backup_id.clone(), u.created));
                tracing::info!(volume = %t.volume, "already backed up for this run by another worker: {e}");
                self.volume_state(&t.volume, |v| {
                    if let Some((id, created)) = u {
                        if v.last_success.is_none_or(|l| l < created) {
                            v.last_success = Some(created);
                            v.last_backup_id = Some(id);
                        }
                    }
                });
                (RunResult::Skipped, None)
            }
            Err(e) => {
                let why = full(&e);
                tracing::error!(volume = %t.volume, "backup failed: {why}");
                self.volume_state(&t.volume, |v| v.failures_total += 1);
                notify(
                    &sel.notify.on_failure,
                    &serde_json::json!({
                        "event": "backup.failure",
                        "selection": sel.name,
                        "volume": t.volume,
                        "pool": t.image.pool,
                        "image": t.image.image,
                        "error": why,
                        "kind": e.kind(),
                        "seconds": duration,
                        "time": Utc::now().to_rfc3339(),
                    }),
                    sel.notify.timeout,
                )
                .await;
                (RunResult::Failure, Some(why))
            }
        };
        self.volume_state(&t.volume, |v| {
            v.running = false;
            v.last_result = Some(res);
            v.last_error = if res == RunResult::Failure { err.clone() } else { None };
            v.last_duration_seconds = duration;
        });
        self.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        drop(_permit);
        // The drill after every Nth backup.
        if res == RunResult::Success {
            if let Some(every) = sel.drill.as_ref().and_then(|d| d.every) {
                if self.volume_state(&t.volume, |v| v.backups_since_drill) >= every {
                    if let Ok(_permit) = self.permits.clone().acquire_owned().await {
                        self.drill(sel, t).await;
                    }
                }
            }
        }
        (res, err)
    }

    /// Sleeps `d`; false when the worker is cancelling work meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.abort.cancelled() => false,
            _ = self.stopping.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// The restore drill: the newest backup restored to a scratch image, timed, removed.
    async fn drill(&self, sel: &Selection, t: &Target) {
        let cfg = self.config();
        let ceph = ceph_for(&cfg, sel);
        let pool = sel
            .drill
            .as_ref()
            .and_then(|d| d.pool.clone())
            .unwrap_or_else(|| t.image.pool.clone());
        let scratch = RbdImage {
            pool,
            image: format!("ferry-drill-{}", hex_id()),
        };
        let started = Instant::now();
        let mut backup_id = String::new();
        let result: Result<(), String> = async {
            let (_, manifest) = self.engine.resolve(&t.volume, &BackupSpec::Latest).await.map_err(|e| full(&e))?;
            backup_id = manifest.meta.backup_id.clone();
            let target = self.engine.rbd_target(&ceph, &scratch, false, Some("ferry-drill".into()));
            let opts = RestoreOptions::default();
            tokio::select! {
                r = self.engine.restore(manifest, Box::new(target), &opts) => r.map_err(|e| full(&e))?,
                _ = self.abort.cancelled() => return Err("cancelled: the worker is stopping".into()),
            };
            Ok(())
        }
        .await;
        let seconds = started.elapsed().as_secs_f64();
        // The scratch image goes, whatever happened.
        let rbd = ceph.rbd();
        let sc = scratch.clone();
        let removed = tokio::task::spawn_blocking(move || -> Result<(), String> {
            if !rbd.exists(&sc.pool, &sc.image).map_err(|e| e.to_string())? {
                return Ok(());
            }
            for s in rbd.snap_list(&sc.pool, &sc.image).map_err(|e| e.to_string())? {
                rbd.snap_remove(&sc.pool, &sc.image, &s.name).map_err(|e| e.to_string())?;
            }
            rbd.remove(&sc.pool, &sc.image).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = &removed {
            tracing::warn!(volume = %t.volume, "the drill's scratch image {scratch} could not be removed: {e}");
        }
        match &result {
            Ok(()) => tracing::info!(volume = %t.volume, "restore drill: backup {backup_id} restored to {scratch} in {seconds:.1} s"),
            Err(e) => tracing::error!(volume = %t.volume, "restore drill failed: {e}"),
        }
        self.volume_state(&t.volume, |v| {
            v.backups_since_drill = 0;
            v.drill = Some(DrillState {
                time: Utc::now(),
                backup_id,
                ok: result.is_ok(),
                seconds,
                error: result.err(),
            });
        });
        self.save_state();
    }

    /// Garbage collection on its schedule.
    async fn gc(&self, g: &crate::config::GcSettings) {
        let started = Instant::now();
        tracing::info!("garbage collection started");
        let opts = ferry_repo::GcOptions {
            ack_timeout: g.ack_timeout,
            grace: g.grace,
            ..Default::default()
        };
        let r = self.engine.gc(&opts).await;
        let seconds = started.elapsed().as_secs_f64();
        self.with_state(|s| {
            let next_run = s.gc.next_run;
            s.gc = match &r {
                Ok(r) => GcState {
                    last_run: Some(Utc::now()),
                    ok: true,
                    error: None,
                    seconds,
                    chunks: r.chunks_total.saturating_sub(r.chunks_deleted),
                    bytes: r.bytes_total.saturating_sub(r.bytes_freed),
                    freed_bytes: r.bytes_freed,
                    next_run,
                },
                Err(e) => GcState {
                    last_run: Some(Utc::now()),
                    ok: false,
                    error: Some(full(&e)),
                    seconds,
                    next_run,
                    ..s.gc.clone()
                },
            };
        });
        match r {
            Ok(r) => tracing::info!(
                "garbage collection done in {seconds:.1} s: {} chunks deleted, {} bytes freed",
                r.chunks_deleted,
                r.bytes_freed
            ),
            Err(e) => tracing::error!("garbage collection failed: {}", full(&e)),
        }
        self.save_state();
    }
}

/// Sends the volume's name when dropped: its run is over, however it ended.
struct DoneGuard(mpsc::UnboundedSender<String>, String);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(std::mem::take(&mut self.1));
    }
}

/// An error with its causes, "message: cause: cause".
fn full(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn hex_id() -> String {
    let b: [u8; 4] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Endpoints for Worker {
    fn metrics(&self) -> String {
        let g = Gauges {
            runs_in_flight: self.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            upload_limit: self.engine.repository().store().limiter().and_then(|l| l.rate()),
            requests: self.engine.repository().store().requests(),
            upload_rate: self.upload.lock().map(|u| u.2).unwrap_or(0.0),
        };
        let state = self.with_state(|s| s.clone());
        crate::state::render_metrics(&state, &g, Utc::now())
    }

    fn health(&self) -> Result<String, String> {
        let age = self.heartbeat.lock().map(|h| h.elapsed()).unwrap_or_default();
        if age < Duration::from_secs(120) {
            Ok("ok\n".into())
        } else {
            Err(format!("the scheduler has not run for {} s\n", age.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn last_tick_is_the_newest_firing_at_or_before_now() {
        let c: Vec<Cron> = vec!["0 3 * * *".parse().unwrap(), "*/20 * * * * *".parse().unwrap()];
        let now = Local.with_ymd_and_hms(2026, 11, 29, 10, 0, 45).unwrap();
        assert_eq!(last_tick(&c, now), Some(Local.with_ymd_and_hms(2026, 11, 29, 10, 0, 40).unwrap()));
        let daily: Vec<Cron> = vec!["0 3 * * *".parse().unwrap()];
        assert_eq!(last_tick(&daily, now), Some(Local.with_ymd_and_hms(2026, 11, 29, 3, 0, 0).unwrap()));
        let exact = Local.with_ymd_and_hms(2026, 11, 29, 3, 0, 0).unwrap();
        assert_eq!(last_tick(&daily, exact), Some(exact));
        assert_eq!(
            next_tick(&daily, exact),
            Some(Local.with_ymd_and_hms(2026, 11, 30, 3, 0, 0).unwrap())
        );
    }
}
