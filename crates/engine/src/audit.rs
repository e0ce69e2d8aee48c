//! Audit: prove manifests authentic, chains continuous between the backups that exist, chunks
//! present (and, sampled, intact). Forgotten parents, vanished manifests and forks are
//! information, not findings: every manifest holds its complete block map.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use ferry_repo::{BackupRef, ChunkId, Manifest, Repository};
use futures::StreamExt;
use serde::Serialize;

use crate::chunks::block_objects;
use crate::error::{Error, Result};
use crate::observer::{Event, Observer, Operation};

/// What to audit.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Volumes to audit (empty: all).
    pub volumes: Vec<String>,
    /// Percentage of chunks to download and verify (0: only check they exist).
    pub read_data_percent: f64,
    /// Requests in flight.
    pub jobs: usize,
    /// Quarantine chunks found missing or corrupt (FORMAT.md §13), so the next backup that
    /// has their blocks uploads them again.
    pub quarantine: bool,
    /// Download only objects no audit verified within this long (the records under
    /// `verified/`, FORMAT.md §16), the longest unverified first.
    pub outdated_after: Option<std::time::Duration>,
    /// Stop downloading for verification once this many bytes were read (objects already
    /// in flight finish); existence checks go on.
    pub max_bytes: Option<u64>,
    /// Stop downloading for verification after this many objects (one GET each).
    pub max_requests: Option<u64>,
    /// Record the objects this audit verified (`verified/`), for later `outdated_after`. Off
    /// by default: an audit otherwise writes nothing but quarantine records.
    pub remember: bool,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            volumes: Vec::new(),
            read_data_percent: 0.0,
            jobs: 16,
            quarantine: true,
            outdated_after: None,
            max_bytes: None,
            max_requests: None,
            remember: false,
        }
    }
}

/// One observation about the repository: a problem (in [`AuditReport::findings`]) or
/// information that needs no action (in [`AuditReport::info`]).
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Findings: `manifest`, `chain`, `missing-chunk` or `corrupt-chunk`. Information:
    /// `parent-forgotten`, `parent-unreadable` or `fork`.
    pub kind: &'static str,
    /// The volume.
    pub volume: String,
    /// The backup it concerns, if one (for a `fork`: the backup the children build on).
    pub backup: Option<String>,
    /// What was seen.
    pub detail: String,
}

/// Per-volume counts.
#[derive(Debug, Serialize, Default, Clone)]
pub struct VolumeReport {
    /// Readable backups.
    pub backups: usize,
    /// Full backups.
    pub full: usize,
    /// Incremental backups.
    pub incremental: usize,
    /// The newest backup's ID.
    pub newest: Option<String>,
}

/// The audit's result; `ok` is true when there are no findings (information does not count).
#[derive(Debug, Serialize, Default, Clone)]
pub struct AuditReport {
    /// The repository URL.
    pub repository: String,
    /// Per-volume counts.
    pub volumes: BTreeMap<String, VolumeReport>,
    /// Manifests read, readable or not (not counting vanished ones).
    pub manifests_checked: usize,
    /// Manifests listed but gone when read: deleted meanwhile (a concurrent `forget` or
    /// `prune`). Not a finding: every backup is independent of the others.
    pub manifests_vanished: usize,
    /// Distinct chunks referenced by the manifests.
    pub chunks_referenced: usize,
    /// Chunks found present.
    pub chunks_present: usize,
    /// Chunks downloaded and verified.
    pub chunks_read: usize,
    /// The problems found.
    pub findings: Vec<Finding>,
    /// Information: facts about the history worth knowing that are not problems (a forgotten
    /// parent, a fork).
    pub info: Vec<Finding>,
    /// No findings.
    pub ok: bool,
    /// Chunks found missing or corrupt and put in quarantine by this audit.
    pub quarantined: usize,
    /// Bytes of objects downloaded and verified.
    pub bytes_verified: u64,
    /// Objects not read because a recent audit verified them (`outdated_after`).
    pub chunks_fresh: usize,
    /// Objects that were due to be read but were not, because the budget was spent.
    pub chunks_outdated_left: usize,
    /// `max_bytes` or `max_requests` stopped the reads.
    pub budget_reached: bool,
}

