//! Issue 3 acceptance: a real Ceph cluster (scripts/ceph-dev) as the source, and RGW as S3.

use rbd_diff::{DiffHeader, DiffWriter};

use crate::util::{cluster, hash_file, unique, Cluster, Repo};

const MIB: u64 = 1 << 20;

/// Applies changes to an image through `rbd import-diff` (a stream with no snapshots).
pub(crate) fn apply(c: &Cluster, image: &str, size: u64, records: &[(u64, Option<Vec<u8>>, u64)]) {
    let header = DiffHeader {
        from_snap: None,
        to_snap: None,
        image_size: size,
        protected: None,
    };
    let mut w = DiffWriter::new(Vec::new(), &header).expect("writer");
    for (off, data, len) in records {
        match data {
            Some(d) => w.write_data(*off, d).expect("w"),
            None => w.write_zero(*off, *len).expect("z"),
        }
    }
    let stream = w.finish().expect("finish");
    c.rbd_with_stdin(&["import-diff", "--no-progress", "-", image], Some(&stream));
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn ferry_snaps(c: &Cluster, image: &str) -> Vec<String> {
    c.snaps(image).into_iter().filter(|s| s.starts_with("ferry-")).collect()
}

/// Full backup, three incrementals (writes, a discard, zero writes, a resize), each restore
/// equal to `rbd export` of its snapshot; one ferry snapshot left; user snapshots survive;
/// restore into a new RBD image equals the source.
fn rbd_chain(repo: &Repo) {
    let c = cluster();
    let name = unique("img");
    let image = format!("rbd/{name}");
    let source = format!("rbd:{image}");
    c.rbd(&["create", "--size", "40M", &image]);
    apply(
        c,
        &image,
        40 * MIB,
        &[
            (0, Some(pattern(1, 5 * MIB as usize)), 0),
            (17 * MIB + 5, Some(pattern(2, 3 * MIB as usize)), 0),
            (36 * MIB, Some(pattern(3, 4096)), 0),
        ],
    );
    c.rbd(&["snap", "create", "--no-progress", &format!("{image}@user-keep")]);

    let mut expected = Vec::new();
    let mut backup = |label: &str| {
        let j = repo.json(&["backup", &source]);
        assert_eq!(j["volume"], format!("rbd.{name}"));
        let snap = j["to_snap"].as_str().expect("to_snap").to_string();
        assert_eq!(ferry_snaps(c, &image), vec![snap.clone()], "{label}: exactly one ferry snapshot");
        assert!(
            c.snaps(&image).contains(&"user-keep".to_string()),
            "{label}: the user's snapshot must survive"
        );
        expected.push((
            j["backup_id"].as_str().expect("id").to_string(),
            c.export_hash(&format!("{image}@{snap}")),
            j.clone(),
        ));
        j
    };
    let full = backup("full");
    assert_eq!(full["kind"], "full");
    assert_eq!(full["block_size"], 4 * MIB);
    // 1: overwrite inside and across objects.
    apply(
        c,
        &image,
        40 * MIB,
        &[
            (3 * MIB, Some(pattern(9, 2 * MIB as usize)), 0),
            (20 * MIB - 10, Some(pattern(8, 20)), 0),
        ],
    );
    let inc = backup("incremental 1");
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["rbd"]["base_snapshot"], full["to_snap"]);
    // 2: a whole-object discard and an all-zero write.
    apply(
        c,
        &image,
        40 * MIB,
        &[(16 * MIB, None, 4 * MIB), (36 * MIB, Some(vec![0u8; 8192]), 0)],
    );
    let inc = backup("incremental 2");
    // Every one stays incremental: the diff's two views (whole objects, exact extents) agree.
    assert_eq!(inc["kind"], "incremental", "{inc}");
    // 3: grow, write into the new area; then shrink in a later interval is covered by the
    // core tests; here a grow with data.
    c.rbd(&["resize", "--no-progress", "--size", "52M", &image]);
    apply(c, &image, 52 * MIB, &[(50 * MIB, Some(pattern(4, MIB as usize)), 0)]);
    let inc = backup("incremental 3 (grown)");
    assert_eq!(inc["kind"], "incremental", "{inc}");
    c.rbd(&["resize", "--no-progress", "--allow-shrink", "--size", "30M", &image]);
    let inc = backup("incremental 4 (shrunk)");
    assert_eq!(inc["kind"], "incremental", "{inc}");

    for (id, hash, _) in &expected {
        let out = repo.path(&format!("{id}.raw"));
        repo.ok(&["restore", &format!("rbd.{name}@{id}"), "--to", out.to_str().expect("utf8")]);
        assert_eq!(&hash_file(&out), hash, "restore of {id} differs from rbd export of its snapshot");
    }
    // Into a new RBD image, through rbd import-diff.
    let target = format!("rbd/{name}-restored");
    repo.ok(&["restore", &format!("rbd.{name}"), "--to", &format!("rbd:{target}")]);
    assert_eq!(&c.export_hash(&target), &expected.last().expect("one").1);
    // A second restore onto it is refused without --force.
    let err = repo.fails(&["restore", &format!("rbd.{name}"), "--to", &format!("rbd:{target}")], 5);
    assert!(err.contains("--force"), "{err}");
    repo.ok(&["audit", "--read-data"]);
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
    c.rbd(&["snap", "purge", "--no-progress", &target]);
    c.rbd(&["rm", "--no-progress", &target]);
}

#[test]
fn rbd_chain_with_a_file_repository() {
    rbd_chain(&cluster().file_repo());
}

#[test]
fn rbd_chain_with_an_s3_repository_on_rgw() {
    let repo = cluster().s3_repo();
    rbd_chain(&repo);
    // Disaster recovery from the bucket alone: no index.
    std::fs::remove_dir_all(repo.path("index")).expect("rm index");
    let ls = repo.json(&["ls", "--no-index"]);
    assert_eq!(ls.as_array().expect("array").len(), 5);
}

/// A wrapper around rbd whose export-diff fails: `cut` kills it mid-stream, `late` sends the
/// whole stream and then fails (the cinder case: only the consumer's exit was checked).
fn failing_rbd(dir: &std::path::Path, mode: &str) -> std::path::PathBuf {
    let p = dir.join(format!("rbd-{mode}"));
    let body = match mode {
        "cut" => "rbd \"$@\" | head -c 3000000; exit 141",
        _ => "rbd \"$@\"; echo 'rbd: simulated failure after the stream' >&2; exit 1",
    };
    let script = format!("#!/bin/bash\nfor a in \"$@\"; do [[ $a = export-diff ]] && {{ {body}; }}; done\nexec rbd \"$@\"\n");
    crate::util::write_executable(&p, &script);
    p
}

#[test]
fn a_failing_export_diff_commits_nothing_and_keeps_the_base() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("fail");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "32M", &image]);
    apply(c, &image, 32 * MIB, &[(0, Some(pattern(5, 12 * MIB as usize)), 0)]);
    let first = repo.json(&["backup", &format!("rbd:{image}")]);
    let base = first["to_snap"].as_str().expect("snap").to_string();
    apply(c, &image, 32 * MIB, &[(MIB, Some(pattern(6, 8 * MIB as usize)), 0)]);
    for mode in ["cut", "late"] {
        let wrapper = failing_rbd(repo.dir.path(), mode);
        let out = repo
            .cmd(&["backup", &format!("rbd:{image}")])
            .env("FERRY_RBD_PROGRAM", &wrapper)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {err}");
        assert!(err.contains("nothing was committed"), "{mode}: {err}");
        if mode == "late" {
            assert!(err.contains("simulated failure"), "the producer's stderr must be reported: {err}");
        }
        assert_eq!(repo.backups(&format!("rbd.{name}")).len(), 1, "{mode}: no new backup");
        assert_eq!(
            ferry_snaps(c, &image),
            vec![base.clone()],
            "{mode}: base kept, new snapshot removed"
        );
    }
    let next = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(next["from_snap"].as_str(), Some(base.as_str()));
    let out = repo.path("r.raw");
    repo.ok(&["restore", &format!("rbd.{name}"), "--to", out.to_str().expect("utf8")]);
    assert_eq!(
        hash_file(&out),
        c.export_hash(&format!("{image}@{}", next["to_snap"].as_str().expect("s")))
    );
    // The base gone (someone removed it): the next backup is full and says why.
    let snap = next["to_snap"].as_str().expect("s").to_string();
    c.rbd(&["snap", "rm", "--no-progress", &format!("{image}@{snap}")]);
    let j = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(j["kind"], "full");
    assert!(
        j["rbd"]["full_reason"].as_str().expect("reason").contains("no longer exists"),
        "{j}"
    );
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
}

