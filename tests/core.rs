//! Issue 2 acceptance: backup and restore of export-diff streams, local repository.

use ferry_testdata::Volume;

use crate::util::{apply_diff, hash_file, Repo};

const MIB: u64 = 1 << 20;

/// A chain over every kind of change: overwrites (unaligned), zero writes, discards, a grow,
/// a shrink that cuts a block, a regrow (must read zeros), more writes. Returns the expected
/// image hash per backup ID.
fn build_chain(repo: &Repo, volume: &str) -> Vec<(String, String, Vec<u8>)> {
    let mut v = Volume::generated(9 * MIB + 12_345, 1 << 20, 42);
    let mut out = Vec::new();
    let step = |v: &mut Volume, snap: &str, out: &mut Vec<(String, String, Vec<u8>)>| {
        let stream = v.diff(snap, Vec::new()).expect("diff");
        let j = repo.backup_bytes(volume, &stream);
        assert_eq!(j["to_snap"], snap);
        out.push((j["backup_id"].as_str().expect("id").to_string(), v.hash(), v.data.clone()));
        j
    };
    let full = step(&mut v, "s1", &mut out);
    assert_eq!(full["kind"], "full");
    // Overwrites, unaligned and across a block boundary; an all-zero write; a discard.
    v.write(3 * MIB - 100, &vec![0xAB; 300]);
    v.write(12_345, b"hello ferry");
    v.write_zeros(5 * MIB + 4096, 8192);
    v.discard(6 * MIB, MIB);
    let inc = step(&mut v, "s2", &mut out);
    assert_eq!(inc["kind"], "incremental");
    assert!(inc["stats"]["blocks_partial"].as_u64().expect("n") >= 2, "{inc}");
    // Grow and write into the new area.
    v.resize(14 * MIB + 777);
    v.write(13 * MIB, &vec![7u8; 5000]);
    step(&mut v, "s3", &mut out);
    // Shrink to the middle of a block: the stream carries only the new size.
    v.resize(4 * MIB + MIB / 2);
    let shrink = step(&mut v, "s4", &mut out);
    assert!(shrink["stats"]["stream_bytes"].as_u64().expect("n") < 100, "{shrink}");
    // Grow again in a separate interval: no records; the regrown bytes must be zero.
    v.resize(8 * MIB);
    step(&mut v, "s5", &mut out);
    v.write(7 * MIB + 3, &vec![9u8; 70_000]);
    step(&mut v, "s6", &mut out);
    out
}

#[test]
fn every_backup_of_a_chain_restores_byte_identical() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let chain = build_chain(&repo, "vm1");
    assert_eq!(repo.backups("vm1").len(), chain.len());
    for (id, hash, _) in &chain {
        let out = repo.path(&format!("restore-{id}.raw"));
        repo.ok(&["restore", &format!("vm1@{id}"), "--to", out.to_str().expect("utf8")]);
        assert_eq!(&hash_file(&out), hash, "backup {id}");
    }
    // Disaster recovery: no local index at all, then a rebuilt one.
    std::fs::remove_dir_all(repo.path("index")).expect("remove index");
    for (i, (id, hash, _)) in chain.iter().enumerate() {
        let out = repo.path(&format!("dr-{id}.raw"));
        let mut args = vec!["restore", "--to", out.to_str().expect("utf8")];
        let target = format!("vm1@{id}");
        args.insert(1, &target);
        if i % 2 == 0 {
            args.push("--no-index");
        }
        repo.ok(&args);
        assert_eq!(&hash_file(&out), hash, "backup {id} without index");
    }
    let rebuilt = repo.json(&["index", "rebuild"]);
    assert_eq!(rebuilt["backups"], chain.len());
}

