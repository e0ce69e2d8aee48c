//! Delta objects: a block stored as the byte ranges that changed on top of a base (FORMAT.md
//! §14), so an incremental of scattered small writes uploads what changed, not whole blocks.
//!
//! A block keeps its content ID (the keyed BLAKE3 of its full content) in the manifest's map;
//! the manifest's delta table says that this content is stored as a delta object on a base
//! content ID, which is a whole chunk or, in turn, a delta. A delta object lives in the chunk
//! key space (`chunks/<2 hex>/<64 hex>`) under its own object ID — the keyed BLAKE3 of its
//! payload under `K_delta` — so garbage collection, sessions, quarantine and the index handle
//! it as one more object, and it is checked against its ID like a chunk.
//!
//! Payload (the plaintext, before zstd and the seal; integers little-endian):
//! ```text
//! "FDLT" | target[32] | base[32] | le32 target_len | le32 n | n × (le32 offset, le32 len) | data
//! ```
//! `data` is the extents' bytes, concatenated in order. Applying it: take the base content,
//! cut or zero-extend it to `target_len`, copy each extent in; the result must hash to
//! `target`.

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::keys::MasterKey;
use crate::object::{decode_sealed, encode_sealed, ObjectKind};

const MAGIC: &[u8; 4] = b"FDLT";
const FIXED: usize = 4 + 32 + 32 + 4 + 4;

/// The longest chain of deltas a writer builds on a whole chunk (a delta on a delta … on a
/// chunk): past it, the block is stored whole.
pub const MAX_WRITE_DEPTH: usize = 8;
/// The most changed bytes a chain of deltas may carry in all (its own and every delta below
/// it) for a block of `block_len` bytes: a quarter of the block; past it, the block is stored
/// whole (a restore then reads little more than the block itself).
pub fn max_chain_bytes(block_len: usize) -> u64 {
    block_len as u64 / 4
}

/// The longest chain a reader follows (a manifest whose table is deeper, or cyclic, is refused).
pub const MAX_READ_DEPTH: usize = 64;

/// One entry of a manifest's delta table: the content `target` is stored as the delta object
/// `object` on the content `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaRef {
    /// The content the delta is applied to (a whole chunk, or another table entry).
    pub base: ChunkId,
    /// The delta object's ID (its key `chunks/<2 hex>/<64 hex>` and associated data).
    pub object: ChunkId,
    /// The delta's payload length (extent table and data, before compression): what the
    /// writer's chain bound counts.
    pub bytes: u32,
}

/// The object ID of a delta payload: keyed BLAKE3 of the payload under a key of its own
/// (`K_delta`), so it is deterministic (two writers of the same delta meet at one create-only
/// key), checkable like a chunk's, and never a content ID.
pub fn delta_object_id(key: &MasterKey, payload: &[u8]) -> ChunkId {
    ChunkId(*blake3::keyed_hash(key.delta_key(), payload).as_bytes())
}

/// A decoded delta object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The content ID the result must hash to.
    pub target: ChunkId,
    /// The content ID it applies to.
    pub base: ChunkId,
    /// The result's length.
    pub target_len: u32,
    /// Changed ranges `(offset, len)` of the result, ascending and disjoint.
    pub extents: Vec<(u32, u32)>,
    /// The extents' bytes, concatenated.
    pub data: Vec<u8>,
}

impl Delta {
    /// The extents of `content` (ranges ascending, disjoint, within it) as a delta.
    pub fn from_extents(target: ChunkId, base: ChunkId, content: &[u8], extents: &[(u32, u32)]) -> Result<Delta> {
        check_extents(extents, content.len() as u64).map_err(Error::InvalidArgument)?;
        let total: usize = extents.iter().map(|&(_, l)| l as usize).sum();
        let mut data = Vec::with_capacity(total);
        for &(o, l) in extents {
            data.extend_from_slice(&content[o as usize..(o + l) as usize]);
        }
        Ok(Delta {
            target,
            base,
            target_len: content.len() as u32,
            extents: extents.to_vec(),
            data,
        })
    }

