#![no_main]
//! Feeds arbitrary bytes to `DiffReader` and reads every event up to `End` or an error, then
//! reads the same bytes again through the record API (`next_record` / `read_data`, as the
//! backup does) and checks that both saw the same stream.

use libfuzzer_sys::fuzz_target;
use rbd_diff::{DiffReader, Event, Record};

/// What a reader saw, payload pieces joined: data runs and zero extents (how it ended is
/// compared apart: the end position or the error).
#[derive(Debug, PartialEq)]
enum Seen {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn push_data(seen: &mut Vec<Seen>, offset: u64, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if let Some(Seen::Data(o, d)) = seen.last_mut() {
        if *o + d.len() as u64 == offset {
            d.extend_from_slice(data);
            return;
        }
    }
    seen.push(Seen::Data(offset, data.to_vec()));
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size (events) and the read size (records), so splitting
    // is exercised too.
    let (max_piece, stream) = match data.split_first() {
        Some((b, rest)) => (usize::from(*b % 32) + 1, rest),
        None => (1, data),
    };
    let Ok(mut reader) = DiffReader::with_max_piece(stream, max_piece) else {
        return;
    };
    // The header is complete once the reader is constructed.
    let image_size = reader.header().image_size;
    let mut prev_end = 0u64;
    let mut by_events = Vec::new();
    let events_end = loop {
        match reader.next_event() {
            Ok(Event::Data { offset, data }) => {
                assert!(data.len() <= max_piece);
                assert!(offset >= prev_end);
                prev_end = offset + data.len() as u64;
                push_data(&mut by_events, offset, data);
            }
            Ok(Event::Zero { offset, length }) => {
                assert!(offset >= prev_end);
                prev_end = offset + length;
                by_events.push(Seen::Zero(offset, length));
            }
            Ok(Event::End) => {
                // A standalone stream ends exactly at the end of the input.
                assert_eq!(reader.position(), stream.len() as u64);
                break Ok(reader.position());
            }
            Err(e) => break Err(e.to_string()),
        }
        assert!(prev_end <= image_size);
        assert!(reader.position() <= stream.len() as u64);
    };

    let Ok(mut reader) = DiffReader::new(stream) else {
        panic!("the header parsed once and not the second time");
    };
    let mut by_records = Vec::new();
    let mut buf = vec![0u8; max_piece];
    let records_end = loop {
        match reader.next_record() {
            Ok(Record::Data { offset, len }) => {
                let want = len.min(buf.len() as u64) as usize;
                match reader.read_data(&mut buf) {
                    Ok(n) => {
                        assert_eq!(n, want);
                        assert_eq!(reader.record_remaining(), len - n as u64);
                        push_data(&mut by_records, offset, &buf[..n]);
                    }
                    Err(e) => break Err(e.to_string()),
                }
            }
            Ok(Record::Zero { offset, length }) => by_records.push(Seen::Zero(offset, length)),
            Ok(Record::End) => break Ok(reader.position()),
            Err(e) => break Err(e.to_string()),
        }
        assert!(reader.position() <= stream.len() as u64);
    };
    assert_eq!(events_end, records_end);
    assert_eq!(by_events, by_records);
});
