//! CLI behaviour: keys, refusals, unreachable stores, help.

use crate::util::{Repo, PASSWORD};

#[test]
fn key_slots_add_list_passwd_remove() {
    let repo = Repo::file(&[]);
    let added = repo
        .cmd(&["key", "add", "--label", "oncall"])
        .env("FERRY_NEW_PASSWORD", "second passphrase")
        .output()
        .expect("run");
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let slots = repo.json(&["key", "list"]);
    assert_eq!(slots.as_array().expect("array").len(), 2);
    // The new passphrase opens the repository.
    let ls = repo.cmd(&["ls"]).env("FERRY_PASSWORD", "second passphrase").output().expect("run");
    assert!(ls.status.success());
    // Change the first passphrase; the old one stops working.
    let out = repo
        .cmd(&["key", "passwd"])
        .env("FERRY_NEW_PASSWORD", "third passphrase")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    repo.fails(&["ls"], 4);
    let ok = repo.cmd(&["ls"]).env("FERRY_PASSWORD", "third passphrase").output().expect("run");
    assert!(ok.status.success());
    // Remove the oncall slot; the last slot cannot be removed.
    let slots = repo
        .cmd(&["key", "list", "--json"])
        .env("FERRY_PASSWORD", "third passphrase")
        .output()
        .expect("run");
    let slots: serde_json::Value = serde_json::from_slice(&slots.stdout).expect("json");
    let ids: Vec<String> = slots
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    let oncall = slots
        .as_array()
        .expect("a")
        .iter()
        .find(|s| s["label"] == "oncall")
        .expect("oncall slot")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let rm = repo
        .cmd(&["key", "remove", &oncall])
        .env("FERRY_PASSWORD", "third passphrase")
        .output()
        .expect("run");
    assert!(rm.status.success());
    let last = ids.iter().find(|i| **i != oncall).expect("other");
    let rm = repo
        .cmd(&["key", "remove", last])
        .env("FERRY_PASSWORD", "third passphrase")
        .output()
        .expect("run");
    assert_eq!(rm.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&rm.stderr).contains("last key slot"));
}

#[test]
fn init_twice_is_refused_and_password_file_works() {
    let repo = Repo::file(&[]);
    let err = repo.fails(&["init"], 5);
    assert!(err.contains("already exists"), "{err}");
    let pf = repo.path("pw");
    std::fs::write(&pf, format!("{PASSWORD}\n")).expect("write");
    let ls = || {
        repo.cmd(&["ls"])
            .env_remove("FERRY_PASSWORD")
            .env("FERRY_PASSWORD_FILE", &pf)
            .output()
            .expect("run")
    };
    // A passphrase file others can read is refused, naming the fix.
    let chmod = |mode: u32| {
        let mut perm = std::fs::metadata(&pf).expect("md").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, mode);
        std::fs::set_permissions(&pf, perm).expect("chmod");
    };
    chmod(0o644);
    let out = ls();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    chmod(0o600);
    let out = ls();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Files ferry creates (the index, a file:// repository's objects, restores) are private.
#[test]
fn files_ferry_creates_are_private() {
    let repo = Repo::file(&[]);
    let mut v = ferry_testdata::Volume::generated(1 << 20, 1 << 20, 4);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("r.raw");
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    let mut files = vec![out];
    let mut dirs = vec![repo.repo_dir(), repo.path("index")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 5, "{files:?}");
    for f in files {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&f).expect("md").permissions());
        assert_eq!(mode & 0o077, 0, "{} is readable by others: {mode:o}", f.display());
    }
}

#[test]
fn restore_refuses_to_overwrite_without_force() {
    let repo = Repo::file(&[]);
    let mut v = ferry_testdata::Volume::generated(1 << 20, 1 << 20, 3);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("existing.raw");
    std::fs::write(&out, b"precious").expect("write");
    let err = repo.fails(&["restore", "v", "--to", out.to_str().expect("utf8")], 5);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).expect("read"), b"precious");
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8"), "--force"]);
    assert_eq!(std::fs::read(&out).expect("read"), v.data);
}

#[test]
fn unreachable_s3_endpoint_fails_fast_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let start = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "ls",
            "--repo",
            "s3://ferry-test/none",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "--s3-allow-http",
            "--store-retries",
            "0",
        ])
        .env("FERRY_PASSWORD", "x")
        .env("AWS_ACCESS_KEY_ID", "a")
        .env("AWS_SECRET_ACCESS_KEY", "b")
        .env("FERRY_INDEX_DIR", dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config") && (err.contains("127.0.0.1:9") || err.contains("connect")),
        "{err}"
    );
    assert!(start.elapsed().as_secs() < 30);
}

