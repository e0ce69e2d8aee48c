//! Garbage collection beside running backups (issue: lifecycle): every scenario on `file://`
//! and on RGW, with no time-based grace: the protocol keeps them safe, not the clock.

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ferry_engine::{Engine, FileTarget, RestoreOptions, StreamBackupOptions};
use ferry_repo::{open_store, BackupSpec, ChunkId, GcOptions, Index, InitOptions, KdfParams, Repository, SessionOptions, StoreOptions};
use ferry_testdata::{Rng, Volume};
use futures::TryStreamExt;

use crate::util::{cluster, hash_file, Repo};

const MIB: u64 = 1 << 20;
const PASS: &[u8] = b"gc-pass";

/// Where a library-level test keeps its repository.
#[derive(Clone)]
struct Place {
    url: String,
    opts: StoreOptions,
}

fn file_place(dir: &std::path::Path) -> Place {
    Place {
        url: format!("file://{}/repo", dir.display()),
        opts: StoreOptions::default(),
    }
}

fn rgw_place() -> Place {
    let c = cluster();
    c.bucket("ferry-tests");
    Place {
        url: format!("s3://ferry-tests/{}", crate::util::unique("gc")),
        opts: StoreOptions {
            endpoint: Some(c.var("AWS_ENDPOINT").to_string()),
            region: Some(c.var("AWS_REGION").to_string()),
            allow_http: Some(true),
            access_key_id: Some(c.var("AWS_ACCESS_KEY_ID").to_string()),
            secret_access_key: Some(c.var("AWS_SECRET_ACCESS_KEY").to_string()),
            ..Default::default()
        },
    }
}

async fn init(place: &Place) {
    let store = open_store(&place.url, &place.opts).expect("store");
    let opts = InitOptions {
        block_size: ferry_repo::BlockSize::new(MIB).expect("1 MiB"),
        kdf: KdfParams::argon2id_fast(),
        ..Default::default()
    };
    Repository::init(store, PASS, opts).await.expect("init");
}

/// An engine of its own (own store connection, own temporary index), as another process
/// would have; backups watch for GC every 50 ms.
async fn engine(place: &Place) -> Engine {
    let store = open_store(&place.url, &place.opts).expect("store");
    let repo = Repository::open(store, PASS).await.expect("open");
    Engine::new(repo, Index::temporary().expect("index")).with_session_options(SessionOptions {
        poll: Duration::from_millis(50),
        sweep_wait: Duration::from_secs(120),
    })
}

/// 1 MiB of content named by `tag`.
fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; MIB as usize];
    Rng::new(tag).fill(&mut b);
    b
}

/// A volume whose blocks have the given contents.
fn volume_of(tags: &[u64]) -> Volume {
    let mut v = Volume::generated(tags.len() as u64 * MIB, MIB as usize, 1);
    for (i, &t) in tags.iter().enumerate() {
        v.write(i as u64 * MIB, &block(t));
    }
    v
}

/// A stream reader that hands out bytes only as far as the test allows.
#[derive(Default)]
struct Gate {
    allowed: Mutex<usize>,
    cv: Condvar,
    reading: AtomicBool,
}

impl Gate {
    fn allow(&self, n: usize) {
        *self.allowed.lock().expect("gate") = n;
        self.cv.notify_all();
    }
}

struct GatedReader {
    data: Vec<u8>,
    pos: usize,
    gate: Arc<Gate>,
}

impl Read for GatedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.gate.reading.store(true, Ordering::SeqCst);
        let mut allowed = self.gate.allowed.lock().map_err(|_| std::io::Error::other("gate"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while self.pos >= (*allowed).min(self.data.len()) && self.pos < self.data.len() {
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other("the test never opened the gate"));
            }
            allowed = self
                .gate
                .cv
                .wait_timeout(allowed, Duration::from_millis(100))
                .map_err(|_| std::io::Error::other("gate"))?
                .0;
        }
        let end = (*allowed).min(self.data.len()).min(self.pos + buf.len());
        let n = end - self.pos;
        buf[..n].copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(n)
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn restores_to(e: &Engine, volume: &str, id: &str, expected: &str, dir: &std::path::Path) {
    let (_, m) = e
        .resolve(volume, &BackupSpec::parse(Some(&format!("id:{id}"))).expect("spec"))
        .await
        .expect("resolve");
    let out = dir.join(format!("{volume}-{id}.raw"));
    e.restore(m, Box::new(FileTarget::new(&out, true)), &RestoreOptions::default())
        .await
        .expect("restore");
    assert_eq!(hash_file(&out), expected, "restore of {volume}@{id}");
}

