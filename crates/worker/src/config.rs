//! The worker's configuration: the `[worker]`, `[gc]`, `[clusters.*]` and `[[selection]]`
//! sections of the TOML file every ferry command reads (`[repository]` and `[s3]` belong to
//! the binary, `[ceph]` is the default cluster). Parsed strictly — an unknown key is an
//! error — and checked as a whole before anything starts: every problem is reported with the
//! file, the key and the reason ([`ConfigError`]). Secrets are never read from here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveTime;
use ferry_engine::Ceph;
use ferry_repo::retention::KeepPolicy;
use serde::Deserialize;

use crate::cron::Cron;
use crate::select::Pattern;
use crate::units::{parse_clock, parse_duration, parse_size};

/// The whole file as TOML sees it. `repository` and `s3` are the binary's to check.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    repository: Option<toml::Value>,
    s3: Option<toml::Value>,
    ceph: Option<RawCluster>,
    #[serde(default)]
    clusters: BTreeMap<String, RawCluster>,
    worker: Option<RawWorker>,
    gc: Option<RawGc>,
    #[serde(default)]
    selection: Vec<RawSelection>,
    #[serde(default)]
    standby: Vec<RawStandby>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStandby {
    volume: Option<String>,
    onto: Option<String>,
    cluster: Option<String>,
    schedule: Option<OneOrMany>,
    force: Option<bool>,
    keep_snapshots: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    conf: Option<PathBuf>,
    keyring: Option<PathBuf>,
    id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    state_dir: Option<PathBuf>,
    concurrency: Option<usize>,
    jobs: Option<usize>,
    lease: Option<String>,
    metrics: Option<String>,
    stop_timeout: Option<String>,
    retries: Option<u32>,
    retry_delay: Option<String>,
    upload_limit: Option<String>,
    #[serde(default)]
    bandwidth: Vec<RawWindow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    from: String,
    to: String,
    limit: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    schedule: Option<OneOrMany>,
    ack_timeout: Option<String>,
    grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelection {
    name: Option<String>,
    cluster: Option<String>,
    pool: Option<String>,
    images: Option<OneOrMany>,
    cinder_volumes: Option<Vec<String>>,
    cinder_pool: Option<String>,
    cinder_template: Option<String>,
    nova_instances: Option<Vec<String>>,
    nova_pool: Option<String>,
    volume: Option<String>,
    schedule: Option<OneOrMany>,
    keep: Option<RawKeep>,
    keep_snapshots: Option<usize>,
    verify_blocks: Option<usize>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    hooks: Option<RawHooks>,
    notify: Option<RawNotify>,
    drill: Option<RawDrill>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeep {
    last: Option<u32>,
    hourly: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    monthly: Option<u32>,
    yearly: Option<u32>,
    within: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    pre: Option<Vec<String>>,
    post: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default)]
    on_success: Vec<RawNotifier>,
    #[serde(default)]
    on_failure: Vec<RawNotifier>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifier {
    command: Option<Vec<String>>,
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrill {
    every: Option<u32>,
    schedule: Option<OneOrMany>,
    pool: Option<String>,
}

/// The validated configuration of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The file it came from.
    pub file: PathBuf,
    /// Source clusters by name; `default` is the `[ceph]` section (or Ceph's own defaults).
    pub clusters: BTreeMap<String, Ceph>,
    /// Worker-wide settings.
    pub worker: WorkerSettings,
    /// Scheduled garbage collection.
    pub gc: Option<GcSettings>,
    /// What to back up, when, and how long to keep it.
    pub selections: Vec<Selection>,
    /// `[[standby]]`: standby images kept current by replays (the DR site's worker).
    pub standbys: Vec<Standby>,
}

/// One `[[standby]]`: a volume replayed onto an RBD image of a (DR) cluster on a schedule.
#[derive(Debug, Clone)]
pub struct Standby {
    /// The volume.
    pub volume: String,
    /// The standby image's pool.
    pub pool: String,
    /// The standby image.
    pub image: String,
    /// The cluster the image is in (`[clusters.NAME]`, default `default`).
    pub cluster: String,
    /// When to replay.
    pub schedule: Vec<Cron>,
    /// Overwrite a diverged image.
    pub force: bool,
    /// Standby snapshots to keep.
    pub keep_snapshots: usize,
}

/// The `[worker]` section.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where `status.json` is kept (for `ferry status`).
    pub state_dir: PathBuf,
    /// Volumes backed up at once.
    pub concurrency: usize,
    /// Blocks in flight per backup (CPU and upload parallelism).
    pub jobs: usize,
    /// The per-image lease (a worker killed mid-backup loses it after this long).
    pub lease: Duration,
    /// Where `/metrics` and `/healthz` are served (`None`: not served).
    pub metrics: Option<SocketAddr>,
    /// How long running backups may take to finish after SIGTERM before they are cancelled.
    pub stop_timeout: Duration,
    /// Retries of a volume's run after a transient failure.
    pub retries: u32,
    /// The first retry's delay (doubling after each).
    pub retry_delay: Duration,
    /// Upload bandwidth limits.
    pub bandwidth: Bandwidth,
}

