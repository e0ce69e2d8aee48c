//! Cron expressions, as crontab(5) writes them, and the next time one fires.
//!
//! Five fields (`minute hour day-of-month month day-of-week`) or six with seconds first;
//! each a list of `*`, `N`, `N-M`, each with an optional `/STEP`; month and weekday names
//! (`jan`, `mon`); weekday 0 and 7 are Sunday; the macros `@yearly` (`@annually`),
//! `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`. As in Vixie cron, when both
//! day-of-month and day-of-week are restricted a day matches either; when either starts with
//! `*` (`*/2`) a day must match both.
//!
//! Times are wall-clock times of a time zone (the worker's local zone): a time that does not
//! exist (the hour skipped when clocks go forward) is skipped, a time that exists twice
//! fires at its first occurrence.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike};

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_star: bool,
    weekdays_star: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a cron expression is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{text}': {reason}")]
pub struct CronError {
    /// The expression.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The first name's value.
    names_from: u32,
}

const SECOND: FieldSpec = FieldSpec {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    names_from: 0,
};
const DAY: FieldSpec = FieldSpec {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
    names_from: 0,
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &MONTHS,
    names_from: 1,
};
const WEEKDAY: FieldSpec = FieldSpec {
    name: "day of week",
    min: 0,
    max: 7,
    names: &WEEKDAYS,
    names_from: 0,
};

fn value(spec: &FieldSpec, s: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = spec.names.iter().position(|n| *n == lower) {
        return Ok(spec.names_from + i as u32);
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a {} (a number{})", spec.name, names_hint(spec)))?;
    if v < spec.min || v > spec.max {
        return Err(format!("{} {v} is out of range {}-{}", spec.name, spec.min, spec.max));
    }
    Ok(v)
}

fn names_hint(spec: &FieldSpec) -> String {
    match spec.names.first() {
        Some(first) => format!(" or a name like '{first}'"),
        None => String::new(),
    }
}

/// Parses one field into a bit set; the flag says whether it starts with `*` (Vixie cron's
/// rule for combining the day fields).
fn field(spec: &FieldSpec, text: &str) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(format!("empty item in {} field '{text}'", spec.name));
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| format!("step '{s}' in {} field is not a positive number", spec.name))?;
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(spec, a)?, value(spec, b)?);
            if a > b {
                return Err(format!("range {a}-{b} of {} runs backwards", spec.name));
            }
            (a, b)
        } else {
            let v = value(spec, range)?;
            // `N/STEP` means N to the end, every STEP.
            (v, if item.contains('/') { spec.max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, text.starts_with('*')))
}

impl FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Cron, CronError> {
        let err = |reason: String| CronError {
            text: text.to_string(),
            reason,
        };
        let expanded = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            t if t.starts_with('@') => return Err(err(format!("unknown macro '{t}'"))),
            t => t,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(err(format!(
                    "{n} fields; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
                )))
            }
        };
        let (seconds, _) = field(&SECOND, sec).map_err(err)?;
        let (minutes, _) = field(&MINUTE, rest[0]).map_err(err)?;
        let (hours, _) = field(&HOUR, rest[1]).map_err(err)?;
        let (days, days_star) = field(&DAY, rest[2]).map_err(err)?;
        let (months, _) = field(&MONTH, rest[3]).map_err(err)?;
        let (mut weekdays, weekdays_star) = field(&WEEKDAY, rest[4]).map_err(err)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        let cron = Cron {
            text: text.trim().to_string(),
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_star,
            weekdays_star,
        };
        // A day that never comes (30 February) would make a schedule that never fires.
        let probe = NaiveDate::from_ymd_opt(2000, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0));
        if probe.and_then(|p| cron.next_naive(p)).is_none() {
            return Err(err("it never fires (no such day)".into()));
        }
        Ok(cron)
    }
}

fn has(bits: u64, v: u32) -> bool {
    bits & (1 << v) != 0
}

impl Cron {
    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        let dom = has(self.days, d.day());
        let dow = has(self.weekdays, d.weekday().num_days_from_sunday());
        // Vixie cron: a day field that starts with `*` (`*`, `*/2`) makes the two an AND;
        // two restricted fields are an OR.
        if self.days_star || self.weekdays_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// True when the expression fires at `t` (a wall-clock time, whole seconds).
    pub fn matches(&self, t: NaiveDateTime) -> bool {
        t.nanosecond() == 0
            && has(self.months, t.month())
            && self.day_matches(t.date())
            && has(self.hours, t.hour())
            && has(self.minutes, t.minute())
            && has(self.seconds, t.second())
    }

    /// The first wall-clock time strictly after `after` at which the expression fires,
    /// looking at most eight years ahead (a leap day on a given weekday can take that long).
    pub fn next_naive(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut t = after.with_nanosecond(0)? + Duration::seconds(1);
        let limit = after.year() + 8;
        while t.year() <= limit {
            if !has(self.months, t.month()) {
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = NaiveDate::from_ymd_opt(y, m, 1)?.and_time(NaiveTime::MIN);
                continue;
            }
            if !self.day_matches(t.date()) {
                t = t.date().succ_opt()?.and_time(NaiveTime::MIN);
                continue;
            }
            if !has(self.hours, t.hour()) {
                t = t.with_minute(0)?.with_second(0)? + Duration::hours(1);
                continue;
            }
            if !has(self.minutes, t.minute()) {
                t = t.with_second(0)? + Duration::minutes(1);
                continue;
            }
            if !has(self.seconds, t.second()) {
                t += Duration::seconds(1);
                continue;
            }
            return Some(t);
        }
        None
    }

