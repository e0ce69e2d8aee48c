//! The envelope every ferry object starts with, and the AES-256-GCM seal around its body.
//!
//! ```text
//! magic "FERY" | version u8 = 1 | kind u8 | flags u8 | reserved u8 = 0 | body
//! encrypted body: nonce[12] | ciphertext | tag[16]
//! ```
//! The associated data of the seal is the 8 header bytes followed by the object's identity
//! (chunk ID, manifest key), so neither flags nor placement can be changed undetected.

use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use rand::RngCore;

use crate::error::{Error, Result};

/// The first 4 bytes of every object: `FERY` (`46 45 52 59`).
pub const MAGIC: &[u8; 4] = b"FERY";
/// The envelope version this build writes and the only one it reads (header byte 4).
pub const OBJECT_VERSION: u8 = 1;
/// Length of the fixed header in bytes: magic, version, kind, flags, reserved.
pub const HEADER_LEN: usize = 8;
/// Length of the AES-GCM nonce in bytes (96 bits), random per object.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag in bytes (128 bits).
pub const TAG_LEN: usize = 16;

/// What an object is; part of the header and of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// `config`: plain header and JSON (kind byte `01`).
    Config = 1,
    /// `keys/<slot id>`: plain header and JSON with the wrapped master key (kind byte `02`).
    KeySlot = 2,
    /// `chunks/<2 hex>/<64 hex>`: one block's content, sealed (kind byte `03`).
    Chunk = 3,
    /// `volumes/<volume>/backups/<name>`: one backup's manifest, sealed (kind byte `04`).
    Manifest = 4,
    /// `volumes/<volume>/protected/<name>`: a backup's protection marker, sealed (kind byte `05`).
    Protection = 5,
    /// `sessions/…` and `gc/…`: garbage-collection protocol records, sealed (kind byte `06`).
    GcRecord = 6,
    /// `chunks/<2 hex>/<64 hex>` of a delta object: a block's changed extents on a base (kind
    /// byte `07`, FORMAT.md §14).
    Delta = 7,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ObjectKind::Config,
            2 => ObjectKind::KeySlot,
            3 => ObjectKind::Chunk,
            4 => ObjectKind::Manifest,
            5 => ObjectKind::Protection,
            6 => ObjectKind::GcRecord,
            7 => ObjectKind::Delta,
            _ => return None,
        })
    }
}

/// Flags bit 0: the payload is one zstd frame of the plaintext.
pub const FLAG_ZSTD: u8 = 0b01;
/// Flags bit 1: the body is sealed (`nonce ‖ ciphertext ‖ tag`); required for chunks and
/// manifests.
pub const FLAG_ENCRYPTED: u8 = 0b10;

/// The parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The object kind (header byte 5).
    pub kind: ObjectKind,
    /// The flags byte (header byte 6): [`FLAG_ZSTD`], [`FLAG_ENCRYPTED`]; no other bit is
    /// valid.
    pub flags: u8,
}

impl Header {
    /// The 8 header bytes: magic, [`OBJECT_VERSION`], kind, flags, reserved `00`.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = OBJECT_VERSION;
        h[5] = self.kind as u8;
        h[6] = self.flags;
        h
    }

    /// Parses and checks the header of `bytes` as an object of `expected` kind: length,
    /// magic, version ([`Error::UnsupportedFormat`] if not 1), kind, no unknown flag bits,
    /// reserved byte zero ([`Error::BadObject`] otherwise). `path` names the object in errors.
    /// Does not check which flags the kind requires.
    pub fn decode(bytes: &[u8], expected: ObjectKind, path: &str) -> Result<Header> {
        let bad = |reason: String| Error::BadObject {
            path: path.to_string(),
            reason,
        };
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than the 8-byte header", bytes.len())));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad("bad magic (not written by ferry)".into()));
        }
        if bytes[4] != OBJECT_VERSION {
            return Err(Error::UnsupportedFormat {
                path: path.to_string(),
                found: u32::from(bytes[4]),
                supported: u32::from(OBJECT_VERSION),
            });
        }
        let kind = ObjectKind::from_u8(bytes[5]).ok_or_else(|| bad(format!("unknown object kind {}", bytes[5])))?;
        if kind != expected {
            return Err(bad(format!("is a {kind:?} object, expected {expected:?}")));
        }
        let flags = bytes[6];
        if flags & !(FLAG_ZSTD | FLAG_ENCRYPTED) != 0 || bytes[7] != 0 {
            return Err(bad(format!("unknown flags {:#04x}/{:#04x}", flags, bytes[7])));
        }
        Ok(Header { kind, flags })
    }
}

