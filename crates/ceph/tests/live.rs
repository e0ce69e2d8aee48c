//! Tests against a running cluster made by `scripts/ceph-dev up`.
//!
//! They run only when FERRY_CEPH_DIR names the cluster's directory (the project's CI sets it);
//! without it each test prints a notice and passes. With it set, an unreachable cluster fails
//! them.
//!
//!     scripts/ceph-dev up && eval "$(scripts/ceph-dev env)"
//!     cargo test -p ferry-ceph --test live

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_ceph::{CephConfig, Cluster, Error, RbdCli};

const POOL: &str = "rbd";

fn dev_dir(test: &str) -> Option<PathBuf> {
    match std::env::var_os("FERRY_CEPH_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            assert!(
                d.join("ceph.conf").is_file(),
                "FERRY_CEPH_DIR={} holds no ceph.conf: run scripts/ceph-dev up",
                d.display()
            );
            Some(d)
        }
        _ => {
            eprintln!("{test}: FERRY_CEPH_DIR is not set; skipping (run scripts/ceph-dev up and export it)");
            None
        }
    }
}

fn config(dir: &PathBuf) -> CephConfig {
    CephConfig::from_dev_dir(dir)
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("ferry-test-{prefix}-{}-{nanos}", std::process::id())
}

/// Removes the image (and its snapshots) when the test ends, however it ends.
struct ImageGuard<'a> {
    rbd: &'a RbdCli,
    image: String,
}

impl Drop for ImageGuard<'_> {
    fn drop(&mut self) {
        if let Ok(snaps) = self.rbd.snap_list(POOL, &self.image) {
            for s in snaps {
                let _ = self.rbd.snap_remove(POOL, &self.image, &s.name);
            }
        }
        let _ = self.rbd.remove(POOL, &self.image);
    }
}

// ---- a minimal rbd diff v1 writer/reader for the tests --------------------------------------

const BANNER: &[u8] = b"rbd diff v1\n";

#[derive(PartialEq, Eq)]
enum Rec {
    From(String),
    To(String),
    Size(u64),
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Compact: data as length and a checksum, not as bytes.
impl std::fmt::Debug for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rec::From(n) => write!(f, "f {n}"),
            Rec::To(n) => write!(f, "t {n}"),
            Rec::Size(s) => write!(f, "s {s}"),
            Rec::Write(o, d) => {
                let sum = d.iter().fold(0u32, |a, &b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
                write!(f, "w {o}+{} (sum {sum:08x})", d.len())
            }
            Rec::Zero(o, l) => write!(f, "z {o}+{l}"),
        }
    }
}

