//! Property tests: writer → reader round trips, and robustness against corrupted input.

use proptest::prelude::*;
use proptest::sample::Index;

use super::{drain, drain_records, Rec, Trickle};
use crate::{
    DiffHeader, DiffReader, DiffWriter, Event, ImageExportReader, ImageExportWriter, ImageHeader, BANNER_IMAGE_DIFFS_V2, BANNER_IMAGE_V2,
    BANNER_V1, BANNER_V2,
};

/// A valid diff: header plus ascending, non-overlapping records within the image.
#[derive(Debug, Clone)]
struct Diff {
    header: DiffHeader,
    records: Vec<Rec>,
}

#[derive(Debug, Clone)]
enum Gen {
    W(u64, Vec<u8>),
    Z(u64, u64),
}

fn gen_record() -> impl Strategy<Value = Gen> {
    prop_oneof![
        (0u64..64, prop::collection::vec(any::<u8>(), 0..48)).prop_map(|(g, d)| Gen::W(g, d)),
        (0u64..64, 0u64..5000).prop_map(|(g, l)| Gen::Z(g, l)),
    ]
}

fn gen_diff() -> impl Strategy<Value = Diff> {
    let name = proptest::option::of("\\PC{0,10}");
    let base = prop_oneof![Just(0u64), 0u64..1 << 40, Just(u64::MAX - (1 << 20)),];
    let extra = prop_oneof![Just(0u64), 0u64..100_000, Just(u64::MAX)];
    (
        name.clone(),
        name,
        proptest::option::of(any::<bool>()),
        base,
        prop::collection::vec(gen_record(), 0..10),
        extra,
    )
        .prop_map(|(from_snap, to_snap, protected, base, gens, extra)| {
            let mut end = base;
            let mut records = Vec::new();
            for g in gens {
                match g {
                    Gen::W(gap, data) => {
                        let off = end + gap;
                        end = off + data.len() as u64;
                        records.push(Rec::W(off, data));
                    }
                    Gen::Z(gap, len) => {
                        let off = end + gap;
                        end = off + len;
                        records.push(Rec::Z(off, len));
                    }
                }
            }
            Diff {
                header: DiffHeader {
                    from_snap,
                    to_snap,
                    image_size: end.saturating_add(extra),
                    protected,
                },
                records,
            }
        })
}

/// Writes the records; `chunk` > 0 streams `w` payloads in chunks of that size.
fn write_records<W: std::io::Write>(w: &mut DiffWriter<W>, records: &[Rec], chunk: usize) -> Result<(), crate::Error> {
    for r in records {
        match r {
            Rec::W(o, d) if chunk > 0 => {
                w.begin_data(*o, d.len() as u64)?;
                for c in d.chunks(chunk) {
                    w.write_payload(c)?;
                }
            }
            Rec::W(o, d) => w.write_data(*o, d)?,
            Rec::Z(o, l) => w.write_zero(*o, *l)?,
        }
    }
    Ok(())
}

fn encode(d: &Diff, v2: bool, quirk: bool, chunk: usize) -> Vec<u8> {
    let mut w = if v2 {
        DiffWriter::new_v2(Vec::new(), &d.header, quirk).unwrap()
    } else {
        DiffWriter::new(Vec::new(), &d.header).unwrap()
    };
    write_records(&mut w, &d.records, chunk).unwrap();
    w.finish().unwrap()
}

/// What the reader reports for a header the writer was given.
fn expected_header(h: &DiffHeader, v2: bool) -> DiffHeader {
    DiffHeader {
        protected: if v2 && h.to_snap.is_some() {
            Some(h.protected.unwrap_or(false))
        } else {
            None
        },
        ..h.clone()
    }
}

fn apply_mutations(mut bytes: Vec<u8>, muts: &[(u8, Index, u8)], cut: Option<Index>) -> Vec<u8> {
    for (kind, at, byte) in muts {
        if bytes.is_empty() {
            bytes.push(*byte);
            continue;
        }
        let i = at.index(bytes.len());
        match kind % 4 {
            0 => bytes[i] = *byte,
            1 => bytes.insert(i, *byte),
            2 => {
                bytes.remove(i);
            }
            _ => bytes[i] ^= 1 << (byte % 8),
        }
    }
    if let Some(cut) = cut {
        let n = cut.index(bytes.len() + 1);
        bytes.truncate(n);
    }
    bytes
}

/// Reads everything a (possibly corrupt) diff stream has; must not panic.
fn exercise_diff(bytes: &[u8], max_piece: usize) {
    let Ok(mut r) = DiffReader::with_max_piece(bytes, max_piece) else {
        return;
    };
    // Every event but End consumes at least one byte, so this bound is never reached.
    for _ in 0..bytes.len() + 2 {
        match r.next_event() {
            Ok(Event::Data { data, .. }) => assert!(data.len() <= max_piece),
            Ok(Event::Zero { .. }) => {}
            Ok(Event::End) | Err(_) => break,
        }
    }
    assert!(r.position() <= bytes.len() as u64);
}

