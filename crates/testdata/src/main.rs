//! `ferry-testdata`: writes the deterministic test volumes and diff streams used by the demo
//! and the benchmarks.
//!
//! ```text
//! ferry-testdata image SIZE SEED OUT                 raw image of mixed content (4 MiB blocks)
//! ferry-testdata full-diff IMAGE SNAP OUT            full export-diff of a raw image
//! ferry-testdata mutate IMAGE SEED WRITES FROM TO OUT  random 64 KiB writes into IMAGE (in place), incremental diff to OUT
//! ferry-testdata sparse-diff SIZE SEED DATA_BLOCKS SNAP OUT
//!                                                    full export-diff of a sparse volume: DATA_BLOCKS
//!                                                    scattered 4 MiB data blocks (content by ordinal), the rest never written
//! ferry-testdata sparse-incr SIZE SEED CHANGED FROM TO OUT
//!                                                    incremental diff of such a volume: CHANGED scattered
//!                                                    4 MiB blocks, 7 of 8 rewritten (`w`), 1 of 8 discarded (`z`)
//! ferry-testdata diff-json DIFF                     the extents of an export-diff stream as `rbd diff
//!                                                    --format json` prints them (Benji's hints format)
//! ferry-testdata kinds SIZE SEED                     block counts per content kind of `image SIZE SEED` (JSON)
//! ```
//! OUT may be `-` (stdout) for `sparse-diff` and `sparse-incr`, so a 1 TiB volume never needs
//! a file: `ferry-testdata sparse-diff 1T 7 256 s1 - | ferry backup --volume big --diff -`.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use ferry_testdata::{data_block_content, full_diff_of_image, kind_counts, scattered_blocks, write_image, Rng};
use rbd_diff::{DiffHeader, DiffWriter};

fn parse_size(s: &str) -> Option<u64> {
    let (n, m) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    n.parse::<u64>().ok()?.checked_mul(m)
}

/// Block size of the sparse volumes (RBD's default object size).
const SPARSE_BLOCK: u64 = 4 << 20;

