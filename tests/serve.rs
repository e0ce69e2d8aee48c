//! `ferry serve --nbd` spoken to byte by byte (issue 12 item 3): the negotiation (the token is
//! the export name, nothing is listed), structured reads with holes, one-chunk reads, simple
//! replies, block status, pipelined requests answered out of order, writes refused, reads
//! past the end refused, and holes never fetched. The real clients (qemu-img, nbdcopy,
//! nbdinfo, ext4 through qemu-storage-daemon) are in `ceph::a_backup_opens_over_nbd…`.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};

use ferry_testdata::Volume;

use crate::util::Repo;

const MIB: u64 = 1 << 20;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

/// A running `ferry serve`, stopped (SIGTERM) when dropped.
pub struct Server {
    child: Child,
    /// What it printed first (the URLs, as JSON).
    pub urls: serde_json::Value,
}

impl Server {
    pub fn start(repo: &Repo, args: &[&str]) -> Server {
        Server::start_with(repo, args, &[])
    }

    pub fn start_with(repo: &Repo, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd_args = vec!["serve", "--json"];
        cmd_args.extend_from_slice(args);
        let mut cmd = repo.cmd(&cmd_args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry serve");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read the URLs");
        if line.is_empty() {
            let mut err = String::new();
            let _ = child.stderr.take().expect("stderr").read_to_string(&mut err);
            panic!("ferry serve printed nothing: {err}");
        }
        child.stdout = Some(out.into_inner());
        Server {
            child,
            urls: serde_json::from_str(&line).expect("the URLs as JSON"),
        }
    }

    /// `host:port` and the export name of the TCP NBD server.
    pub fn nbd(&self) -> (String, String) {
        let url = self.urls["nbd"].as_str().expect("nbd url");
        let rest = url.strip_prefix("nbd://").expect("nbd://");
        let (addr, name) = rest.split_once('/').expect("addr/name");
        (addr.to_string(), name.to_string())
    }

    /// Stops it; what it says it did (the JSON line printed at exit).
    pub fn stop(mut self) -> serde_json::Value {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().expect("wait");
        let mut out = String::new();
        self.child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
        let mut err = String::new();
        let _ = self.child.stderr.take().expect("stderr").read_to_string(&mut err);
        assert!(status.success(), "ferry serve: {status}\n{out}\n{err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal NBD client: just enough protocol to check the server byte by byte.
struct Client {
    s: TcpStream,
}

#[derive(Debug)]
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(hello[8..16].try_into().expect("8")), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), 3, "fixed newstyle, no zeroes");
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        Client { s }
    }

    fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b).expect("u16");
        u16::from_be_bytes(b)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).expect("u32");
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).expect("u64");
        u64::from_be_bytes(b)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("bytes");
        b
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).expect("option");
    }

    fn opt_reply(&mut self, opt: u32) -> OptReply {
        assert_eq!(self.u64(), 0x0003_e889_0455_65a9, "option reply magic");
        assert_eq!(self.u32(), opt, "reply to the option sent");
        let kind = self.u32();
        let len = self.u32() as usize;
        OptReply {
            kind,
            data: self.bytes(len),
        }
    }

    /// Replies up to and including the final one (an ACK or an error).
    fn opt_replies(&mut self, opt: u32) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply(opt);
            let last = r.kind == 1 || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    fn go(&mut self, name: &str) -> Vec<OptReply> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.option(7, &d);
        self.opt_replies(7)
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).expect("request");
    }

    fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32(), 0x668e_33ef, "structured reply magic");
        let flags = self.u16();
        let kind = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        Chunk {
            flags,
            kind,
            cookie,
            payload: self.bytes(len),
        }
    }

    /// Chunks of replies until `n` of them are done, by cookie.
    fn replies(&mut self, n: usize) -> BTreeMap<u64, Vec<Chunk>> {
        let mut out: BTreeMap<u64, Vec<Chunk>> = BTreeMap::new();
        let mut done = 0;
        while done < n {
            let c = self.chunk();
            if c.flags & 1 != 0 {
                done += 1;
            }
            out.entry(c.cookie).or_default().push(c);
        }
        out
    }
}

