//! Retention: which backups of one volume a keep policy keeps, and why.
//!
//! A pure function, [`apply`], from a [`KeepPolicy`] and the volume's backups ([`Candidate`]s)
//! to one [`Decision`] per backup. No I/O and no repository access: `ferry prune` lists the
//! backups, asks this module, prints the decisions (`--dry-run`, `--json`) and deletes the
//! backups whose decision is "remove". Nova backup's "rotation" is `--keep-last`.
//!
//! # Semantics
//!
//! The model is restic's `forget` and Proxmox Backup Server's prune. Backups are ordered
//! newest first; then every rule of the policy is applied **independently** of the others, and
//! a backup is kept when at least one rule keeps it. Every rule that keeps a backup is recorded
//! as a [`Reason`], in a fixed order (the order of [`Reason`]'s variants).
//!
//! - **Newest**: the newest backup is always kept, whatever the policy says: it is the base of
//!   the next incremental backup.
//! - **Protected**: a backup marked protected is always kept. Protection only adds: the rules
//!   below see protected backups like any other, so protecting or unprotecting one backup
//!   never changes the decision for another (PBS, by contrast, lets protected backups take no
//!   part in the rules).
//! - **`last N`** keeps the N newest backups.
//! - **`hourly N`, `daily N`, `weekly N`, `monthly N`, `yearly N`**: walking the backups newest
//!   first, the first backup seen in a period — the newest backup of that period — is kept,
//!   until N periods have been counted. Only periods that hold a backup count: a week without
//!   backups does not use up one of the N weeks. Periods are computed in **UTC**: the hour
//!   (`2026-11-29T14`), the day (`2026-11-29`), the ISO 8601 week (`2026-W48`; weeks start on
//!   Monday and belong to the ISO week-numbering year, so 2026-12-31 and 2027-01-01 are both
//!   in `2026-W53`), the month (`2026-11`) and the year (`2026`).
//! - **`within D`** keeps every backup whose time is at most D before the **newest backup's**
//!   time (inclusive: a backup exactly D older than the newest is kept). The reference is the
//!   newest backup, not the clock, as in restic: if backups stop, prune never ages the last
//!   ones out.
//! - A count of 0 is allowed and means "this rule keeps nothing". A policy with no rule at all
//!   is refused ([`RetentionError::EmptyPolicy`]): it would delete everything but the newest
//!   backup, and an operator who forgot the options more likely meant nothing of the kind.
//!   (A policy whose every count is 0 is not empty: it says so on purpose.)
//!
//! **Order and ties.** The input may come in any order; the decisions come back in input
//! order, one per candidate, and do not depend on the input order. Backups are ordered by time
//! and, at equal times, by ID: of two backups with the same time, the one whose ID sorts last
//! (byte-wise string order) counts as the newer. That matches the order of manifest names
//! (`<time>-<backup id>`) in a listing. IDs must be unique ([`RetentionError::DuplicateId`]).
//!
//! # Example
//!
//! `--keep-last 2 --keep-daily 3 --keep-weekly 3 --keep-monthly 2`, backup `f` protected:
//!
//! | backup | time (UTC)       | ISO week | decision | reasons                                                  |
//! |--------|------------------|----------|----------|----------------------------------------------------------|
//! | a      | 2026-11-30 02:00 | 2026-W49 | keep     | newest, last, daily 2026-11-30, weekly 2026-W49, monthly 2026-11 |
//! | b      | 2026-11-29 14:00 | 2026-W48 | keep     | last, daily 2026-11-29, weekly 2026-W48                   |
//! | c      | 2026-11-29 02:00 | 2026-W48 | remove   | (day and week already kept by b)                          |
//! | d      | 2026-11-27 02:00 | 2026-W48 | keep     | daily 2026-11-27                                          |
//! | e      | 2026-11-22 02:00 | 2026-W47 | keep     | weekly 2026-W47                                           |
//! | f      | 2026-11-15 02:00 | 2026-W46 | keep     | protected                                                 |
//! | g      | 2026-10-31 02:00 | 2026-W44 | keep     | monthly 2026-10                                           |
//! | h      | 2026-10-30 02:00 | 2026-W44 | remove   | (the 3 days, 3 weeks and 2 months are used up)            |
//!
//! ```
//! use chrono::{TimeZone, Utc};
//! use ferry_repo::retention::{apply, Candidate, KeepPolicy, Reason};
//!
//! let policy = KeepPolicy { last: Some(1), daily: Some(2), ..KeepPolicy::default() };
//! let backups = [
//!     Candidate::new("b1", Utc.with_ymd_and_hms(2026, 11, 28, 2, 0, 0).unwrap()),
//!     Candidate::new("b2", Utc.with_ymd_and_hms(2026, 11, 29, 2, 0, 0).unwrap()),
//!     Candidate::new("b3", Utc.with_ymd_and_hms(2026, 11, 29, 14, 0, 0).unwrap()),
//! ];
//! let decisions = apply(&policy, &backups).unwrap();
//! assert_eq!(decisions[0].reasons, vec![Reason::Daily("2026-11-28".into())]);
//! assert!(!decisions[1].keep); // same day as b3, which is newer
//! assert_eq!(decisions[2].reasons, vec![Reason::Newest, Reason::Last, Reason::Daily("2026-11-29".into())]);
//! assert_eq!(decisions[2].reasons[2].to_string(), "daily 2026-11-29");
//! ```

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::{Deserialize, Serialize};

/// A keep policy: the `--keep-*` options of `ferry prune`. `None` means the option was not
/// given; `Some(0)` means it was given as 0 and keeps nothing. At least one option must be
/// given ([`KeepPolicy::is_empty`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// `--keep-last N`: the N newest backups.
    pub last: Option<u32>,
    /// `--keep-hourly N`: the newest backup of each of the N newest UTC hours that have backups.
    pub hourly: Option<u32>,
    /// `--keep-daily N`: the newest backup of each of the N newest UTC days that have backups.
    pub daily: Option<u32>,
    /// `--keep-weekly N`: the newest backup of each of the N newest ISO weeks that have backups.
    pub weekly: Option<u32>,
    /// `--keep-monthly N`: the newest backup of each of the N newest UTC months that have
    /// backups.
    pub monthly: Option<u32>,
    /// `--keep-yearly N`: the newest backup of each of the N newest UTC years that have backups.
    pub yearly: Option<u32>,
    /// `--keep-within D`: every backup at most D older than the newest backup. Must not be
    /// negative.
    pub within: Option<Duration>,
}

impl KeepPolicy {
    /// True when no option is given at all; [`apply`] refuses such a policy.
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.hourly.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
            && self.yearly.is_none()
            && self.within.is_none()
    }
}

