//! A backup's session: how a running backup stays visible to garbage collection
//! (FORMAT.md §12; docs/design/gc-protocol.md).
//!
//! [`Session::begin`] promises the manifest name the backup will commit, writes
//! `sessions/<volume>/<name>/session`, and only then lists `gc/`: a sweep already published
//! makes its candidates *Wait* for this backup. A watcher task looks at `gc/` every `poll`;
//! for a sweep published later it acknowledges, in one step under the gate's lock, every chunk
//! the backup had already decided to reference that the sweep would delete, and from then on
//! those candidates are *Wait* too. A chunk that must wait is re-checked (HEAD, upload if
//! missing) once the sweep is over. A GC fences the manifest key of a session that does not
//! answer; its commit then fails with [`Error::Fenced`] and nothing is lost.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::gc::{decode_ids, encode_ids, gen_key, get_record, list_gens, put_record, Holder};
use crate::repo::{put_create, BackupRef, Repository};

/// How a session watches for garbage collection.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// How often the watcher lists `gc/` (a GC waits up to its ack timeout for an answer).
    pub poll: Duration,
    /// How long a chunk may wait for a sweep to end before the backup gives up.
    pub sweep_wait: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            poll: Duration::from_secs(10),
            sweep_wait: Duration::from_secs(6 * 3600),
        }
    }
}

/// What a backup may do with a chunk it wants to reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Use any evidence: the index, HEAD, or upload.
    Go,
    /// A GC that ran during this session had it as a candidate: ask the store (HEAD), not the
    /// index, and upload it if missing.
    Verify,
    /// A sweep that may delete it is running: wait until generation `.0` is over
    /// ([`Session::wait_over`]), then decide again.
    Wait(u64),
}

#[derive(Default)]
struct Gate {
    decided: HashSet<ChunkId>,
    /// Candidates of sweeps in progress, by generation.
    active: BTreeMap<u64, Arc<HashSet<ChunkId>>>,
    /// Candidates of sweeps that ended during this session.
    suspect: HashSet<ChunkId>,
    /// Generations observed at the start or acknowledged.
    seen: BTreeSet<u64>,
    /// Chunks inherited from the parent's map that were candidates of a running sweep.
    inherited_waiting: Vec<(ChunkId, u64)>,
    /// The last watcher failure (the GC fences a session that cannot answer).
    watcher_error: Option<String>,
    /// Commit settled (committed or fenced): nothing to abort.
    settled: bool,
    /// Acks computed but not yet stored (their PUT failed): retried on every look.
    pending_acks: BTreeMap<u64, Vec<ChunkId>>,
}

#[derive(Serialize, Deserialize)]
struct SessionRecord {
    volume: String,
    name: String,
    #[serde(flatten)]
    holder: Holder,
}

/// A running backup's session (see the module documentation).
pub struct Session {
    repo: Repository,
    backup: BackupRef,
    created: chrono::DateTime<chrono::Utc>,
    gate: Arc<Mutex<Gate>>,
    observed_gen: u64,
    opts: SessionOptions,
    watcher: tokio::task::JoinHandle<()>,
    quarantined: Arc<HashSet<ChunkId>>,
}

impl Drop for Session {
    /// A session dropped without a settled commit fences its manifest name, best effort (a
    /// GC fences it anyway after its ack timeout).
    fn drop(&mut self) {
        self.watcher.abort();
        let settled = self.gate.lock().map(|g| g.settled).unwrap_or(true);
        if !settled {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (store, key) = (self.repo.store().inner.clone(), self.backup.key());
                rt.spawn(async move {
                    let _ = put_create(store.as_ref(), &key, bytes::Bytes::new()).await;
                });
            }
        }
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument("a backup session's lock was poisoned".into())
}

impl Session {
    /// Begins a session for a backup of `volume`: mints its ID and manifest name, writes the
    /// session record, then looks at `gc/` (in that order: FORMAT.md §12).
    pub async fn begin(repo: &Repository, volume: &str, opts: SessionOptions) -> Result<Session> {
        crate::repo::validate_volume_name(volume)?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let created = chrono::Utc::now();
        let backup = BackupRef {
            volume: volume.to_string(),
            name: format!("{}-{}", created.format("%Y%m%dT%H%M%S%.6fZ"), hex::encode(id)),
        };
        let record = session_record(&backup)?;
        put_record(repo, &session_key(&backup, "session"), &record).await?;
        Self::start(repo, backup, created, opts).await
    }

