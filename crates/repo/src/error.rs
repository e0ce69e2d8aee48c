//! One error enum for the repository crate. Variants say what went wrong and where, so the
//! binary can map them to exit codes (integrity vs. authentication vs. I/O).

/// Errors of the repository layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("object store {op} of '{path}' failed: {source}")]
    Store {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("object '{path}' not found")]
    NotFound { path: String },
    #[error("no ferry repository at {url} (no 'config' object); run `ferry init` first")]
    NotARepository { url: String },
    #[error("a ferry repository already exists at {url}")]
    RepositoryExists { url: String },
    #[error("invalid repository URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("'{path}' uses repository format {found}, this ferry reads up to {supported}")]
    UnsupportedFormat { path: String, found: u32, supported: u32 },
    #[error("'{path}' is not a valid ferry object: {reason}")]
    BadObject { path: String, reason: String },
    #[error("wrong passphrase: it opens none of the {slots} key slot(s) of this repository")]
    WrongPassword { slots: usize },
    #[error("the repository has no key slots (keys/ is empty)")]
    NoKeySlots,
    #[error("key slot '{id}' not found")]
    KeySlotNotFound { id: String },
    #[error("refusing to remove the last key slot: the repository would become unreadable")]
    LastKeySlot,
    #[error("integrity error in '{path}': authentication tag does not verify (tampered, corrupt, or encrypted with another key)")]
    Integrity { path: String },
    #[error("integrity error in '{path}': content hashes to chunk {actual}, expected {expected}")]
    ChunkIdMismatch { path: String, expected: String, actual: String },
    #[error("integrity error in '{path}': cannot decompress: {reason}")]
    Decompress { path: String, reason: String },
    #[error("manifest '{path}' is malformed: {reason}")]
    ManifestDecode { path: String, reason: String },
    #[error("invalid volume name '{name}': use letters, digits, '.', '_' and '-' (1-200 characters, not starting with '.')")]
    InvalidVolumeName { name: String },
    #[error("local index at {path}: {source}")]
    Index {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("block size {bytes} is not a power of two from 4 KiB to 64 MiB")]
    InvalidBlockSize { bytes: u64 },
    #[error("volume '{volume}' has no backups")]
    NoBackups { volume: String },
    #[error("volume '{volume}' has no backup '{spec}'")]
    NoSuchBackup { volume: String, spec: String },
    #[error("'{spec}' is ambiguous in volume '{volume}': {detail}")]
    AmbiguousBackup { volume: String, spec: String, detail: String },
    #[error("key derivation failed: {reason}")]
    Kdf { reason: String },
}

impl Error {
    /// True when the error means stored data is damaged or not authentic (as opposed to an
    /// unreachable store or a usage problem).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            Error::Integrity { .. }
                | Error::ChunkIdMismatch { .. }
                | Error::Decompress { .. }
                | Error::BadObject { .. }
                | Error::ManifestDecode { .. }
        )
    }

    /// True when the store could not be reached or failed a request (network, timeouts,
    /// 5xx): retrying later may help. Never true for damaged data.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store { .. })
    }

    /// True when the request itself cannot be satisfied as given (a bad name, size, spec, an
    /// existing repository, the last key slot): nothing was changed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::RepositoryExists { .. }
                | Error::LastKeySlot
                | Error::InvalidVolumeName { .. }
                | Error::InvalidArgument(_)
                | Error::InvalidBlockSize { .. }
                | Error::NoBackups { .. }
                | Error::NoSuchBackup { .. }
                | Error::AmbiguousBackup { .. }
        )
    }

    /// True when the passphrase is wrong or there is none to try.
    pub fn is_auth(&self) -> bool {
        matches!(self, Error::WrongPassword { .. } | Error::NoKeySlots)
    }

    /// True when the local index is held by another ferry process (sled locks it).
    pub fn is_index_locked(&self) -> bool {
        // sled reports the flock failure as an io::Error of kind Other with this text.
        matches!(self, Error::Index { source: sled::Error::Io(e), .. }
            if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock"))
    }

    pub(crate) fn store(op: &'static str, path: &object_store::path::Path, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Error::NotFound { path: path.to_string() },
            source => Error::Store {
                op,
                path: path.to_string(),
                source,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