fn gc_opts() -> GcOptions {
    GcOptions {
        ack_timeout: Duration::from_secs(30),
        poll: Duration::from_millis(50),
        ..Default::default()
    }
}

/// A backup that deduplicated against a chunk no manifest referenced when GC started (an old
/// chunk of a forgotten backup) acknowledges the sweep: GC keeps that chunk, deletes the other
/// garbage, and the backup commits and restores bit-exactly afterwards.
async fn backup_during_gc_keeps_the_chunk_it_reused(place: Place) {
    let dir = tempfile::tempdir().expect("tmp");
    init(&place).await;
    let a = engine(&place).await;
    // "old": blocks 1 and 2; then forgotten: both chunks are garbage.
    let mut old = volume_of(&[1, 2]);
    let b_old = a
        .backup_stream(
            std::io::Cursor::new(old.diff("s1", Vec::new()).expect("diff")),
            StreamBackupOptions::new("old"),
        )
        .await
        .expect("old backup");
    a.repository().forget(&b_old.backup).await.expect("forget");
    let mut keep = volume_of(&[9]);
    a.backup_stream(
        std::io::Cursor::new(keep.diff("s1", Vec::new()).expect("diff")),
        StreamBackupOptions::new("keep"),
    )
    .await
    .expect("keep backup");

    // "new" reuses block 1's content; its stream stops after its first block.
    let mut new = volume_of(&[1, 3, 4]);
    let stream = new.diff("n1", Vec::new()).expect("diff");
    let gate = Arc::new(Gate::default());
    // Cut inside the second block's payload: only the first block can be finished.
    gate.allow(stream.len() - 2 * MIB as usize);
    let b = engine(&place).await;
    let heads = b.repository().store().request_counter().clone();
    let reader = GatedReader {
        data: stream.clone(),
        pos: 0,
        gate: gate.clone(),
    };
    let running = tokio::spawn({
        let b = b.clone();
        async move { b.backup_stream(reader, StreamBackupOptions::new("new")).await }
    });
    // It has decided to reuse block 1 (HEAD found it) before GC starts.
    wait_for("the backup's HEAD of the reused chunk", || heads.snapshot().head >= 1).await;

    let g = engine(&place).await;
    let report = g.gc(&gc_opts()).await.expect("gc");
    assert_eq!(report.candidates, 2, "{report:?}");
    assert_eq!(report.sessions_running, 1, "{report:?}");
    assert_eq!(report.sessions_acked, 1, "{report:?}");
    assert_eq!(report.kept_for_backups, 1, "{report:?}");
    assert_eq!(report.chunks_deleted, 1, "{report:?}");
    let id1 = g.repository().chunk_id(&block(1));
    let id2 = g.repository().chunk_id(&block(2));
    assert!(g.repository().chunk_exists(&id1).await.expect("head"));
    assert!(!g.repository().chunk_exists(&id2).await.expect("head"));

    gate.allow(usize::MAX);
    let committed = running.await.expect("join").expect("the backup commits after the GC");
    assert_eq!(committed.manifest.meta.stats.blocks_found_in_repo, 1);
    restores_to(&g, "new", &committed.manifest.meta.backup_id, &new.hash(), dir.path()).await;
    // A second GC deletes nothing: everything left is referenced.
    let again = g.gc(&gc_opts()).await.expect("gc again");
    assert_eq!((again.candidates, again.chunks_deleted), (0, 0), "{again:?}");
    let audit = g.audit(&Default::default()).await.expect("audit");
    assert!(audit.ok, "{audit:?}");
}

