//! A backup served as a read-only raw image over HTTP/1.1 with range requests (`ferry serve`,
//! and the source of an instant restore: `rbd migration prepare --import-only` with a
//! raw/http source spec reads through it).
//!
//! One path only, `/<token>/image.raw` — the token is the authorisation (any other path is a
//! 404); `HEAD` gives the size, `GET` with `Range: bytes=A-B` a 206 of those bytes, `GET`
//! without a range the whole image. Connections are kept alive and pipelined requests are
//! answered in order (librbd's client pipelines). Holes are zeros without a fetch; blocks are
//! fetched through [`fetch_content`] (deltas applied, the content ID checked) and the last few
//! kept decoded; blocks of one range are fetched in parallel.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_repo::{Manifest, Repository};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::chunks::fetch_content;
use crate::error::{Error, ErrorKind, Result};

/// Bytes of decoded blocks kept by default (16 blocks of 4 MiB).
pub const CACHE_BYTES: u64 = 64 << 20;
/// Blocks fetched at once from the repository, over every reader of an image.
const FETCHES: usize = 8;
/// Blocks a sequential reader is read ahead of (at most half the cache).
const READ_AHEAD: u64 = 4;
/// The largest range one request may ask for.
const MAX_RANGE: u64 = 64 << 20;

/// What a server has done so far.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Body bytes sent.
    pub bytes: AtomicU64,
    /// Blocks fetched from the repository.
    pub blocks_fetched: AtomicU64,
    /// Blocks fetched ahead of a sequential reader.
    pub blocks_read_ahead: AtomicU64,
}

/// One cached block: filled once, by whoever asks first; the others wait for it.
type Slot = Arc<tokio::sync::OnceCell<Arc<Vec<u8>>>>;

/// A block in the cache.
struct Entry {
    block: u64,
    slot: Slot,
    /// Read by a reader (not only fetched ahead of one).
    consumed: bool,
}

impl Entry {
    /// Nobody but the cache holds it: not being fetched, not being read.
    fn idle(&self) -> bool {
        Arc::strong_count(&self.slot) == 1
    }
}

/// A backup as a random-access image: holes are zeros without a fetch, a block asked for by
/// several readers at once is fetched once, the most recently used blocks are kept decoded
/// (a block being fetched or read is never dropped), and sequential readers are read ahead of
/// as far as the cache has room for (a block fetched ahead is dropped only for a reader's
/// block, never for another one fetched ahead).
pub struct BackupImage {
    repo: Arc<Repository>,
    manifest: Arc<Manifest>,
    /// Most recently used last.
    cache: Mutex<VecDeque<Entry>>,
    capacity: usize,
    fetches: tokio::sync::Semaphore,
    stats: Arc<ServeStats>,
}

impl BackupImage {
    /// The image of `manifest`, keeping 64 MiB of decoded blocks.
    pub fn new(repo: Arc<Repository>, manifest: Arc<Manifest>) -> BackupImage {
        Self::with_cache(repo, manifest, CACHE_BYTES)
    }

    /// The image of `manifest`, keeping `cache_bytes` of decoded blocks (at least two blocks).
    pub fn with_cache(repo: Arc<Repository>, manifest: Arc<Manifest>, cache_bytes: u64) -> BackupImage {
        let bs = manifest.meta.block_size.get().max(1);
        BackupImage {
            repo,
            capacity: (cache_bytes / bs).max(2) as usize,
            manifest,
            cache: Mutex::new(VecDeque::new()),
            fetches: tokio::sync::Semaphore::new(FETCHES),
            stats: Arc::new(ServeStats::default()),
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.meta.image_size
    }

    /// Its block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.manifest.meta.block_size.get()
    }

    /// The backup it is.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// What the server did so far.
    pub fn stats(&self) -> &Arc<ServeStats> {
        &self.stats
    }

    /// Whether block `i` is a hole (no data: zeros, nothing to fetch).
    pub fn is_hole(&self, i: u64) -> bool {
        self.manifest.blocks.get(i as usize).copied().flatten().is_none()
    }