/// A 256-bit AES-GCM key (aws-lc's AES-256-GCM: the standard construction, byte for byte
/// what any AES-GCM gives; its AVX-512/VAES code seals and opens several GiB/s per core).
#[derive(Clone)]
pub struct SealKey(Arc<LessSafeKey>);

impl SealKey {
    /// A seal key from 32 raw key bytes.
    pub fn new(key: &[u8; 32]) -> Self {
        // A 32-byte key is exactly what AES-256-GCM takes: this cannot fail.
        let unbound = UnboundKey::new(&AES_256_GCM, key).unwrap_or_else(|_| unreachable!("a 32-byte key is an AES-256 key"));
        SealKey(Arc::new(LessSafeKey::new(unbound)))
    }

    /// Encrypts `data` in place with `nonce` and associated data `aad`; returns the tag.
    fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], data: &mut [u8]) -> Result<[u8; TAG_LEN]> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data)
            .map_err(|_| Error::Kdf {
                reason: "plaintext too long for AES-GCM".into(),
            })?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts `plaintext` in place into `out` (which already holds the header), appending
    /// nonce, ciphertext and tag.
    pub fn seal_into(&self, out: &mut Vec<u8>, identity: &[u8], plaintext: &[u8]) -> Result<()> {
        let header_len = out.len();
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut aad = Vec::with_capacity(header_len + identity.len());
        aad.extend_from_slice(&out[..header_len]);
        aad.extend_from_slice(identity);
        out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self.seal(nonce, &aad, &mut out[start..])?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Verifies and decrypts a sealed body (`nonce | ciphertext | tag`) in place; returns the
    /// range of the plaintext within `body`. `header` is the object's 8 header bytes (empty
    /// for a key slot's wrapped key); the associated data is `header ‖ identity`. A tag that
    /// does not verify is [`Error::Integrity`].
    pub fn open_in_place(&self, header: &[u8], identity: &[u8], body: &mut [u8], path: &str) -> Result<std::ops::Range<usize>> {
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::BadObject {
                path: path.to_string(),
                reason: "sealed body shorter than nonce and tag".into(),
            });
        }
        let mut aad = Vec::with_capacity(header.len() + identity.len());
        aad.extend_from_slice(header);
        aad.extend_from_slice(identity);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&body[..NONCE_LEN]);
        let tag_at = body.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&body[tag_at..]);
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &tag,
                &mut body[NONCE_LEN..tag_at],
            )
            .map_err(|_| Error::Integrity { path: path.to_string() })?;
        Ok(NONCE_LEN..tag_at)
    }

    /// [`Self::open_in_place`] on an owned body, returning the plaintext.
    pub fn open(&self, header: &[u8], identity: &[u8], mut body: Vec<u8>, path: &str) -> Result<Vec<u8>> {
        let range = self.open_in_place(header, identity, &mut body, path)?;
        body.truncate(range.end);
        body.drain(..range.start);
        Ok(body)
    }
}

/// zstd contexts kept for reuse: making one per object costs its tables' allocation and
/// zeroing each time (a compression context at level 3 is a few MiB). At most one context per
/// concurrent user is ever made; a handful are kept — compression contexts only up to level
/// [`contexts::POOLED_LEVELS`] (a level-19 context for a 4 MiB block is ~50 MiB: too much to
/// keep resident in a long-running worker; at such levels the compression dwarfs making it).
mod contexts {
    use std::sync::Mutex;

    const KEEP: usize = 4;
    /// The highest compression level whose contexts are kept.
    pub(super) const POOLED_LEVELS: i32 = 9;