/// Proxmox Backup Server's PSA-2025-00019-1: an incremental reuses its parent's chunks while
/// the parent is deleted during GC. The incremental restores afterwards.
async fn incremental_whose_parent_is_pruned_during_gc_restores(place: Place) {
    let dir = tempfile::tempdir().expect("tmp");
    init(&place).await;
    let a = engine(&place).await;
    let mut v = volume_of(&[11, 12, 13]);
    let parent = a
        .backup_stream(
            std::io::Cursor::new(v.diff("p1", Vec::new()).expect("diff")),
            StreamBackupOptions::new("v"),
        )
        .await
        .expect("parent");
    // Block 2 rewritten whole (a partial write would be a delta on the parent's chunk, which
    // then stays needed).
    v.write(2 * MIB, &block(14));
    let stream = v.diff("p2", Vec::new()).expect("diff");
    let gate = Arc::new(Gate::default());
    let b = engine(&place).await;
    let reader = GatedReader {
        data: stream,
        pos: 0,
        gate: gate.clone(),
    };
    let running = tokio::spawn({
        let b = b.clone();
        async move { b.backup_stream(reader, StreamBackupOptions::new("v")).await }
    });
    // The incremental has read its parent and started reading its stream...
    wait_for("the incremental to start reading", || gate.reading.load(Ordering::SeqCst)).await;
    // ...when the parent is deleted and a GC runs.
    a.repository().forget(&parent.backup).await.expect("forget the parent");
    let g = engine(&place).await;
    let report = g.gc(&gc_opts()).await.expect("gc");
    assert_eq!(report.candidates, 3, "{report:?}");
    assert_eq!(report.sessions_acked, 1, "{report:?}");
    assert_eq!(
        report.chunks_deleted, 0,
        "every parent chunk is kept for the incremental: {report:?}"
    );
    gate.allow(usize::MAX);
    let inc = running.await.expect("join").expect("the incremental commits");
    assert_eq!(inc.manifest.meta.parent.as_deref(), Some(parent.manifest.meta.backup_id.as_str()));
    restores_to(&g, "v", &inc.manifest.meta.backup_id, &v.hash(), dir.path()).await;
    // Now the replaced chunk (block 2 of the parent) is garbage, and only it.
    let report = g.gc(&gc_opts()).await.expect("gc");
    assert_eq!(report.chunks_deleted, 1, "{report:?}");
    restores_to(&g, "v", &inc.manifest.meta.backup_id, &v.hash(), dir.path()).await;
}

