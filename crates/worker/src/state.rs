//! What the worker knows about its volumes and itself: rendered as Prometheus metrics for
//! `/metrics`, and kept in `status.json` in the state directory for `ferry status`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use ferry_repo::RequestStats;
use serde::{Deserialize, Serialize};

/// The outcome of a volume's last run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    /// A backup was committed.
    Success,
    /// The run failed (after its retries).
    Failure,
    /// Another worker made this tick's backup.
    Skipped,
}

impl RunResult {
    /// `success`, `failure`, `skipped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Skipped => "skipped",
        }
    }
}

/// One selected volume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeState {
    /// Its selection.
    pub selection: String,
    /// The source cluster's name.
    pub cluster: String,
    /// Pool and image.
    pub pool: String,
    /// The image.
    pub image: String,
    /// Whether the last evaluation of its selection still named it.
    pub selected: bool,
    /// Being backed up now.
    pub running: bool,
    /// When its last run started.
    pub last_attempt: Option<DateTime<Utc>>,
    /// How it ended.
    pub last_result: Option<RunResult>,
    /// Why it failed.
    pub last_error: Option<String>,
    /// The newest backup's commit time (from the repository, or a run of this worker).
    pub last_success: Option<DateTime<Utc>>,
    /// The newest backup's ID.
    pub last_backup_id: Option<String>,
    /// How long the last run took, in seconds.
    pub last_duration_seconds: f64,
    /// When it runs next.
    pub next_run: Option<DateTime<Utc>>,
    /// Backups this worker committed.
    pub backups_total: u64,
    /// Runs that failed.
    pub failures_total: u64,
    /// Diff stream bytes read from the source.
    pub read_bytes_total: u64,
    /// Plaintext bytes of new chunks.
    pub new_bytes_total: u64,
    /// Bytes of changed blocks that were already stored.
    pub deduplicated_bytes_total: u64,
    /// Object bytes uploaded.
    pub uploaded_bytes_total: u64,
    /// Backups in the volume's chain.
    pub chain_length: u64,
    /// Committed backups since the last restore drill.
    pub backups_since_drill: u32,
    /// The last restore drill.
    pub drill: Option<DrillState>,
}

/// The result of a restore drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillState {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// The backup it restored.
    pub backup_id: String,
    /// Whether the restore succeeded.
    pub ok: bool,
    /// Seconds from start to a complete, verified image (the recovery time).
    pub seconds: f64,
    /// What went wrong.
    pub error: Option<String>,
}

/// The last garbage collection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcState {
    /// When the last GC finished.
    pub last_run: Option<DateTime<Utc>>,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds it took.
    pub seconds: f64,
    /// Chunk objects after it ran.
    pub chunks: u64,
    /// Repository bytes (chunks) after it ran.
    pub bytes: u64,
    /// Bytes it freed.
    pub freed_bytes: u64,
    /// When it runs next.
    pub next_run: Option<DateTime<Utc>>,
}

/// The last replay of one standby image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StandbyState {
    /// The volume it follows.
    pub volume: String,
    /// `rbd:POOL/IMAGE`.
    pub image: String,
    /// When the last replay finished.
    pub last_run: Option<DateTime<Utc>>,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// The backup the image is at (after the last successful replay).
    pub backup_id: Option<String>,
    /// That backup's time: how far behind the source the standby is.
    pub backup_created: Option<DateTime<Utc>>,
    /// `full`, `incremental`, `up-to-date`, `repaired`.
    pub kind: Option<String>,
    /// Seconds the last replay took.
    pub seconds: f64,
    /// When it runs next.
    pub next_run: Option<DateTime<Utc>>,
}

/// Everything `ferry status` and `/metrics` show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerState {
    /// The worker's process ID.
    pub pid: u32,
    /// When it started.
    pub started: Option<DateTime<Utc>>,
    /// When this state was written.
    pub updated: Option<DateTime<Utc>>,
    /// The repository URL.
    pub repository: String,
    /// Per volume.
    pub volumes: BTreeMap<String, VolumeState>,
    /// Problems of the last evaluation of each selection (missing images, unlistable pools).
    pub problems: BTreeMap<String, Vec<String>>,
    /// Garbage collection.
    pub gc: GcState,
    /// Standby images, by `rbd:POOL/IMAGE` (with the cluster's name when not `default`).
    #[serde(default)]
    pub standbys: BTreeMap<String, StandbyState>,
    /// Configuration reloads (SIGHUP) applied.
    pub reloads: u64,
    /// Reloads refused (the old configuration stays).
    pub reload_failures: u64,
}

