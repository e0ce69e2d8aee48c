//! `ferry audit` once backups can be deleted: a removed parent, a manifest that vanishes while
//! the audit runs and a fork are information, not findings; a real continuity break still is.

use ferry_engine::{AuditOptions, Engine};
use ferry_repo::{open_store, BackupDraft, FaultPlan, Index, Repository, StoreOptions};
use ferry_testdata::Volume;
use serde_json::Value;

use crate::util::{hash_file, Repo, PASSWORD};

const MIB: u64 = 1 << 20;

/// A committed backup: its ID, its manifest's object key, and the volume's hash at the time.
struct Backup {
    id: String,
    object: String,
    hash: String,
}

/// Backs up `stream` (optionally on `parent`), checks the to-snapshot, returns the backup.
fn backup(repo: &Repo, volume: &str, stream: &[u8], parent: Option<&str>, hash: String) -> Backup {
    let f = repo.path(&format!("stream-{}.diff", rand::random::<u64>()));
    std::fs::write(&f, stream).expect("write stream");
    let mut args = vec!["backup", "--volume", volume, "--diff", f.to_str().expect("utf8")];
    if let Some(p) = parent {
        args.extend(["--parent", p]);
    }
    let j = repo.json(&args);
    let _ = std::fs::remove_file(f);
    Backup {
        id: j["backup_id"].as_str().expect("backup_id").to_string(),
        object: j["object"].as_str().expect("object").to_string(),
        hash,
    }
}

/// Backs up the volume's next diff as snapshot `snap`.
fn step(repo: &Repo, volume: &str, v: &mut Volume, snap: &str, parent: Option<&str>) -> Backup {
    let stream = v.diff(snap, Vec::new()).expect("diff");
    backup(repo, volume, &stream, parent, v.hash())
}

/// Deletes a backup's manifest by hand, as `ferry forget` will.
fn forget(repo: &Repo, b: &Backup) {
    std::fs::remove_file(repo.repo_dir().join(&b.object)).expect("remove manifest");
}

/// `ferry audit --json` with the exit code it must have.
fn audit_json(repo: &Repo, args: &[&str], code: i32) -> Value {
    let mut a = vec!["audit", "--json"];
    a.extend_from_slice(args);
    let out = repo.run(&a);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {a:?}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("audit JSON")
}

