#![no_main]
//! Feeds arbitrary bytes to the object envelope (`decode_sealed`, every kind), to the chunk
//! decoder (`decode_chunk`) and to the delta object decoder (`open_delta_object`) under a fixed key: header checks, authentication, zstd limits.
//! The first byte picks the kind; an input that authenticates is impossible without the key,
//! so the seeds (fuzz/corpus/sealed_object) are genuine objects sealed with it.

use ferry_repo::object::{decode_sealed, ObjectKind, SealKey};
use ferry_repo::{decode_chunk, ChunkId, MasterKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let master = MasterKey::from_raw([7u8; 32]);
    let Some((which, object)) = data.split_first() else { return };
    let kinds = [ObjectKind::Manifest, ObjectKind::Protection, ObjectKind::GcRecord];
    let key: &SealKey = master.seal_key();
    let _ = decode_sealed(key, kinds[usize::from(*which) % 3], b"fuzz", object.to_vec(), 1 << 20, "fuzz");
    let _ = decode_chunk(&master, &ChunkId([*which; 32]), object.to_vec(), 1 << 20);
    let _ = ferry_repo::delta::open_delta_object(&master, &ChunkId([*which; 32]), object.to_vec(), 1 << 20);
});
