//! A backup exported read-only over NBD (the Network Block Device protocol, fixed newstyle
//! negotiation: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>), so
//! `qemu-img`, `nbdcopy`, `nbdinfo`, `guestfish` or `nbd-client` can open it without a
//! restore (`ferry serve --nbd ADDR` / `--nbd-socket PATH`). Generic over an [`Export`]; no
//! repository in here.
//!
//! The export's name is a token: it is the authorisation, as the path is for HTTP. A
//! client naming another export is refused (`NBD_OPT_GO`/`INFO`: unknown export;
//! `NBD_OPT_EXPORT_NAME`: the connection is closed) and the list of exports is not given out.
//!
//! What the server speaks: `NBD_OPT_EXPORT_NAME`, `INFO`, `GO` (export size, flags, block
//! sizes), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` for
//! `base:allocation`, `ABORT`; in transmission `NBD_CMD_READ` (with structured replies a read
//! answers holes with `OFFSET_HOLE` chunks, nothing fetched; `NBD_CMD_FLAG_DF` gives one
//! chunk), `NBD_CMD_BLOCK_STATUS` (holes are `HOLE|ZERO`), `NBD_CMD_DISC`, `NBD_CMD_FLUSH`
//! (nothing to flush). Writes, trims and write-zeroes are refused with `EPERM` (the export
//! is read-only and says so). Requests are answered concurrently, out of order as the
//! protocol allows; the bytes of reads in flight on one connection are bounded; a sequential
//! reader is reported to the export ([`Export::sequential`]), which may read ahead.

#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The runs of holes and data of an image of `size` bytes in blocks of `block` bytes, from
/// `offset` for at most `len` bytes: `(length, is_hole)`, alternating, at most `max_runs` of
/// them — what [`Export::extents`] returns for an image whose holes are whole blocks.
pub fn block_runs(offset: u64, len: u64, size: u64, block: u64, max_runs: usize, is_hole: impl Fn(u64) -> bool) -> Vec<(u64, bool)> {
    let end = offset.saturating_add(len).min(size);
    let block = block.max(1);
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut at = offset;
    while at < end {
        let i = at / block;
        let stop = ((i + 1) * block).min(end);
        let hole = is_hole(i);
        let full = runs.len() >= max_runs;
        match runs.last_mut() {
            Some((n, h)) if *h == hole => *n += stop - at,
            _ if full => break,
            _ => runs.push((stop - at, hole)),
        }
        at = stop;
    }
    runs
}

/// A read-only random-access image the server exports.
pub trait Export: Send + Sync + 'static {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// The request size that costs one fetch (told to clients as the preferred block size).
    fn preferred_block(&self) -> u64;
    /// The runs of holes and data from `offset` for at most `len` bytes (within the image),
    /// `(length, is_hole)`, at most `max_runs` of them; a hole reads as zeros.
    fn extents(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(u64, bool)>;
    /// `len` bytes at `offset` (within the image); an error is answered with `EIO` and the
    /// message.
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
    /// A reader on one connection went on where its previous read ended, now at `end`: a
    /// hint to read ahead.
    fn sequential(&self, _end: u64) {}
    /// A request was answered; `bytes` of data were sent for it.
    fn served(&self, _bytes: u64) {}
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// The one metadata context served, and its ID on a connection.
const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;

/// The largest request payload (read length) accepted, as clients are told.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Bytes of read replies being prepared, queued or written, over all connections of a server
/// (in KiB permits): what clients can make the server hold does not grow with their number.
const IN_FLIGHT_KIB: usize = 256 << 10;
/// The same for one connection: a client that stops reading its replies holds this much at
/// most, and the others go on.
const CONNECTION_KIB: usize = 64 << 10;
/// Connections served at once (counted from a successful negotiation).
const CONNECTIONS: usize = 64;
/// Connections negotiating at once (before the client named the export).
const NEGOTIATING: usize = 128;
/// How long writing one reply may take before the client counts as gone.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Option data larger than this ends the negotiation (names and queries are short).
const MAX_OPTION: u32 = 64 << 10;
/// Options one negotiation may send before the server gives up on it.
const MAX_OPTIONS: usize = 64;
/// Descriptors in one block status reply.
const MAX_EXTENTS: usize = 1024;
/// How long a client may take to negotiate.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `image` over NBD on a TCP listener until `stop` is cancelled; the export's name is
/// `token`.
pub async fn serve_tcp<E: Export>(image: Arc<E>, listener: tokio::net::TcpListener, token: String, stop: CancellationToken) {
    let accept = || async {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        Ok(sock)
    };
    accept_loop(accept, image, token, stop).await
}

/// Serves `image` over NBD on a Unix socket listener until `stop` is cancelled; the export's
/// name is `token`.
pub async fn serve_unix<E: Export>(image: Arc<E>, listener: tokio::net::UnixListener, token: String, stop: CancellationToken) {
    let accept = || async { listener.accept().await.map(|(sock, _)| sock) };
    accept_loop(accept, image, token, stop).await
}

/// Accepts connections (`accept`) and serves each in its own task until `stop` is cancelled.
async fn accept_loop<S, E, F, Fut>(mut accept: F, image: Arc<E>, token: String, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Export,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let token: Arc<str> = Arc::from(token);
    let shared = Shared::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = accept() => a,
        };
        let Ok(sock) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        spawn_connection(sock, &image, &token, &stop, &shared).await;
    }
}

