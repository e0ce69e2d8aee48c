//! Issue 10 acceptance: `ferry worker` against the real cluster — schedules over real RBD
//! images with writes between cycles, retention, new images picked up, cinder selection by
//! UUID, failing and hung hooks, metrics scraped, two workers sharing one configuration with
//! one killed mid-backup, SIGTERM mid-backup, the bandwidth limit, bad configurations.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ceph::apply;
use crate::util::{cluster, hash_file, unique, Cluster, ImageGuard, Repo};

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        let r: u64 = rand::random();
        chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// A running `ferry worker`, its stderr collected in a file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(repo: &Repo, config: &Path, tag: &str) -> Daemon {
        let log = repo.path(&format!("worker-{tag}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = repo
            .cmd(&["--config", config.to_str().expect("utf8"), "worker"])
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn worker");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit; its exit code, or None after `limit`.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scrape(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `name{...volume="V"...} value` for every volume.
fn metric(text: &str, name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let Some(rest) = rest.strip_prefix('{') else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        if let Some(v) = labels.split("volume=\"").nth(1).and_then(|s| s.split('"').next()) {
            out.insert(v.to_string(), value.trim().to_string());
        }
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool, context: impl Fn() -> String) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Backups of `volume`, oldest first, as `ferry ls --json` gives them.
fn backups(repo: &Repo, volume: &str) -> Vec<serde_json::Value> {
    let out = repo.run(&["ls", volume, "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn created(b: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    b["created"].as_str().expect("created").parse().expect("rfc3339")
}

fn ferry_snaps(c: &Cluster, image: &str) -> Vec<String> {
    c.snaps(image).into_iter().filter(|s| s.starts_with("ferry-")).collect()
}

/// Lockers of an image's lease (empty when the lease object does not exist).
fn lease_cookies(c: &Cluster, pool: &str, image: &str) -> Vec<String> {
    let mut cmd = Command::new("rados");
    cmd.args([
        "-p",
        pool,
        "lock",
        "info",
        &format!("ferry.lease.{image}"),
        "ferry.lease",
        "--format",
        "json",
    ])
    .stdin(Stdio::null());
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    let Ok(out) = cmd.output() else { return Vec::new() };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    v["lockers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["cookie"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn restore_equals_snapshot(c: &Cluster, repo: &Repo, volume: &str, b: &serde_json::Value, image: &str) {
    let id = b["backup_id"].as_str().expect("id");
    let snap = b["to_snap"].as_str().expect("to_snap");
    let out = repo.path(&format!("{volume}-{id}.raw"));
    repo.ok(&["restore", &format!("{volume}@{id}"), "--to", out.to_str().expect("utf8")]);
    assert_eq!(
        hash_file(&out),
        c.export_hash(&format!("{image}@{snap}")),
        "backup {id} of {volume} differs from {image}@{snap}"
    );
    let _ = std::fs::remove_file(out);
}

/// A worker on a 6-second schedule over three images (a glob), a cinder volume selected by
/// UUID, and two images whose pre-hooks fail and hang; writes between cycles. One backup per
/// image per tick, every kept backup restores bit-exactly to its snapshot, keep-last 3 holds, a
/// new image is picked up, the failing volumes stay never backed up in the metrics and do not
/// stop the others, the post-hook runs after a failed pre-hook, SIGTERM stops it promptly.
#[test]
fn a_scheduled_worker_backs_up_each_image_once_per_tick_on_rgw() {
    let c = cluster();
    let repo = c.s3_repo();
    let mut guard = ImageGuard::new(c);
    let prefix = unique("wk");
    let uuid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        rand::random::<u32>(),
        rand::random::<u16>(),
        rand::random::<u16>() & 0xfff,
        rand::random::<u16>() & 0xfff,
        rand::random::<u64>() & 0xffff_ffff_ffff
    );
    let images: Vec<String> = ["a", "b", "c"].iter().map(|s| guard.add(&format!("rbd/{prefix}-{s}"))).collect();
    let cinder = guard.add(&format!("rbd/volume-{uuid}"));
    let instance = uuid.replace('-', "").chars().rev().collect::<String>();
    let instance = format!(
        "{}-{}-{}-{}-{}",
        &instance[..8],
        &instance[8..12],
        &instance[12..16],
        &instance[16..20],
        &instance[20..]
    );
    let nova = guard.add(&format!("rbd/{instance}_disk"));
    let failing = guard.add(&format!("rbd/{prefix}x-fail"));
    let hung = guard.add(&format!("rbd/{prefix}x-hung"));
    for img in images.iter().chain([&cinder, &nova, &failing, &hung]) {
        c.rbd(&["create", "--size", "8M", "--object-size", "1M", img]);
        apply(c, img, 8 * MIB, &[(0, Some(random_bytes(3 * MIB as usize)), 0)]);
    }
    let port = free_port();
    let thawed = repo.path("thawed");
    let config = repo.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
metrics = "127.0.0.1:{port}"
lease = "10s"
stop_timeout = "20s"
concurrency = 4
jobs = 4

[gc]
schedule = "5/20 * * * * *"
ack_timeout = "30s"

[[selection]]
name = "glob"
pool = "rbd"
images = "{prefix}-*"
schedule = "*/6 * * * * *"
keep = {{ last = 3 }}
keep_snapshots = 3

[[selection]]
name = "cinder"
cinder_volumes = ["{uuid}"]
cinder_pool = "rbd"
nova_instances = ["{instance}"]
nova_pool = "rbd"
schedule = "*/6 * * * * *"
keep = {{ last = 3 }}
drill = {{ every = 2 }}

[[selection]]
name = "failing"
pool = "rbd"
images = ["{prefix}x-fail"]
schedule = "*/6 * * * * *"
hooks = {{ pre = ["sh", "-c", "echo freeze refused >&2; exit 7"], post = ["sh", "-c", "touch {thawed}-$FERRY_IMAGE"], timeout = "5s" }}

[[selection]]
name = "hung"
pool = "rbd"
images = ["{prefix}x-hung"]
schedule = "*/6 * * * * *"
hooks = {{ pre = ["sleep", "60"], timeout = "1s" }}
"#,
            state = repo.path("state").display(),
            thawed = thawed.display(),
        ),
    )
    .expect("config");

    // --check resolves the selections and names every volume.
    let plan = repo.json(&["--config", config.to_str().expect("utf8"), "worker", "--check"]);
    let planned: BTreeSet<String> = plan["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["volume"].as_str().expect("volume").to_string())
        .collect();
    let vol = |img: &str| img.replace('/', ".");
    for img in images.iter().chain([&cinder, &nova, &failing, &hung]) {
        assert!(planned.contains(&vol(img)), "{img} not planned: {plan}");
    }

    let mut d = Daemon::start(&repo, &config, "main");
    // The daemon holds the key: no core dumps.
    std::thread::sleep(Duration::from_millis(500));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap_or_default();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap_or("");
    assert!(core.split_whitespace().nth(4) == Some("0"), "core dumps are enabled: {core:?}");
    let metrics = || scrape(port, "/metrics").unwrap_or_default();
    let count = |v: &str| {
        metric(&metrics(), "ferry_volume_backups_total")
            .get(v)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Writes between the cycles, until four have passed for every image.
    let mut cycles_seen = 0;
    let mut added = false;
    let started = Instant::now();
    while cycles_seen < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "four cycles did not complete in 150 s\n{}\n{}",
            metrics(),
            d.log()
        );
        for img in &images {
            let off = rand::random::<u64>() % (7 * MIB);
            apply(c, img, 8 * MIB, &[(off & !4095, Some(random_bytes(64 << 10)), 0)]);
        }
        std::thread::sleep(Duration::from_secs(2));
        // Every selected volume that can succeed, the OpenStack ones too (they share their
        // selection's runs with a drill, so they may lag a tick).
        cycles_seen = images.iter().chain([&cinder, &nova]).map(|i| count(&vol(i))).min().unwrap_or(0);
        if cycles_seen >= 2 && !added {
            added = true;
            // A new image matching the glob: picked up on the next cycle.
            let img = guard.add(&format!("rbd/{prefix}-d"));
            c.rbd(&["create", "--size", "4M", &img]);
            apply(c, &img, 4 * MIB, &[(0, Some(random_bytes(MIB as usize)), 0)]);
            let t = Instant::now();
            wait_for(
                "the new image's first backup",
                Duration::from_secs(30),
                || count(&vol(&img)) >= 1,
                || d.log(),
            );
            eprintln!("new image backed up {:.1} s after it was created", t.elapsed().as_secs_f64());
        }
    }
    let text = metrics();
    assert!(scrape(port, "/healthz").unwrap_or_default().contains("200 OK"));
    // The failing volumes: never backed up, shown as such (not absent), and each run failed.
    for img in [&failing, &hung] {
        let v = vol(img);
        assert_eq!(
            metric(&text, "ferry_volume_backed_up").get(&v).map(String::as_str),
            Some("0"),
            "{text}"
        );
        assert_eq!(
            metric(&text, "ferry_volume_freshness_seconds").get(&v).map(String::as_str),
            Some("+Inf"),
            "{text}"
        );
        let fails: u64 = metric(&text, "ferry_volume_failures_total")[&v].parse().expect("number");
        assert!(fails >= 2, "{v}: {fails} failures\n{text}");
        assert!(
            ferry_snaps(c, img).is_empty(),
            "a failed pre-hook must not leave a snapshot on {img}"
        );
    }
    assert!(
        Path::new(&format!("{}-{}x-fail", thawed.display(), prefix)).exists(),
        "the post-hook did not run after the failed pre-hook"
    );
    assert!(text.contains("ferry_store_requests_total{method=\"put\"}"), "{text}");
    // The restore drill of the cinder volume ran (after its 2nd backup) and left no image.
    let cv = vol(&cinder);
    wait_for(
        "a restore drill",
        Duration::from_secs(30),
        || metric(&metrics(), "ferry_volume_drill_success").get(&cv).map(String::as_str) == Some("1"),
        || format!("{}\n{}", metrics(), d.log()),
    );
    let text = metrics();
    let rto: f64 = metric(&text, "ferry_volume_drill_recovery_seconds")[&cv].parse().expect("seconds");
    eprintln!("restore drill: {rto:.2} s to a complete image");
    assert!(rto > 0.0);
    // Garbage collection ran on its schedule beside the backups.
    wait_for(
        "a garbage collection",
        Duration::from_secs(40),
        || metrics().contains("ferry_gc_last_success 1"),
        || format!("{}\n{}", metrics(), d.log()),
    );
    assert!(metrics().contains("ferry_repository_size_bytes "), "{}", metrics());
    // `ferry status` exits 1 while some volume's last run failed.
    let out = repo.run(&["--config", config.to_str().expect("utf8"), "status"]);
    assert_eq!(out.status.code(), Some(1));
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.contains("freeze refused") && status.contains("exit status 7"), "{status}");
    assert!(status.contains("did not finish within 1s"), "{status}");

    // SIGTERM: the worker stops within its stop timeout (plus a little).
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let code = d.wait(Duration::from_secs(40));
    assert_eq!(code, Some(0), "worker did not exit cleanly after SIGTERM\n{}", d.log());
    eprintln!("worker stopped {:.1} s after SIGTERM", t.elapsed().as_secs_f64());

    // One backup per image per tick; keep-last 3; every kept backup equals its snapshot.
    for img in images.iter().chain([&cinder, &nova]) {
        let v = vol(img);
        let bs = backups(&repo, &v);
        assert_eq!(bs.len(), 3, "{v}: keep-last 3 should leave 3 backups: {bs:#?}");
        let ticks: Vec<i64> = bs.iter().map(|b| created(b).timestamp().div_euclid(6)).collect();
        let distinct: BTreeSet<&i64> = ticks.iter().collect();
        assert_eq!(distinct.len(), ticks.len(), "{v}: two backups in one tick: {ticks:?}");
        let openstack = img == &cinder || img == &nova;
        for b in &bs {
            if img == &cinder {
                assert_eq!(b["labels"]["openstack.cinder_volume"], uuid.as_str(), "{b}");
            }
            if img == &nova {
                assert_eq!(b["labels"]["openstack.nova_instance"], instance.as_str(), "{b}");
            }
            assert_eq!(b["labels"]["selection"], if openstack { "cinder" } else { "glob" });
        }
        if !openstack {
            for b in &bs {
                restore_equals_snapshot(c, &repo, &v, b, img);
            }
        } else {
            restore_equals_snapshot(c, &repo, &v, bs.last().expect("a backup"), img);
        }
        assert!(lease_cookies(c, "rbd", img.split('/').nth(1).expect("name")).is_empty());
    }
    let left: Vec<String> = String::from_utf8_lossy(&c.rbd(&["ls", "rbd"]))
        .lines()
        .filter(|l| l.starts_with("ferry-drill-"))
        .map(String::from)
        .collect();
    assert!(left.is_empty(), "drill images left behind: {left:?}");
    repo.ok(&["audit"]);
}

/// Two workers on one configuration: each image is backed up once per tick; one is killed
/// while it holds the lease of a slow (bandwidth-limited) backup, the other takes over; the
/// audit is clean and the killed worker's snapshot does not linger.
#[test]
fn two_workers_share_the_volumes_and_one_takes_over_from_a_killed_one() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let prefix = unique("wk2");
    let small: Vec<String> = ["a", "b"].iter().map(|s| guard.add(&format!("rbd/{prefix}-{s}"))).collect();
    let big = guard.add(&format!("rbd/{prefix}-big"));
    for img in &small {
        c.rbd(&["create", "--size", "4M", img]);
        apply(c, img, 4 * MIB, &[(0, Some(random_bytes(MIB as usize)), 0)]);
    }
    c.rbd(&["create", "--size", "24M", &big]);
    apply(c, &big, 24 * MIB, &[(0, Some(random_bytes(24 * MIB as usize)), 0)]);
    let config = repo.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
lease = "6s"
stop_timeout = "5s"
upload_limit = "3M"
concurrency = 3

[[selection]]
name = "all"
pool = "rbd"
images = "{prefix}-*"
schedule = "*/20 * * * * *"
"#,
            state = repo.path("state").display()
        ),
    )
    .expect("config");
    let mut a = Daemon::start(&repo, &config, "a");
    let mut b = Daemon::start(&repo, &config, "b");
    let big_name = big.split('/').nth(1).expect("name").to_string();
    // Wait until one of them holds the big image's lease mid-backup, then kill that one.
    let mut holder = None;
    wait_for(
        "a worker to hold the big image's lease",
        Duration::from_secs(60),
        || {
            let cookies = lease_cookies(c, "rbd", &big_name);
            holder = cookies
                .iter()
                .find_map(|ck| [a.pid(), b.pid()].into_iter().find(|p| ck.contains(&format!(" pid {p} "))));
            holder.is_some()
        },
        || format!("{}\n{}", a.log(), b.log()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let holder = holder.expect("holder");
    let (killed, survivor) = if holder == a.pid() { (&mut a, &mut b) } else { (&mut b, &mut a) };
    killed.signal(libc::SIGKILL);
    assert!(killed.wait(Duration::from_secs(10)).is_some());
    let killed_at = chrono::Utc::now();
    // The survivor takes over: the big image gets a backup after the kill.
    let t = Instant::now();
    wait_for(
        "the surviving worker to back up the big image",
        Duration::from_secs(90),
        || backups(&repo, &format!("rbd.{big_name}")).iter().any(|b| created(b) > killed_at),
        || format!("survivor:\n{}\nkilled:\n{}", survivor.log(), killed.log()),
    );
    eprintln!(
        "big image backed up by the survivor {:.1} s after the kill",
        t.elapsed().as_secs_f64()
    );
    // Let another tick pass for the small images, then stop.
    std::thread::sleep(Duration::from_secs(21));
    survivor.signal(libc::SIGTERM);
    assert_eq!(survivor.wait(Duration::from_secs(60)), Some(0), "{}", survivor.log());
    // Never two backups of one image in one tick.
    for img in small.iter().chain([&big]) {
        let v = img.replace('/', ".");
        let bs = backups(&repo, &v);
        assert!(
            !bs.is_empty(),
            "{v} has no backup\nsurvivor:\n{}\nkilled:\n{}",
            survivor.log(),
            killed.log()
        );
        let ticks: Vec<i64> = bs.iter().map(|b| created(b).timestamp().div_euclid(20)).collect();
        let distinct: BTreeSet<&i64> = ticks.iter().collect();
        assert_eq!(distinct.len(), ticks.len(), "{v}: two backups in one tick: {ticks:?}");
        for b in &bs[bs.len().saturating_sub(1)..] {
            restore_equals_snapshot(c, &repo, &v, b, img);
        }
        assert!(
            ferry_snaps(c, img).len() <= 1,
            "{img} keeps a leaked snapshot: {:?}",
            ferry_snaps(c, img)
        );
    }
    repo.ok(&["audit"]);
}

/// SIGTERM while a slow backup runs: the worker exits within its stop timeout plus the
/// bounded cleanup, nothing is half-committed, the new snapshot is gone, the lease released.
#[test]
fn sigterm_during_a_backup_stops_within_the_bound_and_commits_nothing() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let img = guard.add(&format!("rbd/{}", unique("wkterm")));
    c.rbd(&["create", "--size", "32M", &img]);
    apply(c, &img, 32 * MIB, &[(0, Some(random_bytes(32 * MIB as usize)), 0)]);
    let config = repo.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
stop_timeout = "2s"
upload_limit = "2M"

[[selection]]
name = "one"
pool = "rbd"
images = ["{name}"]
schedule = "@daily"
"#,
            state = repo.path("state").display(),
            name = img.split('/').nth(1).expect("name")
        ),
    )
    .expect("config");
    // Never backed up: the worker runs it at once at start.
    let mut d = Daemon::start(&repo, &config, "term");
    wait_for(
        "the backup to start",
        Duration::from_secs(30),
        || d.log().contains("backing up"),
        || d.log(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let code = d.wait(Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(15), "stop took {took:?} (stop timeout 2 s)\n{}", d.log());
    eprintln!("stopped {:.1} s after SIGTERM", took.as_secs_f64());
    let log = d.log();
    assert!(log.contains("cancelling 1 running task"), "{log}");
    let v = img.replace('/', ".");
    assert!(backups(&repo, &v).is_empty(), "a cancelled backup was committed");
    assert!(ferry_snaps(c, &img).is_empty(), "leaked snapshot: {:?}", ferry_snaps(c, &img));
    assert!(lease_cookies(c, "rbd", img.split('/').nth(1).expect("name")).is_empty());
    repo.ok(&["audit"]);
}

/// The upload limit holds within 10 % over a 256 MiB backup of incompressible data.
#[test]
fn the_bandwidth_window_holds_over_a_256_mib_backup() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let img = guard.add(&format!("rbd/{}", unique("wkbw")));
    c.rbd(&["create", "--size", "256M", &img]);
    for i in 0..4u64 {
        apply(c, &img, 256 * MIB, &[(i * 64 * MIB, Some(random_bytes(64 * MIB as usize)), 0)]);
    }
    let limit = 24 * MIB;
    let config = repo.path("worker.toml");
    // A window covering the whole day except one minute, and the same default outside it.
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
upload_limit = "24M"
[[worker.bandwidth]]
from = "00:00"
to = "23:59"
limit = "24M"

[[selection]]
name = "one"
pool = "rbd"
images = ["{name}"]
schedule = "@daily"
"#,
            state = repo.path("state").display(),
            name = img.split('/').nth(1).expect("name")
        ),
    )
    .expect("config");
    let t = Instant::now();
    repo.ok(&["--config", config.to_str().expect("utf8"), "worker", "--once"]);
    let wall = t.elapsed().as_secs_f64();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path("state/status.json")).expect("status.json")).expect("json");
    let v = &state["volumes"][img.replace('/', ".")];
    let up = v["uploaded_bytes_total"].as_u64().expect("uploaded");
    let secs = v["last_duration_seconds"].as_f64().expect("duration");
    assert!(up >= 256 * MIB, "uploaded {up}");
    // The bucket holds one second of the rate as a burst.
    let rate = (up - limit) as f64 / secs;
    eprintln!(
        "uploaded {:.1} MiB in {secs:.2} s (wall {wall:.2} s): {:.1} MiB/s against a limit of 24 MiB/s",
        up as f64 / MIB as f64,
        rate / MIB as f64
    );
    assert!(rate <= limit as f64 * 1.10, "rate {rate} exceeds the limit by more than 10 %");
    assert!(
        rate >= limit as f64 * 0.80,
        "rate {rate} is far below the limit: the limiter is too strict"
    );
}

