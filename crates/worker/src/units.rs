//! Sizes (`50M`), durations (`90s`, `5m`, `1h30m`) and clock times (`08:00`) as the
//! configuration writes them.

use std::time::Duration;

/// `4096`, `64K`, `50M`, `1G`, `2T` (binary units; `KiB`, `MB` and friends too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 64K, 50M, 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        u => return Err(format!("'{s}': unknown size unit '{u}' (use K, M, G, T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// `500ms`, `90s`, `5m`, `1h30m`, `2d`: a sum of numbers with units ms, s, m, h, d.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("an empty duration (e.g. 30s, 5m, 1h)".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("'{text}' is not a duration (e.g. 30s, 5m, 1h30m)"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("'{text}' is too long"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "" => return Err(format!("'{text}': give a unit (ms, s, m, h, d)")),
            u => return Err(format!("'{text}': unknown unit '{u}' (use ms, s, m, h, d)")),
        };
        total = total.checked_add(part).ok_or_else(|| format!("'{text}' is too long"))?;
    }
    Ok(total)
}

/// `HH:MM` on a 24-hour clock.
pub fn parse_clock(s: &str) -> Result<chrono::NaiveTime, String> {
    chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M").map_err(|_| format!("'{s}' is not a time of day (HH:MM, 24-hour clock)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("50M").unwrap(), 50 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 X").is_err());
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert_eq!(parse_clock("08:00").unwrap(), chrono::NaiveTime::from_hms_opt(8, 0, 0).unwrap());
        assert!(parse_clock("25:00").is_err());
    }
}
