use std::process::ExitStatus;
use std::time::Duration;

/// The command line and stderr of a failed `rbd` run (boxed inside [`Error`] to keep it small).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdContext {
    pub command: String,
    pub stderr: String,
}

impl std::fmt::Display for RbdContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.command, stderr_or_none(&self.stderr))
    }
}

/// Everything that can go wrong in this crate.
///
/// Errors from the `rbd` tool always name the command line and carry the tool's stderr
/// ([`Error::command`], [`Error::stderr`]).
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// `rbd` exited non-zero, was killed, or printed an error line.
    #[error("`{command}` failed ({status}): {}", stderr_or_none(.stderr))]
    RbdFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    /// The image does not exist (`rbd` said ENOENT while opening it).
    #[error("RBD image {pool}/{image} does not exist ({rbd})")]
    ImageNotFound { pool: String, image: String, rbd: Box<RbdContext> },

    /// The pool does not exist.
    #[error("pool {pool} does not exist ({rbd})")]
    PoolNotFound { pool: String, rbd: Box<RbdContext> },

    /// The snapshot does not exist.
    #[error("snapshot {pool}/{image}@{snap} does not exist ({rbd})")]
    SnapshotNotFound {
        pool: String,
        image: String,
        snap: String,
        rbd: Box<RbdContext>,
    },

    /// `rbd snap create` of a snapshot name that is taken.
    #[error("snapshot {pool}/{image}@{snap} already exists ({rbd})")]
    SnapshotExists {
        pool: String,
        image: String,
        snap: String,
        rbd: Box<RbdContext>,
    },

    /// `rbd create` of an image name that is taken.
    #[error("RBD image {pool}/{image} already exists ({rbd})")]
    ImageExists { pool: String, image: String, rbd: Box<RbdContext> },

    /// A pool, image or snapshot name that cannot be passed to `rbd` safely.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },

    /// An argument out of range (e.g. a zero lease duration).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The program could not be started at all.
    #[error("cannot run `{command}`: {source} (is ceph-common installed and `{program}` on PATH?)")]
    Spawn {
        program: String,
        command: String,
        #[source]
        source: std::io::Error,
    },

    /// A metadata command did not finish in time and was killed.
    #[error("`{command}` did not finish within {after:?} and was killed (is the cluster reachable?); stderr: {}", stderr_or_none(.stderr))]
    Timeout { command: String, after: Duration, stderr: String },

    /// I/O on a child's pipes or waiting for it failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// `rbd ... --format json` (or a mon command) printed something that is not the expected
    /// JSON.
    #[error("cannot parse the JSON output of `{command}`: {source}; output: {output}")]
    Json {
        command: String,
        output: String,
        #[source]
        source: serde_json::Error,
    },

    /// Connecting to the cluster through librados failed. `message` names the conf and keyring
    /// used and says what the errno most likely means (refused key, no monitor answering, ...).
    #[error("cannot connect to the Ceph cluster as client.{client}: {step} failed: {} (errno {code}); {message}", strerror(*.code))]
    Connect {
        client: String,
        step: &'static str,
        code: i32,
        message: String,
    },

    /// Someone else holds the lease (RADOS exclusive lock) on the object.
    #[error("lease on {object} is held by {holder}")]
    LeaseHeld { object: String, holder: String },

    /// The lease was no longer ours when releasing it.
    #[error("lease on {object} was lost: {reason}")]
    LeaseLost { object: String, reason: String },

    /// A librados call failed.
    #[error("librados {op} failed: {} (errno {code}){}", strerror(*.code), detail_suffix(.detail))]
    Rados { op: String, code: i32, detail: String },
}

impl Error {
    /// The stderr of the `rbd` command this error came from, if any.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            Error::RbdFailed { stderr, .. } | Error::Timeout { stderr, .. } => Some(stderr),
            Error::ImageNotFound { rbd, .. }
            | Error::PoolNotFound { rbd, .. }
            | Error::SnapshotNotFound { rbd, .. }
            | Error::SnapshotExists { rbd, .. }
            | Error::ImageExists { rbd, .. } => Some(&rbd.stderr),
            _ => None,
        }
    }

    /// The command line of the `rbd` run this error came from, if any.
    pub fn command(&self) -> Option<&str> {
        match self {
            Error::RbdFailed { command, .. }
            | Error::Timeout { command, .. }
            | Error::Spawn { command, .. }
            | Error::Json { command, .. } => Some(command),
            Error::ImageNotFound { rbd, .. }
            | Error::PoolNotFound { rbd, .. }
            | Error::SnapshotNotFound { rbd, .. }
            | Error::SnapshotExists { rbd, .. }
            | Error::ImageExists { rbd, .. } => Some(&rbd.command),
            _ => None,
        }
    }

    /// The positive errno of a librados failure, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Rados { code, .. } | Error::Connect { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for the "does not exist" family (image, pool, snapshot).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::ImageNotFound { .. } | Error::PoolNotFound { .. } | Error::SnapshotNotFound { .. }
        )
    }
}

fn stderr_or_none(s: &str) -> &str {
    let t = s.trim();
    if t.is_empty() {
        "no stderr"
    } else {
        t
    }
}

fn detail_suffix(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(": {t}")
    }
}

/// The text for a positive errno, e.g. "Permission denied".
pub(crate) fn strerror(code: i32) -> String {
    let s = std::io::Error::from_raw_os_error(code).to_string();
    // std appends " (os error N)"; the messages print the errno themselves
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_command_and_stderr() {
        let e = Error::SnapshotNotFound {
            pool: "rbd".into(),
            image: "vm1".into(),
            snap: "s".into(),
            rbd: Box::new(RbdContext {
                command: "rbd export-diff rbd/vm1@s -".into(),
                stderr: "error setting snapshot context: (2) No such file or directory\n".into(),
            }),
        };
        let m = e.to_string();
        assert!(m.contains("rbd/vm1@s"), "{m}");
        assert!(m.contains("rbd export-diff"), "{m}");
        assert!(m.contains("No such file"), "{m}");
        assert!(e.is_not_found());
        assert!(e.stderr().is_some());
        assert_eq!(e.command(), Some("rbd export-diff rbd/vm1@s -"));
        assert!(std::mem::size_of::<Error>() <= 96, "{}", std::mem::size_of::<Error>());

        let e = Error::Rados {
            op: "lock".into(),
            code: libc::EBUSY,
            detail: String::new(),
        };
        assert!(e.to_string().contains("errno 16"), "{e}");
        assert_eq!(e.errno(), Some(libc::EBUSY));
    }
}
