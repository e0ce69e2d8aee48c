//! A request counter: an [`ObjectStore`] that forwards everything and counts what passes.
//!
//! [`open_store`](super::open_store) always installs it outermost, so the counts are the
//! requests ferry asked for — before `object_store`'s own HTTP retries (invisible here) and
//! including requests that an injected fault or the upload limiter delayed or failed.
//!
//! What is counted (one [`RequestStats`] field each):
//! - `put`: single PUTs (`put_opts`); `bytes_up` += the payload length of each, whether or not
//!   it succeeded (a create-only PUT answered `AlreadyExists` still sent its body).
//! - `multipart` / `parts`: multipart uploads started and parts uploaded (`bytes_up` += each
//!   part's length).
//! - `get`: `get_opts` without `head`, and `get_ranges` calls (one per call, however many
//!   ranges). `bytes_down` counts **the bytes actually streamed** to the caller from a GET's
//!   body (an aborted or unread body counts only what was read), plus the bytes `get_ranges`
//!   returned. Local files (`file://`, whose payload is an open file rather than a stream)
//!   count the **declared range size** of the result instead, when the GET returns.
//! - `head`: `get_opts` with `head: true` (what `ObjectStoreExt::head` sends).
//! - `list`: `list`, `list_with_offset` and `list_with_delimiter` calls (one per call, not per
//!   page: the pagination happens inside the backend).
//! - `delete`: each location passed to `delete_stream` (`ObjectStoreExt::delete` is one).
//! - `copy`, `rename`: `copy_opts`, `rename_opts` calls.
//! - `failed`: calls or stream items that ended in an error other than an answer about the
//!   object's state. `NotFound`, `AlreadyExists`, `Precondition` and `NotModified` are answers
//!   (a HEAD of a missing chunk, a create-only PUT of an existing one) and are not counted.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};
use serde::Serialize;

/// A snapshot of the counters of a [`CountingStore`] (see the [module documentation](self) for
/// what each field counts). Serializes with these field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Single PUTs.
    pub put: u64,
    /// Multipart uploads started.
    pub multipart: u64,
    /// Multipart parts uploaded.
    pub parts: u64,
    /// GETs with a body (`get_ranges` counts once per call).
    pub get: u64,
    /// HEADs.
    pub head: u64,
    /// Listings (calls, not pages).
    pub list: u64,
    /// Deleted locations.
    pub delete: u64,
    /// Server-side copies.
    pub copy: u64,
    /// Renames.
    pub rename: u64,
    /// Requests that failed (not counting `NotFound`, `AlreadyExists`, `Precondition`,
    /// `NotModified`).
    pub failed: u64,
    /// Payload bytes sent by PUTs and multipart parts.
    pub bytes_up: u64,
    /// Body bytes received by GETs (streamed bytes; declared range for local files).
    pub bytes_down: u64,
}

impl RequestStats {
    /// The requests made between `earlier` and `self` (field by field, saturating).
    pub fn since(&self, earlier: &RequestStats) -> RequestStats {
        RequestStats {
            put: self.put.saturating_sub(earlier.put),
            multipart: self.multipart.saturating_sub(earlier.multipart),
            parts: self.parts.saturating_sub(earlier.parts),
            get: self.get.saturating_sub(earlier.get),
            head: self.head.saturating_sub(earlier.head),
            list: self.list.saturating_sub(earlier.list),
            delete: self.delete.saturating_sub(earlier.delete),
            copy: self.copy.saturating_sub(earlier.copy),
            rename: self.rename.saturating_sub(earlier.rename),
            failed: self.failed.saturating_sub(earlier.failed),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }

    /// All requests of any kind (bytes not included).
    pub fn total_requests(&self) -> u64 {
        self.put + self.multipart + self.parts + self.get + self.head + self.list + self.delete + self.copy + self.rename
    }
}

#[derive(Debug, Default)]
struct Counters {
    put: AtomicU64,
    multipart: AtomicU64,
    parts: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    copy: AtomicU64,
    rename: AtomicU64,
    failed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// True for errors that are a real failure, not an answer about the object's state.
fn is_failure(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
    )
}

/// A handle on the counters of a [`CountingStore`]; clones share them.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counters: Arc<Counters>,
}

