//! `VOLUME@SPEC`: naming one backup of a volume, unambiguously.
//!
//! A spec is `latest`, `id:HEX` (a backup ID or a unique prefix of one), `snap:NAME` (the
//! backup whose to-snapshot is exactly NAME), `at:TIME` (the newest backup made at or before
//! TIME: see [`parse_time`]), or a bare word; a bare word that reads as a time is a time
//! (unless a snapshot has that name: then ferry refuses and asks for `at:` or `snap:`). A bare word is looked up both
//! ways (as an ID prefix only if it has at least [`MIN_BARE_PREFIX`] hex digits); when it names
//! exactly one backup by to-snapshot and nothing else by ID prefix, or exactly one by ID prefix
//! and nothing by snapshot, that backup is meant. When the two readings disagree, ferry refuses
//! and asks for `id:` or `snap:` — it never guesses.

use crate::error::{Error, Result};
use crate::index::BackupSummary;

/// Shortest bare word taken as a backup-ID prefix (shorter prefixes need `id:`).
pub const MIN_BARE_PREFIX: usize = 4;

/// How a user names a backup within a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupSpec {
    /// The newest backup.
    Latest,
    /// A backup ID or a unique prefix of one (`id:…`).
    Id(String),
    /// The backup whose to-snapshot has exactly this name (`snap:…`).
    Snapshot(String),
    /// The newest backup committed at or before this time (`at:…`, or a bare time).
    At(chrono::DateTime<chrono::Utc>),
    /// A bare word: an ID prefix or a snapshot name, whichever is unambiguous.
    Either(String),
}

/// Reads a point in time: RFC 3339 (`2026-11-30T02:00:00Z`, `2026-11-30T03:00:00+01:00`), or
/// without a zone in UTC (`2026-11-30T02:00[:SS]`, a space instead of `T` too), or a date alone
/// (`2026-11-30`), meaning the end of that day in UTC — "the backup of that day".
pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{NaiveDate, NaiveDateTime, TimeZone, Utc};
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let end = d.and_hms_nano_opt(23, 59, 59, 999_999_999)?;
    Some(Utc.from_utc_datetime(&end))
}

impl BackupSpec {
    /// Parses the part after `@` (`None`: no `@` was given, meaning the newest backup).
    pub fn parse(s: Option<&str>) -> Result<BackupSpec> {
        let invalid = |why: &str| Error::InvalidArgument(format!("'{}' does not name a backup: {why}", s.unwrap_or("")));
        match s {
            None | Some("latest") => Ok(BackupSpec::Latest),
            Some("") => Err(invalid("nothing after '@'")),
            Some(s) => {
                if let Some(id) = s.strip_prefix("id:") {
                    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(invalid("a backup ID is hexadecimal"));
                    }
                    Ok(BackupSpec::Id(id.to_ascii_lowercase()))
                } else if let Some(t) = s.strip_prefix("at:") {
                    parse_time(t)
                        .map(BackupSpec::At)
                        .ok_or_else(|| invalid("a time is RFC 3339 (2026-11-30T02:00:00Z), YYYY-MM-DD[THH:MM[:SS]] in UTC, or a date"))
                } else if let Some(snap) = s.strip_prefix("snap:") {
                    if snap.is_empty() {
                        return Err(invalid("no snapshot name after 'snap:'"));
                    }
                    Ok(BackupSpec::Snapshot(snap.to_string()))
                } else {
                    Ok(BackupSpec::Either(s.to_string()))
                }
            }
        }
    }

    /// Splits `VOLUME[@SPEC]`.
    pub fn split_target(target: &str) -> Result<(&str, BackupSpec)> {
        match target.split_once('@') {
            Some((v, s)) => Ok((v, BackupSpec::parse(Some(s))?)),
            None => Ok((target, BackupSpec::Latest)),
        }
    }
}

impl std::fmt::Display for BackupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupSpec::Latest => f.write_str("latest"),
            BackupSpec::Id(s) => write!(f, "id:{s}"),
            BackupSpec::Snapshot(s) => write!(f, "snap:{s}"),
            BackupSpec::At(t) => write!(f, "at:{}", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            BackupSpec::Either(s) => f.write_str(s),
        }
    }
}