#[test]
fn restore_as_import_diff_stream_yields_the_same_image() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let chain = build_chain(&repo, "vm2");
    for (id, hash, _) in [&chain[1], &chain[3], &chain[5]] {
        let out = repo.path(&format!("{id}.diff"));
        repo.ok(&[
            "restore",
            &format!("vm2@{id}"),
            "--to",
            out.to_str().expect("utf8"),
            "--format",
            "import-diff",
        ]);
        let stream = std::fs::read(&out).expect("read");
        let mut image = Vec::new();
        apply_diff(&mut image, &stream);
        assert_eq!(&blake3::hash(&image).to_hex().to_string(), hash, "backup {id}");
    }
    // And raw to stdout.
    let (id, _, data) = &chain[2];
    let out = repo.run(&["restore", &format!("vm2@{id}"), "--to", "-"]);
    assert!(out.status.success());
    assert!(out.stdout == *data, "stdout restore differs");
    // With --json the report goes to stderr: stdout is the image and nothing else.
    let out = repo.run(&["restore", &format!("vm2@{id}"), "--to", "-", "--json"]);
    assert!(out.status.success());
    assert!(out.stdout == *data, "stdout restore with --json differs");
    let report: serde_json::Value = serde_json::from_slice(&out.stderr).expect("the JSON report on stderr");
    assert_eq!(report["ok"], true);
    assert!(report["peak_rss_bytes"].as_u64().is_some_and(|n| n > 0), "{report}");
}

#[test]
fn wrong_passphrase_is_refused_and_writes_nothing() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 1);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("out.raw");
    let res = repo
        .cmd(&["restore", "v", "--to", out.to_str().expect("utf8")])
        .env("FERRY_PASSWORD", "not the passphrase")
        .output()
        .expect("run");
    assert_eq!(res.status.code(), Some(4));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!out.exists(), "restore wrote a file with a wrong passphrase");
    // No passphrase at all (no terminal): also exit 4, with a hint.
    let res = repo.cmd(&["ls"]).env_remove("FERRY_PASSWORD").output().expect("run");
    assert_eq!(res.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&res.stderr).contains("FERRY_PASSWORD"));
}

fn chunk_files(repo: &Repo) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for d in std::fs::read_dir(repo.repo_dir().join("chunks")).expect("chunks dir") {
        for f in std::fs::read_dir(d.expect("entry").path()).expect("subdir") {
            files.push(f.expect("entry").path());
        }
    }
    files.sort();
    files
}

#[test]
fn a_flipped_byte_in_a_chunk_fails_restore_naming_block_and_chunk() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(6 * MIB, 1 << 20, 7);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let victim = chunk_files(&repo).into_iter().next().expect("a chunk");
    let chunk_id = victim.file_name().expect("name").to_string_lossy().to_string();
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).expect("write");

    // The audit finds it, but only when it reads data (and, told not to, quarantines nothing).
    repo.ok(&["audit"]);
    let err = repo.fails(&["audit", "--read-data", "--no-quarantine"], 3);
    assert!(err.contains("problem"), "{err}");
    assert!(victim.exists());

    let out = repo.path("out.raw");
    let err = repo.fails(&["restore", "v", "--to", out.to_str().expect("utf8")], 3);
    assert!(err.contains(&chunk_id), "{err}");
    assert!(err.contains("block "), "{err}");
    assert!(err.contains("integrity"), "{err}");
    assert!(!out.exists(), "a failed restore must not leave a partial file");
    // The restore put the corrupt chunk in quarantine: its bytes kept aside, the object gone,
    // so the next backup with this block can store a good copy.
    assert!(!victim.exists(), "the corrupt chunk is moved aside");
    let kept = repo.repo_dir().join(format!("quarantine/{chunk_id}.object"));
    assert!(kept.exists(), "its bytes are kept at {}", kept.display());
    // --best-effort writes the rest and still reports it (now missing).
    let err = repo.fails(&["restore", "v", "--to", out.to_str().expect("utf8"), "--best-effort"], 3);
    assert!(err.contains(&chunk_id), "{err}");
    assert!(out.exists());
    // A missing chunk is found without reading data.
    let report = repo.run(&["audit", "--json", "--no-quarantine"]);
    assert_eq!(report.status.code(), Some(3));
    let j: serde_json::Value = serde_json::from_slice(&report.stdout).expect("json");
    assert_eq!(j["findings"][0]["kind"], "missing-chunk");
    // Healing: any backup whose stream has the block uploads the chunk again (it is
    // quarantined, so neither the index nor an old HEAD is trusted), and v restores again.
    let mut w = Volume::generated(6 * MIB, 1 << 20, 7);
    let j = repo.backup_bytes("w", &w.diff("s1", Vec::new()).expect("diff"));
    assert_eq!(j["stats"]["blocks_new"], 1, "{j}");
    assert!(victim.exists(), "the chunk is back");
    assert!(!repo.repo_dir().join(format!("quarantine/{chunk_id}")).exists(), "record dropped");
    std::fs::remove_file(&out).ok();
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), v.hash());
    repo.ok(&["audit", "--read-data"]);
}

