//! One test (at least) per error variant, each checking the variant and its offset.

use std::io::{self, Write};

use super::{parse, parse_err, FailAfter, B};
use crate::{DiffHeader, DiffReader, DiffWriter, Error, ImageExportReader, ImageExportWriter, ImageHeader, MAX_SNAP_NAME};

fn header(size: u64) -> DiffHeader {
    DiffHeader {
        image_size: size,
        ..Default::default()
    }
}

#[test]
fn io_error_reader() {
    let good = B::v1().s(100).w(0, &[1; 50]).e().v;
    // 31 bytes arrive (banner 12 + s 9 + 10 bytes of the w record), then the reader fails.
    let e = match DiffReader::new(FailAfter {
        data: &good[..31],
        step: 5,
    }) {
        Ok(mut r) => super::drain(&mut r).unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Io { offset: 31, .. }), "{e:?}");
    // Display names the offset and the cause.
    let msg = e.to_string();
    assert!(msg.contains("31") && msg.contains("boom"), "{msg}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn io_error_during_header() {
    let good = B::v1().s(100).e().v;
    let e = DiffReader::new(FailAfter {
        data: &good[..15],
        step: 100,
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::Io { offset: 15, .. }), "{e:?}");
}

#[derive(Debug)]
struct FailingWriter {
    ok: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.ok);
        self.ok -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn io_error_writer_and_poison() {
    // Header = 12 + 9 = 21 bytes, fits. The w record header does not.
    let mut w = DiffWriter::new(FailingWriter { ok: 21 }, &header(100)).unwrap();
    let e = w.write_data(0, b"abc").unwrap_err();
    assert!(matches!(e, Error::Io { offset: 21, .. }), "{e:?}");
    let e = w.write_zero(50, 1).unwrap_err();
    assert!(matches!(e, Error::Poisoned { offset: 21 }), "{e:?}");
    let e = w.finish().unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e:?}");
    // Failing while writing the header.
    let e = DiffWriter::new(FailingWriter { ok: 3 }, &header(1)).err().unwrap();
    assert!(matches!(e, Error::Io { offset: 0, .. }), "{e:?}");
}

#[test]
fn unknown_banner() {
    for bad in [&b"rbd diff v3\n"[..], b"RBD DIFF V1\n", b"rbd diff v1\r\n", b"hello", b"\x00"] {
        let e = parse_err(bad);
        assert!(matches!(e, Error::UnknownBanner { offset: 0, .. }), "{e:?}");
    }
    let e = parse_err(b"rbd image v2\n");
    assert!(e.to_string().contains("rbd image v2"), "{e}");
}

#[test]
fn unknown_tag_v1() {
    let b = B::v1().s(100);
    let at = b.pos();
    let e = parse_err(&b.raw(b"x").u64(0).e().v);
    assert!(matches!(e, Error::UnknownTag { offset, tag: b'x' } if offset == at), "{e:?}");
    // 'p' is a v2-only record; in v1 it is unknown.
    let b = B::v1().name(b't', b"snap").s(100);
    let at = b.pos();
    let e = parse_err(&b.raw(b"p\x01").e().v);
    assert!(matches!(e, Error::UnknownTag { offset, tag: b'p' } if offset == at), "{e:?}");
    // ... also in the data section.
    let b = B::v1().s(100).z(0, 10);
    let at = b.pos();
    let e = parse_err(&b.raw(b"\xff").e().v);
    assert!(matches!(e, Error::UnknownTag { offset, tag: 0xff } if offset == at), "{e:?}");
    assert!(e.to_string().contains(&at.to_string()));
}

