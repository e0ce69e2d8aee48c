//! Deterministic volumes and export-diff streams, so tests, the demo and the benchmarks all
//! run on the same data.
//!
//! * [`block_content`]: mixed content per block (about 25% zero, 35% binary-like, 25% text,
//!   15% random), the reference mix of ferry's benchmarks.
//! * [`data_block_content`], [`scattered_blocks`]: sparse volumes (e.g. 1 TiB with a few
//!   hundred data blocks) for the scale benchmark, as export-diff streams only.
//! * [`Volume`]: an in-memory image that records changes like librbd does and emits the
//!   export-diff stream between two points, for exact expected images in tests.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use rbd_diff::{DiffHeader, DiffWriter};

/// A small, fast, seedable generator (xorshift64*), good enough for test data. Not for
/// anything that needs real randomness: the whole sequence follows from the seed.
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `0..n` (slightly biased: modulo reduction); 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills `buf` with pseudo-random bytes (one [`Rng::next_u64`] per 8 bytes).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The kind of content of a generated block. As `usize` it indexes the array returned by
/// [`kind_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All zero bytes.
    Zero,
    /// Like an executable: segments of random bytes, zero padding and repeats of earlier
    /// segments (compresses partly).
    Binary,
    /// Words and numbers from a small vocabulary, like a log file (compresses well).
    Text,
    /// Pseudo-random bytes (incompressible).
    Random,
}

/// Which kind block `index` of a volume with `seed` gets (about 25/35/25/15 % for
/// zero/binary/text/random).
pub fn block_kind(seed: u64, index: u64) -> Kind {
    let h = blake3::hash(&[seed.to_le_bytes(), index.to_le_bytes()].concat());
    match h.as_bytes()[0] as u32 * 100 / 256 {
        0..=24 => Kind::Zero,
        25..=59 => Kind::Binary,
        60..=84 => Kind::Text,
        _ => Kind::Random,
    }
}

const WORDS: &[&str] = &[
    "the",
    "volume",
    "snapshot",
    "ceph",
    "object",
    "backup",
    "restore",
    "cluster",
    "pool",
    "image",
    "data",
    "block",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "with",
    "replication",
    "disaster",
    "recovery",
    "chain",
    "manifest",
    "chunk",
    "error",
    "warning",
    "info",
    "2026-11-24T12:00:00Z",
    "GET",
    "PUT",
    "/var/lib/ceph/osd",
    "status=200",
    "latency_ms=",
    "user",
    "session",
    "request",
    "id",
];

/// Fills `buf` with content of the given kind.
pub fn fill_kind(kind: Kind, rng: &mut Rng, buf: &mut [u8]) {
    match kind {
        Kind::Zero => buf.fill(0),
        Kind::Random => rng.fill(buf),
        Kind::Text => {
            let mut pos = 0;
            while pos < buf.len() {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                let sep: &[u8] = if rng.below(12) == 0 { b"\n" } else { b" " };
                for &b in w.iter().chain(sep) {
                    if pos < buf.len() {
                        buf[pos] = b;
                        pos += 1;
                    }
                }
                if rng.below(7) == 0 && pos + 4 < buf.len() {
                    let n = rng.below(100_000).to_string();
                    for &b in n.as_bytes() {
                        if pos < buf.len() {
                            buf[pos] = b;
                            pos += 1;
                        }
                    }
                }
            }
        }
        Kind::Binary => {
            // Like executables: random code, zero padding, repeated tables.
            let mut pos = 0;
            while pos < buf.len() {
                let seg = (64 + rng.below(448) as usize).min(buf.len() - pos);
                match rng.below(10) {
                    0..=4 => rng.fill(&mut buf[pos..pos + seg]),
                    5..=6 => buf[pos..pos + seg].fill(0),
                    _ if pos >= seg => {
                        let from = rng.below((pos - seg + 1) as u64) as usize;
                        buf.copy_within(from..from + seg, pos);
                    }
                    _ => rng.fill(&mut buf[pos..pos + seg]),
                }
                pos += seg;
            }
        }
    }
}

/// Content of block `index`, `block_size` bytes (deterministic in `seed` and `index`; the kind
/// is [`block_kind`]).
pub fn block_content(seed: u64, index: u64, block_size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; block_size];
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x1000_0000_01B3));
    fill_kind(block_kind(seed, index), &mut rng, &mut buf);
    buf
}

/// Content of data block `index` of a sparse volume: like [`block_content`], but never all
/// zero (a zero-kind block gets binary-like content instead).
pub fn data_block_content(seed: u64, index: u64, block_size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; block_size];
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x1000_0000_01B3));
    let kind = match block_kind(seed, index) {
        Kind::Zero => Kind::Binary,
        k => k,
    };
    fill_kind(kind, &mut rng, &mut buf);
    if buf.iter().all(|&b| b == 0) {
        buf[0] = 1;
    }
    buf
}

