//! ferry's offsite repository.
//!
//! Owns the object layout in the bucket, the keys and the crypto, the chunk codec, manifests
//! and chains, and the local chain index (a sled cache). Knows nothing of Ceph or of diff
//! streams: it stores blocks and block maps.

#![deny(missing_docs)]

pub mod block_size;
pub mod chunk;
pub mod delta;
pub mod error;
pub mod gc;
pub mod index;
pub mod keys;
pub mod manifest;
pub mod object;
pub mod quarantine;
pub mod repo;
pub mod retention;
pub mod retry;
pub mod session;
pub mod spec;
pub mod store;
pub mod verified;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod gc_sim;

pub use block_size::{BlockSize, MAX_BLOCKS, MAX_BLOCK_SIZE, MAX_IMAGE_SIZE, MIN_BLOCK_SIZE};
pub use chunk::{decode_chunk, encode_chunk, encode_chunk_with_id, is_zero, ChunkId, EncodedChunk};
pub use delta::{delta_object_id, Delta, DeltaRef};
pub use error::{Error, Result};
pub use gc::{collect_garbage, GcEvent, GcOptions, GcReport};
pub use index::{chain_order, BackupSummary, Chain, Index, IndexKey, SyncReport};
pub use keys::{KdfParams, KeySlot, MasterKey, SlotAuthenticity};
pub use manifest::{
    delta_chain, objects_of, reachable_deltas, BackupStats, Manifest, ManifestMeta, Source, MANIFEST_FORMAT, MANIFEST_FORMAT_PLAIN,
};
pub use repo::{validate_volume_name, BackupDraft, BackupRef, IdentityCopy, InitOptions, Listing, RepoConfig, Repository, REPO_FORMAT};
pub use retry::RetryPolicy;
pub use session::{copy_attempts, copy_name, CopyAttempt, Decision, Session, SessionOptions};
pub use spec::{resolve, BackupSpec};
pub use store::{open_store, Store, StoreOptions};
pub use store::{
    CountingStore, FaultAction, FaultMethod, FaultPlan, FaultRule, FaultStore, RequestCounter, RequestStats, UploadLimitStore,
    UploadLimiter,
};