#[test]
fn a_tampered_manifest_is_reported() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 9);
    let j = repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let key = repo.repo_dir().join(j["object"].as_str().expect("object"));
    let mut bytes = std::fs::read(&key).expect("read");
    let n = bytes.len();
    bytes[n - 20] ^= 0x80;
    std::fs::write(&key, bytes).expect("write");
    let err = repo.fails(&["ls", "--no-index"], 3);
    assert!(err.contains("integrity error"), "{err}");
    let report = repo.run(&["audit", "--json", "--no-index"]);
    assert_eq!(report.status.code(), Some(3));
}

#[test]
fn truncated_stream_commits_nothing_and_retry_uploads_only_the_rest() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(12 * MIB, 1 << 20, 11);
    let stream = v.diff("s1", Vec::new()).expect("diff");
    let cut = &stream[..stream.len() * 2 / 3];
    let f = repo.path("cut.diff");
    std::fs::write(&f, cut).expect("write");
    let err = repo.fails(&["backup", "--volume", "v", "--diff", f.to_str().expect("utf8")], 1);
    assert!(err.contains("truncated") || err.contains("Truncated"), "{err}");
    assert!(err.contains("nothing was committed"), "{err}");
    assert!(repo.backups("v").is_empty(), "a truncated stream must not commit a backup");
    let uploaded_before = chunk_files(&repo).len();
    assert!(
        uploaded_before > 0,
        "the cut stream should have uploaded some chunks before failing"
    );

    let j = repo.backup_bytes("v", &stream);
    let s = &j["stats"];
    let found = s["blocks_found_in_repo"].as_u64().expect("n");
    let new = s["blocks_new"].as_u64().expect("n");
    assert_eq!(found as usize, uploaded_before, "{j}");
    assert_eq!((found + new) as usize, chunk_files(&repo).len(), "{j}");
    assert!(new > 0);
    assert_eq!(repo.backups("v").len(), 1);
    let out = repo.path("r.raw");
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), v.hash());
}

/// New content costs one request per chunk: after a run of chunks that are not in the
/// repository the HEAD before each upload stops (the create-only PUT answers the same
/// question). Chunks that are there though no manifest names them (the backup forgotten, not
/// yet collected; or a crashed backup's uploads) and the index gone — only the store can tell
/// — are still found by HEAD and never uploaded again.
#[test]
fn new_content_skips_the_head_and_existing_content_is_still_found() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(40 * MIB, 1 << 20, 41);
    let stream = v.diff("s1", Vec::new()).expect("diff");
    let f = repo.path("full.diff");
    std::fs::write(&f, &stream).expect("write");
    let backup = |volume: &str| repo.json(&["backup", "--volume", volume, "--diff", f.to_str().expect("utf8"), "--jobs", "2"]);
    let j = backup("v");
    let new = j["stats"]["blocks_new"].as_u64().expect("n");
    assert!(new >= 30, "{j}");
    assert_eq!(
        j["requests"]["put"].as_u64(),
        Some(new + 3),
        "one PUT per chunk, plus session, manifest, end: {j}"
    );
    let heads = j["requests"]["head"].as_u64().expect("head count");
    // Eight misses in a row, plus what the two jobs had in flight meanwhile.
    assert!(heads <= 8 + 2, "{heads} HEADs for {new} new chunks: {j}");

    repo.ok(&["forget", "v@latest"]);
    std::fs::remove_dir_all(repo.dir.path().join("index")).expect("drop the index");
    let j = backup("w");
    let s = &j["stats"];
    assert_eq!(s["blocks_new"], 0, "{j}");
    assert_eq!(s["blocks_found_in_repo"].as_u64(), Some(new), "{j}");
    assert_eq!(j["requests"]["head"].as_u64(), Some(new), "{j}");
    let out = repo.path("w.raw");
    repo.ok(&["restore", "w", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), v.hash());
}

