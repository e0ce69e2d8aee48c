//! When chunks were last verified (FORMAT.md §16): `ferry audit --read-data` writes one record
//! per run naming the objects it downloaded and found intact, so later audits with
//! `--outdated-after` read only what no run verified recently — a budgeted daily audit covers
//! the whole repository over time instead of re-reading the same sample.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rand::RngCore;

use crate::chunk::ChunkId;
use crate::error::Result;
use crate::gc::{decode_ids, encode_ids, get_record, put_record};
use crate::repo::Repository;

const PREFIX: &str = "verified";
const TIME: &str = "%Y%m%dT%H%M%S%.6fZ";

/// Records that `ids` were downloaded, opened and found intact at `at` (one create-only
/// record, `verified/<time>-<random>`).
pub async fn record_verified(repo: &Repository, ids: &[ChunkId], at: DateTime<Utc>) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut r = [0u8; 4];
    rand::rng().fill_bytes(&mut r);
    let key = format!("{PREFIX}/{}-{}", at.format(TIME), hex::encode(r));
    put_record(repo, &key, &encode_ids(ids)).await?;
    Ok(())
}

/// Every object some run verified at or after `since`, with the newest such time. Records
/// older than `since` are not read (their names carry their time).
pub async fn verified_since(repo: &Repository, since: DateTime<Utc>) -> Result<HashMap<ChunkId, DateTime<Utc>>> {
    let mut out: HashMap<ChunkId, DateTime<Utc>> = HashMap::new();
    for m in repo.list_prefix(PREFIX).await? {
        let key = m.location.to_string();
        let Some(name) = key.strip_prefix("verified/") else { continue };
        let Some((time, _)) = name.rsplit_once('-') else { continue };
        let Ok(t) = chrono::NaiveDateTime::parse_from_str(time, TIME) else {
            continue;
        };
        let t = t.and_utc();
        if t < since {
            continue;
        }
        let bytes = match get_record(repo, &key).await {
            Ok(b) => b,
            // A record that does not open is not evidence of anything: those objects count as
            // not verified (read again), never as verified.
            Err(crate::Error::NotFound { .. }) => continue,
            Err(e) if e.is_integrity() => {
                tracing::warn!("verification record {key} cannot be used: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let ids = match decode_ids(&bytes, &key) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("verification record {key} cannot be used: {e}");
                continue;
            }
        };
        for id in ids {
            let e = out.entry(id).or_insert(t);
            if *e < t {
                *e = t;
            }
        }
    }
    Ok(out)
}