/// `NBD_OPT_SET_META_CONTEXT` data asking export `token` for `base:allocation`.
fn allocation_query(token: &str) -> Vec<u8> {
    let mut meta = (token.len() as u32).to_be_bytes().to_vec();
    meta.extend_from_slice(token.as_bytes());
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    meta
}

/// The bytes a structured read reply carries for `len` bytes at `offset`: data and hole
/// chunks placed, error chunks returned as errors.
fn assemble(chunks: &[Chunk], offset: u64, len: usize) -> Result<Vec<u8>, u32> {
    let mut out = vec![0xEEu8; len];
    let mut covered = 0usize;
    assert_eq!(chunks.iter().filter(|c| c.flags & 1 != 0).count(), 1, "one final chunk");
    assert!(chunks.last().expect("a chunk").flags & 1 != 0, "the final chunk is the last");
    for c in chunks {
        match c.kind {
            1 => {
                let at = u64::from_be_bytes(c.payload[..8].try_into().expect("8")) - offset;
                let data = &c.payload[8..];
                out[at as usize..at as usize + data.len()].copy_from_slice(data);
                covered += data.len();
            }
            2 => {
                let at = u64::from_be_bytes(c.payload[..8].try_into().expect("8")) - offset;
                let n = u32::from_be_bytes(c.payload[8..12].try_into().expect("4")) as usize;
                out[at as usize..at as usize + n].fill(0);
                covered += n;
            }
            0 => {}
            k if k & 0x8000 != 0 => return Err(u32::from_be_bytes(c.payload[..4].try_into().expect("4"))),
            k => panic!("unexpected chunk type {k}"),
        }
    }
    assert_eq!(covered, len, "the chunks cover the read exactly");
    Ok(out)
}

