//! Round trips and format details.

use super::{drain, parse, Rec, Trickle, B};
use crate::{DiffHeader, DiffReader, DiffWriter, Event, Format};

fn sample_header() -> DiffHeader {
    DiffHeader {
        from_snap: Some("snap1".into()),
        to_snap: Some("snap2".into()),
        image_size: 10 << 20,
        protected: None,
    }
}

fn write_sample<W: std::io::Write>(w: &mut DiffWriter<W>) {
    w.write_data(0, b"hello").unwrap();
    w.write_zero(4096, 4096).unwrap();
    w.begin_data(8192, 10).unwrap();
    w.write_payload(b"0123").unwrap();
    w.write_payload(b"").unwrap();
    w.write_payload(b"456789").unwrap();
    w.write_data(8202, b"").unwrap();
    w.write_zero(1 << 20, 0).unwrap();
    w.write_data((10 << 20) - 3, b"end").unwrap();
}

fn sample_records() -> Vec<Rec> {
    vec![
        Rec::W(0, b"hello".to_vec()),
        Rec::Z(4096, 4096),
        Rec::W(8192, b"0123456789".to_vec()),
        Rec::W(8202, vec![]),
        Rec::Z(1 << 20, 0),
        Rec::W((10 << 20) - 3, b"end".to_vec()),
    ]
}

#[test]
fn v1_round_trip_and_exact_bytes() {
    let h = sample_header();
    let mut w = DiffWriter::new(Vec::new(), &h).unwrap();
    assert_eq!(w.format(), Format::V1);
    write_sample(&mut w);
    let bytes = w.finish().unwrap();
    let expected = B::v1()
        .name(b'f', b"snap1")
        .name(b't', b"snap2")
        .s(10 << 20)
        .w(0, b"hello")
        .z(4096, 4096)
        .w(8192, b"0123456789")
        .w(8202, b"")
        .z(1 << 20, 0)
        .w((10 << 20) - 3, b"end")
        .e()
        .v;
    assert_eq!(bytes, expected);
    for piece in [1, 3, 4, 1 << 20] {
        let mut r = DiffReader::with_max_piece(&bytes[..], piece).unwrap();
        assert_eq!(r.format(), Format::V1);
        assert_eq!(r.header(), &h);
        assert_eq!(drain(&mut r).unwrap(), sample_records());
        assert_eq!(r.position(), bytes.len() as u64);
        // End repeats.
        assert_eq!(r.next_event().unwrap(), Event::End);
        assert_eq!(r.next_event().unwrap(), Event::End);
    }
}

#[test]
fn v2_round_trip_and_exact_bytes() {
    for quirk in [false, true] {
        let h = DiffHeader {
            protected: Some(true),
            ..sample_header()
        };
        let mut w = DiffWriter::new_v2(Vec::new(), &h, quirk).unwrap();
        assert_eq!(w.format(), Format::V2);
        write_sample(&mut w);
        let bytes = w.finish().unwrap();
        let expected = B::v2()
            .name(b'f', b"snap1")
            .name(b't', b"snap2")
            .p(if quirk { 8 } else { 1 }, 1)
            .s(10 << 20)
            .w(0, b"hello")
            .z(4096, 4096)
            .w(8192, b"0123456789")
            .w(8202, b"")
            .z(1 << 20, 0)
            .w((10 << 20) - 3, b"end")
            .e()
            .v;
        assert_eq!(bytes, expected);
        let mut r = DiffReader::with_max_piece(&bytes[..], 3).unwrap();
        assert_eq!(r.format(), Format::V2);
        assert_eq!(r.header(), &h);
        assert_eq!(drain(&mut r).unwrap(), sample_records());
        assert_eq!(r.position(), bytes.len() as u64);
    }
}

#[test]
fn v2_p_only_with_to_snap() {
    // No to-snap: no p record, whatever `protected` says.
    let h = DiffHeader {
        from_snap: Some("a".into()),
        image_size: 5,
        protected: Some(true),
        ..Default::default()
    };
    let bytes = DiffWriter::new_v2(Vec::new(), &h, true).unwrap().finish().unwrap();
    assert_eq!(bytes, B::v2().name(b'f', b"a").s(5).e().v);
    let r = DiffReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header().protected, None);
    // To-snap without `protected`: p = 0.
    let h = DiffHeader {
        to_snap: Some("b".into()),
        image_size: 5,
        ..Default::default()
    };
    let bytes = DiffWriter::new_v2(Vec::new(), &h, false).unwrap().finish().unwrap();
    assert_eq!(bytes, B::v2().name(b't', b"b").p(1, 0).s(5).e().v);
    let r = DiffReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header().protected, Some(false));
    // v1 ignores `protected`.
    let h = DiffHeader {
        protected: Some(true),
        ..h
    };
    let bytes = DiffWriter::new(Vec::new(), &h).unwrap().finish().unwrap();
    assert_eq!(bytes, B::v1().name(b't', b"b").s(5).e().v);
}

