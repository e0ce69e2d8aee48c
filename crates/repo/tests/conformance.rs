//! One conformance suite for every object store ferry can open, written once and run through
//! ferry's own `open_store(url, opts)` (so the URL parsing, the bucket prefix and the
//! decorators are part of what is proven).
//!
//! Backends:
//! - `memory://` and `file://<tempdir>`: always.
//! - `s3://`: `FERRY_CONFORMANCE_S3=s3://BUCKET[/PREFIX]` plus the standard `AWS_*` variables
//!   (`scripts/ceph-dev env`: RGW on 127.0.0.1; the bucket from `scripts/ceph-dev bucket`).
//! - `az://`: `FERRY_CONFORMANCE_AZ=az://CONTAINER`, `FERRY_CONFORMANCE_AZ_ENDPOINT` (the blob
//!   account URL, e.g. Azurite's `http://127.0.0.1:10000/devstoreaccount1`), plus
//!   `AZURE_STORAGE_ACCOUNT_NAME` / `AZURE_STORAGE_ACCOUNT_KEY`.
//! - `gs://`: `FERRY_CONFORMANCE_GS=gs://BUCKET`, `FERRY_CONFORMANCE_GS_ENDPOINT` (base URL of
//!   an emulator), plus credentials from the standard `GOOGLE_*` variables (for an emulator:
//!   `GOOGLE_SKIP_SIGNATURE=true`).
//!
//! `scripts/emulators env DIR` prints the az/gs settings for the emulators it runs. Which
//! implementation answers decides what the suite expects of it:
//! `FERRY_CONFORMANCE_GS_IMPL=gcp-storage-emulator` / `FERRY_CONFORMANCE_AZ_IMPL=azurite`
//! (unset: the real service, held to the full contract).
//!
//! With `FERRY_CONFORMANCE_REQUIRE_ALL=1` a remote backend without its variables FAILS (CI
//! must never skip silently); without it, it is skipped with a note.
//!
//! Each run works under a fresh prefix (`conformance/<time>-<pid>-<random>`) and deletes what
//! it wrote where the backend can delete.
//!
//! What each backend does differently is written down in [`Profile`]: what a DELETE of a
//! missing key returns, and the checks an implementation is known to fail, each with a piece
//! of the error it must show. A known failure that starts passing fails the suite too, so the
//! table in README.md ("Object stores: what was proven") cannot silently go stale.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use ferry_repo::{open_store, RequestStats, Store, StoreOptions};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// What a DELETE of a key that does not exist returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeleteMissing {
    Ok,
    NotFound,
}

/// What the suite expects of one implementation.
struct Profile {
    /// e.g. "Ceph RGW", "Azurite", "gcp-storage-emulator".
    implementation: &'static str,
    delete_missing: DeleteMissing,
    /// Checks that fail on this implementation, with a piece of the error message each
    /// failure must contain.
    known_failures: &'static [(&'static str, &'static str)],
}

const FULL: &[(&str, &str)] = &[];

/// object_store's Azure client refuses suffix ranges itself (`NotSupported`, before any
/// request): true of Azurite and of Azure alike. ferry never asks for one.
const AZURE: &[(&str, &str)] = &[("range_suffix", "Azure does not support suffix range requests")];

/// gcp-storage-emulator (PyPI 2026.7.19) against object_store 0.14.2's GCS client, which
/// speaks only the XML API (`BASE/BUCKET/OBJECT`):
/// - its XML PUT stores the object but answers 200 **without an ETag header**, and
///   object_store rejects that response, so no object can be written (every check that
///   starts with a PUT fails there); it would also ignore `x-goog-if-generation-match: 0`
///   (create-only), which it does not read;
/// - it has no HEAD handler and no XML DELETE or XML listing route: 501 Not Implemented;
/// - a GET of a missing object is a 404, which object_store maps to `NotFound`.
const GCP_STORAGE_EMULATOR: &[(&str, &str)] = &[
    ("put_get", "ETag Header missing from response"),
    ("head", "ETag Header missing from response"),
    ("create_only", "ETag Header missing from response"),
    ("range_bounded", "ETag Header missing from response"),
    ("range_offset", "ETag Header missing from response"),
    ("range_suffix", "ETag Header missing from response"),
    ("range_past_end", "ETag Header missing from response"),
    ("list_prefix", "ETag Header missing from response"),
    ("list_delimiter", "ETag Header missing from response"),
    ("delete", "ETag Header missing from response"),
    ("delete_missing", "501 Not Implemented"),
    ("not_found_head", "501 Not Implemented"),
    ("count_put_get", "ETag Header missing from response"),
    ("count_head_list_delete", "ETag Header missing from response"),
];