/// What the connections of one server share: connection slots and the bytes in flight.
#[derive(Clone)]
struct Shared {
    negotiating: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            negotiating: Arc::new(Semaphore::new(NEGOTIATING)),
            slots: Arc::new(Semaphore::new(CONNECTIONS)),
            budget: Arc::new(Semaphore::new(IN_FLIGHT_KIB)),
        }
    }
}

async fn spawn_connection<S, E: Export>(sock: S, image: &Arc<E>, token: &Arc<str>, stop: &CancellationToken, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Never waits: a client that has not negotiated yet must not hold up the accept loop.
    let Ok(negotiating) = shared.negotiating.clone().try_acquire_owned() else {
        tracing::warn!("NBD: {NEGOTIATING} connections are negotiating already; one more refused");
        return;
    };
    let (image, token, stop, shared) = (image.clone(), token.clone(), stop.clone(), shared.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            r = serve_connection(sock, image, &token, shared, negotiating) => {
                if let Err(e) = r {
                    tracing::debug!("NBD connection ended: {e}");
                }
            }
        }
    });
}

/// What the negotiation settled.
#[derive(Debug, Default, Clone, Copy)]
struct Negotiated {
    structured: bool,
    allocation: bool,
}

/// Serves one client on `sock` (already accepted) until it disconnects: the negotiation, then
/// the requests. Errors are the connection's (the client broke the protocol or went away).
pub async fn connection<S, E: Export>(sock: S, image: Arc<E>, token: &str) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Shared::new();
    let negotiating = shared.negotiating.clone().try_acquire_owned().map_err(std::io::Error::other)?;
    serve_connection(sock, image, token, shared, negotiating).await
}

async fn serve_connection<S, E: Export>(
    sock: S,
    image: Arc<E>,
    token: &str,
    shared: Shared,
    negotiating: tokio::sync::OwnedSemaphorePermit,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(sock);
    let negotiated = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &*image, token)).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "negotiation took too long")),
    };
    drop(negotiating);
    let Ok(_slot) = shared.slots.clone().try_acquire_owned() else {
        tracing::warn!("NBD: {CONNECTIONS} connections are served already; one more closed");
        return Ok(());
    };
    transmission(rd, wr, image, negotiated, shared.budget).await
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

async fn option_reply<W: AsyncWrite + Unpin>(wr: &mut W, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    wr.write_all(&b).await
}