#[test]
fn concurrent_backups_of_one_image_are_serialised_by_the_lease() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("lease");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "64M", &image]);
    apply(c, &image, 64 * MIB, &[(0, Some(pattern(7, 40 * MIB as usize)), 0)]);
    // Someone holds the lease: ferry refuses, clearly.
    {
        let cfg = ferry_ceph::CephConfig {
            conf: Some(c.dir.join("ceph.conf")),
            keyring: Some(c.dir.join("keyring")),
            client_id: None,
        };
        let cl = ferry_ceph::Cluster::connect(&cfg).expect("connect");
        let lease = cl
            .lease(
                "rbd",
                &format!("ferry.lease.{name}"),
                std::time::Duration::from_secs(30),
                "test holder",
            )
            .expect("lease");
        let err = repo.fails(&["backup", &format!("rbd:{image}")], 5);
        assert!(err.contains("another backup") && err.contains("test holder"), "{err}");
        lease.release().expect("release");
    }
    // Two at once: each either succeeds or is refused by the lease; the chain stays sound.
    let spawn = || {
        repo.cmd(&["backup", &format!("rbd:{image}"), "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    let codes = [a.status.code(), b.status.code()];
    assert!(
        codes.contains(&Some(0)),
        "one backup must succeed: {codes:?} {}",
        String::from_utf8_lossy(&b.stderr)
    );
    for (o, code) in [(&a, codes[0]), (&b, codes[1])] {
        assert!(
            code == Some(0) || code == Some(5),
            "unexpected exit {code:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(ferry_snaps(c, &image).len(), 1);
    repo.ok(&["audit"]);
    let latest = &repo.backups(&format!("rbd.{name}"))[..];
    let snap = latest.last().expect("backup")["to_snap"].as_str().expect("snap").to_string();
    let out = repo.path("r.raw");
    repo.ok(&["restore", &format!("rbd.{name}"), "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), c.export_hash(&format!("{image}@{snap}")));
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
}

#[test]
fn doctor_names_a_wrong_keyring_and_an_unreachable_endpoint() {
    let c = cluster();
    let repo = c.file_repo();
    repo.ok(&["doctor", "--source", "rbd:rbd"]);
    let bad = repo.path("bad.keyring");
    std::fs::write(&bad, "[client.admin]\n\tkey = AQBmZmZmAAAAABAAdGhpcyBpcyBub3QgYSBrZXkuLg==\n").expect("write");
    let out = repo
        .cmd(&["doctor", "--json"])
        .env("CEPH_KEYRING", &bad)
        .env(
            "CEPH_ARGS",
            format!("--conf {}/ceph.conf --keyring {}", c.dir.display(), bad.display()),
        )
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let cluster_check = j["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == "ceph cluster")
        .expect("cluster check");
    assert_eq!(cluster_check["ok"], false);
    let detail = cluster_check["detail"].as_str().expect("detail").to_lowercase();
    assert!(
        detail.contains("auth") || detail.contains("keyring") || detail.contains("permission"),
        "{detail}"
    );
    // An S3 endpoint nobody listens on.
    let out = repo
        .cmd(&[
            "doctor",
            "--no-ceph",
            "--repo",
            "s3://ferry-tests/x",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "--s3-allow-http",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("FAIL") && s.contains("repository reachable") && s.contains("127.0.0.1:9"),
        "{s}"
    );
}

/// Writes `wrapper`: an `rbd` whose incremental export-diffs go through the Python `filter`.
fn filter_incrementals(dir: &std::path::Path, wrapper: &std::path::Path, filter: &str) {
    std::fs::write(dir.join("filter.py"), filter).expect("write filter");
    let script = format!(
        "#!/bin/bash\nif [[ \" $* \" = *\" export-diff \"* && \" $* \" = *\" --from-snap \"* ]]; then rbd \"$@\" | python3 {}; exit ${{PIPESTATUS[0]}}; fi\nexec rbd \"$@\"\n",
        dir.join("filter.py").display()
    );
    write_script(wrapper, &script);
}

/// Writes an executable script.
fn write_script(path: &std::path::Path, script: &str) {
    std::fs::write(path, script).expect("write script");
    let mut perm = std::fs::metadata(path).expect("md").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(path, perm).expect("chmod");
}

/// `ferry backup rbd:IMAGE --json` with `wrapper` as its rbd: the JSON summary and stderr.
fn backup_through(repo: &crate::util::Repo, image: &str, wrapper: &std::path::Path, extra: &[&str]) -> (serde_json::Value, String) {
    let source = format!("rbd:{image}");
    let mut args = vec!["backup", source.as_str(), "--json"];
    args.extend_from_slice(extra);
    let out = repo.cmd(&args).env("FERRY_RBD_PROGRAM", wrapper).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).expect("json"), stderr)
}

/// The newest backup of `rbd.NAME` restores to what `rbd export` gives of its snapshot; then
/// the image goes.
fn restores_then_remove(c: &Cluster, repo: &crate::util::Repo, name: &str, j: &serde_json::Value) {
    let image = format!("rbd/{name}");
    let restored = repo.path("r.raw");
    repo.ok(&["restore", &format!("rbd.{name}"), "--to", restored.to_str().expect("utf8")]);
    assert_eq!(
        hash_file(&restored),
        c.export_hash(&format!("{image}@{}", j["to_snap"].as_str().expect("snap")))
    );
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
}

/// An rbd whose `rbd diff` (the exact extents of an incremental) drops every second extent:
/// the blocks still arrive whole and right from the whole-object export-diff, but each delta
/// would miss a change. The sampled check of delta blocks against both snapshots catches it,
/// and a full backup is taken instead.
#[test]
fn a_diff_that_misses_changes_inside_delta_blocks_is_caught() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("lying-delta");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "16M", &image]);
    apply(c, &image, 16 * MIB, &[(0, Some(pattern(21, 16 * MIB as usize)), 0)]);
    repo.ok(&["backup", &format!("rbd:{image}")]);
    // Two small writes in each of the four blocks.
    let writes: Vec<(u64, Option<Vec<u8>>, u64)> = (0..4u64)
        .flat_map(|b| {
            [
                (b * 4 * MIB + 1000, Some(pattern(22, 512)), 0),
                (b * 4 * MIB + 3 * MIB, Some(pattern(23, 512)), 0),
            ]
        })
        .collect();
    apply(c, &image, 16 * MIB, &writes);
    let wrapper = repo.dir.path().join("rbd-lying");
    let filter = repo.dir.path().join("filter.py");
    std::fs::write(&filter, "import json, sys\njson.dump(json.load(sys.stdin)[::2], sys.stdout)\n").expect("write filter");
    let script = format!(
        "#!/bin/bash\nfor a in \"$@\"; do [[ $a = diff ]] && {{ rbd \"$@\" | python3 {}; exit ${{PIPESTATUS[0]}}; }}; done\nexec rbd \"$@\"\n",
        filter.display()
    );
    write_script(&wrapper, &script);
    let (j, _) = backup_through(&repo, &image, &wrapper, &[]);
    assert_eq!(j["kind"], "full", "{j}");
    let reason = j["rbd"]["full_reason"].as_str().expect("reason");
    assert!(reason.contains("sampled delta blocks"), "{j}");
    restores_then_remove(c, &repo, &name, &j);
}

/// `rbd diff` failing only costs the deltas: the incremental goes on with whole blocks, says so,
/// and restores bit-exactly.
#[test]
fn a_failing_rbd_diff_stores_changed_blocks_whole() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("nodiff");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "8M", &image]);
    apply(c, &image, 8 * MIB, &[(0, Some(pattern(31, 8 * MIB as usize)), 0)]);
    repo.ok(&["backup", &format!("rbd:{image}")]);
    apply(c, &image, 8 * MIB, &[(4 * MIB + 100, Some(pattern(32, 700)), 0)]);
    let wrapper = repo.dir.path().join("rbd-nodiff");
    write_script(
        &wrapper,
        "#!/bin/bash\nfor a in \"$@\"; do [[ $a = diff ]] && { echo 'rbd: diff failed (injected)' >&2; exit 1; }; done\nexec rbd \"$@\"\n",
    );
    let (j, stderr) = backup_through(&repo, &image, &wrapper, &[]);
    assert!(stderr.contains("stored whole this time"), "{stderr}");
    assert_eq!(j["kind"], "incremental", "{j}");
    assert_eq!(
        (j["stats"]["blocks_changed"].as_u64(), j["stats"]["blocks_delta"].as_u64()),
        (Some(1), Some(0)),
        "{j}"
    );
    restores_then_remove(c, &repo, &name, &j);
}

/// An rbd whose incremental export-diff drops every data record (a diff bug like the ones
/// Ceph has had): ferry's re-read of unchanged blocks catches it and takes a full backup.
#[test]
fn a_diff_that_misses_changes_is_caught_and_a_full_backup_taken() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("lying");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "24M", &image]);
    apply(c, &image, 24 * MIB, &[(0, Some(pattern(11, 20 * MIB as usize)), 0)]);
    repo.ok(&["backup", &format!("rbd:{image}")]);
    apply(c, &image, 24 * MIB, &[(2 * MIB, Some(pattern(12, 6 * MIB as usize)), 0)]);
    let wrapper = repo.dir.path().join("rbd-lying");
    let filter = r#"import struct, sys
r, w = sys.stdin.buffer, sys.stdout.buffer
w.write(r.read(12))
while True:
    t = r.read(1)
    if t in (b"f", b"t"):
        n = r.read(4); w.write(t + n + r.read(struct.unpack("<I", n)[0]))
    elif t == b"s":
        w.write(t + r.read(8))
    else:
        break
w.write(b"e"); w.flush()
while r.read(1 << 20): pass
"#;
    filter_incrementals(repo.dir.path(), &wrapper, filter);

    let (j, _) = backup_through(&repo, &image, &wrapper, &["--verify-blocks", "64"]);
    assert_eq!(j["kind"], "full", "{j}");
    let reason = j["rbd"]["full_reason"].as_str().expect("reason");
    assert!(reason.contains("diff verification failed"), "{j}");
    // Two backups committed (the discarded incremental is not), one ferry snapshot left.
    assert_eq!(repo.backups(&format!("rbd.{name}")).len(), 2);
    assert_eq!(ferry_snaps(c, &image).len(), 1);
    restores_then_remove(c, &repo, &name, &j);
}

/// An rbd whose full export-diff flips one byte of the first data record: the backup is
/// authentic and complete, and the repository audit cannot tell it is wrong. `audit
/// --compare-source` reads the snapshot back and names the block; a correct backup compares
/// clean, and one whose snapshot is gone is information, not a finding.
#[test]
fn audit_compare_source_finds_a_backup_that_differs_from_its_snapshot() {
    let c = cluster();
    let repo = c.file_repo();
    let (good, bad) = (unique("cmp-good"), unique("cmp-bad"));
    for name in [&good, &bad] {
        let image = format!("rbd/{name}");
        c.rbd(&["create", "--size", "16M", &image]);
        apply(c, &image, 16 * MIB, &[(MIB, Some(pattern(41, 10 * MIB as usize)), 0)]);
    }
    // The good volume: two backups; only the second's snapshot stays on the cluster.
    repo.ok(&["backup", &format!("rbd:rbd/{good}")]);
    apply(c, &format!("rbd/{good}"), 16 * MIB, &[(12 * MIB, Some(pattern(42, 4096)), 0)]);
    repo.ok(&["backup", &format!("rbd:rbd/{good}")]);
    let clean = repo.json(&["audit", "--compare-source"]);
    assert_eq!(clean["ok"], true, "{clean}");
    assert_eq!(clean["source"]["backups_compared"], 1, "{clean}");
    assert_eq!(clean["source"]["blocks_compared"], 4, "{clean}");
    assert_eq!(clean["source"]["bytes_read"], 16 * MIB, "{clean}");
    let gone: Vec<&serde_json::Value> = clean["info"]
        .as_array()
        .expect("info")
        .iter()
        .filter(|f| f["kind"] == "source-gone")
        .collect();
    assert_eq!(gone.len(), 1, "{clean}");
    assert!(gone[0]["detail"].as_str().expect("detail").contains("no longer exists"), "{clean}");

    let wrapper = repo.dir.path().join("rbd-flip");
    std::fs::write(
        repo.dir.path().join("flip.py"),
        r#"import struct, sys
r, w = sys.stdin.buffer, sys.stdout.buffer
w.write(r.read(12))
flipped = False
while True:
    t = r.read(1)
    if t in (b"f", b"t"):
        n = r.read(4); w.write(t + n + r.read(struct.unpack("<I", n)[0]))
    elif t == b"s":
        w.write(t + r.read(8))
    elif t == b"z":
        w.write(t + r.read(16))
    elif t == b"w":
        h = r.read(16); w.write(t + h); left = struct.unpack("<QQ", h)[1]
        while left:
            d = bytearray(r.read(min(left, 1 << 20)))
            if not d: sys.exit("short record")
            if not flipped: d[0] ^= 0xFF; flipped = True
            left -= len(d); w.write(d)
    else:
        w.write(t + r.read()); break
w.flush()
"#,
    )
    .expect("write filter");
    write_script(
        &wrapper,
        &format!(
            "#!/bin/bash\nif [[ \" $* \" = *\" export-diff \"* && \" $* \" != *\" --from-snap \"* ]]; then rbd \"$@\" | python3 {}; exit ${{PIPESTATUS[0]}}; fi\nexec rbd \"$@\"\n",
            repo.dir.path().join("flip.py").display()
        ),
    );
    let (j, _) = backup_through(&repo, &format!("rbd/{bad}"), &wrapper, &[]);
    let backup = j["backup_id"].as_str().expect("backup id").to_string();
    // The repository alone cannot tell: every chunk is present and decodes to its ID.
    let plain = repo.json(&["audit", "--read-data"]);
    assert_eq!(plain["ok"], true, "{plain}");
    let found = repo.json_code(&["audit", "--compare-source", &format!("rbd.{bad}")], 3);
    let findings = found["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 1, "{found}");
    assert_eq!(findings[0]["kind"], "source-mismatch", "{found}");
    assert_eq!(findings[0]["volume"], format!("rbd.{bad}"), "{found}");
    assert_eq!(findings[0]["backup"], backup.as_str(), "{found}");
    // The first data record starts at 1 MiB: block 0 of 4 MiB blocks.
    assert!(findings[0]["detail"].as_str().expect("detail").starts_with("block 0 "), "{found}");
    // The human report names it too; a sample of 0 % reads nothing and finds nothing.
    let out = repo.run(&["audit", "--compare-source", &format!("rbd.{bad}")]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("FINDING [source-mismatch] rbd.{bad} {backup}: block 0 ")),
        "{text}"
    );
    let none = repo.json(&["audit", "--compare-source", "--sample", "0", &format!("rbd.{bad}")]);
    assert_eq!(
        (none["ok"].as_bool(), none["source"]["blocks_compared"].as_u64()),
        (Some(true), Some(0)),
        "{none}"
    );
    for name in [&good, &bad] {
        let image = format!("rbd/{name}");
        c.rbd(&["snap", "purge", "--no-progress", &image]);
        c.rbd(&["rm", "--no-progress", &image]);
    }
}