#[test]
fn pacific_p_quirk_len8_one_byte() {
    for (len, val, expected) in [(8, 1, true), (8, 0, false), (1, 1, true), (1, 0x80, true)] {
        let bytes = B::v2().name(b't', b"snap").p(len, val).s(4096).z(0, 4096).e().v;
        let mut r = DiffReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header().protected, Some(expected));
        assert_eq!(r.header().to_snap.as_deref(), Some("snap"));
        assert_eq!(drain(&mut r).unwrap(), vec![Rec::Z(0, 4096)]);
    }
}

#[test]
fn metadata_in_any_order() {
    let expect = DiffHeader {
        from_snap: Some("a".into()),
        to_snap: Some("b".into()),
        image_size: 77,
        protected: None,
    };
    let v1 = B::v1().s(77).name(b't', b"b").name(b'f', b"a").w(70, b"1234567").e().v;
    let mut r = DiffReader::new(&v1[..]).unwrap();
    assert_eq!(r.header(), &expect);
    assert_eq!(drain(&mut r).unwrap(), vec![Rec::W(70, b"1234567".to_vec())]);

    let v2 = B::v2().s(77).p(8, 1).name(b't', b"b").name(b'f', b"a").e().v;
    let mut r = DiffReader::new(&v2[..]).unwrap();
    assert_eq!(
        r.header(),
        &DiffHeader {
            protected: Some(true),
            ..expect
        }
    );
    assert_eq!(drain(&mut r).unwrap(), vec![]);
}

#[test]
fn unknown_v2_tags_are_skipped() {
    let bytes = B::v2()
        .head(b'X', 3)
        .raw(b"abc")
        .s(100)
        .head(b'O', 0)
        .w(0, b"data")
        .head(0xff, 20)
        .raw(&[7; 20])
        .z(10, 5)
        .head(b'E', 1)
        .raw(b"e")
        .e()
        .v;
    let mut r = DiffReader::with_max_piece(&bytes[..], 2).unwrap();
    assert_eq!(r.header().image_size, 100);
    assert_eq!(r.skipped_records(), 2);
    assert_eq!(drain(&mut r).unwrap(), vec![Rec::W(0, b"data".to_vec()), Rec::Z(10, 5)]);
    assert_eq!(r.skipped_records(), 4);
}

#[test]
fn shrink_only_stream() {
    // A shrink is just a smaller 's' (36 bytes with f and t of 5 chars... here: names "a"/"b").
    let bytes = B::v1().name(b'f', b"a").name(b't', b"b").s(4096).e().v;
    let mut r = DiffReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header().image_size, 4096);
    assert_eq!(r.next_event().unwrap(), Event::End);
}

#[test]
fn max_piece_splitting_10mib() {
    let len = 10 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let h = DiffHeader {
        image_size: 1 << 30,
        ..Default::default()
    };
    let mut w = DiffWriter::new(Vec::new(), &h).unwrap();
    w.write_data(4096, &data).unwrap();
    let bytes = w.finish().unwrap();

    let mut r = DiffReader::with_max_piece(&bytes[..], 1 << 20).unwrap();
    let mut pieces = 0;
    let mut got = Vec::with_capacity(len);
    loop {
        match r.next_event().unwrap() {
            Event::Data { offset, data } => {
                assert_eq!(offset, 4096 + got.len() as u64);
                assert_eq!(data.len(), 1 << 20);
                got.extend_from_slice(data);
                pieces += 1;
            }
            Event::End => break,
            e => panic!("{e:?}"),
        }
        assert_eq!(r.record_remaining(), (len - got.len()) as u64);
    }
    assert_eq!(pieces, 10);
    assert!(got == data);
}

#[test]
fn slow_reader_with_interrupts() {
    let h = sample_header();
    let mut w = DiffWriter::new_v2(Vec::new(), &h, true).unwrap();
    write_sample(&mut w);
    let bytes = w.finish().unwrap();
    for step in [1, 2, 7, 100] {
        let mut r = DiffReader::with_max_piece(
            Trickle {
                data: &bytes,
                step,
                interrupt: false,
            },
            5,
        )
        .unwrap();
        assert_eq!(drain(&mut r).unwrap(), sample_records());
        assert_eq!(r.position(), bytes.len() as u64);
    }
}

#[test]
fn large_pieces_bypass_the_buffer() {
    // A piece larger than the internal buffer, partly buffered already.
    let data = vec![0xabu8; 300_000];
    let bytes = B::v1().s(1 << 20).w(0, &data).w(300_000, &data).e().v;
    assert_eq!(
        parse(&bytes, 200_000).unwrap(),
        vec![Rec::W(0, data.clone()), Rec::W(300_000, data)]
    );
}

#[test]
fn into_inner_after_end() {
    let bytes = B::v1().s(1).e().v;
    let mut r = DiffReader::new(std::io::Cursor::new(bytes.clone())).unwrap();
    assert_eq!(r.next_event().unwrap(), Event::End);
    let c = r.into_inner();
    assert_eq!(c.position(), bytes.len() as u64);
}