/// `count` distinct block indices below `blocks`, sorted, chosen by `seed` (all of them when
/// `count >= blocks`).
pub fn scattered_blocks(blocks: u64, count: u64, seed: u64) -> Vec<u64> {
    if count >= blocks {
        return (0..blocks).collect();
    }
    let mut rng = Rng::new(seed);
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < count {
        set.insert(rng.below(blocks));
    }
    set.into_iter().collect()
}

/// How many blocks of each kind a generated image of `size` bytes has:
/// `[zero, binary, text, random]` (the last, partial block counts too).
pub fn kind_counts(size: u64, block_size: u64, seed: u64) -> [u64; 4] {
    let mut counts = [0u64; 4];
    for i in 0..size.div_ceil(block_size) {
        counts[block_kind(seed, i) as usize] += 1;
    }
    counts
}

/// Writes a raw image of `size` bytes of mixed content: block `i` is
/// [`block_content`]`(seed, i, block_size)`, the last one cut to fit.
pub fn write_image<W: Write>(out: &mut W, size: u64, block_size: usize, seed: u64) -> io::Result<()> {
    let mut off = 0u64;
    let mut i = 0u64;
    while off < size {
        let b = block_content(seed, i, block_size);
        let n = (size - off).min(block_size as u64) as usize;
        out.write_all(&b[..n])?;
        off += n as u64;
        i += 1;
    }
    Ok(())
}

/// Writes the full export-diff (v1) of a raw image, the way `rbd export-diff` does without
/// `--from-snap`: one `w` per non-zero object, zero objects omitted.
///
/// Reads `size` bytes from `image` in objects of `object_size` bytes, writes the stream
/// (to-snapshot `to_snap`) to `out` and returns `out` after flushing it. Errors of the diff
/// writer come back as [`io::Error`]s.
pub fn full_diff_of_image<R: Read, W: Write>(image: &mut R, size: u64, object_size: usize, to_snap: &str, out: W) -> io::Result<W> {
    let header = DiffHeader {
        from_snap: None,
        to_snap: Some(to_snap.to_string()),
        image_size: size,
        protected: None,
    };
    let mut w = DiffWriter::new(out, &header).map_err(io::Error::other)?;
    let mut buf = vec![0u8; object_size];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(object_size as u64) as usize;
        image.read_exact(&mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            w.write_data(off, &buf[..n]).map_err(io::Error::other)?;
        }
        off += n as u64;
    }
    w.finish().map_err(io::Error::other)
}

/// An in-memory volume that tracks changed ranges since the last diff, like librbd's diff.
///
/// All offsets, lengths and sizes are in bytes. Writes and discards beyond the end of the
/// volume panic.
#[derive(Clone)]
pub struct Volume {
    /// The current content of the whole volume (its length is the volume size). Writing to
    /// it directly bypasses change tracking: the next diff will not carry such changes.
    pub data: Vec<u8>,
    /// Changed ranges since the last emitted diff: start → end (merged, non-overlapping).
    dirty: BTreeMap<u64, u64>,
    /// Ranges discarded (emitted as `z` regardless of content).
    discarded: BTreeMap<u64, u64>,
    /// The snapshot of the last emitted diff (the next diff's from-snapshot); None before
    /// the first diff.
    pub snap: Option<String>,
}