/// Bad configurations are refused before anything starts, naming file, key and reason.
#[test]
fn bad_worker_configurations_are_refused_with_file_key_and_reason() {
    let repo = Repo::file(&[]);
    let config = repo.path("bad.toml");
    std::fs::write(
        &config,
        r#"
[ceph]
keyring = "/nonexistent/ceph.keyring"
[worker]
metrics = "everywhere"
[[selection]]
name = "x"
pool = "rbd"
images = "*"
schedule = ["*/5 * * * *", "0 25 * * *"]
hooks = { pre = ["/no/such/freeze"] }
"#,
    )
    .expect("config");
    let err = repo.fails(&["--config", config.to_str().expect("utf8"), "worker", "--check"], 2);
    let file = config.display().to_string();
    for want in [
        format!("{file}: ceph.keyring: keyring /nonexistent/ceph.keyring cannot be read"),
        format!("{file}: worker.metrics: 'everywhere' is not an address"),
        format!("{file}: selection[0].schedule[1]: invalid cron expression '0 25 * * *': hour 25 is out of range 0-23"),
        format!("{file}: selection[0].hooks.pre: program /no/such/freeze does not exist"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    std::fs::write(&config, "[worker]\nconcurency = 2\n").expect("config");
    let err = repo.fails(&["--config", config.to_str().expect("utf8"), "worker", "--once"], 2);
    assert!(
        err.contains(&file) && err.contains("line 2") && err.contains("unknown field `concurency`"),
        "{err}"
    );
    // An unreadable passphrase file is named too.
    std::fs::write(
        &config,
        "[repository]\npassword_file = \"/nonexistent/pass\"\n[[selection]]\nname = \"x\"\npool = \"rbd\"\nimages = \"*\"\nschedule = \"@daily\"\n",
    )
    .expect("config");
    let err = repo.fails(&["--config", config.to_str().expect("utf8"), "worker", "--check"], 2);
    assert!(
        err.contains("repository.password_file") && err.contains("/nonexistent/pass"),
        "{err}"
    );
    // Without a configuration at all.
    let err = repo.fails(&["worker"], 2);
    assert!(err.contains("--config"), "{err}");
}

/// Accepts HTTP POSTs on a local port and hands their bodies to the test.
fn webhook() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let Ok(n) = s.read(&mut chunk) else { break None };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(format!("{}\n{body}", head.lines().next().unwrap_or("")));
                    }
                }
            };
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if let Some(b) = body {
                let _ = tx.send(b);
            }
        }
    });
    (port, rx)
}