/// (kind, backup) of every entry of a findings or info list.
fn kinds(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().expect("kind").to_string(),
                f["backup"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

fn pair(kind: &str, backup: &str) -> (String, String) {
    (kind.to_string(), backup.to_string())
}

/// Restores `volume@id` to a file (with or without the index) and compares it with the hash.
fn assert_restores(repo: &Repo, volume: &str, b: &Backup, extra: &[&str]) {
    let out = repo.path(&format!("restore-{}-{}.raw", b.id, rand::random::<u32>()));
    let target = format!("{volume}@{}", b.id);
    let mut args = vec!["restore", target.as_str(), "--to", out.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    repo.ok(&args);
    assert_eq!(hash_file(&out), b.hash, "restore of {target} {extra:?}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn a_forgotten_middle_backup_is_information_and_the_rest_restores() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(6 * MIB + 4321, 1 << 20, 61);
    let s1 = step(&repo, "v", &mut v, "s1", None);
    v.write(MIB - 10, &[0xA5; 5000]);
    v.discard(3 * MIB, MIB);
    let s2 = step(&repo, "v", &mut v, "s2", None);
    v.write(2 * MIB + 7, b"after s2");
    v.write(5 * MIB, &[0x3C; 70_000]);
    let s3 = step(&repo, "v", &mut v, "s3", None);
    let before = audit_json(&repo, &[], 0);
    assert_eq!(before["info"], serde_json::json!([]), "{before}");

    forget(&repo, &s2);
    let j = audit_json(&repo, &["--read-data"], 0);
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["findings"], serde_json::json!([]), "{j}");
    assert_eq!(kinds(&j["info"]), [pair("parent-forgotten", &s3.id)], "{j}");
    let detail = j["info"][0]["detail"].as_str().expect("detail");
    assert!(detail.contains(&s2.id) && detail.contains("'s2'"), "{detail}");
    assert_eq!(j["info"][0]["volume"], "v", "{j}");
    assert_eq!(j["manifests_checked"], 2, "{j}");
    assert_eq!(j["manifests_vanished"], 0, "{j}");
    assert_eq!(j["volumes"]["v"]["backups"], 2, "{j}");
    assert_eq!(j["volumes"]["v"]["incremental"], 1, "{j}");
    assert_eq!(j["volumes"]["v"]["newest"], s3.id.as_str(), "{j}");
    assert_eq!(j["chunks_read"], j["chunks_referenced"], "{j}");

    // The table prints the information after the (absent) findings and passes.
    let table = repo.ok(&["audit"]);
    assert!(!table.contains("FINDING"), "{table}");
    assert!(table.contains(&format!("INFO [parent-forgotten] v {}: ", s3.id)), "{table}");
    assert!(table.contains("audit passed"), "{table}");

    // Every remaining backup restores bit-exactly, with the (stale) index and without one.
    for b in [&s1, &s3] {
        assert_restores(&repo, "v", b, &[]);
        assert_restores(&repo, "v", b, &["--no-index"]);
    }
    assert_eq!(repo.backups("v").len(), 2);
    // The chain goes on from the newest backup.
    v.write(17, b"s4");
    let s4 = step(&repo, "v", &mut v, "s4", None);
    assert_restores(&repo, "v", &s4, &[]);
    let j = audit_json(&repo, &[], 0);
    assert_eq!(kinds(&j["info"]), [pair("parent-forgotten", &s3.id)], "{j}");
}

#[test]
fn a_continuity_break_with_the_parent_present_is_still_a_finding() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 62);
    let s1 = step(&repo, "v", &mut v, "s1", None);
    v.write(100, b"second");
    let s2 = step(&repo, "v", &mut v, "s2", None);
    // The CLI refuses to build a broken chain, so write one through the library: a backup
    // that names s2 as its parent but claims to start at s1 (its map is s2's, complete).
    let broken = tokio::runtime::Runtime::new().expect("runtime").block_on(async {
        let store = open_store(&repo.url, &StoreOptions::default()).expect("store");
        let r = Repository::open(store, PASSWORD.as_bytes()).await.expect("open");
        let refs = r.list_backups(Some("v")).await.expect("list");
        let parent = refs.iter().find(|b| b.backup_id() == s2.id).expect("s2 listed");
        let m = r.read_manifest(parent).await.expect("read s2");
        let draft = BackupDraft {
            volume: "v".into(),
            source: m.meta.source.clone(),
            from_snap: Some("s1".into()),
            to_snap: Some("s3".into()),
            parent: Some(s2.id.clone()),
            follows: None,
            seq: None,
            image_size: m.meta.image_size,
            block_size: m.meta.block_size,
            labels: Default::default(),
            protected: false,
            stats: Default::default(),
            blocks: m.blocks.clone(),
            deltas: m.deltas.clone(),
        };
        let session = ferry_repo::Session::begin(&r, "v", Default::default()).await.expect("session");
        let (_, broken) = r.commit(draft, &session).await.expect("commit");
        broken.meta.backup_id
    });
    let j = audit_json(&repo, &[], 3);
    assert_eq!(j["ok"], false, "{j}");
    assert_eq!(kinds(&j["findings"]), [pair("chain", &broken)], "{j}");
    let detail = j["findings"][0]["detail"].as_str().expect("detail");
    assert!(
        detail.contains("'s1'") && detail.contains("'s2'") && detail.contains(&s2.id),
        "{detail}"
    );
    // One child per parent: no fork, nothing else to say.
    assert_eq!(j["info"], serde_json::json!([]), "{j}");
    let table = repo.fails(&["audit"], 3);
    assert!(table.contains("problem"), "{table}");
    // The break is in the history only: every backup still restores.
    assert_restores(&repo, "v", &s1, &[]);
    assert_restores(&repo, "v", &s2, &[]);
    let as_s2 = Backup {
        id: broken.clone(),
        object: String::new(),
        hash: s2.hash.clone(),
    };
    assert_restores(&repo, "v", &as_s2, &[]);

    // Once s2 is forgotten the broken backup's parent is gone, and s1 ends at its
    // from-snapshot 's1': continuity holds by snapshot, nothing is left to report.
    forget(&repo, &s2);
    let j = audit_json(&repo, &[], 0);
    assert_eq!(j["findings"], serde_json::json!([]), "{j}");
    assert_eq!(j["info"], serde_json::json!([]), "{j}");
}

#[test]
fn a_fork_is_information_and_both_branches_restore() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(4 * MIB, 1 << 20, 63);
    let s1 = step(&repo, "v", &mut v, "s1", None);
    let mut w = v.clone();
    v.write(MIB + 1, b"branch one");
    let a = step(&repo, "v", &mut v, "s2", None);
    w.write(2 * MIB + 2, &[0xEE; 9000]);
    let b = step(&repo, "v", &mut w, "t2", Some(&s1.id));
    // A third, on the second branch: no fork there.
    w.write(3, b"t3");
    let c = step(&repo, "v", &mut w, "t3", None);

    let j = audit_json(&repo, &[], 0);
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["findings"], serde_json::json!([]), "{j}");
    assert_eq!(kinds(&j["info"]), [pair("fork", &s1.id)], "{j}");
    let detail = j["info"][0]["detail"].as_str().expect("detail");
    assert!(detail.starts_with("2 backups build on this backup (to 's1')"), "{detail}");
    assert!(
        detail.contains(&format!("{} (to 's2')", a.id)) && detail.contains(&format!("{} (to 't2')", b.id)),
        "{detail}"
    );
    let table = repo.ok(&["audit"]);
    assert!(table.contains(&format!("INFO [fork] v {}: 2 backups", s1.id)), "{table}");
    for x in [&s1, &a, &b, &c] {
        assert_restores(&repo, "v", x, &[]);
    }

    // Forgetting the fork point leaves both branches, each now without its parent.
    forget(&repo, &s1);
    let j = audit_json(&repo, &[], 0);
    assert_eq!(
        kinds(&j["info"]),
        [
            pair("parent-forgotten", &a.id),
            pair("parent-forgotten", &b.id),
            pair("fork", &s1.id)
        ],
        "{j}"
    );
    for x in [&a, &b, &c] {
        assert_restores(&repo, "v", x, &["--no-index"]);
    }
}

