//! How a pipeline tells its caller what it is doing: progress for bars, warnings for the
//! log, and per-run results for summaries and metrics. The CLI draws progress bars from it;
//! a daemon counts it into metrics. Observers must be cheap and must not block.

use std::sync::Arc;

use ferry_repo::{BackupRef, BackupStats};

/// What a pipeline is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Reading a diff stream into a new backup.
    Backup,
    /// Writing a backup to a target.
    Restore,
    /// Checking manifests and chunks.
    Audit,
    /// Deleting unreferenced chunks (progress in chunks deleted).
    Gc,
    /// Reading source snapshots to compare them with backups (progress in bytes).
    CompareSource,
    /// Copying backups to a second repository (progress in bytes copied).
    Sync,
}

/// One thing that happened.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// An operation began; `total` is the amount of work (in [`Event::Progress`]'s units), when known.
    Started {
        /// Which operation.
        op: Operation,
        /// Work to do, if known (a stream from stdin has no known length).
        total: Option<u64>,
    },
    /// Work done so far (monotonic within one operation): bytes of the diff stream for a
    /// backup, bytes of the volume for a restore, chunks checked for an audit.
    Progress {
        /// Which operation.
        op: Operation,
        /// Units done so far (see above).
        done: u64,
    },
    /// The operation ended (successfully or not).
    Finished {
        /// Which operation.
        op: Operation,
    },
    /// Something the operator should know that did not stop the operation.
    Warning {
        /// What happened.
        message: &'a str,
    },
    /// A backup was committed (its manifest written).
    Committed {
        /// The new backup.
        backup: &'a BackupRef,
        /// What it cost.
        stats: &'a BackupStats,
    },
}

/// Receives a pipeline's events.
pub trait Observer: Send + Sync {
    /// Called for every event, from any thread.
    fn event(&self, event: Event<'_>);
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn event(&self, _: Event<'_>) {}
}

/// Records every event (for tests and for callers that inspect a run afterwards).
#[derive(Debug, Default)]
pub struct Recorder {
    events: std::sync::Mutex<Vec<String>>,
}

impl Recorder {
    /// A new, empty recorder.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// The events so far, each as its `Debug` text.
    pub fn events(&self) -> Vec<String> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Observer for Recorder {
    fn event(&self, event: Event<'_>) {
        if let Ok(mut e) = self.events.lock() {
            e.push(format!("{event:?}"));
        }
    }
}

/// Shared observer handle.
pub type SharedObserver = Arc<dyn Observer>;

/// Sends a warning to the observer (which decides where it is shown or logged).
pub(crate) fn warn(obs: &dyn Observer, message: &str) {
    tracing::debug!("warning: {message}");
    obs.event(Event::Warning { message });
}