    /// The runs of holes and data from `offset` for at most `len` bytes (within the image):
    /// `(length, hole)`, alternating, at most `max_runs` of them.
    pub fn extents(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(u64, bool)> {
        ferry_nbd::block_runs(offset, len, self.size(), self.block_size(), max_runs, |i| self.is_hole(i))
    }

    /// The cache slot of block `i` for a reader (`demand`) or for reading ahead. A new slot
    /// takes the place of the least recently used idle block when the cache is full —
    /// preferring blocks already read; reading ahead takes only those, and gives up (`None`)
    /// when there is none; a reader's slot is made even then (the blocks in use are the
    /// bound). Reading ahead also gets `None` for a block already cached.
    fn slot(&self, i: u64, demand: bool) -> Option<Slot> {
        let Ok(mut c) = self.cache.lock() else {
            return demand.then(Slot::default);
        };
        if let Some(p) = c.iter().position(|e| e.block == i) {
            if !demand {
                return None;
            }
            let mut e = c.remove(p)?;
            e.consumed = true;
            let slot = e.slot.clone();
            c.push_back(e);
            return Some(slot);
        }
        if c.len() >= self.capacity {
            let victim = c
                .iter()
                .position(|e| e.idle() && e.consumed)
                .or_else(|| if demand { c.iter().position(Entry::idle) } else { None });
            match victim {
                Some(p) => {
                    c.remove(p);
                }
                None if !demand => return None,
                None => {}
            }
        }
        let slot = Slot::default();
        c.push_back(Entry {
            block: i,
            slot: slot.clone(),
            consumed: demand,
        });
        Some(slot)
    }

    /// Block `i` in full (zeros for a hole and past the chunk's end).
    async fn block(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        if self.is_hole(i) {
            return Ok(Arc::new(vec![0u8; self.manifest.block_len(i) as usize]));
        }
        let Some(slot) = self.slot(i, true) else {
            return Err(Error::new(ErrorKind::Failed, format!("block {i}: no cache slot"), None));
        };
        slot.get_or_try_init(|| self.fetch(i)).await.cloned()
    }

    async fn fetch(&self, i: u64) -> Result<Arc<Vec<u8>>> {
        let len = self.manifest.block_len(i) as usize;
        let Some(id) = self.manifest.blocks.get(i as usize).copied().flatten() else {
            return Ok(Arc::new(vec![0u8; len]));
        };
        let _permit = self.fetches.acquire().await;
        let mut data = fetch_content(&self.repo, &self.manifest.deltas, &id).await.map_err(|e| {
            let kind = match &*e.error {
                ferry_repo::Error::NotFound { .. } => ErrorKind::Integrity,
                other => crate::error::repo_error_kind(other),
            };
            Error::new(kind, format!("block {i} (object {}): {}", e.object, e.error), None)
        })?;
        data.resize(len, 0);
        self.stats.blocks_fetched.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(data))
    }

    /// How many blocks a sequential reader is read ahead of: [`READ_AHEAD`], at most half the
    /// cache (the rest holds the blocks being read).
    fn ahead(&self) -> u64 {
        READ_AHEAD.min(self.capacity as u64 / 2).max(1)
    }

    /// Starts fetching the data blocks `from..to` that are not cached, in the background.
    pub fn read_ahead(self: &Arc<Self>, from: u64, to: u64) {
        let blocks = self.manifest.blocks.len() as u64;
        for i in from..to.min(blocks) {
            if self.is_hole(i) {
                continue;
            }
            let Some(slot) = self.slot(i, false) else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                let mut here = false;
                let filled = slot
                    .get_or_try_init(|| {
                        here = true;
                        me.fetch(i)
                    })
                    .await
                    .is_ok();
                if filled && here {
                    me.stats.blocks_read_ahead.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }

    /// `len` bytes at `offset` (within the image).
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let bs = self.block_size();
        let (first, last) = (offset / bs, (end - 1) / bs);
        // Holes cost neither a fetch nor a block's worth of zeros.
        type Fetched = (u64, Option<Result<Arc<Vec<u8>>>>);
        let blocks: Vec<Fetched> = futures::stream::iter(first..=last)
            .map(|i| async move {
                if self.is_hole(i) {
                    (i, None)
                } else {
                    (i, Some(self.block(i).await))
                }
            })
            .buffered(FETCHES)
            .collect()
            .await;
        let mut out = vec![0u8; (end - offset) as usize];
        for (i, b) in blocks {
            let Some(b) = b else { continue };
            let b = b?;
            let start = offset.max(i * bs);
            let stop = end.min(i * bs + b.len() as u64);
            if start < stop {
                out[(start - offset) as usize..(stop - offset) as usize]
                    .copy_from_slice(&b[(start - i * bs) as usize..(stop - i * bs) as usize]);
            }
        }
        Ok(out)
    }
}

/// Tells a reader that goes on where its last read ended from one that jumps about, and
/// keeps a sequential one [`READ_AHEAD`] blocks ahead (one per connection).
#[derive(Debug, Default)]
pub(crate) struct Sequential {
    next: Option<u64>,
    ahead_to: u64,
}

impl Sequential {
    /// Reads `len` bytes at `offset` from `image`, reading ahead when it continues the last read.
    pub async fn read_through(&mut self, image: &Arc<BackupImage>, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read(image, offset, len);
        image.read(offset, len).await
    }