/// Upload limits by time of day (local time), shared by all connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Outside every window (`None`: unlimited).
    pub default: Option<u64>,
    /// The first window containing the time wins.
    pub windows: Vec<Window>,
}

/// `from`–`to` (wrapping past midnight when `to` ≤ `from`) at `limit` bytes per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Start, inclusive.
    pub from: NaiveTime,
    /// End, exclusive.
    pub to: NaiveTime,
    /// Bytes per second (`None`: unlimited).
    pub limit: Option<u64>,
}

impl Window {
    /// True when `t` is inside the window.
    pub fn contains(&self, t: NaiveTime) -> bool {
        if self.from < self.to {
            self.from <= t && t < self.to
        } else {
            t >= self.from || t < self.to
        }
    }
}

impl Bandwidth {
    /// Whether any limit is configured at all.
    pub fn is_limited(&self) -> bool {
        self.default.is_some() || self.windows.iter().any(|w| w.limit.is_some())
    }

    /// The limit at local time `t`.
    pub fn limit_at(&self, t: NaiveTime) -> Option<u64> {
        match self.windows.iter().find(|w| w.contains(t)) {
            Some(w) => w.limit,
            None => self.default,
        }
    }
}

/// The `[gc]` section.
#[derive(Debug, Clone)]
pub struct GcSettings {
    /// When to collect.
    pub schedule: Vec<Cron>,
    /// How long a GC waits for running backups to acknowledge it.
    pub ack_timeout: Duration,
    /// Never delete chunks younger than this.
    pub grace: Duration,
}

/// One `[[selection]]`.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Its name (unique; a label of every backup it makes).
    pub name: String,
    /// The source cluster's name.
    pub cluster: String,
    /// What it selects.
    pub selectors: Vec<Selector>,
    /// The volume name of an image: `{pool}`, `{image}` and `{uuid}` are replaced.
    pub volume_template: String,
    /// When it runs.
    pub schedule: Vec<Cron>,
    /// Retention applied after each backup (`None`: keep everything).
    pub keep: Option<KeepPolicy>,
    /// Ferry snapshots kept on each image.
    pub keep_snapshots: usize,
    /// Unchanged blocks re-read after an incremental.
    pub verify_blocks: usize,
    /// Labels recorded in every manifest.
    pub labels: BTreeMap<String, String>,
    /// Commands around the snapshot.
    pub hooks: Option<Hooks>,
    /// Who hears about results.
    pub notify: Notify,
    /// The restore drill.
    pub drill: Option<Drill>,
}

/// Which images a selection names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Images of a pool by name or glob (`*` = every image).
    Images {
        /// The pool.
        pool: String,
        /// Names or globs.
        patterns: Vec<Pattern>,
    },
    /// Cinder volumes by UUID: image `template` with `{uuid}` replaced, in `pool`.
    Cinder {
        /// The pool (default `volumes`).
        pool: String,
        /// The image name template (default `volume-{uuid}`).
        template: String,
        /// Volume UUIDs.
        uuids: Vec<String>,
    },
    /// Nova instances' RBD disks: images `<uuid>_disk*` in `pool`.
    Nova {
        /// The ephemeral pool (default `vms`).
        pool: String,
        /// Instance UUIDs.
        uuids: Vec<String>,
    },
}