    /// The first time strictly after `after` at which the expression fires in `after`'s
    /// time zone (skipped wall-clock times are skipped; repeated ones fire once, the first
    /// time).
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let tz = after.timezone();
        let mut naive = after.naive_local();
        // A handful of DST gaps at most; bound the loop anyway.
        for _ in 0..10_000 {
            naive = self.next_naive(naive)?;
            match tz.from_local_datetime(&naive) {
                LocalResult::Single(t) if t > *after => return Some(t),
                LocalResult::Ambiguous(a, b) => {
                    if a > *after {
                        return Some(a);
                    }
                    if b > *after {
                        // The second pass of a repeated hour fires only if the first did
                        // not exist for us (we started inside the repetition).
                        return Some(b);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use proptest::prelude::*;

    fn t(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn next(expr: &str, after: &str) -> String {
        let c: Cron = expr.parse().unwrap();
        c.next_naive(t(after)).unwrap().format("%Y-%m-%d %H:%M:%S").to_string()
    }

    #[test]
    fn common_expressions() {
        assert_eq!(next("*/15 * * * *", "2026-11-29 21:07:30"), "2026-11-29 21:15:00");
        assert_eq!(next("0 3 * * *", "2026-11-29 03:00:00"), "2026-11-30 03:00:00");
        assert_eq!(next("30 2 * * sun", "2026-11-29 03:00:00"), "2026-12-06 02:30:00");
        assert_eq!(next("0 0 1 jan *", "2026-11-29 03:00:00"), "2027-01-01 00:00:00");
        assert_eq!(next("*/10 * * * * *", "2026-11-29 21:07:31"), "2026-11-29 21:07:40");
        assert_eq!(next("@hourly", "2026-11-29 21:07:31"), "2026-11-29 22:00:00");
        assert_eq!(next("@weekly", "2026-11-29 21:07:31"), "2026-12-06 00:00:00");
        assert_eq!(next("0 0 29 2 *", "2026-11-29 21:07:31"), "2028-02-29 00:00:00");
        assert_eq!(next("0 12 * * 1-5", "2026-11-28 13:00:00"), "2026-11-30 12:00:00");
        assert_eq!(next("0 12 * * 7", "2026-11-28 13:00:00"), "2026-11-29 12:00:00");
        // Both days restricted: either matches (the 1st, or a Friday).
        assert_eq!(next("0 0 1 * fri", "2026-11-29 00:00:00"), "2026-12-01 00:00:00");
        assert_eq!(next("0 0 1 * fri", "2026-12-01 00:00:00"), "2026-12-04 00:00:00");
        assert_eq!(next("5,35 8-10/2 * * *", "2026-11-29 08:35:00"), "2026-11-29 10:05:00");
        // A starred day field is an AND: odd days that are Mondays (not Monday the 30th).
        assert_eq!(next("0 0 */2 * mon", "2026-11-29 00:00:00"), "2026-12-07 00:00:00");
        assert_eq!(next("7/20 * * * *", "2026-11-29 08:48:00"), "2026-11-29 09:07:00");
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        let e = |s: &str| s.parse::<Cron>().unwrap_err().reason;
        assert!(e("61 * * * *").contains("minute 61 is out of range 0-59"), "{}", e("61 * * * *"));
        assert!(e("* * * *").contains("4 fields"));
        assert!(e("0 0 30 2 *").contains("never fires"));
        assert!(e("*/0 * * * *").contains("step"));
        assert!(e("0 0 * foo *").contains("'foo' is not a month"));
        assert!(e("5-1 * * * *").contains("backwards"));
        assert!(e("@sometimes").contains("unknown macro"));
        assert!(e("1,,2 * * * *").contains("empty item"));
    }

    #[test]
    fn the_zone_aware_answer_agrees_with_the_wall_clock_one() {
        // Without a tz database no zone with DST transitions is at hand; UTC has none, so
        // the zone-aware path must give the naive answer.
        let c: Cron = "30 2 * * *".parse().unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap();
        assert_eq!(c.next_after(&now).unwrap(), Utc.with_ymd_and_hms(2026, 3, 29, 2, 30, 0).unwrap());
    }

    proptest! {
        // The next firing matches, is strictly later, and nothing between fires.
        #[test]
        fn next_is_the_first_match_after(
            minute in prop::sample::select(vec!["*", "0", "*/7", "15,45", "10-20/5", "59"]),
            hour in prop::sample::select(vec!["*", "3", "*/6", "8-17"]),
            dom in prop::sample::select(vec!["*", "1", "15", "28-31"]),
            dow in prop::sample::select(vec!["*", "0", "1-5", "sat"]),
            start in 0i64..(3 * 365 * 24 * 60),
        ) {
            let expr = format!("{minute} {hour} {dom} * {dow}");
            let c: Cron = expr.parse().unwrap();
            let from = t("2026-01-01 00:00:00") + Duration::minutes(start) + Duration::seconds(start % 60);
            let n = c.next_naive(from).unwrap();
            prop_assert!(n > from);
            prop_assert!(c.matches(n));
            // Walk minute by minute (every firing is on a whole minute) up to the answer.
            let mut m = from.with_second(0).unwrap() + Duration::minutes(1);
            let mut steps = 0;
            while m < n && steps < 200_000 {
                prop_assert!(!c.matches(m), "{} fires at {} before {}", expr, m, n);
                m += Duration::minutes(1);
                steps += 1;
            }
        }
    }
}