/// Standby replay (issue 12 item 1): a DR image built from backup 1, replayed to 2 (grown) and
/// 3 (shrunk), equals the source snapshots and carries their names, writing only what
/// changed; a replay killed half-way is repaired by the next without --force; an image
/// written since its last replay is refused, and --force brings it back.
#[test]
fn a_standby_image_follows_the_backups_through_grow_shrink_and_a_broken_replay() {
    let c = cluster();
    let repo = c.file_repo();
    let (name, dr) = (unique("standby-src"), unique("standby-dr"));
    let (image, dr_image) = (format!("rbd/{name}"), format!("rbd/{dr}"));
    let (vol, onto) = (format!("rbd.{name}"), format!("rbd:{dr_image}"));
    c.rbd(&["create", "--size", "24M", &image]);
    apply(
        c,
        &image,
        24 * MIB,
        &[
            (0, Some(pattern(51, 10 * MIB as usize)), 0),
            (16 * MIB, Some(pattern(52, 3 * MIB as usize)), 0),
        ],
    );
    let backup = |repo: &Repo| {
        let j = repo.json(&["backup", &format!("rbd:{image}")]);
        let snap = j["to_snap"].as_str().expect("snap").to_string();
        let hash = c.export_hash(&format!("{image}@{snap}"));
        (snap, hash, j["backup_id"].as_str().expect("id").to_string())
    };
    let (snap1, hash1, id1) = backup(&repo);
    let r1 = repo.json(&["replay", &vol, "--onto", &onto]);
    assert_eq!(
        (r1["kind"].as_str(), r1["backup_id"].as_str()),
        (Some("full"), Some(id1.as_str())),
        "{r1}"
    );
    assert_eq!(c.export_hash(&format!("{dr_image}@{snap1}")), hash1);
    assert_eq!(c.snaps(&dr_image), std::slice::from_ref(&snap1));
    // Again: nothing to do.
    let same = repo.json(&["replay", &vol, "--onto", &onto]);
    assert_eq!(same["kind"], "up-to-date", "{same}");

    // Grown, with a small write and a large one in the new space.
    apply(
        c,
        &image,
        32 * MIB,
        &[
            (5 * MIB + 3, Some(pattern(53, 8192)), 0),
            (28 * MIB, Some(pattern(54, 2 * MIB as usize)), 0),
        ],
    );
    let (snap2, hash2, _) = backup(&repo);
    let r2 = repo.json(&["replay", &vol, "--onto", &onto]);
    assert_eq!(
        (r2["kind"].as_str(), r2["from_backup"].as_str()),
        (Some("incremental"), Some(id1.as_str())),
        "{r2}"
    );
    assert_eq!(r2["blocks_written"], 2, "only the two changed 4 MiB blocks: {r2}");
    assert_eq!(c.export_hash(&format!("{dr_image}@{snap2}")), hash2);
    assert_eq!(
        c.snaps(&dr_image),
        std::slice::from_ref(&snap2),
        "the old base goes once the new one exists"
    );
    assert_eq!(r2["snapshots_removed"][0], snap1.as_str(), "{r2}");

    // Shrunk, and the replay into it broken half-way: the next one repairs it without --force.
    apply(
        c,
        &image,
        20 * MIB,
        &[(MIB, Some(pattern(55, 4096)), 0), (9 * MIB, Some(pattern(56, 3 * MIB as usize)), 0)],
    );
    let (snap3, hash3, _) = backup(&repo);
    let wrapper = repo.dir.path().join("rbd-cut");
    write_script(
        &wrapper,
        "#!/bin/bash\nfor a in \"$@\"; do [[ $a = import-diff ]] && { head -c 5000000 | rbd \"$@\"; exit 1; }; done\nexec rbd \"$@\"\n",
    );
    let out = repo
        .cmd(&["replay", &vol, "--onto", &onto])
        .env("FERRY_RBD_PROGRAM", &wrapper)
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let meta = String::from_utf8_lossy(&c.rbd(&["image-meta", "list", "--format", "json", &dr_image])).to_string();
    assert!(meta.contains("ferry.replay.pending"), "{meta}");
    let written: serde_json::Value =
        serde_json::from_slice(&c.rbd(&["diff", "--from-snap", &snap2, "--format", "json", &dr_image])).expect("json");
    assert!(
        !written.as_array().expect("array").is_empty(),
        "the cut replay wrote part of its stream"
    );
    let r3 = repo.json(&["replay", &vol, "--onto", &onto]);
    assert_eq!(r3["kind"], "incremental", "{r3}");
    assert_eq!(c.export_hash(&format!("{dr_image}@{snap3}")), hash3);
    let info: serde_json::Value = serde_json::from_slice(&c.rbd(&["info", "--format", "json", &dr_image])).expect("json");
    assert_eq!(info["size"], 20 * MIB);
    let meta = String::from_utf8_lossy(&c.rbd(&["image-meta", "list", "--format", "json", &dr_image])).to_string();
    assert!(!meta.contains("ferry.replay.pending"), "{meta}");

    // Written on the standby since its last replay: diverged, refused; --force repairs it.
    apply(c, &dr_image, 20 * MIB, &[(2 * MIB, Some(pattern(57, 4096)), 0)]);
    apply(c, &image, 20 * MIB, &[(15 * MIB, Some(pattern(58, 4096)), 0)]);
    let (snap4, hash4, _) = backup(&repo);
    let refused = repo.fails(&["replay", &vol, "--onto", &onto], 5);
    assert!(refused.contains("diverged"), "{refused}");
    let r4 = repo.json(&["replay", &vol, "--onto", &onto, "--force"]);
    assert_eq!(
        (r4["kind"].as_str(), r4["blocks_diverged"].as_u64()),
        (Some("incremental"), Some(1)),
        "{r4}"
    );
    assert_eq!(c.export_hash(&format!("{dr_image}@{snap4}")), hash4);
    assert_eq!(c.export_hash(&dr_image), hash4, "the head too");
    // A standby shrunk since its snapshot lost data no `rbd diff` shows: diverged too.
    c.rbd(&["resize", "--no-progress", "--allow-shrink", "--size", "12M", &dr_image]);
    apply(c, &image, 20 * MIB, &[(17 * MIB, Some(pattern(59, 4096)), 0)]);
    let (snap5, hash5, _) = backup(&repo);
    let refused = repo.fails(&["replay", &vol, "--onto", &onto], 5);
    assert!(refused.contains("resized"), "{refused}");
    // The repository failing mid-replay: nothing of the new backup's snapshot appears (the
    // stream never ends), and the next replay (forced: the shrink is still there) is whole.
    let out = repo
        .cmd(&["replay", &vol, "--onto", &onto, "--force"])
        .env("FERRY_TEST_FAULTS", "get:chunks/*:status=500")
        .output()
        .expect("run");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        !c.snaps(&dr_image).contains(&snap5),
        "a failed replay must not create the new snapshot"
    );
    repo.ok(&["replay", &vol, "--onto", &onto, "--force"]);
    assert_eq!(c.export_hash(&format!("{dr_image}@{snap5}")), hash5);
    assert_eq!(c.export_hash(&dr_image), hash5);
    // Not a standby of this volume: refused.
    let other = unique("standby-other");
    c.rbd(&["create", "--size", "4M", &format!("rbd/{other}")]);
    let refused = repo.fails(&["replay", &vol, "--onto", &format!("rbd:rbd/{other}")], 5);
    assert!(refused.contains("not a standby"), "{refused}");
    for i in [&image, &dr_image, &format!("rbd/{other}")] {
        c.rbd(&["snap", "purge", "--no-progress", i]);
        c.rbd(&["rm", "--no-progress", i]);
    }
}

/// Instant restore (issue 12 item 2): right after `--instant` says the image is usable, the
/// image is still a migration (its data behind a slowed-down store) and `rbd export` of it
/// already equals the backup; once ferry exits the migration is committed, the image is an
/// ordinary one and still equal. A second instant restore onto an existing image is refused.
#[test]
fn an_instant_restore_is_readable_at_once_and_whole_after_the_migration() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("instant-src");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "48M", &image]);
    apply(
        c,
        &image,
        48 * MIB,
        &[
            (0, Some(pattern(61, 9 * MIB as usize)), 0),
            (30 * MIB, Some(pattern(62, 10 * MIB as usize)), 0),
        ],
    );
    let j = repo.json(&["backup", &format!("rbd:{image}")]);
    let snap = j["to_snap"].as_str().expect("snap").to_string();
    let want = c.export_hash(&format!("{image}@{snap}"));
    let target = format!("rbd/{}", unique("instant-dr"));
    // Every chunk GET takes a second: the migration runs for several.
    let mut child = repo
        .cmd(&["restore", &format!("rbd.{name}"), "--to", &format!("rbd:{target}"), "--instant"])
        .env("FERRY_TEST_FAULTS", "get:chunks/*:slow=1s")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("read");
    assert!(line.contains("is usable after"), "{line}");
    let status = String::from_utf8_lossy(&c.rbd(&["status", &target])).to_string();
    assert!(status.contains("Migration"), "still migrating when it is usable: {status}");
    assert_eq!(c.export_hash(&target), want, "readable at once, and equal");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read");
    let code = child.wait().expect("wait");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(code.success(), "{rest}\n{err}");
    assert!(rest.contains("the migration is committed"), "{rest}");
    let status = String::from_utf8_lossy(&c.rbd(&["status", &target])).to_string();
    assert!(!status.contains("Migration"), "{status}");
    assert_eq!(c.export_hash(&target), want);
    c.rbd(&["snap", "create", "--no-progress", &format!("{target}@ordinary")]);
    let again = repo.fails(
        &["restore", &format!("rbd.{name}"), "--to", &format!("rbd:{target}"), "--instant"],
        5,
    );
    assert!(again.contains("exists"), "{again}");
    for i in [&image, &target] {
        c.rbd(&["snap", "purge", "--no-progress", i]);
        c.rbd(&["rm", "--no-progress", i]);
    }
}

