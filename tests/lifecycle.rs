//! Letting backups go: prune by a retention policy, forget, protect (issue: lifecycle).

use ferry_testdata::Volume;

use crate::util::{hash_file, Repo};

const MIB: u64 = 1 << 20;

/// A chain of five backups s1..s5 of one volume with changes between them; returns the
/// backup IDs and the image hash at each.
fn chain_of_five(repo: &Repo, volume: &str) -> (Vec<String>, Vec<String>, Volume) {
    let mut v = Volume::generated(4 * MIB + 777, 1 << 20, 77);
    let (mut ids, mut hashes) = (Vec::new(), Vec::new());
    for i in 1..=5u64 {
        if i > 1 {
            v.write(i * 300_000, &vec![i as u8; 5000]);
            v.discard((i % 4) * MIB, MIB / 2);
        }
        let j = repo.backup_bytes(volume, &v.diff(&format!("s{i}"), Vec::new()).expect("diff"));
        ids.push(j["backup_id"].as_str().expect("id").to_string());
        hashes.push(v.hash());
    }
    (ids, hashes, v)
}

fn ids_of(repo: &Repo, volume: &str) -> Vec<String> {
    repo.backups(volume)
        .iter()
        .map(|b| b["backup_id"].as_str().expect("id").to_string())
        .collect()
}

fn restores_exactly(repo: &Repo, volume: &str, id: &str, hash: &str, extra: &[&str]) {
    let out = repo.path(&format!("r-{id}.raw"));
    let _ = std::fs::remove_file(&out);
    let mut args = vec![
        "restore".to_string(),
        format!("{volume}@id:{id}"),
        "--to".into(),
        out.to_str().expect("utf8").into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    repo.ok(&args);
    assert_eq!(hash_file(&out), hash, "backup {id} of {volume} {extra:?}");
}

#[test]
fn prune_keep_last_3_of_5_keeps_three_that_restore_bit_exactly() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let (ids, hashes, mut v) = chain_of_five(&repo, "v");

    // Dry run: decisions with reasons, nothing deleted.
    let j = repo.json(&["prune", "v", "--keep-last", "3", "--dry-run"]);
    assert_eq!(j["dry_run"], true, "{j}");
    assert_eq!((j["kept"].as_u64(), j["removed"].as_u64()), (Some(3), Some(2)), "{j}");
    let fates = j["volumes"]["v"].as_array().expect("fates");
    let keep: Vec<bool> = fates.iter().map(|f| f["keep"].as_bool().expect("keep")).collect();
    assert_eq!(keep, [false, false, true, true, true], "{j}");
    assert_eq!(
        fates[4]["reasons"],
        serde_json::json!([{"rule": "newest"}, {"rule": "last"}]),
        "{j}"
    );
    assert!(fates.iter().all(|f| f["deleted"] == false), "{j}");
    assert_eq!(ids_of(&repo, "v"), ids);
    let human = repo.ok(&["prune", "v", "--keep-last", "3", "--dry-run"]);
    assert!(human.contains("would remove") && human.contains("newest, last"), "{human}");

    // For real.
    let j = repo.json(&["prune", "v", "--keep-last", "3"]);
    assert_eq!(j["removed"], 2, "{j}");
    assert_eq!(ids_of(&repo, "v"), ids[2..].to_vec());
    for (id, h) in ids.iter().zip(&hashes).skip(2) {
        restores_exactly(&repo, "v", id, h, &[]);
        restores_exactly(&repo, "v", id, h, &["--no-index"]);
    }
    // With a brand-new index, too.
    let fresh = repo.path("fresh-index");
    for (id, h) in ids.iter().zip(&hashes).skip(2) {
        restores_exactly(&repo, "v", id, h, &["--index-dir", fresh.to_str().expect("utf8")]);
    }
    // The pruned ones are gone, by ID and by snapshot.
    let err = repo.fails(
        &[
            "restore",
            &format!("v@id:{}", ids[0]),
            "--to",
            repo.path("x").to_str().expect("utf8"),
        ],
        5,
    );
    assert!(err.contains("no backup"), "{err}");
    // The chain goes on incrementally from the newest, which prune never removes.
    v.write(123, b"after prune");
    let next = repo.backup_bytes("v", &v.diff("s6", Vec::new()).expect("diff"));
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(next["parent"].as_str(), Some(ids[4].as_str()), "{next}");
    repo.ok(&["audit", "--read-data"]);
}

#[test]
fn a_protected_backup_survives_prune_and_forget_and_the_loss_of_the_index() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let (ids, hashes, _) = chain_of_five(&repo, "v");
    let out = repo.ok(&["protect", &format!("v@id:{}", ids[1]), "--note", "legal hold"]);
    assert!(out.contains("is protected"), "{out}");
    // The protection lives in the bucket: a listing without any index shows it.
    let ls = repo.json(&["ls", "v", "--no-index"]);
    let prot: Vec<bool> = ls
        .as_array()
        .expect("list")
        .iter()
        .map(|b| b["protected"].as_bool().expect("bool"))
        .collect();
    assert_eq!(prot, [false, true, false, false, false], "{ls}");

    let j = repo.json(&["prune", "v", "--keep-last", "1"]);
    assert_eq!(j["removed"], 3, "{j}");
    assert_eq!(ids_of(&repo, "v"), vec![ids[1].clone(), ids[4].clone()]);
    let fates = j["volumes"]["v"].as_array().expect("fates");
    assert_eq!(fates[1]["reasons"], serde_json::json!([{"rule": "protected"}]), "{j}");
    restores_exactly(&repo, "v", &ids[1], &hashes[1], &["--no-index"]);

    // forget refuses a protected backup and deletes nothing else named with it.
    let err = repo.fails(&["forget", &format!("v@id:{}", ids[4]), &format!("v@id:{}", ids[1])], 5);
    assert!(err.contains("protected"), "{err}");
    assert_eq!(ids_of(&repo, "v").len(), 2);
    repo.ok(&["unprotect", &format!("v@id:{}", ids[1])]);
    let j = repo.json(&["forget", &format!("v@id:{}", ids[1])]);
    assert_eq!(j["backups"][0]["deleted"], true, "{j}");
    assert_eq!(ids_of(&repo, "v"), vec![ids[4].clone()]);
    restores_exactly(&repo, "v", &ids[4], &hashes[4], &[]);
}

#[test]
fn forget_and_prune_refuse_what_they_cannot_mean() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let (ids, _, _) = chain_of_five(&repo, "v");
    // A whole volume is never forgotten implicitly; two volumes at once neither.
    repo.fails(&["forget", "v"], 2);
    repo.fails(&["forget", "v@latest", "w@latest"], 2);
    // Unknown backups are refused and nothing is deleted.
    let err = repo.fails(&["forget", &format!("v@id:{}", ids[0]), "v@snap:nope"], 5);
    assert!(err.contains("no backup"), "{err}");
    assert_eq!(ids_of(&repo, "v"), ids);
    // prune needs a keep option, and names existing volumes.
    let err = repo.fails(&["prune", "v"], 2);
    assert!(err.contains("--keep-"), "{err}");
    repo.fails(&["prune", "nosuchvolume", "--keep-last", "1"], 5);
    repo.fails(&["prune", "--keep-within", "7x"], 2);
    // forget --dry-run deletes nothing.
    let j = repo.json(&["forget", &format!("v@id:{}", ids[2]), "--dry-run"]);
    assert_eq!(j["backups"][0]["deleted"], false, "{j}");
    assert_eq!(ids_of(&repo, "v"), ids);
}
