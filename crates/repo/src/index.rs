//! The local chain index: a sled cache of backup summaries and known chunk IDs.
//!
//! It is only a cache. The bucket is the truth: [`Index::sync`] lists the manifests in the
//! bucket, reads the ones it does not know and forgets the ones that are gone, so deleting
//! the index directory loses nothing (`ferry index rebuild`).

use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ManifestMeta};
use crate::repo::{BackupRef, Repository};

/// What the index keeps per backup: everything but the block map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupSummary {
    /// Where the manifest is in the bucket.
    pub backup: BackupRef,
    /// The manifest's metadata.
    pub meta: ManifestMeta,
    /// Blocks that hold a chunk (not holes).
    pub chunk_blocks: u64,
}

/// Result of a sync with the bucket.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Manifests read from the bucket and added to the index.
    pub manifests_read: usize,
    /// Index entries dropped because their manifest is no longer listed.
    pub manifests_forgotten: usize,
    /// Backups in the index after the sync (all volumes).
    pub backups: usize,
    /// Manifests that failed authentication or decoding: left out of the index (and so out
    /// of listings and restores) and reported, so one damaged backup does not hide the rest.
    pub unreadable: Vec<(BackupRef, String)>,
    /// Manifests listed but gone when read (forgotten meanwhile): skipped, not an error.
    pub manifests_vanished: usize,
    /// Backups with a protection marker, as listed (not kept in the index: the bucket is
    /// asked on every sync).
    #[serde(skip)]
    pub protected: std::collections::BTreeSet<BackupRef>,
}

/// One volume's backups (given in the order of their names, i.e. of the writers' clocks) in
/// chain order: a backup comes after the one it was made on — an incremental's `parent`, a
/// full backup's `follows` — and otherwise by `seq` (its place when it was made; a backup
/// without one, from an older ferry, takes the highest seq of those named before it), then in
/// the given order. A clock stepped back (a name
/// older than its predecessor's) then cannot make an older backup the newest. Links to a
/// backup not in the list are ignored; should links form a cycle (they cannot, as written by
/// ferry), its backups keep the given order.
pub fn chain_order(backups: Vec<BackupSummary>) -> Vec<BackupSummary> {
    use std::collections::{BinaryHeap, HashMap};
    let n = backups.len();
    let position: HashMap<&str, usize> = backups.iter().enumerate().map(|(i, b)| (b.meta.backup_id.as_str(), i)).collect();
    let before: Vec<Option<usize>> = backups
        .iter()
        .enumerate()
        .map(|(i, b)| {
            b.meta
                .parent
                .as_deref()
                .or(b.meta.follows.as_deref())
                .and_then(|p| position.get(p).copied())
                .filter(|&p| p != i)
        })
        .collect();
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, p) in before.iter().enumerate() {
        if let Some(p) = p {
            after[*p].push(i);
        }
    }
    // A backup without a seq (written by a ferry before it) takes the highest seq of those
    // named before it: an older writer's backup made after newer ones stays after them.
    let mut running = 0u64;
    let seq: Vec<u64> = backups
        .iter()
        .map(|b| {
            running = running.max(b.meta.seq.unwrap_or(0));
            b.meta.seq.unwrap_or(running)
        })
        .collect();
    // Kahn's algorithm, smallest (seq, position) first among the ready ones.
    let rank = |i: usize| std::cmp::Reverse((seq[i], i));
    let mut ready: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = (0..n).filter(|&i| before[i].is_none()).map(rank).collect();
    let mut order = Vec::with_capacity(n);
    let mut placed = vec![false; n];
    while let Some(std::cmp::Reverse((_, i))) = ready.pop() {
        placed[i] = true;
        order.push(i);
        for &j in &after[i] {
            ready.push(rank(j));
        }
    }
    order.extend((0..n).filter(|&i| !placed[i]));
    let mut slots: Vec<Option<BackupSummary>> = backups.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// One volume's backups as the bucket has them now.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    /// Readable backups, oldest first in chain order ([`chain_order`]).
    pub backups: Vec<BackupSummary>,
    /// This volume's manifests that failed authentication or decoding (left out above).
    pub unreadable: Vec<(BackupRef, String)>,
    /// This volume's backups with a protection marker.
    pub protected: std::collections::BTreeSet<BackupRef>,
}