/// Downloads and fully decodes one object (a chunk, or a delta object as the delta of its
/// target on its base); returns its size in the store.
async fn verify_object(repo: &Arc<Repository>, id: &ChunkId, delta: Option<(ChunkId, ChunkId)>) -> ferry_repo::Result<u64> {
    let object = Vec::from(repo.get_chunk_object(id).await?);
    let size = object.len() as u64;
    let (repo, id) = (repo.clone(), *id);
    crate::cpu::run(move || match delta {
        None => repo.decode_chunk(&id, object).map(|_| ()),
        Some((target, base)) => repo.decode_delta(&id, &target, &base, object).map(|_| ()),
    })
    .await
    .unwrap_or_else(|e| {
        Err(ferry_repo::Error::Io {
            context: "decode worker".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })?;
    Ok(size)
}

/// What one object's check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// Found present (HEAD).
    Present,
    /// Downloaded and verified.
    Read,
}

/// The audit's download budget.
struct Budget {
    max_bytes: Option<u64>,
    max_requests: Option<u64>,
    bytes: std::sync::atomic::AtomicU64,
    requests: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

impl Budget {
    /// Takes one download from the budget; false (counted as left over) when it is spent.
    fn take_request(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.max_bytes.is_some_and(|m| self.bytes.load(Relaxed) >= m) {
            self.refused.fetch_add(1, Relaxed);
            return false;
        }
        let n = self.requests.fetch_add(1, Relaxed);
        if self.max_requests.is_some_and(|m| n >= m) {
            self.refused.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    fn reached(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// What reading one listed manifest gave.
#[derive(Debug)]
pub(crate) enum ManifestRead {
    /// Read, authenticated and decoded.
    Read(Box<Manifest>),
    /// Gone since it was listed (`NotFound`): deleted meanwhile.
    Vanished,
    /// Present but damaged, not authentic, or of a format this build cannot read.
    Unreadable(ferry_repo::Error),
}

/// Sorts the result of reading a listed manifest; an error is a failure of the store (not a
/// finding about the data), which stops the audit.
pub(crate) fn classify_read(read: ferry_repo::Result<Manifest>) -> std::result::Result<ManifestRead, ferry_repo::Error> {
    match read {
        Ok(m) => Ok(ManifestRead::Read(Box::new(m))),
        // Forgotten between the listing and the read, or fenced by a GC meanwhile: not there.
        Err(ferry_repo::Error::NotFound { .. } | ferry_repo::Error::Fenced { .. }) => Ok(ManifestRead::Vanished),
        Err(e) if e.is_integrity() || matches!(e, ferry_repo::Error::UnsupportedFormat { .. }) => Ok(ManifestRead::Unreadable(e)),
        Err(e) => Err(e),
    }
}

/// Runs the audit. Findings are data (the report); an unreachable store is an error.
pub(crate) async fn audit(repo: Arc<Repository>, observer: Arc<dyn Observer>, opts: &AuditOptions) -> Result<AuditReport> {
    observer.event(Event::Started {
        op: Operation::Audit,
        total: None,
    });
    let r = run(repo, observer.as_ref(), opts).await;
    observer.event(Event::Finished { op: Operation::Audit });
    r
}

async fn run(repo: Arc<Repository>, observer: &dyn Observer, opts: &AuditOptions) -> Result<AuditReport> {
    let mut refs = repo.list_backups(None).await?;
    if !opts.volumes.is_empty() {
        for v in &opts.volumes {
            ferry_repo::validate_volume_name(v)?;
        }
        refs.retain(|b| opts.volumes.contains(&b.volume));
    }
    let jobs = opts.jobs.max(1);
    let mut report = AuditReport {
        repository: repo.url().to_string(),
        ..Default::default()
    };
    // 1. Read every listed manifest (in list order).
    let mut outcomes = Vec::with_capacity(refs.len());
    let mut reads = futures::stream::iter(refs.into_iter().map(|b| {
        let repo = repo.clone();
        async move {
            let m = repo.read_manifest(&b).await;
            (b, m)
        }
    }))
    .buffered(jobs);
    while let Some((b, m)) = reads.next().await {
        match classify_read(m) {
            Ok(m) => outcomes.push((b, m)),
            Err(e) => return Err(Error::from(e).context(format!("audit could not read manifest {}", b.key()))),
        }
    }
    // 2. Manifests and chains.
    let manifests = analyse(&mut report, outcomes);
    // 3. Every referenced chunk exists (and, sampled, decodes to its ID).
    // Who references a bad chunk is found afterwards, from the manifests (every backup).
    // Objects, not content IDs: whole chunks, and delta objects with what they must decode to.
    let mut delta_of: HashMap<ChunkId, (ChunkId, ChunkId)> = HashMap::new();
    for (_, m) in &manifests {
        for (target, d) in &m.deltas {
            delta_of.insert(d.object, (*target, d.base));
        }
    }
    let chunk_refs: HashSet<ChunkId> = manifests.iter().flat_map(|(_, m)| m.objects()).collect();
    report.chunks_referenced = chunk_refs.len();
    let percent = opts.read_data_percent.clamp(0.0, 100.0);
    let read_key = blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let started = chrono::Utc::now();
    // What recent audits verified (FORMAT.md §16): not read again within the window.
    let fresh: HashMap<ChunkId, chrono::DateTime<chrono::Utc>> = match opts.outdated_after {
        Some(window) if percent > 0.0 => {
            let since = started - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            ferry_repo::verified::verified_since(&repo, since)
                .await
                .map_err(|e| Error::from(e).context("reading the verification records"))?
        }
        _ => HashMap::new(),
    };
    // Sample by a per-run keyed hash of the ID: uniform, and different each run. With a
    // window, only outdated objects are candidates.
    let mut items: Vec<(ChunkId, bool)> = chunk_refs
        .into_iter()
        .map(|id| {
            let h = blake3::keyed_hash(read_key.as_bytes(), &id.0);
            let mut first = [0u8; 8];
            first.copy_from_slice(&h.as_bytes()[..8]);
            let sampled = percent >= 100.0 || (percent > 0.0 && (u64::from_le_bytes(first) % 10_000) < (percent * 100.0) as u64);
            (id, sampled && !fresh.contains_key(&id))
        })
        .collect();
    report.chunks_fresh = items.iter().filter(|(id, _)| fresh.contains_key(id)).count();
    // Reads first (so a budget is spent on them, not cut short by existence checks), and
    // among them the objects verified longest ago — never-verified ones first.
    items.sort_by_key(|(id, read)| (!*read, fresh.get(id).copied(), *id));
    let budget = Arc::new(Budget {
        max_bytes: opts.max_bytes,
        max_requests: opts.max_requests,
        bytes: std::sync::atomic::AtomicU64::new(0),
        requests: std::sync::atomic::AtomicU64::new(0),
        refused: std::sync::atomic::AtomicU64::new(0),
    });
    // Owned items: the future stays `Send` (a borrowing closure here defeats the compiler's
    // proof, so the audit could not be spawned).
    let checks = items.into_iter().map(|(id, read)| {
        let repo = repo.clone();
        let delta = delta_of.get(&id).copied();
        let budget = budget.clone();
        async move {
            let read = read && budget.take_request();
            let res = if read {
                verify_object(&repo, &id, delta).await.map(|size| {
                    budget.bytes.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                    Checked::Read
                })
            } else {
                repo.chunk_exists(&id).await.and_then(|e| {
                    if e {
                        Ok(Checked::Present)
                    } else {
                        Err(ferry_repo::Error::NotFound { path: id.object_key() })
                    }
                })
            };
            (id, res)
        }
    });
    let mut results = futures::stream::iter(checks).buffer_unordered(jobs);
    let mut done = 0u64;
    let mut verified: Vec<ChunkId> = Vec::new();
    let mut bad: HashMap<ChunkId, (&'static str, String)> = HashMap::new();
    while let Some((id, res)) = results.next().await {
        done += 1;
        observer.event(Event::Progress {
            op: Operation::Audit,
            done,
        });
        match res {
            Ok(checked) => {
                report.chunks_present += 1;
                if checked == Checked::Read {
                    report.chunks_read += 1;
                    verified.push(id);
                }
            }
            Err(ferry_repo::Error::NotFound { .. }) => {
                bad.insert(id, ("missing-chunk", "is missing".to_string()));
            }
            Err(e) if e.is_integrity() => {
                bad.insert(id, ("corrupt-chunk", e.to_string()));
            }
            Err(e) => return Err(Error::from(e).context("audit could not check the repository")),
        }
    }
    drop(results);
    report.bytes_verified = budget.bytes.load(std::sync::atomic::Ordering::Relaxed);
    report.budget_reached = budget.reached();
    report.chunks_outdated_left = budget.refused.load(std::sync::atomic::Ordering::Relaxed) as usize;
    if opts.remember && !verified.is_empty() {
        verified.sort();
        ferry_repo::verified::record_verified(&repo, &verified, started)
            .await
            .map_err(|e| Error::from(e).context("recording what this audit verified"))?;
    }
    // Every backup that references a bad chunk, not only the first one found.
    for (b, m) in &manifests {
        let mut hits: BTreeMap<ChunkId, Vec<u64>> = BTreeMap::new();
        // A block needs its whole delta chain: a bad base is reported for every block on it.
        for (i, id) in m.blocks.iter().enumerate() {
            let Some(id) = id else { continue };
            let objects = block_objects(&m.deltas, id).unwrap_or_else(|_| vec![*id]);
            for o in objects.into_iter().filter(|o| bad.contains_key(o)) {
                hits.entry(o).or_default().push(i as u64);
            }
        }
        for (id, blocks) in hits {
            let (kind, what) = &bad[&id];
            let noun = if delta_of.contains_key(&id) { "delta object" } else { "chunk" };
            let more = match blocks.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            report.findings.push(Finding {
                kind,
                volume: b.volume.clone(),
                backup: Some(m.meta.backup_id.clone()),
                detail: format!("{noun} {id} (block {}{more}) {what}", blocks[0]),
            });
        }
    }
    if opts.quarantine {
        for (id, (kind, what)) in &bad {
            repo.quarantine(id, &format!("audit: {what}"), *kind == "corrupt-chunk")
                .await
                .map_err(|e| Error::from(e).context(format!("quarantining chunk {id}")))?;
            report.quarantined += 1;
        }
    }
    report.ok = report.findings.is_empty();
    Ok(report)
}

/// The audit of the manifests themselves, with no I/O: counts the reads, reports unreadable
/// manifests, counts the volumes' backups, and checks continuity between the backups that
/// exist. Returns the readable manifests (in the order given).
///
/// Continuity, per incremental:
/// - its recorded parent exists: the parent's to-snapshot must be its from-snapshot and the
///   block sizes must agree, else a `chain` finding;
/// - its parent is gone (forgotten, pruned, vanished during the audit): nothing to report if
///   another backup of the volume ends at its from-snapshot, else `parent-forgotten`
///   information — never a finding, as every manifest holds the complete block map;
/// - its parent is listed but unreadable: `parent-unreadable` information (the parent's own
///   `manifest` finding is the problem);
/// - it records no parent at all (no ferry writes that): a `chain` finding.
///
/// Two or more backups recorded with the same parent are a `fork` (information).
pub(crate) fn analyse(report: &mut AuditReport, reads: Vec<(BackupRef, ManifestRead)>) -> Vec<(BackupRef, Manifest)> {
    let mut manifests: Vec<(BackupRef, Manifest)> = Vec::with_capacity(reads.len());
    let mut unreadable: HashSet<(String, String)> = HashSet::new();
    for (b, r) in reads {
        match r {
            ManifestRead::Read(m) => {
                report.manifests_checked += 1;
                manifests.push((b, *m));
            }
            ManifestRead::Vanished => report.manifests_vanished += 1,
            ManifestRead::Unreadable(e) => {
                report.manifests_checked += 1;
                unreadable.insert((b.volume.clone(), b.backup_id().to_string()));
                report.findings.push(Finding {
                    kind: "manifest",
                    volume: b.volume.clone(),
                    backup: Some(b.backup_id().to_string()),
                    detail: e.to_string(),
                });
            }
        }
    }
    let by_id: HashMap<(&str, &str), &Manifest> = manifests
        .iter()
        .map(|(b, m)| ((b.volume.as_str(), m.meta.backup_id.as_str()), m))
        .collect();
    // Which backups end at each snapshot, per volume.
    let mut ending_at: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for (b, m) in &manifests {
        if let Some(to) = &m.meta.to_snap {
            ending_at
                .entry((b.volume.as_str(), to.as_str()))
                .or_default()
                .push(m.meta.backup_id.as_str());
        }
    }
    // Children per recorded parent, per volume (children in list order).
    let mut children: BTreeMap<(&str, &str), Vec<&Manifest>> = BTreeMap::new();
    let mut info = Vec::new();
    for (b, m) in &manifests {
        let v = report.volumes.entry(b.volume.clone()).or_default();
        v.backups += 1;
        if m.meta.from_snap.is_some() {
            v.incremental += 1;
        } else {
            v.full += 1;
        }
        v.newest = Some(m.meta.backup_id.clone());
        if let Some(p) = &m.meta.parent {
            children.entry((b.volume.as_str(), p.as_str())).or_default().push(m);
        }
        let Some(from) = &m.meta.from_snap else { continue };
        let note = |kind: &'static str, detail: String| Finding {
            kind,
            volume: b.volume.clone(),
            backup: Some(m.meta.backup_id.clone()),
            detail,
        };
        let Some(parent) = &m.meta.parent else {
            report.findings.push(note(
                "chain",
                format!("incremental from '{from}' records no parent backup (its block map is complete, its origin unknown)"),
            ));
            continue;
        };
        match by_id.get(&(b.volume.as_str(), parent.as_str())) {
            Some(p) if p.meta.to_snap.as_deref() != Some(from.as_str()) => report.findings.push(note(
                "chain",
                format!(
                    "from-snapshot '{from}' differs from parent {}'s to-snapshot {}",
                    p.meta.backup_id,
                    quoted(p.meta.to_snap.as_deref())
                ),
            )),
            Some(p) if p.meta.block_size != m.meta.block_size => report.findings.push(note(
                "chain",
                format!(
                    "block size {} differs from parent {}'s {}",
                    m.meta.block_size.get(),
                    p.meta.backup_id,
                    p.meta.block_size.get()
                ),
            )),
            Some(_) => {}
            None if unreadable.contains(&(b.volume.clone(), parent.clone())) => info.push(note(
                "parent-unreadable",
                format!("parent backup {parent} is in the repository but its manifest is unreadable (see its finding); continuity from '{from}' not checked"),
            )),
            None => {
                let continued = ending_at
                    .get(&(b.volume.as_str(), from.as_str()))
                    .is_some_and(|ids| ids.iter().any(|id| *id != m.meta.backup_id));
                if !continued {
                    info.push(note(
                        "parent-forgotten",
                        format!(
                            "parent backup {parent} is no longer in the repository and no backup of the volume ends at '{from}'; \
                             this backup's block map is complete, it restores on its own"
                        ),
                    ));
                }
            }
        }
    }
    for ((volume, parent), kids) in &children {
        if kids.len() < 2 {
            continue;
        }
        let list = kids
            .iter()
            .map(|k| format!("{} (to {})", k.meta.backup_id, quoted(k.meta.to_snap.as_deref())))
            .collect::<Vec<_>>()
            .join(", ");
        let parent_desc = match by_id.get(&(*volume, *parent)) {
            Some(p) => format!("this backup (to {})", quoted(p.meta.to_snap.as_deref())),
            None if unreadable.contains(&(volume.to_string(), parent.to_string())) => {
                "this backup (its manifest is unreadable)".to_string()
            }
            None => "this backup (no longer in the repository)".to_string(),
        };
        info.push(Finding {
            kind: "fork",
            volume: volume.to_string(),
            backup: Some(parent.to_string()),
            detail: format!("{} backups build on {parent_desc}: {list}", kids.len()),
        });
    }
    // Per volume, in list order; a volume's forks after its other notes.
    info.sort_by(|a, b| a.volume.cmp(&b.volume));
    report.info.extend(info);
    manifests
}

fn quoted(snap: Option<&str>) -> String {
    snap.map_or_else(|| "(none)".to_string(), |s| format!("'{s}'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_repo::{BackupStats, BlockSize, ManifestMeta, Source};

    const VOL: &str = "v";

    /// A manifest of volume `v` with a 4-block map; `id` is also the name's suffix.
    fn backup(id: &str, parent: Option<&str>, from: Option<&str>, to: &str) -> (BackupRef, Manifest) {
        backup_bs(id, parent, from, to, 1 << 20)
    }

    fn backup_bs(id: &str, parent: Option<&str>, from: Option<&str>, to: &str, bs: u64) -> (BackupRef, Manifest) {
        let meta = ManifestMeta {
            format: ferry_repo::MANIFEST_FORMAT,
            backup_id: id.to_string(),
            repository_id: "0".repeat(32),
            volume: VOL.to_string(),
            created: chrono::Utc::now(),
            source: Source {
                kind: "diff-stream".into(),
                ..Default::default()
            },
            from_snap: from.map(str::to_string),
            to_snap: Some(to.to_string()),
            parent: parent.map(str::to_string),
            follows: None,
            seq: None,
            image_size: 4 * bs,
            block_size: BlockSize::new(bs).expect("block size"),
            labels: Default::default(),
            protected: false,
            stats: BackupStats::default(),
        };
        let r = BackupRef {
            volume: VOL.to_string(),
            name: format!("20250101T000000.000000Z-{id}"),
        };
        (
            r,
            Manifest {
                meta,
                blocks: vec![None; 4],
                deltas: Default::default(),
            },
        )
    }

    fn run(backups: Vec<(BackupRef, Manifest)>) -> AuditReport {
        let mut report = AuditReport::default();
        let reads = backups.into_iter().map(|(b, m)| (b, ManifestRead::Read(Box::new(m)))).collect();
        analyse(&mut report, reads);
        report
    }

    fn kinds(fs: &[Finding]) -> Vec<(&str, Option<&str>)> {
        fs.iter().map(|f| (f.kind, f.backup.as_deref())).collect()
    }

    #[test]
    fn an_intact_chain_has_no_findings_and_no_info() {
        let r = run(vec![
            backup("a1", None, None, "s1"),
            backup("a2", Some("a1"), Some("s1"), "s2"),
            backup("a3", Some("a2"), Some("s2"), "s3"),
        ]);
        assert!(r.findings.is_empty() && r.info.is_empty(), "{r:#?}");
        let v = &r.volumes[VOL];
        assert_eq!((v.backups, v.full, v.incremental, v.newest.as_deref()), (3, 1, 2, Some("a3")));
        assert_eq!(r.manifests_checked, 3);
    }

    #[test]
    fn a_removed_parent_is_information_not_a_finding() {
        // a2 was forgotten: a3 continues from 's2', which no remaining backup ends at.
        let r = run(vec![backup("a1", None, None, "s1"), backup("a3", Some("a2"), Some("s2"), "s3")]);
        assert!(r.findings.is_empty(), "{r:#?}");
        assert_eq!(kinds(&r.info), [("parent-forgotten", Some("a3"))]);
        assert!(r.info[0].detail.contains("a2") && r.info[0].detail.contains("'s2'"), "{r:#?}");
    }

    #[test]
    fn a_removed_parent_whose_snapshot_another_backup_ends_at_is_fine() {
        // a2 and b2 both end at 's2' (a re-backup of the same snapshot); a2 is gone.
        let r = run(vec![
            backup("a1", None, None, "s1"),
            backup("b2", Some("a1"), Some("s1"), "s2"),
            backup("a3", Some("a2"), Some("s2"), "s3"),
        ]);
        assert!(r.findings.is_empty() && r.info.is_empty(), "{r:#?}");
        // A backup does not continue itself.
        let r = run(vec![backup("a1", None, None, "s1"), backup("a3", Some("a2"), Some("s2"), "s2")]);
        assert_eq!(kinds(&r.info), [("parent-forgotten", Some("a3"))]);
        // Nor does a backup of another volume.
        let (mut other_ref, mut other) = backup("w2", None, None, "s2");
        other_ref.volume = "w".into();
        other.meta.volume = "w".into();
        let r = run(vec![
            backup("a1", None, None, "s1"),
            (other_ref, other),
            backup("a3", Some("a2"), Some("s2"), "s3"),
        ]);
        assert_eq!(kinds(&r.info), [("parent-forgotten", Some("a3"))]);
    }

    #[test]
    fn a_continuity_break_with_the_parent_present_is_a_finding() {
        let r = run(vec![
            backup("a1", None, None, "s1"),
            backup("a2", Some("a1"), Some("s1"), "s2"),
            backup("a3", Some("a2"), Some("s1"), "s3"),
        ]);
        assert_eq!(kinds(&r.findings), [("chain", Some("a3"))], "{r:#?}");
        assert!(
            r.findings[0].detail.contains("'s1'") && r.findings[0].detail.contains("'s2'"),
            "{r:#?}"
        );
        // Even when some other backup ends at the from-snapshot: the recorded parent decides.
        assert!(r.info.is_empty(), "{r:#?}");
        assert!(!r.ok);
    }

    #[test]
    fn a_block_size_change_with_the_parent_present_is_a_finding() {
        let r = run(vec![
            backup("a1", None, None, "s1"),
            backup_bs("a2", Some("a1"), Some("s1"), "s2", 1 << 22),
        ]);
        assert_eq!(kinds(&r.findings), [("chain", Some("a2"))], "{r:#?}");
        assert!(r.findings[0].detail.contains("block size"), "{r:#?}");
    }

    #[test]
    fn an_incremental_recording_no_parent_is_a_finding() {
        let r = run(vec![backup("a1", None, None, "s1"), backup("a2", None, Some("s1"), "s2")]);
        assert_eq!(kinds(&r.findings), [("chain", Some("a2"))], "{r:#?}");
    }

    #[test]
    fn forks_are_information_naming_parent_and_children() {
        let r = run(vec![
            backup("a1", None, None, "s1"),
            backup("a2", Some("a1"), Some("s1"), "s2"),
            backup("b2", Some("a1"), Some("s1"), "t2"),
            backup("a3", Some("a2"), Some("s2"), "s3"),
        ]);
        assert!(r.findings.is_empty(), "{r:#?}");
        assert_eq!(kinds(&r.info), [("fork", Some("a1"))], "{r:#?}");
        let d = &r.info[0].detail;
        assert!(d.starts_with("2 backups build on this backup (to 's1')"), "{d}");
        assert!(d.contains("a2 (to 's2')") && d.contains("b2 (to 't2')"), "{d}");
        // The fork survives its parent: both children are still there.
        let r = run(vec![
            backup("a2", Some("a1"), Some("s1"), "s2"),
            backup("b2", Some("a1"), Some("s1"), "t2"),
        ]);
        assert_eq!(
            kinds(&r.info),
            [
                ("parent-forgotten", Some("a2")),
                ("parent-forgotten", Some("b2")),
                ("fork", Some("a1"))
            ]
        );
        assert!(r.info[2].detail.contains("no longer in the repository"), "{r:#?}");
    }

    fn not_found() -> ferry_repo::Error {
        ferry_repo::Error::NotFound {
            path: "volumes/v/backups/x".into(),
        }
    }

    #[test]
    fn reads_are_classified_vanished_unreadable_or_store_failure() {
        let (_, m) = backup("a1", None, None, "s1");
        assert!(matches!(classify_read(Ok(m)), Ok(ManifestRead::Read(_))));
        assert!(matches!(classify_read(Err(not_found())), Ok(ManifestRead::Vanished)));
        let damaged = ferry_repo::Error::ManifestDecode {
            path: "volumes/v/backups/x".into(),
            reason: "bad".into(),
        };
        assert!(matches!(classify_read(Err(damaged)), Ok(ManifestRead::Unreadable(_))));
        // Anything else (the store failing, above all) stops the audit.
        let other = ferry_repo::Error::InvalidArgument("store trouble".into());
        assert!(matches!(classify_read(Err(other)), Err(ferry_repo::Error::InvalidArgument(_))));
    }

    #[test]
    fn a_vanished_manifest_is_counted_not_reported_and_its_child_is_fine() {
        let (r1, m1) = backup("a1", None, None, "s1");
        let (r2, _) = backup("a2", Some("a1"), Some("s1"), "s2");
        let (r3, m3) = backup("a3", Some("a2"), Some("s2"), "s3");
        let mut report = AuditReport::default();
        let kept = analyse(
            &mut report,
            vec![
                (r1, ManifestRead::Read(Box::new(m1))),
                (r2, classify_read(Err(not_found())).expect("not a store failure")),
                (r3, ManifestRead::Read(Box::new(m3))),
            ],
        );
        assert_eq!(kept.len(), 2);
        assert_eq!((report.manifests_checked, report.manifests_vanished), (2, 1));
        assert!(report.findings.is_empty(), "{report:#?}");
        assert_eq!(kinds(&report.info), [("parent-forgotten", Some("a3"))]);
        assert_eq!(report.volumes[VOL].backups, 2);
    }

    #[test]
    fn an_unreadable_parent_is_its_own_finding_and_information_for_the_child() {
        let (r1, m1) = backup("a1", None, None, "s1");
        let (r2, _) = backup("a2", Some("a1"), Some("s1"), "s2");
        let (r3, m3) = backup("a3", Some("a2"), Some("s2"), "s3");
        let mut report = AuditReport::default();
        let damaged = ferry_repo::Error::Integrity { path: r2.key() };
        analyse(
            &mut report,
            vec![
                (r1, ManifestRead::Read(Box::new(m1))),
                (r2, ManifestRead::Unreadable(damaged)),
                (r3, ManifestRead::Read(Box::new(m3))),
            ],
        );
        assert_eq!(report.manifests_checked, 3);
        assert_eq!(kinds(&report.findings), [("manifest", Some("a2"))]);
        assert_eq!(kinds(&report.info), [("parent-unreadable", Some("a3"))]);
    }
}
