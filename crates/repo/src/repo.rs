//! The repository: config, key slots, chunks and manifests in one object store.
//!
//! Layout (relative to the repository root):
//! ```text
//! config                                   plain header + JSON
//! keys/<slot id>                           plain header + JSON (wrapped master key)
//! chunks/<2 hex>/<64 hex>                  sealed chunk
//! volumes/<volume>/backups/<time>-<id>     sealed manifest (the commit point)
//! ```

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::block_size::{BlockSize, MAX_BLOCK_SIZE};
use crate::chunk::{decode_chunk, encode_chunk_with_id, ChunkId};
use crate::error::{Error, Result};
use crate::keys::{KdfParams, KeySlot, MasterKey};
use crate::manifest::{BackupStats, Manifest, ManifestMeta, Source, MANIFEST_FORMAT};
use crate::object::{decode_sealed, encode_sealed, Header, ObjectKind, HEADER_LEN};
use crate::retry::RetryPolicy;
use crate::store::Store;

/// Highest repository format this build reads and the one it writes.
pub const REPO_FORMAT: u32 = 1;
/// Largest manifest plaintext accepted (a 64 TiB volume in 4 MiB blocks is ~512 MiB... be generous
/// but bounded).
const MAX_MANIFEST_LEN: usize = 1 << 30;
/// Largest object read for a chunk: a raw block plus the envelope (ferry stores a block raw
/// when compression does not make it smaller). Larger objects are refused before download.
const MAX_CHUNK_OBJECT: u64 = crate::block_size::MAX_BLOCK_SIZE + 4096;
/// Largest manifest object read.
const MAX_MANIFEST_OBJECT: u64 = MAX_MANIFEST_LEN as u64 + 4096;
/// Largest `config` or key slot object read.
const MAX_SMALL_OBJECT: u64 = 1 << 20;

/// The JSON body of the `config` object (FORMAT.md §4): plain, neither encrypted nor
/// authenticated, written once by `init`. Unknown fields are ignored when reading.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    /// Repository format, [`REPO_FORMAT`]; a higher value is refused when opening.
    pub format: u32,
    /// The repository ID: 32 hex digits (16 random bytes). Part of every key slot's wrap
    /// associated data and recorded in every manifest.
    pub repository_id: String,
    /// When `init` created the repository (UTC).
    pub created: chrono::DateTime<chrono::Utc>,
    /// Default block size of new volumes (each manifest records its own).
    pub block_size: BlockSize,
    /// Default zstd level for new chunks (1–19; `init` refuses others).
    pub zstd_level: i32,
    /// The chunk ID algorithm; ferry writes `"blake3-keyed"` and does not check it when
    /// reading.
    pub chunk_id: String,
    /// The cipher of chunks and manifests; ferry writes `"aes-256-gcm"` and does not check
    /// it when reading.
    pub cipher: String,
}

/// Options for `init`; the defaults are 4 MiB blocks, zstd level 3, the default Argon2id
/// parameters and an empty label.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Default block size of new volumes (`config.block_size`).
    pub block_size: BlockSize,
    /// zstd level for new chunks (`config.zstd_level`), 1–19.
    pub zstd_level: i32,
    /// KDF parameters of the first key slot.
    pub kdf: KdfParams,
    /// Label of the first key slot.
    pub label: String,
}

impl RepoConfig {
    /// Parses a `config` object: header (kind `01`), then JSON; a newer repository format is
    /// refused ([`Error::UnsupportedFormat`]).
    pub fn decode(bytes: &[u8]) -> Result<RepoConfig> {
        Header::decode(bytes, ObjectKind::Config, "config")?;
        let config: RepoConfig = serde_json::from_slice(&bytes[HEADER_LEN..]).map_err(|source| Error::Json {
            context: "parsing config".into(),
            source,
        })?;
        if config.format > REPO_FORMAT {
            return Err(Error::UnsupportedFormat {
                path: "config".into(),
                found: config.format,
                supported: REPO_FORMAT,
            });
        }
        Ok(config)
    }
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            block_size: BlockSize::DEFAULT,
            zstd_level: 3,
            kdf: KdfParams::argon2id_default(),
            label: String::new(),
        }
    }
}

/// A backup as the caller describes it; [`Repository::commit`] mints its ID and time and fills
/// the format fields.
#[derive(Debug, Clone)]
pub struct BackupDraft {
    /// The volume the backup belongs to.
    pub volume: String,
    /// Where the data came from.
    pub source: Source,
    /// The snapshot the diff started from (`None`: a full backup).
    pub from_snap: Option<String>,
    /// The snapshot the backup is of.
    pub to_snap: Option<String>,
    /// The backup ID of the parent (an incremental's base).
    pub parent: Option<String>,
    /// For a full backup: the volume's newest backup when it was made (FORMAT.md §6.1).
    pub follows: Option<String>,
    /// The backup's place in its volume's chain (FORMAT.md §6.1).
    pub seq: Option<u64>,
    /// Size of the volume in bytes.
    pub image_size: u64,
    /// The block size of the map.
    pub block_size: BlockSize,
    /// Free-form labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether the source marked the snapshot protected.
    pub protected: bool,
    /// What the backup cost.
    pub stats: BackupStats,
    /// The complete block map (`None` = hole): content IDs.
    pub blocks: Vec<Option<ChunkId>>,
    /// Content IDs stored as delta objects (the parent's table and this backup's new
    /// entries; the commit keeps only what the map reaches).
    pub deltas: std::collections::BTreeMap<ChunkId, crate::delta::DeltaRef>,
}