#[test]
fn the_nbd_export_speaks_the_protocol_and_serves_the_backup() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(10 * MIB + 4096, 1 << 20, 77);
    // Holes: two whole blocks discarded, and a tail never written.
    v.discard(2 * MIB, 2 * MIB);
    v.discard(7 * MIB, 3 * MIB + 4096);
    let stream = v.diff("s1", Vec::new()).expect("diff");
    repo.backup_bytes("vm", &stream);
    let image = v.data.clone();
    let size = image.len() as u64;
    let data_blocks = image.chunks(MIB as usize).filter(|b| b.iter().any(|x| *x != 0)).count() as u64;

    let server = Server::start(&repo, &["vm", "--nbd", "127.0.0.1:0"]);
    assert!(server.urls.get("http").is_none(), "only what was asked for: {}", server.urls);
    assert_eq!(server.urls["size"], size);
    let (addr, token) = server.nbd();

    // Nothing is listed; another name is unknown; meta contexts need structured replies.
    let mut c = Client::connect(&addr);
    c.option(3, &[]);
    assert_eq!(c.opt_reply(3).kind, 0x8000_0002, "LIST refused by policy");
    let unknown = c.go("guess");
    assert_eq!(unknown.last().map(|r| r.kind), Some(0x8000_0006), "an unknown export");
    let meta = allocation_query(&token);
    c.option(10, &meta);
    assert_eq!(c.opt_reply(10).kind, 0x8000_0003, "SET_META_CONTEXT before STRUCTURED_REPLY");
    c.option(8, &[]);
    assert_eq!(c.opt_reply(8).kind, 1);
    c.option(10, &meta);
    let r = c.opt_replies(10);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].kind, 4);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    let ctx = u32::from_be_bytes(r[0].data[..4].try_into().expect("4"));
    let info = c.go(&token);
    assert_eq!(info.last().map(|r| r.kind), Some(1), "{info:?}");
    let export = info.iter().find(|r| r.kind == 3 && r.data[..2] == [0, 0]).expect("NBD_INFO_EXPORT");
    assert_eq!(u64::from_be_bytes(export.data[2..10].try_into().expect("8")), size);
    let tflags = u16::from_be_bytes([export.data[10], export.data[11]]);
    assert_eq!(tflags & 3, 3, "has flags, read-only");

    // Block status: holes exactly where the image has no data; they read as zeros.
    c.request(7, 0, 1, 0, size as u32, &[]);
    let st = c.chunk();
    assert_eq!((st.kind, st.flags & 1, st.cookie), (5, 1, 1));
    assert_eq!(u32::from_be_bytes(st.payload[..4].try_into().expect("4")), ctx);
    let mut at = 0u64;
    let mut holes = 0;
    for d in st.payload[4..].chunks(8) {
        let len = u32::from_be_bytes(d[..4].try_into().expect("4")) as u64;
        let flags = u32::from_be_bytes(d[4..].try_into().expect("4"));
        let zero = image[at as usize..(at + len) as usize].iter().all(|b| *b == 0);
        if flags == 3 {
            holes += 1;
            assert!(zero, "a hole at {at} (+{len}) is zeros");
        } else {
            assert_eq!(flags, 0);
            assert!(!zero, "data at {at} (+{len}) is not all zeros");
        }
        at += len;
    }
    assert_eq!(at, size, "the descriptors cover the export");
    assert!(holes >= 2, "{holes} holes");
    // One descriptor when asked for one.
    c.request(7, 8, 2, 0, size as u32, &[]);
    let one = c.chunk();
    assert_eq!(one.payload.len(), 12, "REQ_ONE: one descriptor");

    // Reads: across data and holes (hole chunks), unaligned; with DF in one chunk; pipelined,
    // every reply by its cookie.
    let reads: Vec<(u64, u64, u32)> = vec![
        (10, 100, 5 * MIB as u32),
        (11, MIB + 3, 3 * MIB as u32 + 17),
        (12, size - 4096 - 1, 4097),
        (13, 0, 1),
        (14, 6 * MIB, 4 * MIB as u32),
        (15, 2 * MIB + 5, 1000),
    ];
    for (cookie, off, len) in &reads {
        c.request(0, 0, *cookie, *off, *len, &[]);
    }
    c.request(0, 4, 16, MIB, 3 * MIB as u32, &[]);
    let got = c.replies(reads.len() + 1);
    for (cookie, off, len) in &reads {
        let data = assemble(&got[cookie], *off, *len as usize).expect("read");
        assert!(
            data == image[*off as usize..*off as usize + *len as usize],
            "read {cookie} at {off}+{len}"
        );
    }
    assert!(
        got[&10].iter().any(|ch| ch.kind == 2),
        "a read over a hole answers it with a hole chunk"
    );
    assert_eq!(got[&15].len(), 1);
    assert_eq!(got[&15][0].kind, 2, "a read inside a hole is one hole chunk");
    assert_eq!(got[&16].len(), 1, "DF: one chunk");
    assert_eq!(
        assemble(&got[&16], MIB, 3 * MIB as usize).expect("read"),
        image[MIB as usize..4 * MIB as usize]
    );

    // Refused: a read past the end, a write (its payload read past), a trim; the connection
    // goes on after each.
    c.request(0, 0, 20, size - 10, 11, &[]);
    let past = c.replies(1);
    assert_eq!(assemble(&past[&20], 0, 0), Err(22), "EINVAL");
    c.request(1, 0, 21, 0, 4096, &[0x55; 4096]);
    let w = c.chunk();
    assert_eq!(
        (w.kind, u32::from_be_bytes(w.payload[..4].try_into().expect("4"))),
        (0x8001, 1),
        "EPERM"
    );
    c.request(4, 0, 22, 0, 4096, &[]);
    assert_eq!(u32::from_be_bytes(c.chunk().payload[..4].try_into().expect("4")), 1, "EPERM");
    c.request(0, 0, 23, 0, 4096, &[]);
    let after = c.replies(1);
    assert_eq!(assemble(&after[&23], 0, 4096).expect("read"), image[..4096], "not written");
    c.request(2, 0, 24, 0, 0, &[]);
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).expect("closed after NBD_CMD_DISC");
    assert!(rest.is_empty());

    // Without structured replies: simple replies; NBD_OPT_EXPORT_NAME.
    let mut s = Client::connect(&addr);
    s.option(1, token.as_bytes());
    assert_eq!(s.u64(), size);
    assert_eq!(s.u16() & 3, 3);
    s.request(0, 0, 7, 3 * MIB, MIB as u32 + 9, &[]);
    assert_eq!(s.u32(), 0x6744_6698, "simple reply magic");
    assert_eq!(s.u32(), 0, "no error");
    assert_eq!(s.u64(), 7);
    assert!(s.bytes(MIB as usize + 9) == image[3 * MIB as usize..4 * MIB as usize + 9]);
    s.request(1, 0, 8, 0, 512, &[1; 512]);
    assert_eq!((s.u32(), s.u32(), s.u64()), (0x6744_6698, 1, 8), "EPERM");
    drop(s);
    // NBD_OPT_EXPORT_NAME with another name: the connection is closed.
    let mut bad = Client::connect(&addr);
    bad.option(1, b"guess");
    let mut rest = Vec::new();
    let _ = bad.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing served to a wrong name");

    let stats = server.stop();
    let fetched = stats["blocks_fetched"].as_u64().expect("blocks_fetched");
    assert!(
        fetched <= data_blocks,
        "holes are not fetched, blocks once: {fetched} > {data_blocks} ({stats})"
    );
    assert!(fetched > 0, "{stats}");

    // Damaged data is an I/O error for that read, never wrong bytes, and the server goes on.
    for d in std::fs::read_dir(repo.repo_dir().join("chunks")).expect("chunks dir") {
        for f in std::fs::read_dir(d.expect("entry").path()).expect("subdir") {
            let f = f.expect("entry").path();
            let mut bytes = std::fs::read(&f).expect("read");
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&f, bytes).expect("write");
        }
    }
    let server = Server::start(&repo, &["vm", "--nbd", "127.0.0.1:0"]);
    let (addr, token) = server.nbd();
    let mut c = Client::connect(&addr);
    c.option(8, &[]);
    assert_eq!(c.opt_reply(8).kind, 1);
    assert_eq!(c.go(&token).last().map(|r| r.kind), Some(1));
    c.request(0, 0, 30, 0, 4096, &[]);
    c.request(0, 0, 31, 2 * MIB, 4096, &[]);
    let got = c.replies(2);
    assert_eq!(assemble(&got[&30], 0, 4096), Err(5), "EIO for a damaged block");
    assert_eq!(assemble(&got[&31], 2 * MIB, 4096).expect("a hole needs no chunk"), vec![0u8; 4096]);
    server.stop();
}