fn encode(recs: &[Rec]) -> Vec<u8> {
    let mut out = BANNER.to_vec();
    for r in recs {
        match r {
            Rec::From(n) | Rec::To(n) => {
                out.push(if matches!(r, Rec::From(_)) { b'f' } else { b't' });
                out.extend_from_slice(&(n.len() as u32).to_le_bytes());
                out.extend_from_slice(n.as_bytes());
            }
            Rec::Size(s) => {
                out.push(b's');
                out.extend_from_slice(&s.to_le_bytes());
            }
            Rec::Write(off, data) => {
                out.push(b'w');
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&(data.len() as u64).to_le_bytes());
                out.extend_from_slice(data);
            }
            Rec::Zero(off, len) => {
                out.push(b'z');
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
    out.push(b'e');
    out
}

fn decode(stream: &[u8]) -> Vec<Rec> {
    assert!(
        stream.starts_with(BANNER),
        "stream starts with {:?}",
        &stream[..stream.len().min(16)]
    );
    let mut p = BANNER.len();
    let u64_at = |p: usize| u64::from_le_bytes(stream[p..p + 8].try_into().expect("8 bytes"));
    let mut recs = Vec::new();
    loop {
        let tag = stream[p];
        p += 1;
        match tag {
            b'f' | b't' => {
                let n = u32::from_le_bytes(stream[p..p + 4].try_into().expect("4 bytes")) as usize;
                let name = String::from_utf8(stream[p + 4..p + 4 + n].to_vec()).expect("utf-8");
                p += 4 + n;
                recs.push(if tag == b'f' { Rec::From(name) } else { Rec::To(name) });
            }
            b's' => {
                recs.push(Rec::Size(u64_at(p)));
                p += 8;
            }
            b'w' => {
                let (off, len) = (u64_at(p), u64_at(p + 8) as usize);
                recs.push(Rec::Write(off, stream[p + 16..p + 16 + len].to_vec()));
                p += 16 + len;
            }
            b'z' => {
                recs.push(Rec::Zero(u64_at(p), u64_at(p + 8)));
                p += 16;
            }
            b'e' => {
                assert_eq!(p, stream.len(), "bytes after the end record");
                return recs;
            }
            other => panic!("unknown tag {other:#x} at {}", p - 1),
        }
    }
}

/// The first 16 MiB of an image, as far as the tests write it.
const MODEL: usize = 16 << 20;

fn apply(model: &mut [u8], recs: &[Rec]) {
    for r in recs {
        match r {
            Rec::Write(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
            Rec::Zero(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
            _ => {}
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn import(rbd: &RbdCli, image: &str, stream: &[u8]) -> Result<(), Error> {
    let mut imp = rbd.import_diff(POOL, image)?;
    // a write error (rbd gave up early) is reported by finish, with rbd's stderr
    let _ = imp.write_all(stream);
    imp.finish()
}

fn export(rbd: &RbdCli, image: &str, snap: &str, from: Option<&str>) -> Result<Vec<u8>, Error> {
    let mut exp = rbd.export_diff(POOL, image, snap, from, false)?;
    let mut buf = Vec::new();
    exp.read_to_end(&mut buf).map_err(|source| Error::Io {
        context: "reading export-diff".into(),
        source,
    })?;
    exp.wait()?;
    Ok(buf)
}

// ---- RbdCli ----------------------------------------------------------------------------------

#[test]
fn rbd_image_snapshot_and_diff_lifecycle() {
    let Some(dir) = dev_dir("rbd_image_snapshot_and_diff_lifecycle") else {
        return;
    };
    let rbd = RbdCli::new(config(&dir));
    let image = unique("img");
    const SIZE: u64 = 64 << 20;

    assert!(!rbd.exists(POOL, &image).expect("exists before create"));
    rbd.create(POOL, &image, SIZE, None).expect("create");
    let _guard = ImageGuard {
        rbd: &rbd,
        image: image.clone(),
    };
    assert!(rbd.exists(POOL, &image).expect("exists after create"));
    match rbd.create(POOL, &image, SIZE, None) {
        Err(Error::ImageExists { .. }) => {}
        other => panic!("second create: {other:?}"),
    }

    let info = rbd.info(POOL, &image).expect("info");
    assert_eq!(info.name, image);
    assert_eq!(info.size, SIZE);
    assert_eq!(info.object_size, 4194304);
    assert_eq!(info.order, 22);
    assert!(!info.id.is_empty());
    assert!(rbd.snap_list(POOL, &image).expect("snap ls").is_empty());

    // base content through import-diff of a hand-made stream
    let w1 = pattern(1, 64 << 10);
    let w2 = pattern(2, 1000);
    import(
        &rbd,
        &image,
        &encode(&[Rec::Size(SIZE), Rec::Write(0, w1.clone()), Rec::Write((4 << 20) + 123, w2.clone())]),
    )
    .expect("import-diff base");

    rbd.snap_create(POOL, &image, "s1").expect("snap create s1");
    match rbd.snap_create(POOL, &image, "s1") {
        Err(Error::SnapshotExists { .. }) => {}
        other => panic!("second snap create: {other:?}"),
    }
    let snaps = rbd.snap_list(POOL, &image).expect("snap ls");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "s1");
    assert_eq!(snaps[0].size, SIZE);
    assert!(!snaps[0].protected);
    assert!(snaps[0].timestamp.is_some());

    // full export-diff of s1: what was written. Extents are not always exact: within an
    // object a write may come back with the zeros before it (here 4 MiB+0..1123, not
    // 4 MiB+123..1123), so compare contents, not records.
    let full = export(&rbd, &image, "s1", None).expect("export-diff s1");
    assert!(full.starts_with(b"rbd diff v1\n"));
    let recs = decode(&full);
    assert_eq!(recs[..2], [Rec::To("s1".into()), Rec::Size(SIZE)]);
    let mut expected = vec![0u8; MODEL];
    apply(&mut expected, &[Rec::Write(0, w1.clone()), Rec::Write((4 << 20) + 123, w2.clone())]);
    let mut got = vec![0u8; MODEL];
    apply(&mut got, &recs);
    assert!(got == expected, "export-diff s1 content differs: {recs:?}");

    // --whole-object rounds to 4 MiB objects
    let mut exp = rbd
        .export_diff(POOL, &image, "s1", None, true)
        .expect("spawn export-diff --whole-object");
    let mut whole = Vec::new();
    exp.stdout().read_to_end(&mut whole).expect("read");
    exp.wait().expect("export-diff --whole-object");
    let writes: Vec<(u64, usize)> = decode(&whole)
        .into_iter()
        .filter_map(|r| match r {
            Rec::Write(o, d) => Some((o, d.len())),
            _ => None,
        })
        .collect();
    assert_eq!(writes, [(0, 4 << 20), (4 << 20, 4 << 20)]);

    // incremental: import a stream from s1 to s2 (import-diff creates s2), export it back
    let w3 = pattern(3, 8192);
    import(
        &rbd,
        &image,
        &encode(&[
            Rec::From("s1".into()),
            Rec::To("s2".into()),
            Rec::Size(SIZE),
            Rec::Write(12 << 20, w3.clone()),
            Rec::Zero(0, 4096),
        ]),
    )
    .expect("import-diff s1..s2");
    let names: Vec<String> = rbd.snap_list(POOL, &image).expect("snap ls").into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1", "s2"]);
    let inc = export(&rbd, &image, "s2", Some("s1")).expect("export-diff s1..s2");
    let recs = decode(&inc);
    assert_eq!(recs[0], Rec::From("s1".into()));
    assert_eq!(recs[1], Rec::To("s2".into()));
    apply(&mut expected, &[Rec::Write(12 << 20, w3), Rec::Zero(0, 4096)]);
    apply(&mut got, &recs);
    assert!(got == expected, "export-diff s1..s2 content differs: {recs:?}");
    assert!(
        recs.iter().all(|r| !matches!(r, Rec::Write(o, _) if *o == (4 << 20) + 123)),
        "the incremental repeats unchanged data: {recs:?}"
    );

    // errors carry the command and rbd's stderr
    let err = export(&rbd, &image, "nosuch", None).expect_err("export-diff of a missing snap");
    match &err {
        Error::SnapshotNotFound { snap, rbd, .. } => {
            assert_eq!(snap, "nosuch");
            assert!(!rbd.stderr.trim().is_empty(), "stderr kept");
            assert!(rbd.command.contains("export-diff"), "{}", rbd.command);
        }
        other => panic!("export-diff of a missing snap: {other:?}"),
    }
    assert!(err.to_string().contains("No such file"), "{err}");
    match export(&rbd, &image, "s2", Some("nosuch")) {
        Err(Error::SnapshotNotFound { snap, .. }) => assert_eq!(snap, "nosuch"),
        other => panic!("export-diff from a missing snap: {other:?}"),
    }
    // a stream cut short fails, with rbd's words
    let err = import(&rbd, &image, b"rbd diff v1\ns\x00\x00").expect_err("truncated import");
    assert!(err.stderr().is_some_and(|s| s.contains("rbd:")), "{err:?}");
    let err = import(&rbd, &image, b"not a diff").expect_err("garbage import");
    assert!(err.to_string().contains("import-diff"), "{err}");

    // an export-diff that is dropped or killed half-way does not hang or leak
    let mut exp = rbd.export_diff(POOL, &image, "s1", None, true).expect("spawn");
    let mut first = [0u8; 12];
    exp.read_exact(&mut first).expect("banner");
    exp.kill();
    assert!(exp.wait().is_err(), "a killed export is not complete");
    drop(rbd.export_diff(POOL, &image, "s1", None, true).expect("spawn"));

    // snapshots away, then the image
    match rbd.snap_remove(POOL, &image, "nosuch") {
        Err(Error::SnapshotNotFound { .. }) => {}
        other => panic!("snap rm of a missing snap: {other:?}"),
    }
    rbd.snap_remove(POOL, &image, "s2").expect("snap rm s2");
    rbd.snap_remove(POOL, &image, "s1").expect("snap rm s1");
    assert!(rbd.snap_list(POOL, &image).expect("snap ls").is_empty());
    rbd.remove(POOL, &image).expect("rm");
    assert!(!rbd.exists(POOL, &image).expect("exists after rm"));
    match rbd.remove(POOL, &image) {
        Err(Error::ImageNotFound { .. }) => {}
        other => panic!("second rm: {other:?}"),
    }
    match rbd.info(POOL, &image) {
        Err(Error::ImageNotFound { .. }) => {}
        other => panic!("info after rm: {other:?}"),
    }
}

#[test]
fn rbd_object_size_bench_and_missing_pool() {
    let Some(dir) = dev_dir("rbd_object_size_bench_and_missing_pool") else {
        return;
    };
    let rbd = RbdCli::new(config(&dir));
    let image = unique("os");
    rbd.create(POOL, &image, 8 << 20, Some(1 << 20)).expect("create with object size");
    let _guard = ImageGuard {
        rbd: &rbd,
        image: image.clone(),
    };
    let info = rbd.info(POOL, &image).expect("info");
    assert_eq!((info.object_size, info.order, info.objects), (1 << 20, 20, 8));

    // data written by `rbd bench` (one thread: 0..4 MiB in order) shows up in a full export-diff
    let out = std::process::Command::new("rbd")
        .args(config(&dir).cli_args())
        .args(["bench", "--io-type", "write", "--io-size", "64K", "--io-total", "4M"])
        .args(["--io-pattern", "seq", "--io-threads", "1"])
        .arg(format!("{POOL}/{image}"))
        .output()
        .expect("run rbd bench");
    assert!(out.status.success(), "rbd bench: {out:?}");
    rbd.snap_create(POOL, &image, "b").expect("snap");
    let stream = export(&rbd, &image, "b", None).expect("export");
    let written: usize = decode(&stream)
        .iter()
        .map(|r| match r {
            Rec::Write(_, d) => d.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(written, 4 << 20);

    match rbd.info("ferry-no-such-pool", "x") {
        Err(Error::PoolNotFound { pool, .. }) => assert_eq!(pool, "ferry-no-such-pool"),
        other => panic!("info in a missing pool: {other:?}"),
    }
    match rbd.info(POOL, "a/b") {
        Err(Error::InvalidName { .. }) => {}
        other => panic!("bad name: {other:?}"),
    }
}

// ---- Cluster ---------------------------------------------------------------------------------

#[test]
fn cluster_identity_health_pools() {
    let Some(dir) = dev_dir("cluster_identity_health_pools") else {
        return;
    };
    let cluster = Cluster::connect(&config(&dir)).expect("connect");
    let fsid = cluster.fsid().expect("fsid");
    let conf = std::fs::read_to_string(dir.join("ceph.conf")).expect("read ceph.conf");
    let conf_fsid = conf
        .lines()
        .find_map(|l| l.trim().strip_prefix("fsid = "))
        .expect("fsid in ceph.conf");
    assert_eq!(fsid, conf_fsid);
    let health = cluster.health().expect("health");
    assert!(health.status.starts_with("HEALTH_"), "{health}");
    let pools = cluster.pools().expect("pools");
    assert!(pools.iter().any(|p| p == POOL), "{pools:?}");
    assert_eq!(cluster.client_name(), "client.admin");
}

#[test]
fn lease_is_exclusive_and_released() {
    let Some(dir) = dev_dir("lease_is_exclusive_and_released") else {
        return;
    };
    let a = Cluster::connect(&config(&dir)).expect("connect a");
    let b = Cluster::connect(&config(&dir)).expect("connect b");
    let object = unique("lease");
    let lease = a
        .lease(POOL, &object, Duration::from_secs(30), "holder-a pid 1")
        .expect("first lease");
    assert!(lease.is_healthy());
    match b.lease(POOL, &object, Duration::from_secs(30), "holder-b") {
        Err(Error::LeaseHeld { holder, object: o }) => {
            assert!(holder.contains("holder-a pid 1"), "{holder}");
            assert!(o.ends_with(&object), "{o}");
        }
        other => panic!("second lease: {other:?}"),
    }
    // the same connection with another cookie is excluded too
    assert!(matches!(
        a.lease(POOL, &object, Duration::from_secs(30), "again"),
        Err(Error::LeaseHeld { .. })
    ));
    lease.release().expect("release");
    let lease_b = b
        .lease(POOL, &object, Duration::from_secs(30), "holder-b")
        .expect("lease after release");
    // the lease keeps its connection alive after the Cluster is gone
    drop(b);
    assert!(lease_b.is_healthy());
    drop(lease_b); // Drop unlocks
    let again = a
        .lease(POOL, &object, Duration::from_secs(30), "holder-a")
        .expect("lease after drop");
    // break_lease (administrator override)
    assert_eq!(a.break_lease(POOL, &object).expect("break"), 1);
    match again.release() {
        Err(Error::LeaseLost { .. }) => {}
        other => panic!("release of a broken lease: {other:?}"),
    }
    assert!(a.remove_object(POOL, &object).expect("remove lease object"));
    assert!(!a.remove_object(POOL, &object).expect("remove again"));
}

#[test]
fn lease_renews_itself() {
    let Some(dir) = dev_dir("lease_renews_itself") else {
        return;
    };
    let a = Cluster::connect(&config(&dir)).expect("connect a");
    let b = Cluster::connect(&config(&dir)).expect("connect b");
    let object = unique("renew");
    let lease = a.lease(POOL, &object, Duration::from_secs(3), "renewing holder").expect("lease");
    std::thread::sleep(Duration::from_millis(5500));
    assert!(lease.is_healthy(), "failure: {:?}", lease.failure());
    assert!(lease.time_left() > Duration::from_millis(500));
    match b.lease(POOL, &object, Duration::from_secs(3), "other") {
        Err(Error::LeaseHeld { .. }) => {}
        other => panic!("lease held past its duration by renewal: {other:?}"),
    }
    lease.release().expect("release");
    b.lease(POOL, &object, Duration::from_secs(3), "other")
        .expect("after release")
        .release()
        .expect("release b");
    b.remove_object(POOL, &object).expect("remove lease object");
}

#[test]
fn wrong_keyring_fails_fast() {
    let Some(dir) = dev_dir("wrong_keyring_fails_fast") else {
        return;
    };
    // the right key works (so a failure below is about the key, not the cluster)
    Cluster::connect(&config(&dir)).expect("connect with the right keyring");
    let tmp = tempfile::tempdir().expect("tempdir");
    let keyring = tmp.path().join("bogus.keyring");
    std::fs::write(&keyring, "[client.admin]\n\tkey = AQBk4QVrPRwBARAAMA7tYn+d4pUJf/1pmlwHsw==\n").expect("write keyring");
    let cfg = CephConfig {
        keyring: Some(keyring),
        ..config(&dir)
    };
    let t = Instant::now();
    let err = Cluster::connect(&cfg).expect_err("connect with a bogus key");
    let took = t.elapsed();
    eprintln!("wrong keyring: {took:?}: {err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        matches!(err.errno(), Some(13 | 1)), // EACCES or EPERM
        "refused key: {err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("bogus.keyring"), "{msg}");
    assert!(msg.contains("refused authentication"), "{msg}");

    let t = Instant::now();
    let err = RbdCli::new(cfg)
        .with_mount_timeout(Some(Duration::from_secs(10)))
        .info(POOL, "whatever")
        .expect_err("rbd with a bogus key");
    eprintln!("rbd with wrong keyring: {:?}: {err}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(err.stderr().is_some_and(|s| !s.trim().is_empty()), "{err:?}");
}

#[test]
fn unreachable_monitor_fails_fast() {
    let Some(_dir) = dev_dir("unreachable_monitor_fails_fast") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = tmp.path().join("ceph.conf");
    // port 9 (discard) on loopback: nothing listens there
    std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:9\nauth client required = cephx\n").expect("write conf");
    let cfg = CephConfig {
        conf: Some(conf),
        keyring: Some(_dir.join("keyring")),
        client_id: None,
    };
    let t = Instant::now();
    let err = Cluster::connect_with_timeout(&cfg, Duration::from_secs(5)).expect_err("connect");
    let took = t.elapsed();
    eprintln!("dead mon: {took:?}: {err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
}