impl Chain {
    /// The newest backup.
    pub fn head(&self) -> Option<&BackupSummary> {
        self.backups.last()
    }

    /// True when the backup has a protection marker.
    pub fn is_protected(&self, r: &BackupRef) -> bool {
        self.protected.contains(r)
    }

    /// The backup `spec` names (see [`crate::spec`]).
    pub fn resolve(&self, volume: &str, spec: &crate::spec::BackupSpec) -> Result<&BackupSummary> {
        crate::spec::resolve(volume, &self.backups, spec)
    }
}

/// The local cache (see the module documentation).
pub struct Index {
    db: sled::Db,
    backups: sled::Tree,
    chunks: sled::Tree,
    path: String,
    /// Seals the `backups` entries (manifest metadata: labels, pool, image, snapshot names).
    key: std::sync::OnceLock<crate::object::SealKey>,
}

/// The key of a repository's local index entries ([`crate::Repository::index_key`]).
#[derive(Clone)]
pub struct IndexKey(pub(crate) crate::object::SealKey);

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(..)")
    }
}

/// The tree of sealed backup entries. Indexes of earlier versions kept plain entries in a
/// tree named `backups`: such an index is deleted and started afresh when opened (sled's log
/// would keep the plain bytes of a merely cleared tree), and earlier versions reading this one
/// find no entries of theirs and read the manifests again.
const BACKUPS_TREE: &[u8] = b"backups_sealed_v1";
const PLAIN_BACKUPS_TREE: &[u8] = b"backups";

/// The key in the default tree under which the index keeps its GC generation.
const GC_GEN_KEY: &[u8] = b"gc_gen";

fn key_of(r: &BackupRef) -> Vec<u8> {
    format!("{}\0{}", r.volume, r.name).into_bytes()
}

impl Index {
    /// Opens (or creates) the index for `repository_id` under `dir`.
    pub fn open(dir: &Path, repository_id: &str) -> Result<Index> {
        let path: PathBuf = dir.join(repository_id);
        // sled's default page cache is 1 GiB; the index is small and read sparsely.
        let open = || sled::Config::new().path(&path).cache_capacity(8 << 20).open();
        let db = open().map_err(|source| Error::Index {
            path: path.display().to_string(),
            source,
        })?;
        if db.tree_names().iter().any(|n| n.as_ref() == PLAIN_BACKUPS_TREE) {
            // An index of plain entries: gone, files and all (it is a cache).
            drop(db);
            std::fs::remove_dir_all(&path).map_err(|source| Error::Io {
                context: format!("removing the local index {} (it held plain entries)", path.display()),
                source,
            })?;
            tracing::info!(
                "the local index {} held manifest metadata in plain text: removed, it is rebuilt sealed",
                path.display()
            );
            return Self::from_db(open(), path.display().to_string());
        }
        Self::from_db(Ok(db), path.display().to_string())
    }

    /// Opens the index like [`Index::open`]; when it is damaged (anything but "in use by
    /// another process"), moves it aside as `<repository id>.damaged-<unix time>` and starts
    /// an empty one — it is a cache, rebuilt from the bucket. Returns the index and, if it
    /// was rebuilt, a sentence saying so.
    pub fn open_or_rebuild(dir: &Path, repository_id: &str) -> Result<(Index, Option<String>)> {
        match Index::open(dir, repository_id) {
            Ok(i) => Ok((i, None)),
            Err(e) if e.is_index_locked() => Err(e),
            Err(e) => {
                let path = dir.join(repository_id);
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.join(format!("{repository_id}.damaged-{secs}"));
                std::fs::rename(&path, &aside).map_err(|source| Error::Io {
                    context: format!("moving the damaged index {} aside", path.display()),
                    source,
                })?;
                let i = Index::open(dir, repository_id)?;
                Ok((
                    i,
                    Some(format!(
                        "the local index {} was damaged ({e}); it was moved to {} and is rebuilt from the repository",
                        path.display(),
                        aside.display()
                    )),
                ))
            }
        }
    }

