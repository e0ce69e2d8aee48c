//! Audit against the source: backups whose snapshot still exists on the primary are read back
//! through librbd and every block (or a sample) compared with the manifest's block map — the
//! keyed content ID of the snapshot's block must be the one the backup recorded (an all-zero
//! block: a hole). This proves a backup equal to what it was taken from, which no check of the
//! repository alone can: an export-diff that dropped a change commits a backup that is
//! authentic, complete and wrong.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_ceph::Cluster;
use ferry_repo::{is_zero, Manifest, Repository};
use serde::Serialize;

use crate::audit::Finding;
use crate::cpu::blocking;
use crate::error::{Result, ResultExt};
use crate::observer::{Event, Observer, Operation};
use crate::rbd::Ceph;

/// At most this many `source-mismatch` findings name single blocks of one backup; the rest are
/// counted in one more finding.
pub const MAX_BLOCK_FINDINGS: usize = 32;

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Volumes to compare (empty: all).
    pub volumes: Vec<String>,
    /// Percentage of each backup's blocks to read and compare (100: all), sampled anew each run.
    pub sample_percent: f64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            volumes: Vec::new(),
            sample_percent: 100.0,
        }
    }
}

/// What a comparison with the source found.
#[derive(Debug, Serialize, Default, Clone)]
pub struct SourceComparison {
    /// Backups whose snapshot was read.
    pub backups_compared: usize,
    /// Blocks read from snapshots and compared.
    pub blocks_compared: u64,
    /// Bytes read from the cluster.
    pub bytes_read: u64,
    /// Differences: `source-mismatch` (a block's content is not what the backup holds) and
    /// `source-size` (the snapshot's size is not the backup's).
    pub findings: Vec<Finding>,
    /// Backups not compared and why (`source-gone`: the snapshot, the image or the cluster is
    /// not the one the backup was taken from; `source-other`: not an RBD backup).
    pub info: Vec<Finding>,
}

/// One backup to compare: the snapshot it was taken from.
struct Candidate {
    manifest: Arc<Manifest>,
    snap: String,
}

