//! Output helpers: sizes, JSON, and the progress bars that observe the engine.

use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Result;
use ferry_engine::{Event, Observer};

/// Parses sizes like 4194304, 4M, 4MiB, 1G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    ferry_worker::units::parse_size(s)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Draws a byte progress bar on stderr (when it is a terminal and not in `--json` mode) and
/// prints the engine's warnings.
pub struct Progress {
    enabled: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress {
    pub fn new(quiet: bool) -> std::sync::Arc<Progress> {
        std::sync::Arc::new(Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        })
    }
}

impl Observer for Progress {
    fn event(&self, event: Event<'_>) {
        let Ok(mut bar) = self.bar.lock() else { return };
        match event {
            Event::Started { op, total } if self.enabled => {
                let pb = match total {
                    Some(t) => indicatif::ProgressBar::new(t),
                    None => indicatif::ProgressBar::new_spinner(),
                };
                let counts = matches!(op, ferry_engine::Operation::Gc | ferry_engine::Operation::Audit);
                let style = if total.is_some() && counts {
                    "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} eta {eta}"
                } else if total.is_some() {
                    "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
                } else {
                    "{msg} [{elapsed_precise}] {spinner} {bytes} {bytes_per_sec}"
                };
                if let Ok(st) = indicatif::ProgressStyle::with_template(style) {
                    pb.set_style(st);
                }
                pb.set_message(format!("{op:?}").to_lowercase());
                *bar = Some(pb);
            }
            Event::Progress { done, .. } => {
                if let Some(pb) = bar.as_ref() {
                    pb.set_position(done);
                }
            }
            Event::Finished { .. } => {
                if let Some(pb) = bar.take() {
                    pb.finish_and_clear();
                }
            }
            Event::Warning { message } => match bar.as_ref() {
                Some(pb) => pb.suspend(|| eprintln!("ferry: warning: {message}")),
                None => eprintln!("ferry: warning: {message}"),
            },
            _ => {}
        }
    }
}

/// One line saying what a run cost on the store.
pub fn requests_line(r: &ferry_repo::RequestStats) -> String {
    format!(
        "{} PUT, {} GET, {} HEAD, {} LIST, {} DELETE; {} up, {} down{}",
        r.put + r.parts,
        r.get,
        r.head,
        r.list,
        r.delete,
        human_bytes(r.bytes_up),
        human_bytes(r.bytes_down),
        if r.failed > 0 {
            format!("; {} failed", r.failed)
        } else {
            String::new()
        }
    )
}

/// This process's peak resident memory so far, in bytes (its own, not its children's: an
/// `rbd export-diff` it runs is not counted). `None` where it cannot be read.
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    None
}