/// Commands run around the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    /// Before the snapshot; failing (or timing out) cancels the volume's run.
    pub pre: Option<Vec<String>>,
    /// After the snapshot (also after a failed pre-hook): e.g. a thaw.
    pub post: Option<Vec<String>>,
    /// Each command's time limit; a command still running then is killed.
    pub timeout: Duration,
}

/// Notifications of a selection's results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notify {
    /// After a committed backup.
    pub on_success: Vec<Notifier>,
    /// After a failed run (after its retries).
    pub on_failure: Vec<Notifier>,
    /// Time limit of each notification.
    pub timeout: Duration,
}

/// One notification target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notifier {
    /// A command; the event is its stdin (JSON) and in `FERRY_EVENT_*` variables.
    Command(Vec<String>),
    /// An HTTP(S) POST of the event as JSON.
    Http(String),
}

/// The restore drill of a selection.
#[derive(Debug, Clone)]
pub struct Drill {
    /// After every Nth successful backup of a volume.
    pub every: Option<u32>,
    /// On its own schedule.
    pub schedule: Vec<Cron>,
    /// Where the scratch image goes (default: the volume's pool).
    pub pool: Option<String>,
}

/// One problem in a configuration: the key (`selection[1].schedule[0]`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted path of the key.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The problems, in file order.
    pub issues: Vec<Issue>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.issues.len();
        write!(
            f,
            "configuration {} has {n} problem{}:",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for i in &self.issues {
            write!(f, "\n  {}: {}: {}", self.file.display(), i.key, i.reason)?;
        }
        Ok(())
    }
}

/// Collects issues while the file is checked.
struct Check {
    issues: Vec<Issue>,
}

impl Check {
    fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.issues.push(Issue {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// A duration between 1 ms and 7 days (longer ones are mistakes, and overflow timers).
    fn duration(&mut self, key: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => {
                    self.add(key, format!("'{s}' is zero"));
                    default
                }
                Ok(d) if d > Duration::from_secs(7 * 86400) => {
                    self.add(key, format!("'{s}' is longer than 7 days"));
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.add(key, e);
                    default
                }
            },
        }
    }

    fn schedule(&mut self, key: &str, v: &Option<OneOrMany>) -> Vec<Cron> {
        let list = v.as_ref().map(|v| v.list()).unwrap_or_default();
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match s.parse::<Cron>() {
                Ok(c) => out.push(c),
                Err(e) => self.add(format!("{key}[{i}]"), format!("invalid cron expression {e}")),
            }
        }
        out
    }

    fn readable(&mut self, key: &str, path: &Path, what: &str) {
        if let Err(e) = std::fs::File::open(path) {
            self.add(key, format!("{what} {} cannot be read: {e}", path.display()));
        }
    }

    fn command(&mut self, key: &str, argv: &[String]) {
        match argv.first() {
            None => self.add(key, "an empty command (give [\"program\", \"arg\", ...])"),
            Some(p) if p.contains('/') => {
                if !Path::new(p).is_file() {
                    self.add(key, format!("program {p} does not exist"));
                }
            }
            Some(p) => {
                let on_path = std::env::var_os("PATH")
                    .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
                    .unwrap_or(false);
                if !on_path {
                    self.add(key, format!("program '{p}' is not on PATH"));
                }
            }
        }
    }
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Default state directory: `$STATE_DIRECTORY` (systemd), else `/var/lib/ferry` as root,
/// else `$XDG_STATE_HOME/ferry` or `~/.local/state/ferry`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/ferry");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("ferry");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/ferry"),
        None => PathBuf::from(".ferry-state"),
    }
}

