//! Fixtures: a repository in a temp dir and a command builder for the ferry binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const PASSWORD: &str = "correct horse battery staple";

/// A ferry repository plus an index dir, in a fresh temp dir (or at a given URL).
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub env: Vec<(String, String)>,
}

impl Repo {
    /// A new `file://` repository, initialised with `init_args`.
    pub fn file(init_args: &[&str]) -> Repo {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}/repo", dir.path().display());
        Self::at(dir, url, Vec::new(), init_args)
    }

    pub fn at(dir: tempfile::TempDir, url: String, env: Vec<(String, String)>, init_args: &[&str]) -> Repo {
        let repo = Repo { dir, url, env };
        let mut args = vec!["init"];
        args.extend_from_slice(init_args);
        repo.ok(&args);
        repo
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.path("repo")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env_remove("FERRY_PASSWORD_FILE")
            .env("FERRY_REPO", &self.url)
            .env("FERRY_PASSWORD", PASSWORD)
            .env("FERRY_INDEX_DIR", self.dir.path().join("index"))
            .env("FERRY_STORE_RETRIES", "1")
            .env("FERRY_STORE_DEADLINE", "3")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running ferry")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs, asserts the exit code, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "ferry {args:?}: expected exit {code}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }

    /// Backs up a diff stream given as bytes; returns the JSON summary.
    /// Runs with `--json`, expecting exit code `code`, and parses stdout.
    pub fn json_code(&self, args: &[&str], code: i32) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    pub fn backup_bytes(&self, volume: &str, stream: &[u8]) -> serde_json::Value {
        let f = self.path(&format!("stream-{}.diff", rand::random::<u64>()));
        std::fs::write(&f, stream).expect("write stream");
        let v = self.json(&["backup", "--volume", volume, "--diff", f.to_str().expect("utf8")]);
        let _ = std::fs::remove_file(f);
        v
    }

    pub fn backups(&self, volume: &str) -> Vec<serde_json::Value> {
        self.json(&["ls", volume]).as_array().cloned().unwrap_or_default()
    }
}

pub fn hash_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).expect("read file")).to_hex().to_string()
}

/// Applies an export-diff stream to an image (the reference importer for tests).
pub fn apply_diff(image: &mut Vec<u8>, stream: &[u8]) {
    let mut r = rbd_diff::DiffReader::new(stream).expect("banner");
    image.resize(r.header().image_size as usize, 0);
    loop {
        match r.next_event().expect("valid stream") {
            rbd_diff::Event::Data { offset, data } => image[offset as usize..offset as usize + data.len()].copy_from_slice(data),
            rbd_diff::Event::Zero { offset, length } => image[offset as usize..(offset + length) as usize].fill(0),
            rbd_diff::Event::End => break,
        }
    }
}

/// The project's dev cluster (mon, mgr, OSD, RGW on 127.0.0.1), started once per test run by
/// `scripts/ceph-dev up` unless `FERRY_CEPH_DIR` names a running one. A cluster that cannot
/// start fails the tests loudly; they never skip.
pub struct Cluster {
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
}

static CLUSTER: std::sync::OnceLock<Result<Cluster, String>> = std::sync::OnceLock::new();

pub fn cluster() -> &'static Cluster {
    let c = CLUSTER.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var("FERRY_CEPH_DIR").unwrap_or_else(|_| "/tmp/ferry-ceph".into());
        let up = Command::new(root.join("scripts/ceph-dev"))
            .args(["up", &dir])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run scripts/ceph-dev: {e}"))?;
        if !up.status.success() {
            return Err(format!(
                "the Ceph dev cluster did not come up:\n{}",
                String::from_utf8_lossy(&up.stderr)
            ));
        }
        let mut env = Vec::new();
        for line in String::from_utf8_lossy(&up.stdout).lines() {
            if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                env.push((k.to_string(), v.trim_matches('\'').to_string()));
            }
        }
        Ok(Cluster {
            dir: PathBuf::from(dir),
            env,
        })
    });
    match c {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

impl Cluster {
    pub fn var(&self, k: &str) -> &str {
        self.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("ceph-dev env lacks {k}"))
    }

    /// Runs the real `rbd` against the cluster; panics with its stderr on failure.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        self.rbd_with_stdin(args, None)
    }

    pub fn rbd_with_stdin(&self, args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
        use std::io::Write;
        let mut c = Command::new("rbd");
        c.args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn rbd");
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            std::thread::spawn(move || stdin.write_all(&data));
        }
        let out = child.wait_with_output().expect("rbd");
        assert!(
            out.status.success(),
            "rbd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// BLAKE3 of `rbd export POOL/IMAGE@SNAP -`.
    pub fn export_hash(&self, spec: &str) -> String {
        blake3::hash(&self.rbd(&["export", "--no-progress", spec, "-"]))
            .to_hex()
            .to_string()
    }

    pub fn snaps(&self, image: &str) -> Vec<String> {
        let out = self.rbd(&["snap", "ls", "--format", "json", image]);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// Creates a bucket on RGW (idempotent).
    pub fn bucket(&self, name: &str) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("scripts/ceph-dev"))
            .args(["bucket", name, self.dir.to_str().expect("utf8")])
            .output()
            .expect("ceph-dev bucket");
        assert!(out.status.success(), "bucket: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A `file://` repository whose commands see the cluster's environment.
    pub fn file_repo(&self) -> Repo {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}/repo", dir.path().display());
        Repo::at(dir, url, self.env.clone(), &[])
    }

    /// An `s3://` repository in RGW (a fresh prefix in a shared bucket).
    pub fn s3_repo(&self) -> Repo {
        self.bucket("ferry-tests");
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("s3://ferry-tests/{}", unique("repo"));
        Repo::at(dir, url, self.env.clone(), &[])
    }
}

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        rand::random::<u16>()
    )
}

