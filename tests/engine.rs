//! The engine's Rust API, with no CLI: a full backup, an incremental and restores, observed.

use std::sync::Arc;

use ferry_engine::{Engine, FileTarget, Recorder, RestoreOptions, StreamBackupOptions, StreamFormat, StreamTarget};
use ferry_repo::{open_store, BackupSpec, Index, InitOptions, KdfParams, Repository, StoreOptions};
use ferry_testdata::Volume;

const MIB: u64 = 1 << 20;

async fn engine(dir: &std::path::Path, recorder: Arc<Recorder>) -> Engine {
    let url = format!("file://{}/repo", dir.display());
    let store = open_store(&url, &StoreOptions::default()).expect("store");
    let opts = InitOptions {
        block_size: ferry_repo::BlockSize::new(MIB).expect("1 MiB"),
        kdf: KdfParams::argon2id_fast(),
        ..Default::default()
    };
    let repo = Repository::init(store, b"pass", opts).await.expect("init");
    let index = Index::open(&dir.join("index"), repo.id()).expect("index");
    Engine::new(repo, index).with_observer(recorder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_and_restore_through_the_api() {
    let dir = tempfile::tempdir().expect("tmp");
    let rec = Recorder::new();
    let engine = engine(dir.path(), rec.clone()).await;

    let mut v = Volume::generated(5 * MIB + 333, 1 << 20, 11);
    let full = v.diff("s1", Vec::new()).expect("diff");
    let mut opts = StreamBackupOptions::new("api");
    opts.total = Some(full.len() as u64);
    let b1 = engine
        .backup_stream(std::io::Cursor::new(full), opts.clone())
        .await
        .expect("full backup");
    assert_eq!(b1.manifest.meta.from_snap, None);
    assert_eq!(b1.manifest.meta.to_snap.as_deref(), Some("s1"));
    let h1 = v.hash();

    v.write(2 * MIB + 17, &[0x5a; 3000]);
    v.discard(4 * MIB, MIB);
    let inc = v.diff("s2", Vec::new()).expect("diff");
    let b2 = engine.backup_stream(std::io::Cursor::new(inc), opts).await.expect("incremental");
    assert_eq!(b2.manifest.meta.parent.as_deref(), Some(b1.manifest.meta.backup_id.as_str()));
    assert_eq!(b2.manifest.meta.stats.blocks_partial, 1, "{:?}", b2.manifest.meta.stats);

    let events = rec.events();
    let count = |needle: &str| events.iter().filter(|e| e.contains(needle)).count();
    assert_eq!(count("Started { op: Backup"), 2, "{events:#?}");
    assert_eq!(count("Finished { op: Backup"), 2, "{events:#?}");
    assert_eq!(count("Committed"), 2, "{events:#?}");
    assert!(count("Progress { op: Backup") >= 2, "{events:#?}");

    // Restore both, by snapshot and by ID, to a file and to an in-memory stream.
    let (_, m1) = engine
        .resolve("api", &BackupSpec::parse(Some("snap:s1")).expect("spec"))
        .await
        .expect("resolve");
    let out = dir.path().join("s1.raw");
    let rep = engine
        .restore(m1, Box::new(FileTarget::new(&out, false)), &RestoreOptions::default())
        .await
        .expect("restore s1");
    assert_eq!(rep.image_size, 5 * MIB + 333);
    assert_eq!(blake3::hash(&std::fs::read(&out).expect("read")).to_hex().to_string(), h1);

    let (_, m2) = engine
        .resolve("api", &BackupSpec::Id(b2.manifest.meta.backup_id.clone()))
        .await
        .expect("resolve");
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    engine
        .restore(
            m2,
            Box::new(StreamTarget::new("memory", Box::new(Sink(buf.clone())), StreamFormat::Raw, None)),
            &RestoreOptions::default(),
        )
        .await
        .expect("restore s2");
    assert_eq!(blake3::hash(&buf.lock().expect("lock")).to_hex().to_string(), v.hash());
    let events = rec.events();
    assert_eq!(events.iter().filter(|e| e.contains("Finished { op: Restore")).count(), 2);
    assert!(events
        .iter()
        .any(|e| e.contains(&format!("Progress {{ op: Restore, done: {} }}", 5 * MIB + 333))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chain_is_refused_with_its_kind() {
    let dir = tempfile::tempdir().expect("tmp");
    let engine = engine(dir.path(), Recorder::new()).await;
    let mut v = Volume::generated(MIB, 1 << 20, 3);
    v.diff("s1", Vec::new()).expect("diff");
    v.write(10, b"x");
    let inc = v.diff("s2", Vec::new()).expect("diff");
    let err = engine
        .backup_stream(std::io::Cursor::new(inc), StreamBackupOptions::new("api"))
        .await
        .expect_err("an incremental without a base");
    assert_eq!(err.kind(), ferry_engine::ErrorKind::Refused, "{err}");
    let err = engine.resolve("api", &BackupSpec::Latest).await.expect_err("no backups");
    assert_eq!(err.kind(), ferry_engine::ErrorKind::Refused, "{err}");
}

/// What a run costs on the store, counted by the request counter: exact for a known backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counts_of_a_known_backup_are_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let engine = engine(dir.path(), Recorder::new()).await;
    let store = engine.repository().store().clone();
    // 4 blocks of distinct random data, one all-zero block, one block repeating block 0.
    let mut v = Volume::generated(6 * MIB, 1 << 20, 5);
    let mut rng = ferry_testdata::Rng::new(99);
    let mut b0 = vec![0u8; MIB as usize];
    rng.fill(&mut b0);
    v.write(0, &b0);
    for i in 1..4 {
        let mut b = vec![0u8; MIB as usize];
        rng.fill(&mut b);
        v.write(i * MIB, &b);
    }
    v.write_zeros(4 * MIB, MIB);
    v.write(5 * MIB, &b0);
    let before = store.requests();
    let b1 = engine
        .backup_stream(
            std::io::Cursor::new(v.diff("s1", Vec::new()).expect("diff")),
            StreamBackupOptions::new("count"),
        )
        .await
        .expect("full");
    let r = store.requests().since(&before);
    // Three LISTs (gc/ and quarantine/ when the session begins, then the index sync), one
    // HEAD per distinct new chunk (dedup check), one PUT per distinct new chunk, one for the
    // manifest and two for the session (its record before, its end after); nothing read.
    assert_eq!((r.list, r.head, r.put, r.get, r.delete), (3, 4, 7, 0, 0), "{r:?}");
    assert_eq!(b1.manifest.meta.stats.blocks_new, 4);
    assert_eq!(b1.manifest.meta.stats.blocks_dedup, 1);
    assert_eq!(b1.manifest.meta.stats.blocks_zero, 1);
    // Bytes up: the encoded chunks plus the sealed manifest, as stored.
    let manifest_len = std::fs::metadata(dir.path().join("repo").join(b1.backup.key()))
        .expect("manifest file")
        .len();
    let session_dir = dir.path().join("repo/sessions/count").join(&b1.backup.name);
    let session_len: u64 = ["session", "end"]
        .iter()
        .map(|f| std::fs::metadata(session_dir.join(f)).expect("session object").len())
        .sum();
    assert_eq!(
        r.bytes_up,
        b1.manifest.meta.stats.bytes_uploaded + manifest_len + session_len,
        "{r:?}"
    );

    // An incremental rewriting two whole blocks with new data and one block partly: the head
    // manifest is read (1 GET), the partly written block is completed from its parent chunk
    // (1 GET), three new contents are checked (HEAD) and written — two chunks and one delta
    // object of the 7 changed bytes, PUT without a HEAD of its own — plus the manifest and the
    // session's two records; three LISTs as above.
    let mut b = vec![0u8; MIB as usize];
    rng.fill(&mut b);
    v.write(MIB, &b);
    rng.fill(&mut b);
    v.write(2 * MIB, &b);
    v.write(3 * MIB + 100, b"partial");
    let before = store.requests();
    let b2 = engine
        .backup_stream(
            std::io::Cursor::new(v.diff("s2", Vec::new()).expect("diff")),
            StreamBackupOptions::new("count"),
        )
        .await
        .expect("incremental");
    let r = store.requests().since(&before);
    assert_eq!((r.list, r.get, r.head, r.put, r.delete), (3, 2, 3, 6, 0), "{r:?}");
    let s = &b2.manifest.meta.stats;
    assert_eq!((s.blocks_new, s.blocks_delta, s.bytes_delta), (3, 1, 7), "{s:?}");
    assert_eq!(s.bytes_read_blocks, MIB);
    assert_eq!(b2.manifest.meta.format, ferry_repo::MANIFEST_FORMAT);
    assert_eq!(b2.manifest.deltas.len(), 1);
}

/// A manifest PUT that cannot be answered before the backup's lease would lapse is given up
/// and settled by the fence: nothing is committed, and no late copy of the manifest can land.
/// With no time left at all, nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_would_outlive_its_lease_is_fenced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}/repo", dir.path().display());
    let opts = InitOptions {
        kdf: KdfParams::argon2id_fast(),
        ..Default::default()
    };
    Repository::init(open_store(&url, &StoreOptions::default()).expect("store"), b"pass", opts)
        .await
        .expect("init");
    let slow = StoreOptions {
        faults: Some(ferry_repo::FaultPlan::parse("put:volumes/*/backups/*:slow=3s:times=1").expect("plan")),
        ..Default::default()
    };
    let repo = Repository::open(open_store(&url, &slow).expect("store"), b"pass")
        .await
        .expect("open");
    let draft = || ferry_repo::BackupDraft {
        volume: "v".into(),
        source: Default::default(),
        from_snap: None,
        to_snap: Some("s1".into()),
        parent: None,
        follows: None,
        seq: None,
        image_size: 0,
        block_size: repo.config().block_size,
        labels: Default::default(),
        protected: false,
        stats: Default::default(),
        blocks: Vec::new(),
        deltas: Default::default(),
    };
    let session = ferry_repo::Session::begin(&repo, "v", Default::default()).await.expect("session");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    let t = std::time::Instant::now();
    let err = repo
        .commit_within(draft(), &session, Some(deadline))
        .await
        .expect_err("not committed");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "the PUT was not given up at the deadline"
    );
    assert!(err.to_string().contains("lease would lapse"), "{err}");
    // The name is fenced: the slow PUT can never land a manifest there.
    let r = session.backup().clone();
    assert!(matches!(repo.read_manifest(&r).await, Err(ferry_repo::Error::Fenced { .. })));
    assert!(repo.list_volumes(None).await.expect("list").backups.is_empty());
    // No time left: nothing is sent at all.
    let session = ferry_repo::Session::begin(&repo, "v", Default::default()).await.expect("session");
    let past = tokio::time::Instant::now();
    let err = repo.commit_within(draft(), &session, Some(past)).await.expect_err("not committed");
    assert!(err.to_string().contains("nothing was sent"), "{err}");
    assert!(matches!(
        repo.read_manifest(session.backup()).await,
        Err(ferry_repo::Error::NotFound { .. })
    ));
}
