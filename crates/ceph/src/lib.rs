//! ferry's primary-side Ceph driver.
//!
//! Two halves, both synchronous (no async runtime):
//!
//! * [`RbdCli`] drives the `rbd` command line tool: image and snapshot metadata
//!   (`--format json`), snapshot create/remove, image create/remove, and the streaming
//!   `export-diff` / `import-diff` pipes ([`ExportDiff`], [`ImportDiff`]).
//! * [`Cluster`] talks to librados (through the raw bindings of the `ceph` crate): cluster fsid,
//!   health, pool list, and [`Lease`]s — exclusive RADOS object locks with a lease duration that a
//!   background thread keeps renewing. [`Cluster::open_snapshot`] opens a snapshot read-only
//!   through librbd ([`SnapshotReader`]).
//!
//! Both honour one [`CephConfig`] (conf file, keyring, client id). The crate knows nothing about
//! ferry's repository format.

#![deny(missing_docs)]

mod cli;
mod config;
mod error;
mod rados;

pub use cli::{
    scrub_secrets, DiffExtent, ExportDiff, ImageInfo, ImageParent, ImportDiff, RbdCli, SnapInfo, DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MOUNT_TIMEOUT, SECRET_ENV_PREFIXES,
};
pub use config::CephConfig;
pub use error::{Error, RbdContext};
pub use rados::{Cluster, Health, HealthCheck, Lease, SnapshotReader, DEFAULT_CONNECT_TIMEOUT, LEASE_LOCK_NAME};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_threads() {
        send_sync::<crate::RbdCli>();
        send_sync::<crate::Cluster>();
        send_sync::<crate::Lease>();
        send_sync::<crate::Error>();
        fn send<T: Send>() {}
        send::<crate::ExportDiff>();
        send::<crate::ImportDiff>();
    }
}
