//! The fuzz targets' committed seeds (`fuzz/seeds/<target>/`): generated here, and replayed
//! here through the same decoders on every test run, so CI exercises them without a fuzzer.

use std::path::PathBuf;

use crate::keys::{KdfParams, KeySlot, MasterKey};
use crate::manifest::{Manifest, ManifestMeta};
use crate::object::{encode_sealed, ObjectKind};
use crate::{decode_chunk, encode_chunk_with_id, ChunkId, RepoConfig};

fn seeds_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target)
}

fn sample_manifest() -> Manifest {
    let mut meta: ManifestMeta = crate::manifest::tests::meta(5 * 65536 + 17, 65536);
    meta.format = crate::manifest::MANIFEST_FORMAT_PLAIN;
    let id = |b: u8| Some(ChunkId([b; 32]));
    Manifest {
        meta,
        blocks: vec![id(1), None, None, id(2), id(1), id(3)],
        deltas: Default::default(),
    }
}

/// A format-2 manifest: block 3's content is a delta on block 0's, block 5's a delta on that.
fn sample_delta_manifest() -> Manifest {
    let mut m = sample_manifest();
    m.meta.format = crate::manifest::MANIFEST_FORMAT;
    let d = |base: u8, object: u8| crate::DeltaRef {
        base: ChunkId([base; 32]),
        object: ChunkId([object; 32]),
        bytes: 4096,
    };
    m.deltas.insert(ChunkId([2; 32]), d(1, 0x12));
    m.deltas.insert(ChunkId([3; 32]), d(2, 0x23));
    m
}

fn sample_delta() -> crate::Delta {
    let mut content = vec![0x5au8; 8192];
    content[100..200].fill(1);
    content[4000..4100].fill(2);
    crate::Delta::from_extents(ChunkId([2; 32]), ChunkId([1; 32]), &content, &[(100, 100), (4000, 100)]).expect("delta")
}

/// The seeds, by target: (name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let master = MasterKey::from_raw([7u8; 32]);
    let manifest = sample_manifest().encode().expect("encode");
    let mut out = vec![
        ("manifest_decode", "sample".to_string(), manifest.clone()),
        (
            "manifest_decode",
            "deltas".to_string(),
            sample_delta_manifest().encode().expect("encode"),
        ),
        ("delta_decode", "sample".to_string(), sample_delta().encode()),
    ];
    let seal = |kind, payload: &[u8]| encode_sealed(master.seal_key(), kind, b"fuzz", payload, Some(3)).expect("seal");
    let mut tagged = |tag: u8, name: &str, object: Vec<u8>| {
        let mut v = vec![tag];
        v.extend(object);
        out.push(("sealed_object", name.to_string(), v));
    };
    tagged(0, "manifest", seal(ObjectKind::Manifest, &manifest));
    tagged(
        1,
        "protection",
        seal(
            ObjectKind::Protection,
            br#"{"volume":"v","backup_id":"00","created":"2026-11-29T00:00:00Z","note":""}"#,
        ),
    );
    tagged(2, "gc-record", seal(ObjectKind::GcRecord, &[9u8; 64]));
    let block = vec![0x5au8; 4096];
    let id = ChunkId::of(&master, &block);
    tagged(id.0[0], "chunk", encode_chunk_with_id(&master, id, &block, 3).expect("chunk"));
    let slot = KeySlot::create(&master, b"passphrase", "repository", "seed", KdfParams::argon2id_fast(), b"config").expect("slot");
    out.push(("key_slot", "fast".to_string(), slot.encode().expect("slot encode")));
    let config = br#"{"format":1,"repository_id":"0123456789abcdef0123456789abcdef","created":"2026-11-29T00:00:00Z","block_size":4194304,"zstd_level":3,"chunk_id":"blake3-keyed","cipher":"aes-256-gcm"}"#;
    let mut c = crate::object::Header {
        kind: ObjectKind::Config,
        flags: 0,
    }
    .encode()
    .to_vec();
    c.extend_from_slice(config);
    out.push(("config", "sample".to_string(), c));
    out
}

/// Writes the seeds (run by hand after a format change: `cargo test -p ferry-repo --lib
/// fuzz_seeds -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    for (target, name, bytes) in seeds() {
        let dir = seeds_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}

/// Every committed seed (and every crash input added next to them) goes through its target's
/// decoders without a panic; the genuine seeds decode.
#[test]
fn committed_seeds_replay_through_the_decoders() {
    let master = MasterKey::from_raw([7u8; 32]);
    let mut n = 0;
    for target in ["manifest_decode", "sealed_object", "key_slot", "config", "delta_decode"] {
        let dir = seeds_dir(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for e in entries {
            let data = std::fs::read(e.expect("entry").path()).expect("read seed");
            n += 1;
            match target {
                "manifest_decode" => {
                    let _ = Manifest::decode(&data, "seed");
                }
                "sealed_object" => {
                    if let Some((which, object)) = data.split_first() {
                        let kinds = [ObjectKind::Manifest, ObjectKind::Protection, ObjectKind::GcRecord];
                        let _ = crate::object::decode_sealed(
                            master.seal_key(),
                            kinds[usize::from(*which) % 3],
                            b"fuzz",
                            object.to_vec(),
                            1 << 20,
                            "seed",
                        );
                        let _ = decode_chunk(&master, &ChunkId([*which; 32]), object.to_vec(), 1 << 20);
                        let _ = crate::delta::open_delta_object(&master, &ChunkId([*which; 32]), object.to_vec(), 1 << 20);
                    }
                }
                "key_slot" => {
                    let _ = KeySlot::decode(&data, "seed");
                }
                "delta_decode" => {
                    if let Ok(d) = crate::Delta::decode(&data) {
                        let _ = d.apply(vec![1u8; 100]);
                    }
                }
                _ => {
                    let _ = RepoConfig::decode(&data);
                }
            }
        }
    }
    assert!(n >= 6, "the seeds are committed under fuzz/seeds");
    // The genuine ones decode.
    for (target, name, bytes) in seeds() {
        let ok = match target {
            "manifest_decode" => Manifest::decode(&bytes, "seed").is_ok(),
            "key_slot" => KeySlot::decode(&bytes, "seed").is_ok(),
            "config" => RepoConfig::decode(&bytes).is_ok(),
            "delta_decode" => crate::Delta::decode(&bytes).is_ok(),
            _ => true,
        };
        assert!(ok, "{target}/{name}");
    }
}

/// The committed sealed seeds were written by an earlier AES-GCM implementation (RustCrypto's
/// `aes-gcm`): they still open, and a flipped byte is still refused — the seal is the standard
/// AES-256-GCM whichever code computes it.
#[test]
fn objects_sealed_by_the_earlier_aes_gcm_code_still_open() {
    let master = MasterKey::from_raw([7u8; 32]);
    let dir = seeds_dir("sealed_object");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (name, kind) in [
        ("manifest", ObjectKind::Manifest),
        ("protection", ObjectKind::Protection),
        ("gc-record", ObjectKind::GcRecord),
    ] {
        let data = read(name);
        let object = data[1..].to_vec();
        crate::object::decode_sealed(master.seal_key(), kind, b"fuzz", object.clone(), 1 << 20, name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut bad = object;
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(crate::object::decode_sealed(master.seal_key(), kind, b"fuzz", bad, 1 << 20, name).is_err());
    }
    let data = read("chunk");
    let block = vec![0x5au8; 4096];
    let id = ChunkId::of(&master, &block);
    assert_eq!(decode_chunk(&master, &id, data[1..].to_vec(), 1 << 20).expect("chunk opens"), block);
}