/// Tools the NBD test drives; `scripts/test` installs them (qemu-utils, libnbd-bin,
/// e2fsprogs). Missing, the test fails and says which.
fn require_tools(tools: &[&str]) {
    for t in tools {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{t} is not installed (scripts/test installs it: qemu-utils, libnbd-bin, e2fsprogs)"
        );
    }
}

fn run_tool(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Open a backup without restoring it (issue 12 item 3): an RBD image holding an ext4
/// filesystem is backed up; `ferry serve` exports the backup over NBD (TCP and a Unix
/// socket); `qemu-img convert` and `nbdcopy` of the export equal `ferry restore`; `nbdinfo
/// --map` sees its holes; and a file is read out of the filesystem by `debugfs` through
/// qemu-storage-daemon's NBD client (the export as a FUSE file) — no restore anywhere.
#[test]
fn a_backup_opens_over_nbd_for_qemu_nbdcopy_and_a_file_inside_its_ext4() {
    require_tools(&["qemu-img", "qemu-storage-daemon", "nbdcopy", "nbdinfo", "mke2fs", "debugfs"]);
    let c = cluster();
    let repo = c.file_repo();
    let dir = repo.path("fs");
    std::fs::create_dir_all(dir.join("docs")).expect("mkdir");
    let big = pattern(91, 3 * MIB as usize + 12_345);
    std::fs::write(dir.join("docs/big.bin"), &big).expect("write");
    std::fs::write(dir.join("hello.txt"), b"hello from inside the backup\n").expect("write");
    let fs_image = repo.path("fs.img");
    run_tool(
        std::process::Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&dir)
            .arg(&fs_image)
            .arg("64M"),
    );
    let name = unique("nbd-src");
    let image = format!("rbd/{name}");
    c.rbd(&["import", "--no-progress", fs_image.to_str().expect("utf8"), &image]);
    let j = repo.json(&["backup", &format!("rbd:{image}")]);
    let volume = format!("rbd.{name}");
    let restored = repo.path("restored.raw");
    repo.ok(&["restore", &volume, "--to", restored.to_str().expect("utf8")]);
    assert_eq!(hash_file(&restored), hash_file(&fs_image), "{j}");

    let socket = repo.path("nbd.sock");
    let server = crate::serve::Server::start(
        &repo,
        &[&volume, "--nbd", "127.0.0.1:0", "--nbd-socket", socket.to_str().expect("utf8")],
    );
    let tcp = server.urls["nbd"].as_str().expect("nbd url").to_string();
    let unix = server.urls["nbd_unix"].as_str().expect("nbd_unix url").to_string();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).expect("socket").permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is its owner's alone");

    let by_qemu = repo.path("qemu.raw");
    run_tool(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &tcp])
            .arg(&by_qemu),
    );
    assert_eq!(
        hash_file(&by_qemu),
        hash_file(&restored),
        "qemu-img convert of the export equals the restore"
    );
    let by_nbdcopy = repo.path("nbdcopy.raw");
    run_tool(std::process::Command::new("nbdcopy").arg(&unix).arg(&by_nbdcopy));
    assert_eq!(
        hash_file(&by_nbdcopy),
        hash_file(&restored),
        "nbdcopy of the export equals the restore"
    );
    let map = run_tool(std::process::Command::new("nbdinfo").args(["--map", &tcp]));
    assert!(
        map.contains("hole,zero") && map.contains("data"),
        "block status shows holes and data: {map}"
    );
    let info = run_tool(std::process::Command::new("nbdinfo").arg(&tcp));
    assert!(info.contains("is_read_only: true"), "{info}");

    // The filesystem, read in place: qemu-storage-daemon's NBD client, exported as a file.
    let token = tcp.rsplit('/').next().expect("token").to_string();
    let mount = repo.path("export.raw");
    std::fs::write(&mount, b"").expect("mountpoint");
    let mut qsd = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=n,server.type=unix,server.path={},export={token},read-only=on",
            socket.display()
        ))
        .arg("--export")
        .arg(format!("type=fuse,id=e,node-name=n,mountpoint={},writable=off", mount.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&mount).map(|m| m.len()).unwrap_or(0) != 64 * MIB {
        if let Ok(Some(status)) = qsd.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut qsd.stderr.take().expect("stderr"), &mut err);
            panic!("qemu-storage-daemon ended ({status}): {err}");
        }
        assert!(std::time::Instant::now() < deadline, "the FUSE export did not appear");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = repo.path("big.out");
    let dump = std::process::Command::new("debugfs")
        .args(["-R", &format!("dump /docs/big.bin {}", out.display())])
        .arg(&mount)
        .output();
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(&mount)
        .output();
    let _ = std::process::Command::new("kill").args(["-TERM", &qsd.id().to_string()]).status();
    let _ = qsd.wait();
    let _ = std::process::Command::new("fusermount").arg("-u").arg(&mount).output();
    let (dump, cat) = (dump.expect("debugfs"), cat.expect("debugfs"));
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    assert!(
        std::fs::read(&out).expect("the dumped file") == big,
        "the file read out of ext4 in the backup"
    );
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello from inside the backup\n");

    let stats = server.stop();
    assert!(stats["blocks_fetched"].as_u64().expect("fetched") > 0, "{stats}");
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
}

// ------------------------------------------------------------------------------------------
// Oracles that are not ferry: the kernel's block device, the real rbd import-diff and export,
// RADOS locks seen by the rados tool, the raw bytes of the bucket.

use crate::util::{assert_same, ImageGuard};

/// A loop device over a file in a temp dir, detached when dropped.
struct LoopDevice {
    dev: String,
    backing: std::path::PathBuf,
    size: u64,
}

impl LoopDevice {
    /// A loop device of `size` bytes (a multiple of 512), every byte `fill`. Fails loudly,
    /// with the reason, when this machine cannot make loop devices.
    fn new(dir: &std::path::Path, name: &str, size: u64, fill: u8) -> LoopDevice {
        let backing = dir.join(name);
        std::fs::write(&backing, vec![fill; size as usize]).expect("write the loop device's backing file");
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&backing).output();
        match out {
            Ok(o) if o.status.success() => LoopDevice {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
                backing,
                size,
            },
            Ok(o) => panic!(
                "cannot create a loop device for the block-device restore test: losetup -f --show failed ({}): {}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim(),
                loop_diagnosis()
            ),
            Err(e) => panic!("cannot run losetup ({e}); install util-linux\n{}", loop_diagnosis()),
        }
    }

    /// Overwrites the whole device with `byte` (through the device) and syncs.
    fn fill(&self, byte: u8) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&self.dev).expect("open loop device");
        f.write_all(&vec![byte; self.size as usize]).expect("fill loop device");
        f.sync_all().expect("sync loop device");
    }

    /// What the device holds: its backing file (reached only through the device's flushes,
    /// so a restore that did not fsync shows up as stale bytes).
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.backing).expect("read backing file")
    }

    /// What a reader of the device sees.
    fn device_view(&self) -> Vec<u8> {
        std::fs::read(&self.dev).expect("read loop device")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let out = std::process::Command::new("losetup").args(["-d", &self.dev]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("could not detach {}: {out:?}", self.dev);
        }
    }
}