fn add_range(map: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    let overlapping: Vec<(u64, u64)> = map.range(..=end).filter(|(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
    for (s, e) in overlapping {
        map.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    map.insert(start, end);
}

fn remove_range(map: &mut BTreeMap<u64, u64>, start: u64, end: u64) {
    let overlapping: Vec<(u64, u64)> = map.range(..end).filter(|(_, &e)| e > start).map(|(&s, &e)| (s, e)).collect();
    for (s, e) in overlapping {
        map.remove(&s);
        if s < start {
            map.insert(s, start);
        }
        if e > end {
            map.insert(end, e);
        }
    }
}

impl Volume {
    /// A volume of `size` bytes of mixed content, as [`write_image`] writes it; everything
    /// counts as changed (the first diff is full).
    pub fn generated(size: u64, block_size: usize, seed: u64) -> Volume {
        let mut data = Vec::with_capacity(size as usize);
        write_image(&mut data, size, block_size, seed).expect("writing to a Vec cannot fail");
        let mut v = Volume {
            data,
            dirty: BTreeMap::new(),
            discarded: BTreeMap::new(),
            snap: None,
        };
        if size > 0 {
            add_range(&mut v.dirty, 0, size);
        }
        v
    }

    /// The volume size in bytes.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Writes `bytes` at `offset` and records the range as changed (it undoes an earlier
    /// discard there). Panics if the write goes beyond the end of the volume.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        assert!(end <= self.size(), "write beyond the end of the volume");
        self.data[offset as usize..end as usize].copy_from_slice(bytes);
        add_range(&mut self.dirty, offset, end);
        remove_range(&mut self.discarded, offset, end);
    }

    /// Writes zeros (librbd reports them as `z` when the whole extent reads back zero).
    pub fn write_zeros(&mut self, offset: u64, len: u64) {
        self.write(offset, &vec![0u8; len as usize]);
    }

    /// Discards a range: reads back as zeros, reported as `z`.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        self.data[offset as usize..end as usize].fill(0);
        remove_range(&mut self.dirty, offset, end);
        add_range(&mut self.discarded, offset, end);
    }

    /// Resizes to `size` bytes. Growing adds zeros that no diff reports; a shrink drops
    /// changes past the end (the stream then only carries `s`).
    pub fn resize(&mut self, size: u64) {
        self.data.resize(size as usize, 0);
        remove_range(&mut self.dirty, size, u64::MAX);
        remove_range(&mut self.discarded, size, u64::MAX);
    }

    /// Emits the diff since the last snapshot (or the full diff) as snapshot `to`: a v1
    /// stream to `out`, which is returned after flushing. Changed ranges become `w` records,
    /// or `z` if they read back all zero; discarded ranges become `z`. Afterwards nothing
    /// counts as changed and [`Volume::snap`] is `to`.
    pub fn diff<W: Write>(&mut self, to: &str, out: W) -> io::Result<W> {
        let header = DiffHeader {
            from_snap: self.snap.clone(),
            to_snap: Some(to.to_string()),
            image_size: self.size(),
            protected: None,
        };
        let mut w = DiffWriter::new(out, &header).map_err(io::Error::other)?;
        let mut events: Vec<(u64, u64, bool)> = self.dirty.iter().map(|(&s, &e)| (s, e, false)).collect();
        events.extend(self.discarded.iter().map(|(&s, &e)| (s, e, true)));
        events.sort();
        for (s, e, discard) in events {
            let bytes = &self.data[s as usize..e as usize];
            if discard || bytes.iter().all(|&b| b == 0) {
                w.write_zero(s, e - s).map_err(io::Error::other)?;
            } else {
                w.write_data(s, bytes).map_err(io::Error::other)?;
            }
        }
        self.dirty.clear();
        self.discarded.clear();
        self.snap = Some(to.to_string());
        w.finish().map_err(io::Error::other)
    }

    /// BLAKE3 of the current content (64 hex digits), for comparing restores.
    pub fn hash(&self) -> String {
        blake3::hash(&self.data).to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_roughly_as_documented() {
        let mut counts = [0u32; 4];
        for i in 0..2000 {
            counts[block_kind(7, i) as usize] += 1;
        }
        assert!((400..600).contains(&counts[0]), "{counts:?}");
        assert!((600..800).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn scattered_and_data_blocks() {
        let b = scattered_blocks(1000, 50, 9);
        assert_eq!(b.len(), 50);
        assert!(b.windows(2).all(|w| w[0] < w[1]) && b[49] < 1000);
        assert_eq!(scattered_blocks(5, 9, 1), vec![0, 1, 2, 3, 4]);
        for i in 0..40 {
            assert!(data_block_content(3, i, 4096).iter().any(|&x| x != 0));
        }
        assert_eq!(kind_counts(10 * 4096 + 1, 4096, 7).iter().sum::<u64>(), 11);
    }

    #[test]
    fn volume_diff_replays_to_same_image() {
        let mut v = Volume::generated(3 << 20, 1 << 20, 1);
        let full = v.diff("s1", Vec::new()).unwrap();
        v.write(100, b"hello");
        v.discard(1 << 20, 1 << 20);
        v.write_zeros(5000, 100);
        let inc = v.diff("s2", Vec::new()).unwrap();
        let mut img = vec![0u8; 3 << 20];
        for stream in [&full, &inc] {
            let mut r = rbd_diff::DiffReader::new(&stream[..]).unwrap();
            loop {
                match r.next_event().unwrap() {
                    rbd_diff::Event::Data { offset, data } => img[offset as usize..offset as usize + data.len()].copy_from_slice(data),
                    rbd_diff::Event::Zero { offset, length } => img[offset as usize..(offset + length) as usize].fill(0),
                    rbd_diff::Event::End => break,
                }
            }
        }
        assert_eq!(img, v.data);
    }
}