/// Connects, negotiates structured replies and `base:allocation`, goes to transmission.
fn structured(addr: &str, token: &str) -> Client {
    let mut c = Client::connect(addr);
    c.option(8, &[]);
    assert_eq!(c.opt_reply(8).kind, 1);
    let meta = allocation_query(token);
    c.option(10, &meta);
    assert_eq!(c.opt_replies(10).len(), 2);
    assert_eq!(c.go(token).last().map(|r| r.kind), Some(1));
    c
}

/// Bytes of data (not holes) the export says it has, from block status.
fn data_bytes(c: &mut Client, size: u64) -> u64 {
    c.request(7, 0, u64::MAX, 0, size as u32, &[]);
    let st = c.chunk();
    assert_eq!(st.kind, 5);
    st.payload[4..]
        .chunks(8)
        .filter(|d| d[4..] == [0, 0, 0, 0])
        .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().expect("4"))))
        .sum()
}

/// A sequential reader (256 KiB reads, 4 in flight) of an image larger than the cache: every
/// data block is fetched exactly once — those read ahead are not dropped before they are
/// read — and reading ahead happened.
#[test]
fn a_sequential_reader_is_read_ahead_of_and_each_block_is_fetched_once() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(12 * MIB, 1 << 20, 78);
    v.discard(5 * MIB, MIB);
    repo.backup_bytes("vm", &v.diff("s1", Vec::new()).expect("diff"));
    let image = v.data.clone();
    let server = Server::start(&repo, &["vm", "--nbd", "127.0.0.1:0", "--cache-mib", "3"]);
    let (addr, token) = server.nbd();
    let mut c = structured(&addr, &token);
    let data_blocks = data_bytes(&mut c, image.len() as u64) / MIB;
    assert!(data_blocks >= 8, "{data_blocks} data blocks");
    let step = 256 << 10;
    let n = image.len() as u64 / step;
    let mut got = vec![0xEEu8; image.len()];
    let mut sent = 0u64;
    let mut done = 0u64;
    while done < n {
        while sent < n && sent < done + 4 {
            c.request(0, 0, sent, sent * step, step as u32, &[]);
            sent += 1;
        }
        let r = c.replies(1);
        for (cookie, chunks) in r {
            let off = cookie * step;
            let data = assemble(&chunks, off, step as usize).expect("read");
            got[off as usize..(off + step) as usize].copy_from_slice(&data);
        }
        done += 1;
    }
    assert!(got == image, "the image read sequentially");
    let stats = server.stop();
    assert_eq!(stats["blocks_fetched"].as_u64(), Some(data_blocks), "{stats}");
    assert!(stats["blocks_read_ahead"].as_u64().expect("n") >= data_blocks / 2, "{stats}");
}

