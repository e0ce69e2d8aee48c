//! A bandwidth limit for uploads: one token bucket shared by every request of the store and
//! all its clones (one [`UploadLimiter`] per store; clones of the limiter share the bucket).
//!
//! - The rate is in bytes per second and can be changed at run time with
//!   [`UploadLimiter::set_rate`] (a scheduler switching rates by time window); waiting uploads
//!   pick up the new rate at once. `None` = unlimited; `Some(0)` = paused (uploads wait until
//!   the rate changes).
//! - A PUT of a chunk (`chunks/`, `quarantine/`) waits for tokens for its **whole payload
//!   before the request is sent**; so does each multipart part. Nothing else is limited:
//!   metadata PUTs (manifests, sessions, fences, acknowledgements, GC records) never queue
//!   behind bulk data, and GET, HEAD, LIST, DELETE pass straight through.
//! - The bucket holds at most one second of the rate ([`UploadLimiter::burst`]), so after a
//!   quiet period at most that much goes out at once; over any interval of length `t` at most
//!   `rate × t + burst` bytes are released. Payloads larger than the burst are fine: they wait
//!   until the bucket has paid for them. Waiters are served in arrival order.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions, UploadPart,
};
use tokio::sync::Notify;

/// Smallest burst, so that tiny rates still let small objects through in one piece.
const MIN_BURST: u64 = 64 << 10;

/// The bucket's bookkeeping, in bytes. `reserved` is the total of all payloads that asked for
/// tokens; `credit` the total the bucket has paid out so far (it grows at the rate, and never
/// exceeds `reserved + burst`, which is what bounds a burst). A waiter whose reservation ends at
/// byte `t` may go once `credit >= t`.
#[derive(Debug)]
struct Bucket {
    rate: Option<u64>,
    burst: u64,
    reserved: f64,
    credit: f64,
    last: Instant,
}

fn burst_for(rate: u64) -> u64 {
    rate.max(MIN_BURST)
}

impl Bucket {
    fn new(rate: Option<u64>, now: Instant) -> Bucket {
        let burst = rate.map(burst_for).unwrap_or(MIN_BURST);
        Bucket {
            rate,
            burst,
            reserved: 0.0,
            credit: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.credit = (self.credit + dt * rate as f64).min(self.reserved + self.burst as f64);
        }
        self.last = now.max(self.last);
    }

    /// Reserves `n` bytes; returns the ticket (the end of the reservation), or `None` when
    /// unlimited.
    fn reserve(&mut self, n: u64, now: Instant) -> Option<f64> {
        self.rate?;
        self.refill(now);
        self.reserved += n as f64;
        Some(self.reserved)
    }

    /// How long the holder of `ticket` still has to wait: `Some(ZERO)` = go, `None` = wait for
    /// a rate change (paused).
    fn wait_for(&mut self, ticket: f64, now: Instant) -> Option<Duration> {
        let Some(rate) = self.rate else {
            return Some(Duration::ZERO);
        };
        self.refill(now);
        if self.credit >= ticket {
            return Some(Duration::ZERO);
        }
        if rate == 0 {
            return None;
        }
        Some(Duration::from_secs_f64((ticket - self.credit) / rate as f64))
    }

    /// Gives back the reservation ending at `ticket` (`n` bytes) that will never be sent (its
    /// upload was cancelled while waiting). The last one in the queue is simply taken off;
    /// one in the middle moves everyone behind it up by `n` — and, as the bucket keeps no
    /// per-waiter record, those ahead of it too: at most `n` bytes go early, once.
    fn refund(&mut self, ticket: f64, n: u64, now: Instant) {
        self.refill(now);
        if self.credit >= ticket {
            // Already paid for: the bytes were owed to it, nobody waits on them.
            return;
        }
        if ticket >= self.reserved {
            self.reserved -= n as f64;
            self.credit = self.credit.min(self.reserved + self.burst as f64);
        } else {
            self.credit = (self.credit + n as f64).min(self.reserved + self.burst as f64);
        }
    }

    fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        self.refill(now);
        match (self.rate, rate) {
            (None, Some(r)) => {
                // Coming from unlimited: nothing is owed, start with a full bucket.
                self.burst = burst_for(r);
                self.credit = self.reserved + self.burst as f64;
            }
            (_, Some(r)) => {
                self.burst = burst_for(r);
                self.credit = self.credit.min(self.reserved + self.burst as f64);
            }
            (_, None) => {
                // Everyone waiting may go; a later limit starts afresh.
                self.credit = self.reserved;
            }
        }
        self.rate = rate;
        self.last = now;
    }
}

#[derive(Debug)]
struct Shared {
    bucket: Mutex<Bucket>,
    changed: Notify,
}

/// The shared token bucket of an [`UploadLimitStore`]; clones share it.
#[derive(Clone)]
pub struct UploadLimiter {
    shared: Arc<Shared>,
}

impl fmt::Debug for UploadLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadLimiter").field("rate", &self.rate()).finish()
    }
}

impl UploadLimiter {
    /// A limiter at `rate` bytes per second (`None` = unlimited).
    pub fn new(rate: Option<u64>) -> UploadLimiter {
        UploadLimiter {
            shared: Arc::new(Shared {
                bucket: Mutex::new(Bucket::new(rate, Instant::now())),
                changed: Notify::new(),
            }),
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // The bucket holds plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.shared.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current rate in bytes per second (`None` = unlimited).
    pub fn rate(&self) -> Option<u64> {
        self.bucket().rate
    }

    /// The most that can go out at once after a quiet period: one second of the rate, at
    /// least 64 KiB.
    pub fn burst(&self) -> u64 {
        self.bucket().burst
    }

    /// Changes the rate for every clone of the store at once; uploads already waiting
    /// recompute their wait with the new rate. `None` = unlimited, `Some(0)` = paused.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.bucket().set_rate(rate, Instant::now());
        self.shared.changed.notify_waiters();
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        let ticket = self.reserve(bytes);
        // A waiter dropped before its turn (a cancelled upload) gives its bytes back, or
        // everyone behind it would wait for bytes that are never sent.
        struct Refund<'a> {
            limiter: &'a UploadLimiter,
            ticket: Option<f64>,
            bytes: u64,
        }
        impl Drop for Refund<'_> {
            fn drop(&mut self) {
                if let Some(t) = self.ticket {
                    self.limiter.bucket().refund(t, self.bytes, Instant::now());
                    self.limiter.shared.changed.notify_waiters();
                }
            }
        }
        let mut refund = Refund {
            limiter: self,
            ticket,
            bytes,
        };
        self.wait(ticket).await;
        refund.ticket = None;
    }

    /// Takes a place in the queue for `bytes` (`None`: unlimited, nothing to wait for).
    fn reserve(&self, bytes: u64) -> Option<f64> {
        self.bucket().reserve(bytes, Instant::now())
    }

    /// Waits until the reservation `ticket` is paid for.
    async fn wait(&self, ticket: Option<f64>) {
        let Some(ticket) = ticket else {
            return;
        };
        loop {
            // Registered before looking at the bucket, so a rate change in between is not
            // missed.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = self.bucket().wait_for(ticket, Instant::now());
            match wait {
                Some(d) if d.is_zero() => return,
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// The bulk of what a repository uploads: chunks (and quarantined copies of them). Only these
/// wait for the limiter; manifests, sessions, fences, acknowledgements and GC records are small
/// and must never queue behind gigabytes of chunks — a backup's commit has a deadline (its
/// lease), and a GC waits for acknowledgements.
fn is_bulk(location: &Path) -> bool {
    let key = location.as_ref();
    key.starts_with("chunks/") || key.starts_with("quarantine/")
}

/// Limits the upload bandwidth of the wrapped store (see the [module documentation](self)).
#[derive(Debug)]
pub struct UploadLimitStore {
    inner: Arc<dyn ObjectStore>,
    limiter: UploadLimiter,
}

impl UploadLimitStore {
    /// Wraps `inner`; uploads wait on `limiter` (which may be shared with other stores).
    pub fn new(inner: Arc<dyn ObjectStore>, limiter: UploadLimiter) -> UploadLimitStore {
        UploadLimitStore { inner, limiter }
    }

    /// The limiter, to change the rate.
    pub fn limiter(&self) -> &UploadLimiter {
        &self.limiter
    }
}

impl fmt::Display for UploadLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limiter.rate() {
            Some(r) => write!(f, "UploadLimitStore({r} B/s, {})", self.inner),
            None => write!(f, "UploadLimitStore(unlimited, {})", self.inner),
        }
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for UploadLimitStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        if is_bulk(location) {
            self.limiter.acquire(payload.content_length() as u64).await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        if !is_bulk(location) {
            return Ok(upload);
        }
        Ok(Box::new(LimitedUpload {
            upload,
            limiter: self.limiter.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts wait for tokens before they are sent.
#[derive(Debug)]
struct LimitedUpload {
    upload: Box<dyn MultipartUpload>,
    limiter: UploadLimiter,
}

#[async_trait]
impl MultipartUpload for LimitedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // Reserve now (part order = reservation order), send once paid for.
        let ticket = self.limiter.reserve(data.content_length() as u64);
        let limiter = self.limiter.clone();
        let part = self.upload.put_part(data);
        Box::pin(async move {
            limiter.wait(ticket).await;
            part.await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.upload.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.upload.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    const MB: u64 = 1_000_000;

    #[test]
    fn bucket_releases_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(MB), t0);
        assert_eq!(b.burst, MB);
        // The first second's worth goes at once.
        let t = b.reserve(MB, t0).unwrap();
        assert_eq!(b.wait_for(t, t0), Some(Duration::ZERO));
        // The next 0.5 MB waits half a second; a 2 MB payload behind it 2.5 s in all.
        let t1 = b.reserve(MB / 2, t0).unwrap();
        assert_eq!(b.wait_for(t1, t0), Some(Duration::from_millis(500)));
        let t2 = b.reserve(2 * MB, t0).unwrap();
        assert_eq!(b.wait_for(t2, t0), Some(Duration::from_millis(2500)));
        let later = t0 + Duration::from_millis(500);
        assert_eq!(b.wait_for(t1, later), Some(Duration::ZERO));
        assert_eq!(b.wait_for(t2, later), Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_refunded_reservation_moves_the_queue_up() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(MB), t0);
        let _paid = b.reserve(MB, t0).unwrap();
        let cancelled = b.reserve(4 * MB, t0).unwrap();
        let behind = b.reserve(MB, t0).unwrap();
        assert_eq!(b.wait_for(cancelled, t0), Some(Duration::from_secs(4)));
        assert_eq!(b.wait_for(behind, t0), Some(Duration::from_secs(5)));
        // The 4 MB upload is cancelled while waiting: the one behind it waits 1 s, not 5.
        b.refund(cancelled, 4 * MB, t0);
        assert_eq!(b.wait_for(behind, t0), Some(Duration::from_secs(1)));
        // The last in the queue is taken off exactly: a new one waits only for `behind`.
        b.refund(behind, MB, t0);
        let next = b.reserve(MB, t0).unwrap();
        assert_eq!(b.wait_for(next, t0), Some(Duration::from_secs(1)));
    }

    #[test]
    fn idle_bucket_holds_at_most_one_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(MB), t0);
        let much_later = t0 + Duration::from_secs(3600);
        // An hour of idling still allows only one burst without waiting.
        let t = b.reserve(MB, much_later).unwrap();
        assert_eq!(b.wait_for(t, much_later), Some(Duration::ZERO));
        let t = b.reserve(MB, much_later).unwrap();
        assert_eq!(b.wait_for(t, much_later), Some(Duration::from_secs(1)));
    }

    #[test]
    fn rate_changes_apply_to_waiters() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Some(MB), t0);
        b.reserve(MB, t0).unwrap();
        let t = b.reserve(4 * MB, t0).unwrap();
        assert_eq!(b.wait_for(t, t0), Some(Duration::from_secs(4)));
        b.set_rate(Some(4 * MB), t0);
        assert_eq!(b.wait_for(t, t0), Some(Duration::from_secs(1)));
        b.set_rate(Some(0), t0);
        assert_eq!(b.wait_for(t, t0), None, "paused");
        b.set_rate(None, t0);
        assert_eq!(b.wait_for(t, t0), Some(Duration::ZERO));
        assert_eq!(b.reserve(10 * MB, t0), None, "unlimited reserves nothing");
        b.set_rate(Some(MB), t0);
        let t = b.reserve(MB, t0).unwrap();
        assert_eq!(b.wait_for(t, t0), Some(Duration::ZERO), "a limit after unlimited starts full");
    }

    #[test]
    fn small_rates_have_a_minimum_burst() {
        let mut b = Bucket::new(Some(1000), Instant::now());
        assert_eq!(b.burst, MIN_BURST);
        b.set_rate(Some(10 * MB), Instant::now());
        assert_eq!(b.burst, 10 * MB);
    }

    /// Real time: 1 MB through a 400 kB/s limit (400 kB burst) needs at least 1.5 s. Only the
    /// lower bound is tight (sleeping never ends early); the upper bound is generous.
    #[tokio::test]
    async fn store_respects_the_rate_roughly() {
        let store = Arc::new(UploadLimitStore::new(Arc::new(InMemory::new()), UploadLimiter::new(Some(400_000))));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..10 {
            // Two "connections" sharing one limiter.
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.put(&Path::from(format!("chunks/c/{i}")), PutPayload::from(vec![0u8; 100_000]))
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1400), "1 MB at 400 kB/s took only {took:?}");
        assert!(took < Duration::from_secs(20), "took {took:?}");
        // Reads are not limited, and unlimited uploads do not wait.
        store.limiter().set_rate(None);
        let start = Instant::now();
        store
            .put(&Path::from("chunks/big"), PutPayload::from(vec![0u8; 5_000_000]))
            .await
            .unwrap();
        store.get(&Path::from("chunks/big")).await.unwrap().bytes().await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn paused_uploads_resume_when_the_rate_changes() {
        let limiter = UploadLimiter::new(Some(0));
        let store = Arc::new(UploadLimitStore::new(Arc::new(InMemory::new()), limiter.clone()));
        // The initial burst lets 64 KiB through; the next upload waits for the rate change.
        store.put(&Path::from("chunks/a"), PutPayload::from(vec![0u8; 1000])).await.unwrap();
        let s = store.clone();
        let waiting = tokio::spawn(async move { s.put(&Path::from("chunks/b"), PutPayload::from(vec![0u8; 200_000])).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a paused limiter let 200 kB through");
        limiter.set_rate(None);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(store.head(&Path::from("chunks/b")).await.unwrap().size, 200_000);
    }

    #[tokio::test]
    async fn metadata_never_waits_behind_chunks() {
        let limiter = UploadLimiter::new(Some(0));
        let store = Arc::new(UploadLimitStore::new(Arc::new(InMemory::new()), limiter.clone()));
        store
            .put(&Path::from("chunks/a"), PutPayload::from(vec![0u8; 64 << 10]))
            .await
            .unwrap();
        let s = store.clone();
        let chunk = tokio::spawn(async move { s.put(&Path::from("chunks/b"), PutPayload::from(vec![0u8; 200_000])).await });
        // Paused for chunks; a manifest, a session record and a fence go at once.
        for key in ["volumes/v/backups/x", "sessions/v/x/session", "gc/1/ack"] {
            tokio::time::timeout(
                Duration::from_secs(2),
                store.put(&Path::from(key), PutPayload::from(vec![1u8; 300_000])),
            )
            .await
            .unwrap_or_else(|_| panic!("{key} waited for the limiter"))
            .unwrap();
        }
        assert!(!chunk.is_finished());
        limiter.set_rate(None);
        chunk.await.unwrap().unwrap();
    }
}