impl WorkerState {
    /// Writes `status.json` in `dir` atomically (a temporary file renamed over it).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".status.json.{}", std::process::id()));
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, dir.join("status.json"))
    }

    /// Reads `status.json` from `dir`.
    pub fn load(dir: &Path) -> std::io::Result<WorkerState> {
        let data = std::fs::read(dir.join("status.json"))?;
        serde_json::from_slice(&data).map_err(std::io::Error::other)
    }
}

/// Worker-wide figures that are not in [`WorkerState`].
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Volume runs in progress.
    pub runs_in_flight: usize,
    /// The current upload limit, bytes per second (`None`: unlimited).
    pub upload_limit: Option<u64>,
    /// The store's request counters.
    pub requests: RequestStats,
    /// Bytes per second uploaded over the last few seconds.
    pub upload_rate: f64,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn ts(t: Option<DateTime<Utc>>) -> f64 {
    t.map(|t| t.timestamp_millis() as f64 / 1000.0).unwrap_or(0.0)
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        let v = if v.is_infinite() { "+Inf".to_string() } else { format!("{v}") };
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }
}

/// The Prometheus text exposition (format 0.0.4) of `state` at `now`.
pub fn render_metrics(state: &WorkerState, g: &Gauges, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let vols: Vec<(String, &VolumeState)> = state
        .volumes
        .iter()
        .filter(|(_, v)| v.selected)
        .map(|(name, v)| {
            (
                format!(
                    "volume=\"{}\",selection=\"{}\",pool=\"{}\",image=\"{}\"",
                    esc(name),
                    esc(&v.selection),
                    esc(&v.pool),
                    esc(&v.image)
                ),
                v,
            )
        })
        .collect();
    type Getter = fn(&VolumeState, DateTime<Utc>) -> f64;
    let per_volume: [(&str, &str, &str, Getter); 13] = [
        (
            "ferry_volume_backed_up",
            "gauge",
            "1 if the volume has a backup, 0 if it was never backed up.",
            |v, _| if v.last_success.is_some() { 1.0 } else { 0.0 },
        ),
        (
            "ferry_volume_freshness_seconds",
            "gauge",
            "Seconds since the newest backup was committed (+Inf: never backed up).",
            |v, now| match v.last_success {
                Some(t) => ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0),
                None => f64::INFINITY,
            },
        ),
        (
            "ferry_volume_last_success_timestamp_seconds",
            "gauge",
            "Commit time of the newest backup (0: never).",
            |v, _| ts(v.last_success),
        ),
        (
            "ferry_volume_last_attempt_timestamp_seconds",
            "gauge",
            "Start of the last run (0: never).",
            |v, _| ts(v.last_attempt),
        ),
        (
            "ferry_volume_last_run_success",
            "gauge",
            "1 if the last run committed a backup or found one made by another worker, 0 if it failed or never ran.",
            |v, _| match v.last_result {
                Some(RunResult::Success | RunResult::Skipped) => 1.0,
                _ => 0.0,
            },
        ),
        (
            "ferry_volume_last_duration_seconds",
            "gauge",
            "Duration of the last run.",
            |v, _| v.last_duration_seconds,
        ),
        ("ferry_volume_backups_total", "counter", "Backups this worker committed.", |v, _| {
            v.backups_total as f64
        }),
        (
            "ferry_volume_failures_total",
            "counter",
            "Runs that failed after their retries.",
            |v, _| v.failures_total as f64,
        ),
        (
            "ferry_volume_read_bytes_total",
            "counter",
            "Diff stream bytes read from the source.",
            |v, _| v.read_bytes_total as f64,
        ),
        (
            "ferry_volume_new_bytes_total",
            "counter",
            "Plaintext bytes of new chunks.",
            |v, _| v.new_bytes_total as f64,
        ),
        (
            "ferry_volume_deduplicated_bytes_total",
            "counter",
            "Bytes of changed blocks already in the repository.",
            |v, _| v.deduplicated_bytes_total as f64,
        ),
        ("ferry_volume_uploaded_bytes_total", "counter", "Object bytes uploaded.", |v, _| {
            v.uploaded_bytes_total as f64
        }),
        ("ferry_volume_chain_length", "gauge", "Backups in the volume's chain.", |v, _| {
            v.chain_length as f64
        }),
    ];
    for (name, kind, help, get) in per_volume {
        f.head(name, kind, help);
        for (labels, v) in &vols {
            f.sample(name, labels, get(v, now));
        }
    }
    f.head(
        "ferry_volume_next_run_timestamp_seconds",
        "gauge",
        "When the volume's selection runs next.",
    );
    for (labels, v) in &vols {
        f.sample("ferry_volume_next_run_timestamp_seconds", labels, ts(v.next_run));
    }
    f.head(
        "ferry_volume_drill_success",
        "gauge",
        "1 if the last restore drill restored the newest backup, 0 if it failed.",
    );
    for (labels, v) in &vols {
        if let Some(d) = &v.drill {
            f.sample("ferry_volume_drill_success", labels, if d.ok { 1.0 } else { 0.0 });
        }
    }
    f.head(
        "ferry_volume_drill_recovery_seconds",
        "gauge",
        "Seconds the last restore drill took to a complete image (the recovery time).",
    );
    for (labels, v) in &vols {
        if let Some(d) = &v.drill {
            f.sample("ferry_volume_drill_recovery_seconds", labels, d.seconds);
        }
    }
    f.head("ferry_volume_drill_timestamp_seconds", "gauge", "When the last restore drill ran.");
    for (labels, v) in &vols {
        if let Some(d) = &v.drill {
            f.sample("ferry_volume_drill_timestamp_seconds", labels, ts(Some(d.time)));
        }
    }
    f.head(
        "ferry_selection_problems",
        "gauge",
        "Problems of the selection's last evaluation (missing images, pools that cannot be listed).",
    );
    for (sel, p) in &state.problems {
        f.sample("ferry_selection_problems", &format!("selection=\"{}\"", esc(sel)), p.len() as f64);
    }
    f.head("ferry_worker_runs_in_flight", "gauge", "Volume runs in progress.");
    f.sample("ferry_worker_runs_in_flight", "", g.runs_in_flight as f64);
    f.head(
        "ferry_worker_upload_limit_bytes_per_second",
        "gauge",
        "The upload limit in force (0: unlimited).",
    );
    f.sample("ferry_worker_upload_limit_bytes_per_second", "", g.upload_limit.unwrap_or(0) as f64);
    f.head(
        "ferry_worker_upload_rate_bytes_per_second",
        "gauge",
        "Bandwidth in use: bytes uploaded per second over the last few seconds.",
    );
    f.sample("ferry_worker_upload_rate_bytes_per_second", "", g.upload_rate);
    f.head("ferry_store_requests_total", "counter", "Store requests by method.");
    let r = &g.requests;
    for (m, n) in [
        ("put", r.put),
        ("multipart", r.multipart),
        ("part", r.parts),
        ("get", r.get),
        ("head", r.head),
        ("list", r.list),
        ("delete", r.delete),
        ("copy", r.copy),
    ] {
        f.sample("ferry_store_requests_total", &format!("method=\"{m}\""), n as f64);
    }
    f.head("ferry_store_failed_requests_total", "counter", "Store requests that failed.");
    f.sample("ferry_store_failed_requests_total", "", r.failed as f64);
    f.head("ferry_store_bytes_total", "counter", "Payload bytes sent and received.");
    f.sample("ferry_store_bytes_total", "direction=\"up\"", r.bytes_up as f64);
    f.sample("ferry_store_bytes_total", "direction=\"down\"", r.bytes_down as f64);
    let gc = &state.gc;
    if gc.last_run.is_some() {
        f.head(
            "ferry_repository_size_bytes",
            "gauge",
            "Bytes of chunk objects after the last garbage collection.",
        );
        f.sample("ferry_repository_size_bytes", "", gc.bytes as f64);
        f.head(
            "ferry_repository_chunks",
            "gauge",
            "Chunk objects after the last garbage collection.",
        );
        f.sample("ferry_repository_chunks", "", gc.chunks as f64);
    }
    f.head(
        "ferry_gc_last_run_timestamp_seconds",
        "gauge",
        "When the last GC finished (0: never).",
    );
    f.sample("ferry_gc_last_run_timestamp_seconds", "", ts(gc.last_run));
    f.head("ferry_gc_last_success", "gauge", "1 if the last GC succeeded.");
    f.sample("ferry_gc_last_success", "", if gc.ok { 1.0 } else { 0.0 });
    f.head("ferry_gc_last_duration_seconds", "gauge", "Duration of the last GC.");
    f.sample("ferry_gc_last_duration_seconds", "", gc.seconds);
    if !state.standbys.is_empty() {
        let labels = |k: &str, v: &StandbyState| format!("volume=\"{}\",standby=\"{}\"", esc(&v.volume), esc(k));
        f.head(
            "ferry_standby_last_success",
            "gauge",
            "1 if the last replay of the standby image succeeded.",
        );
        for (k, v) in &state.standbys {
            f.sample("ferry_standby_last_success", &labels(k, v), if v.ok { 1.0 } else { 0.0 });
        }
        f.head(
            "ferry_standby_last_run_timestamp_seconds",
            "gauge",
            "When the last replay finished (0: never).",
        );
        for (k, v) in &state.standbys {
            f.sample("ferry_standby_last_run_timestamp_seconds", &labels(k, v), ts(v.last_run));
        }
        f.head(
            "ferry_standby_lag_seconds",
            "gauge",
            "Age of the backup the standby image is at (+Inf: never replayed).",
        );
        for (k, v) in &state.standbys {
            let lag = match v.backup_created {
                Some(t) => ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0),
                None => f64::INFINITY,
            };
            f.sample("ferry_standby_lag_seconds", &labels(k, v), lag);
        }
        f.head("ferry_standby_last_duration_seconds", "gauge", "Duration of the last replay.");
        for (k, v) in &state.standbys {
            f.sample("ferry_standby_last_duration_seconds", &labels(k, v), v.seconds);
        }
    }
    f.head(
        "ferry_worker_config_reloads_total",
        "counter",
        "Configuration reloads applied (SIGHUP).",
    );
    f.sample("ferry_worker_config_reloads_total", "", state.reloads as f64);
    f.head(
        "ferry_worker_config_reload_failures_total",
        "counter",
        "Configuration reloads refused (the previous configuration stays).",
    );
    f.sample("ferry_worker_config_reload_failures_total", "", state.reload_failures as f64);
    f.head("ferry_worker_start_time_seconds", "gauge", "When the worker started.");
    f.sample("ferry_worker_start_time_seconds", "", ts(state.started));
    f.head("ferry_build_info", "gauge", "ferry's version.");
    f.sample("ferry_build_info", &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")), 1.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_backed_up_volumes_show_as_such() {
        let now = Utc::now();
        let mut s = WorkerState::default();
        s.volumes.insert(
            "rbd.a".into(),
            VolumeState {
                selection: "s".into(),
                pool: "rbd".into(),
                image: "a".into(),
                selected: true,
                last_success: Some(now - chrono::Duration::seconds(90)),
                backups_total: 2,
                ..Default::default()
            },
        );
        s.volumes.insert(
            "rbd.b".into(),
            VolumeState {
                selection: "s".into(),
                pool: "rbd".into(),
                image: "b\"q".into(),
                selected: true,
                ..Default::default()
            },
        );
        s.volumes.insert(
            "rbd.gone".into(),
            VolumeState {
                selected: false,
                ..Default::default()
            },
        );
        let m = render_metrics(&s, &Gauges::default(), now);
        assert!(
            m.contains("ferry_volume_freshness_seconds{volume=\"rbd.a\",selection=\"s\",pool=\"rbd\",image=\"a\"} 90\n"),
            "{m}"
        );
        assert!(
            m.contains("ferry_volume_freshness_seconds{volume=\"rbd.b\",selection=\"s\",pool=\"rbd\",image=\"b\\\"q\"} +Inf\n"),
            "{m}"
        );
        assert!(m.contains("ferry_volume_backed_up{volume=\"rbd.b\""));
        assert!(!m.contains("rbd.gone"));
        assert!(m.contains("ferry_volume_backups_total{volume=\"rbd.a\",selection=\"s\",pool=\"rbd\",image=\"a\"} 2\n"));
        // Every sample line belongs to a declared family.
        let mut declared = std::collections::BTreeSet::new();
        for line in m.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{line}");
            }
        }
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = WorkerState {
            pid: 7,
            ..Default::default()
        };
        s.volumes.insert("v".into(), VolumeState::default());
        s.save(dir.path()).unwrap();
        let back = WorkerState::load(dir.path()).unwrap();
        assert_eq!(back.pid, 7);
        assert!(back.volumes.contains_key("v"));
    }
}
