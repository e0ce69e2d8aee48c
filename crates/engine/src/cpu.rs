//! CPU-heavy work (hashing, compression, encryption) off the async threads, at most one job
//! per core however many requests are in flight, so memory stays bounded.

use std::sync::OnceLock;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

static CPU: OnceLock<Semaphore> = OnceLock::new();

/// The cores this process may use (2 when that cannot be known).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// A permit for one CPU-heavy job: one per core, process-wide.
pub(crate) async fn permit() -> Result<SemaphorePermit<'static>> {
    let sem = CPU.get_or_init(|| Semaphore::new(cores()));
    sem.acquire().await.map_err(|_| Error::failed("the CPU semaphore was closed"))
}

/// Runs `f` on the blocking pool under a CPU permit.
pub(crate) async fn run<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _permit = permit().await?;
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Runs blocking work (Ceph calls, file I/O) on the blocking pool, never on an async worker.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}
