//! Manifests: one per backup, a complete block map plus metadata. Writing it is the commit.
//!
//! Plaintext layout (then zstd and the AES-GCM seal, see FORMAT.md):
//! ```text
//! "FMAN" | le32 meta_len | meta JSON | le64 block_count | runs... [| delta table]
//! run: u8 kind (0 = holes, 1 = chunks) | le64 count | (kind 1) count × 32-byte chunk IDs
//! delta table (format 2 only): le64 n | n × (target[32] | base[32] | object[32] | le32 bytes)
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::block_size::BlockSize;
use crate::chunk::ChunkId;
use crate::delta::{DeltaRef, MAX_READ_DEPTH};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"FMAN";
/// The highest manifest format (meta `format`) this build reads, and the one it writes for a
/// backup with delta objects; it changes when the block-map encoding or the meaning of a meta
/// field changes (FORMAT.md §10). A manifest without deltas is written as format 1, which
/// every version of ferry reads.
pub const MANIFEST_FORMAT: u32 = 2;
/// The manifest format of a backup without delta objects (no delta table).
pub const MANIFEST_FORMAT_PLAIN: u32 = 1;
/// Bytes per delta table entry: target, base, object, changed bytes.
const DELTA_ENTRY: usize = 32 * 3 + 4;

/// Where the backed-up data came from (meta `source`). The optional fields are omitted from
/// the JSON when absent; ferry fills them for `rbd` sources.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    /// "diff-stream" (ferry backup --diff) or "rbd".
    pub kind: String,
    /// The Ceph cluster's fsid (`rbd` sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_fsid: Option<String>,
    /// The RBD pool (`rbd` sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The RBD image name (`rbd` sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The RBD image's ID, which survives renames (`rbd` sources). With `cluster_fsid` it
    /// tells whether a later backup can be an incremental of this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The RBD image's object size in bytes (`rbd` sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_size: Option<u64>,
}

/// Per-backup statistics (meta `stats`, also printed as the backup summary). Every field is
/// required when reading.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupStats {
    /// Bytes of diff stream consumed.
    pub stream_bytes: u64,
    /// Payload bytes of `w` records.
    pub data_bytes: u64,
    /// Bytes covered by `z` records.
    pub zeroed_bytes: u64,
    /// Blocks the diff touched (wholly or partly), plus a last block rewritten by the shrink
    /// rule (FORMAT.md §6.3); = `blocks_zero` + `blocks_new` + `blocks_dedup`.
    pub blocks_changed: u64,
    /// Changed blocks that turned out all zero (stored as holes).
    pub blocks_zero: u64,
    /// Changed blocks whose chunk this backup created (uploaded).
    pub blocks_new: u64,
    /// Changed blocks whose chunk already existed (in the local index, earlier in the same
    /// backup, found by HEAD, or found by the create-only PUT).
    pub blocks_dedup: u64,
    /// Of those, chunks found in the repository but not in the local index (e.g. left by an interrupted backup).
    pub blocks_found_in_repo: u64,
    /// Blocks only partly covered by the diff, completed from the parent backup's chunk
    /// (read-modify-write; not counted when the parent's block is a hole).
    pub blocks_partial: u64,
    /// Plaintext bytes of new chunks.
    pub bytes_new: u64,
    /// Object bytes of new chunks as uploaded (header, nonce, ciphertext, tag).
    pub bytes_uploaded: u64,
    /// Milliseconds from the start of ingest to just before the manifest is written.
    pub duration_ms: u64,
    /// Changed blocks stored as delta objects (FORMAT.md §14); 0 when absent (older backups).
    #[serde(default)]
    pub blocks_delta: u64,
    /// Bytes of changed extents those delta objects carry (before compression).
    #[serde(default)]
    pub bytes_delta: u64,
    /// Bytes read from the source besides the diff stream: whole blocks read from the new
    /// snapshot to complete partly changed ones (RBD sources), or the parent's chunks read
    /// for that (diff streams). 0 when absent.
    #[serde(default)]
    pub bytes_read_blocks: u64,
}