#[test]
fn length_mismatch_v2() {
    let check = |b: B, at: u64, tag: u8, expected: u64, found: u64| {
        let e = parse_err(&b.v);
        match e {
            Error::LengthMismatch {
                offset,
                tag: t,
                expected: ex,
                found: f,
            } => {
                assert_eq!((offset, t, ex, f), (at, tag, expected, found));
            }
            e => panic!("{e:?}"),
        }
    };
    // f: len must be 4 + n.
    let b = B::v2();
    let at = b.pos();
    check(b.head(b'f', 9).u32(4).raw(b"snap").s(10).e(), at, b'f', 8, 9);
    // t
    let b = B::v2().s(10);
    let at = b.pos();
    check(b.head(b't', 4).u32(1).raw(b"a").e(), at, b't', 5, 4);
    // s
    let b = B::v2();
    let at = b.pos();
    check(b.head(b's', 16).u64(10).u64(0).e(), at, b's', 8, 16);
    // w: len counts the payload.
    let b = B::v2().s(100);
    let at = b.pos();
    check(b.head(b'w', 16).u64(0).u64(3).raw(b"abc").e(), at, b'w', 19, 16);
    // z
    let b = B::v2().s(100);
    let at = b.pos();
    check(b.head(b'z', 19).u64(0).u64(3).e(), at, b'z', 16, 19);
    // p: 1 and 8 accepted, anything else rejected.
    let b = B::v2().name(b't', b"x");
    let at = b.pos();
    check(b.p(2, 1).s(10).e(), at, b'p', 1, 2);
    let b = B::v2().name(b't', b"x");
    let at = b.pos();
    check(b.p(0, 1).s(10).e(), at, b'p', 1, 0);
    // w whose 16 + L overflows: expected saturates.
    let b = B::v2().s(100);
    let at = b.pos();
    check(b.head(b'w', 5).u64(0).u64(u64::MAX).e(), at, b'w', u64::MAX, 5);
}

#[test]
fn extent_overflow() {
    let b = B::v1().s(u64::MAX);
    let at = b.pos();
    let e = parse_err(&b.z(u64::MAX - 1, 2).e().v);
    assert!(
        matches!(e, Error::ExtentOverflow { offset, image_offset, length: 2 } if offset == at && image_offset == u64::MAX - 1),
        "{e:?}"
    );
    let b = B::v2().s(u64::MAX);
    let at = b.pos();
    let e = parse_err(&b.head(b'w', 16 + 5).u64(u64::MAX).u64(5).raw(b"12345").e().v);
    assert!(matches!(e, Error::ExtentOverflow { offset, .. } if offset == at), "{e:?}");
    // Writer: same variant, offset = bytes written so far.
    let mut w = DiffWriter::new(Vec::new(), &header(u64::MAX)).unwrap();
    let e = w.write_zero(u64::MAX, 1).unwrap_err();
    assert!(matches!(e, Error::ExtentOverflow { offset: 21, .. }), "{e:?}");
    let mut w = DiffWriter::new_v2(Vec::new(), &header(u64::MAX), false).unwrap();
    let e = w.begin_data(0, u64::MAX - 3).unwrap_err();
    assert!(matches!(e, Error::ExtentOverflow { offset: 29, .. }), "{e:?}");
}

#[test]
fn extent_beyond_image() {
    let b = B::v1().s(100).w(0, b"ab");
    let at = b.pos();
    let e = parse_err(&b.z(90, 11).e().v);
    assert!(
        matches!(e, Error::ExtentBeyondImage { offset, image_offset: 90, length: 11, image_size: 100 } if offset == at),
        "{e:?}"
    );
    // A zero-length extent exactly at the end is fine, one past it is not.
    assert!(parse(&B::v1().s(100).z(100, 0).w(100, b"").e().v, 3).is_ok());
    let b = B::v1().s(100);
    let at = b.pos();
    let e = parse_err(&b.w(101, b"").e().v);
    assert!(matches!(e, Error::ExtentBeyondImage { offset, .. } if offset == at), "{e:?}");
    // Writer.
    let mut w = DiffWriter::new(Vec::new(), &header(100)).unwrap();
    w.write_data(0, b"ab").unwrap();
    let e = w.write_zero(90, 11).unwrap_err();
    assert!(matches!(e, Error::ExtentBeyondImage { offset: 40, .. }), "{e:?}");
    // Nothing was written by the failed call; the writer is still usable.
    w.write_zero(90, 10).unwrap();
    let out = w.finish().unwrap();
    assert_eq!(
        parse(&out, 1).unwrap(),
        vec![super::Rec::W(0, b"ab".to_vec()), super::Rec::Z(90, 10)]
    );
}

