//! Issue 3 acceptance: a real Ceph cluster (scripts/ceph-dev) as the source, and RGW as S3.

use rbd_diff::{DiffHeader, DiffWriter};

use crate::util::{cluster, hash_file, unique, Cluster, Repo};

const MIB: u64 = 1 << 20;

/// Applies changes to an image through `rbd import-diff` (a stream with no snapshots).
fn apply(c: &Cluster, image: &str, size: u64, records: &[(u64, Option<Vec<u8>>, u64)]) {
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
    backup("incremental 2");
    // 3: grow, write into the new area; then shrink in a later interval is covered by the
    // core tests; here a grow with data.
    c.rbd(&["resize", "--no-progress", "--size", "52M", &image]);
    apply(c, &image, 52 * MIB, &[(50 * MIB, Some(pattern(4, MIB as usize)), 0)]);
    backup("incremental 3 (grown)");
    c.rbd(&["resize", "--no-progress", "--allow-shrink", "--size", "30M", &image]);
    backup("incremental 4 (shrunk)");

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
    std::fs::write(&p, script).expect("write wrapper");
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&p).expect("md").permissions(), 0o755);
    let mut perm = std::fs::metadata(&p).expect("md").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).expect("chmod");
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
    std::fs::write(repo.dir.path().join("filter.py"), filter).expect("write filter");
    let script = format!(
        "#!/bin/bash\nfor a in \"$@\"; do [[ $a = --from-snap ]] && {{ rbd \"$@\" | python3 {}; exit ${{PIPESTATUS[0]}}; }}; done\nexec rbd \"$@\"\n",
        repo.dir.path().join("filter.py").display()
    );
    std::fs::write(&wrapper, script).expect("write wrapper");
    let mut perm = std::fs::metadata(&wrapper).expect("md").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&wrapper, perm).expect("chmod");

    let out = repo
        .cmd(&["backup", &format!("rbd:{image}"), "--json", "--verify-blocks", "64"])
        .env("FERRY_RBD_PROGRAM", &wrapper)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["kind"], "full", "{j}");
    assert!(
        j["rbd"]["full_reason"]
            .as_str()
            .expect("reason")
            .contains("diff verification failed"),
        "{j}"
    );
    let restored = repo.path("r.raw");
    repo.ok(&["restore", &format!("rbd.{name}"), "--to", restored.to_str().expect("utf8")]);
    assert_eq!(
        hash_file(&restored),
        c.export_hash(&format!("{image}@{}", j["to_snap"].as_str().expect("snap")))
    );
    // Two backups committed (the discarded incremental is not), one ferry snapshot left.
    assert_eq!(repo.backups(&format!("rbd.{name}")).len(), 2);
    assert_eq!(ferry_snaps(c, &image).len(), 1);
    c.rbd(&["snap", "purge", "--no-progress", &image]);
    c.rbd(&["rm", "--no-progress", &image]);
}
