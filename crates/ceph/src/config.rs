use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How to reach a Ceph cluster; shared by [`crate::RbdCli`] and [`crate::Cluster`].
///
/// Every field is optional. Unset fields fall back to Ceph's own defaults: `CEPH_CONF` /
/// `/etc/ceph/ceph.conf` for the conf file, the `keyring` setting of the conf (or `CEPH_KEYRING`)
/// for the keyring, and `admin` for the client id. `CEPH_ARGS` is honoured by both halves; the
/// fields set here override it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephConfig {
    /// Path of `ceph.conf` (`--conf`).
    pub conf: Option<PathBuf>,
    /// Path of the keyring (`--keyring`).
    pub keyring: Option<PathBuf>,
    /// Client id without the `client.` prefix, e.g. `"admin"` (`--id`).
    pub client_id: Option<String>,
}

impl CephConfig {
    /// The layout of a cluster made by `scripts/ceph-dev up DIR`: `DIR/ceph.conf` and
    /// `DIR/keyring` (client.admin).
    pub fn from_dev_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        CephConfig {
            conf: Some(dir.join("ceph.conf")),
            keyring: Some(dir.join("keyring")),
            client_id: None,
        }
    }

    /// The client id librados and the CLI will use (`admin` unless set).
    pub fn client_id_or_default(&self) -> &str {
        self.client_id.as_deref().unwrap_or("admin")
    }

    /// The connection arguments for a Ceph command line tool (`--conf`, `--keyring`, `--id`).
    pub fn cli_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(conf) = &self.conf {
            args.push(OsString::from("--conf"));
            args.push(conf.clone().into_os_string());
        }
        if let Some(keyring) = &self.keyring {
            args.push(OsString::from("--keyring"));
            args.push(keyring.clone().into_os_string());
        }
        if let Some(id) = &self.client_id {
            args.push(OsString::from("--id"));
            args.push(OsString::from(id));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_args_follow_the_fields() {
        assert!(CephConfig::default().cli_args().is_empty());
        let c = CephConfig {
            client_id: Some("ferry".into()),
            ..CephConfig::from_dev_dir("/tmp/x")
        };
        let args: Vec<String> = c.cli_args().into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["--conf", "/tmp/x/ceph.conf", "--keyring", "/tmp/x/keyring", "--id", "ferry"]);
        assert_eq!(c.client_id_or_default(), "ferry");
        assert_eq!(CephConfig::default().client_id_or_default(), "admin");
    }
}
