//! `ferry prune`: apply a retention policy (keep options) and forget what it does not keep.

use anyhow::Result;
use clap::Args;
use ferry_repo::retention::KeepPolicy;

use crate::args::RepoArgs;
use crate::errors::exit;
use crate::output::{print_json, Progress};

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("keep").multiple(true).required(true)
    .args(["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_within"])))]
pub struct PruneArgs {
    /// Volumes to prune (default: every volume).
    volumes: Vec<String>,
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have backups (UTC).
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days that have backups (UTC).
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks that have backups.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months that have backups.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years that have backups.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every backup within this long of the volume's newest backup: e.g. 36h, 7d, 2w,
    /// 1y6m (units: h, d, w, m = 30 days, y = 365 days).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_within: Option<chrono::Duration>,
    /// Say what would be removed and why every kept backup is kept; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the decisions as JSON.
    #[arg(long)]
    json: bool,
}

/// `36h`, `7d`, `2w`, `1y6m` ([`ferry_repo::retention::parse_period`]).
pub fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    ferry_repo::retention::parse_period(s)
}

pub async fn run(a: PruneArgs, r: RepoArgs) -> Result<u8> {
    let policy = KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
    };
    let engine = r.engine(Progress::new(a.json)).await?;
    let report = engine.prune(&a.volumes, &policy, a.dry_run).await?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = serde_json::to_value(engine.repository().store().requests())?;
        print_json(&v)?;
    } else {
        for (volume, fates) in &report.volumes {
            println!("volume '{volume}':");
            for f in fates {
                let why: Vec<String> = f.reasons.iter().map(|r| r.to_string()).collect();
                println!(
                    "  {:<6} {} {} {:<28} {}",
                    if f.keep {
                        "keep"
                    } else if a.dry_run {
                        "would remove"
                    } else {
                        "remove"
                    },
                    f.backup_id,
                    f.created.format("%Y-%m-%d %H:%M:%S"),
                    f.to_snap.as_deref().unwrap_or("-"),
                    why.join(", ")
                );
            }
        }
        for u in &report.unreadable {
            println!("unreadable, left alone: {u}");
        }
        println!(
            "{} backup(s) kept, {} {}{}",
            report.kept,
            report.removed,
            if a.dry_run {
                "would be removed (dry run: nothing was deleted)"
            } else {
                "removed"
            },
            if !a.dry_run && report.removed > 0 {
                "; their chunks stay until a garbage collection finds them unused"
            } else {
                ""
            }
        );
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("36h").unwrap(), chrono::Duration::hours(36));
        assert_eq!(parse_duration("1y6m").unwrap(), chrono::Duration::days(365 + 180));
        assert_eq!(parse_duration("2w1d").unwrap(), chrono::Duration::days(15));
        for bad in ["", "7", "d", "7x", "-1d", "99999999999999999y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