    /// The payload (before compression and the seal).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + self.extents.len() * 8 + self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.target.0);
        out.extend_from_slice(&self.base.0);
        out.extend_from_slice(&self.target_len.to_le_bytes());
        out.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for &(o, l) in &self.extents {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses a payload; the reason names what is wrong.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Delta, String> {
        if bytes.len() < FIXED {
            return Err(format!("{} bytes, shorter than a delta's fixed part", bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err("bad delta magic".into());
        }
        let id = |at: usize| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&bytes[at..at + 32]);
            ChunkId(a)
        };
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let (target, base) = (id(4), id(36));
        let target_len = u32_at(68);
        if target_len as u64 > crate::block_size::MAX_BLOCK_SIZE {
            return Err(format!("a target of {target_len} bytes is longer than any block"));
        }
        let n = u32_at(72) as usize;
        let table_end = n
            .checked_mul(8)
            .and_then(|t| t.checked_add(FIXED))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| format!("{n} extents do not fit in {} bytes", bytes.len()))?;
        let extents: Vec<(u32, u32)> = (0..n).map(|i| (u32_at(FIXED + 8 * i), u32_at(FIXED + 8 * i + 4))).collect();
        check_extents(&extents, target_len as u64)?;
        let total: u64 = extents.iter().map(|&(_, l)| l as u64).sum();
        if total != (bytes.len() - table_end) as u64 {
            return Err(format!("extents of {total} bytes but {} bytes of data", bytes.len() - table_end));
        }
        if target == base {
            return Err("a delta on its own content".into());
        }
        Ok(Delta {
            target,
            base,
            target_len,
            extents,
            data: bytes[table_end..].to_vec(),
        })
    }

    /// Applies the delta to the base's content (in place): cut or zero-extend to
    /// `target_len`, then copy the extents in. The caller verifies the result's ID.
    pub fn apply(&self, mut base: Vec<u8>) -> Vec<u8> {
        base.resize(self.target_len as usize, 0);
        let mut pos = 0usize;
        for &(o, l) in &self.extents {
            let (o, l) = (o as usize, l as usize);
            base[o..o + l].copy_from_slice(&self.data[pos..pos + l]);
            pos += l;
        }
        base
    }
}

fn check_extents(extents: &[(u32, u32)], len: u64) -> std::result::Result<(), String> {
    let mut end = 0u64;
    for (i, &(o, l)) in extents.iter().enumerate() {
        if l == 0 {
            return Err(format!("extent {i} is empty"));
        }
        if (o as u64) < end && i > 0 {
            return Err(format!("extent {i} at {o} overlaps or precedes the one before"));
        }
        end = o as u64 + l as u64;
        if end > len {
            return Err(format!("extent {i} ({o}+{l}) ends past the block's {len} bytes"));
        }
    }
    Ok(())
}

/// Seals a delta as the object `object` (kind `07`, zstd at `zstd_level` when smaller).
pub fn encode_delta_object(key: &MasterKey, object: &ChunkId, delta: &Delta, zstd_level: i32) -> Result<Vec<u8>> {
    encode_sealed(key.seal_key(), ObjectKind::Delta, &object.0, &delta.encode(), Some(zstd_level))
}

/// Opens the delta object `object`: authentic, its payload hashes to its ID, well formed.
pub fn open_delta_object(key: &MasterKey, object: &ChunkId, bytes: Vec<u8>, max_len: usize) -> Result<Delta> {
    let path = object.object_key();
    let plain = decode_sealed(key.seal_key(), ObjectKind::Delta, &object.0, bytes, max_len, &path)?;
    let actual = delta_object_id(key, &plain);
    if &actual != object {
        return Err(Error::DeltaDecode {
            path,
            reason: format!("its payload hashes to {actual}"),
        });
    }
    Delta::decode(&plain).map_err(|reason| Error::DeltaDecode { path, reason })
}