/// Everything in a manifest but the block map: the meta JSON of FORMAT.md §6.1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestMeta {
    /// Manifest format, [`MANIFEST_FORMAT`]; a higher value is refused when reading.
    pub format: u32,
    /// The backup ID: 16 hex digits (8 random bytes), the suffix of the manifest's name.
    pub backup_id: String,
    /// The repository's ID (`config.repository_id`, 32 hex digits).
    pub repository_id: String,
    /// The volume, equal to the `<volume>` segment of the manifest's key.
    pub volume: String,
    /// Commit time on the writer's clock (UTC); the manifest name's time part is derived
    /// from it.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Where the data came from.
    pub source: Source,
    /// The diff stream's from-snapshot (its `f` record); `None` for a full backup.
    pub from_snap: Option<String>,
    /// The diff stream's to-snapshot (its `t` record; for `rbd` sources the `ferry-…`
    /// snapshot).
    pub to_snap: Option<String>,
    /// Backup ID (same volume) of the backup this incremental was applied to; `None` for a
    /// full backup.
    pub parent: Option<String>,
    /// For a full backup: the backup ID of the volume's newest backup when it was made (its
    /// place in the chain, which the name's time — the writer's clock — cannot be trusted
    /// for). Absent in backups before it was recorded and for a volume's first backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// The backup's place in its volume's chain: one more than the highest `seq` of the
    /// volume's backups when it was made (1 for the first). Orders the chain even when the
    /// backups its links name were forgotten since. Absent in backups before it was recorded
    /// (they count as 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Volume size in bytes (the stream's `s` record).
    pub image_size: u64,
    /// Bytes per block of the map; an incremental keeps its parent's.
    pub block_size: BlockSize,
    /// Free-form labels (`--label K=V`); empty when absent from the JSON.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the source marked the snapshot protected (the stream's v2 `p` record); false
    /// when absent from the JSON.
    #[serde(default)]
    pub protected: bool,
    /// What the backup cost.
    pub stats: BackupStats,
}

/// A backup: metadata and a full block map (`None` = hole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The metadata.
    pub meta: ManifestMeta,
    /// The block map, one entry per block (⌈`image_size` / `block_size`⌉ entries): the
    /// content ID of the block (the keyed hash of its full content), or `None` for a hole
    /// (reads as zeros).
    pub blocks: Vec<Option<ChunkId>>,
    /// The delta table (format 2): content IDs stored as delta objects, each on a base
    /// content ID. A content ID not in it is a whole chunk under its own ID.
    pub deltas: BTreeMap<ChunkId, DeltaRef>,
}