/// Why loop devices may be missing: the facts a failing test should print.
fn loop_diagnosis() -> String {
    let mut facts = vec![format!("euid {}", unsafe { libc::geteuid() })];
    facts.push(format!(
        "/dev/loop-control exists: {}",
        std::path::Path::new("/dev/loop-control").exists()
    ));
    let devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    facts.push(format!(
        "block major 'loop' in /proc/devices: {}",
        devices.lines().any(|l| l.split_whitespace().nth(1) == Some("loop"))
    ));
    facts.push(format!(
        "/sys/module/loop exists: {}",
        std::path::Path::new("/sys/module/loop").exists()
    ));
    match std::process::Command::new("modprobe").arg("loop").output() {
        Ok(o) => facts.push(format!("modprobe loop: {} {}", o.status, String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => facts.push(format!("modprobe not runnable: {e}")),
    }
    facts.join("; ")
}

/// A block device gets every byte of the image (zeros for holes, discards and zero writes,
/// nothing past the image), compared with `rbd export` of each backup's snapshot; a device
/// three sectors too small is refused with exit 5 and left untouched.
#[test]
fn restore_to_a_block_device_writes_every_byte_and_refuses_a_small_one() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("blk");
    let image = images.add(&format!("rbd/{name}"));
    let source = format!("rbd:{image}");
    // 22 MiB + 3 sectors: six 4 MiB objects, the last one short.
    let size = 22 * MIB + 1536;
    c.rbd(&["create", "--size", &format!("{size}B"), &image]);
    // Objects 1 and 4 never written (holes); data unaligned in 0, whole in 2, at the end.
    apply(
        c,
        &image,
        size,
        &[
            (4096 + 7, Some(pattern(21, 3 * MIB as usize)), 0),
            (8 * MIB, Some(pattern(22, 4 * MIB as usize)), 0),
            (16 * MIB - 100, Some(pattern(23, 200)), 0),
            (size - 1000, Some(pattern(24, 1000)), 0),
        ],
    );
    let mut backups: Vec<(String, Vec<u8>)> = Vec::new();
    let mut backup = |kind: &str| {
        let j = repo.json(&["backup", &source]);
        assert_eq!(j["kind"], kind, "{j}");
        let snap = j["to_snap"].as_str().expect("to_snap");
        backups.push((
            j["backup_id"].as_str().expect("id").to_string(),
            c.export(&format!("{image}@{snap}")),
        ));
    };
    backup("full");
    // A whole-object discard, a partial discard, an all-zero write, data into a hole.
    apply(
        c,
        &image,
        size,
        &[
            (MIB, None, 64 * 1024),
            (2 * MIB, Some(vec![0u8; 8192]), 0),
            (8 * MIB, None, 4 * MIB),
            (17 * MIB + 3, Some(pattern(25, 5000)), 0),
            (20 * MIB + 512, None, 4096),
        ],
    );
    backup("incremental");
    apply(
        c,
        &image,
        size,
        &[(5 * MIB, Some(pattern(26, 100_000)), 0), (12 * MIB, None, 4 * MIB)],
    );
    backup("incremental");
    assert!(
        backups[0].1[8 * MIB as usize..12 * MIB as usize].iter().any(|&b| b != 0)
            && backups[1].1[8 * MIB as usize..12 * MIB as usize].iter().all(|&b| b == 0),
        "the discard of object 2 did not take effect in the source image"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    // 24 MiB, larger than the image: the tail must stay 0xFF.
    let dev = LoopDevice::new(dir.path(), "big.img", 24 * MIB, 0xFF);
    let restore = |id: &str| {
        repo.ok(&["restore", &format!("rbd.{name}@{id}"), "--to", &dev.dev]);
    };
    let check = |what: &str, expected: &[u8]| {
        let got = dev.contents();
        if blake3::hash(&got[..size as usize]) != blake3::hash(expected) {
            let view = dev.device_view();
            let through_device = if view[..size as usize] == *expected {
                "a reader of the device sees the right bytes: the restore did not reach the device (no fsync?)"
            } else {
                "a reader of the device sees wrong bytes too"
            };
            assert_same(&format!("{what} ({through_device})"), expected, &got[..size as usize], 4 * MIB);
        }
        let tail = &got[size as usize..];
        if let Some(i) = tail.iter().position(|&b| b != 0xFF) {
            panic!(
                "{what}: the restore wrote past the image end (image {size} bytes; byte {} of the device changed)",
                size as usize + i
            );
        }
    };
    // Every backup onto a device full of 0xFF, newest first.
    for (i, (id, expected)) in backups.iter().enumerate().rev() {
        dev.fill(0xFF);
        restore(id);
        check(&format!("backup {i} ({id}) restored onto 0xFF"), expected);
    }
    // Over another backup's bytes: the first backup restored over the last one.
    restore(&backups[2].0);
    restore(&backups[0].0);
    check("backup 0 restored over backup 2", &backups[0].1);

    // Three sectors too small: refused, nothing written.
    let small = LoopDevice::new(dir.path(), "small.img", size - 1536, 0xFF);
    assert!(small.size < size);
    let err = repo.fails(&["restore", &format!("rbd.{name}"), "--to", &small.dev], 5);
    assert!(
        err.contains(&small.dev) && err.contains(&size.to_string()),
        "the refusal should name device and size: {err}"
    );
    let got = small.contents();
    if let Some(i) = got.iter().position(|&b| b != 0xFF) {
        panic!("a refused restore wrote to the device (byte {i} changed)");
    }
    if let Some(i) = small.device_view().iter().position(|&b| b != 0xFF) {
        panic!("a refused restore wrote to the device (byte {i} reads changed through the device)");
    }
}

/// The chain of tests/core.rs on a real RBD image (1 MiB objects, so blocks are as there):
/// unaligned writes across object boundaries, a zero write, a discard, a grow with data, a
/// shrink into the middle of an object, a regrow (reads zeros), then a partial-object
/// overwrite. The changes reach the image through the real `rbd import-diff` of
/// `ferry_testdata::Volume` streams and `rbd resize`; each step is backed up with
/// `ferry backup rbd:…`. Every backup's raw restore equals `rbd export` of its snapshot, and
/// its `--format import-diff` restore, fed to the real `rbd import-diff` into a fresh image,
/// exports to the same bytes.
#[test]
fn the_core_chain_on_a_real_rbd_image_restores_and_imports_identically() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("chain");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    let mut v = ferry_testdata::Volume::generated(9 * MIB + 12_345, 1 << 20, 42);
    c.rbd(&["create", "--size", &format!("{}B", v.size()), "--object-size", "1M", &image]);

    // (label, backup id, to_snap, rbd export of the snapshot)
    let mut steps: Vec<(String, String, String, Vec<u8>)> = Vec::new();
    let mut step = |v: &mut ferry_testdata::Volume, snap: &str, resize: bool, kind: &str| {
        if resize {
            c.rbd(&[
                "resize",
                "--no-progress",
                "--allow-shrink",
                "--size",
                &format!("{}B", v.size()),
                &image,
            ]);
        }
        let stream = v.diff(snap, Vec::new()).expect("diff");
        c.rbd_with_stdin(&["import-diff", "--no-progress", "-", &image], Some(&stream));
        let j = repo.json(&["backup", &format!("rbd:{image}")]);
        // At s6 the block cut by the shrink keeps its truncated 0.5 MiB chunk after the regrow;
        // the diff verification re-reads the whole 1 MiB block (zero tail) and must still find
        // it unchanged: the backup stays incremental.
        assert_eq!(j["kind"], kind, "{snap}: {j}");
        assert_eq!(j["block_size"], MIB, "{snap}: {j}");
        assert_eq!(j["image_size"], v.size(), "{snap}: {j}");
        let to_snap = j["to_snap"].as_str().expect("to_snap").to_string();
        let expected = c.export(&format!("{image}@{to_snap}"));
        // The replay itself: the image must hold what the model holds.
        assert_same(
            &format!("{snap}: rbd export of the replayed image vs the model"),
            &v.data,
            &expected,
            MIB,
        );
        steps.push((
            snap.to_string(),
            j["backup_id"].as_str().expect("id").to_string(),
            to_snap,
            expected,
        ));
    };
    step(&mut v, "s1", false, "full");
    // Overwrites, unaligned and across an object boundary; an all-zero write; a discard.
    v.write(3 * MIB - 100, &vec![0xAB; 300]);
    v.write(12_345, b"hello ferry");
    v.write_zeros(5 * MIB + 4096, 8192);
    v.discard(6 * MIB, MIB);
    step(&mut v, "s2", false, "incremental");
    // Grow and write into the new area.
    v.resize(14 * MIB + 777);
    v.write(13 * MIB, &vec![7u8; 5000]);
    step(&mut v, "s3", true, "incremental");
    // Shrink into the middle of an object.
    v.resize(4 * MIB + MIB / 2);
    step(&mut v, "s4", true, "incremental");
    // Regrow in a separate interval: the regrown bytes must read as zeros.
    v.resize(8 * MIB);
    step(&mut v, "s5", true, "incremental");
    // A partial-object overwrite after the shrink and regrow.
    v.write(7 * MIB + 3, &vec![9u8; 70_000]);
    step(&mut v, "s6", false, "incremental");
    assert_eq!(repo.backups(&volume).len(), 6);

    for (i, (label, id, to_snap, expected)) in steps.iter().enumerate() {
        // Raw restore into a file.
        let raw = repo.path(&format!("{id}.raw"));
        repo.ok(&["restore", &format!("{volume}@{id}"), "--to", raw.to_str().expect("utf8")]);
        assert_same(
            &format!("{label}: raw restore of {id} vs rbd export {image}@{to_snap}"),
            expected,
            &std::fs::read(&raw).expect("read restore"),
            MIB,
        );
        // As an import-diff stream, applied by the real rbd into a fresh image (4 MiB objects,
        // 4 KiB to start with: import-diff resizes it). Every other one names a snapshot
        // (--snap-name), which import-diff then creates; without it the stream names none.
        let stream = repo.path(&format!("{id}.diff"));
        let snap_name = format!("restored-{label}");
        let spec = format!("{volume}@{id}");
        let mut args = vec!["restore", &spec, "--to", stream.to_str().expect("utf8"), "--format", "import-diff"];
        if i % 2 == 0 {
            args.extend(["--snap-name", &snap_name]);
        }
        repo.ok(&args);
        let fresh = images.add(&format!("rbd/{name}-imp{i}"));
        c.rbd(&["create", "--size", "4096B", &fresh]);
        c.rbd_with_stdin(
            &["import-diff", "--no-progress", "-", &fresh],
            Some(&std::fs::read(&stream).expect("read stream")),
        );
        let want: Vec<String> = if i % 2 == 0 { vec![snap_name.clone()] } else { Vec::new() };
        assert_eq!(c.snaps(&fresh), want, "{label}: snapshots rbd import-diff created from the stream");
        assert_same(
            &format!("{label}: rbd import-diff of the import-diff restore of {id}, exported, vs rbd export {image}@{to_snap}"),
            expected,
            &c.export(&fresh),
            MIB,
        );
        let _ = std::fs::remove_file(raw);
        let _ = std::fs::remove_file(stream);
    }
    assert_eq!(ferry_snaps(c, &image), vec![steps[5].2.clone()], "one ferry snapshot left");
}

/// Disaster recovery from RGW: several backups of two images into an `s3://` repository, the
/// images lost, then a brand-new empty index directory: every backup restores from the
/// bucket alone, equal to `rbd export` of its snapshot taken at backup time.
#[test]
fn every_backup_restores_from_rgw_with_an_empty_index_after_the_images_are_gone() {
    let c = cluster();
    let repo = c.s3_repo();
    let mut images = ImageGuard::new(c);
    let (a, b) = (unique("dra"), unique("drb"));
    let img_a = images.add(&format!("rbd/{a}"));
    let img_b = images.add(&format!("rbd/{b}"));
    c.rbd(&["create", "--size", "20M", &img_a]);
    c.rbd(&["create", "--size", "12M", "--object-size", "1M", &img_b]);
    apply(
        c,
        &img_a,
        20 * MIB,
        &[
            (MIB + 5, Some(pattern(31, 6 * MIB as usize)), 0),
            (19 * MIB, Some(pattern(32, 4096)), 0),
        ],
    );
    apply(
        c,
        &img_b,
        12 * MIB,
        &[
            (0, Some(pattern(33, 3 * MIB as usize)), 0),
            (9 * MIB + 1, Some(pattern(34, 100)), 0),
        ],
    );

    // (volume, backup id, to_snap, rbd export of the snapshot right after the backup)
    let mut expected: Vec<(String, String, String, Vec<u8>)> = Vec::new();
    let mut backup = |img: &str, name: &str| {
        let j = repo.json(&["backup", &format!("rbd:{img}")]);
        let snap = j["to_snap"].as_str().expect("to_snap").to_string();
        let bytes = c.export(&format!("{img}@{snap}"));
        expected.push((format!("rbd.{name}"), j["backup_id"].as_str().expect("id").to_string(), snap, bytes));
    };
    backup(&img_a, &a);
    backup(&img_b, &b);
    apply(
        c,
        &img_a,
        20 * MIB,
        &[(4 * MIB, None, 4 * MIB), (10 * MIB - 3, Some(pattern(35, 10)), 0)],
    );
    backup(&img_a, &a);
    apply(
        c,
        &img_b,
        12 * MIB,
        &[(2 * MIB, Some(vec![0u8; 4096]), 0), (11 * MIB, Some(pattern(36, MIB as usize)), 0)],
    );
    backup(&img_b, &b);
    c.rbd(&["resize", "--no-progress", "--size", "28M", &img_a]);
    apply(c, &img_a, 28 * MIB, &[(25 * MIB, Some(pattern(37, 2 * MIB as usize)), 0)]);
    backup(&img_a, &a);
    assert_eq!(expected.len(), 5);

    // The disaster: the images and the old index are gone.
    drop(images);
    std::fs::remove_dir_all(repo.path("index")).expect("remove the old index");
    let fresh_index = tempfile::tempdir().expect("temp dir");
    let index_dir = fresh_index.path().join("index");
    let dr = |args: &[&str]| {
        let out = repo.cmd(args).env("FERRY_INDEX_DIR", &index_dir).output().expect("run ferry");
        assert!(
            out.status.success(),
            "ferry {args:?} with an empty index failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let ls: serde_json::Value = serde_json::from_slice(&dr(&["ls", "--json"])).expect("json");
    let listed: Vec<&str> = ls
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["backup_id"].as_str().expect("backup_id"))
        .collect();
    for (volume, id, _, _) in &expected {
        assert!(listed.contains(&id.as_str()), "ls from an empty index lacks {volume}@{id}: {ls}");
    }
    assert_eq!(listed.len(), expected.len(), "{ls}");
    assert!(
        std::fs::read_dir(&index_dir).map(|d| d.count() > 0).unwrap_or(false),
        "the new index dir {} should have been filled from the bucket",
        index_dir.display()
    );
    for (volume, id, snap, bytes) in &expected {
        let out = fresh_index.path().join(format!("{id}.raw"));
        dr(&["restore", &format!("{volume}@{id}"), "--to", out.to_str().expect("utf8")]);
        assert_same(
            &format!("restore of {volume}@{id} from RGW with a new index vs rbd export of @{snap}"),
            bytes,
            &std::fs::read(&out).expect("read"),
            MIB,
        );
        let _ = std::fs::remove_file(out);
    }
    // And the newest backup of A back into RBD, by snapshot name.
    let mut images = ImageGuard::new(c);
    let target = images.add(&format!("rbd/{a}-dr"));
    let (volume, _, snap, bytes) = &expected[4];
    dr(&["restore", &format!("{volume}@{snap}"), "--to", &format!("rbd:{target}")]);
    assert_same(
        &format!("restore of {volume}@{snap} into rbd:{target}"),
        bytes,
        &c.export(&target),
        4 * MIB,
    );
}

/// A wrapper around rbd whose export-diff passes 1 MiB of the stream, touches `stalled`, then
/// waits (at most 60 s) for a file `go` before passing the rest. Bytes are passed exactly
/// (dd with fullblock), so the stream itself stays intact.
fn stalling_rbd(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("rbd-stall");
    let (stalled, go) = (dir.join("stalled"), dir.join("go"));
    let script = format!(
        "#!/bin/bash\nfor a in \"$@\"; do\n  if [[ $a = export-diff ]]; then\n    rbd \"$@\" | {{\n      dd bs=64K count=16 iflag=fullblock status=none\n      touch '{}'\n      for i in $(seq 600); do [[ -e '{}' ]] && break; sleep 0.1; done\n      cat\n    }}\n    exit ${{PIPESTATUS[0]}}\n  fi\ndone\nexec rbd \"$@\"\n",
        stalled.display(),
        go.display()
    );
    crate::util::write_executable(&p, &script);
    p
}

/// The lockers of ferry's lease on an image, as the rados tool sees them: (name, cookie).
fn lease_lockers(c: &Cluster, pool: &str, image: &str) -> Vec<(String, String)> {
    let out = c.rados(&[
        "-p",
        pool,
        "lock",
        "info",
        &format!("ferry.lease.{image}"),
        "ferry.lease",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("lock info json");
    v["lockers"]
        .as_array()
        .expect("lockers")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().expect("name").into(),
                l["cookie"].as_str().expect("cookie").into(),
            )
        })
        .collect()
}

/// The lease is broken (`rados lock break`) while export-diff stalls mid-stream: the backup
/// fails, commits nothing, keeps the base snapshot, removes its own, does not take the lock
/// back; the next backup (same stalling wrapper, not stalled) is an incremental from the base.
#[test]
fn a_lease_broken_mid_backup_commits_nothing_and_the_next_backup_is_incremental() {
    broken_lease("3", false, 2500);
}

/// The lock is broken and at once taken by another client, and the stream resumes at once:
/// well inside the renewal interval of a 60 s lease, so only asking the cluster right before
/// the commit can notice.
#[test]
fn a_lease_taken_over_mid_backup_is_noticed_before_the_commit() {
    broken_lease("60", true, 0);
}

fn broken_lease(lease_seconds: &str, take_over: bool, pause_ms: u64) {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("lost");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "32M", &image]);
    apply(c, &image, 32 * MIB, &[(0, Some(pattern(41, 12 * MIB as usize)), 0)]);
    let first = repo.json(&["backup", &format!("rbd:{image}")]);
    let base = first["to_snap"].as_str().expect("snap").to_string();
    let before = repo.json(&["ls", &volume]);
    assert!(lease_lockers(c, "rbd", &name).is_empty(), "the first backup must release its lease");
    // Eight objects change: the incremental stream is ~32 MiB, it stalls after 1 MiB.
    apply(c, &image, 32 * MIB, &[(MIB, Some(pattern(42, 28 * MIB as usize)), 0)]);

    let wrapper = stalling_rbd(repo.dir.path());
    let (stalled, go) = (repo.dir.path().join("stalled"), repo.dir.path().join("go"));
    let child = repo
        .cmd(&["backup", &format!("rbd:{image}"), "--lease-seconds", lease_seconds, "--json"])
        .env("FERRY_RBD_PROGRAM", &wrapper)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let kill = || unsafe {
        libc::kill(pid, libc::SIGKILL);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stalled.exists() {
        if let Ok(out) = rx.try_recv() {
            panic!("ferry ended before export-diff stalled: {out:?}");
        }
        if std::time::Instant::now() > deadline {
            kill();
            panic!("export-diff did not reach the stall within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Held and renewed while stalled (3 s lease, renewed every second).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let lockers = lease_lockers(c, "rbd", &name);
    if lockers.len() != 1 || !lockers[0].1.contains("ferry backup") {
        kill();
        panic!("ferry should hold its lease (renewed) while export-diff stalls: {lockers:?}");
    }
    let (locker, cookie) = &lockers[0];
    c.rados(&[
        "-p",
        "rbd",
        "lock",
        "break",
        &format!("ferry.lease.{name}"),
        "ferry.lease",
        locker,
        "--lock-cookie",
        cookie,
    ]);
    if take_over {
        c.rados(&[
            "-p",
            "rbd",
            "lock",
            "get",
            &format!("ferry.lease.{name}"),
            "ferry.lease",
            "--lock-cookie",
            "intruder",
            "--lock-type",
            "exclusive",
        ]);
    }
    // A broken lock is found by the next renewal (a 3 s lease renews every second): the backup
    // stops at once — uploads stopped, the stalled export-diff killed — without waiting for
    // the stream. A lock taken over inside a 60 s lease's renewal interval is only found right
    // before the commit, once the stream resumes.
    let early = if take_over {
        std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        None
    } else {
        match rx.recv_timeout(std::time::Duration::from_secs(15)) {
            Ok(out) => Some(out.expect("wait ferry")),
            Err(_) => {
                kill();
                panic!("the backup did not stop within 15 s of losing its lease while export-diff stalled");
            }
        }
    };
    std::fs::write(&go, b"").expect("touch go");
    let out = match early {
        Some(out) => out,
        None => match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(out) => out.expect("wait ferry"),
            Err(_) => {
                kill();
                panic!("ferry did not end within 60 s after the stream resumed");
            }
        },
    };
    if !take_over {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lost mid-backup") && err.contains("uploads stopped"), "{err}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a backup whose lease was broken must fail; it exited 0:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lease") && err.contains("lost"),
        "the error should say the lease was lost: {err}"
    );
    assert!(err.contains("nothing was committed"), "{err}");
    assert_eq!(repo.json(&["ls", &volume]), before, "ls must be unchanged after the lost lease");
    assert_eq!(
        ferry_snaps(c, &image),
        vec![base.clone()],
        "the base snapshot is kept, the new one removed"
    );
    let lockers = lease_lockers(c, "rbd", &name);
    if take_over {
        assert!(
            lockers.len() == 1 && lockers[0].1 == "intruder",
            "the other client keeps the lock: {lockers:?}"
        );
        c.rados(&[
            "-p",
            "rbd",
            "lock",
            "break",
            &format!("ferry.lease.{name}"),
            "ferry.lease",
            &lockers[0].0,
            "--lock-cookie",
            "intruder",
        ]);
    } else {
        assert!(lockers.is_empty(), "ferry must not take a broken lease back: {lockers:?}");
    }

    // The next backup, through the same wrapper (it no longer stalls: `go` exists).
    let out = repo
        .cmd(&["backup", &format!("rbd:{image}"), "--lease-seconds", "3", "--json"])
        .env("FERRY_RBD_PROGRAM", &wrapper)
        .output()
        .expect("run ferry");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let next: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(next["from_snap"].as_str(), Some(base.as_str()), "{next}");
    assert_eq!(next["parent"], first["backup_id"], "{next}");
    let snap = next["to_snap"].as_str().expect("snap");
    let restored = repo.path("r.raw");
    repo.ok(&["restore", &volume, "--to", restored.to_str().expect("utf8")]);
    assert_same(
        "restore after the lost-lease retry vs rbd export",
        &c.export(&format!("{image}@{snap}")),
        &std::fs::read(&restored).expect("read"),
        4 * MIB,
    );
    assert_eq!(repo.backups(&volume).len(), 2);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Offsets where `needle` occurs in `hay`.
fn occurrences(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Known plaintext in an image and in a label never reaches the bucket: every byte of every
/// object of a `file://` repository is scanned for a 64-byte marker (repeated, once alone in
/// incompressible data, and across an object boundary), the image name and the label value.
#[test]
fn no_known_plaintext_reaches_the_repository() {
    const MARKER: &[u8; 64] = b"<ferry known-plaintext marker 7f3a9c: if you can read this, leak";
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("plain");
    let image = images.add(&format!("rbd/{name}"));
    let label = format!("label-value-{}", unique("secret"));
    c.rbd(&["create", "--size", "16M", &image]);
    let repeated: Vec<u8> = MARKER.iter().copied().cycle().take(3 * MIB as usize).collect();
    // Object 1 incompressible (stored without zstd), the marker once inside it.
    let mut random = vec![0u8; 4 * MIB as usize - 32];
    ferry_testdata::Rng::new(77).fill(&mut random);
    random[500_000..500_064].copy_from_slice(MARKER);
    let text = format!("image {name} labelled {label}\n").repeat(100);
    apply(
        c,
        &image,
        16 * MIB,
        &[
            (0, Some(repeated), 0),
            (4 * MIB, Some(random), 0),
            (8 * MIB - 32, Some(MARKER.to_vec()), 0),
            (10 * MIB + 1, Some(text.into_bytes()), 0),
        ],
    );
    let j = repo.json(&["backup", &format!("rbd:{image}"), "--label", &format!("owner={label}")]);
    let backup_id = j["backup_id"].as_str().expect("id").to_string();
    // The label is recorded (ferry decrypts it) ...
    let ls = repo.json(&["ls", &format!("rbd.{name}")]);
    assert!(ls.to_string().contains(&label), "the label should be in the backup: {ls}");

    let needles: [(&str, &[u8]); 3] = [
        ("the marker", MARKER),
        ("the label value", label.as_bytes()),
        ("the image name", name.as_bytes()),
    ];
    // ... but none of it is in any object, in any form the bytes take.
    let files = files_under(&repo.repo_dir());
    let chunks = files.iter().filter(|p| p.to_string_lossy().contains("/chunks/")).count();
    assert!(
        chunks >= 3,
        "expected the image's data chunks in {}: {files:?}",
        repo.repo_dir().display()
    );
    let mut scanned = 0usize;
    let mut found = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).expect("read object");
        scanned += bytes.len();
        for (what, needle) in needles {
            let at = occurrences(&bytes, needle);
            if !at.is_empty() {
                found.push(format!("{what} in {} at offsets {:?}", f.display(), &at[..at.len().min(5)]));
            }
        }
    }
    assert!(scanned > MIB as usize, "only {scanned} bytes scanned");
    assert!(found.is_empty(), "known plaintext in the repository:\n{}", found.join("\n"));

    // Positive control: the same scan finds all three in the restored image.
    let restored = repo.path("restored.raw");
    repo.ok(&[
        "restore",
        &format!("rbd.{name}@{backup_id}"),
        "--to",
        restored.to_str().expect("utf8"),
    ]);
    let plain = std::fs::read(&restored).expect("read");
    for (what, needle) in needles {
        assert!(
            !occurrences(&plain, needle).is_empty(),
            "the scan cannot find {what} even in the plaintext"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Source snapshots per repository and volume: `ferry-<repo8>-<volume8>-<UTC time>`.

/// The repository ID of `repo` (from its unencrypted `config`).
fn repository_id(repo: &Repo) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = ferry_repo::open_store(&repo.url, &ferry_repo::StoreOptions::default()).expect("store");
        ferry_repo::Repository::read_config(&store).await.expect("config").repository_id
    })
}

/// The owner part of the snapshot names of `repo` and `volume`, computed here from the
/// documented rule: first 8 hex of the repository ID, first 8 hex of BLAKE3(volume).
fn snap_owner(repo: &Repo, volume: &str) -> String {
    format!("{}-{}", &repository_id(repo)[..8], &blake3::hash(volume.as_bytes()).to_hex()[..8])
}

/// The image's snapshots of one owner, oldest first.
fn owned_snaps(c: &Cluster, image: &str, owner: &str) -> Vec<String> {
    let prefix = format!("ferry-{owner}-");
    c.snaps(image).into_iter().filter(|s| s.starts_with(&prefix)).collect()
}

/// Asserts `name` is `ferry-<owner>-YYYYMMDDTHHMMSS.mmmZ`.
fn assert_snap_name(name: &str, owner: &str) {
    let time = name
        .strip_prefix(&format!("ferry-{owner}-"))
        .unwrap_or_else(|| panic!("{name} is not a snapshot of owner {owner}"));
    let ok = time.len() == 20
        && time.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'.',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    assert!(ok, "{name}: the time part is not %Y%m%dT%H%M%S%.3fZ");
}

/// Restores `volume@id` of `repo` into a file and compares it with `rbd export` of `snap`.
fn assert_restores_to(c: &Cluster, repo: &Repo, volume: &str, id: &str, image: &str, snap: &str) {
    let out = repo.path(&format!("{id}.raw"));
    repo.ok(&["restore", &format!("{volume}@{id}"), "--to", out.to_str().expect("utf8")]);
    assert_same(
        &format!("restore of {volume}@{id} vs rbd export {image}@{snap}"),
        &c.export(&format!("{image}@{snap}")),
        &std::fs::read(&out).expect("read restore"),
        4 * MIB,
    );
    let _ = std::fs::remove_file(out);
}

/// Two repositories (two DR sites) back up one image in turn: A, B, A, B. Each keeps its own
/// base snapshot, so the second backup of each is an incremental from its own first one, and
/// each restore equals `rbd export` of its snapshot.
#[test]
fn two_repositories_alternating_on_one_image_both_stay_incremental() {
    let c = cluster();
    let (ra, rb) = (c.file_repo(), c.file_repo());
    let mut images = ImageGuard::new(c);
    let name = unique("tworepo");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "16M", &image]);
    apply(c, &image, 16 * MIB, &[(0, Some(pattern(51, 6 * MIB as usize)), 0)]);
    c.rbd(&["snap", "create", "--no-progress", &format!("{image}@user-keep")]);
    let owners = [snap_owner(&ra, &volume), snap_owner(&rb, &volume)];
    assert_ne!(owners[0], owners[1]);

    // (repo index, backup json)
    let mut done: Vec<(usize, serde_json::Value)> = Vec::new();
    let backup = |i: usize, done: &mut Vec<(usize, serde_json::Value)>| {
        let repo = [&ra, &rb][i];
        let j = repo.json(&["backup", &format!("rbd:{image}")]);
        let snap = j["to_snap"].as_str().expect("to_snap").to_string();
        assert_snap_name(&snap, &owners[i]);
        assert_eq!(owned_snaps(c, &image, &owners[i]), vec![snap.clone()], "{j}");
        // The other repository's newest snapshot (its base) survives.
        if let Some((_, prev)) = done.iter().rev().find(|(k, _)| *k != i) {
            let theirs = prev["to_snap"].as_str().expect("to_snap").to_string();
            assert_eq!(owned_snaps(c, &image, &owners[1 - i]), vec![theirs], "{j}");
        }
        assert!(c.snaps(&image).contains(&"user-keep".to_string()));
        assert_restores_to(c, repo, &volume, j["backup_id"].as_str().expect("id"), &image, &snap);
        done.push((i, j));
    };
    backup(0, &mut done);
    backup(1, &mut done);
    apply(c, &image, 16 * MIB, &[(5 * MIB + 3, Some(pattern(52, 3 * MIB as usize)), 0)]);
    backup(0, &mut done);
    apply(c, &image, 16 * MIB, &[(12 * MIB, Some(pattern(53, 4096)), 0)]);
    backup(1, &mut done);
    for (k, (i, j)) in done.iter().enumerate() {
        let want = if k < 2 { "full" } else { "incremental" };
        assert_eq!(j["kind"], want, "backup {k} (repo {i}): {j}");
        if k >= 2 {
            let base = &done[k - 2].1;
            assert_eq!(j["from_snap"], base["to_snap"], "{j}");
            assert_eq!(j["rbd"]["base_snapshot"], base["to_snap"], "{j}");
            assert_eq!(j["rbd"]["full_reason"], serde_json::Value::Null, "{j}");
            assert_eq!(j["rbd"]["removed_snapshots"], serde_json::json!([base["to_snap"]]), "{j}");
        }
    }
    assert_eq!(c.snaps(&image).len(), 3, "user-keep and one base per repository");
}

