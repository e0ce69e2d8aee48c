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