    static COMPRESSORS: Mutex<Vec<(i32, zstd::bulk::Compressor<'static>)>> = Mutex::new(Vec::new());
    static DECOMPRESSORS: Mutex<Vec<zstd::bulk::Decompressor<'static>>> = Mutex::new(Vec::new());

    /// Runs `f` with a compression context at `level`.
    pub(super) fn with_compressor<T>(
        level: i32,
        f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let taken = {
            let mut pool = COMPRESSORS.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter().position(|(l, _)| *l == level).map(|i| pool.swap_remove(i).1)
        };
        let mut c = match taken {
            Some(c) => c,
            None => zstd::bulk::Compressor::new(level)?,
        };
        let out = f(&mut c);
        let mut pool = COMPRESSORS.lock().unwrap_or_else(|p| p.into_inner());
        if level <= POOLED_LEVELS {
            if pool.len() >= KEEP {
                // Make room: the oldest context (maybe of another level) goes.
                pool.remove(0);
            }
            pool.push((level, c));
        }
        out
    }

    /// Runs `f` with a decompression context.
    pub(super) fn with_decompressor<T>(f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>) -> std::io::Result<T> {
        let taken = DECOMPRESSORS.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut d = match taken {
            Some(d) => d,
            None => zstd::bulk::Decompressor::new()?,
        };
        let out = f(&mut d);
        let mut pool = DECOMPRESSORS.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < KEEP {
            pool.push(d);
        }
        out
    }
}

/// Seals `payload` as an object of `kind` with optional zstd compression (kept raw when it
/// does not shrink). Returns the full object bytes. Compresses straight into the output and
/// encrypts in place: one buffer per object, never zero-filled first.
pub fn encode_sealed(key: &SealKey, kind: ObjectKind, identity: &[u8], payload: &[u8], zstd_level: Option<i32>) -> Result<Vec<u8>> {
    let start = HEADER_LEN + NONCE_LEN;
    let mut flags = FLAG_ENCRYPTED;
    let mut out = Vec::new();
    if let Some(level) = zstd_level {
        // Header and nonce first (filled below), the frame written after them into the
        // spare capacity: the bound's worth of memory is never zeroed.
        out.reserve_exact(start + zstd::zstd_safe::compress_bound(payload.len()) + TAG_LEN);
        out.resize(start, 0);
        let mut cursor = std::io::Cursor::new(out);
        cursor.set_position(start as u64);
        let compressed = contexts::with_compressor(level, |c| c.compress_to_buffer(payload, &mut cursor));
        out = cursor.into_inner();
        match compressed {
            // The cursor's buffer now ends with the frame: `start + n` bytes.
            Ok(n) if n < payload.len() => flags |= FLAG_ZSTD,
            _ => out.clear(),
        }
    }
    if flags & FLAG_ZSTD == 0 {
        out.reserve_exact(start + payload.len() + TAG_LEN);
        out.resize(start, 0);
        out.extend_from_slice(payload);
    }
    let header = Header { kind, flags }.encode();
    out[..HEADER_LEN].copy_from_slice(&header);
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    out[HEADER_LEN..start].copy_from_slice(&nonce);
    let mut aad = Vec::with_capacity(HEADER_LEN + identity.len());
    aad.extend_from_slice(&header);
    aad.extend_from_slice(identity);
    let tag = key.seal(nonce, &aad, &mut out[start..])?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens an object written by [`encode_sealed`]: checks the header, verifies the tag in place,
/// decompresses (refusing output beyond `max_len`).
pub fn decode_sealed(key: &SealKey, kind: ObjectKind, identity: &[u8], mut object: Vec<u8>, max_len: usize, path: &str) -> Result<Vec<u8>> {
    let header = Header::decode(&object, kind, path)?;
    if header.flags & FLAG_ENCRYPTED == 0 {
        // v1 never writes unencrypted chunks or manifests; accepting one would allow a downgrade.
        return Err(Error::BadObject {
            path: path.to_string(),
            reason: "object is not encrypted".into(),
        });
    }
    let mut head = [0u8; HEADER_LEN];
    head.copy_from_slice(&object[..HEADER_LEN]);
    let range = key.open_in_place(&head, identity, &mut object[HEADER_LEN..], path)?;
    let (s, e) = (HEADER_LEN + range.start, HEADER_LEN + range.end);
    if header.flags & FLAG_ZSTD != 0 {
        decompress_bounded(&object[s..e], max_len).map_err(|reason| Error::Decompress {
            path: path.to_string(),
            reason,
        })
    } else {
        object.truncate(e);
        object.drain(..s);
        Ok(object)
    }
}

fn decompress_bounded(data: &[u8], max_len: usize) -> std::result::Result<Vec<u8>, String> {
    // The frame records its content size; checking it first avoids allocating for a lie, and
    // an honest frame gets a buffer of exactly its size (not the limit's worth of address
    // space, which the allocator would map and fault in afresh for every block).
    let capacity = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n > max_len as u64 => return Err(format!("content size {n} exceeds limit {max_len}")),
        Ok(Some(n)) => n as usize,
        Ok(None) => max_len,
        Err(_) => return Err("not a zstd frame".into()),
    };
    let mut out = Vec::with_capacity(capacity);
    let n = contexts::with_decompressor(|d| d.decompress_to_buffer(data, &mut out)).map_err(|e| e.to_string())?;
    if capacity != max_len && n != capacity {
        return Err(format!("the frame holds {n} bytes, its header says {capacity}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let key = SealKey::new(&[7u8; 32]);
        let payload = vec![42u8; 10_000];
        let obj = encode_sealed(&key, ObjectKind::Chunk, b"id", &payload, Some(3)).unwrap();
        assert_eq!(obj[6], FLAG_ZSTD | FLAG_ENCRYPTED);
        let back = decode_sealed(&key, ObjectKind::Chunk, b"id", obj.clone(), 1 << 20, "p").unwrap();
        assert_eq!(back, payload);
        // Another identity, another key, a flipped bit, a changed flag: all refused.
        assert!(matches!(
            decode_sealed(&key, ObjectKind::Chunk, b"other", obj.clone(), 1 << 20, "p"),
            Err(Error::Integrity { .. })
        ));
        let other = SealKey::new(&[8u8; 32]);
        assert!(matches!(
            decode_sealed(&other, ObjectKind::Chunk, b"id", obj.clone(), 1 << 20, "p"),
            Err(Error::Integrity { .. })
        ));
        for i in HEADER_LEN..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 0x01;
            assert!(
                decode_sealed(&key, ObjectKind::Chunk, b"id", bad.clone(), 1 << 20, "p").is_err(),
                "flip at {i}"
            );
        }
        let mut bad = obj.clone();
        bad[6] = FLAG_ENCRYPTED;
        assert!(matches!(
            decode_sealed(&key, ObjectKind::Chunk, b"id", bad.clone(), 1 << 20, "p"),
            Err(Error::Integrity { .. })
        ));
        assert!(matches!(
            decode_sealed(&key, ObjectKind::Manifest, b"id", obj.clone(), 1 << 20, "p"),
            Err(Error::BadObject { .. })
        ));
        assert!(matches!(
            decode_sealed(&key, ObjectKind::Chunk, b"id", obj[..5].to_vec(), 1 << 20, "p"),
            Err(Error::BadObject { .. })
        ));
    }

    #[test]
    fn incompressible_stays_raw_and_bomb_is_refused() {
        let key = SealKey::new(&[1u8; 32]);
        let mut payload = vec![0u8; 4096];
        rand::rng().fill_bytes(&mut payload);
        let obj = encode_sealed(&key, ObjectKind::Chunk, b"x", &payload, Some(3)).unwrap();
        assert_eq!(obj[6], FLAG_ENCRYPTED);
        let zeros = vec![0u8; 1 << 20];
        let obj = encode_sealed(&key, ObjectKind::Chunk, b"x", &zeros, Some(3)).unwrap();
        assert!(matches!(
            decode_sealed(&key, ObjectKind::Chunk, b"x", obj.clone(), 1000, "p"),
            Err(Error::Decompress { .. })
        ));
    }
}