/// Picks the backup `spec` names in `chain` (one volume's backups, oldest first).
pub fn resolve<'a>(volume: &str, chain: &'a [BackupSummary], spec: &BackupSpec) -> Result<&'a BackupSummary> {
    let no_such = || Error::NoSuchBackup {
        volume: volume.to_string(),
        spec: spec.to_string(),
    };
    if chain.is_empty() {
        return Err(Error::NoBackups {
            volume: volume.to_string(),
        });
    }
    let by_id = |p: &str| -> Vec<&'a BackupSummary> {
        let p = p.to_ascii_lowercase();
        // An exact ID wins over longer IDs it is a prefix of (IDs have one length, but be exact).
        let exact: Vec<_> = chain.iter().filter(|b| b.meta.backup_id == p).collect();
        if !exact.is_empty() {
            return exact;
        }
        chain.iter().filter(|b| b.meta.backup_id.starts_with(&p)).collect()
    };
    let by_snap = |s: &str| -> Vec<&'a BackupSummary> { chain.iter().filter(|b| b.meta.to_snap.as_deref() == Some(s)).collect() };
    let one = |found: Vec<&'a BackupSummary>, what: &str| -> Result<&'a BackupSummary> {
        match found.as_slice() {
            [] => Err(no_such()),
            [b] => Ok(b),
            many => Err(Error::AmbiguousBackup {
                volume: volume.to_string(),
                spec: spec.to_string(),
                detail: format!(
                    "{} backups match {what} ({}); give more of the ID",
                    many.len(),
                    many.iter().map(|b| b.meta.backup_id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    };
    let at = |t: &chrono::DateTime<chrono::Utc>| -> Result<&'a BackupSummary> {
        // By commit time, not by name: the newest one made at or before `t`.
        chain
            .iter()
            .filter(|b| b.meta.created <= *t)
            .max_by_key(|b| b.meta.created)
            .ok_or_else(|| {
                let oldest = chain.iter().map(|b| b.meta.created).min();
                Error::NoSuchBackup {
                    volume: volume.to_string(),
                    spec: format!(
                        "{spec} (no backup was made at or before it; the oldest is of {})",
                        oldest.map_or_else(|| "-".to_string(), |o| o.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    ),
                }
            })
    };
    match spec {
        BackupSpec::Latest => chain.last().ok_or_else(no_such),
        BackupSpec::At(t) => at(t),
        BackupSpec::Id(p) => one(by_id(p), "by ID prefix"),
        BackupSpec::Snapshot(s) => one(by_snap(s), "by snapshot name"),
        BackupSpec::Either(s) => {
            let snaps = by_snap(s);
            if let Some(t) = parse_time(s) {
                if snaps.is_empty() {
                    return at(&t);
                }
                return Err(Error::AmbiguousBackup {
                    volume: volume.to_string(),
                    spec: spec.to_string(),
                    detail: format!(
                        "it is a time and the snapshot of backup {}; say at:{s} or snap:{s}",
                        snaps[0].meta.backup_id
                    ),
                });
            }
            // A short hex word (a snapshot named "4") is too likely to be something else to
            // stand for an ID prefix; `id:` says it is one.
            let is_hex = s.len() >= MIN_BARE_PREFIX && s.bytes().all(|b| b.is_ascii_hexdigit());
            let ids = if is_hex { by_id(s) } else { Vec::new() };
            match (snaps.is_empty(), ids.is_empty()) {
                (true, true) => Err(no_such()),
                (false, true) => one(snaps, "by snapshot name"),
                (true, false) => one(ids, "by ID prefix"),
                (false, false) => {
                    if snaps.len() == 1 && ids.len() == 1 && snaps[0].meta.backup_id == ids[0].meta.backup_id {
                        return Ok(snaps[0]);
                    }
                    Err(Error::AmbiguousBackup {
                        volume: volume.to_string(),
                        spec: spec.to_string(),
                        detail: format!(
                            "it is the snapshot of backup {} and a prefix of backup ID {}; say snap:{s} or id:{s}",
                            snaps.iter().map(|b| b.meta.backup_id.as_str()).collect::<Vec<_>>().join(", "),
                            ids.iter().map(|b| b.meta.backup_id.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::meta;
    use crate::repo::BackupRef;

    fn chain(items: &[(&str, &str)]) -> Vec<BackupSummary> {
        items
            .iter()
            .enumerate()
            .map(|(i, (id, snap))| {
                let mut m = meta(4096, 4096);
                m.backup_id = id.to_string();
                m.to_snap = Some(snap.to_string());
                BackupSummary {
                    backup: BackupRef {
                        volume: "v".into(),
                        name: format!("{i}-{id}"),
                    },
                    meta: m,
                    chunk_blocks: 0,
                }
            })
            .collect()
    }

    fn pick(c: &[BackupSummary], s: &str) -> Result<String> {
        let spec = BackupSpec::parse(Some(s))?;
        resolve("v", c, &spec).map(|b| b.meta.backup_id.clone())
    }

    #[test]
    fn forms() {
        let c = chain(&[("aa11", "s1"), ("ab22", "s2"), ("cafe", "ab"), ("dd44", "dd44")]);
        assert_eq!(pick(&c, "latest").unwrap(), "dd44");
        assert_eq!(pick(&c, "aa11").unwrap(), "aa11");
        // Short hex words are not ID prefixes unless said so.
        assert!(matches!(pick(&c, "aa").unwrap_err(), Error::NoSuchBackup { .. }));
        assert_eq!(pick(&c, "id:aa").unwrap(), "aa11");
        assert_eq!(pick(&c, "s2").unwrap(), "ab22");
        assert_eq!(pick(&c, "id:AB2").unwrap(), "ab22");
        assert_eq!(pick(&c, "snap:ab").unwrap(), "cafe");
        // A snapshot named like a prefix of another backup's ID: refused, never a guess.
        let c = chain(&[("aa11", "s1"), ("ab22cd", "s2"), ("cafe", "ab22"), ("dd44", "dd44")]);
        let e = pick(&c, "ab22").unwrap_err();
        assert!(matches!(e, Error::AmbiguousBackup { .. }), "{e}");
        assert!(e.to_string().contains("snap:ab22"), "{e}");
        // Both readings name the same backup: fine.
        assert_eq!(pick(&c, "dd44").unwrap(), "dd44");
        assert!(matches!(pick(&c, "id:a").unwrap_err(), Error::AmbiguousBackup { .. }));
        assert!(matches!(pick(&c, "zz").unwrap_err(), Error::NoSuchBackup { .. }));
        assert!(matches!(pick(&c, "snap:nope").unwrap_err(), Error::NoSuchBackup { .. }));
        assert!(matches!(pick(&c, "id:xyz").unwrap_err(), Error::InvalidArgument(_)));
        assert!(matches!(pick(&c, "").unwrap_err(), Error::InvalidArgument(_)));
        assert!(matches!(
            resolve("v", &[], &BackupSpec::Latest).unwrap_err(),
            Error::NoBackups { .. }
        ));
    }

    #[test]
    fn times_pick_the_newest_backup_at_or_before() {
        let mut c = chain(&[("aa11", "s1"), ("bb22", "s2"), ("cc33", "2026-11-30")]);
        let t = |s: &str| parse_time(s).unwrap();
        c[0].meta.created = t("2026-11-28T10:00:00Z");
        c[1].meta.created = t("2026-11-29T10:00:00Z");
        c[2].meta.created = t("2026-11-30T10:00:00Z");
        assert_eq!(pick(&c, "at:2026-11-29T10:00:00Z").unwrap(), "bb22");
        assert_eq!(pick(&c, "2026-11-29T09:59:59Z").unwrap(), "aa11");
        assert_eq!(pick(&c, "2026-11-29T11:00:00+01:00").unwrap(), "bb22");
        assert_eq!(pick(&c, "2026-11-29 10:30").unwrap(), "bb22");
        // A date is the end of that day (UTC).
        assert_eq!(pick(&c, "at:2026-11-29").unwrap(), "bb22");
        assert_eq!(pick(&c, "at:2030-01-01").unwrap(), "cc33");
        let e = pick(&c, "2026-11-27").unwrap_err();
        assert!(
            matches!(e, Error::NoSuchBackup { .. }) && e.to_string().contains("2026-11-28T10:00:00Z"),
            "{e}"
        );
        // A snapshot named like a time: refused, never a guess.
        assert!(matches!(pick(&c, "2026-11-30").unwrap_err(), Error::AmbiguousBackup { .. }));
        assert_eq!(pick(&c, "snap:2026-11-30").unwrap(), "cc33");
        assert!(matches!(pick(&c, "at:yesterday").unwrap_err(), Error::InvalidArgument(_)));
        // By commit time, not by the order of names (a clock stepped back).
        c[2].meta.created = t("2026-11-27T10:00:00Z");
        assert_eq!(pick(&c, "at:2026-11-29T23:00:00Z").unwrap(), "bb22");
    }
}