#[test]
fn an_incremental_that_does_not_continue_the_chain_is_refused() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 5);
    let s1 = v.diff("s1", Vec::new()).expect("diff");
    v.write(10, b"x");
    let s2 = v.diff("s2", Vec::new()).expect("diff");
    v.write(20, b"y");
    let s3 = v.diff("s3", Vec::new()).expect("diff");
    let write = |name: &str, b: &[u8]| {
        let p = repo.path(name);
        std::fs::write(&p, b).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    // No backup yet: an incremental has nothing to build on.
    let err = repo.fails(&["backup", "--volume", "v", "--diff", &write("s2.diff", &s2)], 5);
    assert!(err.contains("no backup to build on"), "{err}");
    repo.backup_bytes("v", &s1);
    // s3 is from s2, but the chain head is s1.
    let err = repo.fails(&["backup", "--volume", "v", "--diff", &write("s3.diff", &s3)], 5);
    assert!(err.contains("'s2'") && err.contains("'s1'"), "{err}");
    assert_eq!(repo.backups("v").len(), 1);
    repo.backup_bytes("v", &s2);
    repo.backup_bytes("v", &s3);
    assert_eq!(repo.backups("v").len(), 3);
}

#[test]
fn dedup_across_volumes_and_zero_blocks_are_holes() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut a = Volume::generated(8 * MIB, 1 << 20, 21);
    let ja = repo.backup_bytes("a", &a.diff("s1", Vec::new()).expect("diff"));
    let mut b = Volume::generated(8 * MIB, 1 << 20, 21);
    let jb = repo.backup_bytes("b", &b.diff("s1", Vec::new()).expect("diff"));
    assert_eq!(jb["stats"]["blocks_new"], 0, "{jb}");
    assert_eq!(jb["stats"]["blocks_dedup"], ja["stats"]["blocks_new"], "{jb}");
    let ls = repo.json(&["ls", "a"]);
    let holes = ls[0]["blocks_with_data"].as_u64().expect("n");
    assert!(holes < 8, "zero blocks must be holes: {ls}");
}

#[test]
fn one_damaged_manifest_does_not_hide_the_other_volumes() {
    let repo = Repo::file(&[]);
    let mut a = Volume::generated(2 * MIB, 1 << 20, 31);
    let ja = repo.backup_bytes("a", &a.diff("s1", Vec::new()).expect("diff"));
    let mut b = Volume::generated(2 * MIB, 1 << 20, 32);
    repo.backup_bytes("b", &b.diff("s1", Vec::new()).expect("diff"));
    let key = repo.repo_dir().join(ja["object"].as_str().expect("object"));
    let mut bytes = std::fs::read(&key).expect("read");
    bytes[30] ^= 0x04;
    std::fs::write(&key, bytes).expect("write");
    // Disaster recovery without an index: volume b restores; ls lists b and exits 3 for a.
    let out = repo.path("b.raw");
    repo.ok(&["restore", "b", "--no-index", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), b.hash());
    let ls = repo.run(&["ls", "--no-index"]);
    assert_eq!(ls.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("b "),
        "{}",
        String::from_utf8_lossy(&ls.stdout)
    );
    assert!(String::from_utf8_lossy(&ls.stderr).contains("unreadable"));
    // Damage is never answered with "no such backup" or with another backup: restoring the
    // damaged volume is an integrity failure (exit 3), and so is `latest` when the newest
    // backup of a volume is the damaged one, while older backups stay reachable by name.
    let out_a = repo.path("a.raw");
    let err = repo.fails(&["restore", "a", "--no-index", "--to", out_a.to_str().expect("utf8")], 3);
    assert!(err.contains("unreadable"), "{err}");
    b.write(5, b"newer");
    let newer = repo.backup_bytes("b", &b.diff("s2", Vec::new()).expect("diff"));
    let key = repo.repo_dir().join(newer["object"].as_str().expect("object"));
    let mut bytes = std::fs::read(&key).expect("read");
    bytes[40] ^= 0x01;
    std::fs::write(&key, bytes).expect("write");
    let err = repo.fails(&["restore", "b", "--no-index", "--to", out.to_str().expect("utf8"), "--force"], 3);
    assert!(err.contains("newest backup") && err.contains("unreadable"), "{err}");
    repo.ok(&["restore", "b@s1", "--no-index", "--to", out.to_str().expect("utf8"), "--force"]);
}