#[test]
fn out_of_order() {
    // Overlapping: second record starts before the end of the first.
    let b = B::v1().s(100).w(10, b"abcd");
    let at = b.pos();
    let e = parse_err(&b.z(13, 1).e().v);
    assert!(
        matches!(e, Error::OutOfOrder { offset, image_offset: 13, previous_end: 14 } if offset == at),
        "{e:?}"
    );
    // Decreasing.
    let b = B::v2().s(100).z(50, 0);
    let at = b.pos();
    let e = parse_err(&b.w(49, b"x").e().v);
    assert!(
        matches!(e, Error::OutOfOrder { offset, image_offset: 49, previous_end: 50 } if offset == at),
        "{e:?}"
    );
    // Adjacent is fine.
    assert!(parse(&B::v1().s(100).w(10, b"abcd").z(14, 1).e().v, 2).is_ok());
    // Writer.
    let mut w = DiffWriter::new(Vec::new(), &header(100)).unwrap();
    w.write_data(10, b"abcd").unwrap();
    let e = w.begin_data(13, 1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfOrder {
                offset: 42,
                previous_end: 14,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn truncated() {
    let full = B::v1().name(b'f', b"snap1").s(100).w(5, b"hello").e().v;
    let check = |cut: usize, offset: u64, what: &str| {
        let e = parse_err(&full[..cut]);
        match e {
            Error::Truncated {
                offset: o,
                what: w,
                eof_at,
            } => {
                assert_eq!(o, offset, "cut {cut}");
                assert!(w.contains(what), "cut {cut}: {w}");
                assert_eq!(eof_at, cut as u64);
            }
            e => panic!("cut {cut}: {e:?}"),
        }
    };
    check(0, 0, "banner");
    check(5, 0, "banner");
    check(11, 0, "banner");
    check(14, 12, "snapshot name"); // inside the f length
    check(19, 12, "snapshot name"); // inside the name
    check(25, 22, "'s'");
    check(32, 31, "'w' record header");
    check(50, 31, "'w' payload");
    check(52, 31, "'w' payload");
    // v2: inside the len field
    let b = B::v2().s(10);
    let at = b.pos();
    let bytes = b.z(0, 1).e().v;
    let e = parse_err(&bytes[..at as usize + 3]);
    assert!(
        matches!(e, Error::Truncated { offset, what: "record length", .. } if offset == at),
        "{e:?}"
    );
    // v2: inside a skipped unknown record
    let b = B::v2().s(10);
    let at = b.pos();
    let bytes = b.head(b'Q', 100).raw(&[0; 50]).v;
    let e = parse_err(&bytes);
    assert!(matches!(e, Error::Truncated { offset, .. } if offset == at), "{e:?}");
}

#[test]
fn missing_end() {
    let b = B::v1().s(100).w(0, b"abc");
    let at = b.pos();
    let e = parse_err(&b.v);
    assert!(matches!(e, Error::MissingEnd { offset } if offset == at), "{e:?}");
    // Only metadata, no 'e'.
    let b = B::v2().s(100).name(b'f', b"a");
    let at = b.pos();
    let e = parse_err(&b.v);
    assert!(matches!(e, Error::MissingEnd { offset } if offset == at), "{e:?}");
    // Banner only.
    let e = parse_err(crate::BANNER_V1);
    assert!(matches!(e, Error::MissingEnd { offset: 12 }), "{e:?}");
}

#[test]
fn trailing_bytes() {
    let b = B::v1().s(100).z(0, 1).e();
    let at = b.pos();
    let e = parse_err(&b.raw(b"\n").v);
    assert!(matches!(e, Error::TrailingBytes { offset } if offset == at), "{e:?}");
    // A second 'e' is trailing, too.
    let b = B::v2().s(100).e();
    let at = b.pos();
    let e = parse_err(&b.e().v);
    assert!(matches!(e, Error::TrailingBytes { offset } if offset == at), "{e:?}");
}

#[test]
fn name_too_long() {
    let long = vec![b'a'; MAX_SNAP_NAME + 1];
    for b in [B::v1(), B::v2()] {
        let b = b.s(1);
        let at = b.pos();
        let e = parse_err(&b.name(b't', &long).e().v);
        assert!(
            matches!(e, Error::NameTooLong { offset, len: 4097, max: 4096 } if offset == at),
            "{e:?}"
        );
    }
    // A huge claimed length fails before any allocation.
    let b = B::v1();
    let e = parse_err(&b.raw(b"f").u32(u32::MAX).v);
    assert!(matches!(e, Error::NameTooLong { offset: 12, .. }), "{e:?}");
    // The maximum itself is fine.
    let ok = vec![b'b'; MAX_SNAP_NAME];
    let bytes = B::v1().name(b'f', &ok).s(1).e().v;
    let mut r = DiffReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header().from_snap.as_deref().map(str::len), Some(4096));
    assert!(super::drain(&mut r).unwrap().is_empty());
    // Writer.
    let h = DiffHeader {
        from_snap: Some("a".into()),
        to_snap: Some(String::from_utf8(long).unwrap()),
        ..header(1)
    };
    let e = DiffWriter::new(Vec::new(), &h).err().unwrap();
    assert!(matches!(e, Error::NameTooLong { offset: 18, .. }), "{e:?}");
    let e = DiffWriter::new_v2(Vec::new(), &h, false).err().unwrap();
    assert!(matches!(e, Error::NameTooLong { offset: 26, .. }), "{e:?}");
}

#[test]
fn invalid_utf8() {
    let b = B::v1().s(1);
    let at = b.pos();
    let e = parse_err(&b.name(b'f', b"sn\xffap").e().v);
    assert!(matches!(e, Error::InvalidUtf8 { offset, .. } if offset == at), "{e:?}");
}

#[test]
fn missing_image_size() {
    let b = B::v1().name(b'f', b"a");
    let at = b.pos();
    let e = parse_err(&b.w(0, b"").s(10).e().v);
    assert!(matches!(e, Error::MissingImageSize { offset } if offset == at), "{e:?}");
    let e = parse_err(&B::v2().e().v);
    assert!(matches!(e, Error::MissingImageSize { offset: 12 }), "{e:?}");
    let e = parse_err(&B::v2().z(0, 0).e().v);
    assert!(matches!(e, Error::MissingImageSize { offset: 12 }), "{e:?}");
}

#[test]
fn metadata_after_data() {
    for (b, tag) in [
        (B::v1().s(10).w(0, b"a"), b's'),
        (B::v1().s(10).z(0, 1), b'f'),
        (B::v2().s(10).z(0, 1), b't'),
        (B::v2().s(10).w(0, b""), b'p'),
    ] {
        let at = b.pos();
        let b = match tag {
            b's' => b.s(10),
            b'p' => b.p(1, 1),
            t => b.name(t, b"x"),
        };
        let e = parse_err(&b.e().v);
        assert!(
            matches!(e, Error::MetadataAfterData { offset, tag: t } if offset == at && t == tag),
            "{e:?}"
        );
    }
}

#[test]
fn duplicate_record() {
    for (b, tag) in [
        (B::v1().s(10), b's'),
        (B::v1().name(b'f', b"a").s(10), b'f'),
        (B::v2().name(b't', b"a"), b't'),
        (B::v2().name(b't', b"a").p(1, 0), b'p'),
    ] {
        let at = b.pos();
        let b = match tag {
            b's' => b.s(10),
            b'p' => b.p(8, 1).s(1),
            t => b.name(t, b"x").s(1),
        };
        let e = parse_err(&b.e().v);
        assert!(
            matches!(e, Error::DuplicateRecord { offset, tag: t } if offset == at && t == tag),
            "{e:?}"
        );
    }
}

#[test]
fn poisoned_reader() {
    let bytes = B::v1().s(10).w(0, b"abc").z(1, 1).e().v;
    let mut r = DiffReader::new(&bytes[..]).unwrap();
    r.next_event().unwrap();
    let e = r.next_event().unwrap_err();
    assert!(matches!(e, Error::OutOfOrder { .. }), "{e:?}");
    let pos = r.position();
    let e = r.next_event().unwrap_err();
    assert!(matches!(e, Error::Poisoned { offset } if offset == pos), "{e:?}");
}

#[test]
fn poisoned_reader_by_records() {
    // A payload cut short: the record API reports it like the event API, then only Poisoned.
    let mut bytes = B::v1().s(10).w(2, b"abcdef").v;
    bytes.truncate(bytes.len() - 2);
    let mut r = DiffReader::new(&bytes[..]).unwrap();
    assert_eq!(r.next_record().unwrap(), crate::Record::Data { offset: 2, len: 6 });
    let mut buf = [0u8; 3];
    assert_eq!(r.read_data(&mut buf).unwrap(), 3);
    assert_eq!(&buf, b"abc");
    assert_eq!(r.next_record().unwrap(), crate::Record::Data { offset: 5, len: 3 });
    let e = r.read_data(&mut buf).unwrap_err();
    assert!(matches!(e, Error::Truncated { what: "'w' payload", .. }), "{e:?}");
    assert!(matches!(r.read_data(&mut buf).unwrap_err(), Error::Poisoned { .. }));
    assert!(matches!(r.next_record().unwrap_err(), Error::Poisoned { .. }));
    assert!(matches!(r.next_event().unwrap_err(), Error::Poisoned { .. }));
}

#[test]
fn writer_misuse() {
    let mut w = DiffWriter::new(Vec::new(), &header(100)).unwrap();
    // No open record: any payload is an overrun.
    let e = w.write_payload(b"x").unwrap_err();
    assert!(
        matches!(
            e,
            Error::PayloadOverrun {
                offset: 21,
                remaining: 0,
                given: 1
            }
        ),
        "{e:?}"
    );
    w.write_payload(b"").unwrap();
    w.begin_data(0, 5).unwrap();
    w.write_payload(b"ab").unwrap();
    let e = w.write_payload(b"cdef").unwrap_err();
    assert!(
        matches!(
            e,
            Error::PayloadOverrun {
                offset: 40,
                remaining: 3,
                given: 4
            }
        ),
        "{e:?}"
    );
    let e = w.write_zero(10, 1).unwrap_err();
    assert!(matches!(e, Error::IncompletePayload { offset: 40, remaining: 3 }), "{e:?}");
    let e = w.write_data(10, b"").unwrap_err();
    assert!(matches!(e, Error::IncompletePayload { .. }), "{e:?}");
    w.write_payload(b"cde").unwrap();
    w.begin_data(10, 2).unwrap();
    w.write_payload(b"x").unwrap();
    let e = w.finish().unwrap_err();
    assert!(matches!(e, Error::IncompletePayload { remaining: 1, .. }), "{e:?}");
}

#[test]
fn invalid_argument() {
    let bytes = B::v1().s(1).e().v;
    let e = DiffReader::with_max_piece(&bytes[..], 0).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert_eq!(e.offset(), None);
    let e = ImageExportReader::with_max_piece(&bytes[..], 0).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
}

fn image_prefix(diffs: u64) -> Vec<u8> {
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    v.push(b'E');
    v.extend_from_slice(crate::BANNER_IMAGE_DIFFS_V2);
    v.extend_from_slice(&diffs.to_le_bytes());
    v
}

#[test]
fn container_errors() {
    // Unknown image banner.
    let e = ImageExportReader::new(&b"rbd image v3\nE"[..]).err().unwrap();
    assert!(matches!(e, Error::UnknownBanner { offset: 0, .. }), "{e:?}");
    // Wrong diff-section banner right after 'E' (offset 14).
    let e = ImageExportReader::new(&b"rbd image v2\nErbd image diffs v1\n"[..]).err().unwrap();
    assert!(matches!(e, Error::UnknownBanner { offset: 14, .. }), "{e:?}");
    // Truncated diff count.
    let mut v = image_prefix(1);
    v.truncate(v.len() - 3);
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(
        matches!(
            e,
            Error::Truncated {
                offset: 33,
                what: "diff count",
                ..
            }
        ),
        "{e:?}"
    );
    // Header record: O with len 4.
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    v.push(b'O');
    v.extend_from_slice(&4u64.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                offset: 13,
                tag: b'O',
                expected: 8,
                found: 4
            }
        ),
        "{e:?}"
    );
    // Duplicate O.
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    for _ in 0..2 {
        v.push(b'O');
        v.extend_from_slice(&8u64.to_le_bytes());
        v.extend_from_slice(&22u64.to_le_bytes());
    }
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(matches!(e, Error::DuplicateRecord { offset: 30, tag: b'O' }), "{e:?}");
    // M record claiming a huge key: rejected before reading it.
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    v.push(b'M');
    v.extend_from_slice(&u64::MAX.to_le_bytes());
    v.extend_from_slice(&(crate::MAX_IMAGE_METADATA as u32 + 1).to_le_bytes());
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(matches!(e, Error::MetadataTooLarge { offset: 13, .. }), "{e:?}");
    // M with the wrong len.
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    v.push(b'M');
    v.extend_from_slice(&9u64.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.push(b'k');
    v.extend_from_slice(&1u32.to_le_bytes());
    v.push(b'v');
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                offset: 13,
                tag: b'M',
                expected: 10,
                found: 9
            }
        ),
        "{e:?}"
    );
    // M with invalid UTF-8 value.
    let mut v = crate::BANNER_IMAGE_V2.to_vec();
    v.push(b'M');
    v.extend_from_slice(&10u64.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.push(b'k');
    v.extend_from_slice(&1u32.to_le_bytes());
    v.push(0xff);
    let e = ImageExportReader::new(&v[..]).err().unwrap();
    assert!(
        matches!(
            e,
            Error::InvalidUtf8 {
                offset: 13,
                what: "image-meta value"
            }
        ),
        "{e:?}"
    );
    // Truncated header.
    let e = ImageExportReader::new(&b"rbd image v2\nO\x08\x00"[..]).err().unwrap();
    assert!(
        matches!(
            e,
            Error::Truncated {
                offset: 13,
                eof_at: 16,
                ..
            }
        ),
        "{e:?}"
    );
    // Embedded diff with a v1 banner.
    let mut v = image_prefix(1);
    let at = v.len() as u64;
    v.extend_from_slice(&B::v1().s(1).e().v);
    let mut r = ImageExportReader::new(&v[..]).unwrap();
    let e = r.next_diff().err().unwrap();
    assert!(matches!(e, Error::UnknownBanner { offset, .. } if offset == at), "{e:?}");
    let e = r.next_diff().err().unwrap();
    assert!(matches!(e, Error::Poisoned { .. }), "{e:?}");
    // Error offsets inside an embedded diff are absolute.
    let mut v = image_prefix(1);
    let b = B::v2().s(10);
    let at = v.len() as u64 + b.pos();
    v.extend_from_slice(&b.z(5, 6).e().v);
    let mut r = ImageExportReader::new(&v[..]).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    let e = d.next_event().unwrap_err();
    assert!(matches!(e, Error::ExtentBeyondImage { offset, .. } if offset == at), "{e:?}");
    // Trailing bytes after the last diff.
    let mut v = image_prefix(1);
    v.extend_from_slice(&B::v2().s(10).e().v);
    let at = v.len() as u64;
    v.push(0);
    let mut r = ImageExportReader::new(&v[..]).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    assert_eq!(d.next_event().unwrap(), crate::Event::End);
    drop(d);
    let e = r.next_diff().err().unwrap();
    assert!(matches!(e, Error::TrailingBytes { offset } if offset == at), "{e:?}");
    // Fewer diffs than declared: the missing one is truncated.
    let mut v = image_prefix(2);
    v.extend_from_slice(&B::v2().s(10).e().v);
    let at = v.len() as u64;
    let mut r = ImageExportReader::new(&v[..]).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    assert_eq!(d.next_event().unwrap(), crate::Event::End);
    drop(d);
    let e = r.next_diff().err().unwrap();
    assert!(
        matches!(e, Error::Truncated { offset, what: "banner", .. } if offset == at),
        "{e:?}"
    );
}

