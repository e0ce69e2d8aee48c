//! How failures leave the binary: exit codes that mean something.

use std::process::ExitCode;

use ferry_engine::ErrorKind;

/// Exit codes (documented in README and `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// Operational failure: I/O, network, store unreachable, bad input stream, Ceph.
    pub const FAILURE: u8 = 1;
    /// Usage (clap's, and contradicting options).
    pub const USAGE: u8 = 2;
    /// Data integrity: tampered, corrupt or missing objects; audit findings.
    pub const INTEGRITY: u8 = 3;
    /// Authentication: wrong or missing passphrase.
    pub const AUTH: u8 = 4;
    /// Refused: a precondition does not hold (broken chain, existing target, lease held).
    pub const REFUSED: u8 = 5;
}

pub fn code_of(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Refused => exit::REFUSED,
        ErrorKind::Integrity => exit::INTEGRITY,
        ErrorKind::Auth => exit::AUTH,
        ErrorKind::Usage => exit::USAGE,
        ErrorKind::Transient | ErrorKind::Source | ErrorKind::Input | ErrorKind::Failed => exit::FAILURE,
    }
}

/// The kind of the most specific typed cause in an error chain.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ferry_engine::Error>() {
            return e.kind();
        }
        if let Some(e) = cause.downcast_ref::<ferry_repo::Error>() {
            return ferry_engine::error::repo_error_kind(e);
        }
        if cause.downcast_ref::<ferry_ceph::Error>().is_some() {
            return ErrorKind::Source;
        }
    }
    ErrorKind::Failed
}

/// Maps an error chain to an exit code by its kind.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    code_of(kind_of(err))
}

pub fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("ferry: error: {err:#}");
    ExitCode::from(exit_code(err))
}