impl RequestCounter {
    /// The counts so far.
    pub fn snapshot(&self) -> RequestStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestStats {
            put: get(&c.put),
            multipart: get(&c.multipart),
            parts: get(&c.parts),
            get: get(&c.get),
            head: get(&c.head),
            list: get(&c.list),
            delete: get(&c.delete),
            copy: get(&c.copy),
            rename: get(&c.rename),
            failed: get(&c.failed),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
        }
    }

    fn record<T>(&self, r: object_store::Result<T>) -> object_store::Result<T> {
        if let Err(e) = &r {
            if is_failure(e) {
                add(&self.counters.failed, 1);
            }
        }
        r
    }
}

/// Counts every request and the bytes up and down (see the [module documentation](self)).
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counter: RequestCounter,
}

impl CountingStore {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: Arc<dyn ObjectStore>) -> CountingStore {
        CountingStore {
            inner,
            counter: RequestCounter::default(),
        }
    }

    /// The handle on this store's counters.
    pub fn counter(&self) -> RequestCounter {
        self.counter.clone()
    }

    /// The counts so far.
    pub fn stats(&self) -> RequestStats {
        self.counter.snapshot()
    }

    fn count_stream<T: Send + 'static>(
        &self,
        s: BoxStream<'static, object_store::Result<T>>,
    ) -> BoxStream<'static, object_store::Result<T>> {
        let counter = self.counter.clone();
        s.map(move |r| counter.record(r)).boxed()
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for CountingStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        add(&self.counter.counters.put, 1);
        add(&self.counter.counters.bytes_up, payload.content_length() as u64);
        self.counter.record(self.inner.put_opts(location, payload, opts).await)
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        add(&self.counter.counters.multipart, 1);
        let upload = self.counter.record(self.inner.put_multipart_opts(location, opts).await)?;
        Ok(Box::new(CountingUpload {
            upload,
            counter: self.counter.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let c = &self.counter.counters;
        if options.head {
            add(&c.head, 1);
            return self.counter.record(self.inner.get_opts(location, options).await);
        }
        add(&c.get, 1);
        let r = self.counter.record(self.inner.get_opts(location, options).await)?;
        let payload = match r.payload {
            GetResultPayload::Stream(s) => {
                let counter = self.counter.clone();
                GetResultPayload::Stream(
                    s.map(move |chunk| {
                        if let Ok(b) = &chunk {
                            add(&counter.counters.bytes_down, b.len() as u64);
                        }
                        counter.record(chunk)
                    })
                    .boxed(),
                )
            }
            file @ GetResultPayload::File(..) => {
                add(&c.bytes_down, r.range.end - r.range.start);
                file
            }
        };
        Ok(GetResult { payload, ..r })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        add(&self.counter.counters.get, 1);
        let r = self.counter.record(self.inner.get_ranges(location, ranges).await)?;
        add(&self.counter.counters.bytes_down, r.iter().map(|b| b.len() as u64).sum());
        Ok(r)
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        let counter = self.counter.clone();
        let locations = locations
            .inspect(move |l| {
                if l.is_ok() {
                    add(&counter.counters.delete, 1);
                }
            })
            .boxed();
        self.count_stream(self.inner.delete_stream(locations))
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        add(&self.counter.counters.list, 1);
        self.count_stream(self.inner.list(prefix))
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        add(&self.counter.counters.list, 1);
        self.count_stream(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        add(&self.counter.counters.list, 1);
        self.counter.record(self.inner.list_with_delimiter(prefix).await)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        add(&self.counter.counters.copy, 1);
        self.counter.record(self.inner.copy_opts(from, to, options).await)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        add(&self.counter.counters.rename, 1);
        self.counter.record(self.inner.rename_opts(from, to, options).await)
    }
}

/// A multipart upload whose parts are counted.
#[derive(Debug)]
struct CountingUpload {
    upload: Box<dyn MultipartUpload>,
    counter: RequestCounter,
}

#[async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        add(&self.counter.counters.parts, 1);
        add(&self.counter.counters.bytes_up, data.content_length() as u64);
        let part = self.upload.put_part(data);
        let counter = self.counter.clone();
        Box::pin(async move { counter.record(part.await) })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.counter.record(self.upload.complete().await)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.counter.record(self.upload.abort().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutMode};

    fn store() -> CountingStore {
        CountingStore::new(Arc::new(InMemory::new()))
    }

    #[tokio::test]
    async fn counts_exactly() {
        let s = store();
        let a = Path::from("chunks/aa/1");
        let b = Path::from("chunks/bb/2");
        s.put(&a, PutPayload::from(vec![1u8; 100])).await.unwrap();
        s.put(&b, PutPayload::from(vec![2u8; 50])).await.unwrap();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let err = s.put_opts(&a, PutPayload::from(vec![3u8; 10]), create).await.unwrap_err();
        assert!(matches!(err, object_store::Error::AlreadyExists { .. }));
        assert_eq!(s.get(&a).await.unwrap().bytes().await.unwrap().len(), 100);
        assert_eq!(s.get_range(&b, 10..30).await.unwrap().len(), 20);
        assert_eq!(s.head(&a).await.unwrap().size, 100);
        assert!(matches!(
            s.head(&Path::from("nope")).await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert_eq!(s.list(Some(&Path::from("chunks"))).try_collect::<Vec<_>>().await.unwrap().len(), 2);
        s.list_with_delimiter(None).await.unwrap();
        s.copy(&a, &Path::from("c")).await.unwrap();
        s.rename(&Path::from("c"), &Path::from("d")).await.unwrap();
        s.delete(&b).await.unwrap();
        let ranges = s.get_ranges(&a, &[0..10, 20..25]).await.unwrap();
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 15);

        assert_eq!(
            s.stats(),
            RequestStats {
                put: 3,
                multipart: 0,
                parts: 0,
                get: 3,
                head: 2,
                list: 2,
                delete: 1,
                copy: 1,
                rename: 1,
                failed: 0,
                bytes_up: 160,
                bytes_down: 135,
            }
        );
    }

    #[tokio::test]
    async fn body_bytes_are_counted_as_streamed() {
        let s = store();
        let a = Path::from("x");
        s.put(&a, PutPayload::from(vec![0u8; 1000])).await.unwrap();
        let before = s.stats();
        // A GET whose body is never read moved no bytes to ferry.
        drop(s.get(&a).await.unwrap());
        let after = s.stats().since(&before);
        assert_eq!((after.get, after.bytes_down), (1, 0));
        let mut body = s.get(&a).await.unwrap().into_stream();
        let first = body.try_next().await.unwrap().unwrap();
        drop(body);
        assert_eq!(s.stats().since(&before).bytes_down, first.len() as u64);
    }

    #[tokio::test]
    async fn file_payload_counts_declared_range() {
        let dir = tempfile::tempdir().unwrap();
        let s = CountingStore::new(Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()));
        let a = Path::from("f");
        s.put(&a, PutPayload::from(vec![7u8; 300])).await.unwrap();
        assert_eq!(s.get_range(&a, 100..250).await.unwrap().len(), 150);
        assert_eq!(s.stats().bytes_down, 150);
    }

    #[tokio::test]
    async fn failures_and_multipart() {
        let s = store();
        // Delete of a missing key on InMemory is Ok; a GET of one is NotFound (an answer).
        s.delete(&Path::from("missing")).await.unwrap();
        assert!(s.get(&Path::from("missing")).await.is_err());
        let mut up = s.put_multipart(&Path::from("big")).await.unwrap();
        up.put_part(PutPayload::from(vec![1u8; 64])).await.unwrap();
        up.put_part(PutPayload::from(vec![1u8; 36])).await.unwrap();
        up.complete().await.unwrap();
        let st = s.stats();
        assert_eq!((st.delete, st.get, st.failed), (1, 1, 0));
        assert_eq!((st.multipart, st.parts, st.bytes_up), (1, 2, 100));
        assert_eq!(s.head(&Path::from("big")).await.unwrap().size, 100);

        // A real failure: an invalid GET range is an error that is not about the object's
        // existence.
        let bad = s.get_opts(&Path::from("big"), GetOptions::new().with_range(Some(500..600))).await;
        assert!(bad.is_err());
        assert_eq!(s.stats().failed, 1);
        assert_eq!(serde_json::to_value(s.stats()).unwrap()["bytes_up"], 100);
    }
}
