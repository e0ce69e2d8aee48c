//! Image export (`rbd export --export-format 2`) container.

use super::{drain, Rec, B};
use crate::{DiffHeader, Error, Event, ImageExportReader, ImageExportWriter, ImageHeader, BANNER_IMAGE_DIFFS_V2, BANNER_IMAGE_V2};

fn diff_headers() -> Vec<DiffHeader> {
    vec![
        DiffHeader {
            from_snap: None,
            to_snap: Some("s1".into()),
            image_size: 1 << 20,
            protected: Some(true),
        },
        DiffHeader {
            from_snap: Some("s1".into()),
            to_snap: Some("s2".into()),
            image_size: 2 << 20,
            protected: Some(false),
        },
        DiffHeader {
            from_snap: Some("s2".into()),
            to_snap: None,
            image_size: 2 << 20,
            protected: None,
        },
    ]
}

fn image_header() -> ImageHeader {
    ImageHeader {
        order: Some(22),
        features: Some(61),
        stripe_unit: Some(4 << 20),
        stripe_count: Some(1),
        metadata: vec![("conf_rbd_cache".into(), "false".into()), ("owner".into(), "ferry ✓".into())],
    }
}

fn diff_records(i: usize) -> Vec<Rec> {
    match i {
        0 => vec![Rec::W(0, vec![1; 5000]), Rec::Z(8192, 4096)],
        1 => vec![Rec::Z(0, 4096), Rec::W(1 << 20, b"grown".to_vec())],
        _ => vec![],
    }
}

fn build(quirk: bool) -> Vec<u8> {
    let heads = diff_headers();
    let mut w = ImageExportWriter::new(Vec::new(), &image_header(), 3).unwrap();
    for (i, h) in heads.iter().enumerate() {
        w.write_diff(h, quirk, |d| {
            for rec in diff_records(i) {
                match rec {
                    Rec::W(o, data) => d.write_data(o, &data)?,
                    Rec::Z(o, l) => d.write_zero(o, l)?,
                }
            }
            Ok(())
        })
        .unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn three_diffs_round_trip() {
    for quirk in [false, true] {
        let bytes = build(quirk);
        assert!(bytes.starts_with(BANNER_IMAGE_V2));
        let mut r = ImageExportReader::with_max_piece(&bytes[..], 1000).unwrap();
        assert_eq!(r.header(), &image_header());
        assert_eq!(r.diff_count(), 3);
        let mut i = 0;
        while let Some(mut d) = r.next_diff().unwrap() {
            assert_eq!(d.header(), &diff_headers()[i]);
            assert_eq!(d.max_piece(), 1000);
            assert_eq!(drain(&mut d).unwrap(), diff_records(i));
            // End repeats for embedded readers too.
            assert_eq!(d.next_event().unwrap(), Event::End);
            i += 1;
        }
        assert_eq!(i, 3);
        assert_eq!(r.position(), bytes.len() as u64);
        assert!(r.next_diff().unwrap().is_none());
    }
}

#[test]
fn header_layout_and_unknown_records() {
    // Hand-built: unknown 'F' (doc-only image format) record is skipped; no O/T/U/C at all.
    let mut v = BANNER_IMAGE_V2.to_vec();
    v.push(b'F');
    v.extend_from_slice(&8u64.to_le_bytes());
    v.extend_from_slice(&2u64.to_le_bytes());
    v.push(b'C');
    v.extend_from_slice(&8u64.to_le_bytes());
    v.extend_from_slice(&7u64.to_le_bytes());
    v.push(b'E');
    v.extend_from_slice(BANNER_IMAGE_DIFFS_V2);
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&B::v2().s(4096).w(0, b"x").e().v);
    let mut r = ImageExportReader::new(&v[..]).unwrap();
    assert_eq!(
        r.header(),
        &ImageHeader {
            stripe_count: Some(7),
            ..Default::default()
        }
    );
    let mut d = r.next_diff().unwrap().unwrap();
    assert_eq!(drain(&mut d).unwrap(), vec![Rec::W(0, b"x".to_vec())]);
    assert!(r.next_diff().unwrap().is_none());

    // The writer produces exactly the documented layout.
    let h = ImageHeader {
        order: Some(22),
        metadata: vec![("k".into(), "vv".into())],
        ..Default::default()
    };
    let bytes = ImageExportWriter::new(Vec::new(), &h, 0).unwrap().finish().unwrap();
    let mut e = BANNER_IMAGE_V2.to_vec();
    e.push(b'O');
    e.extend_from_slice(&8u64.to_le_bytes());
    e.extend_from_slice(&22u64.to_le_bytes());
    e.push(b'M');
    e.extend_from_slice(&11u64.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(b"k");
    e.extend_from_slice(&2u32.to_le_bytes());
    e.extend_from_slice(b"vv");
    e.push(b'E');
    e.extend_from_slice(BANNER_IMAGE_DIFFS_V2);
    e.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(bytes, e);
    let mut r = ImageExportReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header(), &h);
    assert_eq!(r.diff_count(), 0);
    assert!(r.next_diff().unwrap().is_none());
}

#[test]
fn truncated_inside_embedded_diff() {
    let bytes = build(true);
    // Cut in the middle of the second diff.
    let cut = bytes.len() - 60;
    let mut r = ImageExportReader::new(&bytes[..cut]).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    drain(&mut d).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    let e = drain(&mut d).unwrap_err();
    assert!(matches!(e, Error::Truncated { eof_at, .. } if eof_at == cut as u64), "{e:?}");
}