struct Backend {
    name: &'static str,
    /// URL of the repository root for this run (a fresh prefix for remote stores).
    url: String,
    opts: StoreOptions,
    profile: Profile,
    _dir: Option<tempfile::TempDir>,
}

fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!("{ms}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

fn base_opts() -> StoreOptions {
    StoreOptions {
        // Local servers: a slow retry loop would only hide what the server answered.
        max_retries: Some(1),
        retry_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    }
}

/// A remote backend from its environment, or `None` (skip) / panic (with REQUIRE_ALL).
fn remote(name: &'static str, var: &str, scheme: &str) -> Option<Backend> {
    let require = std::env::var("FERRY_CONFORMANCE_REQUIRE_ALL").is_ok_and(|v| v == "1");
    let Ok(url) = std::env::var(var) else {
        if require {
            panic!(
                "{name}: {var} is not set, and FERRY_CONFORMANCE_REQUIRE_ALL=1 forbids skipping \
                 (scripts/test sets it up; see crates/repo/tests/conformance.rs)"
            );
        }
        eprintln!("conformance {name}: SKIPPED ({var} not set; FERRY_CONFORMANCE_REQUIRE_ALL=1 makes this a failure)");
        return None;
    };
    assert!(url.starts_with(scheme), "{var}={url} must start with {scheme}");
    let mut opts = base_opts();
    if let Ok(e) = std::env::var(format!("{var}_ENDPOINT")) {
        opts.allow_http = e.starts_with("http://").then_some(true);
        opts.endpoint = Some(e);
    }
    let implementation = std::env::var(format!("{var}_IMPL")).unwrap_or_default();
    let profile = match (name, implementation.as_str()) {
        ("s3", _) => Profile {
            implementation: "S3 (Ceph RGW in CI)",
            delete_missing: DeleteMissing::Ok,
            known_failures: FULL,
        },
        ("az", "azurite") => Profile {
            implementation: "Azurite",
            delete_missing: DeleteMissing::NotFound,
            known_failures: AZURE,
        },
        ("az", "") => Profile {
            implementation: "Azure Blob Storage",
            delete_missing: DeleteMissing::NotFound,
            known_failures: AZURE,
        },
        ("gs", "gcp-storage-emulator") => Profile {
            implementation: "gcp-storage-emulator",
            delete_missing: DeleteMissing::NotFound,
            known_failures: GCP_STORAGE_EMULATOR,
        },
        ("gs", "") => Profile {
            implementation: "Google Cloud Storage",
            delete_missing: DeleteMissing::NotFound,
            known_failures: FULL,
        },
        (_, other) => panic!("{var}_IMPL={other}: no profile for this implementation"),
    };
    Some(Backend {
        name,
        url: format!("{}/conformance/{}", url.trim_end_matches('/'), run_id()),
        opts,
        profile,
        _dir: None,
    })
}

fn p(s: &str) -> Path {
    Path::from(s)
}

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

/// Deterministic content of `n` bytes, different per `seed`.
fn data(seed: u8, n: usize) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn err(what: &str, e: object_store::Error) -> String {
    format!("{what}: {e}")
}

async fn get_bytes(s: &dyn ObjectStore, key: &str) -> Result<Bytes, String> {
    let r = s.get(&p(key)).await.map_err(|e| err(&format!("GET {key}"), e))?;
    r.bytes().await.map_err(|e| err(&format!("GET {key} body"), e))
}

async fn put(s: &dyn ObjectStore, key: &str, body: Bytes) -> Check {
    s.put(&p(key), PutPayload::from(body))
        .await
        .map_err(|e| err(&format!("PUT {key}"), e))?;
    Ok(())
}

async fn check_put_get(s: &dyn ObjectStore, _: &Profile) -> Check {
    for (key, n) in [("pg/small", 17usize), ("pg/block", 1 << 20), ("pg/deep/er/key", 3)] {
        let body = data(n as u8, n);
        put(s, key, body.clone()).await?;
        let r = s.get(&p(key)).await.map_err(|e| err(&format!("GET {key}"), e))?;
        ensure!(r.meta.size == n as u64, "GET {key}: meta.size {} != {n}", r.meta.size);
        ensure!(r.range == (0..n as u64), "GET {key}: range {:?}", r.range);
        let got = r.bytes().await.map_err(|e| err("body", e))?;
        ensure!(got == body, "GET {key}: {} bytes differ from the {n} put", got.len());
    }
    // An overwrite (PutMode::Overwrite, the default) replaces the content.
    put(s, "pg/small", data(99, 5)).await?;
    ensure!(
        get_bytes(s, "pg/small").await? == data(99, 5),
        "overwrite did not replace the content"
    );
    Ok(())
}

async fn check_head(s: &dyn ObjectStore, _: &Profile) -> Check {
    put(s, "head/a", data(1, 1234)).await?;
    let m = s.head(&p("head/a")).await.map_err(|e| err("HEAD head/a", e))?;
    ensure!(m.size == 1234, "HEAD: size {}", m.size);
    ensure!(
        m.location == p("head/a"),
        "HEAD: location {} (the prefix must not leak)",
        m.location
    );
    Ok(())
}

async fn check_create_only(s: &dyn ObjectStore, _: &Profile) -> Check {
    let key = "co/x";
    s.put_opts(&p(key), data(1, 100).into(), create())
        .await
        .map_err(|e| err("first create-only PUT", e))?;
    match s.put_opts(&p(key), data(2, 50).into(), create()).await {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(err("second create-only PUT: expected AlreadyExists", e)),
        Ok(_) => {
            let now = get_bytes(s, key).await?;
            return Err(format!(
                "second create-only PUT succeeded (the object now holds {} bytes: {})",
                now.len(),
                if now == data(2, 50) { "overwritten" } else { "unchanged" }
            ));
        }
    }
    ensure!(get_bytes(s, key).await? == data(1, 100), "content changed after AlreadyExists");
    Ok(())
}

async fn ranged(s: &dyn ObjectStore, key: &str, range: GetRange) -> Result<(std::ops::Range<u64>, u64, Bytes), String> {
    let what = format!("ranged GET {key} {range}");
    let r = s
        .get_opts(&p(key), GetOptions::new().with_range(Some(range)))
        .await
        .map_err(|e| err(&what, e))?;
    let (range, size) = (r.range.clone(), r.meta.size);
    let body = r.bytes().await.map_err(|e| err(&what, e))?;
    Ok((range, size, body))
}

async fn check_range_bounded(s: &dyn ObjectStore, _: &Profile) -> Check {
    let body = data(7, 20);
    put(s, "rg/a", body.clone()).await?;
    let (range, size, got) = ranged(s, "rg/a", GetRange::Bounded(2..7)).await?;
    ensure!(range == (2..7) && size == 20, "range {range:?}, size {size}");
    ensure!(got == body.slice(2..7), "bytes 2..7 wrong: {got:?}");
    // get_range (ObjectStoreExt) is the same request.
    let got = s.get_range(&p("rg/a"), 19..20).await.map_err(|e| err("get_range 19..20", e))?;
    ensure!(got == body.slice(19..20), "last byte wrong");
    // A range running past the end is cut to the object.
    let (range, _, got) = ranged(s, "rg/a", GetRange::Bounded(15..1000)).await?;
    ensure!(
        range == (15..20) && got == body.slice(15..),
        "15..1000 gave {range:?} / {} bytes",
        got.len()
    );
    Ok(())
}

async fn check_range_offset(s: &dyn ObjectStore, _: &Profile) -> Check {
    let body = data(8, 20);
    put(s, "rg/b", body.clone()).await?;
    let (range, _, got) = ranged(s, "rg/b", GetRange::Offset(15)).await?;
    ensure!(range == (15..20) && got == body.slice(15..), "offset 15 gave {range:?}");
    Ok(())
}

async fn check_range_suffix(s: &dyn ObjectStore, _: &Profile) -> Check {
    let body = data(9, 20);
    put(s, "rg/c", body.clone()).await?;
    let (range, _, got) = ranged(s, "rg/c", GetRange::Suffix(4)).await?;
    ensure!(range == (16..20) && got == body.slice(16..), "suffix 4 gave {range:?}");
    Ok(())
}

async fn check_range_past_end(s: &dyn ObjectStore, _: &Profile) -> Check {
    put(s, "rg/d", data(10, 20)).await?;
    match ranged(s, "rg/d", GetRange::Bounded(25..30)).await {
        Err(_) => Ok(()),
        Ok((range, _, got)) => Err(format!("a range starting past the end succeeded: {range:?}, {} bytes", got.len())),
    }
}

async fn list_keys(s: &dyn ObjectStore, prefix: &str) -> Result<Vec<(String, u64)>, String> {
    let mut v: Vec<(String, u64)> = s
        .list(Some(&p(prefix)))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .map_err(|e| err(&format!("LIST {prefix}"), e))?;
    v.sort();
    Ok(v)
}

async fn check_list_prefix(s: &dyn ObjectStore, _: &Profile) -> Check {
    for (k, n) in [("ls/a/1", 1), ("ls/a/2", 2), ("ls/a/b/3", 3), ("ls/ab/4", 4)] {
        put(s, k, data(0, n)).await?;
    }
    let got = list_keys(s, "ls/a").await?;
    let want: Vec<(String, u64)> = [("ls/a/1", 1), ("ls/a/2", 2), ("ls/a/b/3", 3)]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    ensure!(got == want, "LIST ls/a (segment prefix, recursive): {got:?}");
    ensure!(list_keys(s, "ls/nothing").await?.is_empty(), "LIST of an empty prefix is not empty");
    Ok(())
}

async fn check_list_delimiter(s: &dyn ObjectStore, _: &Profile) -> Check {
    for k in ["ld/a/1", "ld/a/2", "ld/a/b/3", "ld/a/c/4"] {
        put(s, k, data(0, 1)).await?;
    }
    let r = s
        .list_with_delimiter(Some(&p("ld/a")))
        .await
        .map_err(|e| err("LIST ld/a with delimiter", e))?;
    let mut objects: Vec<String> = r.objects.iter().map(|m| m.location.to_string()).collect();
    let mut dirs: Vec<String> = r.common_prefixes.iter().map(|p| p.to_string()).collect();
    objects.sort();
    dirs.sort();
    ensure!(objects == ["ld/a/1", "ld/a/2"], "LIST with delimiter: objects {objects:?}");
    ensure!(dirs == ["ld/a/b", "ld/a/c"], "LIST with delimiter: common prefixes {dirs:?}");
    Ok(())
}

async fn check_delete(s: &dyn ObjectStore, _: &Profile) -> Check {
    put(s, "del/a", data(1, 10)).await?;
    s.delete(&p("del/a")).await.map_err(|e| err("DELETE del/a", e))?;
    match s.get(&p("del/a")).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(err("GET after DELETE: expected NotFound", e)),
        Ok(_) => Err("the object is still there after DELETE".into()),
    }
}