/// Two volumes of one image in one repository (`--volume`) keep their own bases likewise.
#[test]
fn two_volumes_of_one_image_in_one_repository_both_stay_incremental() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("twovol");
    let image = images.add(&format!("rbd/{name}"));
    c.rbd(&["create", "--size", "12M", "--object-size", "1M", &image]);
    apply(c, &image, 12 * MIB, &[(0, Some(pattern(61, 5 * MIB as usize)), 0)]);
    let volumes = [format!("{name}-x"), format!("{name}-y")];
    let owners = [snap_owner(&repo, &volumes[0]), snap_owner(&repo, &volumes[1])];
    assert_eq!(owners[0][..8], owners[1][..8], "one repository");
    assert_ne!(owners[0], owners[1]);
    let mut last: [Option<String>; 2] = [None, None];
    for round in 0..2 {
        for i in 0..2 {
            if round == 1 {
                apply(
                    c,
                    &image,
                    12 * MIB,
                    &[(MIB * (3 + i as u64) + 7, Some(pattern(62 + i as u8, 1000)), 0)],
                );
            }
            let j = repo.json(&["backup", &format!("rbd:{image}"), "--volume", &volumes[i]]);
            let snap = j["to_snap"].as_str().expect("to_snap").to_string();
            assert_snap_name(&snap, &owners[i]);
            assert_eq!(j["volume"], volumes[i].as_str());
            if round == 0 {
                assert_eq!(j["kind"], "full", "{j}");
            } else {
                assert_eq!(j["kind"], "incremental", "{j}");
                assert_eq!(j["from_snap"].as_str(), last[i].as_deref(), "{j}");
                assert_eq!(j["rbd"]["full_reason"], serde_json::Value::Null, "{j}");
            }
            assert_eq!(owned_snaps(c, &image, &owners[i]), vec![snap.clone()]);
            if let Some(theirs) = &last[1 - i] {
                assert_eq!(owned_snaps(c, &image, &owners[1 - i]), vec![theirs.clone()], "{j}");
            }
            assert_restores_to(c, &repo, &volumes[i], j["backup_id"].as_str().expect("id"), &image, &snap);
            last[i] = Some(snap);
        }
    }
    assert_eq!(ferry_snaps(c, &image).len(), 2);
}