#[test]
fn invalid_block_sizes_are_refused() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(MIB, 1 << 20, 3);
    let f = repo.path("s.diff");
    std::fs::write(&f, v.diff("s1", Vec::new()).expect("diff")).expect("write");
    for bs in ["0", "128M", "5000"] {
        let err = repo.fails(
            &["backup", "--volume", "v", "--diff", f.to_str().expect("utf8"), "--block-size", bs],
            5,
        );
        assert!(err.contains("power of two"), "{err}");
    }
    assert!(repo.backups("v").is_empty());
    let dir = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "init",
            "--block-size",
            "3M",
            "--repo",
            &format!("file://{}/r", dir.path().display()),
        ])
        .env("FERRY_PASSWORD", "x")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `VOLUME@SPEC` never guesses: a snapshot named like a prefix of another backup's ID is
/// refused as ambiguous; `id:` and `snap:` say which is meant.
#[test]
fn a_snapshot_named_like_an_id_prefix_is_not_a_guess() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 21);
    let first = repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let first_id = first["backup_id"].as_str().expect("id").to_string();
    let h1 = v.hash();
    let prefix = &first_id[..6];
    v.write(100, b"second");
    let second = repo.backup_bytes("v", &v.diff(prefix, Vec::new()).expect("diff"));
    let h2 = v.hash();
    let out = repo.path("out.raw");
    let o = out.to_str().expect("utf8");
    let err = repo.fails(&["restore", &format!("v@{prefix}"), "--to", o], 5);
    assert!(err.contains("ambiguous") && err.contains(&format!("snap:{prefix}")), "{err}");
    assert!(!out.exists());
    repo.ok(&["restore", &format!("v@snap:{prefix}"), "--to", o]);
    assert_eq!(hash_file(&out), h2);
    repo.ok(&["restore", &format!("v@id:{prefix}"), "--to", o, "--force"]);
    assert_eq!(hash_file(&out), h1);
    // Unambiguous bare words keep working: the full ID, the first snapshot's name.
    repo.ok(&[
        "restore",
        &format!("v@{}", second["backup_id"].as_str().expect("id")),
        "--to",
        o,
        "--force",
    ]);
    assert_eq!(hash_file(&out), h2);
    repo.ok(&["restore", "v@s1", "--to", o, "--force"]);
    assert_eq!(hash_file(&out), h1);
}

/// A stream claiming an absurd size is refused with a clear error before anything is
/// allocated for it (it used to abort on a failed allocation); a large sparse one is fine.
#[test]
fn absurd_image_sizes_are_refused_before_allocation() {
    let repo = Repo::file(&[]);
    let stream = |size: u64, snap: &str| {
        let header = rbd_diff::DiffHeader {
            to_snap: Some(snap.into()),
            image_size: size,
            ..Default::default()
        };
        let w = rbd_diff::DiffWriter::new(Vec::new(), &header).expect("writer");
        w.finish().expect("finish")
    };
    for size in [1u64 << 62, 1 << 51] {
        let f = repo.path("huge.diff");
        std::fs::write(&f, stream(size, "s1")).expect("write");
        let err = repo.fails(&["backup", "--volume", "huge", "--diff", f.to_str().expect("utf8")], 1);
        assert!(err.contains("at most") && err.contains("nothing was committed"), "{err}");
    }
    // 1 PiB in 4 KiB blocks is within the byte limit but not the block limit.
    let f = repo.path("many.diff");
    std::fs::write(&f, stream(1 << 50, "s1")).expect("write");
    let err = repo.fails(
        &[
            "backup",
            "--volume",
            "many",
            "--diff",
            f.to_str().expect("utf8"),
            "--block-size",
            "4K",
        ],
        1,
    );
    assert!(err.contains("blocks"), "{err}");
    assert!(repo.json(&["ls"]).as_array().expect("list").is_empty());
    // A 1 TiB sparse volume (262144 blocks of 4 MiB) backs up and lists.
    let j = repo.backup_bytes("big", &stream(1 << 40, "s1"));
    assert_eq!(j["image_size"].as_u64(), Some(1 << 40), "{j}");
}