    /// A read of `len` bytes at `offset`: reads ahead when it continues the last one.
    pub fn read(&mut self, image: &Arc<BackupImage>, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let sequential = self.next == Some(offset);
        self.next = Some(end);
        if !sequential || len == 0 {
            // A seek: reading ahead starts over from wherever the reader goes on.
            self.ahead_to = 0;
            return;
        }
        let bs = image.block_size();
        let next_block = end.div_ceil(bs);
        let to = next_block + image.ahead();
        let from = self.ahead_to.max(next_block);
        if from < to {
            image.read_ahead(from, to);
            self.ahead_to = to;
        }
    }
}

/// A backup image as an NBD export (`ferry_nbd` knows nothing of repositories).
struct NbdImage(Arc<BackupImage>);

impl ferry_nbd::Export for NbdImage {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block(&self) -> u64 {
        self.0.block_size()
    }
    fn extents(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(u64, bool)> {
        self.0.extents(offset, len, max_runs)
    }
    async fn read(&self, offset: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
        self.0.read(offset, len).await.map_err(|e| e.to_string())
    }
    fn sequential(&self, end: u64) {
        let from = end.div_ceil(self.0.block_size());
        self.0.read_ahead(from, from + self.0.ahead());
    }
    fn served(&self, bytes: u64) {
        self.0.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.0.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Serves `image` over NBD on `listener` (export name `token`) until `stop` is cancelled.
pub async fn serve_nbd(image: Arc<BackupImage>, listener: TcpListener, token: String, stop: CancellationToken) {
    ferry_nbd::serve_tcp(Arc::new(NbdImage(image)), listener, token, stop).await
}

/// Serves `image` over NBD on a Unix socket `listener` (export name `token`) until `stop` is
/// cancelled.
pub async fn serve_nbd_unix(image: Arc<BackupImage>, listener: tokio::net::UnixListener, token: String, stop: CancellationToken) {
    ferry_nbd::serve_unix(Arc::new(NbdImage(image)), listener, token, stop).await
}

/// Serves `image` on `listener` at `/<token>/image.raw` until `stop` is cancelled.
pub async fn serve_http(image: Arc<BackupImage>, listener: TcpListener, token: String, stop: CancellationToken) {
    let path: Arc<str> = Arc::from(format!("/{token}/image.raw"));
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((sock, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (image, path, stop) = (image.clone(), path.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = connection(sock, &image, &path) => {
                    if let Err(e) = r {
                        tracing::debug!("image server connection ended: {e}");
                    }
                }
            }
        });
    }
}

/// One request as far as this server cares.
struct Request {
    method: String,
    path: String,
    range: Option<String>,
    close: bool,
}

fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let (method, target, version) = (first.next()?, first.next()?, first.next().unwrap_or("HTTP/1.0"));
    let mut range = None;
    let mut close = version == "HTTP/1.0";
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let v = v.trim();
        if k.eq_ignore_ascii_case("range") {
            range = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        }
    }
    Some(Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        range,
        close,
    })
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` → the inclusive range within `size`; `Err(())` when
/// it cannot be satisfied (416), `Ok(None)` for a form this server does not take (several
/// ranges: answered with the whole image, as HTTP allows).
fn parse_range(v: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.saturating_sub(1))
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(size.saturating_sub(1))
        };
        (start, end)
    };
    if start >= size || end < start {
        return Err(());
    }
    Ok(Some((start, end.min(start + MAX_RANGE - 1))))
}

async fn connection(mut sock: TcpStream, image: &Arc<BackupImage>, path: &str) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let mut sequential = Sequential::default();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 8192];
    loop {
        // One request's head (pipelined ones stay in `buf`).
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 16 << 10 {
                return write_simple(&mut sock, "431 Request Header Fields Too Large", true).await;
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let Some(req) = parse_request(&head) else {
            return write_simple(&mut sock, "400 Bad Request", true).await;
        };
        image.stats.requests.fetch_add(1, Ordering::Relaxed);
        if req.path != path {
            write_simple(&mut sock, "404 Not Found", req.close).await?;
        } else if req.method == "HEAD" {
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                image.size(),
                if req.close { "Connection: close\r\n" } else { "" }
            );
            sock.write_all(h.as_bytes()).await?;
        } else if req.method != "GET" {
            write_simple(&mut sock, "405 Method Not Allowed", req.close).await?;
        } else {
            let size = image.size();
            match req.range.as_deref().map(|r| parse_range(r, size)) {
                Some(Err(())) => {
                    let h = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n");
                    sock.write_all(h.as_bytes()).await?;
                }
                Some(Ok(Some((a, b)))) => match sequential.read_through(image, a, b - a + 1).await {
                    Ok(data) => {
                        let h = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                            data.len(),
                            if req.close { "Connection: close\r\n" } else { "" }
                        );
                        sock.write_all(h.as_bytes()).await?;
                        sock.write_all(&data).await?;
                        image.stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::error!("serving bytes {a}-{b}: {e}");
                        return write_simple(&mut sock, "500 Internal Server Error", true).await;
                    }
                },
                _ => {
                    // The whole image, block by block.
                    let h = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                        if req.close { "Connection: close\r\n" } else { "" }
                    );
                    sock.write_all(h.as_bytes()).await?;
                    let bs = 4 << 20;
                    let mut off = 0;
                    while off < size {
                        match sequential.read_through(image, off, bs).await {
                            Ok(data) => {
                                sock.write_all(&data).await?;
                                image.stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                                off += data.len() as u64;
                            }
                            Err(e) => {
                                // Headers are out: closing early is the only way to say it.
                                tracing::error!("serving the image at {off}: {e}");
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
        if req.close {
            return Ok(());
        }
    }
}

async fn write_simple(sock: &mut TcpStream, status: &str, close: bool) -> std::io::Result<()> {
    let h = format!(
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    );
    sock.write_all(h.as_bytes()).await
}

/// A random token (32 hex digits) for the served path.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Binds `addr` for a server (fails at once when it cannot).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::new(ErrorKind::Failed, format!("binding {addr}"), Some(Box::new(e))))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Ok(Some((95, 99))));
        assert_eq!(parse_range("bytes=100-101", 100), Err(()));
        assert_eq!(parse_range("bytes=5-4", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,4-5", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Err(()));
    }
}

/// Where an instant restore's server listens, and the host its URL names.
#[derive(Debug, Clone)]
pub struct InstantOptions {
    /// Address to bind (port 0: any free port).
    pub listen: SocketAddr,
    /// The host name or address every client of the image reaches the server at (the URL in
    /// the image's migration source spec); default: the bound address.
    pub url_host: Option<String>,
}

/// An instant restore whose image is usable: the server runs and `rbd migration execute`
/// has not finished yet ([`InstantRestore::complete`]).
pub struct InstantRestore {
    rbd: ferry_ceph::RbdCli,
    target: crate::rbd::RbdImage,
    image: Arc<BackupImage>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    started: std::time::Instant,
    usable_after: std::time::Duration,
    url: String,
}

/// What an instant restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstantReport {
    /// Seconds until the image could be opened and read.
    pub usable_after_s: f64,
    /// Seconds until every block was copied and the migration committed.
    pub complete_after_s: f64,
    /// Requests the server answered.
    pub requests: u64,
    /// Bytes it sent.
    pub bytes_served: u64,
    /// Blocks it fetched from the repository.
    pub blocks_fetched: u64,
}

impl InstantRestore {
    /// How long until the image was usable.
    pub fn usable_after(&self) -> std::time::Duration {
        self.usable_after
    }

    /// The source URL the image reads through (it carries the token: keep it private).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Copies everything (`rbd migration execute`) and commits the migration: afterwards the
    /// image is an ordinary image. On failure the migration is aborted (the image removed).
    pub async fn complete(self) -> Result<InstantReport> {
        // The image is in use already: never abort it (that removes the image and what was
        // written to it). `migration execute` can be run again; so can `commit`.
        let mut last = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(5 * u64::from(attempt))).await;
            }
            let (rbd, t) = (self.rbd.clone(), self.target.clone());
            let r = crate::cpu::blocking(move || {
                rbd.migration_execute(&t.pool, &t.image)
                    .map_err(|e| Error::new(ErrorKind::Source, format!("rbd migration execute of {t} failed"), Some(Box::new(e))))?;
                rbd.migration_commit(&t.pool, &t.image)
                    .map_err(|e| Error::new(ErrorKind::Source, format!("rbd migration commit of {t} failed"), Some(Box::new(e))))
            })
            .await;
            match r {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!("instant restore into {}: {e} (attempt {} of 3)", self.target, attempt + 1);
                    last = Some(e);
                }
            }
        }
        let complete_after = self.started.elapsed();
        if let Some(e) = last {
            self.stop.cancel();
            let _ = self.server.await;
            return Err(e.context(format!(
                "instant restore into {t} did not finish: the image is still a live migration whose source was this ferry (its uncopied data cannot be read now). Discard it with `rbd migration abort {t}` (writes made to it are lost), or restore again",
                t = self.target
            )));
        }
        self.stop.cancel();
        let _ = self.server.await;
        let s = self.image.stats();
        Ok(InstantReport {
            usable_after_s: self.usable_after.as_secs_f64(),
            complete_after_s: complete_after.as_secs_f64(),
            requests: s.requests.load(Ordering::Relaxed),
            bytes_served: s.bytes.load(Ordering::Relaxed),
            blocks_fetched: s.blocks_fetched.load(Ordering::Relaxed),
        })
    }
}

/// Starts an instant restore of `manifest` into the new image `target` (see
/// [`crate::Engine::instant_restore`]).
pub(crate) async fn instant(
    repo: Arc<Repository>,
    ceph: &crate::rbd::Ceph,
    manifest: Arc<Manifest>,
    target: &crate::rbd::RbdImage,
    opts: &InstantOptions,
) -> Result<InstantRestore> {
    let started = std::time::Instant::now();
    let rbd = ceph.rbd();
    {
        let (rbd, t) = (rbd.clone(), target.clone());
        let exists = crate::cpu::blocking(move || {
            rbd.exists(&t.pool, &t.image)
                .map_err(|e| Error::new(ErrorKind::Source, format!("looking up {t}"), Some(Box::new(e))))
        })
        .await?;
        if exists {
            return Err(Error::refused(format!("RBD image {target} exists; an instant restore creates it")));
        }
    }
    let listener = bind(opts.listen).await?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Failed, "reading the bound address", Some(Box::new(e))))?;
    let token = new_token();
    let host = opts.url_host.clone().unwrap_or_else(|| match bound.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    });
    let url = format!("http://{host}:{}/{token}/image.raw", bound.port());
    let image = Arc::new(BackupImage::new(repo, manifest));
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_http(image.clone(), listener, token, stop.clone()));
    // The source spec names the URL (and so the token): a private file, gone after prepare.
    if host.chars().any(|c| c.is_control() || c.is_whitespace() || "\"\\/?#@".contains(c)) {
        stop.cancel();
        return Err(Error::refused(format!("'{host}' cannot be the host of the image's URL")));
    }
    let spec = format!("{{\"type\": \"raw\", \"stream\": {{\"type\": \"http\", \"url\": \"{url}\"}}}}");
    let prepared = {
        let (rbd, t) = (rbd.clone(), target.clone());
        crate::cpu::blocking(move || {
            let path = std::env::temp_dir().join(format!("ferry-source-spec-{}.json", new_token()));
            struct Gone(std::path::PathBuf);
            impl Drop for Gone {
                fn drop(&mut self) {
                    let _ = std::fs::remove_file(&self.0);
                }
            }
            let _gone = Gone(path.clone());
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| Error::new(ErrorKind::Failed, "writing the migration source spec", Some(Box::new(e))))?;
                f.write_all(spec.as_bytes())
                    .map_err(|e| Error::new(ErrorKind::Failed, "writing the migration source spec", Some(Box::new(e))))?;
            }
            rbd.migration_prepare_import(&t.pool, &t.image, &path)
                .map_err(|e| Error::new(ErrorKind::Source, format!("rbd migration prepare of {t} failed"), Some(Box::new(e))))
        })
        .await
    };
    if let Err(e) = prepared {
        stop.cancel();
        let _ = server.await;
        return Err(e);
    }
    Ok(InstantRestore {
        rbd,
        target: target.clone(),
        image,
        stop,
        server,
        started,
        usable_after: started.elapsed(),
        url,
    })
}