/// A client that sends reads and never reads the replies holds its own share of the server
/// (64 MiB) and no more: another client is still answered at once.
#[test]
fn a_client_that_stops_reading_does_not_stop_the_others() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(16 * MIB, 1 << 20, 79);
    repo.backup_bytes("vm", &v.diff("s1", Vec::new()).expect("diff"));
    let server = Server::start(&repo, &["vm", "--nbd", "127.0.0.1:0"]);
    let (addr, token) = server.nbd();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut a = structured(&addr, &token);
        for k in 0..40 {
            a.request(0, 0, k, 0, 16 * MIB as u32, &[]);
        }
        stalled.push(a);
    }
    let mut b = structured(&addr, &token);
    b.s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    let started = std::time::Instant::now();
    b.request(0, 0, 1, 4096, 4096, &[]);
    let r = b.replies(1);
    assert_eq!(assemble(&r[&1], 4096, 4096).expect("read"), v.data[4096..8192]);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    drop(stalled);
    server.stop();
}

/// Replies come as they are ready, not in the order asked: with every chunk fetch slowed to a
/// second, a read of a hole sent after a read of data is answered first.
#[test]
fn a_hole_is_answered_before_a_slow_block_asked_for_earlier() {
    let repo = Repo::file(&["--block-size", "1M"]);
    let mut v = Volume::generated(4 * MIB, 1 << 20, 80);
    v.discard(2 * MIB, 2 * MIB);
    repo.backup_bytes("vm", &v.diff("s1", Vec::new()).expect("diff"));
    let server = Server::start_with(
        &repo,
        &["vm", "--nbd", "127.0.0.1:0"],
        &[("FERRY_TEST_FAULTS", "get:chunks/*:slow=1s")],
    );
    let (addr, token) = server.nbd();
    let mut c = structured(&addr, &token);
    c.request(0, 0, 1, 0, 4096, &[]);
    c.request(0, 0, 2, 3 * MIB, 4096, &[]);
    let first = c.chunk();
    assert_eq!((first.cookie, first.kind), (2, 2), "the hole first, as a hole chunk");
    let second = c.chunk();
    assert_eq!(second.cookie, 1);
    assert!(second.payload[8..] == v.data[..4096]);
    server.stop();
}