async fn check_delete_missing(s: &dyn ObjectStore, profile: &Profile) -> Check {
    let got = match s.delete(&p("del/never-existed")).await {
        Ok(()) => DeleteMissing::Ok,
        Err(object_store::Error::NotFound { .. }) => DeleteMissing::NotFound,
        Err(e) => return Err(err("DELETE of a missing key", e)),
    };
    ensure!(
        got == profile.delete_missing,
        "DELETE of a missing key gave {got:?}, the profile says {:?}",
        profile.delete_missing
    );
    Ok(())
}

async fn check_not_found_get(s: &dyn ObjectStore, _: &Profile) -> Check {
    match s.get(&p("nf/missing")).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(err("GET of a missing key: expected NotFound", e)),
        Ok(_) => Err("GET of a missing key succeeded".into()),
    }
}

async fn check_not_found_head(s: &dyn ObjectStore, _: &Profile) -> Check {
    match s.head(&p("nf/missing")).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(err("HEAD of a missing key: expected NotFound", e)),
        Ok(_) => Err("HEAD of a missing key succeeded".into()),
    }
}

/// The request counter over a known sequence of PUTs and GETs, on a store of its own.
async fn count_put_get(b: &Backend) -> Check {
    let store = open(b, "count-pg")?;
    let s = store.inner.as_ref();
    put(s, "a", data(1, 100)).await?;
    put(s, "b", data(2, 50)).await?;
    ensure!(get_bytes(s, "a").await?.len() == 100, "GET a");
    ensure!(
        s.get_range(&p("b"), 10..30).await.map_err(|e| err("get_range", e))?.len() == 20,
        "range"
    );
    // Answered AlreadyExists where create-only is honoured: either way not a failure.
    let _ = s.put_opts(&p("a"), data(3, 10).into(), create()).await;
    ensure!(s.get(&p("missing")).await.is_err(), "GET missing");
    let want = RequestStats {
        put: 3,
        get: 3,
        bytes_up: 160,
        bytes_down: 120,
        ..Default::default()
    };
    ensure!(store.requests() == want, "counted {:?}, expected {want:?}", store.requests());
    Ok(())
}