/// What a listing of `volumes/` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Manifests, sorted (oldest first within a volume).
    pub backups: Vec<BackupRef>,
    /// Backups with a protection marker (the marker may outlive a manifest deleted by hand).
    pub protected: std::collections::BTreeSet<BackupRef>,
    /// Manifest keys holding a fence (0 bytes): backups that never committed (FORMAT.md §12).
    pub fenced: std::collections::BTreeSet<BackupRef>,
}

/// The sealed JSON body of a protection marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProtectionMarker {
    volume: String,
    backup_id: String,
    created: chrono::DateTime<chrono::Utc>,
    note: String,
}

/// A backup's manifest as named in the bucket, before it is read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackupRef {
    /// The volume (the key's `<volume>` segment).
    pub volume: String,
    /// The manifest name, `<time>-<backup id>` with the time as `%Y%m%dT%H%M%S%.6fZ` (UTC),
    /// sortable by time within a volume.
    pub name: String,
}

impl BackupRef {
    /// The manifest's object key, `volumes/<volume>/backups/<name>` (also its seal's
    /// identity).
    pub fn key(&self) -> String {
        format!("volumes/{}/backups/{}", self.volume, self.name)
    }
    /// The backup ID: the part of the name after the last `-`.
    /// The key of the backup's protection marker: `volumes/<volume>/protected/<name>`.
    pub fn protection_key(&self) -> String {
        format!("volumes/{}/protected/{}", self.volume, self.name)
    }

    /// The backup ID: the part of the name after the last `-`.
    pub fn backup_id(&self) -> &str {
        self.name.rsplit('-').next().unwrap_or(&self.name)
    }
}

/// Checks a volume name: it becomes part of object keys.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidVolumeName { name: name.to_string() })
    }
}

/// What [`Repository::copy_identity`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityCopy {
    /// The destination was empty and is now this repository (config written).
    pub created: bool,
    /// Key slots copied (missing there before).
    pub key_slots_copied: usize,
}

/// An opened repository (config read, master key unwrapped).
#[derive(Clone)]
pub struct Repository {
    store: Store,
    config: RepoConfig,
    /// The `config` object as stored (key slots authenticate it).
    config_bytes: Vec<u8>,
    key: MasterKey,
    /// The key slot the passphrase opened.
    slot: String,
    /// How transient store failures are retried.
    retry: RetryPolicy,
}

pub(crate) fn p(s: &str) -> Path {
    Path::from(s)
}

async fn get_bytes(store: &dyn ObjectStore, key: &str) -> Result<Bytes> {
    get_bytes_limited(store, key, MAX_SMALL_OBJECT).await
}

/// GETs an object, refusing one larger than `max` bytes before reading its body: nothing
/// unauthenticated may cost more memory than a genuine object of its kind.
pub(crate) async fn get_bytes_limited(store: &dyn ObjectStore, key: &str, max: u64) -> Result<Bytes> {
    let path = p(key);
    let res = store.get(&path).await.map_err(|e| Error::store("get", &path, e))?;
    if res.meta.size > max {
        return Err(Error::BadObject {
            path: key.to_string(),
            reason: format!("{} bytes, more than the {max} an object of its kind can have", res.meta.size),
        });
    }
    let expected = res.range.end.saturating_sub(res.range.start);
    let body = res.bytes().await.map_err(|e| Error::store("get", &path, e))?;
    // A body shorter than the store announced was cut in transit (a connection closed early):
    // a network failure to retry, not damaged data.
    if (body.len() as u64) < expected {
        return Err(Error::store(
            "get",
            &path,
            object_store::Error::Generic {
                store: "ferry",
                source: format!("the response ended after {} of {expected} bytes", body.len()).into(),
            },
        ));
    }
    Ok(body)
}

pub(crate) async fn put_create(store: &dyn ObjectStore, key: &str, bytes: impl Into<Bytes>) -> Result<bool> {
    let path = p(key);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(&path, PutPayload::from(bytes.into()), opts).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(Error::store("put", &path, e)),
    }
}

impl Repository {
    /// Reads the plain `config` object.
    pub async fn read_config(store: &Store) -> Result<RepoConfig> {
        Ok(Self::read_config_bytes(store).await?.0)
    }

    /// [`Repository::read_config`], with the object's bytes.
    async fn read_config_bytes(store: &Store) -> Result<(RepoConfig, Vec<u8>)> {
        let bytes = match get_bytes(store.inner.as_ref(), "config").await {
            Ok(b) => b,
            Err(Error::NotFound { .. }) => return Err(Error::NotARepository { url: store.url.clone() }),
            Err(e) => return Err(e),
        };
        let config = RepoConfig::decode(&bytes)?;
        Ok((config, bytes.to_vec()))
    }