    /// Begins the session of a **copy** (`ferry sync`) under exactly the manifest name of
    /// `backup` (the source's name, or another name for the same backup ID after an earlier
    /// attempt, [`copy_name`]), whose time is `created`. `Ok(None)` when a session under this
    /// name exists already: every attempt has a session of its own, never shared, never
    /// adopted (FORMAT.md §15). Like a backup's, a copy's session fences its name when it
    /// will not commit.
    pub async fn begin_named(
        repo: &Repository,
        backup: BackupRef,
        created: chrono::DateTime<chrono::Utc>,
        opts: SessionOptions,
    ) -> Result<Option<Session>> {
        crate::repo::validate_volume_name(&backup.volume)?;
        let record = session_record(&backup)?;
        if !put_record(repo, &session_key(&backup, "session"), &record).await? {
            return Ok(None);
        }
        Self::start(repo, backup, created, opts).await.map(Some)
    }

    async fn start(repo: &Repository, backup: BackupRef, created: chrono::DateTime<chrono::Utc>, opts: SessionOptions) -> Result<Session> {
        match Self::observe(repo, &backup).await {
            Ok((gate, quarantined, observed_gen)) => {
                let gate = Arc::new(Mutex::new(gate));
                let watcher = {
                    let (repo, gate, backup) = (repo.clone(), gate.clone(), backup.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(opts.poll).await;
                            let r = watch_once(&repo, &gate, &backup).await;
                            if let Ok(mut g) = gate.lock() {
                                g.watcher_error = r.err().map(|e| e.to_string());
                            }
                        }
                    })
                };
                Ok(Session {
                    repo: repo.clone(),
                    backup,
                    created,
                    gate,
                    observed_gen,
                    opts,
                    watcher,
                    quarantined,
                })
            }
            Err(e) => {
                // Fence our own name, so no GC waits for a session that never ran.
                let _ = put_create(repo.store().inner.as_ref(), &backup.key(), bytes::Bytes::new()).await;
                Err(e)
            }
        }
    }

    /// What garbage collection is doing, and what is in quarantine, as the session begins.
    async fn observe(repo: &Repository, backup: &BackupRef) -> Result<(Gate, Arc<HashSet<ChunkId>>, u64)> {
        let gens = list_gens(repo).await?;
        let mut gate = Gate::default();
        for (&g, st) in &gens {
            if st.active() {
                let k = gen_key(g, "sweep");
                let ids = decode_ids(&get_record(repo, &k).await?, &k)?;
                gate.active.insert(g, Arc::new(ids.into_iter().collect()));
                gate.seen.insert(g);
                // Nothing decided yet: an empty acknowledgement, so the GC need not wait for
                // (or fence) a session that began after its sweep was published.
                put_record(repo, &session_key(backup, &format!("ack/{g:020}")), b"").await?;
            }
        }
        // Chunks an audit or restore found missing or corrupt: never trusted from the index
        // (`decide` says Verify; the store path reads them). Kept apart from `suspect`, which
        // only GC sweeps fill: an inherited quarantined chunk is for the RBD heal to re-read,
        // not a reason to fail.
        let quarantined = Arc::new(repo.quarantined().await?);
        let observed_gen = gens.iter().filter(|(_, st)| st.over()).map(|(g, _)| *g).max().unwrap_or(0);
        Ok((gate, quarantined, observed_gen))
    }

    /// Chunks in quarantine when the session began (FORMAT.md §13).
    pub fn quarantined(&self) -> &Arc<HashSet<ChunkId>> {
        &self.quarantined
    }

    /// The backup this session will commit (its manifest key is promised).
    pub fn backup(&self) -> &BackupRef {
        &self.backup
    }

    /// The backup's time (when the session began).
    pub fn created(&self) -> chrono::DateTime<chrono::Utc> {
        self.created
    }

    /// The newest GC generation that was over when the session began: the stamp for index
    /// entries whose evidence this session gathers ([`crate::Index::advance_gc_gen`]).
    pub fn observed_gen(&self) -> u64 {
        self.observed_gen
    }

    /// Decides whether the backup may reference chunk `id` now (see [`Decision`]). `Go` and
    /// `Verify` record the decision: a sweep published later will keep the chunk.
    pub fn decide(&self, id: &ChunkId) -> Result<Decision> {
        let mut g = self.gate.lock().map_err(|_| poisoned())?;
        if let Some((&gen, _)) = g.active.iter().find(|(_, k)| k.contains(id)) {
            return Ok(Decision::Wait(gen));
        }
        g.decided.insert(*id);
        Ok(if g.suspect.contains(id) || self.quarantined.contains(id) {
            Decision::Verify
        } else {
            Decision::Go
        })
    }

    /// Decides the chunks inherited from the parent's map at once (they are referenced
    /// without being read). Those a running sweep lists, or a sweep that ended since the
    /// session began (a whole GC can run between the parent read and this call), are checked
    /// before the commit ([`Session::settle_inherited`]).
    pub fn inherit<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Result<()> {
        let mut g = self.gate.lock().map_err(|_| poisoned())?;
        for id in ids {
            if let Some((&gen, _)) = g.active.iter().find(|(_, k)| k.contains(id)) {
                g.inherited_waiting.push((*id, gen));
            } else if g.suspect.contains(id) {
                // A sweep that listed it ended between the parent read and now: check it
                // (generation 0 is never active, so `settle_inherited` HEADs it at once).
                g.inherited_waiting.push((*id, 0));
            }
            g.decided.insert(*id);
        }
        Ok(())
    }

    /// Waits until GC generation `gen` is over (ended or abandoned), as the watcher sees it.
    pub async fn wait_over(&self, gen: u64) -> Result<()> {
        let started = Instant::now();
        let step = self.opts.poll.min(Duration::from_millis(200));
        loop {
            if !self.gate.lock().map_err(|_| poisoned())?.active.contains_key(&gen) {
                return Ok(());
            }
            if started.elapsed() > self.opts.sweep_wait {
                return Err(Error::SweepWait {
                    gen,
                    secs: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(step).await;
        }
    }

    /// Makes sure every inherited chunk a sweep listed still exists once that sweep is over
    /// ([`Error::ChunkMissing`] if not: the backup has no data to upload it again).
    pub async fn settle_inherited(&self) -> Result<()> {
        let waiting = std::mem::take(&mut self.gate.lock().map_err(|_| poisoned())?.inherited_waiting);
        for (id, gen) in waiting {
            self.wait_over(gen).await?;
            if !self.repo.chunk_exists(&id).await? {
                return Err(Error::ChunkMissing {
                    id: id.to_hex(),
                    context: format!("inherited from the parent backup; garbage collection {gen} ran during this backup"),
                });
            }
        }
        Ok(())
    }

    /// Called by the commit: every inherited chunk must be settled.
    pub(crate) fn ready_to_commit(&self) -> Result<()> {
        if self.gate.lock().map_err(|_| poisoned())?.inherited_waiting.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(
                "the backup tried to commit before checking inherited chunks a garbage collection listed".into(),
            ))
        }
    }

    /// Called by the commit when its outcome is settled (committed, or fenced by a GC).
    pub(crate) fn settled(&self, settled: bool) {
        if let Ok(mut g) = self.gate.lock() {
            g.settled |= settled;
        }
    }

    /// Records that the session committed (`sessions/…/end`), so a GC knows it ended even
    /// after its manifest is forgotten. Best effort: without it a GC reads the manifest, or
    /// fences a forgotten name (harmless).
    pub(crate) async fn end(&self) {
        let _ = put_record(&self.repo, &session_key(&self.backup, "end"), b"committed").await;
        self.watcher.abort();
    }

    /// The watcher's last failure, if its last look at `gc/` failed.
    pub fn watcher_error(&self) -> Option<String> {
        self.gate.lock().ok().and_then(|g| g.watcher_error.clone())
    }

    /// Ends a session that will not commit: fences its own manifest key (a 0-byte
    /// create-only object), so garbage collection need not wait for it. Best effort: a GC
    /// fences it anyway if this fails.
    pub async fn abort(&self) {
        let settled = self.gate.lock().map(|g| g.settled).unwrap_or(false);
        if !settled {
            let _ = put_create(self.repo.store().inner.as_ref(), &self.backup.key(), bytes::Bytes::new()).await;
        }
        self.settled(true);
        self.watcher.abort();
    }
}