/// `--keep-snapshots 3`: after five backups the three newest snapshots of this repository and
/// volume remain (each backup incremental from the previous one); the first one, protected by
/// the user, stays and does not count; a user snapshot and another repository's snapshot are
/// untouched. `--keep-snapshots 0` is refused.
#[test]
fn keep_snapshots_keeps_the_newest_of_this_repository_and_volume() {
    let c = cluster();
    let (repo, other) = (c.file_repo(), c.file_repo());
    let mut images = ImageGuard::new(c);
    let name = unique("keep");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "8M", "--object-size", "1M", &image]);
    apply(c, &image, 8 * MIB, &[(0, Some(pattern(71, 3 * MIB as usize)), 0)]);
    c.rbd(&["snap", "create", "--no-progress", &format!("{image}@user-keep")]);
    let theirs = other.json(&["backup", &format!("rbd:{image}")]);
    let theirs = theirs["to_snap"].as_str().expect("to_snap").to_string();
    let owner = snap_owner(&repo, &volume);

    let err = repo.fails(&["backup", &format!("rbd:{image}"), "--keep-snapshots", "0"], 2);
    assert!(err.contains("keep-snapshots"), "{err}");

    let mut snaps: Vec<String> = Vec::new();
    for k in 0..5u8 {
        if k > 0 {
            apply(c, &image, 8 * MIB, &[(MIB * k as u64 + 11, Some(pattern(72 + k, 5000)), 0)]);
        }
        let j = repo.json(&["backup", &format!("rbd:{image}"), "--keep-snapshots", "3"]);
        let snap = j["to_snap"].as_str().expect("to_snap").to_string();
        assert_snap_name(&snap, &owner);
        if k == 0 {
            assert_eq!(j["kind"], "full", "{j}");
            c.rbd(&["snap", "protect", &format!("{image}@{snap}")]);
        } else {
            assert_eq!(j["kind"], "incremental", "{j}");
            assert_eq!(j["from_snap"].as_str(), Some(snaps[k as usize - 1].as_str()), "{j}");
        }
        assert_restores_to(c, &repo, &volume, j["backup_id"].as_str().expect("id"), &image, &snap);
        snaps.push(snap);
        // Unprotected ones of ours: the newest three at most; the protected first one stays.
        let unprotected_from = snaps.len().saturating_sub(3).max(1);
        let mut want = vec![snaps[0].clone()];
        want.extend(snaps[unprotected_from..].iter().cloned());
        assert_eq!(owned_snaps(c, &image, &owner), want, "after backup {k}: {j}");
        let kept: Vec<&str> = j["rbd"]["kept_snapshots"]
            .as_array()
            .expect("kept_snapshots")
            .iter()
            .map(|v| v.as_str().expect("name"))
            .collect();
        let mut want_kept: Vec<&str> = snaps[unprotected_from..].iter().rev().map(String::as_str).collect();
        want_kept.push(&snaps[0]);
        assert_eq!(kept, want_kept, "{j}");
    }
    assert_eq!(
        owned_snaps(c, &image, &owner),
        vec![snaps[0].clone(), snaps[2].clone(), snaps[3].clone(), snaps[4].clone()]
    );
    let all = c.snaps(&image);
    assert!(all.contains(&"user-keep".to_string()) && all.contains(&theirs), "{all:?}");
    assert_eq!(all.len(), 6, "{all:?}");
    // The other repository is still incremental from its base.
    let j = other.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(j["kind"], "incremental", "{j}");
    assert_eq!(j["from_snap"].as_str(), Some(theirs.as_str()), "{j}");
    c.rbd(&["snap", "unprotect", &format!("{image}@{}", snaps[0])]);
}