    /// Creates a new repository: a master key, one key slot for `passphrase`, then `config`
    /// (written last and create-only, so two racing inits cannot both succeed).
    pub async fn init(store: Store, passphrase: &[u8], opts: InitOptions) -> Result<Repository> {
        if !(1..=19).contains(&opts.zstd_level) {
            return Err(Error::InvalidArgument(format!("zstd level {} is not in 1..=19", opts.zstd_level)));
        }
        match Self::read_config(&store).await {
            Ok(_) => return Err(Error::RepositoryExists { url: store.url.clone() }),
            Err(Error::NotARepository { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        let config = RepoConfig {
            format: REPO_FORMAT,
            repository_id: hex::encode(id),
            created: chrono::Utc::now(),
            block_size: opts.block_size,
            zstd_level: opts.zstd_level,
            chunk_id: "blake3-keyed".into(),
            cipher: "aes-256-gcm".into(),
        };
        let key = MasterKey::generate();
        let mut body = Header {
            kind: ObjectKind::Config,
            flags: 0,
        }
        .encode()
        .to_vec();
        serde_json::to_writer_pretty(&mut body, &config).map_err(|source| Error::Json {
            context: "encoding config".into(),
            source,
        })?;
        let slot = KeySlot::create(&key, passphrase, &config.repository_id, &opts.label, opts.kdf, &body)?;
        put_create(store.inner.as_ref(), &format!("keys/{}", slot.id), slot.encode()?).await?;
        if !put_create(store.inner.as_ref(), "config", body.clone()).await? {
            return Err(Error::RepositoryExists { url: store.url.clone() });
        }
        store.barrier().await?;
        Ok(Repository {
            store,
            config,
            config_bytes: body,
            key,
            slot: slot.id,
            retry: RetryPolicy::default(),
        })
    }

    /// Opens a repository with a passphrase (tries every key slot).
    pub async fn open(store: Store, passphrase: &[u8]) -> Result<Repository> {
        let (config, config_bytes) = Self::read_config_bytes(&store).await?;
        let (mut slots, unreadable) = Self::read_key_slots_lenient(&store).await?;
        if slots.is_empty() {
            return Err(unreadable.into_iter().next().map(|(_, e)| e).unwrap_or(Error::NoKeySlots));
        }
        for (k, e) in &unreadable {
            tracing::warn!("key slot object {k} cannot be used and is skipped: {e}");
        }
        // Cheapest key derivation first: a planted slot with huge parameters is tried only
        // when every genuine one has failed (a wrong passphrase), not before them.
        slots.sort_by_key(|s| u64::from(s.kdf.m_cost_kib) * u64::from(s.kdf.t_cost.max(1)));
        let mut errors = Vec::new();
        for slot in &slots {
            match slot.open(passphrase, &config.repository_id) {
                Ok(Some(key)) => {
                    // The slot's label and parameters, and the config, as they were sealed.
                    // A slot made before ferry authenticated them has nothing to check: then
                    // every slot with a MAC checks the config (one that fails may mean a
                    // changed config, and is refused). Opened through a slot with a MAC, the
                    // config is authentic, and another slot that fails had its own fields
                    // changed: said, not refused (`key list` names it, `key remove` drops it).
                    let own = slot.verify(&key, &config_bytes)?;
                    for other in slots.iter().filter(|s| s.id != slot.id) {
                        match other.verify(&key, &config_bytes) {
                            Ok(_) => {}
                            Err(e) if own == crate::keys::SlotAuthenticity::Authentic => {
                                tracing::warn!("{e}");
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if own == crate::keys::SlotAuthenticity::Legacy {
                        tracing::info!(
                            "key slot {} predates authenticated slots: its label is not checked (`ferry key passwd` renews it)",
                            slot.id
                        );
                    }
                    return Ok(Repository {
                        store,
                        config,
                        config_bytes,
                        key,
                        slot: slot.id.clone(),
                        retry: RetryPolicy::default(),
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("key slot {} cannot be used and is skipped: {e}", slot.id);
                    errors.push(e);
                }
            }
        }
        if errors.len() == slots.len() {
            // No slot could even be tried: say why, not "wrong passphrase".
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
        }
        Err(Error::WrongPassword { slots: slots.len() })
    }

    /// The valid key slots under `keys/`, oldest `created` first; objects there that are not
    /// valid slots are skipped with a warning (see [`Repository::read_key_slots_lenient`]).
    pub async fn read_key_slots(store: &Store) -> Result<Vec<KeySlot>> {
        let (slots, unreadable) = Self::read_key_slots_lenient(store).await?;
        for (k, e) in &unreadable {
            tracing::warn!("{k} is not a usable key slot and is skipped: {e}");
        }
        Ok(slots)
    }

    /// Reads the key slots, setting aside the objects under `keys/` that are not valid slots
    /// (too large, unparsable) with their errors, so one planted object cannot make the
    /// repository unopenable. Store errors still fail.
    pub async fn read_key_slots_lenient(store: &Store) -> Result<(Vec<KeySlot>, Vec<(String, Error)>)> {
        let prefix = p("keys");
        let metas: Vec<_> = store
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store("list", &prefix, e))?;
        let mut slots = Vec::new();
        let mut unreadable = Vec::new();
        for m in metas {
            let key = m.location.to_string();
            let slot = match get_bytes(store.inner.as_ref(), &key).await {
                Ok(bytes) => KeySlot::decode(&bytes, &key),
                // Removed since the listing (`key remove` elsewhere): not a slot any more.
                Err(Error::NotFound { .. }) => continue,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => Err(e),
            };
            match slot {
                Ok(s) => slots.push(s),
                Err(e) => unreadable.push((key, e)),
            }
        }
        slots.sort_by_key(|s| s.created);
        Ok((slots, unreadable))
    }

    /// Checks any key slot of this repository against the master key it opened with and the
    /// config (see [`KeySlot::verify`]): its label and parameters are authentic, it has no
    /// MAC (older slots), or [`Error::SlotNotAuthentic`].
    pub fn verify_slot(&self, slot: &KeySlot) -> Result<crate::keys::SlotAuthenticity> {
        slot.verify(&self.key, &self.config_bytes)
    }

    /// The key that seals the local index's entries ([`crate::Index::set_key`]).
    pub fn index_key(&self) -> crate::IndexKey {
        crate::IndexKey(self.key.index_key().clone())
    }

    /// The `config` object as read (or written by `init`).
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }
    /// The repository ID (`config.repository_id`, 32 hex digits).
    pub fn id(&self) -> &str {
        &self.config.repository_id
    }
    /// The object store the repository lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// The repository URL as given (for messages).
    pub fn url(&self) -> &str {
        &self.store.url
    }

    /// Adds a key slot for another passphrase; returns its ID.
    pub async fn add_key_slot(&self, passphrase: &[u8], label: &str, kdf: KdfParams) -> Result<String> {
        let slot = KeySlot::create(&self.key, passphrase, &self.config.repository_id, label, kdf, &self.config_bytes)?;
        put_create(self.store.inner.as_ref(), &format!("keys/{}", slot.id), slot.encode()?).await?;
        Ok(slot.id)
    }

    /// Removes a key slot (never the last one).
    pub async fn remove_key_slot(&self, id: &str) -> Result<()> {
        let slots = Self::read_key_slots(&self.store).await?;
        if !slots.iter().any(|s| s.id == id) {
            return Err(Error::KeySlotNotFound { id: id.to_string() });
        }
        if slots.len() <= 1 {
            return Err(Error::LastKeySlot);
        }
        let path = p(&format!("keys/{id}"));
        self.store.inner.delete(&path).await.map_err(|e| Error::store("delete", &path, e))
    }

    /// The same repository retrying transient store failures by `policy`.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Repository {
        self.retry = policy;
        self
    }

    /// How transient store failures are retried.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    pub(crate) fn seal_key(&self) -> &crate::object::SealKey {
        self.key.seal_key()
    }

    /// The ID of the key slot the passphrase opened (or `init` created).
    pub fn slot_id(&self) -> &str {
        &self.slot
    }

    // ---- chunks ----

    /// The ID of a block's content: keyed BLAKE3 under this repository's ID key. CPU work
    /// (about 1 ms per MiB): call it off the async threads.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId::of(&self.key, plaintext)
    }

    /// Compresses (at the repository's zstd level) and seals a block whose ID is `id`, ready
    /// for [`Repository::put_chunk`]. CPU work: call it off the async threads.
    pub fn encode_chunk(&self, id: ChunkId, plaintext: &[u8]) -> Result<Vec<u8>> {
        encode_chunk_with_id(&self.key, id, plaintext, self.config.zstd_level)
    }

    /// Opens a chunk object and checks that its content hashes to `id` (a block is never
    /// larger than [`MAX_BLOCK_SIZE`]). CPU work: call it off the async threads.
    pub fn decode_chunk(&self, id: &ChunkId, object: Vec<u8>) -> Result<Vec<u8>> {
        decode_chunk(&self.key, id, object, MAX_BLOCK_SIZE as usize)
    }

    /// The object ID of a delta payload (FORMAT.md §14). CPU work (cheap: deltas are small).
    pub fn delta_object_id(&self, payload: &[u8]) -> ChunkId {
        crate::delta::delta_object_id(&self.key, payload)
    }

    /// Opens a delta object and checks it against its ID (not what it is the delta of).
    pub fn open_delta(&self, object: &ChunkId, bytes: Vec<u8>) -> Result<crate::delta::Delta> {
        crate::delta::open_delta_object(&self.key, object, bytes, MAX_BLOCK_SIZE as usize * 2)
    }

    /// Compresses and seals a delta as object `object`. CPU work: off the async threads.
    pub fn encode_delta(&self, object: &ChunkId, delta: &crate::delta::Delta) -> Result<Vec<u8>> {
        crate::delta::encode_delta_object(&self.key, object, delta, self.config.zstd_level)
    }

    /// Opens delta object `object` and checks it is the delta of `target` on `base`. CPU work.
    pub fn decode_delta(&self, object: &ChunkId, target: &ChunkId, base: &ChunkId, bytes: Vec<u8>) -> Result<crate::delta::Delta> {
        crate::delta::decode_delta_object(&self.key, object, target, base, bytes, MAX_BLOCK_SIZE as usize * 2)
    }

    /// True when the chunk object exists (HEAD).
    pub async fn chunk_exists(&self, id: &ChunkId) -> Result<bool> {
        let path = p(&id.object_key());
        self.retry
            .run(
                || format!("checking for chunk {id}"),
                || async {
                    match self.store.inner.head(&path).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::NotFound { .. }) => Ok(false),
                        Err(e) => Err(Error::store("head", &path, e)),
                    }
                },
            )
            .await
    }

    /// Uploads an encoded chunk create-only; `Ok(false)` when it already existed.
    ///
    /// A chunk is named by its content, so "already exists" is success even when it answers
    /// the retry of an attempt whose first outcome was unknown (stored, then a reset).
    pub async fn put_chunk(&self, id: &ChunkId, bytes: Vec<u8>) -> Result<bool> {
        let bytes = Bytes::from(bytes);
        let key = id.object_key();
        let created = self
            .retry
            .run(
                || format!("uploading chunk {id}"),
                || put_create(self.store.inner.as_ref(), &key, bytes.clone()),
            )
            .await?;
        if created {
            self.store.start_writeback(&key).await;
        }
        Ok(created)
    }

    /// Downloads a chunk object without decoding it.
    pub async fn get_chunk_object(&self, id: &ChunkId) -> Result<Bytes> {
        let key = id.object_key();
        self.retry
            .run(
                || format!("reading chunk {id}"),
                || get_bytes_limited(self.store.inner.as_ref(), &key, MAX_CHUNK_OBJECT),
            )
            .await
    }

    // ---- manifests ----

    /// Commits a backup: mints its ID, fills the format fields, and writes its manifest
    /// create-only. Nothing of a backup is visible before this; everything is after it.
    ///
    /// The backup's ID, time and manifest name are the ones `session` promised when it began
    /// (FORMAT.md §12); a manifest key a garbage collection fenced meanwhile refuses the
    /// commit with [`Error::Fenced`].
    pub async fn commit(&self, draft: BackupDraft, session: &crate::session::Session) -> Result<(BackupRef, Manifest)> {
        self.commit_within(draft, session, None).await
    }

    /// [`Repository::commit`], with the manifest PUT answered by `deadline` (a lease ends
    /// then): a PUT still unanswered is given up and settled like any unknown outcome, by the
    /// fence; with the deadline already past, nothing is sent (the error is transient and
    /// nothing was committed).
    pub async fn commit_within(
        &self,
        draft: BackupDraft,
        session: &crate::session::Session,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(BackupRef, Manifest)> {
        validate_volume_name(&draft.volume)?;
        if draft.volume != session.backup().volume {
            return Err(Error::InvalidArgument(format!(
                "a backup of volume '{}' cannot commit in a session of volume '{}'",
                draft.volume,
                session.backup().volume
            )));
        }
        session.ready_to_commit()?;
        let expected = draft.block_size.blocks_in(draft.image_size);
        if draft.blocks.len() as u64 != expected {
            return Err(Error::InvalidArgument(format!(
                "block map of {} blocks for an image of {} bytes in {} blocks (expected {expected})",
                draft.blocks.len(),
                draft.image_size,
                draft.block_size
            )));
        }
        let deltas = crate::manifest::reachable_deltas(&draft.blocks, &draft.deltas);
        let manifest = Manifest {
            meta: ManifestMeta {
                format: if deltas.is_empty() {
                    crate::manifest::MANIFEST_FORMAT_PLAIN
                } else {
                    MANIFEST_FORMAT
                },
                backup_id: session.backup().backup_id().to_string(),
                repository_id: self.config.repository_id.clone(),
                volume: draft.volume,
                created: session.created(),
                source: draft.source,
                from_snap: draft.from_snap,
                to_snap: draft.to_snap,
                follows: if draft.parent.is_none() { draft.follows } else { None },
                seq: draft.seq,
                parent: draft.parent,
                image_size: draft.image_size,
                block_size: draft.block_size,
                labels: draft.labels,
                protected: draft.protected,
                stats: draft.stats,
            },
            blocks: draft.blocks,
            deltas,
        };
        let r = session.backup().clone();
        let key = r.key();
        let plain = manifest.encode()?;
        let sealed = encode_sealed(self.key.seal_key(), ObjectKind::Manifest, key.as_bytes(), &plain, Some(3))?;
        self.publish(&r, Bytes::from(sealed), &manifest, session, deadline).await?;
        Ok((r, manifest))
    }

    /// Commits a **copy** of a backup of another copy of this repository (`ferry sync`):
    /// `sealed` is the source's manifest object (named `source`), `manifest` what it decodes
    /// to; the session is the copy attempt's ([`crate::Session::begin_named`]), so the
    /// commit follows the same protocol as a backup's (FORMAT.md §12.2 step 6). Under the
    /// source's own name the object is written byte for byte, after checking it opens here
    /// and decodes to `manifest` (an integrity error otherwise); under another attempt's name
    /// (FORMAT.md §15) the same manifest is sealed for that key.
    pub async fn commit_copy(
        &self,
        source: &BackupRef,
        sealed: Bytes,
        manifest: &Manifest,
        session: &crate::session::Session,
    ) -> Result<BackupRef> {
        let r = session.backup().clone();
        session.ready_to_commit()?;
        if r.volume != source.volume || r.backup_id() != source.backup_id() {
            return Err(Error::InvalidArgument(format!(
                "a copy of {} cannot commit in the session of {}",
                source.key(),
                r.key()
            )));
        }
        let sealed = if r == *source {
            let found = self.decode_manifest_object(&r, sealed.clone())?;
            if found != *manifest {
                return Err(Error::ManifestDecode {
                    path: r.key(),
                    reason: "the copied manifest object is not the manifest that was read".into(),
                });
            }
            sealed
        } else {
            let key = r.key();
            Bytes::from(encode_sealed(
                self.key.seal_key(),
                ObjectKind::Manifest,
                key.as_bytes(),
                &manifest.encode()?,
                Some(3),
            )?)
        };
        self.publish(&r, sealed, manifest, session, None).await?;
        Ok(r)
    }

    /// Writes a sealed manifest create-only, once, and settles the outcome (FORMAT.md §12.2
    /// step 6): "already exists" and unknown outcomes are read back or fenced, never sent
    /// again.
    async fn publish(
        &self,
        r: &BackupRef,
        sealed: Bytes,
        manifest: &Manifest,
        session: &crate::session::Session,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let key = r.key();
        // Every chunk the map references must be durable before the manifest exists.
        self.store.barrier().await?;
        // The manifest PUT is sent once: sending it again after a lost answer could re-create
        // a manifest pruned in between, behind a garbage collection's back (FORMAT.md §12.2).
        // "Already exists" is read back; an unknown outcome is settled with the fence — a
        // 0-byte create-only PUT at the same key, after which no late copy of the manifest
        // can land.
        let put = put_create(self.store.inner.as_ref(), &key, sealed);
        let sent = match deadline {
            None => put.await,
            Some(d) if d <= tokio::time::Instant::now() => {
                return Err(Error::Unavailable {
                    what: format!("committing backup {}", manifest.meta.backup_id),
                    attempts: 0,
                    secs: 0.0,
                    last: "no time was left to send the manifest before the backup's lease lapses; nothing was sent".into(),
                });
            }
            Some(d) => match tokio::time::timeout_at(d, put).await {
                Ok(r) => r,
                Err(_) => Err(Error::Unavailable {
                    what: format!("the manifest PUT of backup {}", manifest.meta.backup_id),
                    attempts: 1,
                    secs: 0.0,
                    last: "no answer before the backup's lease would lapse".into(),
                }),
            },
        };
        let outcome = match sent {
            Ok(true) => Ok(()),
            Ok(false) => self.settle_existing(r, manifest).await,
            Err(e) if e.is_transient() => match self
                .retry
                .run(
                    || format!("fencing backup {} after an unknown commit outcome", manifest.meta.backup_id),
                    || put_create(self.store.inner.as_ref(), &key, Bytes::new()),
                )
                .await
            {
                // Our fence is there: the manifest never was, and never will be.
                Ok(true) => Err(e),
                Ok(false) => self.settle_existing(r, manifest).await,
                // The store refuses the fence too: one last look. Our manifest there settles it;
                // nothing there means nothing was committed as far as the store can tell (a
                // copy still in flight would be fenced by the next GC, which finds this
                // session unended); anything else stays unknown.
                Err(f) => match self.read_manifest(r).await {
                    Ok(found) if found == *manifest => Ok(()),
                    Err(Error::NotFound { .. }) => Err(f),
                    Err(fenced @ Error::Fenced { .. }) => Err(fenced),
                    _ => Err(Error::CommitUnknown {
                        volume: manifest.meta.volume.clone(),
                        backup: manifest.meta.backup_id.clone(),
                        key: key.clone(),
                        last: format!("{e}; then fencing it failed: {f}"),
                    }),
                },
            },
            Err(e) => Err(e),
        };
        session.settled(!matches!(outcome, Err(Error::CommitUnknown { .. })));
        if outcome.is_ok() {
            // The commit itself is durable before it is reported; if that cannot be made sure,
            // the backup is visible but its fate after a crash is not known.
            if let Err(e) = self.store.barrier().await {
                return Err(Error::CommitUnknown {
                    volume: manifest.meta.volume.clone(),
                    backup: manifest.meta.backup_id.clone(),
                    key,
                    last: format!("the manifest was written but could not be made durable: {e}"),
                });
            }
            session.end().await;
        }
        outcome
    }

    /// What is at a manifest key our create-only PUT (of the manifest or of a fence) found
    /// taken: our manifest → committed; a fence → [`Error::Fenced`]; nothing any more → it was
    /// our manifest, since forgotten (fences are never deleted) → committed; anything else →
    /// a collision.
    async fn settle_existing(&self, r: &BackupRef, manifest: &Manifest) -> Result<()> {
        match self.read_manifest(r).await {
            Ok(found) if found == *manifest => Ok(()),
            Ok(_) => Err(Error::BadObject {
                path: r.key(),
                reason: "another manifest with this name already exists".into(),
            }),
            Err(Error::NotFound { .. }) => Ok(()),
            Err(e @ Error::Fenced { .. }) => Err(e),
            // Whatever is there could not be read: the key may hold our manifest.
            Err(e) => Err(Error::CommitUnknown {
                volume: manifest.meta.volume.clone(),
                backup: manifest.meta.backup_id.clone(),
                key: r.key(),
                last: format!("reading the manifest key back failed: {e}"),
            }),
        }
    }

    /// Downloads, opens and decodes a manifest, and checks that its meta names the volume,
    /// repository and backup ID its key says ([`Error::ManifestDecode`] if not). A compressed
    /// plaintext beyond 1 GiB is refused ([`Error::Decompress`]).
    pub async fn read_manifest(&self, r: &BackupRef) -> Result<Manifest> {
        Ok(self.read_manifest_object(r).await?.1)
    }

    /// [`Repository::read_manifest`], also returning the object as stored (for a copy).
    pub async fn read_manifest_object(&self, r: &BackupRef) -> Result<(Bytes, Manifest)> {
        let key = r.key();
        let bytes = self
            .retry
            .run(
                || format!("reading manifest {key}"),
                || get_bytes_limited(self.store.inner.as_ref(), &key, MAX_MANIFEST_OBJECT),
            )
            .await?;
        let m = self.decode_manifest_object(r, bytes.clone())?;
        Ok((bytes, m))
    }

    /// Opens and decodes a manifest object found at `r`'s key (a 0-byte one is a fence).
    fn decode_manifest_object(&self, r: &BackupRef, bytes: Bytes) -> Result<Manifest> {
        let key = r.key();
        if bytes.is_empty() {
            return Err(Error::Fenced {
                volume: r.volume.clone(),
                backup: r.backup_id().to_string(),
                key,
            });
        }
        let plain = decode_sealed(
            self.key.seal_key(),
            ObjectKind::Manifest,
            key.as_bytes(),
            Vec::from(bytes),
            MAX_MANIFEST_LEN,
            &key,
        )?;
        let m = Manifest::decode(&plain, &key)?;
        if m.meta.volume != r.volume || m.meta.repository_id != self.config.repository_id || r.backup_id() != m.meta.backup_id {
            return Err(Error::ManifestDecode {
                path: key,
                reason: "manifest names another volume, repository or backup than its key".into(),
            });
        }
        Ok(m)
    }

    /// Lists manifests in the bucket (names only), oldest first; one volume or all.
    pub async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<BackupRef>> {
        Ok(self.list_volumes(volume).await?.backups)
    }

    /// Lists the manifests and protection markers of one volume or all (one LIST).
    pub async fn list_volumes(&self, volume: Option<&str>) -> Result<Listing> {
        let prefix = match volume {
            Some(v) => {
                validate_volume_name(v)?;
                p(&format!("volumes/{v}"))
            }
            None => p("volumes"),
        };
        let metas = self.list_prefix(prefix.as_ref()).await?;
        let mut out = Listing::default();
        for m in metas {
            let parts: Vec<_> = m.location.parts().collect();
            if parts.len() != 4 || parts[0].as_ref() != "volumes" {
                continue;
            }
            let r = BackupRef {
                volume: parts[1].as_ref().to_string(),
                name: parts[3].as_ref().to_string(),
            };
            match parts[2].as_ref() {
                "backups" if m.size == 0 => {
                    out.fenced.insert(r);
                }
                "backups" => out.backups.push(r),
                "protected" => {
                    out.protected.insert(r);
                }
                _ => {}
            }
        }
        out.backups.sort();
        Ok(out)
    }

    /// Lists every object under `prefix` (retried as a whole on transient failures).
    pub(crate) async fn list_prefix(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let path = p(prefix);
        self.retry
            .run(
                || format!("listing {prefix}/"),
                || async {
                    self.store
                        .inner
                        .list(Some(&path))
                        .try_collect::<Vec<_>>()
                        .await
                        .map_err(|e| Error::store("list", &path, e))
                },
            )
            .await
    }

    /// Protects a backup: writes its protection marker (create-only, sealed; `note` says why).
    /// A protected backup is never forgotten or pruned. Returns `false` if it already was.
    /// The marker is written first and the manifest read back after, so a backup forgotten
    /// meanwhile is reported (`NotFound`) instead of claimed protected.
    pub async fn protect(&self, r: &BackupRef, note: &str) -> Result<bool> {
        validate_volume_name(&r.volume)?;
        let key = r.protection_key();
        let body = serde_json::to_vec(&ProtectionMarker {
            volume: r.volume.clone(),
            backup_id: r.backup_id().to_string(),
            created: chrono::Utc::now(),
            note: note.to_string(),
        })
        .map_err(|source| Error::Json {
            context: "encoding a protection marker".into(),
            source,
        })?;
        let sealed = encode_sealed(self.key.seal_key(), ObjectKind::Protection, key.as_bytes(), &body, None)?;
        let created = put_create(self.store.inner.as_ref(), &key, sealed).await?;
        if let Err(e) = self.read_manifest(r).await {
            if matches!(e, Error::NotFound { .. }) {
                let _ = self.store.inner.delete(&p(&key)).await;
            }
            return Err(e);
        }
        Ok(created)
    }

    /// Removes a backup's protection marker; `false` if it was not protected.
    pub async fn unprotect(&self, r: &BackupRef) -> Result<bool> {
        if !self.is_protected(r).await? {
            return Ok(false);
        }
        let path = p(&r.protection_key());
        match self.store.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(Error::store("delete", &path, e)),
        }
    }

    /// True when the backup's protection marker exists and is authentic (a marker that does
    /// not open under this repository's key is an integrity error, never silently ignored).
    pub async fn is_protected(&self, r: &BackupRef) -> Result<bool> {
        Ok(self.get_protection_object(r).await?.is_some())
    }

    /// Checks that a protection marker object opens under this repository's key at `r`'s key.
    fn open_protection(&self, r: &BackupRef, bytes: &Bytes) -> Result<()> {
        let key = r.protection_key();
        decode_sealed(
            self.key.seal_key(),
            ObjectKind::Protection,
            key.as_bytes(),
            Vec::from(bytes.clone()),
            1 << 20,
            &key,
        )
        .map(|_| ())
    }

    /// The backup's protection marker object as stored, after checking it opens under this
    /// repository's key (`None`: the backup is not protected).
    pub async fn get_protection_object(&self, r: &BackupRef) -> Result<Option<Bytes>> {
        let key = r.protection_key();
        let bytes = match get_bytes(self.store.inner.as_ref(), &key).await {
            Ok(b) => b,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.open_protection(r, &bytes)?;
        Ok(Some(bytes))
    }

    /// Writes a protection marker object copied from another copy of this repository
    /// (create-only, after checking it opens here); `false` when the backup already was
    /// protected.
    pub async fn put_protection_object(&self, r: &BackupRef, bytes: Bytes) -> Result<bool> {
        let key = r.protection_key();
        self.open_protection(r, &bytes)?;
        self.retry
            .run(
                || format!("writing {key}"),
                || put_create(self.store.inner.as_ref(), &key, bytes.clone()),
            )
            .await
    }

    /// Makes `dst` a copy of this repository's identity, for `ferry sync`: every valid key
    /// slot missing there is copied as stored (the master key stays wrapped: the copy opens
    /// with the same passphrases), then `config` as stored if `dst` has none (written last,
    /// like `init`). A `dst` holding another repository is refused before anything is
    /// written ([`Error::OtherRepository`]).
    pub async fn copy_identity(&self, dst: &Store) -> Result<IdentityCopy> {
        let created = match Self::read_config(dst).await {
            Ok(c) if c.repository_id == self.config.repository_id => false,
            Ok(c) => {
                return Err(Error::OtherRepository {
                    url: dst.url.clone(),
                    found: c.repository_id,
                    expected: self.config.repository_id.clone(),
                })
            }
            Err(Error::NotARepository { .. }) => true,
            Err(e) => return Err(e),
        };
        let prefix = p("keys");
        let metas: Vec<_> = self
            .store
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store("list", &prefix, e))?;
        let theirs: std::collections::HashSet<String> = dst
            .inner
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .map_err(|e| Error::store("list", &prefix, e))?;
        let mut key_slots_copied = 0;
        for m in metas {
            let key = m.location.to_string();
            if theirs.contains(&key) {
                continue;
            }
            let bytes = match get_bytes(self.store.inner.as_ref(), &key).await {
                Ok(b) => b,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            // Only genuine slots travel (a planted object, or a slot whose label was changed
            // in the bucket, stays behind).
            match KeySlot::decode(&bytes, &key) {
                Ok(slot) => {
                    if let Err(e) = self.verify_slot(&slot) {
                        tracing::warn!("{key} is not copied: {e}");
                        continue;
                    }
                }
                Err(_) => continue,
            }
            if self
                .retry
                .run(|| format!("copying {key}"), || put_create(dst.inner.as_ref(), &key, bytes.clone()))
                .await?
            {
                key_slots_copied += 1;
            }
        }
        if created {
            // The config as this repository opened with it (its key slots authenticate it).
            let config = Bytes::from(self.config_bytes.clone());
            if !put_create(dst.inner.as_ref(), "config", config).await? {
                // Another sync made it meanwhile: it must be this repository.
                let c = Self::read_config(dst).await?;
                if c.repository_id != self.config.repository_id {
                    return Err(Error::OtherRepository {
                        url: dst.url.clone(),
                        found: c.repository_id,
                        expected: self.config.repository_id.clone(),
                    });
                }
            }
        }
        dst.barrier().await?;
        Ok(IdentityCopy { created, key_slots_copied })
    }

    /// Forgets a backup: deletes its manifest, unless it is protected (checked right before
    /// the delete; [`Error::Protected`]). Other backups are unaffected (every manifest is a
    /// complete map); the backup's chunks stay until a garbage collection finds them unused.
    pub async fn forget(&self, r: &BackupRef) -> Result<()> {
        if self.is_protected(r).await? {
            return Err(Error::Protected {
                volume: r.volume.clone(),
                backup: r.backup_id().to_string(),
            });
        }
        self.delete_manifest(r).await
    }

    /// Deletes a manifest (the backup disappears; chunks no other manifest references become
    /// garbage, which ferry does not collect yet).
    pub async fn delete_manifest(&self, r: &BackupRef) -> Result<()> {
        let path = p(&r.key());
        self.store.inner.delete(&path).await.map_err(|e| Error::store("delete", &path, e))
    }
}

#[cfg(test)]
mod planted_tests {
    use super::*;
    use crate::store::{open_store, StoreOptions};

    async fn repo() -> (Store, Repository) {
        let store = open_store("memory://", &StoreOptions::default()).unwrap();
        let opts = InitOptions {
            kdf: KdfParams::argon2id_fast(),
            ..Default::default()
        };
        let repo = Repository::init(store.clone(), b"pass", opts).await.unwrap();
        (store, repo)
    }

    #[tokio::test]
    async fn a_planted_object_under_keys_does_not_lock_the_repository_out() {
        let (store, _) = repo().await;
        put_create(store.inner.as_ref(), "keys/0000-garbage", b"not a key slot".to_vec())
            .await
            .unwrap();
        put_create(store.inner.as_ref(), "keys/0001-huge", vec![b'{'; 2 << 20])
            .await
            .unwrap();
        let r = Repository::open(store.clone(), b"pass").await.expect("the genuine slot opens");
        assert_eq!(Repository::read_key_slots(&store).await.unwrap().len(), 1);
        assert_eq!(r.slot_id(), Repository::read_key_slots(&store).await.unwrap()[0].id);
        let (_, bad) = Repository::read_key_slots_lenient(&store).await.unwrap();
        assert_eq!(bad.len(), 2);
        assert!(matches!(
            Repository::open(store, b"wrong").await,
            Err(Error::WrongPassword { slots: 1 })
        ));
    }

    #[tokio::test]
    async fn an_oversized_chunk_object_is_refused_before_it_is_read() {
        let (store, repo) = repo().await;
        let id = repo.chunk_id(b"some block");
        put_create(store.inner.as_ref(), &id.object_key(), vec![0u8; MAX_CHUNK_OBJECT as usize + 1])
            .await
            .unwrap();
        let e = repo.get_chunk_object(&id).await.unwrap_err();
        assert!(matches!(e, Error::BadObject { .. }) && e.is_integrity(), "{e}");
    }
}