/// A period as `--keep-within` and `--grace` take it: `36h`, `7d`, `2w`, `1y6m`: a sum of numbers with units h, d, w, m (30 days), y (365 days).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let mut total = Duration::zero();
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| format!("'{s}': a number must come before '{c}'"))?;
        num.clear();
        let hours = match c {
            'h' => 1,
            'd' => 24,
            'w' => 24 * 7,
            'm' => 24 * 30,
            'y' => 24 * 365,
            _ => return Err(format!("'{s}': unknown unit '{c}' (use h, d, w, m, y)")),
        };
        let part = n
            .checked_mul(hours)
            .and_then(Duration::try_hours)
            .ok_or_else(|| format!("'{s}' is too long"))?;
        total = total.checked_add(&part).ok_or_else(|| format!("'{s}' is too long"))?;
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!("'{s}' is not a duration: give a unit, e.g. 7d or 36h"));
    }
    Ok(total)
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The backup's identity, unique among the candidates (the backup ID or the manifest
    /// name). Breaks ties between equal times: the ID that sorts last counts as the newer.
    pub id: String,
    /// When the backup was taken.
    pub time: DateTime<Utc>,
    /// A protected backup is always kept.
    pub protected: bool,
    /// Its place in the volume's chain (higher is newer; [`crate::chain_order`]), which
    /// decides "newest" and "last" when every candidate has one — writers' clocks can be
    /// stepped back. Periods and `within` still go by `time`.
    #[serde(default)]
    pub rank: Option<u64>,
}

impl Candidate {
    /// An unprotected candidate.
    pub fn new(id: impl Into<String>, time: DateTime<Utc>) -> Candidate {
        Candidate {
            id: id.into(),
            time,
            protected: false,
            rank: None,
        }
    }
}

/// Why a backup is kept. A backup may be kept for several reasons; [`Decision::reasons`] lists
/// them all, in the order of these variants. Displays as `newest`, `protected`, `last`,
/// `hourly 2026-11-29T14`, `daily 2026-11-29`, `weekly 2026-W48`, `monthly 2026-11`,
/// `yearly 2026` and `within`; serializes as `{"rule":"daily","period":"2026-11-29"}` (no
/// `period` for the rules without one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "rule", content = "period", rename_all = "snake_case")]
pub enum Reason {
    /// The newest backup: always kept, it is the base of the next incremental.
    Newest,
    /// The backup is protected.
    Protected,
    /// One of the `--keep-last` newest backups.
    Last,
    /// The newest backup of this UTC hour, `YYYY-MM-DDTHH`.
    Hourly(String),
    /// The newest backup of this UTC day, `YYYY-MM-DD`.
    Daily(String),
    /// The newest backup of this ISO 8601 week, `YYYY-Www` (ISO week-numbering year).
    Weekly(String),
    /// The newest backup of this UTC month, `YYYY-MM`.
    Monthly(String),
    /// The newest backup of this UTC year, `YYYY`.
    Yearly(String),
    /// Within `--keep-within` of the newest backup.
    Within,
}

impl Reason {
    /// The rule's name: `newest`, `protected`, `last`, `hourly`, `daily`, `weekly`, `monthly`,
    /// `yearly` or `within`.
    pub fn rule(&self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::Protected => "protected",
            Reason::Last => "last",
            Reason::Hourly(_) => "hourly",
            Reason::Daily(_) => "daily",
            Reason::Weekly(_) => "weekly",
            Reason::Monthly(_) => "monthly",
            Reason::Yearly(_) => "yearly",
            Reason::Within => "within",
        }
    }

    /// The period the backup is the newest of, for the period rules.
    pub fn period(&self) -> Option<&str> {
        match self {
            Reason::Hourly(p) | Reason::Daily(p) | Reason::Weekly(p) | Reason::Monthly(p) | Reason::Yearly(p) => Some(p),
            Reason::Newest | Reason::Protected | Reason::Last | Reason::Within => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period() {
            Some(period) => write!(f, "{} {period}", self.rule()),
            None => f.write_str(self.rule()),
        }
    }
}

/// What happens to one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The candidate's ID.
    pub id: String,
    /// Kept (true) or to be removed (false); true exactly when `reasons` is not empty.
    pub keep: bool,
    /// Every reason the backup is kept for, in the order of [`Reason`]'s variants; empty for a
    /// backup to be removed.
    pub reasons: Vec<Reason>,
}

/// Why [`apply`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// The policy has no keep option at all. Refused rather than deleting every backup but the
    /// newest.
    #[error("no keep option given (--keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly or --keep-within); refusing to remove every backup but the newest")]
    EmptyPolicy,
    /// `within` is negative.
    #[error("--keep-within must not be negative (got {0})")]
    NegativeWithin(Duration),
    /// Two candidates have the same ID.
    #[error("backup '{0}' is listed twice")]
    DuplicateId(String),
}

/// The calendar periods of the period rules.
#[derive(Debug, Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The period `time` falls in, as shown in [`Reason`]. Distinct periods give distinct
    /// strings, and each period is one contiguous stretch of time.
    fn of(self, time: DateTime<Utc>) -> String {
        match self {
            Period::Hour => time.format("%Y-%m-%dT%H").to_string(),
            Period::Day => time.format("%Y-%m-%d").to_string(),
            Period::Week => {
                let week = time.iso_week();
                format!("{:04}-W{:02}", week.year(), week.week())
            }
            Period::Month => time.format("%Y-%m").to_string(),
            Period::Year => format!("{:04}", time.year()),
        }
    }

    fn reason(self, period: String) -> Reason {
        match self {
            Period::Hour => Reason::Hourly(period),
            Period::Day => Reason::Daily(period),
            Period::Week => Reason::Weekly(period),
            Period::Month => Reason::Monthly(period),
            Period::Year => Reason::Yearly(period),
        }
    }
}

/// Newest first: later time first, then (at equal times) the ID that sorts last first.
fn newest_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id))
}

/// Newest first by rank (every candidate has one), then as [`newest_first`].
fn newest_first_ranked(a: &Candidate, b: &Candidate) -> Ordering {
    b.rank.cmp(&a.rank).then_with(|| newest_first(a, b))
}

