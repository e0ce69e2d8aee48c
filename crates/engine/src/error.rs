//! One error type for every pipeline. Its variants say what a caller must know to act: was
//! the request refused (nothing changed), is the data bad (never retry), is the network or
//! store unavailable (retrying may help), did Ceph fail, was the input or the call wrong.

/// Any error, boxed, as the cause of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is; decides exit codes, retries and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// A precondition does not hold (broken chain, existing target, lease held, unknown
    /// backup, invalid name or size); nothing was changed.
    Refused,
    /// Stored data is damaged, missing or not authentic. Never retried.
    Integrity,
    /// The object store or network is unavailable or failed a request; retrying later may help.
    Transient,
    /// The Ceph cluster or the `rbd` tool failed.
    Source,
    /// The passphrase is wrong or missing.
    Auth,
    /// The input (a diff stream) is invalid or its producer failed.
    Input,
    /// The caller used the library wrongly (contradicting options).
    Usage,
    /// Anything else: local I/O of a restore target, the index, an internal failure.
    Failed,
}

/// A pipeline error: a kind, a message, and the cause.
///
/// `Display` shows the message only; the cause is [`std::error::Error::source`], so a
/// caller that prints the whole chain (anyhow's `{:#}`) sees "message: cause: …" once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// See [`ErrorKind::Refused`].
    #[error("{message}")]
    Refused {
        /// What was refused and why.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Integrity`].
    #[error("{message}")]
    Integrity {
        /// What is damaged.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Transient`].
    #[error("{message}")]
    Transient {
        /// What could not be reached.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Source`].
    #[error("{message}")]
    Source {
        /// What failed in Ceph.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Auth`].
    #[error("{message}")]
    Auth {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Input`].
    #[error("{message}")]
    Input {
        /// What is wrong with the input.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// See [`ErrorKind::Usage`].
    #[error("{message}")]
    Usage {
        /// What was wrong with the call.
        message: String,
    },
    /// See [`ErrorKind::Failed`].
    #[error("{message}")]
    Failed {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message and an optional cause.
    pub fn new(kind: ErrorKind, message: impl Into<String>, source: Option<BoxError>) -> Error {
        let message = message.into();
        match kind {
            ErrorKind::Refused => Error::Refused { message, source },
            ErrorKind::Integrity => Error::Integrity { message, source },
            ErrorKind::Transient => Error::Transient { message, source },
            ErrorKind::Source => Error::Source { message, source },
            ErrorKind::Auth => Error::Auth { message, source },
            ErrorKind::Input => Error::Input { message, source },
            ErrorKind::Usage => Error::Usage {
                message: match source {
                    Some(s) => format!("{message}: {s}"),
                    None => message,
                },
            },
            ErrorKind::Failed => Error::Failed { message, source },
        }
    }

    /// A refusal (nothing was changed).
    pub fn refused(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Refused, message, None)
    }

    /// Damaged data.
    pub fn integrity(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Integrity, message, None)
    }

    /// Invalid input.
    pub fn input(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Input, message, None)
    }

    /// A failure of another kind.
    pub fn failed(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Failed, message, None)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Integrity { .. } => ErrorKind::Integrity,
            Error::Transient { .. } => ErrorKind::Transient,
            Error::Source { .. } => ErrorKind::Source,
            Error::Auth { .. } => ErrorKind::Auth,
            Error::Input { .. } => ErrorKind::Input,
            Error::Usage { .. } => ErrorKind::Usage,
            Error::Failed { .. } => ErrorKind::Failed,
        }
    }

    /// The message of this layer (without the causes).
    pub fn message(&self) -> &str {
        match self {
            Error::Refused { message, .. }
            | Error::Integrity { message, .. }
            | Error::Transient { message, .. }
            | Error::Source { message, .. }
            | Error::Auth { message, .. }
            | Error::Input { message, .. }
            | Error::Usage { message }
            | Error::Failed { message, .. } => message,
        }
    }

    /// Wraps this error in a message saying what was being done; the kind is kept.
    pub fn context(self, message: impl Into<String>) -> Error {
        let kind = self.kind();
        Error::new(kind, message, Some(Box::new(self)))
    }

    /// Finds a typed cause anywhere in the chain (e.g. the restore report).
    pub fn find<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }
}

/// Adds context to results, keeping the error's kind.
pub trait ResultExt<T> {
    /// Wraps the error in `message`.
    fn context(self, message: impl Into<String>) -> Result<T>;
    /// Wraps the error in a lazily built message.
    fn with_context<M: Into<String>>(self, f: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(message))
    }
    fn with_context<M: Into<String>>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// The kind a repository error belongs to.
pub fn repo_error_kind(e: &ferry_repo::Error) -> ErrorKind {
    match e {
        e if e.is_integrity() => ErrorKind::Integrity,
        e if e.is_auth() => ErrorKind::Auth,
        e if e.is_refusal() => ErrorKind::Refused,
        e if e.is_retryable() => ErrorKind::Transient,
        // A missing chunk during a restore or audit is reported as such by those pipelines;
        // elsewhere a missing object (a manifest forgotten meanwhile, no repository) is not
        // evidence of damage.
        _ => ErrorKind::Failed,
    }
}

// Conversions: the message is the cause's own text (which already names its cause), so
// nothing prints twice; the kind is decided by what the cause is.

impl From<ferry_repo::Error> for Error {
    fn from(e: ferry_repo::Error) -> Error {
        Error::new(repo_error_kind(&e), e.to_string(), None)
    }
}

impl From<ferry_ceph::Error> for Error {
    fn from(e: ferry_ceph::Error) -> Error {
        Error::new(ErrorKind::Source, e.to_string(), None)
    }
}

impl From<rbd_diff::Error> for Error {
    fn from(e: rbd_diff::Error) -> Error {
        Error::new(ErrorKind::Input, e.to_string(), None)
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::new(ErrorKind::Failed, format!("a worker task failed: {e}"), None)
    }
}
