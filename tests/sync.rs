//! `ferry sync --to URL`: a second repository, as ciphertext (issue: the worst day, item 7).

use std::collections::BTreeMap;

use ferry_testdata::Volume;

use crate::util::{cluster, hash_file, unique, Repo};

const MIB: u64 = 1 << 20;

/// The repository at `url` (already there, not initialised here) with `like`'s environment.
fn at(url: &str, env: Vec<(String, String)>) -> Repo {
    Repo {
        dir: tempfile::tempdir().expect("temp dir"),
        url: url.to_string(),
        env,
    }
}

/// Every backup of `volume` in `repo` restores to the image hash recorded for its ID.
fn all_restore(repo: &Repo, volume: &str, expected: &BTreeMap<String, String>) -> usize {
    let backups = repo.backups(volume);
    for b in &backups {
        let id = b["backup_id"].as_str().expect("id");
        let out = repo.path(&format!("{volume}-{id}.raw"));
        repo.ok(&["restore", &format!("{volume}@id:{id}"), "--to", out.to_str().expect("utf8")]);
        assert_eq!(Some(&hash_file(&out)), expected.get(id), "{volume}@{id}");
        std::fs::remove_file(&out).expect("rm");
    }
    backups.len()
}

/// Backs up the volume's current state; records the image hash under the backup's ID.
fn backup(repo: &Repo, name: &str, v: &mut Volume, snap: &str, expected: &mut BTreeMap<String, String>) -> String {
    let j = repo.backup_bytes(name, &v.diff(snap, Vec::new()).expect("diff"));
    let id = j["backup_id"].as_str().expect("id").to_string();
    expected.insert(id.clone(), v.hash());
    id
}