impl WorkerConfig {
    /// Reads and checks `file`.
    pub fn load(file: &Path) -> Result<WorkerConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            issues: vec![Issue {
                key: "(file)".into(),
                reason: format!("cannot be read: {e}"),
            }],
        })?;
        WorkerConfig::parse(file, &text)
    }

    /// Checks `text` as the contents of `file`.
    pub fn parse(file: &Path, text: &str) -> Result<WorkerConfig, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (key, reason) = toml_issue(text, &e);
            ConfigError {
                file: file.to_path_buf(),
                issues: vec![Issue { key, reason }],
            }
        })?;
        let mut c = Check { issues: Vec::new() };
        let _ = (&raw.repository, &raw.s3);

        // Clusters.
        let mut clusters = BTreeMap::new();
        let mut raw_clusters: Vec<(String, String, RawCluster)> = Vec::new();
        raw_clusters.push(("default".into(), "ceph".into(), raw.ceph.clone().unwrap_or_default()));
        for (name, rc) in &raw.clusters {
            if name == "default" {
                c.add(
                    "clusters.default",
                    "'default' is the [ceph] section; give this cluster another name",
                );
                continue;
            }
            raw_clusters.push((name.clone(), format!("clusters.{name}"), rc.clone()));
        }
        for (name, key, rc) in raw_clusters {
            if let Some(p) = &rc.conf {
                c.readable(&format!("{key}.conf"), p, "ceph.conf");
            }
            if let Some(p) = &rc.keyring {
                c.readable(&format!("{key}.keyring"), p, "keyring");
            }
            clusters.insert(
                name,
                Ceph {
                    config: ferry_ceph::CephConfig {
                        conf: rc.conf,
                        keyring: rc.keyring,
                        client_id: rc.id,
                    },
                    rbd_program: None,
                },
            );
        }

        // [worker]
        let w = raw.worker.unwrap_or_default();
        let metrics = match w.metrics.as_deref() {
            None | Some("") => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    c.add("worker.metrics", format!("'{a}' is not an address:port (e.g. 127.0.0.1:9478)"));
                    None
                }
            },
        };
        let positive = |c: &mut Check, key: &str, v: Option<usize>, default: usize| match v {
            Some(0) => {
                c.add(key, "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        };
        let concurrency = positive(&mut c, "worker.concurrency", w.concurrency, 2);
        let jobs = positive(&mut c, "worker.jobs", w.jobs, ferry_engine::default_jobs());
        let lease = c.duration("worker.lease", &w.lease, Duration::from_secs(60));
        if lease < Duration::from_secs(2) {
            c.add("worker.lease", "must be at least 2s (it is renewed at a third of its length)");
        }
        let stop_timeout = c.duration("worker.stop_timeout", &w.stop_timeout, Duration::from_secs(60));
        let retry_delay = c.duration("worker.retry_delay", &w.retry_delay, Duration::from_secs(30));
        let default_limit = match &w.upload_limit {
            None => None,
            Some(s) => match parse_limit(s) {
                Ok(v) => v,
                Err(e) => {
                    c.add("worker.upload_limit", e);
                    None
                }
            },
        };
        let mut windows = Vec::new();
        for (i, rw) in w.bandwidth.iter().enumerate() {
            let key = format!("worker.bandwidth[{i}]");
            let from = parse_clock(&rw.from).map_err(|e| c.add(format!("{key}.from"), e)).ok();
            let to = parse_clock(&rw.to).map_err(|e| c.add(format!("{key}.to"), e)).ok();
            let limit = parse_limit(&rw.limit).map_err(|e| c.add(format!("{key}.limit"), e)).ok();
            if let (Some(from), Some(to), Some(limit)) = (from, to, limit) {
                if from == to {
                    c.add(&key, "from and to are equal: an empty window");
                }
                windows.push(Window { from, to, limit });
            }
        }
        let worker = WorkerSettings {
            state_dir: w.state_dir.unwrap_or_else(default_state_dir),
            concurrency,
            jobs,
            lease,
            metrics,
            stop_timeout,
            retries: w.retries.unwrap_or(3),
            retry_delay,
            bandwidth: Bandwidth {
                default: default_limit,
                windows,
            },
        };

        // [gc]
        let gc = raw.gc.map(|g| {
            let schedule = c.schedule("gc.schedule", &g.schedule);
            if g.schedule.is_none() {
                c.add("gc.schedule", "missing: when should garbage collection run (a cron expression)?");
            }
            GcSettings {
                schedule,
                ack_timeout: c.duration("gc.ack_timeout", &g.ack_timeout, Duration::from_secs(60)),
                grace: match &g.grace {
                    Some(v) if parse_duration(v) == Ok(Duration::ZERO) => Duration::ZERO,
                    v => c.duration("gc.grace", v, Duration::ZERO),
                },
            }
        });

        // [[selection]]
        let mut selections = Vec::new();
        let mut names = BTreeSet::new();
        for (i, rs) in raw.selection.into_iter().enumerate() {
            let key = |k: &str| format!("selection[{i}].{k}");
            let name = match &rs.name {
                Some(n) if !n.is_empty() && n.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)) => n.clone(),
                Some(n) => {
                    c.add(key("name"), format!("'{n}' is not a name (letters, digits, '.', '_', '-')"));
                    format!("selection-{i}")
                }
                None => {
                    c.add(key("name"), "missing: every selection needs a name");
                    format!("selection-{i}")
                }
            };
            if !names.insert(name.clone()) {
                c.add(key("name"), format!("'{name}' is used by an earlier selection"));
            }
            let cluster = rs.cluster.clone().unwrap_or_else(|| "default".into());
            if !clusters.contains_key(&cluster) {
                c.add(key("cluster"), format!("no cluster '{cluster}' (define [clusters.{cluster}])"));
            }
            let mut selectors = Vec::new();
            if let Some(images) = &rs.images {
                let Some(pool) = rs.pool.clone() else {
                    c.add(key("pool"), "missing: 'images' needs the pool they are in");
                    continue;
                };
                let mut patterns = Vec::new();
                for (j, p) in images.list().iter().enumerate() {
                    match Pattern::parse(p) {
                        Ok(p) => patterns.push(p),
                        Err(e) => c.add(format!("selection[{i}].images[{j}]"), e),
                    }
                }
                selectors.push(Selector::Images { pool, patterns });
            } else if rs.pool.is_some() {
                c.add(key("images"), "missing: name images, globs, or \"*\" for every image of the pool");
            }
            if let Some(uuids) = &rs.cinder_volumes {
                for (j, u) in uuids.iter().enumerate() {
                    if !is_uuid(u) {
                        c.add(format!("selection[{i}].cinder_volumes[{j}]"), format!("'{u}' is not a UUID"));
                    }
                }
                let template = rs.cinder_template.clone().unwrap_or_else(|| "volume-{uuid}".into());
                if !template.contains("{uuid}") {
                    c.add(key("cinder_template"), format!("'{template}' does not contain {{uuid}}"));
                }
                selectors.push(Selector::Cinder {
                    pool: rs.cinder_pool.clone().unwrap_or_else(|| "volumes".into()),
                    template,
                    uuids: uuids.iter().map(|u| u.to_ascii_lowercase()).collect(),
                });
            } else if rs.cinder_pool.is_some() || rs.cinder_template.is_some() {
                c.add(key("cinder_volumes"), "missing: cinder_pool/cinder_template need the volume UUIDs");
            }
            if let Some(uuids) = &rs.nova_instances {
                for (j, u) in uuids.iter().enumerate() {
                    if !is_uuid(u) {
                        c.add(format!("selection[{i}].nova_instances[{j}]"), format!("'{u}' is not a UUID"));
                    }
                }
                selectors.push(Selector::Nova {
                    pool: rs.nova_pool.clone().unwrap_or_else(|| "vms".into()),
                    uuids: uuids.iter().map(|u| u.to_ascii_lowercase()).collect(),
                });
            } else if rs.nova_pool.is_some() {
                c.add(key("nova_instances"), "missing: nova_pool needs the instance UUIDs");
            }
            if selectors.is_empty() {
                c.add(
                    key("images"),
                    "the selection selects nothing: give pool + images, cinder_volumes or nova_instances",
                );
            }
            let schedule = c.schedule(&key("schedule"), &rs.schedule);
            if rs.schedule.is_none() {
                c.add(key("schedule"), "missing: when should this selection run (a cron expression)?");
            }
            let volume_template = rs.volume.clone().unwrap_or_else(|| "{pool}.{image}".into());
            let probe = volume_template
                .replace("{pool}", "p")
                .replace("{image}", "i")
                .replace("{uuid}", "u");
            if let Err(e) = ferry_repo::validate_volume_name(&probe) {
                c.add(key("volume"), format!("'{volume_template}' does not make a volume name: {e}"));
            } else if !volume_template.contains("{image}") && !volume_template.contains("{uuid}") {
                c.add(
                    key("volume"),
                    format!("'{volume_template}' names every image alike: use {{image}} or {{uuid}}"),
                );
            }
            let keep = rs.keep.as_ref().map(|k| KeepPolicy {
                last: k.last,
                hourly: k.hourly,
                daily: k.daily,
                weekly: k.weekly,
                monthly: k.monthly,
                yearly: k.yearly,
                within: k.within.as_ref().and_then(|w| {
                    ferry_repo::retention::parse_period(w)
                        .map_err(|e| c.add(format!("selection[{i}].keep.within"), e))
                        .ok()
                }),
            });
            if keep.as_ref().is_some_and(|k| k.is_empty()) {
                c.add(key("keep"), "no keep option (last, hourly, daily, weekly, monthly, yearly, within)");
            }
            if rs.keep_snapshots == Some(0) {
                c.add(key("keep_snapshots"), "must be at least 1: the newest snapshot is the next base");
            }
            let hooks = rs.hooks.as_ref().map(|h| {
                if let Some(pre) = &h.pre {
                    c.command(&format!("selection[{i}].hooks.pre"), pre);
                }
                if let Some(post) = &h.post {
                    c.command(&format!("selection[{i}].hooks.post"), post);
                }
                Hooks {
                    pre: h.pre.clone(),
                    post: h.post.clone(),
                    timeout: c.duration(&format!("selection[{i}].hooks.timeout"), &h.timeout, Duration::from_secs(60)),
                }
            });
            let mut notify = Notify {
                timeout: Duration::from_secs(30),
                ..Default::default()
            };
            if let Some(n) = &rs.notify {
                notify.timeout = c.duration(&format!("selection[{i}].notify.timeout"), &n.timeout, Duration::from_secs(30));
                for (which, list, out) in [
                    ("on_success", &n.on_success, &mut notify.on_success),
                    ("on_failure", &n.on_failure, &mut notify.on_failure),
                ] {
                    for (j, rn) in list.iter().enumerate() {
                        let k = format!("selection[{i}].notify.{which}[{j}]");
                        match (&rn.command, &rn.url) {
                            (Some(cmd), None) => {
                                c.command(&format!("{k}.command"), cmd);
                                out.push(Notifier::Command(cmd.clone()));
                            }
                            (None, Some(url)) => {
                                if url.starts_with("http://") || url.starts_with("https://") {
                                    out.push(Notifier::Http(url.clone()));
                                } else {
                                    c.add(format!("{k}.url"), format!("'{url}' is not an http:// or https:// URL"));
                                }
                            }
                            _ => c.add(k, "give exactly one of command or url"),
                        }
                    }
                }
            }
            let drill = rs.drill.as_ref().map(|d| {
                let schedule = c.schedule(&format!("selection[{i}].drill.schedule"), &d.schedule);
                if d.every == Some(0) {
                    c.add(format!("selection[{i}].drill.every"), "must be at least 1");
                }
                if d.every.is_none() && d.schedule.is_none() {
                    c.add(format!("selection[{i}].drill"), "give every (after every Nth backup) or a schedule");
                }
                Drill {
                    every: d.every,
                    schedule,
                    pool: d.pool.clone(),
                }
            });
            for k in rs.labels.keys() {
                if k == "selection" || k.starts_with("openstack.") {
                    c.add(format!("selection[{i}].labels.{k}"), "this label is set by the worker");
                }
            }
            selections.push(Selection {
                name,
                cluster,
                selectors,
                volume_template,
                schedule,
                keep,
                keep_snapshots: rs.keep_snapshots.unwrap_or(1),
                verify_blocks: rs.verify_blocks.unwrap_or(8),
                labels: rs.labels.clone(),
                hooks,
                notify,
                drill,
            });
        }
        // [[standby]]
        let mut standbys: Vec<Standby> = Vec::new();
        for (i, rs) in raw.standby.into_iter().enumerate() {
            let key = |k: &str| format!("standby[{i}].{k}");
            let volume = match rs.volume {
                Some(v) if ferry_repo::validate_volume_name(&v).is_ok() => v,
                Some(v) => {
                    c.add(key("volume"), format!("'{v}' is not a volume name"));
                    continue;
                }
                None => {
                    c.add(key("volume"), "missing: which volume does this standby follow?");
                    continue;
                }
            };
            let target = rs
                .onto
                .as_deref()
                .and_then(|o| o.strip_prefix("rbd:"))
                .and_then(|r| r.split_once('/'));
            let Some((pool, image)) = target.filter(|(p, i)| !p.is_empty() && !i.is_empty() && !i.contains(['/', '@'])) else {
                c.add(key("onto"), "missing or not rbd:POOL/IMAGE: the standby image");
                continue;
            };
            let cluster = rs.cluster.clone().unwrap_or_else(|| "default".into());
            if !clusters.contains_key(&cluster) {
                c.add(key("cluster"), format!("no cluster '{cluster}' (define [clusters.{cluster}])"));
            }
            let schedule = c.schedule(&key("schedule"), &rs.schedule);
            if rs.schedule.is_none() {
                c.add(
                    key("schedule"),
                    "missing: when should this standby be replayed (a cron expression)?",
                );
            }
            if rs.keep_snapshots == Some(0) {
                c.add(
                    key("keep_snapshots"),
                    "must be at least 1: the newest snapshot is the next replay's base",
                );
            }
            if standbys.iter().any(|s| s.pool == pool && s.image == image && s.cluster == cluster) {
                c.add(key("onto"), format!("rbd:{pool}/{image} is the standby of an earlier [[standby]]"));
            }
            standbys.push(Standby {
                volume,
                pool: pool.to_string(),
                image: image.to_string(),
                cluster,
                schedule,
                force: rs.force.unwrap_or(false),
                keep_snapshots: rs.keep_snapshots.unwrap_or(1).max(1),
            });
        }
        if c.issues.is_empty() && selections.is_empty() && standbys.is_empty() {
            c.add(
                "selection",
                "no [[selection]] and no [[standby]]: the worker would have nothing to do",
            );
        }
        if !c.issues.is_empty() {
            return Err(ConfigError {
                file: file.to_path_buf(),
                issues: c.issues,
            });
        }
        Ok(WorkerConfig {
            file: file.to_path_buf(),
            clusters,
            worker,
            gc,
            selections,
            standbys,
        })
    }
}