/// file:// is durable in commit order: the chunks reach the disk before the manifest exists
/// (a `syncfs` barrier), and the manifest before the commit is reported. strace is the oracle.
#[test]
fn a_file_repository_commit_is_durable_in_order() {
    let strace = std::process::Command::new("strace").arg("-V").output();
    assert!(
        strace.map(|o| o.status.success()).unwrap_or(false),
        "this test needs strace (scripts/test installs it: apt-get install strace)"
    );
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 71);
    let f = repo.path("s1.diff");
    std::fs::write(&f, v.diff("s1", Vec::new()).expect("diff")).expect("write");
    let log = repo.path("strace.log");
    let cmd = repo.cmd(&["backup", "--volume", "v", "--diff", f.to_str().expect("utf8")]);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd.get_envs().map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned()))).collect();
    let mut traced = std::process::Command::new("strace");
    traced
        .args(["-f", "-qq", "-e", "trace=syncfs,link,linkat,rename,renameat,renameat2", "-o"])
        .arg(&log)
        .arg(&program)
        .args(&args);
    for (k, v) in envs {
        match v {
            Some(v) => traced.env(k, v),
            None => traced.env_remove(k),
        };
    }
    let out = traced.stdin(std::process::Stdio::null()).output().expect("strace ferry");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = std::fs::read_to_string(&log).expect("log").lines().map(String::from).collect();
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let rpos = |pred: &dyn Fn(&str) -> bool| lines.iter().rposition(|l| pred(l));
    let manifest = pos(&|l: &str| l.contains("volumes/v/backups/") && !l.contains("ENOENT")).expect("the manifest is created");
    let last_chunk = rpos(&|l: &str| l.contains("/chunks/")).expect("chunks are created");
    let syncfs: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("syncfs("))
        .map(|(i, _)| i)
        .collect();
    assert!(
        syncfs.iter().any(|&s| last_chunk < s && s < manifest),
        "no barrier between the last chunk and the manifest:\n{}",
        lines.join("\n")
    );
    assert!(
        syncfs.iter().any(|&s| s > manifest),
        "the manifest is not made durable:\n{}",
        lines.join("\n")
    );
}

/// `VOLUME@TIME`, `at:TIME` and `--at TIME` pick the newest backup made at or before the time.
#[test]
fn restore_by_time_picks_the_newest_backup_at_or_before_it() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let chain = build_chain(&repo, "vt");
    let ls = repo.json(&["ls", "vt"]);
    let created: Vec<String> = ls
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["created"].as_str().expect("created").to_string())
        .collect();
    assert_eq!(created.len(), chain.len());
    let restore = |args: &[&str]| {
        let out = repo.path(&format!("t-{}.raw", rand::random::<u64>()));
        let mut a = vec!["restore"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--to", out.to_str().expect("utf8")]);
        repo.ok(&a);
        hash_file(&out)
    };
    // Exactly a backup's time: that backup; a moment before the next one: still it.
    assert_eq!(restore(&[&format!("vt@{}", created[2])]), chain[2].1);
    assert_eq!(restore(&[&format!("vt@at:{}", created[3])]), chain[3].1);
    assert_eq!(restore(&["vt", "--at", &created[1]]), chain[1].1);
    let t4 = chrono::DateTime::parse_from_rfc3339(&created[4]).expect("time") - chrono::Duration::microseconds(1);
    assert_eq!(restore(&["vt", "--at", &t4.to_rfc3339()]), chain[3].1);
    // A date: the end of that day — the newest backup.
    let today = &created[0][..10];
    assert_eq!(restore(&[&format!("vt@{today}")]), chain.last().expect("one").1);
    // Before the first backup: refused, naming the oldest.
    let err = repo.fails(&["restore", "vt@2000-01-01", "--to", repo.path("x.raw").to_str().expect("utf8")], 5);
    assert!(err.contains("at or before"), "{err}");
    let err = repo.fails(
        &[
            "restore",
            "vt@latest",
            "--at",
            today,
            "--to",
            repo.path("y.raw").to_str().expect("utf8"),
        ],
        5,
    );
    assert!(err.contains("--at"), "{err}");
}