/// SIGHUP reloads the configuration (a new selection starts running; a broken file is refused
/// and the running configuration stays); success notifications arrive as HTTP POSTs.
#[test]
fn sighup_reloads_and_notifications_are_posted() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let prefix = unique("wkhup");
    let first = guard.add(&format!("rbd/{prefix}-first"));
    let second = guard.add(&format!("rbd/{prefix}-second"));
    for img in [&first, &second] {
        c.rbd(&["create", "--size", "4M", img]);
        apply(c, img, 4 * MIB, &[(0, Some(random_bytes(MIB as usize)), 0)]);
    }
    let (hook_port, posts) = webhook();
    let port = free_port();
    let config = repo.path("worker.toml");
    let write = |images: &str| {
        std::fs::write(
            &config,
            format!(
                r#"
[worker]
state_dir = "{state}"
metrics = "127.0.0.1:{port}"
[[selection]]
name = "s"
pool = "rbd"
images = {images}
schedule = "*/5 * * * * *"
notify = {{ on_success = [{{ url = "http://127.0.0.1:{hook_port}/hooks/secret-token" }}] }}
"#,
                state = repo.path("state").display()
            ),
        )
        .expect("config")
    };
    let name = |img: &str| img.split('/').nth(1).expect("name").to_string();
    write(&format!("[\"{}\"]", name(&first)));
    let d = Daemon::start(&repo, &config, "hup");
    let post = posts.recv_timeout(Duration::from_secs(30)).expect("a success notification");
    assert!(post.starts_with("POST /hooks/secret-token"), "{post}");
    let body: serde_json::Value = serde_json::from_str(post.split_once('\n').expect("body").1).expect("json body");
    assert_eq!(body["event"], "backup.success");
    assert_eq!(body["volume"], first.replace('/', "."));
    assert!(body["backup_id"].as_str().is_some_and(|s| s.len() == 16), "{body}");
    // The webhook URL's path (often a secret) never reaches the log.
    assert!(!d.log().contains("secret-token"), "{}", d.log());

    // A broken configuration is refused; the worker keeps running on the old one.
    std::fs::write(&config, "[worker]\nconcurrency = 0\n").expect("config");
    d.signal(libc::SIGHUP);
    wait_for(
        "the refused reload",
        Duration::from_secs(20),
        || {
            scrape(port, "/metrics")
                .unwrap_or_default()
                .contains("ferry_worker_config_reload_failures_total 1")
        },
        || d.log(),
    );
    assert!(d.log().contains("worker.concurrency: must be at least 1"), "{}", d.log());
    // A good one adds the second image.
    write(&format!("[\"{}\", \"{}\"]", name(&first), name(&second)));
    d.signal(libc::SIGHUP);
    wait_for(
        "the second image's first backup after the reload",
        Duration::from_secs(30),
        || !backups(&repo, &second.replace('/', ".")).is_empty(),
        || d.log(),
    );
    assert!(scrape(port, "/metrics")
        .unwrap_or_default()
        .contains("ferry_worker_config_reloads_total 1"));
}