#[test]
fn a_forgotten_parent_whose_snapshot_another_backup_holds_needs_no_note() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(3 * MIB, 1 << 20, 64);
    let s1 = step(&repo, "v", &mut v, "s1", None);
    v.write(MIB / 2, b"s2 data");
    let stream = v.diff("s2", Vec::new()).expect("diff");
    // The same snapshot backed up twice: two children of s1 ending at 's2'.
    let first = backup(&repo, "v", &stream, None, v.hash());
    let again = backup(&repo, "v", &stream, Some(&s1.id), v.hash());
    v.write(2 * MIB, b"s3 data");
    let s3 = step(&repo, "v", &mut v, "s3", Some(&first.id));
    let j = audit_json(&repo, &[], 0);
    assert_eq!(kinds(&j["info"]), [pair("fork", &s1.id)], "{j}");

    forget(&repo, &first);
    let j = audit_json(&repo, &[], 0);
    assert_eq!(j["findings"], serde_json::json!([]), "{j}");
    assert_eq!(j["info"], serde_json::json!([]), "{j}");
    for b in [&s1, &again, &s3] {
        assert_restores(&repo, "v", b, &[]);
    }
}

/// A manifest deleted after the audit listed it and before it read it: a real `NotFound` from
/// the store, counted as vanished. The read of that manifest is held back by the fault
/// injector (`slow`) until the test has deleted the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_deleted_during_the_audit_is_counted_not_reported() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(2 * MIB, 1 << 20, 65);
    step(&repo, "v", &mut v, "s1", None);
    v.write(5, b"two");
    let s2 = step(&repo, "v", &mut v, "s2", None);
    v.write(6, b"three");
    let s3 = step(&repo, "v", &mut v, "s3", None);

    let name = s2.object.rsplit('/').next().expect("name");
    let plan = FaultPlan::parse(&format!("get:{name}:slow=4s:times=1")).expect("plan");
    let store = open_store(
        &repo.url,
        &StoreOptions {
            faults: Some(plan.clone()),
            ..Default::default()
        },
    )
    .expect("store");
    let r = Repository::open(store, PASSWORD.as_bytes()).await.expect("open");
    let index_dir = tempfile::tempdir().expect("tmp");
    let index = Index::open(index_dir.path(), r.id()).expect("index");
    let engine = Engine::new(r, index);
    let audit = tokio::spawn(async move { engine.audit(&AuditOptions::default()).await });
    // The rule fires once the audit listed s2 and started to read it; the read then waits
    // 4 s before it reaches the store, by which time the file is gone.
    let t = std::time::Instant::now();
    while plan.fired()[0] == 0 {
        assert!(t.elapsed().as_secs() < 15, "the audit never read s2's manifest");
        assert!(!audit.is_finished(), "the audit ended before reading s2's manifest");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    forget(&repo, &s2);
    let report = audit.await.expect("join").expect("audit");
    assert!(report.ok, "{report:#?}");
    assert!(report.findings.is_empty(), "{report:#?}");
    assert_eq!((report.manifests_checked, report.manifests_vanished), (2, 1), "{report:#?}");
    let info: Vec<_> = report.info.iter().map(|f| (f.kind, f.backup.clone())).collect();
    assert_eq!(info, [("parent-forgotten", Some(s3.id.clone()))], "{report:#?}");
    assert_eq!(report.volumes["v"].backups, 2);
}