/// The name of copy attempt `k` of the backup named `source` (FORMAT.md §15): the source's
/// name for attempt 0, else its time `k` microseconds later with the same backup ID (names
/// still sort by time, and every reader takes the backup ID from the name's end).
pub fn copy_name(source: &str, k: u32) -> Option<String> {
    if k == 0 {
        return Some(source.to_string());
    }
    let (time, id) = source.rsplit_once('-')?;
    let t = chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%S%.6fZ").ok()?;
    let t = t + chrono::Duration::microseconds(i64::from(k));
    Some(format!("{}-{id}", t.format("%Y%m%dT%H%M%S%.6fZ")))
}

/// An earlier session in the repository of a backup's copy (or of the backup itself).
#[derive(Debug, Clone)]
pub struct CopyAttempt {
    /// The name it promised.
    pub backup: BackupRef,
    /// It committed (`end`).
    pub ended: bool,
    /// Its process may still run: not provably gone (a dead process of this host and boot).
    pub maybe_alive: bool,
}

/// The sessions under `sessions/<volume>/`, grouped by the backup ID their names end with.
pub async fn copy_attempts(repo: &Repository, volume: &str) -> Result<BTreeMap<String, Vec<CopyAttempt>>> {
    crate::repo::validate_volume_name(volume)?;
    let mut names: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for m in repo.list_prefix(&format!("sessions/{volume}")).await? {
        let parts: Vec<String> = m.location.parts().map(|p| p.as_ref().to_string()).collect();
        if parts.len() < 4 || parts[1] != volume {
            continue;
        }
        let e = names.entry(parts[2].clone()).or_default();
        match parts[3].as_str() {
            "end" => e.0 = true,
            "session" => e.1 = true,
            _ => {}
        }
    }
    let mut out: BTreeMap<String, Vec<CopyAttempt>> = BTreeMap::new();
    for (name, (ended, has_record)) in names {
        let backup = BackupRef {
            volume: volume.to_string(),
            name,
        };
        let maybe_alive = if has_record && !ended {
            match get_record(repo, &session_key(&backup, "session")).await {
                Ok(bytes) => serde_json::from_slice::<SessionRecord>(&bytes)
                    .map(|r| !r.holder.is_dead_here())
                    .unwrap_or(true),
                // Cleaned up by a GC since the listing: over.
                Err(Error::NotFound { .. }) => false,
                Err(e) => return Err(e),
            }
        } else {
            false
        };
        out.entry(backup.backup_id().to_string()).or_default().push(CopyAttempt {
            backup,
            ended,
            maybe_alive,
        });
    }
    Ok(out)
}