/// A transient store failure that outlasts the store's own retries fails the attempt; the
/// worker retries the volume with backoff and the backup succeeds.
#[test]
fn a_transient_failure_is_retried_by_the_worker() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let img = guard.add(&format!("rbd/{}", unique("wkretry")));
    c.rbd(&["create", "--size", "8M", &img]);
    apply(c, &img, 8 * MIB, &[(0, Some(random_bytes(8 * MIB as usize)), 0)]);
    let config = repo.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
retries = 4
retry_delay = "1s"
[[selection]]
name = "s"
pool = "rbd"
images = ["{name}"]
schedule = "@daily"
"#,
            state = repo.path("state").display(),
            name = img.split('/').nth(1).expect("name")
        ),
    )
    .expect("config");
    let out = repo
        .cmd(&["--config", config.to_str().expect("utf8"), "worker", "--once"])
        .env("FERRY_TEST_FAULTS", "put:chunks/*:status=503:times=25")
        .env("FERRY_STORE_DEADLINE", "1")
        .output()
        .expect("worker --once");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("retry 1 of 4"), "{log}");
    assert_eq!(backups(&repo, &img.replace('/', ".")).len(), 1);
    repo.ok(&["audit"]);
}

/// A run missed while the worker was down runs once at start (not once per missed tick); a
/// volume backed up since its last tick does not.
#[test]
fn a_missed_run_runs_once_at_start() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let img = guard.add(&format!("rbd/{}", unique("wkmiss")));
    c.rbd(&["create", "--size", "4M", &img]);
    apply(c, &img, 4 * MIB, &[(0, Some(random_bytes(MIB as usize)), 0)]);
    let v = img.replace('/', ".");
    let config = repo.path("worker.toml");
    // Fires at one second of each minute, `at` (chosen a few seconds ahead).
    let write = |at: u32| {
        std::fs::write(
            &config,
            format!(
                r#"
[worker]
state_dir = "{state}"
[[selection]]
name = "s"
pool = "rbd"
images = ["{name}"]
schedule = "{at} * * * * *"
"#,
                state = repo.path("state").display(),
                name = img.split('/').nth(1).expect("name")
            ),
        )
        .expect("config")
    };
    // A first backup, then let the schedule's tick pass while no worker runs.
    write(0);
    repo.ok(&["--config", config.to_str().expect("utf8"), "worker", "--once"]);
    let at = ((chrono::Utc::now().timestamp() + 3) % 60) as u32;
    write(at);
    std::thread::sleep(Duration::from_secs(5));
    // The missed tick runs once at start; the next tick is a minute away.
    let mut d = Daemon::start(&repo, &config, "missed");
    wait_for(
        "the missed run",
        Duration::from_secs(30),
        || backups(&repo, &v).len() == 2,
        || d.log(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(backups(&repo, &v).len(), 2, "{}", d.log());
    assert!(d.log().contains("missed its last scheduled run"), "{}", d.log());
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0));
    // Started again before the next tick: nothing was missed, nothing runs.
    let now = chrono::Utc::now().timestamp();
    if (at as i64 - now % 60).rem_euclid(60) > 8 {
        let mut d = Daemon::start(&repo, &config, "again");
        std::thread::sleep(Duration::from_secs(6));
        d.signal(libc::SIGTERM);
        assert_eq!(d.wait(Duration::from_secs(30)), Some(0));
        assert_eq!(backups(&repo, &v).len(), 2, "{}", d.log());
        assert!(!d.log().contains("missed its last scheduled run"), "{}", d.log());
    }
}