fn parse_limit(s: &str) -> Result<Option<u64>, String> {
    if s.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    match parse_size(s)? {
        0 => Err("0 would stop every upload; use \"unlimited\" or a rate like 50M (bytes per second)".into()),
        n => Ok(Some(n)),
    }
}

/// The key and reason of a TOML error: the line number, and the message without toml's
/// snippet (which quotes the file).
pub fn toml_issue(text: &str, e: &toml::de::Error) -> (String, String) {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1);
    // The line number only, never the line: it may hold a secret someone misplaced.
    let key = match line {
        Some(l) => format!("line {l}"),
        None => "(file)".into(),
    };
    (key, e.message().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match WorkerConfig::parse(Path::new("w.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.issues.iter().map(|i| format!("{}: {}", i.key, i.reason)).collect(),
        }
    }

    const GOOD: &str = r#"
[worker]
concurrency = 3
lease = "20s"
metrics = "127.0.0.1:9478"
upload_limit = "unlimited"
[[worker.bandwidth]]
from = "08:00"
to = "20:00"
limit = "50M"

[gc]
schedule = "0 4 * * sun"

[[selection]]
name = "dbs"
pool = "rbd"
images = ["db-*", "web"]
schedule = ["*/15 * * * *", "0 3 * * *"]
keep = { last = 3 }
labels = { tier = "gold" }
hooks = { pre = ["true"], post = ["true"], timeout = "5s" }
notify = { on_failure = [{ url = "http://alert.example/hook" }, { command = ["true"] }] }
drill = { every = 5 }

[[selection]]
name = "openstack"
cinder_volumes = ["0b3c6f0e-4a38-4b4e-9a47-1f5e6c1b2a3d"]
nova_instances = ["5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d"]
schedule = "@daily"
"#;

    #[test]
    fn a_good_configuration_parses() {
        let c = WorkerConfig::parse(Path::new("w.toml"), GOOD).unwrap();
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.worker.lease, Duration::from_secs(20));
        assert_eq!(c.selections.len(), 2);
        assert_eq!(c.selections[0].schedule.len(), 2);
        assert_eq!(c.selections[0].keep.unwrap().last, Some(3));
        assert_eq!(c.selections[1].selectors.len(), 2);
        let noon = NaiveTime::from_hms_opt(12, 0, 0).unwrap();
        let night = NaiveTime::from_hms_opt(23, 0, 0).unwrap();
        assert_eq!(c.worker.bandwidth.limit_at(noon), Some(50 << 20));
        assert_eq!(c.worker.bandwidth.limit_at(night), None);
    }

    #[test]
    fn standbys_parse_and_their_problems_are_named() {
        let c = WorkerConfig::parse(
            Path::new("w.toml"),
            "[[standby]]\nvolume = \"rbd.a\"\nonto = \"rbd:dr/a\"\nschedule = \"*/5 * * * *\"\nkeep_snapshots = 2\n",
        )
        .unwrap();
        assert_eq!(c.selections.len(), 0);
        assert_eq!((c.standbys[0].pool.as_str(), c.standbys[0].image.as_str()), ("dr", "a"));
        assert_eq!((c.standbys[0].keep_snapshots, c.standbys[0].force), (2, false));
        let e = WorkerConfig::parse(
            Path::new("w.toml"),
            "[[standby]]\nvolume = \"rbd.a\"\nonto = \"dr/a\"\nschedule = \"*/5 * * * *\"\n[[standby]]\nvolume = \"rbd.b\"\nonto = \"rbd:dr/b\"\nkeep_snapshots = 0\ncluster = \"x\"\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = e.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "standby[0].onto",
                "standby[1].cluster",
                "standby[1].schedule",
                "standby[1].keep_snapshots"
            ],
            "{e:?}"
        );
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let w = Window {
            from: parse_clock("22:00").unwrap(),
            to: parse_clock("06:00").unwrap(),
            limit: Some(1),
        };
        assert!(w.contains(parse_clock("23:30").unwrap()));
        assert!(w.contains(parse_clock("05:59").unwrap()));
        assert!(!w.contains(parse_clock("06:00").unwrap()));
        assert!(!w.contains(parse_clock("12:00").unwrap()));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let p = problems(
            r#"
[ceph]
keyring = "/nonexistent/keyring"
[worker]
metrics = "nowhere"
lease = "10"
stop_timeout = "30d"
[[worker.bandwidth]]
from = "8:00"
to = "25:00"
limit = "0"
[[selection]]
name = "a"
pool = "rbd"
images = "*"
schedule = "61 * * * *"
keep = {}
hooks = { pre = ["/no/such/freeze"] }
notify = { on_success = [{ url = "ftp://x" }] }
[[selection]]
name = "a"
cinder_volumes = ["not-a-uuid"]
schedule = "@daily"
cluster = "dr"
"#,
        );
        let want = [
            "ceph.keyring: keyring /nonexistent/keyring cannot be read",
            "worker.metrics: 'nowhere' is not an address",
            "worker.lease: '10': give a unit",
            "worker.stop_timeout: '30d' is longer than 7 days",
            "worker.bandwidth[0].to: '25:00' is not a time of day",
            "worker.bandwidth[0].limit: 0 would stop every upload",
            "selection[0].schedule[0]: invalid cron expression '61 * * * *': minute 61 is out of range",
            "selection[0].keep: no keep option",
            "selection[0].hooks.pre: program /no/such/freeze does not exist",
            "selection[0].notify.on_success[0].url: 'ftp://x' is not an http",
            "selection[1].name: 'a' is used by an earlier selection",
            "selection[1].cluster: no cluster 'dr'",
            "selection[1].cinder_volumes[0]: 'not-a-uuid' is not a UUID",
        ];
        for w in want {
            assert!(p.iter().any(|x| x.starts_with(w)), "missing {w:?} in {p:#?}");
        }
    }

    #[test]
    fn unknown_keys_and_types_name_the_line() {
        let p = problems("[worker]\nconcurency = 3\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("line 2") && p[0].contains("unknown field `concurency`"), "{p:?}");
        let p = problems("[worker]\npassword = \"hunter2\"\n");
        assert!(p[0].contains("line 2") && !p[0].contains("hunter2"), "{p:?}");
        let p = problems("[[selection]]\nname = 3\n");
        assert!(p[0].contains("line 2") && p[0].contains("invalid type"), "{p:?}");
        assert!(problems("")[0].contains("no [[selection]]"));
        assert!(problems("[[selection]]\nname = \"x\"\nschedule = \"@daily\"\n")[0].contains("selects nothing"));
    }
}