/// Compares backups with their source snapshots (see the module documentation). Reading a
/// manifest or the cluster failing is an error; differences are findings.
pub(crate) async fn compare(
    repo: Arc<Repository>,
    observer: Arc<dyn Observer>,
    ceph: &Ceph,
    opts: &CompareOptions,
) -> Result<SourceComparison> {
    for v in &opts.volumes {
        ferry_repo::validate_volume_name(v)?;
    }
    let mut refs = repo.list_backups(None).await.context("listing backups")?;
    if !opts.volumes.is_empty() {
        refs.retain(|b| opts.volumes.contains(&b.volume));
    }
    let mut out = SourceComparison::default();
    // Per image, the backups that name a snapshot of it.
    let mut by_image: BTreeMap<(String, String), Vec<Candidate>> = BTreeMap::new();
    for b in refs {
        let m = match repo.read_manifest(&b).await {
            Ok(m) => m,
            // Deleted meanwhile, or unreadable: the repository audit reports those.
            Err(e) if e.is_integrity() || matches!(e, ferry_repo::Error::NotFound { .. } | ferry_repo::Error::Fenced { .. }) => continue,
            Err(e) => return Err(crate::Error::from(e).context(format!("reading manifest {}", b.key()))),
        };
        let src = &m.meta.source;
        match (src.kind.as_str(), &src.pool, &src.image, &m.meta.to_snap) {
            ("rbd", Some(pool), Some(image), Some(snap)) => {
                let snap = snap.clone();
                by_image.entry((pool.clone(), image.clone())).or_default().push(Candidate {
                    manifest: Arc::new(m),
                    snap,
                });
            }
            _ => out.info.push(Finding {
                kind: "source-other",
                volume: m.meta.volume.clone(),
                backup: Some(m.meta.backup_id.clone()),
                detail: format!("a {} backup, not of an RBD snapshot: not compared", src.kind),
            }),
        }
    }
    if by_image.is_empty() {
        return Ok(out);
    }
    let cfg = ceph.config.clone();
    let cluster = Arc::new(blocking(move || Cluster::connect(&cfg).context("connecting to the Ceph cluster")).await?);
    let fsid = {
        let c = cluster.clone();
        blocking(move || c.fsid().context("reading the cluster fsid")).await?
    };
    let rbd = ceph.rbd();
    // Which candidates' snapshots exist, on this very image of this very cluster.
    let mut todo = Vec::new();
    for ((pool, image), candidates) in by_image {
        let (info, snaps) = {
            let (rbd, pool, image) = (rbd.clone(), pool.clone(), image.clone());
            blocking(move || {
                let info = match rbd.info(&pool, &image) {
                    Ok(i) => i,
                    Err(e) if e.is_not_found() => return Ok(None),
                    Err(e) => return Err(crate::Error::from(e).context(format!("reading image info of {pool}/{image}"))),
                };
                let snaps = rbd
                    .snap_list(&pool, &image)
                    .with_context(|| format!("listing snapshots of {pool}/{image}"))?;
                Ok(Some((info, snaps)))
            })
            .await?
            .unzip()
        };
        for c in candidates {
            let m = &c.manifest;
            let gone = |why: String| Finding {
                kind: "source-gone",
                volume: m.meta.volume.clone(),
                backup: Some(m.meta.backup_id.clone()),
                detail: why,
            };
            let why = if m.meta.source.cluster_fsid.as_deref().is_some_and(|f| f != fsid) {
                Some(format!(
                    "taken on cluster {}, not this one ({fsid})",
                    m.meta.source.cluster_fsid.as_deref().unwrap_or("?")
                ))
            } else if info.is_none() {
                Some(format!("image {pool}/{image} no longer exists"))
            } else if m
                .meta
                .source
                .image_id
                .as_deref()
                .is_some_and(|id| Some(id) != info.as_ref().map(|i| i.id.as_str()))
            {
                Some(format!("image {pool}/{image} was recreated since (another image ID)"))
            } else if let Some(s) = snaps.as_ref().and_then(|s| s.iter().find(|s| s.name == c.snap)) {
                if s.size != m.meta.image_size {
                    out.findings.push(Finding {
                        kind: "source-size",
                        volume: m.meta.volume.clone(),
                        backup: Some(m.meta.backup_id.clone()),
                        detail: format!(
                            "snapshot {pool}/{image}@{} is {} bytes, the backup {} bytes",
                            c.snap, s.size, m.meta.image_size
                        ),
                    });
                }
                None
            } else {
                Some(format!("snapshot {pool}/{image}@{} no longer exists", c.snap))
            };
            match why {
                Some(why) => out.info.push(gone(format!("{why}: not compared"))),
                None => todo.push((pool.clone(), image.clone(), c)),
            }
        }
    }
    let percent = opts.sample_percent.clamp(0.0, 100.0);
    let run_key = *blake3::hash(format!("{:?} compare", std::time::SystemTime::now()).as_bytes()).as_bytes();
    let total: u64 = todo
        .iter()
        .map(|(_, _, c)| {
            c.manifest
                .meta
                .image_size
                .min(c.manifest.meta.block_size.get() * c.manifest.blocks.len() as u64)
        })
        .sum();
    observer.event(Event::Started {
        op: Operation::CompareSource,
        total: Some(total),
    });
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let result = async {
        for (pool, image, c) in todo {
            let (cluster, repo, observer, done) = (cluster.clone(), repo.clone(), observer.clone(), done.clone());
            let m = c.manifest.clone();
            let snap = c.snap.clone();
            let (blocks, bytes, differ) = blocking(move || {
                let mut reader = cluster
                    .open_snapshot(&pool, &image, &snap)
                    .with_context(|| format!("opening {pool}/{image}@{snap}"))?;
                let bs = m.meta.block_size.get();
                let mut buf = vec![0u8; bs as usize];
                let (mut blocks, mut bytes, mut differ) = (0u64, 0u64, Vec::new());
                for (i, expected) in m.blocks.iter().enumerate() {
                    let len = m.block_len(i as u64) as usize;
                    if !sampled(&run_key, &m.meta.backup_id, i as u64, percent) {
                        done.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    let data = &mut buf[..len];
                    let mut got = 0;
                    while got < len {
                        let n = reader
                            .read(i as u64 * bs + got as u64, &mut data[got..])
                            .with_context(|| format!("reading {pool}/{image}@{snap}"))?;
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    // Past the snapshot's end (a size finding already says so): zeros.
                    data[got..].fill(0);
                    let actual = if is_zero(data) { None } else { Some(repo.chunk_id(data)) };
                    if actual != *expected {
                        differ.push(i as u64);
                    }
                    blocks += 1;
                    bytes += got as u64;
                    let d = done.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed) + len as u64;
                    observer.event(Event::Progress {
                        op: Operation::CompareSource,
                        done: d,
                    });
                }
                Ok((blocks, bytes, differ))
            })
            .await?;
            let m = &c.manifest;
            out.backups_compared += 1;
            out.blocks_compared += blocks;
            out.bytes_read += bytes;
            let bs = m.meta.block_size.get();
            for &i in differ.iter().take(MAX_BLOCK_FINDINGS) {
                out.findings.push(Finding {
                    kind: "source-mismatch",
                    volume: m.meta.volume.clone(),
                    backup: Some(m.meta.backup_id.clone()),
                    detail: format!(
                        "block {i} (bytes {}..{}) differs from snapshot @{}",
                        i * bs,
                        i * bs + m.block_len(i),
                        c.snap
                    ),
                });
            }
            if differ.len() > MAX_BLOCK_FINDINGS {
                out.findings.push(Finding {
                    kind: "source-mismatch",
                    volume: m.meta.volume.clone(),
                    backup: Some(m.meta.backup_id.clone()),
                    detail: format!(
                        "{} more blocks differ from snapshot @{} ({} of {} compared)",
                        differ.len() - MAX_BLOCK_FINDINGS,
                        c.snap,
                        differ.len(),
                        blocks
                    ),
                });
            }
        }
        Ok::<_, crate::Error>(())
    }
    .await;
    observer.event(Event::Finished {
        op: Operation::CompareSource,
    });
    result?;
    Ok(out)
}

/// Whether block `index` of `backup` is read in this run: a keyed hash with a per-run key, so
/// every run samples other blocks.
fn sampled(run_key: &[u8; 32], backup: &str, index: u64, percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    let mut h = blake3::Hasher::new_keyed(run_key);
    h.update(backup.as_bytes());
    h.update(&index.to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(first) % 10_000) < (percent * 100.0) as u64
}

#[cfg(test)]
mod tests {
    use super::sampled;

    #[test]
    fn sampling_takes_about_the_share_asked_for() {
        let key = [7u8; 32];
        for percent in [0.0, 1.0, 10.0, 50.0, 100.0] {
            let n = (0..20_000).filter(|&i| sampled(&key, "b", i, percent)).count() as f64;
            let expect = 20_000.0 * percent / 100.0;
            assert!((n - expect).abs() <= 20_000.0 * 0.01 + 1.0, "{percent} %: {n} of 20000");
        }
        // Another run, other blocks.
        let a: Vec<u64> = (0..1000).filter(|&i| sampled(&key, "b", i, 10.0)).collect();
        let b: Vec<u64> = (0..1000).filter(|&i| sampled(&[8u8; 32], "b", i, 10.0)).collect();
        assert_ne!(a, b);
    }
}
