//! Micro benchmarks of ferry's per-block pipeline: diff parsing, zero check, chunk IDs,
//! chunk encode/decode (zstd + AES-256-GCM) per content kind, the AES-GCM seal alone, and the
//! manifest codec for a 1 TiB volume.
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/target-bench cargo bench -j 2 --bench pipeline            # all (~3 min)
//! CARGO_TARGET_DIR=/tmp/target-bench cargo bench -j 2 --bench pipeline -- encode  # a subset
//! ```
//!
//! Every benchmark reports a throughput in bytes of plaintext (or stream) per second. The
//! `chunk_encode/*` and `zero_check/*` results are what `benches/compare.sh` reads (from
//! `$CARGO_TARGET_DIR/criterion/.../new/estimates.json`) to compute this machine's ceiling
//! for the backup pipeline; `chunk_decode/*` gives the restore ceiling.
//!
//! Runs are kept short on purpose (10 samples, ~2 s of measurement per benchmark): enough to
//! see a regression of a few percent on the 4 MiB kernels, not a statistics exercise.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_repo::object::{decode_sealed, encode_sealed, ObjectKind};
use ferry_repo::{decode_chunk, encode_chunk, is_zero, BackupStats, ChunkId, Manifest, ManifestMeta, MasterKey, Source, MANIFEST_FORMAT};
use ferry_testdata::{block_content, fill_kind, Kind, Rng};
use rbd_diff::{DiffHeader, DiffReader, DiffWriter, Event};

const BLOCK: usize = 4 << 20;
const ZSTD_LEVEL: i32 = 3;

fn key() -> MasterKey {
    MasterKey::from_raw([7u8; 32])
}

fn block_of(kind: Kind, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    fill_kind(kind, &mut Rng::new(seed), &mut buf);
    buf
}

const KINDS: [(Kind, &str); 3] = [(Kind::Binary, "binary"), (Kind::Text, "text"), (Kind::Random, "random")];

fn group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g
}

/// Diff parsing: a v1 stream of 4 MiB `w` records (mixed content), read to the end.
fn diff_parse(c: &mut Criterion) {
    let records = 32u64;
    let header = DiffHeader {
        from_snap: None,
        to_snap: Some("s1".into()),
        image_size: records * BLOCK as u64,
        protected: None,
    };
    let mut w = DiffWriter::new(Vec::with_capacity((records as usize) * (BLOCK + 32)), &header).unwrap();
    for i in 0..records {
        let mut b = block_content(42, i, BLOCK);
        if is_zero(&b) {
            b[0] = 1;
        }
        w.write_data(i * BLOCK as u64, &b).unwrap();
    }
    let stream = w.finish().unwrap();
    let mut g = group(c, "diff_parse");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("v1_4MiB_writes", |b| {
        b.iter(|| {
            let mut r = DiffReader::new(&stream[..]).unwrap();
            let mut n = 0u64;
            loop {
                match r.next_event().unwrap() {
                    Event::Data { data, .. } => n += data.len() as u64,
                    Event::Zero { length, .. } => n += length,
                    Event::End => break,
                }
            }
            black_box(n)
        })
    });
    g.finish();
}

/// The zero check every block goes through (zero blocks cost only this).
fn zero_check(c: &mut Criterion) {
    let zeros = vec![0u8; BLOCK];
    let mut g = group(c, "zero_check");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("zero_4MiB", |b| b.iter(|| black_box(is_zero(black_box(&zeros)))));
    g.finish();
}

/// Keyed BLAKE3 chunk IDs (dedup hits cost only this).
fn chunk_id(c: &mut Criterion) {
    let k = key();
    let data = block_of(Kind::Binary, 1);
    let mut g = group(c, "chunk_id");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("blake3_keyed_4MiB", |b| b.iter(|| black_box(ChunkId::of(&k, black_box(&data)))));
    g.finish();
}

/// Full chunk encode (hash + zstd 3 + AES-256-GCM) and decode (open + decompress + re-hash).
fn chunk_codec(c: &mut Criterion) {
    let k = key();
    let blocks: Vec<(&str, Vec<u8>)> = KINDS.iter().map(|&(kind, name)| (name, block_of(kind, 11))).collect();
    let mut g = group(c, "chunk_encode");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (name, data) in &blocks {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(encode_chunk(&k, black_box(data), ZSTD_LEVEL).unwrap()))
        });
    }
    g.finish();

    let mut g = group(c, "chunk_decode");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (name, data) in &blocks {
        let enc = encode_chunk(&k, data, ZSTD_LEVEL).unwrap();
        eprintln!(
            "chunk_decode/{name}: encoded {} of {} bytes (ratio {:.3})",
            enc.bytes.len(),
            data.len(),
            enc.bytes.len() as f64 / data.len() as f64
        );
        g.bench_function(*name, |b| {
            b.iter(|| black_box(decode_chunk(&k, &enc.id, black_box(enc.bytes.clone()), BLOCK).unwrap()))
        });
    }
    g.finish();
}

