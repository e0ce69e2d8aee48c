//! Rough read throughput on large `w` records from memory:
//! `cargo run --release -p rbd-diff --example throughput`.

use std::time::Instant;

use rbd_diff::{DiffHeader, DiffReader, DiffWriter, Event};

fn main() -> Result<(), rbd_diff::Error> {
    let record = 16 << 20;
    let records = 16u64;
    let header = DiffHeader {
        image_size: records * record as u64,
        ..Default::default()
    };
    let payload = vec![0x5au8; record];
    let mut w = DiffWriter::new(Vec::with_capacity(records as usize * record + 4096), &header)?;
    for i in 0..records {
        w.write_data(i * record as u64, &payload)?;
    }
    let stream = w.finish()?;

    for max_piece in [64 << 10, 1 << 20, 4 << 20] {
        let rounds = 8;
        let start = Instant::now();
        let mut sum = 0u64;
        for _ in 0..rounds {
            let mut r = DiffReader::with_max_piece(&stream[..], max_piece)?;
            loop {
                match r.next_event()? {
                    Event::Data { data, .. } => sum += data.len() as u64 + u64::from(data[0]),
                    Event::Zero { .. } => {}
                    Event::End => break,
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let gb = (stream.len() * rounds) as f64 / 1e9;
        println!("max_piece {:>8}: {:.2} GB/s ({sum})", max_piece, gb / secs);
    }
    Ok(())
}