fn exercise_image(bytes: &[u8], max_piece: usize) {
    let Ok(mut r) = ImageExportReader::with_max_piece(bytes, max_piece) else {
        return;
    };
    for _ in 0..bytes.len() + 2 {
        match r.next_diff() {
            Ok(Some(mut d)) => {
                for _ in 0..bytes.len() + 2 {
                    match d.next_event() {
                        Ok(Event::End) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

fn gen_image() -> impl Strategy<Value = (ImageHeader, Vec<Diff>)> {
    let header = (
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        prop::collection::vec(("\\PC{0,6}", "\\PC{0,6}"), 0..3),
    )
        .prop_map(|(order, features, metadata)| ImageHeader {
            order,
            features,
            stripe_unit: order.map(|o| o / 2),
            stripe_count: None,
            metadata,
        });
    (header, prop::collection::vec(gen_diff(), 0..4))
}

fn encode_image(h: &ImageHeader, diffs: &[Diff], quirk: bool) -> Vec<u8> {
    let mut w = ImageExportWriter::new(Vec::new(), h, diffs.len() as u64).unwrap();
    for d in diffs {
        w.write_diff(&d.header, quirk, |dw| write_records(dw, &d.records, 5)).unwrap();
    }
    w.finish().unwrap()
}

proptest! {
    #[test]
    fn prop_round_trip(
        d in gen_diff(),
        v2 in any::<bool>(),
        quirk in any::<bool>(),
        chunk in 0usize..8,
        max_piece in 1usize..64,
        step in 1usize..100,
    ) {
        let bytes = encode(&d, v2, quirk, chunk);
        let mut r = DiffReader::with_max_piece(
            Trickle { data: &bytes, step, interrupt: false },
            max_piece,
        ).unwrap();
        prop_assert_eq!(r.format(), if v2 { crate::Format::V2 } else { crate::Format::V1 });
        prop_assert_eq!(r.header(), &expected_header(&d.header, v2));
        prop_assert_eq!(drain(&mut r).unwrap(), d.records.clone());
        prop_assert_eq!(r.position(), bytes.len() as u64);
        prop_assert_eq!(r.next_event().unwrap(), Event::End);
    }

    /// The record API reads the same stream the same: same records, same end position.
    #[test]
    fn prop_records_round_trip(
        d in gen_diff(),
        v2 in any::<bool>(),
        chunk in 0usize..8,
        step in 1usize..64,
        trickle in 1usize..100,
    ) {
        let bytes = encode(&d, v2, true, chunk);
        let mut r = DiffReader::new(Trickle { data: &bytes, step: trickle, interrupt: false }).unwrap();
        prop_assert_eq!(drain_records(&mut r, step).unwrap(), d.records.clone());
        prop_assert_eq!(r.position(), bytes.len() as u64);
        prop_assert_eq!(r.next_record().unwrap(), crate::Record::End);
    }

    /// On a damaged stream, both APIs find the same records or fail with the same error.
    #[test]
    fn prop_mutated_diff_records_agree_with_events(
        d in gen_diff(),
        v2 in any::<bool>(),
        muts in prop::collection::vec((any::<u8>(), any::<Index>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<Index>()),
        max_piece in 1usize..16,
        step in 1usize..16,
    ) {
        let bytes = apply_mutations(encode(&d, v2, true, 0), &muts, cut);
        let by_events = DiffReader::with_max_piece(&bytes[..], max_piece).and_then(|mut r| drain(&mut r));
        let by_records = DiffReader::new(&bytes[..]).and_then(|mut r| drain_records(&mut r, step));
        prop_assert_eq!(
            by_events.map_err(|e| e.to_string()),
            by_records.map_err(|e| e.to_string())
        );
    }

    #[test]
    fn prop_image_round_trip(
        (h, diffs) in gen_image(),
        quirk in any::<bool>(),
        max_piece in 1usize..64,
    ) {
        let bytes = encode_image(&h, &diffs, quirk);
        let mut r = ImageExportReader::with_max_piece(&bytes[..], max_piece).unwrap();
        prop_assert_eq!(r.header(), &h);
        prop_assert_eq!(r.diff_count(), diffs.len() as u64);
        for d in &diffs {
            let mut dr = r.next_diff().unwrap().unwrap();
            prop_assert_eq!(dr.header(), &expected_header(&d.header, true));
            prop_assert_eq!(drain(&mut dr).unwrap(), d.records.clone());
        }
        prop_assert!(r.next_diff().unwrap().is_none());
        prop_assert_eq!(r.position(), bytes.len() as u64);
    }

    #[test]
    fn prop_mutated_diff_never_panics(
        d in gen_diff(),
        v2 in any::<bool>(),
        muts in prop::collection::vec((any::<u8>(), any::<Index>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<Index>()),
        max_piece in 1usize..16,
    ) {
        let bytes = apply_mutations(encode(&d, v2, true, 0), &muts, cut);
        exercise_diff(&bytes, max_piece);
    }

    #[test]
    fn prop_mutated_image_never_panics(
        (h, diffs) in gen_image(),
        muts in prop::collection::vec((any::<u8>(), any::<Index>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<Index>()),
        max_piece in 1usize..16,
    ) {
        let bytes = apply_mutations(encode_image(&h, &diffs, true), &muts, cut);
        exercise_image(&bytes, max_piece);
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(
        prefix in 0usize..5,
        tail in prop::collection::vec(any::<u8>(), 0..200),
        max_piece in 1usize..16,
    ) {
        let mut bytes = match prefix {
            0 => Vec::new(),
            1 => BANNER_V1.to_vec(),
            2 => BANNER_V2.to_vec(),
            3 => BANNER_IMAGE_V2.to_vec(),
            _ => {
                let mut v = BANNER_IMAGE_V2.to_vec();
                v.push(b'E');
                v.extend_from_slice(BANNER_IMAGE_DIFFS_V2);
                v
            }
        };
        bytes.extend_from_slice(&tail);
        exercise_diff(&bytes, max_piece);
        exercise_image(&bytes, max_piece);
    }
}