/// Verification that fits a budget (issue 12 item 5): each budgeted audit reads only objects
/// no recent audit verified, never-verified first, and stops at its budget; together they
/// cover the repository; a window of 0 reads everything again and finds damage.
#[test]
fn budgeted_audits_cover_the_repository_over_time() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(14 * MIB, 1 << 20, 901);
    repo.backup_bytes("vol", &v.diff("s1", Vec::new()).expect("diff"));
    v.write(3 * MIB, &[9u8; 70_000]);
    repo.backup_bytes("vol", &v.diff("s2", Vec::new()).expect("diff"));
    let total = audit_json(&repo, &[], 0)["chunks_referenced"].as_u64().expect("n");
    assert!(total >= 8, "{total}");
    let mut covered = 0u64;
    let mut runs = 0;
    loop {
        let j = audit_json(&repo, &["--outdated-after", "30d", "--max-requests", "3"], 0);
        let (read, fresh) = (j["chunks_read"].as_u64().expect("n"), j["chunks_fresh"].as_u64().expect("n"));
        assert_eq!(fresh, covered, "{j}");
        assert_eq!(read, (total - covered).min(3), "{j}");
        assert_eq!(j["budget_reached"], total - covered > 3, "{j}");
        assert_eq!(j["chunks_outdated_left"].as_u64(), Some((total - covered).saturating_sub(3)), "{j}");
        assert!(j["bytes_verified"].as_u64().expect("n") > 0 || read == 0, "{j}");
        assert!(j["requests"]["bytes_down"].as_u64() >= j["bytes_verified"].as_u64(), "{j}");
        covered += read;
        runs += 1;
        if read == 0 {
            break;
        }
        assert!(runs < 20);
    }
    assert_eq!(covered, total);
    assert_eq!(runs as u64, total.div_ceil(3) + 1);
    // A byte budget, one download at a time: the first object spends it.
    let j = audit_json(&repo, &["--outdated-after", "0", "--max-bytes", "1", "--jobs", "1"], 0);
    assert_eq!(
        (j["chunks_read"].as_u64(), j["budget_reached"].as_bool()),
        (Some(1), Some(true)),
        "{j}"
    );
    // Damage one chunk: an audit that reads everything again finds it.
    let chunks = std::fs::read_dir(repo.repo_dir().join("chunks"))
        .expect("dir")
        .next()
        .expect("a dir")
        .expect("entry")
        .path();
    let victim = std::fs::read_dir(&chunks)
        .expect("dir")
        .next()
        .expect("a chunk")
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&victim, &bytes).expect("write");
    let j = audit_json(&repo, &["--outdated-after", "30d"], 0);
    assert_eq!(j["chunks_read"], 0, "verified recently: not read again within the window: {j}");
    let j = audit_json(&repo, &["--outdated-after", "0", "--no-quarantine"], 3);
    assert_eq!(j["chunks_read"].as_u64(), Some(total - 1), "{j}");
    assert_eq!(j["findings"][0]["kind"], "corrupt-chunk", "{j}");
}
