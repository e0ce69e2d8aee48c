#![no_main]
//! Feeds arbitrary bytes to `ImageExportReader` and reads every embedded diff to its end.

use libfuzzer_sys::fuzz_target;
use rbd_diff::{Event, ImageExportReader};

fuzz_target!(|data: &[u8]| {
    let (max_piece, stream) = match data.split_first() {
        Some((b, rest)) => (usize::from(*b % 32) + 1, rest),
        None => (1, data),
    };
    let Ok(mut reader) = ImageExportReader::with_max_piece(stream, max_piece) else {
        return;
    };
    let mut diffs = 0u64;
    loop {
        match reader.next_diff() {
            Ok(Some(mut diff)) => {
                diffs += 1;
                loop {
                    match diff.next_event() {
                        Ok(Event::Data { data, .. }) => assert!(data.len() <= max_piece),
                        Ok(Event::Zero { .. }) => {}
                        Ok(Event::End) | Err(_) => break,
                    }
                }
            }
            Ok(None) => {
                assert_eq!(diffs, reader.diff_count());
                assert_eq!(reader.position(), stream.len() as u64);
                break;
            }
            Err(_) => break,
        }
    }
});