/// The session record of this process for `backup`.
fn session_record(backup: &BackupRef) -> Result<Vec<u8>> {
    serde_json::to_vec(&SessionRecord {
        volume: backup.volume.clone(),
        name: backup.name.clone(),
        holder: Holder::me(),
    })
    .map_err(|source| Error::Json {
        context: "encoding a session record".into(),
        source,
    })
}

fn session_key(r: &BackupRef, what: &str) -> String {
    format!("sessions/{}/{}/{what}", r.volume, r.name)
}

/// One look at `gc/`: acknowledge new sweeps, retire finished ones.
async fn watch_once(repo: &Repository, gate: &Mutex<Gate>, backup: &BackupRef) -> Result<()> {
    // Acks whose PUT failed before: the GC may still be waiting for them.
    let pending: Vec<(u64, Vec<ChunkId>)> = {
        let g = gate.lock().map_err(|_| poisoned())?;
        g.pending_acks.iter().map(|(k, v)| (*k, v.clone())).collect()
    };
    for (g, ack) in pending {
        put_record(repo, &session_key(backup, &format!("ack/{g:020}")), &encode_ids(&ack)).await?;
        gate.lock().map_err(|_| poisoned())?.pending_acks.remove(&g);
    }
    let gens = list_gens(repo).await?;
    {
        // A generation no longer listed (cleaned up) is over too.
        let mut g = gate.lock().map_err(|_| poisoned())?;
        let gone: Vec<u64> = g.active.keys().filter(|k| !gens.contains_key(k)).copied().collect();
        for k in gone {
            if let Some(ids) = g.active.remove(&k) {
                g.suspect.extend(ids.iter().copied());
            }
        }
    }
    for (&g, st) in &gens {
        let (seen, is_active) = {
            let gate = gate.lock().map_err(|_| poisoned())?;
            (gate.seen.contains(&g), gate.active.contains_key(&g))
        };
        if st.active() && !seen {
            let k = gen_key(g, "sweep");
            let ids: HashSet<ChunkId> = decode_ids(&get_record(repo, &k).await?, &k)?.into_iter().collect();
            // Atomically: what was decided before this point is acknowledged, what is decided
            // after it waits.
            let ack: Vec<ChunkId> = {
                let mut gate = gate.lock().map_err(|_| poisoned())?;
                let ack: Vec<ChunkId> = gate.decided.iter().filter(|id| ids.contains(id)).copied().collect();
                gate.active.insert(g, Arc::new(ids));
                gate.seen.insert(g);
                gate.pending_acks.insert(g, ack.clone());
                ack
            };
            put_record(repo, &session_key(backup, &format!("ack/{g:020}")), &encode_ids(&ack)).await?;
            gate.lock().map_err(|_| poisoned())?.pending_acks.remove(&g);
        } else if st.over() && is_active {
            let mut gate = gate.lock().map_err(|_| poisoned())?;
            if let Some(k) = gate.active.remove(&g) {
                gate.suspect.extend(k.iter().copied());
            }
        }
    }
    Ok(())
}
