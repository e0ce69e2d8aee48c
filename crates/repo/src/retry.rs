//! Application-level retries of store requests that failed transiently.
//!
//! `object_store` retries a request inside one attempt after a 5xx, 429 or 408 answer, within
//! its own timeout — create-only PUTs included, so a manifest PUT can be resent by the client
//! itself (FORMAT.md §12.4 names the timing assumption that covers it) — but a burst of 503s
//! or one slow response can outlast it. The repository therefore retries every request whose error is transient
//! ([`crate::Error::is_transient`]) with exponential backoff and an overall deadline, and
//! resolves outcomes that a failure leaves unknown by reading back (see
//! [`crate::Repository::commit`]). Integrity failures (a tag that does not verify, a chunk ID
//! that does not match) are never retried: they are not the network's fault.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How transient store failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the first retry; doubled after each (with up to 25 % random jitter).
    pub first_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// 8 attempts, 200 ms doubling to 10 s, within 2 minutes.
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..Default::default()
        }
    }

    /// Runs `attempt` until it succeeds, fails with a non-transient error, or the policy
    /// gives up; then a transient failure becomes [`Error::Unavailable`] naming `what`.
    pub async fn run<T, F, Fut>(&self, what: impl Fn() -> String, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut backoff = self.first_backoff;
        let mut n = 0u32;
        loop {
            n += 1;
            match attempt().await {
                Err(e) if e.is_transient() => {
                    let jitter = backoff.mul_f64(rand::random::<f64>() * 0.25);
                    let wait = backoff + jitter;
                    if n >= self.attempts.max(1) || started.elapsed() + wait > self.deadline {
                        if n == 1 {
                            return Err(e);
                        }
                        return Err(Error::Unavailable {
                            what: what(),
                            attempts: n,
                            secs: started.elapsed().as_secs_f64(),
                            last: e.to_string(),
                        });
                    }
                    tracing::debug!("{}: attempt {n} failed ({e}); retrying in {wait:?}", what());
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::Store {
            op: "get",
            path: "x".into(),
            source: object_store::Error::Generic {
                store: "test",
                source: "503".into(),
            },
        }
    }

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            deadline: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_reported_as_unavailable() {
        let calls = AtomicU32::new(0);
        let r = fast(4)
            .run(
                || "reading x".into(),
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        Err(transient())
                    } else {
                        Ok(7)
                    }
                },
            )
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let e = fast(3)
            .run(
                || "reading x".into(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(transient())
                },
            )
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(matches!(e, Error::Unavailable { attempts: 3, .. }), "{e}");
        assert!(e.is_transient() && !e.is_integrity());
    }

    #[tokio::test]
    async fn integrity_failures_are_never_retried() {
        let calls = AtomicU32::new(0);
        let e = fast(5)
            .run(
                || "reading x".into(),
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(Error::Integrity { path: "x".into() })
                },
            )
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(e.is_integrity());
    }
}