/// Issue 9: the chain's order comes from its links, not from the writers' clocks. A backup
/// made with the clock stepped back a day (libfaketime) has a name older than its parent's;
/// it is still the newest: `latest` restores it, `ls` lists it last, the next incremental is
/// made on it. A full backup made two days "earlier" follows the head it replaced.
#[test]
fn a_clock_stepped_back_does_not_make_an_older_backup_the_newest() {
    let faketime = std::process::Command::new("sh").args(["-c", "command -v faketime"]).output();
    assert!(
        faketime.is_ok_and(|o| o.status.success()),
        "faketime is not installed (scripts/test installs it)"
    );
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 91);
    let backup_at = |v: &mut Volume, snap: &str, skew: Option<&str>| -> serde_json::Value {
        let stream = v.diff(snap, Vec::new()).expect("diff");
        let f = repo.path(&format!("{snap}.diff"));
        std::fs::write(&f, &stream).expect("write");
        let args = ["backup", "--json", "--volume", "vm", "--diff", f.to_str().expect("utf8")];
        let out = match skew {
            None => repo.cmd(&args).output(),
            Some(s) => {
                let mut c = std::process::Command::new("faketime");
                c.args(["-f", s, env!("CARGO_BIN_EXE_ferry")]).args(args);
                let base = repo.cmd(&[]);
                for (k, val) in base.get_envs() {
                    match val {
                        Some(val) => c.env(k, val),
                        None => c.env_remove(k),
                    };
                }
                c.env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                    .stdin(std::process::Stdio::null())
                    .output()
            }
        }
        .expect("run ferry");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let a = backup_at(&mut v, "s1", None);
    v.write(MIB + 5, b"second");
    let b = backup_at(&mut v, "s2", None);
    v.write(2 * MIB + 7, b"third, written a day in the past");
    let c = backup_at(&mut v, "s3", Some("-1d"));
    assert_eq!(c["kind"], "incremental");
    assert_eq!(c["parent"], b["backup_id"], "made on b");
    let s3 = v.data.clone();
    let list = repo.backups("vm");
    let names: Vec<&str> = list.iter().map(|x| x["backup_id"].as_str().expect("id")).collect();
    assert_eq!(
        names,
        [&a["backup_id"], &b["backup_id"], &c["backup_id"]].map(|x| x.as_str().expect("id")),
        "chain order"
    );
    let out = repo.path("latest.raw");
    repo.ok(&["restore", "vm", "--to", out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read") == s3, "latest is the backup made last");
    // The next incremental (s3 → s4) is made on c, the head.
    v.write(7, b"fourth");
    let d = backup_at(&mut v, "s4", None);
    assert_eq!(d["parent"], c["backup_id"]);
    // A full backup with the clock two days behind follows d.
    let mut full = Volume::generated(3 * MIB, 1 << 20, 92);
    let stream = full.diff("f1", Vec::new()).expect("diff");
    let f = repo.path("f1.diff");
    std::fs::write(&f, &stream).expect("write");
    let mut cmd = std::process::Command::new("faketime");
    cmd.args([
        "-f",
        "-2d",
        env!("CARGO_BIN_EXE_ferry"),
        "backup",
        "--json",
        "--volume",
        "vm",
        "--diff",
        f.to_str().expect("utf8"),
    ]);
    for (k, val) in repo.cmd(&[]).get_envs() {
        match val {
            Some(val) => cmd.env(k, val),
            None => cmd.env_remove(k),
        };
    }
    let o = cmd
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(e["kind"], "full");
    let list = repo.backups("vm");
    assert_eq!(
        list.last().map(|x| x["backup_id"].clone()),
        Some(e["backup_id"].clone()),
        "the full backup is the newest"
    );
    let out = repo.path("latest-full.raw");
    repo.ok(&["restore", "vm", "--to", out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read") == full.data, "latest is the full backup");

    // Retention goes by the chain too: with b protected, keep-last 1 keeps the full backup
    // (the newest, though its clock said two days ago) and b, and removes a, c and d. With
    // e's predecessor gone, its place (seq) still puts it after b.
    let id = |j: &serde_json::Value| j["backup_id"].as_str().expect("id").to_string();
    repo.ok(&["protect", &format!("vm@{}", id(&b))]);
    repo.ok(&["prune", "vm", "--keep-last", "1"]);
    let left: Vec<String> = repo.backups("vm").iter().map(id).collect();
    assert_eq!(left, [id(&b), id(&e)], "kept, in chain order");
    let out = repo.path("latest-after-prune.raw");
    repo.ok(&["restore", "vm", "--to", out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read") == full.data, "latest is still the full backup");
}

/// Issue 9: a key slot authenticates its own label and parameters and the repository's
/// `config`: a config or a label changed in the bucket is found when the repository opens
/// (exit 3, naming the slot), not used silently; the genuine repository opens.
#[test]
fn a_changed_config_or_key_slot_label_is_found_when_opening() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 93);
    repo.backup_bytes("vm", &v.diff("s1", Vec::new()).expect("diff"));
    repo.ok(&["ls"]);
    let config = repo.repo_dir().join("config");
    let genuine = std::fs::read(&config).expect("config");
    let text = String::from_utf8_lossy(&genuine[8..]).to_string();
    assert!(text.contains("\"zstd_level\": 3"), "{text}");
    let mut changed = genuine[..8].to_vec();
    changed.extend_from_slice(text.replace("\"zstd_level\": 3", "\"zstd_level\": 19").as_bytes());
    std::fs::write(&config, &changed).expect("write");
    let err = repo.fails(&["ls"], 3);
    assert!(err.contains("keys/") && err.contains("config"), "{err}");
    std::fs::write(&config, &genuine).expect("restore");
    repo.ok(&["ls"]);

    let slot = std::fs::read_dir(repo.repo_dir().join("keys"))
        .expect("keys")
        .next()
        .expect("a slot")
        .expect("entry")
        .path();
    let genuine = std::fs::read(&slot).expect("slot");
    let text = String::from_utf8_lossy(&genuine[8..]).to_string();
    let label = serde_json::from_str::<serde_json::Value>(&text).expect("json")["label"]
        .as_str()
        .expect("label")
        .to_string();
    let mut changed = genuine[..8].to_vec();
    changed.extend_from_slice(
        text.replace(&format!("\"label\": \"{label}\""), "\"label\": \"break-glass\"")
            .as_bytes(),
    );
    assert_ne!(changed, genuine);
    std::fs::write(&slot, &changed).expect("write");
    let err = repo.fails(&["ls"], 3);
    assert!(err.contains("keys/"), "{err}");
    std::fs::write(&slot, &genuine).expect("restore");
    repo.ok(&["ls"]);

    // `key list` checks every slot, not only the one that opened: a second slot relabelled
    // in the bucket is named NOT AUTHENTIC while the first still opens the repository.
    let added = repo
        .cmd(&["key", "add", "--label", "oncall"])
        .env("FERRY_NEW_PASSWORD", "second passphrase")
        .output()
        .expect("run");
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let list = repo.json(&["key", "list"]);
    let second = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["label"] == "oncall")
        .expect("the new slot")
        .clone();
    assert!(
        list.as_array().expect("array").iter().all(|s| s["label_and_config"] == "authentic"),
        "{list}"
    );
    let path = repo.repo_dir().join("keys").join(second["id"].as_str().expect("id"));
    let text = std::fs::read(&path).expect("slot");
    let mut changed = text[..8].to_vec();
    changed.extend_from_slice(String::from_utf8_lossy(&text[8..]).replace("\"oncall\"", "\"admin\"").as_bytes());
    std::fs::write(&path, changed).expect("write");
    let list = repo.json(&["key", "list"]);
    let states: Vec<(String, String)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|s| {
            (
                s["label"].as_str().unwrap_or("").to_string(),
                s["label_and_config"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(states.contains(&("admin".into(), "NOT AUTHENTIC".into())), "{states:?}");
    assert_eq!(states.iter().filter(|s| s.1 == "authentic").count(), 1, "{states:?}");
}

/// Issue 9: the local index holds manifest metadata sealed, as the bucket does: a label's
/// value and a snapshot name written by a backup appear nowhere in the index's files (the
/// volume name is its key, as it is in the bucket's object names). An index of plain entries
/// (an older ferry's) is dropped and read again.
#[test]
fn the_local_index_keeps_no_manifest_metadata_in_plain_text() {
    let repo = Repo::file(&[]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 94);
    let stream = v.diff("snapshot-KNOWN-3f9a1c", Vec::new()).expect("diff");
    let f = repo.path("s.diff");
    std::fs::write(&f, &stream).expect("write");
    repo.ok(&[
        "backup",
        "--volume",
        "vm",
        "--diff",
        f.to_str().expect("utf8"),
        "--label",
        "owner=LABEL-KNOWN-77c2e0",
    ]);
    let ls = repo.json(&["ls", "vm"]);
    assert_eq!(ls[0]["labels"]["owner"], "LABEL-KNOWN-77c2e0", "{ls}");
    assert_eq!(ls[0]["to_snap"], "snapshot-KNOWN-3f9a1c");
    let mut files = Vec::new();
    let mut dirs = vec![repo.path("index")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("index dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(!files.is_empty());
    for p in &files {
        let bytes = std::fs::read(p).expect("read");
        for needle in [&b"LABEL-KNOWN-77c2e0"[..], b"snapshot-KNOWN-3f9a1c"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {} in plain text",
                p.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
}