/// Decides, for every backup, whether `policy` keeps it and why (see the module docs for the
/// rules). Returns one [`Decision`] per candidate, in input order. An empty list of candidates
/// gives an empty list of decisions.
pub fn apply(policy: &KeepPolicy, backups: &[Candidate]) -> Result<Vec<Decision>, RetentionError> {
    if policy.is_empty() {
        return Err(RetentionError::EmptyPolicy);
    }
    if let Some(within) = policy.within {
        if within < Duration::zero() {
            return Err(RetentionError::NegativeWithin(within));
        }
    }
    let mut seen = HashSet::with_capacity(backups.len());
    for b in backups {
        if !seen.insert(b.id.as_str()) {
            return Err(RetentionError::DuplicateId(b.id.clone()));
        }
    }

    // Indices into `backups`, newest first. IDs are unique, so the order is total.
    let mut order: Vec<usize> = (0..backups.len()).collect();
    if backups.iter().all(|b| b.rank.is_some()) {
        order.sort_by(|&a, &b| newest_first_ranked(&backups[a], &backups[b]));
    } else {
        order.sort_by(|&a, &b| newest_first(&backups[a], &backups[b]));
    }

    // The rules run in the order of Reason's variants, so each list comes out in that order.
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); backups.len()];
    if let Some(&newest) = order.first() {
        reasons[newest].push(Reason::Newest);
    }
    for (i, b) in backups.iter().enumerate() {
        if b.protected {
            reasons[i].push(Reason::Protected);
        }
    }
    if let Some(n) = policy.last {
        for &i in order.iter().take(n as usize) {
            reasons[i].push(Reason::Last);
        }
    }
    let period_rules = [
        (policy.hourly, Period::Hour),
        (policy.daily, Period::Day),
        (policy.weekly, Period::Week),
        (policy.monthly, Period::Month),
        (policy.yearly, Period::Year),
    ];
    for (count, period) in period_rules {
        let Some(count) = count else { continue };
        // Newest first, the backups of one period are adjacent: a period is a contiguous
        // stretch of time. The first of each run is that period's newest backup.
        let mut counted = 0u32;
        let mut previous: Option<String> = None;
        for &i in &order {
            if counted >= count {
                break;
            }
            let current = period.of(backups[i].time);
            if previous.as_ref() != Some(&current) {
                reasons[i].push(period.reason(current.clone()));
                counted += 1;
                previous = Some(current);
            }
        }
    }
    if let (Some(within), Some(&newest)) = (policy.within, order.first()) {
        let newest = backups[newest].time;
        for (i, b) in backups.iter().enumerate() {
            if newest.signed_duration_since(b.time) <= within {
                reasons[i].push(Reason::Within);
            }
        }
    }

    Ok(backups
        .iter()
        .zip(reasons)
        .map(|(b, reasons)| Decision {
            id: b.id.clone(),
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, NaiveDateTime, TimeZone};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// `"2026-11-29 14:05"` or `"2026-11-29 14:05:07"`, UTC.
    fn t(s: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
            .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M"))
            .unwrap_or_else(|e| panic!("bad test time {s:?}: {e}"))
            .and_utc()
    }

    fn policy() -> KeepPolicy {
        KeepPolicy::default()
    }

    fn days(n: i64) -> Duration {
        Duration::days(n)
    }

    /// Runs `policy` over the rows `(id, time, expected reasons joined by ", ")`, with the IDs
    /// in `protected` protected; "" expects removal. Checks every row, then fails with the
    /// whole table.
    fn check_with(policy: &KeepPolicy, protected: &[&str], rows: &[(&str, &str, &str)]) {
        let backups: Vec<Candidate> = rows
            .iter()
            .map(|&(id, time, _)| Candidate {
                id: id.into(),
                time: t(time),
                protected: protected.contains(&id),
                rank: None,
            })
            .collect();
        let decisions = apply(policy, &backups).expect("policy applies");
        assert_eq!(decisions.len(), rows.len());
        let mut failures = Vec::new();
        for ((id, time, want), d) in rows.iter().zip(&decisions) {
            assert_eq!(&d.id, id, "decisions are in input order");
            assert_eq!(d.keep, !d.reasons.is_empty(), "{id}: keep <=> reasons");
            let got = d.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
            if got != *want {
                failures.push(format!("  {id} {time}: want [{want}], got [{got}]"));
            }
        }
        assert!(
            failures.is_empty(),
            "policy {policy:?}, protected {protected:?}:\n{}",
            failures.join("\n")
        );
    }

    fn check(policy: &KeepPolicy, rows: &[(&str, &str, &str)]) {
        check_with(policy, &[], rows)
    }

    // ----- the module docs' example ------------------------------------------------------

    #[test]
    fn module_doc_example() {
        let p = KeepPolicy {
            last: Some(2),
            daily: Some(3),
            weekly: Some(3),
            monthly: Some(2),
            ..policy()
        };
        check_with(
            &p,
            &["f"],
            &[
                (
                    "a",
                    "2026-11-30 02:00",
                    "newest, last, daily 2026-11-30, weekly 2026-W49, monthly 2026-11",
                ),
                ("b", "2026-11-29 14:00", "last, daily 2026-11-29, weekly 2026-W48"),
                ("c", "2026-11-29 02:00", ""),
                ("d", "2026-11-27 02:00", "daily 2026-11-27"),
                ("e", "2026-11-22 02:00", "weekly 2026-W47"),
                ("f", "2026-11-15 02:00", "protected"),
                ("g", "2026-10-31 02:00", "monthly 2026-10"),
                ("h", "2026-10-30 02:00", ""),
            ],
        );
    }

    // ----- keep-last ---------------------------------------------------------------------

    #[test]
    fn keep_last() {
        let rows = |n: u32| {
            let p = KeepPolicy { last: Some(n), ..policy() };
            (
                p,
                [
                    "2026-11-29 05:00",
                    "2026-11-29 04:00",
                    "2026-11-29 03:00",
                    "2026-11-28 03:00",
                    "2026-01-01 00:00",
                ],
            )
        };
        let (p, times) = rows(3);
        check(
            &p,
            &[
                ("a", times[0], "newest, last"),
                ("b", times[1], "last"),
                ("c", times[2], "last"),
                ("d", times[3], ""),
                ("e", times[4], ""),
            ],
        );
        let (p, times) = rows(1);
        check(
            &p,
            &[
                ("a", times[0], "newest, last"),
                ("b", times[1], ""),
                ("c", times[2], ""),
                ("d", times[3], ""),
                ("e", times[4], ""),
            ],
        );
        // More than there are: all kept.
        let (p, times) = rows(10);
        check(
            &p,
            &[
                ("a", times[0], "newest, last"),
                ("b", times[1], "last"),
                ("c", times[2], "last"),
                ("d", times[3], "last"),
                ("e", times[4], "last"),
            ],
        );
        // Exactly as many.
        let (p, times) = rows(5);
        check(
            &p,
            &[
                ("a", times[0], "newest, last"),
                ("b", times[1], "last"),
                ("c", times[2], "last"),
                ("d", times[3], "last"),
                ("e", times[4], "last"),
            ],
        );
    }

    #[test]
    fn keep_last_ignores_periods_and_gaps() {
        // Nova's rotation: the N newest, however far apart.
        check(
            &KeepPolicy { last: Some(2), ..policy() },
            &[
                ("a", "2020-01-01 00:00", "last"),
                ("b", "2026-11-29 05:00", "newest, last"),
                ("c", "2019-06-01 00:00", ""),
            ],
        );
    }

    // ----- hourly ------------------------------------------------------------------------

    #[test]
    fn keep_hourly() {
        check(
            &KeepPolicy {
                hourly: Some(3),
                ..policy()
            },
            &[
                ("a", "2026-11-29 14:59:59", "newest, hourly 2026-11-29T14"),
                ("b", "2026-11-29 14:30", ""),
                ("c", "2026-11-29 14:00", ""),
                ("d", "2026-11-29 13:59:59", "hourly 2026-11-29T13"),
                // 12:00–12:59 has no backup: it does not count.
                ("e", "2026-11-29 11:45", "hourly 2026-11-29T11"),
                ("f", "2026-11-29 11:15", ""),
                ("g", "2026-11-29 10:00", ""),
            ],
        );
        // Across midnight, and the hour keys include the day.
        check(
            &KeepPolicy {
                hourly: Some(2),
                ..policy()
            },
            &[
                ("a", "2026-11-30 00:00", "newest, hourly 2026-11-30T00"),
                ("b", "2026-11-29 23:59", "hourly 2026-11-29T23"),
                ("c", "2026-11-28 23:30", ""),
            ],
        );
        // Same hour of the clock on different days are different periods.
        check(
            &KeepPolicy {
                hourly: Some(5),
                ..policy()
            },
            &[
                ("a", "2026-11-29 14:10", "newest, hourly 2026-11-29T14"),
                ("b", "2026-11-28 14:10", "hourly 2026-11-28T14"),
                ("c", "2026-11-27 14:10", "hourly 2026-11-27T14"),
            ],
        );
    }

    // ----- daily -------------------------------------------------------------------------

    #[test]
    fn keep_daily() {
        check(
            &KeepPolicy {
                daily: Some(3),
                ..policy()
            },
            &[
                ("a", "2026-11-29 23:59:59", "newest, daily 2026-11-29"),
                ("b", "2026-11-29 12:00", ""),
                ("c", "2026-11-29 00:00", ""),
                ("d", "2026-11-28 23:59:59", "daily 2026-11-28"),
                ("e", "2026-11-28 00:00", ""),
                // 11-27 .. 11-25 have no backups and do not count.
                ("f", "2026-11-24 18:00", "daily 2026-11-24"),
                ("g", "2026-11-24 06:00", ""),
                ("h", "2026-11-23 18:00", ""),
                ("i", "2025-11-23 18:00", ""),
            ],
        );
        // Fewer days with backups than the count: one per day, all days.
        check(
            &KeepPolicy {
                daily: Some(7),
                ..policy()
            },
            &[
                ("a", "2026-11-29 02:00", "newest, daily 2026-11-29"),
                ("b", "2026-11-29 01:00", ""),
                ("c", "2026-10-01 02:00", "daily 2026-10-01"),
                ("d", "2024-02-29 02:00", "daily 2024-02-29"),
            ],
        );
    }

    #[test]
    fn periods_are_utc() {
        // 00:30 at UTC+01:00 on the 30th is 23:30 UTC on the 29th; 23:30 at UTC-05:00 on the
        // 29th is 04:30 UTC on the 30th.
        let east = FixedOffset::east_opt(3600)
            .unwrap()
            .with_ymd_and_hms(2026, 11, 30, 0, 30, 0)
            .unwrap();
        let west = FixedOffset::west_opt(5 * 3600)
            .unwrap()
            .with_ymd_and_hms(2026, 11, 29, 23, 30, 0)
            .unwrap();
        let backups = [
            Candidate::new("east", east.with_timezone(&Utc)),
            Candidate::new("west", west.with_timezone(&Utc)),
        ];
        let d = apply(
            &KeepPolicy {
                daily: Some(5),
                hourly: Some(5),
                ..policy()
            },
            &backups,
        )
        .unwrap();
        assert_eq!(
            d[0].reasons,
            vec![Reason::Hourly("2026-11-29T23".into()), Reason::Daily("2026-11-29".into())]
        );
        assert_eq!(
            d[1].reasons,
            vec![
                Reason::Newest,
                Reason::Hourly("2026-11-30T04".into()),
                Reason::Daily("2026-11-30".into())
            ]
        );
    }

    // ----- weekly ------------------------------------------------------------------------

    #[test]
    fn keep_weekly() {
        // 2026-11-30 is a Monday; weeks run Monday..Sunday.
        check(
            &KeepPolicy {
                weekly: Some(3),
                ..policy()
            },
            &[
                ("a", "2026-11-30 00:00", "newest, weekly 2026-W49"),
                ("b", "2026-11-29 23:59:59", "weekly 2026-W48"),
                ("c", "2026-11-23 00:00", ""),
                // W47 (11-16..11-22) and W46 have no backups.
                ("d", "2026-11-08 12:00", "weekly 2026-W45"),
                ("e", "2026-11-02 12:00", ""),
                ("f", "2026-11-01 12:00", ""),
            ],
        );
    }

    #[test]
    fn keep_weekly_iso_year_boundaries() {
        // 2026 has 53 ISO weeks (1 January 2026 is a Thursday). Thursday 2026-12-31 and
        // Friday 2027-01-01 are both in 2026-W53, which runs Monday 2026-12-28 to Sunday
        // 2027-01-03; 2027-W01 starts Monday 2027-01-04. 2026-W01 started Monday 2025-12-29.
        check(
            &KeepPolicy {
                weekly: Some(10),
                ..policy()
            },
            &[
                ("a", "2027-01-04 00:00", "newest, weekly 2027-W01"),
                ("b", "2027-01-03 23:59:59", "weekly 2026-W53"),
                ("c", "2027-01-01 00:00", ""),
                ("d", "2026-12-31 23:59:59", ""),
                ("e", "2026-12-28 00:00", ""),
                ("f", "2026-12-27 23:59:59", "weekly 2026-W52"),
                ("g", "2026-01-04 12:00", "weekly 2026-W01"),
                ("h", "2025-12-29 00:00", ""),
                ("i", "2025-12-28 23:59:59", "weekly 2025-W52"),
                ("j", "2025-01-01 12:00", "weekly 2025-W01"),
                // Monday 2024-12-30 is already in 2025-W01.
                ("k", "2024-12-30 00:00", ""),
                ("l", "2024-12-29 12:00", "weekly 2024-W52"),
            ],
        );
        // The yearly rule, by contrast, splits 2026-12-31 and 2027-01-01.
        check(
            &KeepPolicy {
                weekly: Some(1),
                yearly: Some(2),
                ..policy()
            },
            &[
                ("a", "2027-01-01 00:00", "newest, weekly 2026-W53, yearly 2027"),
                ("b", "2026-12-31 23:59:59", "yearly 2026"),
            ],
        );
    }

    #[test]
    fn iso_week_keys() {
        for (time, week) in [
            ("2026-11-29 12:00", "2026-W48"),
            ("2026-12-31 12:00", "2026-W53"),
            ("2027-01-01 12:00", "2026-W53"),
            ("2027-01-03 12:00", "2026-W53"),
            ("2027-01-04 12:00", "2027-W01"),
            ("2025-12-29 12:00", "2026-W01"),
            ("2020-12-31 12:00", "2020-W53"),
            ("2021-01-03 12:00", "2020-W53"),
            ("2021-01-04 12:00", "2021-W01"),
            ("2008-12-29 12:00", "2009-W01"),
        ] {
            assert_eq!(Period::Week.of(t(time)), week, "{time}");
        }
    }

    // ----- monthly, yearly ---------------------------------------------------------------

    #[test]
    fn keep_monthly() {
        check(
            &KeepPolicy {
                monthly: Some(4),
                ..policy()
            },
            &[
                ("a", "2026-03-01 00:00", "newest, monthly 2026-03"),
                ("b", "2026-02-28 23:59:59", "monthly 2026-02"),
                ("c", "2026-02-01 00:00", ""),
                ("d", "2026-01-31 23:59:59", "monthly 2026-01"),
                // 2025-12 .. 2025-10 have no backups.
                ("e", "2025-09-30 12:00", "monthly 2025-09"),
                ("f", "2025-09-01 12:00", ""),
                ("g", "2025-08-31 12:00", ""),
            ],
        );
        // Leap day, and the December/January boundary.
        check(
            &KeepPolicy {
                monthly: Some(3),
                ..policy()
            },
            &[
                ("a", "2028-02-29 23:00", "newest, monthly 2028-02"),
                ("b", "2028-01-01 00:00", "monthly 2028-01"),
                ("c", "2027-12-31 23:59:59", "monthly 2027-12"),
                ("d", "2027-12-01 00:00", ""),
            ],
        );
    }

    #[test]
    fn keep_yearly() {
        check(
            &KeepPolicy {
                yearly: Some(3),
                ..policy()
            },
            &[
                ("a", "2027-01-01 00:00", "newest, yearly 2027"),
                ("b", "2026-12-31 23:59:59", "yearly 2026"),
                ("c", "2026-01-01 00:00", ""),
                // 2025 and 2024 have no backups.
                ("d", "2023-06-15 12:00", "yearly 2023"),
                ("e", "2023-01-01 00:00", ""),
                ("f", "2022-12-31 23:59:59", ""),
            ],
        );
    }

    // ----- within ------------------------------------------------------------------------

    #[test]
    fn keep_within() {
        check(
            &KeepPolicy {
                within: Some(days(2)),
                ..policy()
            },
            &[
                ("a", "2026-11-29 12:00", "newest, within"),
                ("b", "2026-11-28 12:00", "within"),
                // Exactly 2 days older: kept (inclusive).
                ("c", "2026-11-27 12:00", "within"),
                ("d", "2026-11-27 11:59:59", ""),
                ("e", "2026-01-01 00:00", ""),
            ],
        );
    }

    #[test]
    fn keep_within_is_relative_to_the_newest_backup_not_now() {
        // Years old, but within a day of the newest: nothing ages out when backups stop.
        check(
            &KeepPolicy {
                within: Some(days(1)),
                ..policy()
            },
            &[
                ("a", "2001-01-01 00:00", "within"),
                ("b", "2001-01-02 00:00", "newest, within"),
                ("c", "2000-12-30 23:00", ""),
            ],
        );
    }

    #[test]
    fn keep_within_zero_keeps_only_the_newest_instant() {
        check(
            &KeepPolicy {
                within: Some(Duration::zero()),
                ..policy()
            },
            &[
                ("a", "2026-11-29 12:00", "within"),
                ("b", "2026-11-29 12:00", "newest, within"),
                ("c", "2026-11-29 11:59:59", ""),
            ],
        );
    }

    // ----- combinations ------------------------------------------------------------------

    #[test]
    fn one_backup_kept_for_every_reason() {
        let p = KeepPolicy {
            last: Some(1),
            hourly: Some(1),
            daily: Some(1),
            weekly: Some(1),
            monthly: Some(1),
            yearly: Some(1),
            within: Some(Duration::hours(1)),
        };
        check_with(
            &p,
            &["a"],
            &[
                (
                    "a",
                    "2026-11-29 14:05",
                    "newest, protected, last, hourly 2026-11-29T14, daily 2026-11-29, weekly 2026-W48, monthly 2026-11, yearly 2026, within",
                ),
                ("b", "2026-11-29 13:30", "within"),
                ("c", "2026-11-29 13:00", ""),
            ],
        );
    }

    #[test]
    fn rules_are_independent() {
        // Each rule walks all backups newest first: the daily rule's days are counted from the
        // newest backup even though keep-last already keeps those backups (restic's rule, not
        // PBS's, where a period already kept by an earlier option is not counted again).
        let p = KeepPolicy {
            last: Some(3),
            daily: Some(2),
            monthly: Some(2),
            ..policy()
        };
        check(
            &p,
            &[
                ("a", "2026-11-29 03:00", "newest, last, daily 2026-11-29, monthly 2026-11"),
                ("b", "2026-11-28 03:00", "last, daily 2026-11-28"),
                ("c", "2026-11-27 03:00", "last"),
                ("d", "2026-11-26 03:00", ""),
                ("e", "2026-10-26 03:00", "monthly 2026-10"),
                ("f", "2026-09-26 03:00", ""),
            ],
        );
    }

    #[test]
    fn a_year_of_nightly_backups() {
        // Nightly at 02:00 UTC from 2026-01-01 to 2026-11-29; keep 7 daily, 4 weekly, 6 monthly.
        let start = t("2026-01-01 02:00");
        let backups: Vec<Candidate> = (0..333).map(|d| Candidate::new(format!("n{d:03}"), start + days(d))).collect();
        assert_eq!(backups.last().unwrap().time, t("2026-11-29 02:00"));
        let p = KeepPolicy {
            daily: Some(7),
            weekly: Some(4),
            monthly: Some(6),
            ..policy()
        };
        let decisions = apply(&p, &backups).unwrap();
        let kept: BTreeMap<String, String> = decisions
            .iter()
            .zip(&backups)
            .filter(|(d, _)| d.keep)
            .map(|(d, b)| {
                (
                    b.time.format("%Y-%m-%d").to_string(),
                    d.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
                )
            })
            .collect();
        let want: BTreeMap<String, String> = [
            ("2026-06-30", "monthly 2026-06"),
            ("2026-07-31", "monthly 2026-07"),
            ("2026-08-31", "monthly 2026-08"),
            ("2026-09-30", "monthly 2026-09"),
            ("2026-10-31", "monthly 2026-10"),
            ("2026-11-08", "weekly 2026-W45"),
            ("2026-11-15", "weekly 2026-W46"),
            ("2026-11-22", "weekly 2026-W47"),
            ("2026-11-23", "daily 2026-11-23"),
            ("2026-11-24", "daily 2026-11-24"),
            ("2026-11-25", "daily 2026-11-25"),
            ("2026-11-26", "daily 2026-11-26"),
            ("2026-11-27", "daily 2026-11-27"),
            ("2026-11-28", "daily 2026-11-28"),
            ("2026-11-29", "newest, daily 2026-11-29, weekly 2026-W48, monthly 2026-11"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(kept, want);
    }

    // ----- protected, newest -------------------------------------------------------------

    #[test]
    fn protected_backups_are_always_kept() {
        check_with(
            &KeepPolicy { last: Some(1), ..policy() },
            &["c", "e"],
            &[
                ("a", "2026-11-29 05:00", "newest, last"),
                ("b", "2026-11-29 04:00", ""),
                ("c", "2026-11-29 03:00", "protected"),
                ("d", "2020-01-01 00:00", ""),
                ("e", "2019-01-01 00:00", "protected"),
            ],
        );
    }

    #[test]
    fn protected_backups_take_part_in_the_rules() {
        // A protected backup is still its day's newest backup: it uses up that day, and the
        // next backup of that day is not kept in its place.
        let rows = [
            ("a", "2026-11-29 05:00", "newest, daily 2026-11-29"),
            ("b", "2026-11-28 05:00", "protected, daily 2026-11-28"),
            ("c", "2026-11-28 04:00", ""),
            ("d", "2026-11-27 04:00", ""),
        ];
        check_with(
            &KeepPolicy {
                daily: Some(2),
                ..policy()
            },
            &["b"],
            &rows,
        );
        // The newest can be protected too.
        check_with(
            &KeepPolicy { last: Some(0), ..policy() },
            &["a"],
            &[("a", "2026-11-29 05:00", "newest, protected"), ("b", "2026-11-28 05:00", "")],
        );
    }

    #[test]
    fn the_newest_backup_is_always_kept() {
        for p in [
            KeepPolicy { last: Some(0), ..policy() },
            KeepPolicy {
                daily: Some(0),
                ..policy()
            },
            KeepPolicy {
                within: Some(Duration::zero()),
                ..policy()
            },
            KeepPolicy {
                last: Some(0),
                hourly: Some(0),
                daily: Some(0),
                weekly: Some(0),
                monthly: Some(0),
                yearly: Some(0),
                within: None,
            },
        ] {
            let d = apply(
                &p,
                &[
                    Candidate::new("old", t("2026-01-01 00:00")),
                    Candidate::new("new", t("2026-11-29 00:00")),
                ],
            )
            .unwrap();
            assert!(d[1].keep, "{p:?}");
            assert_eq!(d[1].reasons[0], Reason::Newest, "{p:?}");
        }
        // A single backup.
        check(&KeepPolicy { last: Some(0), ..policy() }, &[("only", "2026-11-29 00:00", "newest")]);
    }

    // ----- zero counts -------------------------------------------------------------------

    #[test]
    fn zero_counts_keep_nothing() {
        let rows = [
            ("a", "2026-11-29 05:00", "newest"),
            ("b", "2026-11-28 05:00", ""),
            ("c", "2025-11-28 05:00", ""),
        ];
        check(
            &KeepPolicy {
                last: Some(0),
                hourly: Some(0),
                daily: Some(0),
                weekly: Some(0),
                monthly: Some(0),
                yearly: Some(0),
                within: None,
            },
            &rows,
        );
        // A zero rule next to a non-zero one: only the non-zero one keeps.
        check(
            &KeepPolicy {
                last: Some(0),
                daily: Some(2),
                ..policy()
            },
            &[
                ("a", "2026-11-29 05:00", "newest, daily 2026-11-29"),
                ("b", "2026-11-28 05:00", "daily 2026-11-28"),
                ("c", "2025-11-28 05:00", ""),
            ],
        );
    }

    // ----- ties, order -------------------------------------------------------------------

    #[test]
    fn ties_are_broken_by_id() {
        // Same time: the ID that sorts last is the newer.
        check(
            &KeepPolicy { last: Some(1), ..policy() },
            &[
                ("b", "2026-11-29 05:00", ""),
                ("c", "2026-11-29 05:00", "newest, last"),
                ("a", "2026-11-29 05:00", ""),
            ],
        );
        check(
            &KeepPolicy {
                last: Some(2),
                daily: Some(2),
                ..policy()
            },
            &[
                ("x", "2026-11-29 05:00", "newest, last, daily 2026-11-29"),
                ("m2", "2026-11-28 05:00", "last, daily 2026-11-28"),
                ("m1", "2026-11-28 05:00", ""),
                ("m10", "2026-11-28 05:00", ""), // "m10" < "m2" byte-wise
            ],
        );
        // Byte-wise, not case-insensitive: "B" < "a".
        check(
            &KeepPolicy { last: Some(1), ..policy() },
            &[("a", "2026-11-29 05:00", "newest, last"), ("B", "2026-11-29 05:00", "")],
        );
    }

    #[test]
    fn ranks_decide_newest_and_last_when_clocks_disagree() {
        // c and d were made after b, by a writer whose clock was a day behind.
        let c = |id: &str, time: &str, rank: u64| Candidate {
            id: id.into(),
            time: t(time),
            protected: false,
            rank: Some(rank),
        };
        let backups = vec![
            c("a", "2026-11-28 10:00", 0),
            c("b", "2026-11-29 10:00", 1),
            c("c", "2026-11-28 11:00", 2),
            c("d", "2026-11-28 12:00", 3),
        ];
        let keep = KeepPolicy {
            last: Some(1),
            ..KeepPolicy::default()
        };
        let d = apply(&keep, &backups).unwrap();
        let kept: Vec<&str> = d.iter().filter(|x| x.keep).map(|x| x.id.as_str()).collect();
        assert_eq!(kept, ["d"], "{d:?}");
        assert!(d[3].reasons.contains(&Reason::Newest));
        // Without ranks, time decides (as before).
        let unranked: Vec<Candidate> = backups
            .iter()
            .cloned()
            .map(|mut b| {
                b.rank = None;
                b
            })
            .collect();
        let d = apply(&keep, &unranked).unwrap();
        assert!(d[1].keep && !d[3].keep);
    }

    #[test]
    fn unsorted_input_gives_decisions_in_input_order() {
        check(
            &KeepPolicy {
                last: Some(2),
                monthly: Some(2),
                ..policy()
            },
            &[
                ("mid", "2026-10-15 00:00", ""),
                ("old", "2026-09-01 00:00", ""),
                ("new", "2026-11-29 00:00", "newest, last, monthly 2026-11"),
                ("oct-end", "2026-10-31 00:00", "monthly 2026-10"),
                ("second", "2026-11-28 00:00", "last"),
            ],
        );
    }

    // ----- refusals, edge cases ----------------------------------------------------------

    #[test]
    fn the_empty_policy_is_refused() {
        let one = [Candidate::new("a", t("2026-11-29 00:00"))];
        assert_eq!(apply(&KeepPolicy::default(), &one), Err(RetentionError::EmptyPolicy));
        assert_eq!(apply(&KeepPolicy::default(), &[]), Err(RetentionError::EmptyPolicy));
        assert!(KeepPolicy::default().is_empty());
        assert!(!KeepPolicy { last: Some(0), ..policy() }.is_empty());
        assert!(!KeepPolicy {
            within: Some(Duration::zero()),
            ..policy()
        }
        .is_empty());
        assert!(RetentionError::EmptyPolicy.to_string().contains("--keep-last"));
    }

    #[test]
    fn other_refusals() {
        let one = [Candidate::new("a", t("2026-11-29 00:00"))];
        assert_eq!(
            apply(
                &KeepPolicy {
                    within: Some(Duration::seconds(-1)),
                    ..policy()
                },
                &one
            ),
            Err(RetentionError::NegativeWithin(Duration::seconds(-1)))
        );
        let twice = [
            Candidate::new("a", t("2026-11-29 00:00")),
            Candidate::new("b", t("2026-11-28 00:00")),
            Candidate::new("a", t("2026-11-27 00:00")),
        ];
        assert_eq!(
            apply(&KeepPolicy { last: Some(1), ..policy() }, &twice),
            Err(RetentionError::DuplicateId("a".into()))
        );
    }

    #[test]
    fn no_backups_no_decisions() {
        assert_eq!(
            apply(
                &KeepPolicy {
                    last: Some(3),
                    within: Some(days(1)),
                    ..policy()
                },
                &[]
            ),
            Ok(vec![])
        );
    }

    // ----- Reason ------------------------------------------------------------------------

    #[test]
    fn reason_display_and_json() {
        let all = [
            (Reason::Newest, "newest", r#"{"rule":"newest"}"#),
            (Reason::Protected, "protected", r#"{"rule":"protected"}"#),
            (Reason::Last, "last", r#"{"rule":"last"}"#),
            (
                Reason::Hourly("2026-11-29T14".into()),
                "hourly 2026-11-29T14",
                r#"{"rule":"hourly","period":"2026-11-29T14"}"#,
            ),
            (
                Reason::Daily("2026-11-29".into()),
                "daily 2026-11-29",
                r#"{"rule":"daily","period":"2026-11-29"}"#,
            ),
            (
                Reason::Weekly("2026-W48".into()),
                "weekly 2026-W48",
                r#"{"rule":"weekly","period":"2026-W48"}"#,
            ),
            (
                Reason::Monthly("2026-11".into()),
                "monthly 2026-11",
                r#"{"rule":"monthly","period":"2026-11"}"#,
            ),
            (Reason::Yearly("2026".into()), "yearly 2026", r#"{"rule":"yearly","period":"2026"}"#),
            (Reason::Within, "within", r#"{"rule":"within"}"#),
        ];
        for (reason, display, json) in all {
            assert_eq!(reason.to_string(), display);
            assert_eq!(serde_json::to_string(&reason).unwrap(), json);
            assert_eq!(serde_json::from_str::<Reason>(json).unwrap(), reason);
        }
        let d = Decision {
            id: "b1".into(),
            keep: true,
            reasons: vec![Reason::Newest, Reason::Daily("2026-11-29".into())],
        };
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"id":"b1","keep":true,"reasons":[{"rule":"newest"},{"rule":"daily","period":"2026-11-29"}]}"#
        );
    }

    // ----- properties --------------------------------------------------------------------

    /// Up to 40 backups with unique IDs, times either crowded into a few hours (many ties and
    /// shared periods) or spread over about three years.
    fn arb_backups() -> impl Strategy<Value = Vec<Candidate>> {
        let minutes = prop_oneof![0i64..240, 0i64..1_600_000];
        proptest::collection::vec((minutes, any::<bool>(), 0u8..4), 0..40).prop_map(|rows| {
            let base = t("2025-06-01 00:00");
            rows.into_iter()
                .enumerate()
                // IDs of varying shape so that byte-wise order differs from index order.
                .map(|(i, (m, protected, shape))| Candidate {
                    rank: None,
                    id: match shape {
                        0 => format!("b{i}"),
                        1 => format!("B{}", 1000 - i),
                        2 => format!("x{:03}", (i * 7919) % 1000),
                        _ => format!("{i:02}"),
                    },
                    time: base + Duration::minutes(m),
                    protected: protected && i % 3 == 0,
                })
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = KeepPolicy> {
        let count = || proptest::option::of(0u32..6);
        (
            count(),
            count(),
            count(),
            count(),
            count(),
            count(),
            proptest::option::of(0i64..200_000),
        )
            .prop_map(|(last, hourly, daily, weekly, monthly, yearly, within)| KeepPolicy {
                last,
                hourly,
                daily,
                weekly,
                monthly,
                yearly,
                within: within.map(Duration::minutes),
            })
            .prop_filter("a policy with a rule", |p| !p.is_empty())
    }

    fn kept(decisions: &[Decision]) -> BTreeSet<String> {
        decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect()
    }

    fn newest(backups: &[Candidate]) -> Option<&Candidate> {
        backups.iter().max_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)))
    }

    /// Raises rule `which` (0..7) by `by` (a count by `by`, `within` by `by` hours); a missing
    /// rule is added.
    fn raise(p: &KeepPolicy, which: usize, by: u32) -> KeepPolicy {
        let mut p = *p;
        let up = |c: Option<u32>| Some(c.unwrap_or(0) + by);
        match which {
            0 => p.last = up(p.last),
            1 => p.hourly = up(p.hourly),
            2 => p.daily = up(p.daily),
            3 => p.weekly = up(p.weekly),
            4 => p.monthly = up(p.monthly),
            5 => p.yearly = up(p.yearly),
            _ => p.within = Some(p.within.unwrap_or(Duration::zero()) + Duration::hours(by.into())),
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn prop_well_formed(p in arb_policy(), backups in arb_backups()) {
            let decisions = apply(&p, &backups).unwrap();
            prop_assert_eq!(decisions.len(), backups.len());
            for (d, b) in decisions.iter().zip(&backups) {
                prop_assert_eq!(&d.id, &b.id);
                prop_assert_eq!(d.keep, !d.reasons.is_empty());
                // Each reason at most once (periods aside, each rule keeps a backup once).
                let rules: BTreeSet<&str> = d.reasons.iter().map(Reason::rule).collect();
                prop_assert_eq!(rules.len(), d.reasons.len());
                // Reasons in the order of the variants.
                let rank = |r: &Reason| ["newest", "protected", "last", "hourly", "daily", "weekly", "monthly", "yearly", "within"].iter().position(|n| *n == r.rule());
                prop_assert!(d.reasons.windows(2).all(|w| rank(&w[0]) < rank(&w[1])));
            }
            prop_assert_eq!(decisions.iter().filter(|d| d.reasons.contains(&Reason::Newest)).count(), usize::from(!backups.is_empty()));
        }

        #[test]
        fn prop_newest_and_protected_are_kept(p in arb_policy(), backups in arb_backups()) {
            let decisions = apply(&p, &backups).unwrap();
            if let Some(n) = newest(&backups) {
                let d = decisions.iter().find(|d| d.id == n.id).unwrap();
                prop_assert!(d.keep);
                prop_assert_eq!(&d.reasons[0], &Reason::Newest);
            }
            for (d, b) in decisions.iter().zip(&backups) {
                prop_assert_eq!(d.reasons.contains(&Reason::Protected), b.protected);
                prop_assert!(!b.protected || d.keep);
            }
        }

        #[test]
        fn prop_monotonic_in_every_rule(p in arb_policy(), backups in arb_backups(), which in 0usize..7, by in 1u32..5) {
            let before = kept(&apply(&p, &backups).unwrap());
            let after = kept(&apply(&raise(&p, which, by), &backups).unwrap());
            prop_assert!(before.is_subset(&after), "raising rule {} by {} removed {:?}", which, by, before.difference(&after).collect::<Vec<_>>());
        }

        #[test]
        fn prop_last_keeps_the_n_newest(n in 0u32..50, backups in arb_backups()) {
            let decisions = apply(&KeepPolicy { last: Some(n), ..KeepPolicy::default() }, &backups).unwrap();
            let want = (n as usize).min(backups.len());
            prop_assert!(kept(&decisions).len() >= want);
            prop_assert_eq!(decisions.iter().filter(|d| d.reasons.contains(&Reason::Last)).count(), want);
            // Every backup kept by `last` is newer than every backup not kept by it.
            let mut sorted = backups.clone();
            sorted.sort_by(newest_first);
            let newest_n: BTreeSet<&str> = sorted.iter().take(want).map(|b| b.id.as_str()).collect();
            for d in &decisions {
                prop_assert_eq!(d.reasons.contains(&Reason::Last), newest_n.contains(d.id.as_str()));
            }
        }

        #[test]
        fn prop_independent_of_input_order(p in arb_policy(), (backups, shuffled) in arb_backups().prop_flat_map(|b| (Just(b.clone()), Just(b).prop_shuffle()))) {
            let by_id = |bs: &[Candidate]| apply(&p, bs).unwrap().into_iter().map(|d| (d.id.clone(), d)).collect::<BTreeMap<_, _>>();
            prop_assert_eq!(by_id(&backups), by_id(&shuffled));
            // And in input order.
            let order: Vec<String> = apply(&p, &shuffled).unwrap().into_iter().map(|d| d.id).collect();
            prop_assert_eq!(order, shuffled.iter().map(|b| b.id.clone()).collect::<Vec<_>>());
        }

        #[test]
        fn prop_protection_affects_only_its_own_backup(p in arb_policy(), backups in arb_backups(), pick in any::<prop::sample::Index>()) {
            prop_assume!(!backups.is_empty());
            let i = pick.index(backups.len());
            let mut toggled = backups.clone();
            toggled[i].protected = !toggled[i].protected;
            let (a, b) = (apply(&p, &backups).unwrap(), apply(&p, &toggled).unwrap());
            for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                if j == i {
                    let strip = |d: &Decision| d.reasons.iter().filter(|r| **r != Reason::Protected).cloned().collect::<Vec<_>>();
                    prop_assert_eq!(strip(x), strip(y));
                } else {
                    prop_assert_eq!(x, y);
                }
            }
        }

        #[test]
        fn prop_period_rules_keep_the_newest_of_the_newest_periods(n in 0u32..8, which in 0usize..5, backups in arb_backups()) {
            let period = [Period::Hour, Period::Day, Period::Week, Period::Month, Period::Year][which];
            // Rule which + 1 of `raise` is the period rule of `period`; only it is given.
            let p = raise(&KeepPolicy::default(), which + 1, n);
            let decisions = apply(&p, &backups).unwrap();
            // Reference: the newest backup of each period; the n newest such periods.
            let mut newest_of: BTreeMap<String, &Candidate> = BTreeMap::new();
            for b in &backups {
                let e = newest_of.entry(period.of(b.time)).or_insert(b);
                if newest_first(b, e) == Ordering::Less {
                    *e = b;
                }
            }
            let mut heads: Vec<&Candidate> = newest_of.values().copied().collect();
            heads.sort_by(|a, b| newest_first(a, b));
            let want: BTreeMap<&str, Reason> = heads.iter().take(n as usize).map(|b| (b.id.as_str(), period.reason(period.of(b.time)))).collect();
            for d in &decisions {
                let got: Vec<&Reason> = d.reasons.iter().filter(|r| r.period().is_some()).collect();
                match want.get(d.id.as_str()) {
                    Some(r) => prop_assert_eq!(got, vec![r]),
                    None => prop_assert!(got.is_empty()),
                }
            }
        }

        #[test]
        fn prop_within_is_inclusive_distance_to_newest(mins in 0i64..100_000, backups in arb_backups()) {
            let within = Duration::minutes(mins);
            let decisions = apply(&KeepPolicy { within: Some(within), ..KeepPolicy::default() }, &backups).unwrap();
            if let Some(n) = newest(&backups) {
                for (d, b) in decisions.iter().zip(&backups) {
                    prop_assert_eq!(d.reasons.contains(&Reason::Within), n.time - b.time <= within);
                }
            }
        }
    }
}
