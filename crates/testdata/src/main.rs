//! `ferry-testdata`: writes the deterministic test volumes and diff streams used by the demo
//! and the benchmarks.
//!
//! ```text
//! ferry-testdata image SIZE SEED OUT                 raw image of mixed content (4 MiB blocks)
//! ferry-testdata full-diff IMAGE SNAP OUT            full export-diff of a raw image
//! ferry-testdata mutate IMAGE SEED WRITES FROM TO OUT  random 64 KiB writes into IMAGE (in place), incremental diff to OUT
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use ferry_testdata::{full_diff_of_image, write_image, Rng};
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

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: ferry-testdata image SIZE SEED OUT | full-diff IMAGE SNAP OUT | mutate IMAGE SEED WRITES FROM TO OUT";
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