/// A buffered file, or stdout for `-`.
fn output(path: &str) -> Result<Box<dyn Write>, String> {
    Ok(if path == "-" {
        Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
    } else {
        Box::new(BufWriter::with_capacity(
            1 << 20,
            File::create(path).map_err(|x| format!("{path}: {x}"))?,
        ))
    })
}

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: ferry-testdata image SIZE SEED OUT | full-diff IMAGE SNAP OUT | mutate IMAGE SEED WRITES FROM TO OUT\n       \
                 | sparse-diff SIZE SEED DATA_BLOCKS SNAP OUT | sparse-incr SIZE SEED CHANGED FROM TO OUT | kinds SIZE SEED | diff-json DIFF";
    let e = |x: std::io::Error| x.to_string();
    match args.first().map(String::as_str) {
        Some("image") if args.len() == 4 => {
            let size = parse_size(&args[1]).ok_or("bad SIZE")?;
            let seed: u64 = args[2].parse().map_err(|_| "bad SEED")?;
            let mut out = BufWriter::with_capacity(4 << 20, File::create(&args[3]).map_err(e)?);
            write_image(&mut out, size, 4 << 20, seed).map_err(e)?;
            out.flush().map_err(e)
        }
        Some("full-diff") if args.len() == 4 => {
            let f = File::open(&args[1]).map_err(e)?;
            let size = f.metadata().map_err(e)?.len();
            let out = BufWriter::with_capacity(4 << 20, File::create(&args[3]).map_err(e)?);
            let mut out = full_diff_of_image(&mut BufReader::with_capacity(4 << 20, f), size, 4 << 20, &args[2], out).map_err(e)?;
            out.flush().map_err(e)
        }
        Some("mutate") if args.len() == 7 => {
            let img = OpenOptions::new().read(true).write(true).open(&args[1]).map_err(e)?;
            let size = img.metadata().map_err(e)?.len();
            let seed: u64 = args[2].parse().map_err(|_| "bad SEED")?;
            let writes: u64 = args[3].parse().map_err(|_| "bad WRITES")?;
            let mut rng = Rng::new(seed);
            let len = 64u64 << 10;
            let mut offsets: Vec<u64> = (0..writes).map(|_| rng.below(size / len) * len).collect();
            offsets.sort();
            offsets.dedup();
            let mut buf = vec![0u8; len as usize];
            for &o in &offsets {
                rng.fill(&mut buf);
                img.write_all_at(&buf, o).map_err(e)?;
            }
            let header = DiffHeader {
                from_snap: Some(args[4].clone()),
                to_snap: Some(args[5].clone()),
                image_size: size,
                protected: None,
            };
            let out = BufWriter::new(File::create(&args[6]).map_err(e)?);
            let mut w = DiffWriter::new(out, &header).map_err(|x| x.to_string())?;
            let mut r = &img;
            for &o in &offsets {
                r.seek(SeekFrom::Start(o)).map_err(e)?;
                r.read_exact(&mut buf).map_err(e)?;
                w.write_data(o, &buf).map_err(|x| x.to_string())?;
            }
            w.finish().map_err(|x| x.to_string())?.flush().map_err(e)
        }
        Some("sparse-diff") if args.len() == 6 => {
            let size = parse_size(&args[1]).ok_or("bad SIZE")?;
            let seed: u64 = args[2].parse().map_err(|_| "bad SEED")?;
            let count: u64 = args[3].parse().map_err(|_| "bad DATA_BLOCKS")?;
            let header = DiffHeader {
                from_snap: None,
                to_snap: Some(args[4].clone()),
                image_size: size,
                protected: None,
            };
            let mut w = DiffWriter::new(output(&args[5])?, &header).map_err(|x| x.to_string())?;
            // Content follows the block's ordinal, not its position: volumes of different sizes
            // with the same SEED and DATA_BLOCKS hold the same data.
            for (n, i) in scattered_blocks(size.div_ceil(SPARSE_BLOCK), count, seed).into_iter().enumerate() {
                let off = i * SPARSE_BLOCK;
                let len = (size - off).min(SPARSE_BLOCK) as usize;
                let data = data_block_content(seed, n as u64, SPARSE_BLOCK as usize);
                w.write_data(off, &data[..len]).map_err(|x| x.to_string())?;
            }
            w.finish().map_err(|x| x.to_string())?.flush().map_err(e)
        }
        Some("sparse-incr") if args.len() == 7 => {
            let size = parse_size(&args[1]).ok_or("bad SIZE")?;
            let seed: u64 = args[2].parse().map_err(|_| "bad SEED")?;
            let count: u64 = args[3].parse().map_err(|_| "bad CHANGED")?;
            let header = DiffHeader {
                from_snap: Some(args[4].clone()),
                to_snap: Some(args[5].clone()),
                image_size: size,
                protected: None,
            };
            let mut w = DiffWriter::new(output(&args[6])?, &header).map_err(|x| x.to_string())?;
            // A different stream of positions and contents than the full diff's.
            let seed2 = seed ^ 0x5EED_0002;
            for (n, i) in scattered_blocks(size.div_ceil(SPARSE_BLOCK), count, seed2).into_iter().enumerate() {
                let off = i * SPARSE_BLOCK;
                let len = (size - off).min(SPARSE_BLOCK);
                if n % 8 == 7 {
                    w.write_zero(off, len).map_err(|x| x.to_string())?;
                } else {
                    let data = data_block_content(seed2, n as u64, SPARSE_BLOCK as usize);
                    w.write_data(off, &data[..len as usize]).map_err(|x| x.to_string())?;
                }
            }
            w.finish().map_err(|x| x.to_string())?.flush().map_err(e)
        }
        Some("diff-json") if args.len() == 2 => {
            let f = File::open(&args[1]).map_err(e)?;
            let mut r = rbd_diff::DiffReader::new(f).map_err(|x| x.to_string())?;
            // (offset, length, exists) with adjacent pieces of one `w` record merged.
            let mut extents: Vec<(u64, u64, bool)> = Vec::new();
            loop {
                let (offset, length, exists) = match r.next_event().map_err(|x| x.to_string())? {
                    rbd_diff::Event::Data { offset, data } => (offset, data.len() as u64, true),
                    rbd_diff::Event::Zero { offset, length } => (offset, length, false),
                    rbd_diff::Event::End => break,
                };
                match extents.last_mut() {
                    Some(last) if last.2 && exists && last.0 + last.1 == offset => last.1 += length,
                    _ => extents.push((offset, length, exists)),
                }
            }
            let items: Vec<String> = extents
                .iter()
                .map(|(o, l, x)| format!("{{\"offset\":{o},\"length\":{l},\"exists\":\"{x}\"}}"))
                .collect();
            println!("[{}]", items.join(","));
            Ok(())
        }
        Some("kinds") if args.len() == 3 => {
            let size = parse_size(&args[1]).ok_or("bad SIZE")?;
            let seed: u64 = args[2].parse().map_err(|_| "bad SEED")?;
            let [zero, binary, text, random] = kind_counts(size, 4 << 20, seed);
            println!(
                "{{\"block_size\":{},\"zero\":{zero},\"binary\":{binary},\"text\":{text},\"random\":{random}}}",
                4u64 << 20
            );
            Ok(())
        }
        _ => Err(usage.into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            eprintln!("ferry-testdata: {m}");
            ExitCode::FAILURE
        }
    }
}