/// A chain made before snapshot names carried an owner: its newest backup's `to_snap` is a
/// `ferry-<time>` snapshot. The old ferry is emulated by committing, through ferry-repo, a
/// copy of a real RBD backup's manifest whose `to_snap` names a `ferry-<time>` snapshot of
/// the same (unchanged) image. The next backup is an incremental from it and then removes it
/// (it is our chain's base); another `ferry-<time>` snapshot (maybe another repository's
/// base) is never touched.
#[test]
fn a_legacy_ferry_snapshot_base_continues_incrementally_and_only_it_is_removed() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("legacy");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "12M", &image]);
    apply(c, &image, 12 * MIB, &[(MIB, Some(pattern(81, 6 * MIB as usize)), 0)]);
    let first = repo.json(&["backup", &format!("rbd:{image}")]);
    let first_snap = first["to_snap"].as_str().expect("to_snap").to_string();
    let (legacy, foreign) = ("ferry-20260101T000000.000Z", "ferry-20251231T235959.999Z");
    c.rbd(&["snap", "create", "--no-progress", &format!("{image}@{foreign}")]);
    c.rbd(&["snap", "create", "--no-progress", &format!("{image}@{legacy}")]);
    assert_eq!(
        c.export_hash(&format!("{image}@{legacy}")),
        c.export_hash(&format!("{image}@{first_snap}"))
    );
    // What the old ferry would have committed: the same backup, to_snap = the legacy name.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = ferry_repo::open_store(&repo.url, &ferry_repo::StoreOptions::default()).expect("store");
        let r = ferry_repo::Repository::open(store, crate::util::PASSWORD.as_bytes())
            .await
            .expect("open");
        let refs = r.list_backups(Some(&volume)).await.expect("list");
        assert_eq!(refs.len(), 1);
        let m = r.read_manifest(&refs[0]).await.expect("manifest");
        assert_eq!(m.meta.to_snap.as_deref(), Some(first_snap.as_str()));
        let draft = ferry_repo::BackupDraft {
            volume: m.meta.volume.clone(),
            source: m.meta.source.clone(),
            from_snap: None,
            to_snap: Some(legacy.to_string()),
            parent: None,
            follows: None,
            seq: None,
            image_size: m.meta.image_size,
            block_size: m.meta.block_size,
            labels: m.meta.labels.clone(),
            protected: false,
            stats: m.meta.stats.clone(),
            blocks: m.blocks.clone(),
            deltas: m.deltas.clone(),
        };
        let session = ferry_repo::Session::begin(&r, &m.meta.volume, Default::default())
            .await
            .expect("session");
        r.commit(draft, &session).await.expect("commit the legacy backup");
    });
    // Only the legacy snapshot is left of ferry's own, as the old rotation would have left it.
    c.rbd(&["snap", "rm", "--no-progress", &format!("{image}@{first_snap}")]);
    let legacy_id = repo.backups(&volume).last().expect("legacy backup")["backup_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_restores_to(c, &repo, &volume, &legacy_id, &image, legacy);

    apply(c, &image, 12 * MIB, &[(9 * MIB + 5, Some(pattern(82, 2 * MIB as usize)), 0)]);
    let j = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(j["kind"], "incremental", "{j}");
    assert_eq!(j["from_snap"], legacy, "{j}");
    assert_eq!(j["parent"].as_str(), Some(legacy_id.as_str()), "{j}");
    assert_eq!(j["rbd"]["removed_snapshots"], serde_json::json!([legacy]), "{j}");
    let snap = j["to_snap"].as_str().expect("to_snap").to_string();
    assert_snap_name(&snap, &snap_owner(&repo, &volume));
    assert_restores_to(c, &repo, &volume, j["backup_id"].as_str().expect("id"), &image, &snap);
    assert_eq!(c.snaps(&image), vec![foreign.to_string(), snap.clone()]);
    // And on: the foreign legacy snapshot is never ours.
    apply(c, &image, 12 * MIB, &[(0, Some(pattern(83, 4096)), 0)]);
    let j = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(j["kind"], "incremental", "{j}");
    assert_eq!(j["rbd"]["removed_snapshots"], serde_json::json!([snap]), "{j}");
    let next = j["to_snap"].as_str().expect("to_snap").to_string();
    assert_eq!(c.snaps(&image), vec![foreign.to_string(), next]);
    repo.ok(&["audit"]);
}

/// `rbd` children never see the repository passphrase or the object store's credentials:
/// a wrapper records the environment of every `rbd` call of a backup and a restore.
#[test]
fn rbd_children_inherit_no_secrets() {
    let c = cluster();
    let repo = c.file_repo();
    let name = unique("env");
    let image = format!("rbd/{name}");
    c.rbd(&["create", "--size", "8M", &image]);
    let dump = repo.path("rbd-env");
    let wrapper = repo.path("rbd-env-wrapper");
    std::fs::write(&wrapper, format!("#!/bin/bash\nenv >> '{}'\nexec rbd \"$@\"\n", dump.display())).expect("write wrapper");
    let mut perm = std::fs::metadata(&wrapper).expect("md").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&wrapper, perm).expect("chmod");
    let marker = "s3cr3t-marker-7f3a9c";
    let run = |args: &[&str]| {
        let out = repo
            .cmd(args)
            .env("FERRY_RBD_PROGRAM", &wrapper)
            .env("AWS_SECRET_ACCESS_KEY", marker)
            .env("AZURE_STORAGE_ACCOUNT_KEY", marker)
            .output()
            .expect("ferry");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["backup", &format!("rbd:{image}")]);
    run(&["restore", &format!("rbd.{name}"), "--to", &format!("rbd:rbd/{name}-restored")]);
    let env = std::fs::read_to_string(&dump).expect("the wrapper ran");
    assert!(env.contains("CEPH_CONF="), "the Ceph settings must reach rbd: {env}");
    for secret in [marker, crate::util::PASSWORD] {
        assert!(!env.contains(secret), "a secret reached an rbd child");
    }
    assert!(!env.lines().any(|l| l.starts_with("FERRY_") || l.starts_with("AWS_")), "{env}");
    for img in [image.clone(), format!("rbd/{name}-restored")] {
        let snaps = c.snaps(&img);
        for s in snaps {
            c.rbd(&["snap", "rm", &format!("{img}@{s}")]);
        }
        c.rbd(&["rm", "--no-progress", &img]);
    }
}

/// Dedup that heals (issue: lifecycle): a chunk deleted by hand, once an audit has found it
/// (and quarantined it), is re-read from the snapshot and uploaded again by the next RBD
/// backup of the unchanged image — an incremental, not a full backup — and audit is clean.
#[test]
fn a_chunk_deleted_by_hand_is_healed_by_the_next_rbd_backup_after_audit() {
    let c = cluster();
    let repo = c.file_repo();
    let mut images = ImageGuard::new(c);
    let name = unique("heal");
    let image = images.add(&format!("rbd/{name}"));
    let volume = format!("rbd.{name}");
    c.rbd(&["create", "--size", "16M", &image]);
    apply(c, &image, 16 * MIB, &[(0, Some(pattern(61, 12 * MIB as usize)), 0)]);
    let first = repo.json(&["backup", &format!("rbd:{image}")]);
    let of_first = files_under(&repo.repo_dir().join("chunks"));
    apply(c, &image, 16 * MIB, &[(13 * MIB, Some(pattern(62, 4096)), 0)]);
    let second = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(second["kind"], "incremental", "{second}");
    // Delete by hand a chunk both backups reference (one of the first's, untouched since).
    let chunk = of_first.into_iter().next().expect("a chunk");
    std::fs::remove_file(&chunk).expect("delete a chunk by hand");
    let j = repo.json_code(&["audit"], 3);
    let referencing: std::collections::BTreeSet<&str> = j["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "missing-chunk")
        .map(|f| f["backup"].as_str().expect("backup"))
        .collect();
    let both: std::collections::BTreeSet<&str> = [&first, &second].iter().map(|b| b["backup_id"].as_str().expect("id")).collect();
    assert_eq!(referencing, both, "every backup referencing the chunk is listed: {j}");
    assert_eq!(j["quarantined"], 1, "{j}");
    // The image did not change: the next backup is an incremental with nothing in its diff,
    // yet it re-reads the block and uploads the chunk again.
    let third = repo.json(&["backup", &format!("rbd:{image}")]);
    assert_eq!(third["kind"], "incremental", "{third}");
    // (Every block whose chunk is the deleted one: the pattern may repeat across blocks.)
    assert!(third["rbd"]["blocks_healed"].as_u64().expect("healed") >= 1, "{third}");
    assert_eq!(third["stats"]["blocks_changed"], 0, "{third}");
    assert!(chunk.exists(), "the chunk is back");
    repo.ok(&["audit", "--read-data"]);
    let snap = third["to_snap"].as_str().expect("snap").to_string();
    assert_restores_to(c, &repo, &volume, third["backup_id"].as_str().expect("id"), &image, &snap);
    // The older backups are whole again too.
    let out = repo.path("first.raw");
    repo.ok(&[
        "restore",
        &format!("{volume}@id:{}", first["backup_id"].as_str().expect("id")),
        "--to",
        out.to_str().expect("utf8"),
    ]);
}