/// A reader of option data that says what is wrong instead of panicking.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.take(n).map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: the export name and the information asked for.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut f = Fields(data);
    let name = f.string32()?;
    let n = f.u16()?;
    let wanted = (0..n).map(|_| f.u16()).collect::<Option<Vec<u16>>>()?;
    f.0.is_empty().then_some((name, wanted))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT` data: the export name and the queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut f = Fields(data);
    let name = f.string32()?;
    let n = f.u32()?;
    if n as usize > data.len() / 4 {
        return None;
    }
    let queries = (0..n).map(|_| f.string32()).collect::<Option<Vec<String>>>()?;
    f.0.is_empty().then_some((name, queries))
}

/// `SEND_DF` only with structured replies (the protocol says to leave it clear without).
fn transmission_flags(structured: bool) -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN | if structured { TFLAG_SEND_DF } else { 0 }
}

/// The fixed newstyle negotiation: `Some` when the client went on to transmission.
async fn handshake<R, W, E: Export>(rd: &mut R, wr: &mut W, image: &E, token: &str) -> std::io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 || client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(invalid("the client does not speak fixed newstyle NBD"));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut n = Negotiated::default();
    for _ in 0..MAX_OPTIONS {
        if rd.read_u64().await? != IHAVEOPT {
            return Err(invalid("an option without its magic"));
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION {
            return Err(invalid("option data too large"));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if String::from_utf8_lossy(&data) != token {
                    return Err(invalid("an unknown export was asked for"));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&image.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(n.structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&b).await?;
                return Ok(Some(n));
            }
            OPT_ABORT => {
                let _ = option_reply(wr, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                // The export's name is its password: not listed.
                option_reply(wr, opt, REP_ERR_POLICY, b"exports are not listed; the name is the serve token").await?;
            }
            OPT_STARTTLS => option_reply(wr, opt, REP_ERR_UNSUP, b"no TLS: use a Unix socket or a private network").await?,
            OPT_INFO | OPT_GO => {
                let Some((name, _wanted)) = parse_info(&data) else {
                    option_reply(wr, opt, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if name != token {
                    option_reply(wr, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&image.size().to_be_bytes());
                export.extend_from_slice(&transmission_flags(n.structured).to_be_bytes());
                option_reply(wr, opt, REP_INFO, &export).await?;
                // Any alignment is served; a block's worth is what costs one fetch.
                let preferred = (image.preferred_block().clamp(1, u64::from(MAX_REQUEST)) as u32)
                    .next_power_of_two()
                    .min(MAX_REQUEST);
                let mut sizes = Vec::with_capacity(14);
                sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&preferred.max(4096).to_be_bytes());
                sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(wr, opt, REP_INFO, &sizes).await?;
                option_reply(wr, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(n));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    option_reply(wr, opt, REP_ERR_INVALID, b"no data expected").await?;
                } else {
                    n.structured = true;
                    option_reply(wr, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    // It replaces the selection, even when it fails.
                    n.allocation = false;
                }
                if !n.structured {
                    option_reply(wr, opt, REP_ERR_INVALID, b"structured replies first").await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    option_reply(wr, opt, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if name != token {
                    option_reply(wr, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let matches = |q: &str| q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:");
                let selected = if opt == OPT_LIST_META_CONTEXT && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| matches(q))
                };
                if opt == OPT_SET_META_CONTEXT {
                    n.allocation = selected;
                }
                if selected {
                    let id = if opt == OPT_SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 };
                    let mut b = id.to_be_bytes().to_vec();
                    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(wr, opt, REP_META_CONTEXT, &b).await?;
                }
                option_reply(wr, opt, REP_ACK, &[]).await?;
            }
            _ => option_reply(wr, opt, REP_ERR_UNSUP, b"not supported").await?,
        }
    }
    Err(invalid("too many options"))
}

/// One request's header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

async fn read_request<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Option<Request>> {
    let mut h = [0u8; 28];
    match rd.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    if u32_at(0) != REQUEST_MAGIC {
        return Err(invalid("a request without its magic"));
    }
    Ok(Some(Request {
        flags: u16_at(4),
        kind: u16_at(6),
        cookie: u64_at(8),
        offset: u64_at(16),
        len: u32_at(24),
    }))
}

fn simple_reply(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn chunk(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// An error answer in whichever form the connection uses.
fn error_reply(n: Negotiated, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if !n.structured {
        return simple_reply(cookie, error, &[]);
    }
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = Vec::new();
    chunk(
        &mut out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        &[&error.to_be_bytes(), &(msg.len() as u16).to_be_bytes(), msg],
    );
    out
}

/// The answer to a read of `len` bytes at `offset` (already checked to lie within the image),
/// and whether it carries the data.
async fn read_reply<E: Export>(image: &E, n: Negotiated, r: Request) -> (Vec<u8>, bool) {
    let (offset, len) = (r.offset, u64::from(r.len));
    if !n.structured {
        return match image.read(offset, len).await {
            Ok(data) => (simple_reply(r.cookie, 0, &data), true),
            Err(e) => {
                tracing::error!("NBD read of {len} bytes at {offset}: {e}");
                (simple_reply(r.cookie, EIO, &[]), false)
            }
        };
    }
    if len == 0 {
        let mut out = Vec::new();
        chunk(&mut out, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        return (out, true);
    }
    let runs = if r.flags & CMD_FLAG_DF != 0 {
        // One chunk: a hole only when all of it is one.
        let runs = image.extents(offset, len, 2);
        if runs.len() == 1 {
            runs
        } else {
            vec![(len, false)]
        }
    } else {
        image.extents(offset, len, usize::MAX)
    };
    if runs.is_empty() {
        let mut out = Vec::new();
        chunk(&mut out, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
        return (out, true);
    }
    let mut out = Vec::with_capacity(len as usize + 32 * runs.len());
    let mut at = offset;
    let last = runs.len() - 1;
    for (k, (run, hole)) in runs.into_iter().enumerate() {
        let flags = if k == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            chunk(
                &mut out,
                r.cookie,
                flags,
                REPLY_TYPE_OFFSET_HOLE,
                &[&at.to_be_bytes(), &(run as u32).to_be_bytes()],
            );
        } else {
            match image.read(at, run).await {
                Ok(data) => chunk(&mut out, r.cookie, flags, REPLY_TYPE_OFFSET_DATA, &[&at.to_be_bytes(), &data]),
                Err(e) => {
                    tracing::error!("NBD read of {run} bytes at {at}: {e}");
                    return (error_reply(n, r.cookie, EIO, &format!("reading the backup at {at}: {e}")), false);
                }
            }
        }
        at += run;
    }
    (out, true)
}

/// The `base:allocation` answer for `len` bytes at `offset`.
fn block_status_reply<E: Export>(image: &E, r: Request) -> Vec<u8> {
    let max = if r.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
    let runs = image.extents(r.offset, u64::from(r.len), max);
    let mut payload = Vec::with_capacity(4 + 8 * runs.len());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (len, hole) in runs {
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&(if hole { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
    }
    let mut out = Vec::new();
    chunk(&mut out, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &[&payload]);
    out
}

/// A reply on its way out, with the budget its bytes hold until they are written.
type Outgoing = (Vec<u8>, Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>);

async fn write_timed<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client stopped reading its replies",
        )),
    }
}

async fn transmission<R, W, E: Export>(mut rd: R, mut wr: W, image: Arc<E>, n: Negotiated, budget: Arc<Semaphore>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Replies go out through one writer, whole, in the order they are ready; a read's budget
    // is given back when its reply is written. A client that stops reading for WRITE_TIMEOUT
    // is gone: the connection ends.
    let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
    let dead = CancellationToken::new();
    let writer = {
        let dead = dead.clone();
        tokio::spawn(async move {
            let r = async {
                while let Some((reply, permits)) = rx.recv().await {
                    write_timed(&mut wr, &reply).await?;
                    drop(permits);
                    if rx.is_empty() {
                        wr.flush().await?;
                    }
                }
                wr.flush().await?;
                wr.shutdown().await
            }
            .await;
            dead.cancel();
            r
        })
    };
    let mine = Arc::new(Semaphore::new(CONNECTION_KIB));
    let mut next: Option<u64> = None;
    let size = image.size();
    let result = loop {
        let r = tokio::select! {
            r = read_request(&mut rd) => match r {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
            _ = dead.cancelled() => break Ok(()),
        };
        let in_image = r.offset.checked_add(u64::from(r.len)).is_some_and(|end| end <= size);
        let reply = match r.kind {
            CMD_DISC => break Ok(()),
            CMD_READ => {
                if !in_image {
                    error_reply(n, r.cookie, EINVAL, "the read reaches past the end of the export")
                } else if r.len > MAX_REQUEST {
                    error_reply(n, r.cookie, EINVAL, "the read is larger than the largest request")
                } else {
                    let end = r.offset + u64::from(r.len);
                    if next == Some(r.offset) {
                        image.sequential(end);
                    }
                    next = Some(end);
                    // This connection's share first: one client cannot take the server's.
                    let units = (r.len >> 10).max(1);
                    let permits = tokio::select! {
                        p = async {
                            let a = mine.clone().acquire_many_owned(units).await.ok()?;
                            let b = budget.clone().acquire_many_owned(units).await.ok()?;
                            Some((a, b))
                        } => p,
                        _ = dead.cancelled() => None,
                    };
                    let Some(permits) = permits else {
                        break Ok(());
                    };
                    let (image, tx) = (image.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (reply, ok) = read_reply(&*image, n, r).await;
                        if tx.send((reply, Some(permits))).await.is_ok() {
                            image.served(if ok { u64::from(r.len) } else { 0 });
                        }
                    });
                    continue;
                }
            }
            CMD_WRITE => {
                // The payload follows the header: read past it, then refuse.
                if r.len > MAX_REQUEST {
                    break Err(invalid("a write larger than the largest request"));
                }
                let mut rest = u64::from(r.len);
                let mut sink = vec![0u8; 64 << 10];
                while rest > 0 {
                    let k = rest.min(sink.len() as u64) as usize;
                    rd.read_exact(&mut sink[..k]).await?;
                    rest -= k as u64;
                }
                error_reply(n, r.cookie, EPERM, "the export is read-only")
            }
            CMD_TRIM | CMD_WRITE_ZEROES => error_reply(n, r.cookie, EPERM, "the export is read-only"),
            CMD_FLUSH => {
                if n.structured {
                    let mut out = Vec::new();
                    chunk(&mut out, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]);
                    out
                } else {
                    simple_reply(r.cookie, 0, &[])
                }
            }
            CMD_BLOCK_STATUS => {
                if !n.allocation {
                    error_reply(n, r.cookie, EINVAL, "no metadata context was negotiated")
                } else if !in_image || r.len == 0 {
                    error_reply(n, r.cookie, EINVAL, "the range is empty or reaches past the end of the export")
                } else {
                    block_status_reply(&*image, r)
                }
            }
            _ => error_reply(n, r.cookie, EINVAL, "unknown command"),
        };
        if tx.send((reply, None)).await.is_err() {
            break Ok(());
        }
        image.served(0);
    };
    // Replies still being prepared finish before the connection closes.
    drop(tx);
    let written = writer.await.map_err(std::io::Error::other)?;
    result.and(written)
}

/// An in-memory export (zeros blocks are holes), for tests and the fuzz target.
#[doc(hidden)]
pub mod testing {
    /// The bytes of an image, blocks of `block` bytes.
    pub struct MemoryExport {
        /// The image.
        pub data: Vec<u8>,
        /// Its block size.
        pub block: u64,
    }

    impl super::Export for MemoryExport {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn preferred_block(&self) -> u64 {
            self.block
        }
        fn extents(&self, offset: u64, len: u64, max_runs: usize) -> Vec<(u64, bool)> {
            super::block_runs(offset, len, self.size(), self.block, max_runs, |i| {
                let start = (i * self.block) as usize;
                let stop = ((i + 1) * self.block).min(self.size()) as usize;
                self.data[start..stop].iter().all(|b| *b == 0)
            })
        }
        async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
            let end = offset.saturating_add(len).min(self.size());
            Ok(self.data.get(offset as usize..end as usize).unwrap_or_default().to_vec())
        }
    }

    /// Runs one connection of a client that sends `input` and then closes its side; returns
    /// what the server sent back.
    pub async fn session(export: std::sync::Arc<MemoryExport>, token: &str, input: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        });
        let token = token.to_string();
        let served = tokio::spawn(async move { super::connection(server, export, &token).await });
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
        drop(wr);
        let _ = served.await;
        drain.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::{session, MemoryExport};
    use super::{parse_info, parse_meta};

    /// 64 KiB in 4 KiB blocks, blocks 2, 3 and 9.. zeros (holes).
    fn export() -> Arc<MemoryExport> {
        let mut data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
        data[2 * 4096..4 * 4096].fill(0);
        data[9 * 4096..].fill(0);
        Arc::new(MemoryExport { data, block: 4096 })
    }

    fn seed(name: &str) -> Vec<u8> {
        let path = format!("{}/../../fuzz/seeds/nbd_server/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[tokio::test]
    async fn every_committed_seed_replays() {
        let dir = format!("{}/../../fuzz/seeds/nbd_server", env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for f in std::fs::read_dir(&dir).expect("seeds") {
            let input = std::fs::read(f.expect("entry").path()).expect("seed");
            let out = session(export(), "token", &input).await;
            assert!(out.starts_with(b"NBDMAGIC"), "the server greets");
            n += 1;
        }
        assert!(n >= 3);
    }

    #[tokio::test]
    async fn a_simple_session_is_answered_byte_for_byte() {
        let e = export();
        let out = session(e.clone(), "token", &seed("simple")).await;
        let mut want = b"NBDMAGIC".to_vec();
        want.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        want.extend_from_slice(&3u16.to_be_bytes());
        want.extend_from_slice(&65536u64.to_be_bytes());
        // HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN; no SEND_DF without structured replies.
        want.extend_from_slice(&(1u16 | 2 | 256).to_be_bytes());
        assert!(out.starts_with(&want), "greeting and export");
        // Replies come as they are ready: by cookie. READ 4096 at 0; WRITE: EPERM;
        // BLOCK_STATUS without a context: EINVAL; then DISC closes.
        let mut rest = &out[want.len()..];
        let mut replies = std::collections::BTreeMap::new();
        while !rest.is_empty() {
            assert!(rest.len() >= 16 && rest[..4] == 0x6744_6698u32.to_be_bytes(), "a simple reply");
            let err = u32::from_be_bytes(rest[4..8].try_into().expect("4"));
            let cookie = u64::from_be_bytes(rest[8..16].try_into().expect("8"));
            let n = if cookie == 1 { 4096 } else { 0 };
            replies.insert(cookie, (err, rest[16..16 + n].to_vec()));
            rest = &rest[16 + n..];
        }
        assert_eq!(replies.len(), 3);
        assert!(replies[&1] == (0, e.data[..4096].to_vec()), "the read");
        assert_eq!(replies[&2], (1, vec![]), "EPERM");
        assert_eq!(replies[&3], (22, vec![]), "EINVAL");
    }

    #[tokio::test]
    async fn a_wrong_export_name_gets_nothing() {
        let mut input = seed("simple");
        // NBD_OPT_EXPORT_NAME "token" → "tokem".
        let at = input.windows(5).position(|w| w == b"token").expect("name");
        input[at + 4] = b'm';
        let out = session(export(), "token", &input).await;
        assert_eq!(out.len(), 18, "the greeting and nothing else");
    }

    #[test]
    fn option_data_is_parsed_or_refused() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("abc".to_string(), vec![0, 3])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info(&long), None);
        assert_eq!(parse_info(&u32::MAX.to_be_bytes()), None);

        let mut m = 1u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"x");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(parse_meta(&m), Some(("x".to_string(), vec!["base:allocation".to_string()])));
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta(&huge), None);
    }

    fn opt(o: u32, d: &[u8]) -> Vec<u8> {
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
        b
    }

    fn meta(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        d
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    fn req(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// The structured reply chunks after the option replies up to GO's ACK: (flags, type,
    /// cookie, payload).
    fn chunks_after_go(out: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let mut at = 18;
        // Option replies until GO's ACK (GO is option 7, ACK is 1).
        loop {
            let opt = u32::from_be_bytes(out[at + 8..at + 12].try_into().expect("4"));
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().expect("4"));
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().expect("4")) as usize;
            at += 20 + len;
            if opt == 7 && kind == 1 {
                break;
            }
        }
        let mut v = Vec::new();
        while at < out.len() {
            assert_eq!(out[at..at + 4], 0x668e_33efu32.to_be_bytes());
            let flags = u16::from_be_bytes([out[at + 4], out[at + 5]]);
            let kind = u16::from_be_bytes([out[at + 6], out[at + 7]]);
            let cookie = u64::from_be_bytes(out[at + 8..at + 16].try_into().expect("8"));
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().expect("4")) as usize;
            v.push((flags, kind, cookie, out[at + 20..at + 20 + len].to_vec()));
            at += 20 + len;
        }
        v
    }

    #[tokio::test]
    async fn a_failed_set_meta_context_clears_the_selection_and_an_empty_read_is_one_none_chunk() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(8, &[]));
        input.extend(opt(10, &meta("token")));
        input.extend(opt(10, &meta("other")));
        input.extend(opt(7, &go("token")));
        input.extend(req(7, 0, 1, 0, 4096));
        input.extend(req(0, 4, 2, 100, 0));
        input.extend(req(0, 0, 3, 100, 0));
        input.extend(req(2, 0, 4, 0, 0));
        let out = session(export(), "token", &input).await;
        let mut chunks = chunks_after_go(&out);
        chunks.sort_by_key(|c| c.2);
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        // BLOCK_STATUS: no context is selected any more → an error chunk, EINVAL.
        assert_eq!((chunks[0].0, chunks[0].1, chunks[0].2), (1, 0x8001, 1));
        assert_eq!(chunks[0].3[..4], 22u32.to_be_bytes());
        // Zero-length reads, with and without DF: one NONE chunk, done, no payload.
        for c in &chunks[1..] {
            assert_eq!((c.0, c.1, c.3.len()), (1, 0, 0), "{c:?}");
        }
    }

    #[tokio::test]
    async fn structured_sessions_are_told_they_may_send_df() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(8, &[]));
        input.extend(opt(1, b"token"));
        let out = session(export(), "token", &input).await;
        // Greeting (18), the ACK of STRUCTURED_REPLY (20), then size and flags.
        assert_eq!(out[38..46], 65536u64.to_be_bytes());
        assert_eq!(u16::from_be_bytes([out[46], out[47]]), 1 | 2 | 128 | 256);
    }
}