/// Two selections naming one image: the first keeps it, the second is told, and the image is
/// backed up once per run with the first selection's label.
#[test]
fn an_image_in_two_selections_is_backed_up_once_by_the_first() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let img = guard.add(&format!("rbd/{}", unique("wkdup")));
    c.rbd(&["create", "--size", "4M", &img]);
    let name = img.split('/').nth(1).expect("name").to_string();
    let config = repo.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[worker]
state_dir = "{state}"
[[selection]]
name = "first"
pool = "rbd"
images = ["{name}"]
schedule = "@daily"
[[selection]]
name = "second"
pool = "rbd"
images = ["{name}*"]
schedule = "@hourly"
"#,
            state = repo.path("state").display()
        ),
    )
    .expect("config");
    let cfg = config.to_str().expect("utf8");
    let out = repo.run(&["--config", cfg, "worker", "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("which selection 'first' already backs up"), "{text}");
    let out = repo.run(&["--config", cfg, "worker", "--once"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("already backs up"), "{text}");
    let bs = backups(&repo, &img.replace('/', "."));
    assert_eq!(bs.len(), 1, "{bs:#?}");
    assert_eq!(bs[0]["labels"]["selection"], "first");
}

/// The DR site's worker (issue 12 item 1): a `[[standby]]` replayed by `--once` (the first
/// replay restores in full), then on its schedule after a new backup; metrics and status say
/// where the standby is.
#[test]
fn a_dr_worker_keeps_a_standby_image_current_on_its_schedule() {
    let c = cluster();
    let repo = c.file_repo();
    let mut guard = ImageGuard::new(c);
    let src = guard.add(&format!("rbd/{}", unique("wksrc")));
    let dr = guard.add(&format!("rbd/{}", unique("wkdr")));
    c.rbd(&["create", "--size", "8M", &src]);
    apply(c, &src, 8 * MIB, &[(MIB, Some(random_bytes(2 * MIB as usize)), 0)]);
    let snap_of = |repo: &Repo| {
        let j = repo.json(&["backup", &format!("rbd:{src}")]);
        j["to_snap"].as_str().expect("snap").to_string()
    };
    let snap1 = snap_of(&repo);
    let hash1 = c.export_hash(&format!("{src}@{snap1}"));
    let volume = src.replace('/', ".");
    let port = free_port();
    let config = repo.path("dr.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nstate_dir = \"{}\"\nmetrics = \"127.0.0.1:{port}\"\n[[standby]]\nvolume = \"{volume}\"\nonto = \"rbd:{dr}\"\nschedule = \"*/2 * * * * *\"\n",
            repo.path("dr-state").display()
        ),
    )
    .expect("config");
    let cfg = config.to_str().expect("utf8");
    let out = repo.ok(&["--config", cfg, "worker", "--once"]);
    assert!(out.contains(&format!("standby rbd:{dr}: success")), "{out}");
    assert_eq!(c.export_hash(&format!("{dr}@{snap1}")), hash1);

    apply(c, &src, 8 * MIB, &[(6 * MIB, Some(random_bytes(4096)), 0)]);
    let snap2 = snap_of(&repo);
    let hash2 = c.export_hash(&format!("{src}@{snap2}"));
    let mut d = Daemon::start(&repo, &config, "dr");
    wait_for(
        "the scheduled replay",
        Duration::from_secs(40),
        || c.snaps(&dr).contains(&snap2),
        || d.log(),
    );
    wait_for(
        "the standby's metrics",
        Duration::from_secs(20),
        || {
            scrape(port, "/metrics")
                .map(|m| metric(&m, "ferry_standby_last_success").get(&volume).map(String::as_str) == Some("1"))
                .unwrap_or(false)
        },
        || d.log(),
    );
    let m = scrape(port, "/metrics").expect("metrics");
    let lag: f64 = metric(&m, "ferry_standby_lag_seconds")[&volume].parse().expect("number");
    assert!(lag.is_finite() && lag < 300.0, "{m}");
    let status = repo.ok(&["--config", cfg, "status"]);
    assert!(status.contains(&format!("standby rbd:{dr} of {volume}")), "{status}");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0), "{}", d.log());
    assert_eq!(c.export_hash(&format!("{dr}@{snap2}")), hash2);
    assert_eq!(c.snaps(&dr), [snap2], "one standby snapshot: the base of the next replay");
}
