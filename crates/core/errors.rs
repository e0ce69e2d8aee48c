//! How failures leave the binary: exit codes that mean something.

use std::process::ExitCode;

/// Exit codes (documented in README and `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// Operational failure: I/O, network, store unreachable, bad input stream.
    pub const FAILURE: u8 = 1;
    // 2 is clap's usage error.
    /// Data integrity: tampered, corrupt or missing objects; audit findings.
    pub const INTEGRITY: u8 = 3;
    /// Authentication: wrong or missing passphrase.
    pub const AUTH: u8 = 4;
    /// Refused: a precondition does not hold (broken chain, existing target, lease held).
    pub const REFUSED: u8 = 5;
}

/// A request ferry refuses on purpose (nothing was changed).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Findings of an integrity check (audit, restore): the message was already printed.
#[derive(Debug)]
pub struct IntegrityFailure(pub String);

impl std::fmt::Display for IntegrityFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IntegrityFailure {}

/// Maps an error chain to an exit code by the most specific cause found.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // anyhow's downcast sees through every layer of context.
    if err.downcast_ref::<Refused>().is_some() {
        return exit::REFUSED;
    }
    if err.downcast_ref::<IntegrityFailure>().is_some() || err.downcast_ref::<crate::restore::RestoreFailed>().is_some() {
        return exit::INTEGRITY;
    }
    if let Some(e) = err.downcast_ref::<ferry_repo::Error>() {
        use ferry_repo::Error as E;
        return match e {
            E::WrongPassword { .. } | E::NoKeySlots => exit::AUTH,
            E::RepositoryExists { .. } | E::LastKeySlot | E::InvalidVolumeName { .. } | E::InvalidArgument(_) => exit::REFUSED,
            e if e.is_integrity() => exit::INTEGRITY,
            _ => exit::FAILURE,
        };
    }
    exit::FAILURE
}

pub fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("ferry: error: {err:#}");
    ExitCode::from(exit_code(err))
}