    /// An index that lives in memory only (`--no-index`).
    pub fn temporary() -> Result<Index> {
        Self::from_db(
            sled::Config::new().temporary(true).cache_capacity(8 << 20).open(),
            "(temporary)".into(),
        )
    }

    fn from_db(db: sled::Result<sled::Db>, path: String) -> Result<Index> {
        let err = |source| Error::Index {
            path: path.clone(),
            source,
        };
        let db = db.map_err(err)?;
        let backups = db.open_tree(BACKUPS_TREE).map_err(err)?;
        let chunks = db.open_tree("chunks").map_err(err)?;
        Ok(Index {
            db,
            backups,
            chunks,
            path,
            key: std::sync::OnceLock::new(),
        })
    }

    /// The key that seals the index's backup entries (the engine sets it for every index it
    /// is given; an index without one can hold no backup entries). A second key is ignored.
    pub fn set_key(&self, key: IndexKey) {
        let _ = self.key.set(key.0);
    }

    fn sealing_key(&self) -> Result<&crate::object::SealKey> {
        self.key
            .get()
            .ok_or_else(|| Error::InvalidArgument(format!("the local index {} has no key: its backup entries are sealed", self.path)))
    }

    fn seal_entry(&self, k: &[u8], plain: Vec<u8>) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(plain.len() + 28);
        self.sealing_key()?.seal_into(&mut out, k, &plain)?;
        Ok(out)
    }

    fn open_entry(&self, k: &[u8], stored: &[u8]) -> Result<BackupSummary> {
        let mut body = stored.to_vec();
        let range = self.sealing_key()?.open_in_place(&[], k, &mut body, &self.path)?;
        serde_json::from_slice::<BackupSummary>(&body[range]).map_err(|source| Error::Json {
            context: format!("decoding an entry of the local index {}", self.path),
            source,
        })
    }

    /// True when the entry of `r` is there and opens (a damaged one is read again).
    fn has_entry(&self, r: &BackupRef) -> bool {
        let k = key_of(r);
        matches!(self.backups.get(&k), Ok(Some(v)) if self.open_entry(&k, &v).is_ok())
    }

    fn err(&self) -> impl Fn(sled::Error) -> Error + '_ {
        |source| Error::Index {
            path: self.path.clone(),
            source,
        }
    }

    /// The index directory, or `(temporary)` for an in-memory index (for messages).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Forgets everything (for a rebuild).
    pub fn clear(&self) -> Result<()> {
        self.backups.clear().map_err(self.err())?;
        self.chunks.clear().map_err(self.err())?;
        Ok(())
    }

    /// The GC generation the index's chunk entries are valid for: the newest garbage
    /// collection (ended or abandoned) a backup session has seen. 0 before any.
    pub fn gc_gen(&self) -> Result<u64> {
        Ok(match self.db.get(GC_GEN_KEY).map_err(self.err())? {
            Some(v) if v.len() == 8 => u64::from_le_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        })
    }

    /// Moves the index to GC generation `gen` (never backwards): every chunk entry recorded
    /// under an older generation stops being trusted — a GC has run since its evidence was
    /// gathered, so the chunk may be gone — until it is confirmed (HEAD) and recorded again.
    pub fn advance_gc_gen(&self, gen: u64) -> Result<()> {
        if gen > self.gc_gen()? {
            self.db.insert(GC_GEN_KEY, &gen.to_le_bytes()).map_err(self.err())?;
        }
        Ok(())
    }

    /// Records that chunk `id` existed when the index was at GC generation `stamp`.
    pub fn note_chunk(&self, id: &ChunkId, stamp: u64) -> Result<()> {
        self.chunks.insert(id.0, &stamp.to_le_bytes()).map_err(self.err())?;
        Ok(())
    }

    /// Records a committed backup and the chunks it references, the chunks stamped with the
    /// GC generation its evidence dates from (see [`Index::has_chunk`]).
    pub fn insert_backup(&self, r: &BackupRef, manifest: &Manifest) -> Result<()> {
        let stamp = self.gc_gen()?;
        self.insert_backup_stamped(r, manifest, stamp)
    }

    /// [`Index::insert_backup`] with the chunks stamped `stamp` (a backup session stamps with
    /// the generation it observed when it started).
    pub fn insert_backup_stamped(&self, r: &BackupRef, manifest: &Manifest, stamp: u64) -> Result<()> {
        let summary = BackupSummary {
            backup: r.clone(),
            meta: manifest.meta.clone(),
            chunk_blocks: manifest.blocks.iter().filter(|b| b.is_some()).count() as u64,
        };
        let json = serde_json::to_vec(&summary).map_err(|source| Error::Json {
            context: "encoding index entry".into(),
            source,
        })?;
        let mut batch = sled::Batch::default();
        let stamp = stamp.to_le_bytes();
        // Objects, not content IDs: a block stored as a delta has no chunk under its ID.
        for id in manifest.objects() {
            batch.insert(&id.0[..], &stamp[..]);
        }
        self.chunks.apply_batch(batch).map_err(self.err())?;
        let k = key_of(r);
        let value = self.seal_entry(&k, json)?;
        self.backups.insert(k, value).map_err(self.err())?;
        Ok(())
    }

    /// Writes pending changes to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(self.err())?;
        Ok(())
    }

    /// True when the chunk is known to exist and no garbage collection has ended since that
    /// was recorded (its stamp is the index's current GC generation). An entry from before a
    /// GC is not trusted: the caller asks the store (HEAD) and records it again.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        let current = self.gc_gen()?;
        Ok(match self.chunks.get(id.0).map_err(self.err())? {
            // Entries of ferry 0.1 have no stamp: generation 0.
            Some(v) if v.is_empty() => current == 0,
            Some(v) if v.len() == 8 => v.as_ref() == current.to_le_bytes(),
            Some(_) | None => false,
        })
    }

    /// Number of chunk IDs the index knows.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Summaries of one volume, oldest first, or of all volumes, by volume name and then
    /// oldest first — in chain order ([`chain_order`]), not by the writers' clocks.
    pub fn backups(&self, volume: Option<&str>) -> Result<Vec<BackupSummary>> {
        let iter = match volume {
            Some(v) => self.backups.scan_prefix(format!("{v}\0").into_bytes()),
            None => self.backups.iter(),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(self.err())?;
            match self.open_entry(&k, &v) {
                Ok(s) => out.push(s),
                // A damaged entry of the cache: drop it; the next sync reads its manifest again.
                Err(e) => {
                    tracing::warn!("dropping a damaged entry of the local index {}: {e}", self.path);
                    self.backups.remove(k).map_err(self.err())?;
                }
            }
        }
        // Key order groups the volumes; each volume's backups go in chain order.
        let mut ordered = Vec::with_capacity(out.len());
        let mut rest = out.into_iter().peekable();
        while let Some(first) = rest.next() {
            let mut group = vec![first];
            while rest.peek().is_some_and(|b| b.backup.volume == group[0].backup.volume) {
                group.extend(rest.next());
            }
            ordered.extend(chain_order(group));
        }
        Ok(ordered)
    }

    /// Syncs with the bucket and returns one volume's chain.
    pub async fn chain(&self, repo: &Repository, volume: &str) -> Result<Chain> {
        crate::repo::validate_volume_name(volume)?;
        let report = self.sync(repo).await?;
        Ok(Chain {
            backups: self.backups(Some(volume))?,
            unreadable: report.unreadable.into_iter().filter(|(r, _)| r.volume == volume).collect(),
            protected: report.protected.into_iter().filter(|r| r.volume == volume).collect(),
        })
    }

    /// Brings the index in line with the bucket: reads manifests it lacks, forgets vanished ones.
    pub async fn sync(&self, repo: &Repository) -> Result<SyncReport> {
        // Evidence gathered from here on is stamped with the generation current now.
        let stamp = self.gc_gen()?;
        let listing = repo.list_volumes(None).await?;
        let listed = listing.backups;
        let listed_keys: std::collections::HashSet<Vec<u8>> = listed.iter().map(key_of).collect();
        let mut report = SyncReport {
            protected: listing.protected,
            ..Default::default()
        };
        for item in self.backups.iter() {
            let (k, _) = item.map_err(self.err())?;
            if !listed_keys.contains(k.as_ref()) {
                self.backups.remove(k).map_err(self.err())?;
                report.manifests_forgotten += 1;
            }
        }
        let missing: Vec<BackupRef> = listed.into_iter().filter(|r| !self.has_entry(r)).collect();
        let mut reads = futures::stream::iter(missing.into_iter().map(|r| async move {
            let m = repo.read_manifest(&r).await;
            (r, m)
        }))
        .buffer_unordered(8);
        while let Some((r, m)) = reads.next().await {
            match m {
                Ok(m) => {
                    self.insert_backup_stamped(&r, &m, stamp)?;
                    report.manifests_read += 1;
                }
                Err(e) if e.is_integrity() || matches!(e, Error::UnsupportedFormat { .. }) => report.unreadable.push((r, e.to_string())),
                // Forgotten between the listing and the read (or fenced by a GC since): it is
                // simply not there.
                Err(Error::NotFound { .. } | Error::Fenced { .. }) => report.manifests_vanished += 1,
                Err(e) => return Err(e),
            }
        }
        report.backups = self.backups.len();
        self.flush()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::meta;
    use crate::manifest::Manifest;
    use proptest::prelude::*;

    /// Backups named in the given order: (id, parent, follows).
    fn named(items: &[(&str, Option<&str>, Option<&str>)]) -> Vec<BackupSummary> {
        items
            .iter()
            .enumerate()
            .map(|(i, (id, parent, follows))| {
                let mut m = meta(4096, 4096);
                m.backup_id = id.to_string();
                m.parent = parent.map(str::to_string);
                m.follows = follows.map(str::to_string);
                BackupSummary {
                    backup: BackupRef {
                        volume: "v".into(),
                        name: format!("{i:04}-{id}"),
                    },
                    meta: m,
                    chunk_blocks: 0,
                }
            })
            .collect()
    }

    fn ids(v: &[BackupSummary]) -> Vec<&str> {
        v.iter().map(|b| b.meta.backup_id.as_str()).collect()
    }

    #[test]
    fn a_clock_stepped_back_does_not_make_an_older_backup_the_newest() {
        // c was made on b, but its writer's clock was behind: its name sorts first.
        let v = named(&[("c", Some("b"), None), ("a", None, None), ("b", Some("a"), None)]);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "c"]);
        // The same for a full backup that follows b.
        let v = named(&[("f", None, Some("b")), ("a", None, None), ("b", Some("a"), None)]);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "f"]);
        // And for an incremental on that full backup.
        let v = named(&[
            ("g", Some("f"), None),
            ("f", None, Some("b")),
            ("a", None, None),
            ("b", Some("a"), None),
        ]);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "f", "g"]);
    }

    fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn plain_entries_are_dropped_when_the_index_is_sealed_and_sealed_ones_read_back() {
        let dir = tempfile::tempdir().unwrap();
        // An index of an earlier version: plain entries in the `backups` tree.
        {
            let db = sled::Config::new().path(dir.path().join("repo")).open().unwrap();
            db.open_tree(PLAIN_BACKUPS_TREE)
                .unwrap()
                .insert(b"v\0old", &b"{\"label\": \"known-plain\"}"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let index = Index::open(dir.path(), "repo").unwrap();
        assert!(index.backups.is_empty());
        drop(index);
        for f in walk(&dir.path().join("repo")) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !bytes.windows(11).any(|w| w == b"known-plain"),
                "{} keeps the plain entry",
                f.display()
            );
        }
        let index = Index::temporary().unwrap();
        let r = BackupRef {
            volume: "v".into(),
            name: "0001-a".into(),
        };
        let mut m = meta(4096, 4096);
        m.labels.insert("owner".into(), "known".into());
        let manifest = Manifest {
            meta: m,
            blocks: vec![None],
            deltas: Default::default(),
        };
        assert!(index.insert_backup(&r, &manifest).is_err(), "no key, no entries");
        let key = crate::keys::MasterKey::generate();
        index.set_key(IndexKey(key.index_key().clone()));
        index.insert_backup(&r, &manifest).unwrap();
        let raw = index.backups.get(key_of(&r)).unwrap().unwrap();
        assert!(!raw.windows(5).any(|w| w == b"known"), "sealed");
        let back = index.backups(Some("v")).unwrap();
        assert_eq!(back[0].meta.labels["owner"], "known");
        // An entry moved to another key does not open (it is dropped as damaged).
        let other = BackupRef {
            volume: "v".into(),
            name: "0002-b".into(),
        };
        index.backups.insert(key_of(&other), raw).unwrap();
        assert_eq!(index.backups(Some("v")).unwrap().len(), 1);
    }

    #[test]
    fn seq_orders_what_links_do_not_and_an_older_writer_s_backup_stays_in_name_order() {
        let mut v = named(&[("d", None, None), ("b", None, None)]);
        // d was made after b (seq 4 > 2) by a writer whose clock was behind.
        v[0].meta.seq = Some(4);
        v[1].meta.seq = Some(2);
        assert_eq!(ids(&chain_order(v)), ["b", "d"]);
        // A backup of an older ferry (no seq) made after a newer one's stays after it.
        let mut v = named(&[("a", None, None), ("b", None, None), ("old", None, None)]);
        v[0].meta.seq = Some(1);
        v[1].meta.seq = Some(2);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "old"]);
    }

    #[test]
    fn without_links_or_with_broken_ones_the_names_decide() {
        let v = named(&[("a", None, None), ("b", None, None), ("c", Some("gone"), None)]);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "c"]);
        // Branches: both after their parent, in name order.
        let v = named(&[
            ("a", None, None),
            ("b", Some("a"), None),
            ("c", Some("a"), None),
            ("d", Some("b"), None),
        ]);
        assert_eq!(ids(&chain_order(v)), ["a", "b", "c", "d"]);
        // A cycle (never written by ferry) keeps the name order for its members.
        let v = named(&[("a", Some("b"), None), ("b", Some("a"), None), ("c", None, None)]);
        assert_eq!(ids(&chain_order(v)), ["c", "a", "b"]);
    }

    proptest! {
        /// Whatever the names say, every backup comes after the one it was made on, and
        /// nothing is lost or duplicated.
        #[test]
        fn every_backup_comes_after_its_predecessor(links in proptest::collection::vec((0usize..40, 0u8..3), 1..40), order_seed in any::<u64>()) {
            // A random forest: backup i links to some j < i (as written), then shuffled names.
            let n = links.len();
            let ids: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            let mut items: Vec<(String, Option<String>, Option<String>)> = (0..n).map(|i| {
                let (j, kind) = links[i];
                let target = (i > 0).then(|| ids[j % i].clone());
                match kind {
                    0 => (ids[i].clone(), target, None),
                    1 => (ids[i].clone(), None, target),
                    _ => (ids[i].clone(), None, None),
                }
            }).collect();
            let mut rng = order_seed;
            for k in (1..items.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                items.swap(k, (rng >> 33) as usize % (k + 1));
            }
            let refs: Vec<(&str, Option<&str>, Option<&str>)> = items.iter().map(|(a, b, c)| (a.as_str(), b.as_deref(), c.as_deref())).collect();
            let out = chain_order(named(&refs));
            prop_assert_eq!(out.len(), n);
            let pos: std::collections::HashMap<&str, usize> = out.iter().enumerate().map(|(i, b)| (b.meta.backup_id.as_str(), i)).collect();
            prop_assert_eq!(pos.len(), n);
            for b in &out {
                if let Some(p) = b.meta.parent.as_deref().or(b.meta.follows.as_deref()) {
                    prop_assert!(pos[p] < pos[b.meta.backup_id.as_str()]);
                }
            }
        }
    }
}