/// The request counter over HEAD, LIST and DELETE.
async fn count_head_list_delete(b: &Backend) -> Check {
    let store = open(b, "count-hld")?;
    let s = store.inner.as_ref();
    put(s, "x/1", data(1, 10)).await?;
    put(s, "x/2", data(2, 10)).await?;
    s.head(&p("x/1")).await.map_err(|e| err("HEAD x/1", e))?;
    ensure!(
        matches!(s.head(&p("x/none")).await, Err(object_store::Error::NotFound { .. })),
        "HEAD missing"
    );
    ensure!(list_keys(s, "x").await?.len() == 2, "LIST x");
    s.list_with_delimiter(None).await.map_err(|e| err("LIST /", e))?;
    s.delete(&p("x/1")).await.map_err(|e| err("DELETE x/1", e))?;
    s.delete(&p("x/2")).await.map_err(|e| err("DELETE x/2", e))?;
    let want = RequestStats {
        put: 2,
        head: 2,
        list: 2,
        delete: 2,
        bytes_up: 20,
        ..Default::default()
    };
    ensure!(store.requests() == want, "counted {:?}, expected {want:?}", store.requests());
    Ok(())
}

/// A store of its own under the run's prefix (`memory://` ignores the path: each open is a
/// new, empty store).
fn open(b: &Backend, sub: &str) -> Result<Store, String> {
    let url = match b.url.strip_suffix("://") {
        Some(scheme) => format!("{scheme}://{sub}"),
        None => format!("{}/{sub}", b.url.trim_end_matches('/')),
    };
    open_store(&url, &b.opts).map_err(|e| format!("open_store({url}): {e}"))
}