/// Whether a content ID is stored whole or as a delta, per a manifest's delta table.
pub fn object_of(deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> ChunkId {
    deltas.get(id).map_or(*id, |d| d.object)
}

/// The deltas to apply to get content `id`, newest first, and the whole chunk at the bottom
/// (`id` itself when it is not in the table). Errors on a chain deeper than the reader's
/// limit (which also catches cycles).
pub fn delta_chain(deltas: &BTreeMap<ChunkId, DeltaRef>, id: &ChunkId) -> std::result::Result<(Vec<(ChunkId, DeltaRef)>, ChunkId), String> {
    let mut chain = Vec::new();
    let mut cur = *id;
    while let Some(d) = deltas.get(&cur) {
        if chain.len() >= MAX_READ_DEPTH {
            return Err(format!("the delta chain of {id} is deeper than {MAX_READ_DEPTH} (or a cycle)"));
        }
        chain.push((cur, *d));
        cur = d.base;
    }
    Ok((chain, cur))
}

/// Every chain of a delta table ends on a whole chunk within the reader's depth (no cycles,
/// no content on itself).
pub fn check_table(deltas: &BTreeMap<ChunkId, DeltaRef>) -> std::result::Result<(), String> {
    let mut depth_ok: HashMap<ChunkId, usize> = HashMap::new();
    for (target, d) in deltas {
        if *target == d.base {
            return Err(format!("delta of {target} on itself"));
        }
        let mut path = Vec::new();
        let mut cur = *target;
        let mut below = 0;
        while let Some(d) = deltas.get(&cur) {
            if let Some(&k) = depth_ok.get(&cur) {
                below = k;
                break;
            }
            path.push(cur);
            if path.len() > MAX_READ_DEPTH {
                return Err(format!("the delta chain of {target} is deeper than {MAX_READ_DEPTH} or cyclic"));
            }
            cur = d.base;
        }
        for (i, t) in path.iter().rev().enumerate() {
            let k = below + i + 1;
            if k > MAX_READ_DEPTH {
                return Err(format!("the delta chain of {target} is deeper than {MAX_READ_DEPTH}"));
            }
            depth_ok.insert(*t, k);
        }
    }
    Ok(())
}

/// Every object the content IDs of `blocks` need under `deltas`: whole chunks, delta objects,
/// and their bases down to whole chunks (may repeat an ID). Entries of the table that no
/// block reaches are included too (keeping them is harmless; ferry writes none).
pub fn objects_of<'a>(blocks: &'a [Option<ChunkId>], deltas: &'a BTreeMap<ChunkId, DeltaRef>) -> impl Iterator<Item = ChunkId> + 'a {
    blocks
        .iter()
        .flatten()
        .filter(|id| !deltas.contains_key(id))
        .copied()
        .chain(deltas.values().map(|d| d.object))
        .chain(deltas.values().map(|d| d.base).filter(|b| !deltas.contains_key(b)))
}

/// The entries of `table` that the content IDs of `blocks` reach (a backup's table is its
/// parent's plus its own new deltas, cut to what its map needs).
pub fn reachable_deltas(blocks: &[Option<ChunkId>], table: &BTreeMap<ChunkId, DeltaRef>) -> BTreeMap<ChunkId, DeltaRef> {
    let mut out = BTreeMap::new();
    for id in blocks.iter().flatten() {
        let mut cur = *id;
        let mut depth = 0;
        while let Some(d) = table.get(&cur) {
            if out.insert(cur, *d).is_some() || depth > MAX_READ_DEPTH {
                break;
            }
            cur = d.base;
            depth += 1;
        }
    }
    out
}

impl Manifest {
    /// Every object the backup needs: whole chunks, delta objects and their bases (may
    /// repeat an ID). What garbage collection marks, a session inherits and the index records.
    pub fn objects(&self) -> impl Iterator<Item = ChunkId> + '_ {
        objects_of(&self.blocks, &self.deltas)
    }

    /// The object holding content `id` (a delta object when the table says so).
    pub fn object_of(&self, id: &ChunkId) -> ChunkId {
        object_of(&self.deltas, id)
    }

    /// Length of block `index` (the last one may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        let bs = self.meta.block_size.get();
        self.meta.image_size.saturating_sub(index * bs).min(bs)
    }

    /// The manifest plaintext (FORMAT.md §6): `FMAN`, `meta_len`, the compact meta JSON,
    /// `block_count`, then maximal runs. Compression and sealing are the caller's.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta).map_err(|source| Error::Json {
            context: "encoding manifest".into(),
            source,
        })?;
        let chunks = self.blocks.iter().filter(|b| b.is_some()).count();
        let mut out = Vec::with_capacity(16 + meta.len() + chunks * 32 + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        let mut i = 0;
        while i < self.blocks.len() {
            let hole = self.blocks[i].is_none();
            let mut j = i;
            while j < self.blocks.len() && self.blocks[j].is_none() == hole {
                j += 1;
            }
            out.push(if hole { 0 } else { 1 });
            out.extend_from_slice(&((j - i) as u64).to_le_bytes());
            if !hole {
                for id in self.blocks[i..j].iter().flatten() {
                    out.extend_from_slice(&id.0);
                }
            }
            i = j;
        }
        if self.meta.format >= 2 {
            // A table no reader would accept is never written.
            check_table(&self.deltas).map_err(|e| Error::InvalidArgument(format!("invalid delta table: {e}")))?;
            out.extend_from_slice(&(self.deltas.len() as u64).to_le_bytes());
            for (target, d) in &self.deltas {
                out.extend_from_slice(&target.0);
                out.extend_from_slice(&d.base.0);
                out.extend_from_slice(&d.object.0);
                out.extend_from_slice(&d.bytes.to_le_bytes());
            }
        } else if !self.deltas.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a manifest of format {} cannot hold delta objects",
                self.meta.format
            )));
        }
        Ok(out)
    }

    /// Parses a manifest plaintext (the opened seal's payload); `path` names the manifest in
    /// errors. A meta `format` above [`MANIFEST_FORMAT`] is [`Error::UnsupportedFormat`];
    /// a bad magic, meta JSON, block count (not ⌈`image_size` / `block_size`⌉, or more than
    /// the input can describe), run or trailing bytes is [`Error::ManifestDecode`]. Does not
    /// compare the meta with the manifest's key ([`Repository::read_manifest`] does).
    ///
    /// [`Repository::read_manifest`]: crate::Repository::read_manifest
    pub fn decode(bytes: &[u8], path: &str) -> Result<Manifest> {
        let bad = |reason: String| Error::ManifestDecode {
            path: path.to_string(),
            reason,
        };
        let mut r = Cursor { bytes, pos: 0 };
        if r.take(4).map_err(&bad)? != MAGIC {
            return Err(bad("bad manifest magic".into()));
        }
        let meta_len = r.u32().map_err(&bad)? as usize;
        let meta: ManifestMeta = serde_json::from_slice(r.take(meta_len).map_err(&bad)?).map_err(|e| bad(format!("metadata: {e}")))?;
        if meta.format > MANIFEST_FORMAT {
            return Err(Error::UnsupportedFormat {
                path: path.to_string(),
                found: meta.format,
                supported: MANIFEST_FORMAT,
            });
        }
        let count = r.u64().map_err(&bad)?;
        let expected = meta.block_size.blocks_in(meta.image_size);
        if count != expected {
            return Err(bad(format!(
                "{count} blocks for an image of {} bytes in {}-byte blocks (expected {expected})",
                meta.image_size, meta.block_size
            )));
        }
        if count > crate::block_size::MAX_BLOCKS || meta.image_size > crate::block_size::MAX_IMAGE_SIZE {
            return Err(bad(format!(
                "{count} blocks / {} bytes exceed ferry's limits per volume",
                meta.image_size
            )));
        }
        // Every block costs at least a bit of input; refuse counts the input cannot back.
        if count > (bytes.len() as u64).saturating_mul(8).max(1 << 20) * 64 {
            return Err(bad(format!("implausible block count {count}")));
        }
        let mut blocks = Vec::with_capacity(count as usize);
        while (blocks.len() as u64) < count {
            let kind = r.take(1).map_err(&bad)?[0];
            let n = r.u64().map_err(&bad)?;
            if n == 0 || n > count - blocks.len() as u64 {
                return Err(bad(format!(
                    "run of {n} blocks at block {} overruns the map of {count}",
                    blocks.len()
                )));
            }
            match kind {
                0 => blocks.resize(blocks.len() + n as usize, None),
                1 => {
                    let ids = r
                        .take((n as usize).checked_mul(32).ok_or_else(|| bad("run too long".into()))?)
                        .map_err(&bad)?;
                    for id in ids.chunks_exact(32) {
                        let mut a = [0u8; 32];
                        a.copy_from_slice(id);
                        blocks.push(Some(ChunkId(a)));
                    }
                }
                k => return Err(bad(format!("unknown run kind {k}"))),
            }
        }
        let mut deltas = BTreeMap::new();
        if meta.format >= 2 {
            let n = r.u64().map_err(&bad)?;
            if n > ((bytes.len() - r.pos) / DELTA_ENTRY) as u64 {
                return Err(bad(format!("a delta table of {n} entries does not fit")));
            }
            let mut last: Option<ChunkId> = None;
            for _ in 0..n {
                let e = r.take(DELTA_ENTRY).map_err(&bad)?;
                let id = |at: usize| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(&e[at..at + 32]);
                    ChunkId(a)
                };
                let (target, base, object) = (id(0), id(32), id(64));
                let changed = u32::from_le_bytes([e[96], e[97], e[98], e[99]]);
                if last.is_some_and(|l| l >= target) {
                    return Err(bad("delta table entries out of order or repeated".into()));
                }
                if target == base {
                    return Err(bad(format!("delta of {target} on itself")));
                }
                last = Some(target);
                deltas.insert(
                    target,
                    DeltaRef {
                        base,
                        object,
                        bytes: changed,
                    },
                );
            }
            check_table(&deltas).map_err(bad)?;
        }
        if r.pos != bytes.len() {
            return Err(bad(format!("{} trailing bytes", bytes.len() - r.pos)));
        }
        Ok(Manifest { meta, blocks, deltas })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn meta(image_size: u64, block_size: u64) -> ManifestMeta {
        ManifestMeta {
            format: MANIFEST_FORMAT,
            backup_id: "0123456789abcdef".into(),
            repository_id: "r".into(),
            volume: "v".into(),
            created: chrono::Utc::now(),
            source: Source {
                kind: "diff-stream".into(),
                ..Default::default()
            },
            from_snap: None,
            to_snap: Some("s1".into()),
            parent: None,
            follows: None,
            seq: None,
            image_size,
            block_size: BlockSize::new(block_size).unwrap(),
            labels: BTreeMap::new(),
            protected: false,
            stats: BackupStats::default(),
        }
    }

    proptest! {
        #[test]
        fn block_map_round_trip(map in proptest::collection::vec(proptest::option::of(any::<[u8; 32]>().prop_map(ChunkId)), 0..300), bs_log in 12u32..23) {
            let bs = 1u64 << bs_log;
            let size = if map.is_empty() { 0 } else { (map.len() as u64 - 1) * bs + 1 + (bs_log as u64 % 7) };
            let mut md = meta(size, bs);
            md.format = MANIFEST_FORMAT_PLAIN;
            let m = Manifest { meta: md, blocks: map, deltas: BTreeMap::new() };
            let enc = m.encode().unwrap();
            prop_assert_eq!(Manifest::decode(&enc, "m").unwrap(), m);
        }

        #[test]
        fn delta_table_round_trip(map in proptest::collection::vec(proptest::option::of(0u8..40), 1..60),
                                  links in proptest::collection::vec((0u8..40, 0u8..40, any::<u32>()), 0..40)) {
            // Content IDs 0..40; an entry links a higher ID to a lower one (no cycles).
            let cid = |n: u8| ChunkId([n; 32]);
            let mut deltas = BTreeMap::new();
            for (a, b, bytes) in links {
                let (t, base) = (a.max(b), a.min(b));
                if t != base {
                    deltas.insert(cid(t), DeltaRef { base: cid(base), object: ChunkId([t.wrapping_add(100); 32]), bytes });
                }
            }
            let blocks: Vec<Option<ChunkId>> = map.iter().map(|b| b.map(cid)).collect();
            let m = Manifest { meta: meta(blocks.len() as u64 * 4096, 4096), blocks, deltas };
            let enc = m.encode().unwrap();
            let back = Manifest::decode(&enc, "m").unwrap();
            prop_assert_eq!(&back, &m);
            // Every block's chain ends on an object in objects(), and every delta it passes too.
            let objects: std::collections::HashSet<ChunkId> = m.objects().collect();
            for id in m.blocks.iter().flatten() {
                let (chain, whole) = delta_chain(&m.deltas, id).unwrap();
                prop_assert!(objects.contains(&whole));
                for (_, d) in chain {
                    prop_assert!(objects.contains(&d.object));
                }
            }
            // Cutting the table to what the map reaches keeps every chain.
            let cut = reachable_deltas(&m.blocks, &m.deltas);
            for id in m.blocks.iter().flatten() {
                prop_assert_eq!(delta_chain(&cut, id).unwrap(), delta_chain(&m.deltas, id).unwrap());
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), cut in any::<prop::sample::Index>()) {
            let _ = Manifest::decode(&bytes, "m");
            let mut deltas = BTreeMap::new();
            deltas.insert(ChunkId([2; 32]), DeltaRef { base: ChunkId([1; 32]), object: ChunkId([3; 32]), bytes: 9 });
            let m = Manifest { meta: meta(10 * 4096, 4096), blocks: vec![None, Some(ChunkId([1; 32])), None, None, Some(ChunkId([2; 32])), None, None, None, None, None], deltas };
            let enc = m.encode().unwrap();
            let i = cut.index(enc.len());
            prop_assert!(Manifest::decode(&enc[..i], "m").is_err());
        }
    }

    #[test]
    fn terabyte_map_is_compact() {
        // 1 TiB in 4 MiB blocks, mostly holes: a few runs only.
        let mut blocks = vec![None; 262_144];
        for i in (0..262_144).step_by(10_000) {
            blocks[i] = Some(ChunkId([i as u8; 32]));
        }
        let m = Manifest {
            meta: meta(1 << 40, 4 << 20),
            blocks,
            deltas: BTreeMap::new(),
        };
        let enc = m.encode().unwrap();
        assert!(enc.len() < 2000, "{}", enc.len());
        assert_eq!(Manifest::decode(&enc, "m").unwrap(), m);
    }

    #[test]
    fn cyclic_or_deep_delta_tables_are_refused() {
        let cid = |n: u32| {
            let mut a = [0u8; 32];
            a[..4].copy_from_slice(&n.to_le_bytes());
            ChunkId(a)
        };
        let table = |links: &[(u32, u32)]| {
            links
                .iter()
                .map(|&(t, b)| {
                    (
                        cid(t),
                        DeltaRef {
                            base: cid(b),
                            object: cid(t + 1000),
                            bytes: 1,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let encode = |deltas: BTreeMap<ChunkId, DeltaRef>| {
            Manifest {
                meta: meta(4096, 4096),
                blocks: vec![Some(cid(1))],
                deltas,
            }
            .encode()
        };
        // The writer refuses what no reader would take...
        let e = encode(table(&[(1, 2), (2, 3), (3, 1)])).unwrap_err();
        assert!(e.to_string().contains("cyclic"), "{e}");
        let deep: Vec<(u32, u32)> = (1..=(MAX_READ_DEPTH as u32 + 1)).map(|i| (i, i + 1)).collect();
        assert!(encode(table(&deep)).is_err());
        let ok: Vec<(u32, u32)> = (1..=(MAX_READ_DEPTH as u32)).map(|i| (i, i + 1)).collect();
        assert!(Manifest::decode(&encode(table(&ok)).unwrap(), "m").is_ok());
        // ...and the reader refuses it too: a chain 1 → 2 → 3 → 4 with the last base patched to 1.
        let mut cyc = encode(table(&[(1, 2), (2, 3), (3, 4)])).unwrap();
        let at = cyc.len() - 68;
        cyc[at..at + 32].copy_from_slice(&cid(1).0);
        assert!(Manifest::decode(&cyc, "m").unwrap_err().to_string().contains("cyclic"));
        // A format-1 manifest has no table.
        let mut m1 = meta(4096, 4096);
        m1.format = MANIFEST_FORMAT_PLAIN;
        let m = Manifest {
            meta: m1,
            blocks: vec![Some(cid(1))],
            deltas: table(&[(1, 2)]),
        };
        assert!(m.encode().is_err());
    }
}