/// A backup whose block arrives while a sweep that lists it runs waits for the sweep, then
/// uploads it again; a backup that never answers is fenced and cannot commit.
async fn a_paused_backup_is_fenced_and_commits_nothing(place: Place) {
    init(&place).await;
    let a = engine(&place).await;
    let mut old = volume_of(&[21]);
    let b_old = a
        .backup_stream(
            std::io::Cursor::new(old.diff("s1", Vec::new()).expect("diff")),
            StreamBackupOptions::new("old"),
        )
        .await
        .expect("old");
    a.repository().forget(&b_old.backup).await.expect("forget");
    // A backup whose watcher is far too slow to answer: as good as paused.
    let store = open_store(&place.url, &place.opts).expect("store");
    let repo = Repository::open(store, PASS).await.expect("open");
    let slow = Engine::new(repo, Index::temporary().expect("index")).with_session_options(SessionOptions {
        poll: Duration::from_secs(3600),
        sweep_wait: Duration::from_secs(10),
    });
    let mut new = volume_of(&[21, 22, 23]);
    let stream = new.diff("n1", Vec::new()).expect("diff");
    let gate = Arc::new(Gate::default());
    // Cut inside the second block's payload: only the first block can be finished.
    gate.allow(stream.len() - 2 * MIB as usize);
    let heads = slow.repository().store().request_counter().clone();
    let reader = GatedReader {
        data: stream,
        pos: 0,
        gate: gate.clone(),
    };
    let running = tokio::spawn({
        let slow = slow.clone();
        async move { slow.backup_stream(reader, StreamBackupOptions::new("new")).await }
    });
    wait_for("the paused backup's HEAD", || heads.snapshot().head >= 1).await;
    let g = engine(&place).await;
    let report = g
        .gc(&GcOptions {
            ack_timeout: Duration::from_millis(500),
            ..gc_opts()
        })
        .await
        .expect("gc");
    assert_eq!((report.sessions_fenced, report.chunks_deleted), (1, 1), "{report:?}");
    gate.allow(usize::MAX);
    let e = running.await.expect("join").expect_err("a fenced backup cannot commit");
    let mut text = e.to_string();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(text.contains("stopped by a garbage collection"), "{text}");
    assert_eq!(e.kind(), ferry_engine::ErrorKind::Transient, "{e}");
    // Nothing of it is visible; running it again works and restores.
    assert!(g.chain("new").await.expect("chain").backups.is_empty());
    let again = g
        .backup_stream(
            std::io::Cursor::new(volume_of(&[21, 22, 23]).diff("n1", Vec::new()).expect("diff")),
            StreamBackupOptions::new("new"),
        )
        .await
        .expect("the retry commits");
    // The chunk the GC deleted is uploaded again; the fenced attempt's own uploads are found.
    let st = &again.manifest.meta.stats;
    assert_eq!((st.blocks_new, st.blocks_found_in_repo), (1, 2), "{st:?}");
    let audit = g
        .audit(&ferry_engine::AuditOptions {
            read_data_percent: 100.0,
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(audit.ok, "{audit:?}");
    let _ = new.hash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_backup_during_gc_keeps_the_chunk_it_reused() {
    let dir = tempfile::tempdir().expect("tmp");
    backup_during_gc_keeps_the_chunk_it_reused(file_place(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rgw_backup_during_gc_keeps_the_chunk_it_reused() {
    backup_during_gc_keeps_the_chunk_it_reused(rgw_place()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_incremental_whose_parent_is_pruned_during_gc_restores() {
    let dir = tempfile::tempdir().expect("tmp");
    incremental_whose_parent_is_pruned_during_gc_restores(file_place(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rgw_incremental_whose_parent_is_pruned_during_gc_restores() {
    incremental_whose_parent_is_pruned_during_gc_restores(rgw_place()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_a_paused_backup_is_fenced_and_commits_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    a_paused_backup_is_fenced_and_commits_nothing(file_place(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rgw_a_paused_backup_is_fenced_and_commits_nothing() {
    a_paused_backup_is_fenced_and_commits_nothing(rgw_place()).await;
}

// ---- through the CLI ----

/// Chunk IDs a backup's manifest references (through the library).
fn refs_of(repo: &Repo, volume: &str) -> Vec<BTreeSet<ChunkId>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let opts = store_opts(repo);
        let store = open_store(&repo.url, &opts).expect("store");
        let r = Repository::open(store, crate::util::PASSWORD.as_bytes()).await.expect("open");
        let mut out = Vec::new();
        for b in r.list_backups(Some(volume)).await.expect("list") {
            let m = r.read_manifest(&b).await.expect("manifest");
            out.push(m.objects().collect());
        }
        out
    })
}

fn chunks_in(repo: &Repo) -> BTreeSet<ChunkId> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let store = open_store(&repo.url, &store_opts(repo)).expect("store");
        store
            .inner
            .list(Some(&"chunks".into()))
            .try_filter_map(|m| async move { Ok(m.location.filename().and_then(ChunkId::from_hex)) })
            .try_collect()
            .await
            .expect("list")
    })
}

pub(crate) fn store_opts(repo: &Repo) -> StoreOptions {
    let var = |k: &str| repo.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    StoreOptions {
        endpoint: var("AWS_ENDPOINT"),
        region: var("AWS_REGION"),
        allow_http: var("AWS_ALLOW_HTTP").map(|_| true),
        access_key_id: var("AWS_ACCESS_KEY_ID"),
        secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
        ..Default::default()
    }
}

/// Prune keep-last 3 of 5, then gc: three manifests remain, exactly the pruned backups'
/// unique chunks are deleted, every remaining backup restores bit-exactly (also with the
/// index deleted), and a second gc finds nothing.
fn prune_then_gc_frees_exactly_the_pruned_chunks(repo: Repo) {
    let mut v = Volume::generated(6 * MIB + 4321, MIB as usize, 5);
    let (mut ids, mut hashes) = (Vec::new(), Vec::new());
    for i in 1..=5u64 {
        if i > 1 {
            v.write((i - 1) * MIB + 100, &block(100 + i)[..300_000]);
        }
        let j = repo.backup_bytes("v", &v.diff(&format!("s{i}"), Vec::new()).expect("diff"));
        ids.push(j["backup_id"].as_str().expect("id").to_string());
        hashes.push(v.hash());
    }
    let refs = refs_of(&repo, "v");
    let kept: BTreeSet<ChunkId> = refs[2..].iter().flatten().copied().collect();
    let pruned: BTreeSet<ChunkId> = refs[..2].iter().flatten().copied().filter(|c| !kept.contains(c)).collect();
    assert!(!pruned.is_empty());
    assert_eq!(chunks_in(&repo).len(), kept.len() + pruned.len());

    repo.ok(&["prune", "v", "--keep-last", "3"]);
    // A grace period keeps young garbage (a margin the protocol does not need).
    let young = repo.json(&["gc", "--grace", "1h"]);
    assert_eq!(
        (young["kept_young"].as_u64(), young["chunks_deleted"].as_u64()),
        (Some(pruned.len() as u64), Some(0)),
        "{young}"
    );
    let dry = repo.json(&["gc", "--dry-run"]);
    assert_eq!(dry["candidates"], pruned.len(), "{dry}");
    assert_eq!(chunks_in(&repo).len(), kept.len() + pruned.len(), "a dry run deletes nothing");
    let j = repo.json(&["gc"]);
    assert_eq!(j["chunks_deleted"], pruned.len(), "{j}");
    assert_eq!(j["manifests"], 3, "{j}");
    assert!(j["bytes_freed"].as_u64().expect("bytes") > 0, "{j}");
    assert!(j["requests"]["delete"].as_u64().unwrap_or(0) >= 1, "{j}");
    assert_eq!(chunks_in(&repo), kept, "exactly the pruned backups' unique chunks are gone");
    for (id, h) in ids.iter().zip(&hashes).skip(2) {
        let out = repo.path(&format!("{id}.raw"));
        repo.ok(&["restore", &format!("v@id:{id}"), "--to", out.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&out), h);
        std::fs::remove_dir_all(repo.path("index")).ok();
        repo.ok(&["restore", &format!("v@id:{id}"), "--to", out.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&out), h, "with the index deleted");
    }
    repo.ok(&["audit", "--read-data"]);
    let again = repo.json(&["gc"]);
    assert_eq!(
        (again["candidates"].as_u64(), again["chunks_deleted"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );
    // The chain goes on after GC (the index's chunk entries from before it are re-checked).
    v.write(100, &block(999)[..5000]);
    repo.backup_bytes("v", &v.diff("s6", Vec::new()).expect("diff"));
    let out = repo.path("s6.raw");
    repo.ok(&["restore", "v", "--to", out.to_str().expect("utf8")]);
    assert_eq!(hash_file(&out), v.hash());
}

#[test]
fn file_prune_then_gc_frees_exactly_the_pruned_chunks() {
    prune_then_gc_frees_exactly_the_pruned_chunks(Repo::file(&["--block-size", "1M"]));
}

#[test]
fn rgw_prune_then_gc_frees_exactly_the_pruned_chunks() {
    let c = cluster();
    c.bucket("ferry-tests");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("s3://ferry-tests/{}", crate::util::unique("gc"));
    prune_then_gc_frees_exactly_the_pruned_chunks(Repo::at(dir, url, c.env.clone(), &["--block-size", "1M"]));
}

fn chunk_count(repo: &Repo) -> usize {
    chunks_in(repo).len()
}

/// A GC's generation objects as listed (`gc/<gen>/<what>`).
fn gc_objects(repo: &Repo) -> BTreeSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let store = open_store(&repo.url, &store_opts(repo)).expect("store");
        store
            .inner
            .list(Some(&"gc".into()))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list")
    })
}

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A CLI backup of `stream` whose stdin stays open after `first` bytes (a backup that runs
/// as long as the test wants), watching for GC every `watch` seconds.
fn held_backup(repo: &Repo, volume: &str, stream: &[u8], first: usize, watch: &str) -> (std::process::Child, std::process::ChildStdin) {
    use std::io::Write;
    let mut child = repo
        .cmd(&["backup", "--volume", volume, "--diff", "-", "--gc-watch", watch])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn backup");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&stream[..first]).expect("feed the backup");
    stdin.flush().expect("flush");
    (child, stdin)
}

fn five_then_prune(repo: &Repo) -> Vec<(String, String)> {
    let mut kept = Vec::new();
    for i in 1..=5u64 {
        let mut v = volume_of(&[i, 10 + i, 20 + i, 7]);
        let j = repo.backup_bytes("v", &v.diff("s", Vec::new()).expect("diff"));
        kept.push((j["backup_id"].as_str().expect("id").to_string(), v.hash()));
    }
    repo.ok(&["prune", "v", "--keep-last", "2"]);
    kept.split_off(3)
}

fn restore_all(repo: &Repo, kept: &[(String, String)]) {
    for (id, h) in kept {
        let out = repo.path(&format!("{id}.raw"));
        repo.ok(&["restore", &format!("v@id:{id}"), "--to", out.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&out), h, "backup {id}");
    }
}

/// Two GCs at once: the second is refused while the first holds the claim (exit 5, naming
/// it); a backup that never answers is fenced by the first and fails saying so; a GC killed
/// mid-sweep is taken over by the next one (its process is gone), which finishes the job.
fn two_gcs_a_killed_gc_and_a_fenced_backup(repo: Repo) {
    five_then_prune(&repo);
    let before = chunk_count(&repo);
    // A backup that will not answer (it looks for GC once an hour).
    let mut v = volume_of(&[31, 32, 33, 34]);
    let stream = v.diff("h1", Vec::new()).expect("diff");
    let first = stream.len() - MIB as usize + 10;
    let (held, mut stdin) = held_backup(&repo, "held", &stream, stream.len() - MIB as usize + 10, "3600");
    wait_until("the held backup's first chunks", 60, || chunk_count(&repo) >= before + 2);
    std::thread::sleep(Duration::from_millis(500));
    let held_chunks = (chunk_count(&repo) - before) as u64;

    // GC 1 waits for that backup's answer; GC 2 meanwhile is refused.
    let gc1 = repo
        .cmd(&["gc", "--json", "--ack-timeout", "6"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gc 1");
    wait_until("gc 1's sweep", 60, || gc_objects(&repo).iter().any(|k| k.ends_with("/sweep")));
    let err = repo.fails(&["gc"], 5);
    assert!(err.contains("garbage collection 1 is running"), "{err}");
    let out = gc1.wait_with_output().expect("gc 1");
    assert!(out.status.success(), "gc 1: {}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["sessions_fenced"], 1, "{j}");
    assert_eq!(
        j["chunks_deleted"].as_u64(),
        Some(9 + held_chunks),
        "the pruned backups' 3 unique chunks each, and the fenced backup's: {j}"
    );
    // The fenced backup fails once it tries to commit, and says why.
    std::io::Write::write_all(&mut stdin, &stream[first..]).expect("the rest of the stream");
    drop(stdin);
    let out = held.wait_with_output().expect("held backup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stopped by a garbage collection"), "{err}");

    // Garbage again (the fenced backup's chunks and two more pruned backups)...
    for i in 6..=7u64 {
        let mut v = volume_of(&[i, 10 + i, 20 + i, 7]);
        repo.backup_bytes("v", &v.diff("s", Vec::new()).expect("diff"));
    }
    repo.ok(&["prune", "v", "--keep-last", "2"]);
    // ...and a GC killed while it deletes slowly.
    let mut gc2 = repo
        .cmd(&["gc", "--json"])
        .env("FERRY_TEST_FAULTS", "delete:chunks/*:slow=700ms")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn gc 2");
    let at = chunk_count(&repo);
    wait_until("gc 2's first delete", 60, || chunk_count(&repo) < at);
    gc2.kill().expect("kill -9 gc 2");
    gc2.wait().expect("reap gc 2");
    assert!(!gc_objects(&repo).contains(&format!("gc/{:020}/end", 2)));
    let j = repo.json(&["gc", "--ack-timeout", "1"]);
    assert_eq!(j["took_over"], 2, "{j}");
    assert_eq!(j["generation"], 3, "{j}");
    assert!(j["chunks_deleted"].as_u64().expect("n") > 0, "{j}");
    let last = repo.backups("v");
    let kept: Vec<(String, String)> = last
        .iter()
        .map(|b| b["backup_id"].as_str().expect("id").to_string())
        .zip([6u64, 7].map(|i| volume_of(&[i, 10 + i, 20 + i, 7]).hash()))
        .collect();
    restore_all(&repo, &kept);
    repo.ok(&["audit", "--read-data"]);
    let again = repo.json(&["gc"]);
    assert_eq!(again["chunks_deleted"], 0, "{again}");
}

#[test]
fn file_two_gcs_a_killed_gc_and_a_fenced_backup() {
    two_gcs_a_killed_gc_and_a_fenced_backup(Repo::file(&["--block-size", "1M"]));
}

#[test]
fn rgw_two_gcs_a_killed_gc_and_a_fenced_backup() {
    let c = cluster();
    c.bucket("ferry-tests");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("s3://ferry-tests/{}", crate::util::unique("gc"));
    two_gcs_a_killed_gc_and_a_fenced_backup(Repo::at(dir, url, c.env.clone(), &["--block-size", "1M"]));
}

/// A backup killed mid-upload: while it runs and answers, GC keeps its chunks; once it is
/// dead, the next GC fences it and collects them.
fn killed_backup_chunks_are_collected_only_once_it_cannot_commit(repo: Repo) {
    let kept = five_then_prune(&repo);
    let mut v = volume_of(&[41, 42, 43, 44]);
    let stream = v.diff("k1", Vec::new()).expect("diff");
    let before = chunk_count(&repo);
    let (mut child, stdin) = held_backup(&repo, "killed", &stream, stream.len() - MIB as usize + 10, "0.2");
    wait_until("the backup's first chunks", 60, || chunk_count(&repo) >= before + 2);
    std::thread::sleep(Duration::from_millis(500));
    let uploaded = (chunk_count(&repo) - before) as u64;
    let j = repo.json(&["gc", "--ack-timeout", "30"]);
    assert_eq!(
        (j["sessions_acked"].as_u64(), j["sessions_fenced"].as_u64()),
        (Some(1), Some(0)),
        "{j}"
    );
    assert_eq!(j["chunks_deleted"], 9, "only the pruned backups' chunks: {j}");
    assert_eq!(j["kept_for_backups"].as_u64(), Some(uploaded), "{j}");
    child.kill().expect("kill -9 the backup");
    child.wait().expect("reap");
    drop(stdin);
    let j = repo.json(&["gc", "--ack-timeout", "1"]);
    assert_eq!(j["sessions_fenced"], 1, "{j}");
    assert_eq!(j["chunks_deleted"].as_u64(), Some(uploaded), "the dead backup's chunks: {j}");
    restore_all(&repo, &kept);
    repo.ok(&["audit", "--read-data"]);
}

#[test]
fn file_killed_backup_chunks_are_collected_only_once_it_cannot_commit() {
    killed_backup_chunks_are_collected_only_once_it_cannot_commit(Repo::file(&["--block-size", "1M"]));
}

#[test]
fn rgw_killed_backup_chunks_are_collected_only_once_it_cannot_commit() {
    let c = cluster();
    c.bucket("ferry-tests");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("s3://ferry-tests/{}", crate::util::unique("gc"));
    killed_backup_chunks_are_collected_only_once_it_cannot_commit(Repo::at(dir, url, c.env.clone(), &["--block-size", "1M"]));
}

/// Backups, prunes and GCs of the same content in a loop (two GC loops, so claims collide):
/// every committed backup still listed restores bit-exactly, audit reads every chunk clean,
/// and a final quiet GC leaves exactly the chunks the manifests reference.
/// `FERRY_GC_LOOP_SECS` sets the duration (default 40).
fn backups_prunes_and_gcs_in_a_loop(repo: Repo) {
    use std::sync::atomic::AtomicU64;
    let secs: u64 = std::env::var("FERRY_GC_LOOP_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    let repo = Arc::new(repo);
    // Content cycles through a few block versions, so pruned chunks come back.
    let tags = |i: u64| [1 + i % 3, 10 + i % 2, 20 + (i / 2) % 3, 7];
    let committed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let (fenced, gcs, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while std::time::Instant::now() < end {
                let mut v = volume_of(&tags(i));
                let f = repo.path(&format!("loop-{i}.diff"));
                std::fs::write(&f, v.diff("s", Vec::new()).expect("diff")).expect("write");
                let out = repo.run(&[
                    "backup",
                    "--volume",
                    "loop",
                    "--diff",
                    f.to_str().expect("utf8"),
                    "--json",
                    "--gc-watch",
                    "0.2",
                ]);
                let _ = std::fs::remove_file(&f);
                if out.status.success() {
                    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
                    committed
                        .lock()
                        .expect("lock")
                        .push((j["backup_id"].as_str().expect("id").to_string(), v.hash()));
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(err.contains("stopped by a garbage collection"), "backup {i}: {err}");
                    fenced.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        });
        s.spawn(|| {
            while std::time::Instant::now() < end {
                let out = repo.run(&["prune", "loop", "--keep-last", "2"]);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success() || err.contains("no backups"), "prune: {err}");
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        for _ in 0..2 {
            s.spawn(|| {
                while std::time::Instant::now() < end {
                    let out = repo.run(&["gc", "--ack-timeout", "20"]);
                    match out.status.code() {
                        Some(0) => gcs.fetch_add(1, Ordering::Relaxed),
                        Some(5) => refused.fetch_add(1, Ordering::Relaxed),
                        _ => panic!("gc: {}", String::from_utf8_lossy(&out.stderr)),
                    };
                }
            });
        }
    });
    let committed = committed.lock().expect("lock").clone();
    eprintln!(
        "loop: {} backups committed, {} fenced, {} GCs ran, {} refused (another running)",
        committed.len(),
        fenced.load(Ordering::Relaxed),
        gcs.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    assert!(committed.len() >= 3 && gcs.load(Ordering::Relaxed) >= 2, "the loop did too little");
    let listed: BTreeSet<String> = repo
        .backups("loop")
        .iter()
        .map(|b| b["backup_id"].as_str().expect("id").to_string())
        .collect();
    let still: Vec<(String, String)> = committed.into_iter().filter(|(id, _)| listed.contains(id)).collect();
    assert!(!still.is_empty());
    for (id, h) in &still {
        let out = repo.path(&format!("{id}.raw"));
        repo.ok(&["restore", &format!("loop@id:{id}"), "--to", out.to_str().expect("utf8"), "--force"]);
        assert_eq!(&hash_file(&out), h, "backup {id}");
    }
    repo.ok(&["audit", "--read-data"]);
    repo.ok(&["gc"]);
    let referenced: BTreeSet<ChunkId> = refs_of(&repo, "loop").into_iter().flatten().collect();
    assert_eq!(chunks_in(&repo), referenced, "after a quiet GC only referenced chunks remain");
}

#[test]
fn file_backups_prunes_and_gcs_in_a_loop() {
    backups_prunes_and_gcs_in_a_loop(Repo::file(&["--block-size", "1M"]));
}

#[test]
fn rgw_backups_prunes_and_gcs_in_a_loop() {
    let c = cluster();
    c.bucket("ferry-tests");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("s3://ferry-tests/{}", crate::util::unique("gc"));
    backups_prunes_and_gcs_in_a_loop(Repo::at(dir, url, c.env.clone(), &["--block-size", "1M"]));
}
