#![no_main]
//! Feeds arbitrary bytes to `DiffReader` and reads every event up to `End` or an error.

use libfuzzer_sys::fuzz_target;
use rbd_diff::{DiffReader, Event};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size, so splitting is exercised too.
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
    loop {
        match reader.next_event() {
            Ok(Event::Data { offset, data }) => {
                assert!(data.len() <= max_piece);
                assert!(offset >= prev_end);
                prev_end = offset + data.len() as u64;
            }
            Ok(Event::Zero { offset, length }) => {
                assert!(offset >= prev_end);
                prev_end = offset + length;
            }
            Ok(Event::End) => {
                // A standalone stream ends exactly at the end of the input.
                assert_eq!(reader.position(), stream.len() as u64);
                break;
            }
            Err(_) => break,
        }
        assert!(prev_end <= image_size);
        assert!(reader.position() <= stream.len() as u64);
    }
});