impl Cluster {
    /// Runs the real `rbd` against the cluster and returns its output, whatever its exit code
    /// (for cleanup and for commands expected to fail).
    pub fn rbd_output(&self, args: &[&str]) -> Output {
        let mut c = Command::new("rbd");
        c.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.output().expect("spawn rbd")
    }

    /// Runs the real `rados` against the cluster; panics with its stderr on failure.
    pub fn rados(&self, args: &[&str]) -> Vec<u8> {
        let mut c = Command::new("rados");
        c.args(args).stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().expect("spawn rados");
        assert!(
            out.status.success(),
            "rados {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `rbd export POOL/IMAGE[@SNAP] -`: the image's bytes as the real rbd reads them.
    pub fn export(&self, spec: &str) -> Vec<u8> {
        self.rbd(&["export", "--no-progress", spec, "-"])
    }
}

/// Removes RBD images (snapshots first) when dropped, also when a test panics.
pub struct ImageGuard<'a> {
    pub cluster: &'a Cluster,
    pub images: Vec<String>,
}

impl<'a> ImageGuard<'a> {
    pub fn new(cluster: &'a Cluster) -> ImageGuard<'a> {
        ImageGuard {
            cluster,
            images: Vec::new(),
        }
    }

    /// Registers `POOL/IMAGE` for removal and returns it.
    pub fn add(&mut self, image: &str) -> String {
        self.images.push(image.to_string());
        image.to_string()
    }
}

impl Drop for ImageGuard<'_> {
    fn drop(&mut self) {
        for image in self.images.iter().rev() {
            let _ = self.cluster.rbd_output(&["snap", "purge", "--no-progress", image]);
            let _ = self.cluster.rbd_output(&["rm", "--no-progress", image]);
            // The lease object ferry leaves next to the image.
            if let Some((pool, name)) = image.split_once('/') {
                let mut c = Command::new("rados");
                c.args(["-p", pool, "rm", &format!("ferry.lease.{name}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                for (k, v) in &self.cluster.env {
                    c.env(k, v);
                }
                let _ = c.status();
            }
        }
    }
}

/// Why two byte strings differ, for assertion messages: sizes, first and last differing
/// offsets (with the block of `block` bytes they fall in), how many bytes differ, and the bytes
/// around the first difference. None when equal.
pub fn difference(expected: &[u8], actual: &[u8], block: u64) -> Option<String> {
    if expected == actual {
        return None;
    }
    let common = expected.len().min(actual.len());
    let differing: Vec<usize> = (0..common).filter(|&i| expected[i] != actual[i]).collect();
    let mut s = String::new();
    if expected.len() != actual.len() {
        s.push_str(&format!("sizes differ: expected {} bytes, got {}; ", expected.len(), actual.len()));
    }
    match (differing.first(), differing.last()) {
        (Some(&first), Some(&last)) => {
            let end = (first + 16).min(common);
            s.push_str(&format!(
                "{} of the first {common} bytes differ, first at offset {first} (block {} of {block} bytes, +{}), last at {last} (block {}); \
                 expected {:02x?}, got {:02x?}",
                differing.len(),
                first as u64 / block,
                first as u64 % block,
                last as u64 / block,
                &expected[first..end],
                &actual[first..end],
            ));
            if differing.iter().all(|&i| actual[i] == 0xFF) {
                s.push_str("; every differing byte reads 0xFF (stale, never written)");
            }
        }
        _ => s.push_str("the common prefix is equal"),
    }
    Some(s)
}

/// Asserts `actual` equals `expected` by BLAKE3, naming what differed otherwise.
pub fn assert_same(what: &str, expected: &[u8], actual: &[u8], block: u64) {
    if blake3::hash(expected) != blake3::hash(actual) {
        panic!(
            "{what}: BLAKE3 {} expected, got {}: {}",
            blake3::hash(expected).to_hex(),
            blake3::hash(actual).to_hex(),
            difference(expected, actual, block).unwrap_or_else(|| "(equal bytes?)".into())
        );
    }
}

/// Writes an executable script (e.g. an `rbd` wrapper).
pub fn write_executable(path: &Path, script: &str) {
    std::fs::write(path, script).expect("write script");
    let mut perm = std::fs::metadata(path).expect("metadata").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(path, perm).expect("chmod");
}