#[test]
fn help_lists_commands_and_exit_codes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--help")
        .output()
        .expect("run");
    let s = String::from_utf8_lossy(&out.stdout);
    for w in ["backup", "restore", "audit", "Exit codes", "FERRY_PASSWORD"] {
        assert!(s.contains(w), "--help lacks {w}: {s}");
    }
}

#[test]
fn config_file_supplies_the_repository() {
    let repo = Repo::file(&[]);
    let cfg = repo.path("ferry.toml");
    std::fs::write(&cfg, format!("[repository]\nurl = \"{}\"\n", repo.url)).expect("write");
    let out = repo
        .cmd(&["ls", "--config", cfg.to_str().expect("utf8")])
        .env_remove("FERRY_REPO")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&cfg, "[repository]\npassword = \"secret\"\n").expect("write");
    let out = repo.cmd(&["ls", "--config", cfg.to_str().expect("utf8")]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The store fault injector, reached through $FERRY_TEST_FAULTS: an unavailable store during a
/// restore is a network failure (exit 1), never "integrity", and the partial file is removed.
#[test]
fn injected_store_unavailability_is_not_reported_as_damage() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = ferry_testdata::Volume::generated(3 << 20, 1 << 20, 8);
    repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let out = repo.path("out.raw");
    let mut cmd = repo.cmd(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    cmd.env("FERRY_TEST_FAULTS", "get:chunks/*:status=503");
    let o = cmd.output().expect("ferry");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("injecting store faults"), "{err}");
    assert!(err.contains("could not be fetched"), "{err}");
    assert!(!err.contains("integrity"), "{err}");
    assert!(!out.exists(), "a failed restore must not leave a partial file");
    // Without the fault the same restore succeeds, and the JSON says what the whole run cost:
    // opening the repository (GET config, LIST keys/, GET the one key slot), the index sync
    // (LIST volumes/), the manifest, one GET per block with data; nothing written.
    let with_data = repo.backups("v")[0]["blocks_with_data"].as_u64().expect("n");
    let j = repo.json(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    assert_eq!(j["requests"]["get"].as_u64(), Some(2 + 1 + with_data), "{j}");
    assert_eq!(j["requests"]["list"], 2, "{j}");
    assert_eq!(j["requests"]["put"], 0, "{j}");
}

#[test]
fn a_missing_passphrase_is_named_as_such() {
    let repo = Repo::file(&[]);
    let out = repo.cmd(&["ls"]).env_remove("FERRY_PASSWORD").output().expect("ferry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("no passphrase"), "{err}");
    assert!(!err.contains("key slot"), "{err}");
}

/// Options that only apply to `--diff` streams are refused with an `rbd:` source instead of
/// being silently ignored (an RBD backup's block size is the image's object size).
#[test]
fn diff_only_options_are_refused_with_an_rbd_source() {
    let repo = Repo::file(&[]);
    for args in [
        ["backup", "rbd:rbd/img", "--block-size", "1M"],
        ["backup", "rbd:rbd/img", "--parent", "latest"],
    ] {
        let err = repo.fails(&args, 2);
        assert!(err.contains("cannot be used with"), "{args:?}: {err}");
    }
}

#[test]
fn an_upload_limit_of_zero_is_refused() {
    let repo = Repo::file(&[]);
    let err = repo.fails(&["ls", "--limit-upload", "0"], 2);
    assert!(err.contains("would stop every upload"), "{err}");
}

/// The local index is a cache: a damaged one is moved aside and rebuilt, never a blocker.
#[test]
fn a_damaged_index_is_rebuilt_not_a_blocker() {
    let repo = Repo::file(&[]);
    let mut v = ferry_testdata::Volume::generated(1 << 20, 1 << 20, 5);
    let b = repo.backup_bytes("v", &v.diff("s1", Vec::new()).expect("diff"));
    let index = repo.path("index");
    let mut damaged = 0;
    let mut dirs = vec![index.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                std::fs::write(&p, vec![0xA5u8; 4096]).expect("damage");
                damaged += 1;
            }
        }
    }
    assert!(damaged > 0);
    let out = repo.run(&["ls", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("damaged") && err.contains("rebuilt"), "{err}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list[0]["backup_id"], b["backup_id"], "{list}");
    repo.ok(&["index", "rebuild"]);
}