/// The stages alone: AES-256-GCM seal/open without compression, and zstd 3 + seal without
/// the hash (the seal of the compressed bytes is small next to zstd itself).
fn stages(c: &mut Criterion) {
    let k = key();
    let id = [9u8; 32];
    let random = block_of(Kind::Random, 5);
    let mut g = group(c, "aes_gcm");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("seal_4MiB", |b| {
        b.iter(|| black_box(encode_sealed(k.seal_key(), ObjectKind::Chunk, &id, black_box(&random), None).unwrap()))
    });
    let sealed = encode_sealed(k.seal_key(), ObjectKind::Chunk, &id, &random, None).unwrap();
    g.bench_function("open_4MiB", |b| {
        b.iter_batched(
            || sealed.clone(),
            |object| black_box(decode_sealed(k.seal_key(), ObjectKind::Chunk, &id, object, BLOCK, "x").unwrap()),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut g = group(c, "zstd3_seal");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for &(kind, name) in &KINDS {
        let data = block_of(kind, 11);
        g.bench_function(name, |b| {
            b.iter(|| black_box(encode_sealed(k.seal_key(), ObjectKind::Chunk, &id, black_box(&data), Some(ZSTD_LEVEL)).unwrap()))
        });
    }
    g.finish();
}

fn meta(image_size: u64, block_size: u64) -> ManifestMeta {
    ManifestMeta {
        format: MANIFEST_FORMAT,
        backup_id: "0123456789abcdef".into(),
        repository_id: "bench".into(),
        volume: "bench".into(),
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
        block_size: ferry_repo::BlockSize::new(block_size).expect("a valid block size"),
        labels: BTreeMap::new(),
        protected: false,
        stats: BackupStats::default(),
    }
}

/// Manifest codec for a 1 TiB volume in 4 MiB blocks (262144 blocks): fully written (8 MiB of
/// chunk IDs) and 10% written in scattered runs; plain encode/decode and the sealed object.
fn manifest(c: &mut Criterion) {
    let k = key();
    let blocks = 262_144usize;
    let mut rng = Rng::new(3);
    let full: Vec<Option<ChunkId>> = (0..blocks)
        .map(|_| {
            let mut id = [0u8; 32];
            rng.fill(&mut id);
            Some(ChunkId(id))
        })
        .collect();
    let sparse: Vec<Option<ChunkId>> = full.iter().map(|b| if rng.below(10) == 0 { *b } else { None }).collect();
    for (name, map) in [("full", full), ("sparse10", sparse)] {
        let m = Manifest {
            meta: meta(1 << 40, BLOCK as u64),
            blocks: map,
            deltas: Default::default(),
        };
        let enc = m.encode().unwrap();
        let sealed = encode_sealed(k.seal_key(), ObjectKind::Manifest, b"volumes/bench", &enc, Some(ZSTD_LEVEL)).unwrap();
        eprintln!(
            "manifest/{name}: 262144 blocks, {} bytes plain, {} bytes sealed",
            enc.len(),
            sealed.len()
        );
        let mut g = group(c, "manifest_1TiB");
        g.throughput(Throughput::Elements(blocks as u64));
        g.bench_function(format!("{name}/encode"), |b| b.iter(|| black_box(m.encode().unwrap())));
        g.bench_function(format!("{name}/decode"), |b| {
            b.iter(|| black_box(Manifest::decode(black_box(&enc), "m").unwrap()))
        });
        g.bench_function(format!("{name}/encode_sealed"), |b| {
            b.iter_batched(
                || m.encode().unwrap(),
                |plain| black_box(encode_sealed(k.seal_key(), ObjectKind::Manifest, b"volumes/bench", &plain, Some(ZSTD_LEVEL)).unwrap()),
                BatchSize::LargeInput,
            )
        });
        g.bench_function(format!("{name}/decode_sealed"), |b| {
            b.iter_batched(
                || sealed.clone(),
                |object| {
                    let plain = decode_sealed(k.seal_key(), ObjectKind::Manifest, b"volumes/bench", object, 64 << 20, "m").unwrap();
                    black_box(Manifest::decode(&plain, "m").unwrap())
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, diff_parse, zero_check, chunk_id, chunk_codec, stages, manifest);
criterion_main!(benches);