/// Runs every check, compares with the profile, prints a table, fails on any difference.
async fn run(b: Backend) {
    let store = open(&b, "checks").expect("open_store");
    let s = store.inner.as_ref();
    let mut results: Vec<(&str, Check)> = Vec::new();
    macro_rules! check {
        ($name:literal, $f:expr) => {
            results.push(($name, $f.await));
        };
    }
    check!("put_get", check_put_get(s, &b.profile));
    check!("head", check_head(s, &b.profile));
    check!("create_only", check_create_only(s, &b.profile));
    check!("range_bounded", check_range_bounded(s, &b.profile));
    check!("range_offset", check_range_offset(s, &b.profile));
    check!("range_suffix", check_range_suffix(s, &b.profile));
    check!("range_past_end", check_range_past_end(s, &b.profile));
    check!("list_prefix", check_list_prefix(s, &b.profile));
    check!("list_delimiter", check_list_delimiter(s, &b.profile));
    check!("delete", check_delete(s, &b.profile));
    check!("delete_missing", check_delete_missing(s, &b.profile));
    check!("not_found_get", check_not_found_get(s, &b.profile));
    check!("not_found_head", check_not_found_head(s, &b.profile));
    check!("count_put_get", count_put_get(&b));
    check!("count_head_list_delete", count_head_list_delete(&b));

    let mut report = format!("conformance {} ({}) at {}:\n", b.name, b.profile.implementation, b.url);
    let mut wrong = Vec::new();
    for (name, result) in &results {
        let known = b.profile.known_failures.iter().find(|(n, _)| n == name);
        let (verdict, ok) = match (result, known) {
            (Ok(()), None) => ("ok".to_string(), true),
            (Err(e), Some((_, needle))) if e.contains(needle) => (format!("known failure: {e}"), true),
            (Err(e), Some((_, needle))) => (format!("FAILED differently than known ('{needle}'): {e}"), false),
            (Err(e), None) => (format!("FAILED: {e}"), false),
            (Ok(()), Some(_)) => ("PASSED but listed as a known failure: update the profile and README".into(), false),
        };
        writeln!(report, "  {name:<24} {verdict}").unwrap();
        if !ok {
            wrong.push(*name);
        }
    }
    for (name, _) in b.profile.known_failures {
        assert!(results.iter().any(|(n, _)| n == name), "profile names an unknown check '{name}'");
    }
    eprintln!("{report}");
    cleanup(&b).await;
    assert!(wrong.is_empty(), "{report}\nchecks that differ from the profile: {wrong:?}");
}

