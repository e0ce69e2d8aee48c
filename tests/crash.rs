//! Crash harness (issue: reliability): `kill -9` of `ferry backup` at each point of its
//! protocol, then the invariants: committed backups restore bit-exactly, audit is clean, the
//! retry uploads only what is missing, a GC afterwards settles the dead session and loses
//! nothing. `FERRY_CRASH_TRIALS` sets the number of stream trials (default 20 in CI;
//! `scripts/crash-soak` runs 500).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ferry_testdata::{Rng, Volume};

use crate::util::{cluster, hash_file, unique, ImageGuard, Repo};

const MIB: u64 = 1 << 20;

/// Where a trial kills the backup, and the fault rule that holds it there.
#[derive(Clone, Copy, Debug)]
enum Point {
    /// While chunks are being uploaded (some are stored, some not).
    MidUpload,
    /// Every chunk stored, the manifest PUT not yet applied.
    BeforeManifest,
    /// The manifest stored (committed), its session's `end` and the index update not done.
    AfterManifest,
}

impl Point {
    fn faults(self) -> &'static str {
        match self {
            Point::MidUpload => "put:chunks/*:slow=1500ms:after=2",
            Point::BeforeManifest => "put:volumes/*/backups/*:slow=4s",
            Point::AfterManifest => "put:sessions/*/end:slow=4s",
        }
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn spawn_killable(repo: &Repo, args: &[&str], faults: Option<&str>) -> Child {
    let mut c = repo.cmd(args);
    if let Some(f) = faults {
        c.env("FERRY_TEST_FAULTS", f);
    }
    // Its own process group: the kill reaches its children (rbd) too.
    c.process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry")
}

fn kill9(child: &mut Child) {
    // SAFETY: signalling the process group we created for the child.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn manifests(repo: &Repo, volume: &str) -> usize {
    files(&repo.repo_dir().join("volumes").join(volume).join("backups"))
        .iter()
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .count()
}

/// One stream backup killed at `point`; `committed` says whether the manifest landed.
fn killed_stream_backup(repo: &Repo, volume: &str, stream: &Path, point: Point, rng: &mut Rng) -> bool {
    let chunks = || files(&repo.repo_dir().join("chunks")).len();
    let (before_chunks, before_manifests) = (chunks(), manifests(repo, volume));
    let mut child = spawn_killable(
        repo,
        &["backup", "--volume", volume, "--diff", stream.to_str().expect("utf8")],
        Some(point.faults()),
    );
    match point {
        Point::MidUpload => wait_for("two chunks", 60, || chunks() >= before_chunks + 2),
        Point::BeforeManifest => {
            // All chunks stored (the count stops growing), the manifest held back.
            let mut last = (chunks(), Instant::now());
            wait_for("the uploads to settle", 60, || {
                let n = chunks();
                if n != last.0 {
                    last = (n, Instant::now());
                }
                n > before_chunks && last.1.elapsed() > Duration::from_millis(700)
            });
        }
        Point::AfterManifest => wait_for("the manifest", 60, || manifests(repo, volume) > before_manifests),
    }
    std::thread::sleep(Duration::from_millis(rng.below(200)));
    kill9(&mut child);
    manifests(repo, volume) > before_manifests
}

#[test]
fn stream_backups_killed_at_every_point_lose_nothing() {
    let trials: u64 = std::env::var("FERRY_CRASH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let repo = Repo::file(&["--block-size", "1M"]);
    let points = [Point::MidUpload, Point::BeforeManifest, Point::AfterManifest];
    let mut rng = Rng::new(0xC0FFEE);
    // Committed backups so far: (backup id, image hash).
    let mut committed: Vec<(String, String)> = Vec::new();
    let mut outcomes = [0u64; 2];
    for t in 0..trials {
        let point = points[(t % 3) as usize];
        // Each trial a new volume content partly shared with the previous ones (dedup).
        let mut v = Volume::generated(8 * MIB, MIB as usize, 1000 + t);
        let mut shared = vec![0u8; MIB as usize];
        Rng::new(7).fill(&mut shared);
        v.write(0, &shared);
        let stream = repo.path("trial.diff");
        std::fs::write(&stream, v.diff("s", Vec::new()).expect("diff")).expect("write stream");
        let volume = format!("t{t}");
        let landed = killed_stream_backup(&repo, &volume, &stream, point, &mut rng);
        outcomes[landed as usize] += 1;
        // Audit is clean whatever was killed (uncommitted chunks are not referenced).
        repo.ok(&["audit"]);
        let listed = repo.backups(&volume);
        assert_eq!(listed.len(), landed as usize, "trial {t} at {point:?}");
        if landed {
            // Committed although killed before its end record: it restores.
            let id = listed[0]["backup_id"].as_str().expect("id").to_string();
            committed.push((id, v.hash()));
        } else {
            // The retry uploads only what the killed run did not.
            let chunks_before = files(&repo.repo_dir().join("chunks")).len();
            let j = repo.json(&["backup", "--volume", &volume, "--diff", stream.to_str().expect("utf8")]);
            let after = files(&repo.repo_dir().join("chunks")).len();
            assert_eq!(
                j["stats"]["blocks_new"].as_u64(),
                Some((after - chunks_before) as u64),
                "trial {t} at {point:?}: {j}"
            );
            committed.push((j["backup_id"].as_str().expect("id").to_string(), v.hash()));
        }
        // Every few trials a GC settles the dead sessions (fence, or read the manifest of one
        // killed after its commit) and frees what the dead ones left.
        if t % 4 == 3 {
            let g = repo.json(&["gc", "--ack-timeout", "1"]);
            assert_eq!(g["sessions_acked"], 0, "{g}");
        }
    }
    repo.ok(&["gc", "--ack-timeout", "1"]);
    repo.ok(&["audit", "--read-data"]);
    for (i, (id, h)) in committed.iter().enumerate() {
        let out = repo.path("r.raw");
        repo.ok(&["restore", &format!("t{i}@id:{id}"), "--to", out.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&out), h, "trial {i}");
    }
    eprintln!(
        "crash harness: {trials} kill -9 trials, {} committed before the kill, {} not",
        outcomes[1], outcomes[0]
    );
    assert!(
        outcomes[0] > 0 && (trials < 3 || outcomes[1] > 0),
        "every point was reached: {outcomes:?}"
    );
}

/// An `rbd` wrapper that stops at `point` (touching `<dir>/at-<point>`) until killed:
/// `snapshot` — after `snap create`, before export-diff sends anything; `upload` — after
/// 1 MiB of the export-diff; `rotation` — at the first `snap rm`.
fn stopping_rbd(dir: &Path, point: &str) -> PathBuf {
    let p = dir.join(format!("rbd-stop-{point}"));
    let mark = dir.join(format!("at-{point}"));
    let stop = format!("touch '{}'; sleep 600", mark.display());
    let body = match point {
        "snapshot" => format!("if [[ $a = export-diff ]]; then {stop}; fi"),
        "upload" => format!(
            "if [[ $a = export-diff ]]; then rbd \"$@\" | {{ dd bs=64K count=16 iflag=fullblock status=none; {stop}; }}; exit 1; fi"
        ),
        _ => format!("if [[ $a = rm && $prev = snap ]]; then {stop}; fi"),
    };
    let script = format!("#!/bin/bash\nprev=\nfor a in \"$@\"; do\n  {body}\n  prev=$a\ndone\nexec rbd \"$@\"\n");
    crate::util::write_executable(&p, &script);
    p
}

/// `kill -9` of an RBD backup after its snapshot, mid-upload and mid-rotation: the base
/// snapshot survives, the retry is incremental from it, and after it no ferry snapshot but
/// the new base is left; committed backups restore bit-exactly; audit is clean.
#[test]
fn rbd_backups_killed_after_the_snapshot_mid_upload_and_mid_rotation() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("crash");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "32M", &image]);
    let write = |seed: u64, at: u64| {
        let mut data = vec![0u8; 3 * MIB as usize];
        Rng::new(seed).fill(&mut data);
        crate::ceph::apply(c, &image, 32 * MIB, &[(at, Some(data), 0)]);
    };
    write(1, 0);
    let first = repo.json(&["backup", &format!("rbd:{image}")]);
    let mut base = first["to_snap"].as_str().expect("snap").to_string();
    for (k, point) in ["snapshot", "upload", "rotation"].iter().enumerate() {
        write(10 + k as u64, (4 + 8 * k as u64) * MIB);
        let wrapper = stopping_rbd(repo.dir.path(), point);
        let mut child = {
            let mut cmd = repo.cmd(&["backup", &format!("rbd:{image}")]);
            cmd.env("FERRY_RBD_PROGRAM", &wrapper);
            cmd.process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        };
        let mark = repo.dir.path().join(format!("at-{point}"));
        wait_for(&format!("the backup to reach {point}"), 120, || mark.exists());
        kill9(&mut child);
        let snaps = c.snaps(&image);
        assert!(snaps.contains(&base), "{point}: the base {base} survives: {snaps:?}");
        repo.ok(&["audit"]);
        // The killed process still holds the backup lease (60 s); it is provably gone (this
        // host, this boot, no such pid), so the retry takes the lease over at once.
        let started = Instant::now();
        let j = repo.json(&["backup", &format!("rbd:{image}")]);
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{point}: the retry waited for the dead lease"
        );
        assert_eq!(j["kind"], "incremental", "{point}: {j}");
        if *point != "rotation" {
            // Nothing was committed: the retry builds on the old base.
            assert_eq!(j["from_snap"].as_str(), Some(base.as_str()), "{point}: {j}");
        }
        base = j["to_snap"].as_str().expect("snap").to_string();
        let ours: Vec<String> = c.snaps(&image).into_iter().filter(|s| s.starts_with("ferry-")).collect();
        assert_eq!(ours, vec![base.clone()], "{point}: only the new base is left");
        let out = repo.path("r.raw");
        repo.ok(&["restore", &volume, "--to", out.to_str().expect("utf8"), "--force"]);
        crate::util::assert_same(
            &format!("{point}: restore vs rbd export"),
            &c.export(&format!("{image}@{base}")),
            &std::fs::read(&out).expect("read"),
            4 * MIB,
        );
        let _ = std::fs::remove_file(&mark);
    }
    repo.ok(&["gc", "--ack-timeout", "1"]);
    repo.ok(&["audit", "--read-data"]);
}