/// The acceptance test: a file:// repository synced to RGW, again (nothing to do), after
/// one more backup (only what changed), then the source deleted: every backup restores from
/// the copy alone, with either passphrase, the protection travelled, audit is clean.
#[test]
fn a_copy_on_rgw_restores_every_backup_after_the_source_is_gone() {
    let c = cluster();
    c.bucket("ferry-tests");
    let src = c.file_repo();
    let mut expected = BTreeMap::new();
    let mut a = Volume::generated(9 * MIB + 4321, 1 << 20, 501);
    let mut b = Volume::generated(5 * MIB, 1 << 20, 502);
    backup(&src, "vol-a", &mut a, "a1", &mut expected);
    a.write(MIB + 100, &[7u8; 4096]);
    a.write(6 * MIB, &vec![9u8; 3 * MIB as usize]);
    backup(&src, "vol-a", &mut a, "a2", &mut expected);
    a.discard(2 * MIB, MIB);
    a.write(3 * MIB + 5, &[1u8; 512]);
    backup(&src, "vol-a", &mut a, "a3", &mut expected);
    let b1 = backup(&src, "vol-b", &mut b, "b1", &mut expected);
    src.ok(&["protect", &format!("vol-b@id:{b1}")]);
    // A second passphrase, added before the sync.
    let second = src.path("second-pass");
    std::fs::write(&second, "another passphrase\n").expect("write");
    std::fs::set_permissions(&second, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    src.ok(&["key", "add", "--new-password-file", second.to_str().expect("utf8")]);

    let url = format!("s3://ferry-tests/{}", unique("copy"));
    let first = src.json(&["sync", "--to", &url]);
    assert_eq!(first["repository_created"], true, "{first}");
    assert_eq!(first["key_slots_copied"], 2, "{first}");
    assert_eq!(first["backups_copied"], 4, "{first}");
    assert_eq!(first["protections_copied"], 1, "{first}");
    assert!(first["objects_copied"].as_u64().expect("n") >= 5, "{first}");
    // The incrementals inherit their parent's objects in the copy.
    assert!(first["objects_present"].as_u64().expect("n") > 0, "{first}");
    assert_eq!(first["skipped"].as_array().map(Vec::len), Some(0), "{first}");

    let again = src.json(&["sync", "--to", &url]);
    assert_eq!(
        (
            again["backups_copied"].as_u64(),
            again["backups_present"].as_u64(),
            again["objects_copied"].as_u64()
        ),
        (Some(0), Some(4), Some(0)),
        "{again}"
    );
    assert_eq!(again["requests"]["destination"]["bytes_up"], 0, "{again}");

    a.write(8 * MIB, &[3u8; 8192]);
    backup(&src, "vol-a", &mut a, "a4", &mut expected);
    let more = src.json(&["sync", "--to", &url, "vol-a"]);
    assert_eq!(more["backups_copied"], 1, "{more}");
    assert!(
        more["objects_copied"].as_u64().expect("n") <= 2,
        "only the changed block travels: {more}"
    );
    assert!(more["bytes_copied"].as_u64().expect("n") < 2 * MIB, "{more}");

    std::fs::remove_dir_all(src.repo_dir()).expect("delete the source");
    let copy = at(&url, c.env.clone());
    assert_eq!(all_restore(&copy, "vol-a", &expected), 4);
    assert_eq!(all_restore(&copy, "vol-b", &expected), 1);
    let listed = copy.backups("vol-b");
    assert_eq!(listed[0]["protected"], true, "{listed:?}");
    let audit = copy.json(&["audit", "--read-data"]);
    assert_eq!(audit["ok"], true, "{audit}");
    // The second passphrase opens the copy too.
    let out = copy
        .cmd(&["ls", "vol-a"])
        .env_remove("FERRY_PASSWORD")
        .env("FERRY_PASSWORD_FILE", &second)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A sync killed mid-copy is resumed by the next run (the dead attempt's session adopted);
/// a GC of the copy racing syncs and new backups never leaves a backup of the copy broken;
/// a copy interrupted and then fenced by the copy's GC is reported and later backups still
/// travel.
#[test]
fn a_killed_sync_resumes_and_gc_on_the_copy_races_syncs_safely() {
    let src = Repo::file(&["--block-size", "1M"]);
    let dst_dir = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}/copy", dst_dir.path().display());
    let mut expected = BTreeMap::new();
    let mut v = Volume::generated(24 * MIB, 1 << 20, 601);
    backup(&src, "vol", &mut v, "s1", &mut expected);

    // Killed mid-copy (at 1 MiB/s).
    let mut child = src
        .cmd(&["sync", "--to", &url, "--limit-upload", "1M", "--jobs", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(2000));
    child.kill().expect("kill");
    child.wait().expect("wait");
    let copy = at(&url, Vec::new());
    assert_eq!(copy.backups("vol").len(), 0, "nothing committed by the killed sync");
    let resumed = src.json(&["sync", "--to", &url]);
    assert_eq!(resumed["backups_copied"], 1, "{resumed}");
    assert!(
        resumed["objects_present"].as_u64().expect("n") > 0,
        "what the killed run copied stays: {resumed}"
    );
    assert_eq!(all_restore(&copy, "vol", &expected), 1);

    // Racing: GCs of the copy (short ack timeout) beside syncs, with backups in between.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gcs = {
        let (stop, url) = (stop.clone(), url.clone());
        let env: Vec<(String, String)> = Vec::new();
        std::thread::spawn(move || {
            let copy = at(&url, env);
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = copy.run(&["gc", "--ack-timeout", "1"]);
                assert!(
                    matches!(out.status.code(), Some(0) | Some(5)),
                    "gc: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    for i in 0..6u64 {
        v.write(((i * 5 + 2) % 20) * MIB, &vec![i as u8 + 1; 2 * MIB as usize]);
        v.discard((i * 3 % 20) * MIB, MIB);
        backup(&src, "vol", &mut v, &format!("r{i}"), &mut expected);
        // A forget at the source between syncs: the copy keeps what it has.
        if i == 2 {
            let first = src.backups("vol")[0]["backup_id"].as_str().expect("id").to_string();
            src.ok(&["forget", &format!("vol@id:{first}")]);
        }
        let out = src.run(&["sync", "--to", &url, "--json"]);
        assert!(out.status.success(), "sync: {}", String::from_utf8_lossy(&out.stderr));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gc_runs = gcs.join().expect("gc thread");
    assert!(gc_runs >= 2, "{gc_runs} GC runs");
    assert_eq!(all_restore(&copy, "vol", &expected), 7);
    let audit = copy.json(&["audit", "--read-data"]);
    assert_eq!(audit["ok"], true, "{audit}");

    // Killed, then the copy's GC runs before anyone resumes: the attempt's name is fenced, and
    // the next sync copies the backup under its next attempt name (same backup ID).
    let mut noise = vec![0u8; 6 * MIB as usize];
    ferry_testdata::Rng::new(99).fill(&mut noise);
    v.write(0, &noise);
    let late = backup(&src, "vol", &mut v, "k1", &mut expected);
    let mut child = src
        .cmd(&["sync", "--to", &url, "--limit-upload", "1M", "--jobs", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    child.kill().expect("kill");
    child.wait().expect("wait");
    let gc = copy.json(&["gc", "--ack-timeout", "1"]);
    assert_eq!(gc["sessions_fenced"], 1, "{gc}");
    v.write(10 * MIB, &[5u8; 4096]);
    backup(&src, "vol", &mut v, "k2", &mut expected);
    let after = src.json(&["sync", "--to", &url]);
    assert_eq!(after["backups_copied"], 2, "{after}");
    assert_eq!(after["skipped"].as_array().map(Vec::len), Some(0), "{after}");
    let names: Vec<String> = copy
        .backups("vol")
        .iter()
        .map(|b| b["object"].as_str().unwrap_or_default().to_string())
        .collect();
    let src_names: Vec<String> = src
        .backups("vol")
        .iter()
        .map(|b| b["object"].as_str().unwrap_or_default().to_string())
        .collect();
    let renamed: Vec<&String> = names.iter().filter(|n| n.ends_with(&late) && !src_names.contains(n)).collect();
    assert_eq!(renamed.len(), 1, "{names:?} {src_names:?}");
    assert_eq!(all_restore(&copy, "vol", &expected), 9);
    let audit = copy.json(&["audit", "--read-data"]);
    assert_eq!(audit["ok"], true, "{audit}");
}

/// A backup damaged in the source is not copied (exit 3, named), the others are; a
/// destination that is another repository is refused before anything is written (exit 5).
#[test]
fn sync_refuses_damage_and_strangers() {
    let src = Repo::file(&["--block-size", "1M"]);
    let mut expected = BTreeMap::new();
    let mut a = Volume::generated(3 * MIB, 1 << 20, 701);
    let mut b = Volume::generated(2 * MIB, 1 << 20, 702);
    let damaged = backup(&src, "vol-a", &mut a, "a1", &mut expected);
    backup(&src, "vol-b", &mut b, "b1", &mut expected);
    // Damage a chunk only vol-a uses (the audit blames vol-a alone).
    let chunks = walk(&src.repo_dir().join("chunks"));
    let mut blamed = None;
    for f in &chunks {
        let bytes = std::fs::read(f).expect("read");
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        std::fs::write(f, &bad).expect("write");
        let audit = src.json_code(&["audit", "--read-data", "--no-quarantine"], 3);
        let vols: Vec<&str> = audit["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter_map(|x| x["volume"].as_str())
            .collect();
        if vols.iter().all(|v| *v == "vol-a") {
            blamed = Some(f.clone());
            break;
        }
        std::fs::write(f, &bytes).expect("restore");
    }
    assert!(blamed.is_some(), "a chunk only vol-a uses");
    let dst_dir = tempfile::tempdir().expect("temp dir");
    let url = format!("file://{}/copy", dst_dir.path().display());
    let out = src.run(&["sync", "--to", &url]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("SKIPPED [damaged] vol-a {damaged}")), "{text}");
    let copy = at(&url, Vec::new());
    assert_eq!(all_restore(&copy, "vol-b", &expected), 1);
    assert_eq!(copy.backups("vol-a").len(), 0);
    // Forgotten in the copy: the next sync does not bring it back (while the copy remembers
    // copying it: until a GC there cleans up the copy's session).
    let b1 = copy.backups("vol-b")[0]["backup_id"].as_str().expect("id").to_string();
    copy.ok(&["forget", &format!("vol-b@id:{b1}")]);
    let out = src.run(&["sync", "--to", &url, "vol-b"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("SKIPPED [forgotten] vol-b {b1}")), "{text}");
    assert_eq!(copy.backups("vol-b").len(), 0);

    // Another repository at the destination.
    let other = Repo::file(&[]);
    let out = src.run(&["sync", "--to", &other.url]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another repository"));
    assert_eq!(other.backups("vol-b").len(), 0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
