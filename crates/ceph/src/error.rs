use std::process::ExitStatus;
use std::time::Duration;

/// The command line and stderr of a failed `rbd` run (boxed inside [`Error`] to keep it small).
///
/// [`Error::PoolNotFound`] from librados ([`crate::Cluster`]) also carries one: then `command`
/// names the librados call (`rados_ioctx_create POOL`) and `stderr` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdContext {
    /// The command line, shell-quoted, including the connection arguments.
    pub command: String,
    /// What `rbd` printed on stderr (at most 256 KiB of it are kept).
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
/// ([`Error::command`], [`Error::stderr`]). Failures `rbd` reports with a recognisable errno
/// and message (a missing pool, image or snapshot, a taken name) get their own variants, so
/// callers can match on them; everything else from `rbd` is [`Error::RbdFailed`].
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// `rbd` exited non-zero, was killed, or printed an error line, for a reason none of the
    /// more specific variants covers. The stderr tells what went wrong.
    #[error("`{command}` failed ({status}): {}", stderr_or_none(.stderr))]
    RbdFailed {
        /// The command line, shell-quoted.
        command: String,
        /// Its exit status (may be success if only an error line on stderr gave it away).
        status: ExitStatus,
        /// What `rbd` printed on stderr (at most 256 KiB of it are kept).
        stderr: String,
    },

    /// The image does not exist (`rbd` said ENOENT while opening or removing it).
    #[error("RBD image {pool}/{image} does not exist ({rbd})")]
    ImageNotFound {
        /// The pool name.
        pool: String,
        /// The image name.
        image: String,
        /// Command line and stderr of the failed `rbd` run.
        rbd: Box<RbdContext>,
    },

    /// The pool does not exist (`rbd` said ENOENT while opening it, or librados could not
    /// open an I/O context on it).
    #[error("pool {pool} does not exist ({rbd})")]
    PoolNotFound {
        /// The pool name.
        pool: String,
        /// Command line and stderr of the failed `rbd` run (for librados: the call, no stderr).
        rbd: Box<RbdContext>,
    },

    /// The snapshot does not exist (for `export_diff`: either the end snapshot or the
    /// `--from-snap` one; `snap` says which).
    #[error("snapshot {pool}/{image}@{snap} does not exist ({rbd})")]
    SnapshotNotFound {
        /// The pool name.
        pool: String,
        /// The image name.
        image: String,
        /// The snapshot that is missing.
        snap: String,
        /// Command line and stderr of the failed `rbd` run.
        rbd: Box<RbdContext>,
    },

    /// `rbd snap create` of a snapshot name that is taken.
    #[error("snapshot {pool}/{image}@{snap} already exists ({rbd})")]
    SnapshotExists {
        /// The pool name.
        pool: String,
        /// The image name.
        image: String,
        /// The snapshot name that is taken.
        snap: String,
        /// Command line and stderr of the failed `rbd` run.
        rbd: Box<RbdContext>,
    },

    /// `rbd create` of an image name that is taken.
    #[error("RBD image {pool}/{image} already exists ({rbd})")]
    ImageExists {
        /// The pool name.
        pool: String,
        /// The image name that is taken.
        image: String,
        /// Command line and stderr of the failed `rbd` run.
        rbd: Box<RbdContext>,
    },

    /// A pool, image or snapshot name that cannot be passed to `rbd` safely (empty, contains
    /// `/`, `@` or control characters, or starts with `-`), or a string for librados that
    /// contains a NUL byte.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What the string is, e.g. "pool", "image", "snapshot", "object", "conf path".
        what: &'static str,
        /// The string as given.
        name: String,
        /// Why it is rejected, e.g. "contains '/' or '@'".
        reason: &'static str,
    },

    /// An argument out of range (e.g. a lease duration under 10 ms). Nothing was done.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The program could not be started at all (not installed, not on `PATH`, not
    /// executable).
    #[error("cannot run `{command}`: {source} (is ceph-common installed and `{program}` on PATH?)")]
    Spawn {
        /// The program, as given to [`crate::RbdCli::with_program`] (default `rbd`).
        program: String,
        /// The command line that was to run, shell-quoted.
        command: String,
        /// The error from spawning the process.
        #[source]
        source: std::io::Error,
    },

    /// A metadata command did not finish in time and was killed. Usually the cluster is
    /// unreachable or unhealthy; whether the command took effect is unknown.
    #[error("`{command}` did not finish within {after:?} and was killed (is the cluster reachable?); stderr: {}", stderr_or_none(.stderr))]
    Timeout {
        /// The command line, shell-quoted.
        command: String,
        /// The time limit that ran out (see [`crate::RbdCli::with_command_timeout`]).
        after: Duration,
        /// What `rbd` printed on stderr before it was killed.
        stderr: String,
    },

    /// I/O on a child's pipes or waiting for it failed (or a thread could not be started).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "waiting for `rbd ...`".
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `rbd ... --format json` (or a mon command) printed something that is not the expected
    /// JSON. The command itself succeeded; its output format is not what this crate knows.
    #[error("cannot parse the JSON output of `{command}`: {source}; output: {output}")]
    Json {
        /// The command line, or `mon command health` for [`crate::Cluster::health`].
        command: String,
        /// The output (from `rbd`: cut to its first 2000 bytes).
        output: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// Connecting to the cluster through librados failed. `message` names the conf and keyring
    /// used and says what the errno most likely means (refused key, no monitor answering, ...).
    #[error("cannot connect to the Ceph cluster as client.{client}: {step} failed: {} (errno {code}); {message}", strerror(*.code))]
    Connect {
        /// The client id, without the `client.` prefix.
        client: String,
        /// The step that failed, e.g. "reading the conf file", "rados_connect".
        step: &'static str,
        /// The positive errno librados returned.
        code: i32,
        /// The conf and keyring used and a hint at the likely cause.
        message: String,
    },

    /// Someone else holds the lease (RADOS exclusive lock) on the object; try again later or,
    /// if that holder is known to be dead, break it ([`crate::Cluster::break_lease`]).
    #[error("lease on {object} is held by {holder}")]
    LeaseHeld {
        /// The lease object, `pool/object`.
        object: String,
        /// Client, cookie and address of each current holder, as far as they could be listed.
        holder: String,
    },

    /// The lease was no longer ours when releasing it (it expired or was broken): work done
    /// under it may have overlapped with another holder's.
    #[error("lease on {object} was lost: {reason}")]
    LeaseLost {
        /// The lease object, `pool/object`.
        object: String,
        /// Why, from the renewal thread if a renewal had failed.
        reason: String,
    },

    /// A librados (or librbd) call failed.
    #[error("librados {op} failed: {} (errno {code}){}", strerror(*.code), detail_suffix(.detail))]
    Rados {
        /// The call and its target, e.g. "lock_exclusive rbd/ferry.lease".
        op: String,
        /// The positive errno the call returned.
        code: i32,
        /// Extra text, e.g. a mon command's status string; often empty.
        detail: String,
    },
}

impl Error {
    /// The stderr of the `rbd` command this error came from, if any (empty for a
    /// [`Error::PoolNotFound`] from librados).
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

    /// The command line of the `rbd` run this error came from, if any. For errors from
    /// librados that carry one ([`Error::PoolNotFound`], [`Error::Json`] of a mon command) it
    /// names the librados call instead.
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