/// Deletes what the run wrote (best effort: some emulators cannot list or delete).
async fn cleanup(b: &Backend) {
    if b.name == "memory" || b.name == "file" {
        return;
    }
    let Ok(store) = open_store(&b.url, &b.opts) else { return };
    let Ok(keys) = store.inner.list(None).map_ok(|m| m.location).try_collect::<Vec<_>>().await else {
        return;
    };
    for k in keys {
        let _ = store.inner.delete(&k).await;
    }
}

#[tokio::test]
async fn memory() {
    run(Backend {
        name: "memory",
        url: "memory://".into(),
        opts: base_opts(),
        profile: Profile {
            implementation: "object_store InMemory",
            delete_missing: DeleteMissing::Ok,
            known_failures: FULL,
        },
        _dir: None,
    })
    .await
}

#[tokio::test]
async fn file() {
    let dir = tempfile::tempdir().unwrap();
    run(Backend {
        name: "file",
        url: format!("file://{}", dir.path().join("repo").display()),
        opts: base_opts(),
        profile: Profile {
            implementation: "object_store LocalFileSystem",
            delete_missing: DeleteMissing::NotFound,
            known_failures: FULL,
        },
        _dir: Some(dir),
    })
    .await
}

#[tokio::test]
async fn s3() {
    if let Some(b) = remote("s3", "FERRY_CONFORMANCE_S3", "s3://") {
        run(b).await
    }
}

#[tokio::test]
async fn az() {
    if let Some(b) = remote("az", "FERRY_CONFORMANCE_AZ", "az://") {
        run(b).await
    }
}

#[tokio::test]
async fn gs() {
    if let Some(b) = remote("gs", "FERRY_CONFORMANCE_GS", "gs://") {
        run(b).await
    }
}

/// `open_store` refuses what it cannot open, before any request.
#[test]
fn urls_are_parsed() {
    let opts = StoreOptions::default();
    for (url, why) in [
        ("", "empty URL"),
        ("ftp://x/y", "unknown scheme"),
        ("s3://", "no bucket"),
        ("gs:///prefix", "no bucket"),
        ("az://", "no container"),
    ] {
        let e = open_store(url, &opts).unwrap_err().to_string();
        assert!(e.contains(why), "{url}: {e}");
    }
}