#[test]
fn incomplete_diff() {
    let mut v = image_prefix(2);
    let b = B::v2().s(10);
    let at = v.len() as u64 + b.pos();
    v.extend_from_slice(&b.w(0, b"abc").e().v);
    v.extend_from_slice(&B::v2().s(10).e().v);
    let mut r = ImageExportReader::with_max_piece(&v[..], 2).unwrap();
    let mut d = r.next_diff().unwrap().unwrap();
    d.next_event().unwrap(); // first piece "ab" only
    drop(d);
    let e = r.next_diff().err().unwrap();
    assert!(matches!(e, Error::IncompleteDiff { .. }), "{e:?}");
    // The offset is where reading stopped: after "ab" of the w payload.
    assert_eq!(e.offset(), Some(at + 25 + 2));
}

#[test]
fn container_writer_misuse() {
    let mut w = ImageExportWriter::new(Vec::new(), &ImageHeader::default(), 1).unwrap();
    let e = ImageExportWriter::new(Vec::new(), &ImageHeader::default(), 1)
        .unwrap()
        .finish()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::DiffCountMismatch {
                offset: 41,
                declared: 1,
                written: 0
            }
        ),
        "{e:?}"
    );
    w.write_diff(&header(1), false, |_| Ok(())).unwrap();
    let pos = w.position();
    let e = w.write_diff(&header(1), false, |_| Ok(())).unwrap_err();
    assert!(
        matches!(e, Error::DiffCountMismatch { offset, declared: 1, written: 2 } if offset == pos),
        "{e:?}"
    );
    // An error inside a diff poisons the container writer.
    let mut w = ImageExportWriter::new(Vec::new(), &ImageHeader::default(), 2).unwrap();
    let e = w.write_diff(&header(1), false, |d| d.write_zero(0, 2)).unwrap_err();
    assert!(matches!(e, Error::ExtentBeyondImage { .. }), "{e:?}");
    let e = w.write_diff(&header(1), false, |_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::Poisoned { .. }), "{e:?}");
}