/// Opens the delta object `object` ([`open_delta_object`]) and checks it is the delta of
/// `target` on `base` that the manifest says it is (payload bounded by `max_len`).
pub fn decode_delta_object(
    key: &MasterKey,
    object: &ChunkId,
    target: &ChunkId,
    base: &ChunkId,
    bytes: Vec<u8>,
    max_len: usize,
) -> Result<Delta> {
    let path = object.object_key();
    let delta = open_delta_object(key, object, bytes, max_len)?;
    if &delta.target != target || &delta.base != base {
        return Err(Error::DeltaDecode {
            path,
            reason: format!(
                "it is the delta of {} on {}, the manifest expects {target} on {base}",
                delta.target, delta.base
            ),
        });
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> MasterKey {
        MasterKey::from_raw([9u8; 32])
    }

    proptest! {
        #[test]
        fn delta_round_trip_and_apply(base in proptest::collection::vec(any::<u8>(), 0..3000),
                                      newlen in 1usize..3000,
                                      cuts in proptest::collection::vec((0usize..3000, 1usize..200), 0..12),
                                      fill in any::<u8>()) {
            let k = key();
            // New content: the base resized, with some ranges rewritten.
            let mut content = base.clone();
            content.resize(newlen, 0);
            let mut extents: Vec<(u32, u32)> = Vec::new();
            let mut sorted = cuts.clone();
            sorted.sort();
            let mut end = 0usize;
            for (o, l) in sorted {
                let o = o.max(end);
                let e = (o + l).min(newlen);
                if o >= e { continue; }
                content[o..e].fill(fill);
                extents.push((o as u32, (e - o) as u32));
                end = e;
            }
            // Growth past the base is zeros unless covered: the extents as given suffice.
            let (t, b) = (ChunkId::of(&k, &content), ChunkId::of(&k, &base));
            prop_assume!(t != b);
            let d = Delta::from_extents(t, b, &content, &extents).unwrap();
            let obj = delta_object_id(&k, &d.encode());
            let bytes = encode_delta_object(&k, &obj, &d, 3).unwrap();
            let back = decode_delta_object(&k, &obj, &t, &b, bytes.clone(), 1 << 20).unwrap();
            prop_assert_eq!(&back, &d);
            prop_assert_eq!(back.apply(base.clone()), content);
            // Another object ID, or another expected pair, is refused.
            let other = delta_object_id(&k, b"other");
            prop_assert!(decode_delta_object(&k, &other, &t, &b, bytes.clone(), 1 << 20).is_err());
            prop_assert!(decode_delta_object(&k, &obj, &b, &t, bytes, 1 << 20).is_err());
        }

        #[test]
        fn payload_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Delta::decode(&bytes);
        }

        #[test]
        fn decoded_payloads_apply_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..300), base in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut b = bytes.clone();
            if b.len() >= 4 { b[..4].copy_from_slice(MAGIC); }
            if let Ok(d) = Delta::decode(&b) {
                prop_assert_eq!(d.apply(base).len(), d.target_len as usize);
            }
        }
    }

    #[test]
    fn object_ids_are_not_content_ids_and_are_checked() {
        let k = key();
        let d = Delta::from_extents(ChunkId([1; 32]), ChunkId([2; 32]), &[7u8; 64], &[(3, 5)]).unwrap();
        let payload = d.encode();
        let id = delta_object_id(&k, &payload);
        assert_ne!(id, ChunkId::of(&k, &payload));
        // Sealed under another ID (a copy moved, or a payload that is not this one's): refused.
        let wrong = delta_object_id(&k, b"x");
        let sealed = encode_delta_object(&k, &wrong, &d, 3).unwrap();
        let e = open_delta_object(&k, &wrong, sealed, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("hashes to"), "{e}");
    }

    #[test]
    fn bad_extents_are_refused() {
        let (t, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        assert!(Delta::from_extents(t, b, &[0u8; 10], &[(5, 6)]).is_err());
        assert!(Delta::from_extents(t, b, &[0u8; 10], &[(0, 4), (3, 2)]).is_err());
        assert!(Delta::from_extents(t, b, &[0u8; 10], &[(0, 0)]).is_err());
        let ok = Delta::from_extents(t, b, &[7u8; 10], &[(0, 4), (4, 2)]).unwrap();
        let mut p = ok.encode();
        p.push(0);
        assert!(Delta::decode(&p).unwrap_err().contains("data"));
        assert!(Delta::decode(&ok.encode()[..FIXED - 1]).is_err());
    }
}
