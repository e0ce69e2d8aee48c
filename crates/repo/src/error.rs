//! One error enum for the repository crate. Variants say what went wrong and where, so the
//! binary can map them to exit codes (integrity vs. authentication vs. I/O).

/// Errors of the repository layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request to the object store failed: the network, a timeout, an HTTP error left after
    /// `object_store`'s own retries, but also anything else the backend reports (permission
    /// denied, bad credentials, …) except "not found", which is [`Error::NotFound`]. Classed
    /// as transient ([`Error::is_transient`]): nothing says the stored data is damaged.
    #[error("object store {op} of '{path}' failed: {source}")]
    Store {
        /// The request that failed: `"get"`, `"put"`, `"head"`, `"list"` or `"delete"`.
        op: &'static str,
        /// The object key (or listed prefix), relative to the repository root.
        path: String,
        /// The backend's error.
        #[source]
        source: object_store::Error,
    },
    /// The object store has no object under this key. Neither integrity nor transient: whether
    /// a missing object is damage depends on what the caller expected (a chunk a manifest
    /// references, or a manifest deleted since it was listed).
    #[error("object '{path}' not found")]
    NotFound {
        /// The missing object's key, relative to the repository root.
        path: String,
    },
    /// The store holds no `config` object: there is no repository at this URL (yet).
    #[error("no ferry repository at {url} (no 'config' object); run `ferry init` first")]
    NotARepository {
        /// The repository URL as given.
        url: String,
    },
    /// `init` refused: a `config` object already exists (found before writing, or the
    /// create-only write of `config` lost a race). A refusal ([`Error::is_refusal`]).
    #[error("a ferry repository already exists at {url}")]
    RepositoryExists {
        /// The repository URL as given.
        url: String,
    },
    /// The repository URL cannot be opened: empty, unknown scheme, no bucket or container
    /// name, or rejected by the backend's builder.
    #[error("invalid repository URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// An object or the repository uses a newer format than this build reads: an object
    /// header version other than 1, a `config.format` or a manifest `format` above what this
    /// build supports (FORMAT.md §10). Not classed as an integrity error: a newer ferry may
    /// read the object.
    #[error("'{path}' uses repository format {found}, this ferry reads up to {supported}")]
    UnsupportedFormat {
        /// The object's key (`config` for the repository format).
        path: String,
        /// The version found.
        found: u32,
        /// The highest version this build reads.
        supported: u32,
    },
    /// The object is not a valid ferry object: too short, bad magic, another or an unknown
    /// kind, unknown flag bits, a nonzero reserved byte, an unencrypted chunk or manifest, a
    /// sealed body shorter than nonce and tag, a key slot whose base64 or wrapped key is
    /// malformed, or a manifest name that already exists at commit. An integrity error
    /// ([`Error::is_integrity`]).
    #[error("'{path}' is not a valid ferry object: {reason}")]
    BadObject {
        /// The object's key, relative to the repository root.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No key slot opens with the passphrase. An authentication error ([`Error::is_auth`]).
    #[error("wrong passphrase: it opens none of the {slots} key slot(s) of this repository")]
    WrongPassword {
        /// How many key slots were tried.
        slots: usize,
    },
    /// `keys/` holds no key slot, so no passphrase can open the repository. An authentication
    /// error ([`Error::is_auth`]).
    #[error("the repository has no key slots (keys/ is empty)")]
    NoKeySlots,
    /// No key slot has this ID (removing a key slot).
    #[error("key slot '{id}' not found")]
    KeySlotNotFound {
        /// The slot ID asked for.
        id: String,
    },
    /// Refused to remove the only key slot, which would make the repository unreadable. A
    /// refusal ([`Error::is_refusal`]); nothing was deleted.
    #[error("refusing to remove the last key slot: the repository would become unreadable")]
    LastKeySlot,
    /// A key slot opened (the passphrase is right), but its MAC over its own fields and the
    /// `config` object does not verify: the label, KDF parameters, creation time or the
    /// repository config were changed in the bucket. An integrity error.
    #[error("integrity error in '{path}': the key slot opened, but its label or parameters, or the repository's config object, are not what it was made with (changed in the bucket: not authentic)")]
    SlotNotAuthentic {
        /// `keys/<slot id>`.
        path: String,
    },
    /// The AES-GCM tag of a chunk or manifest does not verify: the object was modified,
    /// corrupted, moved to another object key, or sealed with another repository's key. An
    /// integrity error ([`Error::is_integrity`]): never retry it as a network error.
    #[error("integrity error in '{path}': authentication tag does not verify (tampered, corrupt, or encrypted with another key)")]
    Integrity {
        /// The object's key, relative to the repository root.
        path: String,
    },
    /// A chunk decrypted, but its plaintext's keyed BLAKE3 is not the ID it is stored under.
    /// An integrity error ([`Error::is_integrity`]).
    #[error("integrity error in '{path}': content hashes to chunk {actual}, expected {expected}")]
    ChunkIdMismatch {
        /// The chunk's key, `chunks/<2 hex>/<64 hex>`.
        path: String,
        /// The ID the chunk is stored under (64 hex).
        expected: String,
        /// The ID its content hashes to (64 hex).
        actual: String,
    },
    /// A delta object decrypted, but its payload is malformed or is not the delta the
    /// manifest names (FORMAT.md §14), or applying it does not give its target content. An
    /// integrity error ([`Error::is_integrity`]).
    #[error("integrity error in '{path}': bad delta: {reason}")]
    DeltaDecode {
        /// The delta object's key, `chunks/<2 hex>/<64 hex>`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An authentic payload flagged zstd is not a zstd frame, does not decompress, or declares
    /// or produces more than the reader's plaintext limit ([`Repository`](crate::Repository)
    /// allows 64 MiB for a chunk, 1 GiB for a manifest). An integrity error
    /// ([`Error::is_integrity`]).
    #[error("integrity error in '{path}': cannot decompress: {reason}")]
    Decompress {
        /// The object's key, relative to the repository root.
        path: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// A manifest decrypted but its plaintext is not a valid manifest (magic, meta JSON, block
    /// count, runs, trailing bytes; FORMAT.md §6), or its meta names another volume,
    /// repository or backup than its key. An integrity error ([`Error::is_integrity`]).
    #[error("manifest '{path}' is malformed: {reason}")]
    ManifestDecode {
        /// The manifest's key, `volumes/<volume>/backups/<name>`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The name cannot be a volume: it must be 1–200 bytes of `A–Z a–z 0–9 . _ -`, not
    /// starting with `.` (it becomes part of object keys). A refusal ([`Error::is_refusal`]).
    #[error("invalid volume name '{name}': use letters, digits, '.', '_' and '-' (1-200 characters, not starting with '.')")]
    InvalidVolumeName {
        /// The name as given.
        name: String,
    },
    /// The local sled index failed (open, read, write, flush), or another process holds its
    /// lock ([`Error::is_index_locked`]). The index is a cache: deleting it loses nothing.
    #[error("local index at {path}: {source}")]
    Index {
        /// The index directory, or `(temporary)` for an in-memory index.
        path: String,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// JSON could not be encoded, or parsed: a `config` object, a key slot, an entry of the
    /// local index.
    #[error("{context}: {source}")]
    Json {
        /// What was being encoded or parsed.
        context: String,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A local failure with an I/O error as its cause: creating a `file://` repository's
    /// directory; callers also use it for a failed worker thread.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The caller's request is invalid as given (a zstd level outside 1–19, a block map that
    /// does not match the image size, a malformed backup spec); the message says why. A
    /// refusal ([`Error::is_refusal`]).
    #[error("{0}")]
    InvalidArgument(String),
    /// A block size that is not a power of two from 4 KiB to 64 MiB, given to
    /// [`BlockSize::new`](crate::BlockSize::new). A refusal ([`Error::is_refusal`]). (A bad
    /// size inside `config` or a manifest surfaces as [`Error::Json`] or
    /// [`Error::ManifestDecode`] instead: serde reports it.)
    #[error("block size {bytes} is not a power of two from 4 KiB to 64 MiB")]
    InvalidBlockSize {
        /// The refused size, in bytes.
        bytes: u64,
    },
    /// The backup is protected (`ferry protect`): it is never forgotten or pruned. A refusal.
    #[error("backup {backup} of volume '{volume}' is protected; `ferry unprotect` it first")]
    Protected {
        /// The volume.
        volume: String,
        /// The backup ID.
        backup: String,
    },
    /// A store request kept failing transiently until the retry policy gave up
    /// ([`crate::RetryPolicy`]). Transient: retrying later may help.
    #[error("{what}: the store is still unavailable after {attempts} attempt(s) over {secs:.1} s: {last}")]
    Unavailable {
        /// What was being done.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// Seconds spent.
        secs: f64,
        /// The last failure.
        last: String,
    },
    /// A backup's manifest PUT failed in a way that leaves its outcome unknown (the store may
    /// have saved it), and reading it back did not settle the question before the retry
    /// policy gave up. The backup may or may not be committed; `ferry ls` tells. Transient.
    #[error("the commit of backup {backup} of volume '{volume}' has an unknown outcome (its manifest {key} may have been written; `ferry ls` will tell): {last}")]
    CommitUnknown {
        /// The volume.
        volume: String,
        /// The backup ID.
        backup: String,
        /// The manifest key.
        key: String,
        /// The last failure.
        last: String,
    },
    /// The backup's manifest key holds a fence (0 bytes): a garbage collection stopped this
    /// backup because it did not answer in time, or the backup aborted itself. Nothing was
    /// committed under this name. Not retried (the name is fenced for good); running the
    /// backup again is safe ([`Error::is_retryable`]).
    #[error("backup {backup} of volume '{volume}' was stopped by a garbage collection (its manifest key {key} is fenced); nothing was committed under this name — run the backup again")]
    Fenced {
        /// The volume.
        volume: String,
        /// The backup ID.
        backup: String,
        /// The manifest key.
        key: String,
    },
    /// Another garbage collection holds the repository's GC claim. A refusal.
    #[error("garbage collection {gen} is running (host {host}, pid {pid}, started {started}); only one runs at a time. If that process is gone, run `ferry gc --takeover`")]
    GcRunning {
        /// Its generation.
        gen: u64,
        /// The host it runs on.
        host: String,
        /// Its process ID there.
        pid: u32,
        /// When it started.
        started: String,
    },
    /// A copy's destination is another repository than its source (another repository ID).
    /// A refusal.
    #[error("{url} is another repository (ID {found}) than the source (ID {expected}); a sync copies into an empty location or an earlier copy of the same repository")]
    OtherRepository {
        /// The destination.
        url: String,
        /// Its repository ID.
        found: String,
        /// The source's.
        expected: String,
    },
    /// A backup waited too long for a garbage collection to finish sweeping chunks it needs.
    /// Transient.
    #[error("waited {secs} s for garbage collection {gen} to finish sweeping chunks this backup needs; run the backup again later")]
    SweepWait {
        /// The GC generation.
        gen: u64,
        /// How long it waited.
        secs: u64,
    },
    /// A chunk a backup was about to reference is gone and the backup has no data to upload
    /// it again (it came from the parent's map). Integrity: the chain needs a full backup
    /// or an RBD backup that re-reads it.
    #[error("chunk {id} ({context}) is missing from the repository")]
    ChunkMissing {
        /// The chunk ID (hex).
        id: String,
        /// Where it was needed.
        context: String,
    },
    /// The volume has no (readable) backups. A refusal ([`Error::is_refusal`]).
    #[error("volume '{volume}' has no backups")]
    NoBackups {
        /// The volume name.
        volume: String,
    },
    /// No backup of the volume matches the spec. A refusal ([`Error::is_refusal`]).
    #[error("volume '{volume}' has no backup '{spec}'")]
    NoSuchBackup {
        /// The volume name.
        volume: String,
        /// The spec as written back by [`BackupSpec`](crate::BackupSpec)'s `Display`.
        spec: String,
    },
    /// The spec matches more than one backup, or reads differently as an ID prefix and as a
    /// snapshot name; ferry does not guess. A refusal ([`Error::is_refusal`]).
    #[error("'{spec}' is ambiguous in volume '{volume}': {detail}")]
    AmbiguousBackup {
        /// The volume name.
        volume: String,
        /// The spec as written back by [`BackupSpec`](crate::BackupSpec)'s `Display`.
        spec: String,
        /// The candidates and how to choose between them.
        detail: String,
    },
    /// A key slot's KDF cannot be used (not Argon2id version 0x13, or parameters out of the
    /// accepted range) or Argon2 failed; also reported when AES-GCM refuses to seal a
    /// plaintext (too long). Neither an authentication nor an integrity error.
    #[error("key derivation failed: {reason}")]
    Kdf {
        /// What failed.
        reason: String,
    },
}

impl Error {
    /// True when the error means stored data is damaged or not authentic (as opposed to an
    /// unreachable store or a usage problem).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            Error::Integrity { .. }
                | Error::SlotNotAuthentic { .. }
                | Error::ChunkIdMismatch { .. }
                | Error::DeltaDecode { .. }
                | Error::Decompress { .. }
                | Error::BadObject { .. }
                | Error::ManifestDecode { .. }
                | Error::ChunkMissing { .. }
        )
    }

    /// True when the store could not be reached or failed a request (network, timeouts,
    /// 5xx): retrying later may help. Never true for damaged data.
    pub fn is_transient(&self) -> bool {
        match self {
            // Credentials and permissions do not heal by retrying.
            Error::Store { source, .. } => !matches!(
                source,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
            ),
            Error::Unavailable { .. } | Error::CommitUnknown { .. } | Error::SweepWait { .. } => true,
            _ => false,
        }
    }

    /// True when running the whole operation again may succeed: the store was unavailable,
    /// or a garbage collection fenced this attempt ([`Error::Fenced`]).
    pub fn is_retryable(&self) -> bool {
        self.is_transient() || matches!(self, Error::Fenced { .. })
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
                | Error::Protected { .. }
                | Error::NoBackups { .. }
                | Error::NoSuchBackup { .. }
                | Error::AmbiguousBackup { .. }
                | Error::GcRunning { .. }
                | Error::OtherRepository { .. }
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

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
