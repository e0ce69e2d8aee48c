//! `--config FILE`: defaults for the repository, S3 and Ceph settings in TOML. Flags and
//! environment variables win over the file. Secrets do not belong here: the passphrase comes
//! from FERRY_PASSWORD, a password file, or a prompt; S3 keys from the AWS variables.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::args::{CephArgs, RepoArgs};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub repository: RepositorySection,
    #[serde(default)]
    pub s3: S3Section,
    #[serde(default)]
    pub ceph: CephSection,
    /// The worker's sections, checked by `ferry_worker::WorkerConfig` (ignored by other commands).
    #[serde(default, rename = "worker")]
    _worker: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "gc")]
    _gc: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "clusters")]
    _clusters: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "selection")]
    _selection: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "standby")]
    _standby: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySection {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub index_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: Option<bool>,
    pub retries: Option<usize>,
    /// Seconds to keep retrying a transiently failing request (`--store-deadline`).
    pub deadline: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephSection {
    pub conf: Option<PathBuf>,
    pub keyring: Option<PathBuf>,
    pub id: Option<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        // Not toml's own message: it quotes the offending line, which may hold a secret.
        toml::from_str(&text).map_err(|e| {
            let (key, reason) = ferry_worker::config::toml_issue(&text, &e);
            anyhow::anyhow!("configuration {}: {key}: {reason}", path.display())
        })
    }

    /// Fills what flags and environment left unset.
    pub fn apply(self, repo: &mut RepoArgs, ceph: &mut CephArgs) {
        let r = self.repository;
        repo.repo = repo.repo.take().or(r.url);
        repo.password_file = repo.password_file.take().or(r.password_file);
        repo.index_dir = repo.index_dir.take().or(r.index_dir);
        repo.s3_endpoint = repo.s3_endpoint.take().or(self.s3.endpoint);
        repo.s3_region = repo.s3_region.take().or(self.s3.region);
        repo.s3_allow_http |= self.s3.allow_http.unwrap_or(false);
        repo.store_retries = repo.store_retries.or(self.s3.retries);
        repo.store_deadline = repo.store_deadline.or(self.s3.deadline);
        ceph.ceph_conf = ceph.ceph_conf.take().or(self.ceph.conf);
        ceph.ceph_keyring = ceph.ceph_keyring.take().or(self.ceph.keyring);
        ceph.ceph_id = ceph.ceph_id.take().or(self.ceph.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_refused() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ferry.toml");
        let c = ConfigFile::load(&example).expect("config/ferry.toml parses");
        assert!(c.repository.url.is_some());
        assert!(toml::from_str::<ConfigFile>("[repository]\npassword = \"x\"\n").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[repository]\npassword = \"hunter2\"\n").expect("write");
        let e = format!("{:#}", ConfigFile::load(&f).expect_err("refused"));
        assert!(
            e.contains("line 2") && e.contains("unknown field `password`") && !e.contains("hunter2"),
            "{e}"
        );
    }
}
