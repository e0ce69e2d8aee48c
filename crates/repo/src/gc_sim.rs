//! Deterministic simulation of garbage collection beside running backups: the protocol of
//! FORMAT.md §12 as implemented in `gc.rs` (`collect_garbage`), `session.rs` (backup sessions),
//! `repo.rs` (`Repository::commit`) and `index.rs` (gc_gen stamps), as of commit 21c8d1a. The
//! failure cases and invariants come from the review in docs/design/gc.md; this file was first
//! written against docs/design/gc-protocol.md, whose variants survive as modes (see
//! `Proto::from_name`).
//!
//! # The protocol modelled (the default, `Proto::IMPLEMENTED`)
//!
//! * Backup: PUT-create `sessions/<v>/<name>/session`; LIST `gc/` (in pages); for each active
//!   sweep (`sweep`, no `end`, no `abandoned`) GET its K into the active set and PUT-create an
//!   empty ack for it (nothing is decided yet; if that fails, the session fences its own name
//!   and the backup fails); raise (never lower) the host index's gc_gen to the newest
//!   generation that is over. Then evidence: the parent read, then `inherit` (the whole map is
//!   decided at once; chunks in an active K are HEADed once that sweep is over, missing → the
//!   backup fails), and per block a decision under the gate: in an active K → Wait until the
//!   sweep is over, then decide again; in the suspect set → Verify (HEAD); else the index
//!   (trusted only if its stamp is the index's current gc_gen) or HEAD, upload if missing.
//!   (ferry skips that HEAD while new content streams in and lets the create-only PUT find an
//!   existing chunk: the same evidence at the same step, so the model's HEAD stands for both.)
//!   The watcher lists `gc/` every H steps: first it sends again any ack whose PUT failed; a
//!   new active sweep → GET K, under the gate ack = decided ∩ K, K joins the active set,
//!   PUT-create the ack; a sweep over (or gone) → its K moves to the suspect set. Commit: the
//!   manifest PUT is sent once; 201 → committed; 412 → GET: a fence → fenced (404: ours,
//!   pruned → committed); unknown → resolve with the fence (resent as the retry policy
//!   allows): 201 → not committed; 412 → GET: our manifest or 404 → committed, a fence → not
//!   committed; the fence never answers → one last GET: our manifest → committed, a fence →
//!   not committed, nothing → "not committed" (no fence, the session not ended). Then
//!   PUT-create `end` (best effort), then the index (entries stamped with the gc_gen observed
//!   at the start). A backup that fails before its commit sends its fence once (best effort).
//! * GC: claim `gc/<n>/run` (a dead holder, or one past its deadline — the operator's
//!   `--takeover` — is abandoned first); mark: LIST `volumes/` (0 bytes = a fence), GET each
//!   manifest → R; LIST `chunks/` → K; PUT `gc/<n>/sweep`; LIST `sessions/`. A session whose
//!   key was a fence in the mark's listing is ended; one with `end` is ended (its manifest is
//!   read unless the mark listed it); any other — a listed manifest without `end` too — is
//!   running and settled in rounds (GET the manifest: a manifest → add, ended; a fence →
//!   ended; 404 → GET the ack: present → add its IDs) until all are settled or the ack timeout
//!   passes; each still open is fenced (201 → nothing; 412 → GET, a manifest → add; no answer
//!   within the retry policy → the GC abandons its own generation and returns the error).
//!   Then the sweep (HEAD `abandoned` before each DELETE; stop if present), HEAD `abandoned`,
//!   the cleanup of the listed objects of the ended sessions (their `end` last), HEAD
//!   `abandoned`, `end`, and the removal of generations older than the newest 1–2 (16 in the
//!   code).
//!
//! # Findings (against the implementation)
//!
//! 1. **S1: `inherit` ignores the suspect set.** If a whole sweep runs between the parent read
//!    and `Session::inherit` (the watcher acks it before the parent's chunks are decided; for
//!    RBD the snapshot and the start of export-diff come in between), a parent pruned before
//!    the mark loses its chunks, and `inherit` — which checks only chunks of an *active* K —
//!    references them unchecked. No crash, timeout or takeover needed; 35 steps:
//!    `problem_9_sweep_over_before_the_parent_is_decided`; random seed 348641 in 10^6. Fix:
//!    `inherit` also checks (HEAD before the commit, missing → fail) the parent's chunks that
//!    are in the suspect set (mode `inherit-verify`).
//! 2. **S6 (and S1) after a long hang**: removing old generations deletes their `abandoned`
//!    markers, so a GC taken over while alive that resumes after 16 later GCs finds none and
//!    deletes again. `a_gc_that_resumes_after_its_abandoned_marker_was_removed_deletes_again`;
//!    seeds 96014, 159820, 378460, 475324 (with 1–2 generations kept). Fix: keep the
//!    `abandoned` markers (`keep-abandoned`), or also stop when `gc/<gen>/run` is gone (HEAD
//!    `abandoned`, then `run`: `run` is deleted first). With both fixes (`fixed`) 10^6 seeds
//!    are clean; without them these five are the only failures in 10^6.
//! 3. Fixed in 21c8d1a, kept as a regression test: the cleanup was not guarded by `abandoned`
//!    (`unguarded-cleanup`), so a GC taken over while alive deleted the session objects of a
//!    backup that committed after the new GC's mark, and the new GC deleted its chunk
//!    (`live_takeover_then_unguarded_cleanup_hides_a_committed_session`).
//! 4. The previous commit (send the manifest PUT again on an unknown outcome, `retry-commit`)
//!    breaks S1 against this GC too: an attempt still in flight re-creates a manifest after
//!    the commit settled, wrote `end`, and was pruned
//!    (`as_written_manifest_put_retry_recreates_a_pruned_manifest`; the previous helper's
//!    trace itself is now safe). The previous GC rule (a manifest in the mark's listing ends a
//!    session, `ended-if-listed`) is harmless with the single PUT (10^6 seeds), and breaks S1
//!    with the retrying one (`pre-change`, `manifest_listed_then_pruned_while_the_backup_resolves`).
//! 5. The timing assumption (no GC DELETE lands after a takeover of its GC, or after that
//!    GC's own `end`) is needed: `zombie` and `end-early` break S1. A chunk whose Wait is over
//!    must be decided again (mutation g); gc_gen must be raised, never set (h). The empty ack
//!    at the start spares a backup that began between `sweep` and the GC's LIST of `sessions/`
//!    a fence (`no-start-ack`; one still happens when that ack is slow or lost).
//! 6. S3 as "an entry whose stamp is the index's gc_gen names an existing chunk" is not an
//!    invariant; see `Sim::check` for the two forms that are.
//!
//! # Model
//!
//! One seed = one small world: 2 hosts (one local index each), 2 volumes, 3–5 backups (some
//! run again after failing, up to 8), 1–2 prunes, 2–6 GCs (sometimes in a burst), 6 chunk
//! IDs, some old manifests, orphan chunks and index entries. A seeded scheduler picks
//! uniformly among the enabled steps or, with a per-seed probability, by PCT-style priorities
//! with a few priority drops. One step is one store request phase or one local decision.
//!
//! * The store holds typed objects with linearizable create-only PUT, GET, HEAD, DELETE and
//!   LIST in pages of 1–2 keys, one page per step; pages are not snapshots.
//! * Chunk, manifest, fence, ack and `end` PUTs and GC DELETEs are requests: sent by one step,
//!   applied by another (possibly much later: some requests are slow; or never), answered by a
//!   third. A response can be lost and a waiting actor can time out; both leave the outcome
//!   unknown and the actor does what the code does (retry up to the per-seed attempts, read
//!   back, fence, or give up).
//! * Any actor can crash at any step; its requests in flight may still be applied. A later GC
//!   takes over a crashed GC, or a live one past its deadline (`--takeover`), which then stops
//!   at its next `abandoned` check. A takeover (and a GC's own `end`) waits until that GC's
//!   DELETEs in flight are applied or lost: the protocol's one timing assumption (the HEAD
//!   before a DELETE and the DELETE are one step for the same reason).
//! * Time is the step counter: the ack timeout, the GC's poll, the watcher period H and the GC
//!   deadline are in steps, so a pause is the scheduler not running an actor.
//!
//! Checked after every step: S1 closure (a present manifest references only existing chunks),
//! S2 (a deciding backup's established chunks exist), S3a and S3b (the index), S5 (a key that
//! held a fence never holds a manifest; success is reported only if the manifest landed), S6
//! (at most one generation between `sweep` and `end`/`abandoned`; no DELETE applied after its
//! generation is over). At the end of a seed the world drains (fair scheduling, no more
//! crashes, timeouts or lost responses; a GC takes over what is left), every request in flight
//! is applied or lost, and a final uncontended GC runs; then the chunks must be exactly those
//! the present manifests reference, and every backup that reported success must be present
//! (unless pruned) and restorable.
//!
//! A failing seed prints its world and trace. Replay:
//! `FERRY_SIM_SEED=<seed> [FERRY_SIM_MODE=<mode>] cargo test -p ferry-repo replay_seed --
//! --nocapture` (modes: see `Proto::from_name`). `FERRY_SIM_SEEDS` (and
//! `FERRY_SIM_FIRST_SEED`, `FERRY_SIM_MODE`) change the 10,000 seeds of the main test;
//! `FERRY_SIM_MUTATION_SEEDS` the 20,000 of the mutation searches.
//!
//! Not modelled: clock skew (the protocol compares no clocks); wrong or lost store writes;
//! transient errors of GET, HEAD and LIST, and the GC's other give-up points (they stop it
//! before the sweep and abandon its generation); retries inside the store client
//! (object_store resends a PUT after a 5xx, 429 or 408 answer, create-only or not: a manifest
//! PUT resent that way is the retrying commit again, covered only by the timing assumption);
//! `--grace` (young chunks kept); several sessions of one backup name; a prune racing a fence
//! that it listed as a manifest (prune deletes only what is a manifest when its DELETE
//! applies); the local index being lost or shared by concurrent processes; quarantine; the
//! index sync path (reading every manifest into the index), which stamps evidence like a
//! parent read; duplicate blocks within one backup (its `claimed` set); DELETE batches of
//! more than one key; cleanup DELETEs in flight; old generations removed key by key (here a
//! generation goes in one step); the backup's sweep-wait limit (6 h).

use std::fmt::Write as _;

// ------------------------------------------------------------------------------------- PRNG

/// splitmix64: tiny, fast and good enough to drive a scheduler.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille` / 1000.
    fn pm(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.below(1000) < u64::from(per_mille)
    }
}

// ------------------------------------------------------------------------------ chunk sets

/// A set of chunk IDs from the universe `0..UNIVERSE`, as a bit mask.
type Chunks = u8;
const UNIVERSE: u8 = 6;

fn bit(c: u8) -> Chunks {
    1 << c
}

/// Displays a chunk set as `{c0,c3}`.
struct Ids(Chunks);

impl std::fmt::Display for Ids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        let mut first = true;
        for c in 0..UNIVERSE {
            if self.0 & bit(c) != 0 {
                if !first {
                    f.write_str(",")?;
                }
                write!(f, "c{c}")?;
                first = false;
            }
        }
        f.write_str("}")
    }
}

// ----------------------------------------------------------------------------------- store

/// What a manifest key holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Obj {
    Empty,
    Manifest(Chunks),
    /// 0 bytes: aborted by the backup or fenced by a GC.
    Fence,
}

/// `volumes/<v>/backups/<name>`.
struct MKey {
    volume: u8,
    /// The backup that promised this name (None: a backup from before the simulation).
    owner: Option<usize>,
    obj: Obj,
    /// Some fence was ever stored here (S5).
    ever_fenced: bool,
    /// A prune deleted the manifest stored here.
    pruned: bool,
    /// The owner's manifest PUT was applied here (S5: success only after that).
    landed: bool,
}

/// `gc/<gen>/{abandoned,end,run,sweep}` (all absent after cleanup).
#[derive(Clone, Copy, Default)]
struct GenRec {
    run: Option<usize>,
    sweep: Option<Chunks>,
    end: Option<Chunks>,
    abandoned: bool,
}

impl GenRec {
    /// Over: ended, abandoned, or cleaned up (only ever done to gens that were over).
    fn over(&self) -> bool {
        self.end.is_some() || self.abandoned || self.run.is_none()
    }

    fn has(&self, kind: u64) -> bool {
        match kind {
            0 => self.abandoned,
            1 => self.end.is_some(),
            2 => self.run.is_some(),
            _ => self.sweep.is_some(),
        }
    }
}

const ABANDONED: u8 = 1;
const END: u8 = 2;
const RUN: u8 = 4;
const SWEEP: u8 = 8;

/// `sessions/<v>/<name>/{session,end}` of backup `sid` (its index); `rank` is the name's place
/// in LIST order. Its acks are in [`Store::acks`].
struct Sess {
    /// `…/session`.
    record: bool,
    /// `…/end` (written after a commit).
    end: bool,
    key: usize,
    rank: u32,
}

/// The last part of a key under `sessions/<v>/<name>/`, as LIST orders them (`ack/<gen>` <
/// `end` < `session`): an ack is its generation (< 64).
const SUB_END: u64 = 100;
const SUB_SESSION: u64 = 101;

struct Store {
    chunks: Chunks,
    keys: Vec<MKey>,
    sessions: Vec<Sess>,
    /// `sessions/<v>/<name>/ack/<gen>`: (sid, gen, chunks).
    acks: Vec<(usize, u32, Chunks)>,
    /// Indexed by generation; index 0 is never used.
    gens: Vec<GenRec>,
}

/// A LIST prefix.
#[derive(Clone, Copy)]
enum Space {
    Gc,
    Sessions,
    Volumes(Option<u8>),
    Chunks,
}

impl Store {
    /// The smallest present key of `space` after `after` (keys are encoded in LIST order).
    fn next_key(&self, space: Space, after: Option<u64>) -> Option<u64> {
        let mut best: Option<u64> = None;
        let mut consider = |k: u64| {
            if after.is_none_or(|a| k > a) && best.is_none_or(|b| k < b) {
                best = Some(k);
            }
        };
        match space {
            Space::Gc => {
                for (g, rec) in self.gens.iter().enumerate().skip(1) {
                    for kind in 0..4 {
                        if rec.has(kind) {
                            consider(g as u64 * 4 + kind);
                        }
                    }
                }
            }
            Space::Sessions => {
                let base = |sid: usize| u64::from(self.sessions[sid].rank) << 16 | (sid as u64) << 8;
                for (sid, s) in self.sessions.iter().enumerate() {
                    if s.record {
                        consider(base(sid) | SUB_SESSION);
                    }
                    if s.end {
                        consider(base(sid) | SUB_END);
                    }
                }
                for &(sid, gen, _) in &self.acks {
                    consider(base(sid) | u64::from(gen));
                }
            }
            Space::Volumes(v) => {
                for (i, k) in self.keys.iter().enumerate() {
                    if k.obj != Obj::Empty && v.is_none_or(|v| v == k.volume) {
                        consider(u64::from(k.volume) << 16 | i as u64);
                    }
                }
            }
            Space::Chunks => {
                for c in 0..UNIVERSE {
                    if self.chunks & bit(c) != 0 {
                        consider(u64::from(c));
                    }
                }
            }
        }
        best
    }

    fn ack(&self, sid: usize, gen: u32) -> Option<Chunks> {
        self.acks.iter().find(|a| a.0 == sid && a.1 == gen).map(|a| a.2)
    }

    fn gen(&self, g: u32) -> GenRec {
        self.gens.get(g as usize).copied().unwrap_or_default()
    }

    fn gen_mut(&mut self, g: u32) -> &mut GenRec {
        let g = g as usize;
        if self.gens.len() <= g {
            self.gens.resize(g + 1, GenRec::default());
        }
        &mut self.gens[g]
    }
}

/// A paged LIST in progress.
#[derive(Default)]
struct Listing {
    after: Option<u64>,
    seen: Vec<u64>,
    done: bool,
}

impl Listing {
    fn reset(&mut self) {
        self.after = None;
        self.seen.clear();
        self.done = false;
    }

    /// What a `gc/` listing showed for generation `g` (ABANDONED | END | RUN | SWEEP).
    fn gen_flags(&self, g: u32) -> u8 {
        let mut f = 0;
        for &k in &self.seen {
            if k / 4 == u64::from(g) {
                f |= 1 << (k % 4);
            }
        }
        f
    }

    /// The generations a `gc/` listing showed, ascending.
    fn gens(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.seen.iter().map(|&k| (k / 4) as u32).collect();
        v.dedup();
        v
    }
}

/// A host's local index: known chunks stamped with the gc_gen of the evidence.
#[derive(Clone, Copy, Default)]
struct Index {
    gc_gen: u32,
    stamp: [Option<u32>; UNIVERSE as usize],
}

// -------------------------------------------------------------------------------- requests

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Thread {
    Main(usize),
    Watch(usize),
    Gc(usize),
    Prune(usize),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Chunk(u8),
    Manifest {
        key: usize,
        refs: Chunks,
    },
    Fence {
        key: usize,
    },
    Ack {
        sid: usize,
        gen: u32,
        refs: Chunks,
    },
    /// `sessions/<v>/<name>/end` of backup `sid`.
    End {
        sid: usize,
    },
    Delete {
        chunk: u8,
        gen: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Res {
    Created,
    Exists,
    Deleted,
}

/// What a thread's step gets: nothing (it is not waiting), a response, or an unknown outcome.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Input {
    Start,
    Resp(Res),
    Unknown,
}

struct Req {
    thread: Thread,
    kind: Kind,
    applied: Option<Res>,
    awaited: bool,
    prio: u64,
    /// A slow request is not applied before this time (a queue, a proxy, a retry loop).
    not_before: u64,
}

// ---------------------------------------------------------------------------------- actors

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Life {
    Running,
    Crashed,
    Done,
}

/// A backup's main thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Main {
    SessionPut,
    StartList,
    StartGetK,
    /// The empty ack of a sweep active at the start is in flight.
    StartAckAwait,
    Bump,
    ParentPick,
    ParentGet,
    ParentDecide,
    Blocks,
    CommitAwait,
    CommitReadBack,
    ResolveAwait,
    ResolveReadBack,
    /// The resolving fence failed as often as the retry policy allows: one last GET.
    ResolveLastLook,
    AbortAwait,
    EndAwait,
    IndexUpdate,
    Finished,
}

/// Where the current block (or inherited chunk to check) is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Decide,
    Waiting(u32),
    Head,
    PutAwait,
}

/// A backup's watcher thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Watch {
    Idle,
    /// An ack whose PUT failed in an earlier look is sent again.
    PendingAwait,
    List,
    GetK,
    AckAwait,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Running,
    Committed,
    /// Not committed: the backup's own fence (abort, or an unknown outcome resolved).
    Aborted,
    /// Not committed: a GC's fence was there first.
    Fenced,
}

struct Backup {
    host: usize,
    volume: u8,
    key: usize,
    start: u64,
    prio: [u64; 2],
    life: Life,
    blocks: Chunks,
    want_parent: bool,
    fail_at: Option<usize>,
    main: Main,
    main_wait: Option<usize>,
    list: Listing,
    to_fetch: Vec<u32>,
    parent_key: Option<usize>,
    parent: Chunks,
    /// Blocks to decide (None), then inherited chunks to check once gen `g` is over (Some(g)).
    todo: Vec<(u8, Option<u32>)>,
    cur: usize,
    stage: Stage,
    /// The gate: K of every sweep being waited out, by generation.
    active: Vec<(u32, Chunks)>,
    suspect: Chunks,
    decided: Chunks,
    /// Decided chunks whose existence the backup has established (S2).
    established: Chunks,
    /// Generations observed at start or acknowledged (bit per generation).
    known: u64,
    /// Generations observed (active) at start.
    observed: u64,
    waited: u64,
    obs_gen: u32,
    bumped: bool,
    refs: Chunks,
    sent_manifest: bool,
    /// Failed attempts of the main thread's current PUT, and of the watcher's.
    tries: u32,
    wtries: u32,
    outcome: Outcome,
    watch: Watch,
    watch_wait: Option<usize>,
    next_watch: u64,
    wlist: Listing,
    new_gens: Vec<u32>,
    ack_refs: Chunks,
    /// Acks computed but not stored (their PUT gave up): sent again first on every look.
    pending_acks: Vec<(u32, Chunks)>,
}

impl Backup {
    fn active_gen_of(&self, c: u8) -> Option<u32> {
        self.active.iter().find(|a| a.1 & bit(c) != 0).map(|a| a.0)
    }

    fn active_union(&self) -> Chunks {
        self.active.iter().fold(0, |u, a| u | a.1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GcPc {
    ClaimList,
    Abandon,
    Claim,
    MarkList,
    MarkGet,
    ChunkList,
    Sweep,
    /// LIST `sessions/`.
    SessList,
    /// One listed session: ended (fence in the mark's listing; `end`: GET its manifest) or
    /// running.
    Classify,
    /// A round over the running sessions: GET the manifest…
    Settle,
    /// …404: GET the ack.
    AckGet,
    /// Between rounds.
    Sleep,
    FenceSend,
    FenceAwait,
    FenceReadBack,
    Cleanup,
    Delete,
    DeleteAwait,
    End,
    CleanupGens,
    Finished,
}

/// A session as the GC's LIST of `sessions/` showed it.
#[derive(Clone, Copy)]
struct SessView {
    sid: usize,
    record: bool,
    end: bool,
    /// Generations of the acks listed (bit per generation).
    acks: u64,
}

struct Gc {
    start: u64,
    prio: u64,
    life: Life,
    pc: GcPc,
    wait: Option<usize>,
    gen: u32,
    /// Past it, another GC may take over this one although it runs (`--takeover`).
    deadline: u64,
    list: Listing,
    dead: Vec<u32>,
    i: usize,
    /// Manifest keys the mark's LIST showed, and which of them were fences (size 0).
    keys: Vec<usize>,
    listed_fences: u64,
    sess: Vec<SessView>,
    /// Running sessions not settled yet (indices into `sess`).
    open: Vec<usize>,
    /// Sessions found ended (their listed objects are cleaned up).
    ended: Vec<usize>,
    settle_deadline: u64,
    wake: u64,
    /// Failed attempts of the current fence PUT.
    tries: u32,
    r: Chunks,
    k: Chunks,
    d: Chunks,
    deleted: Chunks,
    /// How it finished: "ended", "refused", "stopped" (abandoned), "failed" (a fence PUT's
    /// outcome was unknown: the GC returns the error).
    result: &'static str,
}

struct Prune {
    volume: u8,
    start: u64,
    prio: u64,
    life: Life,
    wait: Option<usize>,
    left: u32,
    list: Listing,
    listed: bool,
}

// ------------------------------------------------------------------------------- protocol

/// A fix turned off, to show the simulator notices (each must lead to an S1 or S5 violation).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mutation {
    None,
    /// (a) GC treats a session that did not ack in time as nothing instead of fencing it.
    NoFence,
    /// (b) GC does not wait for acks (and does not fence): an open session counts as nothing.
    NoAckWait,
    /// (c) No Dekker: the backup gathers all its evidence (parent, index, HEAD, uploads) and
    /// decides every chunk before it writes its session and lists `gc/` (the draft's order,
    /// problem 9 / PSA-2025-00019-1); then it commits.
    NoDekker,
    /// (d1) Index entries are trusted whatever their stamp.
    IndexIgnoresStamp,
    /// (d2) No suspect set: a finished sweep's K is forgotten, the index is trusted again.
    NoSuspect,
    /// (e) Cleanup deletes the objects of every session listed, not just the ended ones (so
    /// an acked session, still running, disappears from the next GC's listing).
    CleanupLive,
    /// (f) No one-GC-at-a-time claim: each GC takes a fresh generation and runs.
    NoClaim,
    /// (g) A chunk that waited for a sweep is HEADed / uploaded without being decided again
    /// (so it never joins `decided` and no later ack covers it).
    WaitNoRedecide,
    /// (h) A backup *sets* its host index's gc_gen to what it observed instead of raising it:
    /// a backup whose LIST predates a sweep's end can lower it after a newer one raised it.
    IndexGenAssign,
}

/// Protocol switches for one run.
#[derive(Clone, Copy, Debug)]
struct Proto {
    /// The commit before this change (gc-protocol.md step 6, repo.rs's retry loop): an unknown
    /// outcome of the manifest PUT is resolved by sending the PUT again (412 → read back; 404
    /// after 412 → again), so an earlier attempt may still be in flight when the commit is
    /// settled. false (as implemented): the PUT is sent once; an unknown outcome is resolved
    /// with the fence.
    retry_commit: bool,
    /// The GC before this change: a session whose manifest key was *occupied* in the mark's
    /// listing (a manifest too, not only a fence) is ended. false (as implemented): only a
    /// fence in the listing, or `end`, ends a session; a listed manifest without `end` is
    /// settled like any running session.
    ended_if_listed: bool,
    /// A backup acks (with an empty set) every sweep active when it starts. false: the
    /// previous protocol (it never acks those; a GC that listed it fences it for nothing).
    start_ack: bool,
    /// GC cleans up the ended sessions after `end` (the previous order) instead of before the
    /// sweep.
    cleanup_after_end: bool,
    /// GC HEADs `gc/<gen>/abandoned` before the cleanup of the ended sessions and before
    /// `end` (and stops if it exists), as before each sweep batch (as implemented since
    /// 21c8d1a). false: the cleanup is unguarded (068c879).
    cleanup_checks_abandoned: bool,
    /// The removal of old generations keeps their `abandoned` markers. false (as
    /// implemented): it deletes every object of a generation older than the newest 16 (here:
    /// than the newest 1–2), so a GC taken over while alive that resumes later finds no
    /// `abandoned` and goes on deleting.
    keep_abandoned: bool,
    /// `Session::inherit` checks (HEAD before the commit) the parent's chunks in the suspect
    /// set too, not only those in an active K. false (as implemented): a sweep that begins and
    /// ends between the parent read and `inherit` (the watcher acked it without the parent's
    /// chunks) deleted chunks the backup then references unchecked.
    inherit_checks_suspect: bool,
    /// A GC DELETE may be applied after its generation was abandoned (a takeover does not
    /// wait for the dead GC's DELETEs in flight).
    zombie: bool,
    /// A GC writes `end` although one of its DELETEs timed out and may still be in flight
    /// (takeover still waits: only the GC's own `end` is early).
    end_early: bool,
    /// Check S2 and S3 (off for mutation runs, which look for S1 / S5).
    early_checks: bool,
    mutation: Mutation,
}

impl Proto {
    /// The protocol as implemented (FORMAT.md §12 after this change): the default.
    const IMPLEMENTED: Proto = Proto {
        retry_commit: false,
        ended_if_listed: false,
        start_ack: true,
        cleanup_after_end: false,
        cleanup_checks_abandoned: true,
        keep_abandoned: true,
        inherit_checks_suspect: true,
        zombie: false,
        end_early: false,
        early_checks: true,
        mutation: Mutation::None,
    };

    fn mutated(m: Mutation) -> Proto {
        Proto {
            early_checks: false,
            mutation: m,
            ..Proto::IMPLEMENTED
        }
    }

    /// `FERRY_SIM_MODE`: "implemented" (or empty: the default), or a comma-separated list of
    /// changes to it. The two fixes found by this simulation are now implemented (keep-abandoned,
    /// inherit-verify, fixed: no-ops kept for old command lines); drop-abandoned and
    /// inherit-no-verify undo them. Previous protocols: retry-commit, ended-if-listed, pre-change (both of those), no-start-ack,
    /// cleanup-after-end, unguarded-cleanup. Broken assumptions: zombie, end-early. Mutations:
    /// no-fence, no-ack-wait, no-dekker, index-ignores-stamp, no-suspect, cleanup-live,
    /// no-claim, wait-no-redecide, index-gen-assign. s1-only: just turn the early checks (S2,
    /// S3) off. Every change but the fixes, no-start-ack and cleanup-after-end turns them off
    /// too: those runs look for S1 and S5.
    fn from_name(name: &str) -> Option<Proto> {
        let mut p = Proto::IMPLEMENTED;
        for part in name.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let unsafe_change = !matches!(
                part,
                "implemented" | "no-start-ack" | "cleanup-after-end" | "keep-abandoned" | "inherit-verify" | "fixed"
            );
            p.early_checks &= !unsafe_change;
            match part {
                "implemented" | "s1-only" => {}
                "retry-commit" => p.retry_commit = true,
                "ended-if-listed" => p.ended_if_listed = true,
                "pre-change" => (p.retry_commit, p.ended_if_listed) = (true, true),
                "no-start-ack" => p.start_ack = false,
                "cleanup-after-end" => p.cleanup_after_end = true,
                "unguarded-cleanup" => p.cleanup_checks_abandoned = false,
                "keep-abandoned" => p.keep_abandoned = true,
                "inherit-verify" => p.inherit_checks_suspect = true,
                "fixed" => (p.keep_abandoned, p.inherit_checks_suspect) = (true, true),
                "drop-abandoned" => p.keep_abandoned = false,
                "inherit-no-verify" => p.inherit_checks_suspect = false,
                "zombie" => p.zombie = true,
                "end-early" => p.end_early = true,
                "no-fence" => p.mutation = Mutation::NoFence,
                "no-ack-wait" => p.mutation = Mutation::NoAckWait,
                "no-dekker" => p.mutation = Mutation::NoDekker,
                "index-ignores-stamp" => p.mutation = Mutation::IndexIgnoresStamp,
                "no-suspect" => p.mutation = Mutation::NoSuspect,
                "cleanup-live" => p.mutation = Mutation::CleanupLive,
                "no-claim" => p.mutation = Mutation::NoClaim,
                "wait-no-redecide" => p.mutation = Mutation::WaitNoRedecide,
                "index-gen-assign" => p.mutation = Mutation::IndexGenAssign,
                _ => return None,
            }
        }
        Some(p)
    }

    fn named(name: &str) -> Proto {
        Proto::from_name(name).expect("a known mode")
    }
}

/// Per-seed world parameters.
struct Params {
    ack_timeout: u64,
    /// The GC's pause between settling rounds.
    gc_poll: u64,
    /// The retry policy's attempts for a backup's PUTs (chunks, acks, `end`, the resolving
    /// fence) and a GC's fence; the manifest PUT and an abort's fence are sent once.
    attempts: u32,
    watch_every: u64,
    gc_deadline: u64,
    gen_lag: u32,
    pct_pm: u32,
    crash_pm: u32,
    timeout_pm: u32,
    loss_pm: u32,
    drop_pm: u32,
    slow_pm: u32,
    budget: u64,
    change_points: Vec<u64>,
}

/// Things that happened, to show a run exercised what it should.
#[derive(Clone, Copy, Default, Debug)]
struct Stats {
    commits: u64,
    /// Problem 2: the manifest PUT got 412 and the key held a GC's fence.
    fenced_at_commit: u64,
    /// Problem 3: the manifest PUT's outcome was unknown.
    commit_unknown: u64,
    /// The fence resolving an unknown outcome got 412, and the key was empty when read back:
    /// our manifest, pruned since (committed).
    resolved_pruned: u64,
    /// The resolving fence failed every attempt and the last look found the key empty: "not
    /// committed", with no fence (the manifest PUT may still land; the GC settles the session).
    resolve_gave_up: u64,
    aborted: u64,
    /// Problem 1: a backup crashed with its manifest PUT sent.
    crashed_after_put: u64,
    gc_fences: u64,
    /// A GC fenced a live backup that had observed its sweep at start.
    needless_fences: u64,
    /// Empty acks of sweeps active when a backup started.
    start_acks: u64,
    /// Acks the watcher sent.
    acks: u64,
    waits: u64,
    deletes: u64,
    sweeps_ended: u64,
    abandoned: u64,
    /// A GC returned an error: its fence PUT's outcome was unknown.
    gc_failed: u64,
    /// Sessions a GC found ended by their `end` record.
    ended_by_end: u64,
    /// Sessions whose manifest the mark listed but that had no `end`: settled as running.
    listed_running: u64,
    /// …of which the manifest was gone when the mark read it, and the backup was still in its
    /// commit (the case FORMAT.md §12.3 step 4 settles instead of ending).
    listed_pruned_running: u64,
    /// Settling rounds after the first.
    settle_rounds: u64,
    /// Problem 7: an index entry named a missing chunk; its stamp was stale, so it was HEADed.
    stale_entry_expired: u64,
    /// Problem 4/7: a current-stamp index entry named a missing chunk; the suspect set HEADed.
    suspect_saved: u64,
    /// Problem 4: a backup that had waited for one sweep acked a later one.
    ack_after_wait: u64,
    /// Problem 9: a parent a running backup had read was pruned while a GC was marking.
    parent_pruned_in_mark: u64,
    /// GC DELETEs applied after their generation was over (zombie mode only).
    late_deletes: u64,
    /// A GC found a dead generation with a DELETE still in flight (it must wait before
    /// writing `abandoned`, unless in zombie mode).
    takeover_in_flight: u64,
    seeds: u64,
    steps: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.commits += o.commits;
        self.fenced_at_commit += o.fenced_at_commit;
        self.commit_unknown += o.commit_unknown;
        self.resolved_pruned += o.resolved_pruned;
        self.resolve_gave_up += o.resolve_gave_up;
        self.aborted += o.aborted;
        self.crashed_after_put += o.crashed_after_put;
        self.gc_fences += o.gc_fences;
        self.needless_fences += o.needless_fences;
        self.start_acks += o.start_acks;
        self.acks += o.acks;
        self.waits += o.waits;
        self.deletes += o.deletes;
        self.sweeps_ended += o.sweeps_ended;
        self.abandoned += o.abandoned;
        self.gc_failed += o.gc_failed;
        self.ended_by_end += o.ended_by_end;
        self.listed_running += o.listed_running;
        self.listed_pruned_running += o.listed_pruned_running;
        self.settle_rounds += o.settle_rounds;
        self.stale_entry_expired += o.stale_entry_expired;
        self.suspect_saved += o.suspect_saved;
        self.ack_after_wait += o.ack_after_wait;
        self.parent_pruned_in_mark += o.parent_pruned_in_mark;
        self.late_deletes += o.late_deletes;
        self.takeover_in_flight += o.takeover_in_flight;
        self.seeds += o.seeds;
        self.steps += o.steps;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Main,
    Drain,
    Final,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Run(Thread),
    Timeout(Thread),
    Apply(usize),
    Drop(usize),
}

// ------------------------------------------------------------------------------- simulator

struct Sim {
    seed: u64,
    proto: Proto,
    p: Params,
    rng: Rng,
    now: u64,
    phase: Phase,
    store: Store,
    index: [Index; 2],
    backups: Vec<Backup>,
    gcs: Vec<Gc>,
    prunes: Vec<Prune>,
    reqs: Vec<Req>,
    pending: Vec<usize>,
    next_gen: u32,
    low_prio: u64,
    cands: Vec<(Step, u64)>,
    trace: Option<Vec<String>>,
    stats: Stats,
    violation: Option<String>,
}

impl Sim {
    /// An empty world (scripted tests add actors by hand).
    fn empty(seed: u64, proto: Proto) -> Sim {
        Sim {
            seed,
            proto,
            p: Params {
                ack_timeout: 10,
                gc_poll: 2,
                attempts: 8,
                watch_every: 3,
                gc_deadline: 10_000,
                gen_lag: 2,
                pct_pm: 0,
                crash_pm: 0,
                timeout_pm: 0,
                loss_pm: 0,
                drop_pm: 0,
                slow_pm: 0,
                budget: 0,
                change_points: Vec::new(),
            },
            rng: Rng::new(seed),
            now: 0,
            phase: Phase::Main,
            store: Store {
                chunks: 0,
                keys: Vec::new(),
                sessions: Vec::new(),
                acks: Vec::new(),
                gens: vec![GenRec::default()],
            },
            index: [Index::default(); 2],
            backups: Vec::new(),
            gcs: Vec::new(),
            prunes: Vec::new(),
            reqs: Vec::new(),
            pending: Vec::new(),
            next_gen: 1,
            low_prio: 1 << 20,
            cands: Vec::new(),
            trace: None,
            stats: Stats::default(),
            violation: None,
        }
    }

    /// The random world of `seed`.
    fn random(seed: u64, proto: Proto) -> Sim {
        let mut s = Sim::empty(seed, proto);
        let r = &mut s.rng;
        let budget = r.range(260, 520);
        let pct_pm = if r.pm(500) { 0 } else { r.range(300, 950) as u32 };
        let n_cp = r.below(4);
        let change_points = (0..n_cp).map(|_| r.below(budget)).collect();
        s.p = Params {
            ack_timeout: r.range(3, 60),
            gc_poll: r.range(1, 8),
            attempts: r.range(1, 5) as u32,
            watch_every: r.range(1, 15),
            gc_deadline: r.range(60, 400),
            gen_lag: r.range(1, 2) as u32,
            pct_pm,
            crash_pm: r.range(0, 12) as u32,
            timeout_pm: r.range(0, 120) as u32,
            loss_pm: r.range(0, 150) as u32,
            drop_pm: r.range(0, 60) as u32,
            slow_pm: if r.pm(500) { 0 } else { r.range(20, 250) as u32 },
            budget,
            change_points,
        };
        let mut chunks = 0;
        for c in 0..UNIVERSE {
            if s.rng.pm(700) {
                chunks |= bit(c);
            }
        }
        s.store.chunks = chunks;
        for _ in 0..s.rng.range(1, 3) {
            let v = s.rng.below(2) as u8;
            let refs = s.random_set(chunks, 3);
            if refs != 0 {
                s.add_manifest(v, refs);
            }
        }
        for h in 0..2 {
            for c in 0..UNIVERSE {
                if chunks & bit(c) != 0 && s.rng.pm(450) {
                    s.index[h].stamp[c as usize] = Some(0);
                }
            }
        }
        for _ in 0..s.rng.range(3, 5) {
            let host = s.rng.below(2) as usize;
            let volume = s.rng.below(2) as u8;
            let blocks = s.random_set((1 << UNIVERSE) - 1, 4).max(1);
            let want_parent = s.rng.pm(550);
            let start = s.rng.below(budget * 2 / 3);
            let b = s.add_backup(host, volume, blocks, want_parent, start);
            if s.rng.pm(80) {
                let n = s.backups[b].blocks.count_ones() as u64;
                s.backups[b].fail_at = Some(s.rng.below(n + 1) as usize);
            }
        }
        for _ in 0..s.rng.range(1, 2) {
            let v = s.rng.below(2) as u8;
            let start = s.rng.below(budget * 3 / 4);
            let left = s.rng.range(1, 3) as u32;
            s.add_prune(v, start, left);
        }
        // GCs: sometimes in a burst (cron on several hosts), which makes them collide.
        let burst = s.rng.pm(400).then(|| s.rng.below(budget / 2));
        for _ in 0..s.rng.range(2, 6) {
            let start = match burst {
                Some(t) => t + s.rng.below(40),
                None => s.rng.below(budget * 3 / 4),
            };
            s.add_gc(start);
        }
        s
    }

    /// Up to `max` random members of `from`.
    fn random_set(&mut self, from: Chunks, max: u64) -> Chunks {
        let mut out = 0;
        for _ in 0..self.rng.range(1, max) {
            let c = self.rng.below(u64::from(UNIVERSE)) as u8;
            out |= bit(c) & from;
        }
        out
    }

    fn add_manifest(&mut self, volume: u8, refs: Chunks) -> usize {
        self.store.chunks |= refs;
        self.store.keys.push(MKey {
            volume,
            owner: None,
            obj: Obj::Manifest(refs),
            ever_fenced: false,
            pruned: false,
            landed: true,
        });
        self.store.keys.len() - 1
    }

    fn add_backup(&mut self, host: usize, volume: u8, blocks: Chunks, want_parent: bool, start: u64) -> usize {
        let b = self.backups.len();
        assert!(b < 64);
        self.store.keys.push(MKey {
            volume,
            owner: Some(b),
            obj: Obj::Empty,
            ever_fenced: false,
            pruned: false,
            landed: false,
        });
        let key = self.store.keys.len() - 1;
        let rank = self.rng.next() as u32;
        self.store.sessions.push(Sess {
            record: false,
            end: false,
            key,
            rank,
        });
        let prio = [self.rng.next() >> 2, self.rng.next() >> 2];
        let main = if self.proto.mutation == Mutation::NoDekker {
            Main::ParentPick
        } else {
            Main::SessionPut
        };
        self.backups.push(Backup {
            host,
            volume,
            key,
            start,
            prio,
            life: Life::Running,
            blocks,
            want_parent,
            fail_at: None,
            main,
            main_wait: None,
            list: Listing::default(),
            to_fetch: Vec::new(),
            parent_key: None,
            parent: 0,
            todo: Vec::new(),
            cur: 0,
            stage: Stage::Decide,
            active: Vec::new(),
            suspect: 0,
            decided: 0,
            established: 0,
            known: 0,
            observed: 0,
            waited: 0,
            obs_gen: 0,
            bumped: false,
            refs: 0,
            sent_manifest: false,
            tries: 0,
            wtries: 0,
            outcome: Outcome::Running,
            watch: Watch::Idle,
            watch_wait: None,
            next_watch: 0,
            wlist: Listing::default(),
            new_gens: Vec::new(),
            ack_refs: 0,
            pending_acks: Vec::new(),
        });
        b
    }

    fn add_gc(&mut self, start: u64) -> usize {
        let prio = self.rng.next() >> 2;
        self.gcs.push(Gc {
            start,
            prio,
            life: Life::Running,
            pc: GcPc::ClaimList,
            wait: None,
            gen: 0,
            deadline: u64::MAX,
            list: Listing::default(),
            dead: Vec::new(),
            i: 0,
            keys: Vec::new(),
            listed_fences: 0,
            sess: Vec::new(),
            open: Vec::new(),
            ended: Vec::new(),
            settle_deadline: 0,
            wake: 0,
            tries: 0,
            r: 0,
            k: 0,
            d: 0,
            deleted: 0,
            result: "",
        });
        self.gcs.len() - 1
    }

    fn add_prune(&mut self, volume: u8, start: u64, left: u32) -> usize {
        let prio = self.rng.next() >> 2;
        self.prunes.push(Prune {
            volume,
            start,
            prio,
            life: Life::Running,
            wait: None,
            left,
            list: Listing::default(),
            listed: false,
        });
        self.prunes.len() - 1
    }

    fn note(&mut self, a: std::fmt::Arguments<'_>) {
        if let Some(t) = &mut self.trace {
            t.push(format!("{:>5}  {a}", self.now));
        }
    }

    fn fail(&mut self, msg: String) {
        if self.violation.is_none() {
            self.note(format_args!("VIOLATION {msg}"));
            self.violation = Some(msg);
        }
    }

    // ------------------------------------------------------------------------- requests

    fn wait_of(&mut self, t: Thread) -> &mut Option<usize> {
        match t {
            Thread::Main(b) => &mut self.backups[b].main_wait,
            Thread::Watch(b) => &mut self.backups[b].watch_wait,
            Thread::Gc(g) => &mut self.gcs[g].wait,
            Thread::Prune(p) => &mut self.prunes[p].wait,
        }
    }

    fn send(&mut self, t: Thread, kind: Kind) {
        let prio = self.rng.next() >> 2;
        let slow = self.phase == Phase::Main && self.rng.pm(self.p.slow_pm);
        let not_before = if slow { self.now + self.rng.range(10, 120) } else { 0 };
        let id = self.reqs.len();
        self.reqs.push(Req {
            thread: t,
            kind,
            applied: None,
            awaited: true,
            prio,
            not_before,
        });
        self.pending.push(id);
        *self.wait_of(t) = Some(id);
        self.note(format_args!("{} sends #{id} {}", name(t), self.kind_str(kind)));
    }

    fn kind_str(&self, k: Kind) -> String {
        match k {
            Kind::Chunk(c) => format!("PUT chunk c{c}"),
            Kind::Manifest { key, refs } => format!("PUT manifest k{key} {}", Ids(refs)),
            Kind::Fence { key } => format!("PUT fence k{key}"),
            Kind::Ack { sid, gen, refs } => format!("PUT sessions/{sid}/ack/{gen} {}", Ids(refs)),
            Kind::End { sid } => format!("PUT sessions/{sid}/end"),
            Kind::Delete { chunk, gen } => format!("DELETE c{chunk} (gen {gen})"),
        }
    }

    fn apply(&mut self, r: usize) {
        self.pending.retain(|&x| x != r);
        let kind = self.reqs[r].kind;
        let st = &mut self.store;
        let res = match kind {
            Kind::Chunk(c) => {
                if st.chunks & bit(c) != 0 {
                    Res::Exists
                } else {
                    st.chunks |= bit(c);
                    Res::Created
                }
            }
            Kind::Manifest { key, refs } => {
                let k = &mut st.keys[key];
                if k.obj != Obj::Empty {
                    Res::Exists
                } else {
                    k.obj = Obj::Manifest(refs);
                    if let Thread::Main(b) = self.reqs[r].thread {
                        k.landed |= k.owner == Some(b);
                    }
                    Res::Created
                }
            }
            Kind::Fence { key } => {
                let k = &mut st.keys[key];
                if k.obj != Obj::Empty {
                    Res::Exists
                } else {
                    k.obj = Obj::Fence;
                    k.ever_fenced = true;
                    Res::Created
                }
            }
            Kind::Ack { sid, gen, refs } => {
                if st.ack(sid, gen).is_some() {
                    Res::Exists
                } else {
                    st.acks.push((sid, gen, refs));
                    Res::Created
                }
            }
            Kind::End { sid } => {
                if st.sessions[sid].end {
                    Res::Exists
                } else {
                    st.sessions[sid].end = true;
                    Res::Created
                }
            }
            Kind::Delete { chunk, gen } => {
                let late = st.gen(gen).over();
                st.chunks &= !bit(chunk);
                self.stats.deletes += 1;
                if late {
                    self.stats.late_deletes += 1;
                    let allowed = self.proto.zombie || self.proto.end_early || self.proto.mutation == Mutation::NoClaim;
                    if !allowed {
                        self.fail(format!("S6: DELETE c{chunk} of gen {gen} applied after the gen was over"));
                    }
                }
                Res::Deleted
            }
        };
        self.reqs[r].applied = Some(res);
        let waiting = if self.reqs[r].awaited { "" } else { " (nobody waits)" };
        self.note(format_args!("store applies #{r} {} -> {res:?}{waiting}", self.kind_str(kind)));
    }

    fn pending_delete_of(&self, gen: u32) -> bool {
        self.pending
            .iter()
            .any(|&r| matches!(self.reqs[r].kind, Kind::Delete { gen: g, .. } if g == gen))
    }

    // ---------------------------------------------------------------------- scheduling

    fn life(&self, t: Thread) -> (Life, u64) {
        match t {
            Thread::Main(b) | Thread::Watch(b) => (self.backups[b].life, self.backups[b].start),
            Thread::Gc(g) => (self.gcs[g].life, self.gcs[g].start),
            Thread::Prune(p) => (self.prunes[p].life, self.prunes[p].start),
        }
    }

    fn wait_state(&self, t: Thread) -> Option<usize> {
        match t {
            Thread::Main(b) => self.backups[b].main_wait,
            Thread::Watch(b) => self.backups[b].watch_wait,
            Thread::Gc(g) => self.gcs[g].wait,
            Thread::Prune(p) => self.prunes[p].wait,
        }
    }

    /// Whether `t` can take a step now.
    fn enabled(&self, t: Thread) -> bool {
        let (life, start) = self.life(t);
        if life != Life::Running || self.now < start {
            return false;
        }
        if let Some(r) = self.wait_state(t) {
            return self.reqs[r].applied.is_some();
        }
        match t {
            Thread::Main(b) => {
                let bk = &self.backups[b];
                match (bk.main, bk.stage) {
                    (Main::Blocks, Stage::Waiting(g)) => bk.active.iter().all(|a| a.0 != g),
                    (Main::Finished, _) => false,
                    _ => true,
                }
            }
            Thread::Watch(b) => {
                let bk = &self.backups[b];
                bk.bumped
                    && !matches!(bk.main, Main::IndexUpdate | Main::Finished)
                    && (bk.watch != Watch::Idle || self.now >= bk.next_watch)
            }
            Thread::Gc(g) => {
                let gc = &self.gcs[g];
                match gc.pc {
                    GcPc::Abandon if !self.proto.zombie => !self.pending_delete_of(gc.dead[gc.i]),
                    GcPc::End if !self.proto.end_early => !self.pending_delete_of(gc.gen),
                    GcPc::Sleep => self.now >= gc.wake,
                    GcPc::Finished => false,
                    _ => true,
                }
            }
            Thread::Prune(_) => true,
        }
    }

    fn thread_prio(&self, t: Thread) -> u64 {
        match t {
            Thread::Main(b) => self.backups[b].prio[0],
            Thread::Watch(b) => self.backups[b].prio[1],
            Thread::Gc(g) => self.gcs[g].prio,
            Thread::Prune(p) => self.prunes[p].prio,
        }
    }

    fn lower_prio(&mut self, s: Step) {
        self.low_prio -= 1;
        let v = self.low_prio;
        match s {
            Step::Run(t) | Step::Timeout(t) => match t {
                Thread::Main(b) => self.backups[b].prio[0] = v,
                Thread::Watch(b) => self.backups[b].prio[1] = v,
                Thread::Gc(g) => self.gcs[g].prio = v,
                Thread::Prune(p) => self.prunes[p].prio = v,
            },
            Step::Apply(r) | Step::Drop(r) => self.reqs[r].prio = v,
        }
    }

    fn push_thread(&mut self, t: Thread, timeout_pm: u32) {
        if self.enabled(t) {
            let p = self.thread_prio(t);
            self.cands.push((Step::Run(t), p));
        } else if let Some(r) = self.wait_state(t) {
            let (life, _) = self.life(t);
            if life == Life::Running && self.reqs[r].applied.is_none() && self.rng.pm(timeout_pm) {
                let p = self.thread_prio(t);
                self.cands.push((Step::Timeout(t), p));
            }
        }
    }

    /// Runs one scheduler step. false: nothing was enabled.
    fn step(&mut self) -> bool {
        let chaos = self.phase == Phase::Main;
        if chaos && self.rng.pm(self.p.crash_pm) && self.crash_random() {
            self.after_step();
            return true;
        }
        let timeout_pm = if chaos { self.p.timeout_pm } else { 0 };
        let drop_pm = if self.phase == Phase::Final { 0 } else { self.p.drop_pm };
        self.cands.clear();
        for b in 0..self.backups.len() {
            self.push_thread(Thread::Main(b), timeout_pm);
            self.push_thread(Thread::Watch(b), timeout_pm);
        }
        for g in 0..self.gcs.len() {
            self.push_thread(Thread::Gc(g), timeout_pm);
        }
        for p in 0..self.prunes.len() {
            self.push_thread(Thread::Prune(p), timeout_pm);
        }
        for i in 0..self.pending.len() {
            let r = self.pending[i];
            let req = &self.reqs[r];
            let (p, awaited) = (req.prio, req.awaited);
            if self.now >= req.not_before || self.phase == Phase::Final {
                self.cands.push((Step::Apply(r), p));
            }
            if !awaited && self.rng.pm(drop_pm) {
                self.cands.push((Step::Drop(r), p));
            }
        }
        if self.cands.is_empty() {
            // Nothing can move: let time pass (actors yet to start, timeouts to expire).
            self.now += 1;
            return self.any_running();
        }
        // Draining is fair: liveness is judged under uniform scheduling.
        let pct_pm = if chaos { self.p.pct_pm } else { 0 };
        let pick = if self.rng.pm(pct_pm) {
            let mut best = 0;
            for (i, c) in self.cands.iter().enumerate() {
                if c.1 > self.cands[best].1 {
                    best = i;
                }
            }
            best
        } else {
            self.rng.below(self.cands.len() as u64) as usize
        };
        let s = self.cands[pick].0;
        if chaos && self.p.change_points.contains(&self.now) {
            self.lower_prio(s);
        }
        self.exec(s);
        self.after_step();
        true
    }

    fn after_step(&mut self) {
        self.now += 1;
        self.stats.steps += 1;
        self.check();
    }

    fn exec(&mut self, s: Step) {
        match s {
            Step::Run(t) => {
                let input = match self.wait_of(t).take() {
                    None => Input::Start,
                    Some(r) => {
                        self.reqs[r].awaited = false;
                        let res = self.reqs[r].applied.expect("enabled only once applied");
                        if self.phase == Phase::Main && self.rng.pm(self.p.loss_pm) {
                            self.note(format_args!("{}: response to #{r} lost", name(t)));
                            Input::Unknown
                        } else {
                            Input::Resp(res)
                        }
                    }
                };
                self.run_thread(t, input);
            }
            Step::Timeout(t) => {
                let r = self.wait_of(t).take().expect("timeout of a waiting thread");
                self.reqs[r].awaited = false;
                self.note(format_args!("{}: #{r} times out (still in flight)", name(t)));
                self.run_thread(t, Input::Unknown);
            }
            Step::Apply(r) => self.apply(r),
            Step::Drop(r) => {
                self.pending.retain(|&x| x != r);
                self.note(format_args!("network loses #{r} {}", self.kind_str(self.reqs[r].kind)));
            }
        }
    }

    fn run_thread(&mut self, t: Thread, input: Input) {
        match t {
            Thread::Main(b) => self.backup_main(b, input),
            Thread::Watch(b) => self.backup_watch(b, input),
            Thread::Gc(g) => self.gc_step(g, input),
            Thread::Prune(p) => self.prune_step(p),
        }
    }

    /// Crashes a random running actor. false: there was none.
    fn crash_random(&mut self) -> bool {
        let mut who: Vec<Thread> = Vec::new();
        for (b, bk) in self.backups.iter().enumerate() {
            if bk.life == Life::Running && self.now >= bk.start {
                who.push(Thread::Main(b));
            }
        }
        for (g, gc) in self.gcs.iter().enumerate() {
            if gc.life == Life::Running && self.now >= gc.start {
                who.push(Thread::Gc(g));
            }
        }
        for (p, pr) in self.prunes.iter().enumerate() {
            if pr.life == Life::Running && self.now >= pr.start {
                who.push(Thread::Prune(p));
            }
        }
        if who.is_empty() {
            return false;
        }
        let t = who[self.rng.below(who.len() as u64) as usize];
        self.crash(t);
        true
    }

    fn crash(&mut self, t: Thread) {
        match t {
            Thread::Main(b) | Thread::Watch(b) => {
                let bk = &mut self.backups[b];
                bk.life = Life::Crashed;
                if bk.sent_manifest && bk.outcome == Outcome::Running {
                    self.stats.crashed_after_put += 1;
                }
                self.maybe_rerun(b);
            }
            Thread::Gc(g) => self.gcs[g].life = Life::Crashed,
            Thread::Prune(p) => self.prunes[p].life = Life::Crashed,
        }
        self.note(format_args!("{} CRASHES", name(t)));
    }

    // ------------------------------------------------------------------------- backup

    fn list_page(&mut self, space: Space, l: &mut Listing) {
        let max = 1 + self.rng.below(2);
        for _ in 0..max {
            match self.store.next_key(space, l.after) {
                Some(k) => {
                    l.seen.push(k);
                    l.after = Some(k);
                }
                None => {
                    l.done = true;
                    return;
                }
            }
        }
        l.done = self.store.next_key(space, l.after).is_none();
    }

    fn backup_main(&mut self, b: usize, input: Input) {
        let t = Thread::Main(b);
        let nodekker = self.proto.mutation == Mutation::NoDekker;
        let key = self.backups[b].key;
        match self.backups[b].main {
            Main::SessionPut => {
                self.store.sessions[b].record = true;
                self.backups[b].main = Main::StartList;
                self.note(format_args!("B{b} PUT sessions/{b}/session (promises k{key})"));
            }
            Main::StartList => {
                let mut l = std::mem::take(&mut self.backups[b].list);
                self.list_page(Space::Gc, &mut l);
                self.note(format_args!("B{b} LIST gc/ page -> {}", gc_keys(&l)));
                if l.done {
                    let mut fetch = Vec::new();
                    let mut obs = 0;
                    for g in l.gens() {
                        let f = l.gen_flags(g);
                        if f & (END | ABANDONED) != 0 {
                            obs = obs.max(g);
                            self.backups[b].known |= 1 << g;
                        } else if f & SWEEP != 0 {
                            fetch.push(g);
                        }
                    }
                    let bk = &mut self.backups[b];
                    bk.obs_gen = obs;
                    bk.main = if fetch.is_empty() { Main::Bump } else { Main::StartGetK };
                    bk.to_fetch = fetch;
                }
                self.backups[b].list = l;
            }
            Main::StartGetK => {
                let g = self.backups[b].to_fetch[0];
                let Some(k) = self.store.gen(g).sweep else {
                    // Session::begin returns the GET's error: the backup fails before it has a
                    // session object to settle (no fence: a GC fences it after its ack timeout).
                    // Session::begin fails and fences its own name (best effort).
                    self.note(format_args!("B{b} GET gc/{g}/sweep -> 404: the session cannot begin"));
                    self.abort(b);
                    return;
                };
                let bk = &mut self.backups[b];
                bk.active.push((g, k));
                bk.known |= 1 << g;
                bk.observed |= 1 << g;
                let ack = bk.decided & k;
                self.note(format_args!("B{b} GET gc/{g}/sweep: K={} is Wait (active at start)", Ids(k)));
                if self.proto.start_ack {
                    // So that a GC whose LIST of sessions/ shows this session does not fence
                    // it: nothing is decided yet, the ack is empty.
                    self.stats.start_acks += 1;
                    self.backups[b].tries = 0;
                    self.backups[b].main = Main::StartAckAwait;
                    self.send(t, Kind::Ack { sid: b, gen: g, refs: ack });
                } else {
                    self.next_fetch(b);
                }
            }
            Main::StartAckAwait => match input {
                Input::Resp(_) => self.next_fetch(b),
                // put_record's error ends Session::begin, which fences its own name.
                _ if !self.again(t) => {
                    self.note(format_args!("B{b} its start ack failed: the session cannot begin"));
                    self.abort(b);
                }
                _ => {
                    let bk = &self.backups[b];
                    let gen = bk.to_fetch[0];
                    let k = bk.active.iter().find(|a| a.0 == gen).map_or(0, |a| a.1);
                    let refs = bk.decided & k;
                    self.send(t, Kind::Ack { sid: b, gen, refs });
                }
            },
            Main::Bump => {
                let bk = &mut self.backups[b];
                let idx = &mut self.index[bk.host];
                idx.gc_gen = if self.proto.mutation == Mutation::IndexGenAssign {
                    bk.obs_gen
                } else {
                    idx.gc_gen.max(bk.obs_gen)
                };
                bk.bumped = true;
                bk.next_watch = self.now + self.p.watch_every;
                let (h, gg, og, parent) = (bk.host, idx.gc_gen, bk.obs_gen, bk.want_parent);
                self.note(format_args!("B{b} index of host {h}: gc_gen {gg} (observed {og})"));
                if nodekker {
                    // (c): all evidence was gathered before; commit next.
                    self.backups[b].main = Main::Blocks;
                } else if parent {
                    self.backups[b].main = Main::ParentPick;
                } else {
                    self.enter_blocks(b);
                }
            }
            Main::ParentPick if !self.backups[b].want_parent => self.enter_blocks(b),
            Main::ParentPick => {
                let v = self.backups[b].volume;
                let options: Vec<usize> = (0..self.store.keys.len())
                    .filter(|&k| k != key && self.store.keys[k].volume == v && matches!(self.store.keys[k].obj, Obj::Manifest(_)))
                    .collect();
                if options.is_empty() {
                    self.note(format_args!("B{b} finds no parent"));
                    self.enter_blocks(b);
                } else {
                    let k = options[self.rng.below(options.len() as u64) as usize];
                    self.backups[b].parent_key = Some(k);
                    self.backups[b].main = Main::ParentGet;
                    self.note(format_args!("B{b} picks parent k{k}"));
                }
            }
            Main::ParentGet => {
                let k = self.backups[b].parent_key.expect("picked");
                match self.store.keys[k].obj {
                    Obj::Manifest(refs) => {
                        self.backups[b].parent = refs;
                        self.backups[b].main = Main::ParentDecide;
                        self.note(format_args!("B{b} GET parent k{k} -> {}", Ids(refs)));
                    }
                    o => {
                        self.backups[b].parent_key = None;
                        self.note(format_args!("B{b} GET parent k{k} -> {o:?}: no parent"));
                        self.enter_blocks(b);
                    }
                }
            }
            Main::ParentDecide => {
                // Session::inherit: the whole map is decided at once; a chunk a running sweep
                // lists is checked before the commit (settle_inherited). With the fix, so is a
                // chunk of the suspect set (generation 0 is never active: HEAD at once).
                let verify = self.proto.inherit_checks_suspect;
                let bk = &mut self.backups[b];
                let mut wait = 0;
                for c in 0..UNIVERSE {
                    if bk.parent & bit(c) == 0 {
                        continue;
                    }
                    bk.decided |= bit(c);
                    match bk.active_gen_of(c) {
                        Some(g) => {
                            bk.todo.push((c, Some(g)));
                            wait |= bit(c);
                        }
                        None if verify && bk.suspect & bit(c) != 0 => {
                            bk.todo.push((c, Some(0)));
                            wait |= bit(c);
                        }
                        None => bk.established |= bit(c),
                    }
                }
                let p = bk.parent;
                self.note(format_args!("B{b} decides parent chunks {} (to check: {})", Ids(p), Ids(wait)));
                self.enter_blocks(b);
            }
            Main::Blocks => self.block_step(b, input),
            Main::CommitAwait => match input {
                Input::Resp(Res::Created) => self.committed(b, "201"),
                Input::Resp(_) => self.backups[b].main = Main::CommitReadBack,
                _ => {
                    self.stats.commit_unknown += 1;
                    if self.proto.retry_commit {
                        let refs = self.backups[b].refs;
                        self.send(t, Kind::Manifest { key, refs });
                    } else {
                        self.resolve(b);
                    }
                }
            },
            Main::CommitReadBack => match self.store.keys[key].obj {
                // (Only the retrying commit: an earlier attempt landed.)
                Obj::Manifest(_) => self.committed(b, "412, read back: ours"),
                Obj::Fence => {
                    self.stats.fenced_at_commit += 1;
                    self.finish(b, Outcome::Fenced, "412, read back: fenced by a GC");
                }
                // 412, then nothing. Fences are never deleted: it was our manifest, pruned since
                // (settle_existing). Only the retrying commit gets here: it sends the PUT again.
                Obj::Empty if self.proto.retry_commit => {
                    self.note(format_args!("B{b} 412, read back: gone"));
                    self.backups[b].main = Main::CommitAwait;
                    self.backup_main(b, Input::Unknown);
                }
                Obj::Empty => self.committed(b, "412, read back: gone (our manifest, pruned)"),
            },
            Main::ResolveAwait => match input {
                Input::Resp(Res::Created) => self.finish(b, Outcome::Aborted, "own fence stored: not committed"),
                Input::Resp(_) => self.backups[b].main = Main::ResolveReadBack,
                // The fence may be sent again: create-only, and fences are never deleted.
                _ if self.again(t) => self.send(t, Kind::Fence { key }),
                _ => self.backups[b].main = Main::ResolveLastLook,
            },
            Main::ResolveLastLook => match self.store.keys[key].obj {
                Obj::Manifest(_) => self.committed(b, "the fence failed; last look: our manifest"),
                // "Nothing was committed as far as the store can tell": no fence, no `end`;
                // the manifest PUT may still be in flight, and the session is not ended.
                Obj::Empty => {
                    self.stats.resolve_gave_up += 1;
                    self.finish(
                        b,
                        Outcome::Aborted,
                        "the fence failed; last look: nothing (not committed, unfenced)",
                    );
                }
                Obj::Fence => self.finish(b, Outcome::Aborted, "the fence failed; last look: a fence (outcome unknown)"),
            },
            Main::ResolveReadBack => match self.store.keys[key].obj {
                Obj::Manifest(_) => self.committed(b, "fence got 412, read back: our manifest"),
                // 412 and now empty: what was there is gone, and fences are never deleted,
                // so it was our manifest, since pruned.
                Obj::Empty => {
                    self.stats.resolved_pruned += 1;
                    self.committed(b, "fence got 412, read back: gone (our manifest, pruned)");
                }
                Obj::Fence => self.finish(b, Outcome::Aborted, "fence got 412, read back: fenced"),
            },
            Main::AbortAwait => self.finish(b, Outcome::Aborted, "own fence sent (best effort)"),
            Main::EndAwait => match input {
                Input::Resp(_) => self.backups[b].main = Main::IndexUpdate,
                _ if self.again(t) => self.send(t, Kind::End { sid: b }),
                // Best effort: a GC then reads the manifest, or fences a forgotten name.
                _ => self.backups[b].main = Main::IndexUpdate,
            },
            Main::IndexUpdate => {
                let bk = &mut self.backups[b];
                let idx = &mut self.index[bk.host];
                for c in 0..UNIVERSE {
                    if bk.refs & bit(c) != 0 {
                        idx.stamp[c as usize] = Some(bk.obs_gen);
                    }
                }
                bk.main = Main::Finished;
                bk.life = Life::Done;
                let (h, r, o) = (bk.host, bk.refs, bk.obs_gen);
                self.note(format_args!("B{b} index of host {h}: {} stamped {o}", Ids(r)));
            }
            Main::Finished => {}
        }
    }

    /// The next sweep active at the start, or the index bump.
    fn next_fetch(&mut self, b: usize) {
        let bk = &mut self.backups[b];
        bk.to_fetch.remove(0);
        bk.main = if bk.to_fetch.is_empty() { Main::Bump } else { Main::StartGetK };
    }

    /// One more attempt of the PUT `t` waits for, as the retry policy allows?
    fn again(&mut self, t: Thread) -> bool {
        let tries = match t {
            Thread::Main(b) => &mut self.backups[b].tries,
            Thread::Watch(b) => &mut self.backups[b].wtries,
            Thread::Gc(g) => &mut self.gcs[g].tries,
            Thread::Prune(_) => return false,
        };
        *tries += 1;
        *tries < self.p.attempts
    }

    /// Resolves an unknown outcome of the manifest PUT with the fence.
    fn resolve(&mut self, b: usize) {
        let key = self.backups[b].key;
        self.backups[b].tries = 0;
        self.backups[b].main = Main::ResolveAwait;
        self.send(Thread::Main(b), Kind::Fence { key });
    }

    /// The blocks to decide go first, then the inherited chunks to check.
    fn enter_blocks(&mut self, b: usize) {
        let bk = &mut self.backups[b];
        let inherited = std::mem::take(&mut bk.todo);
        for c in 0..UNIVERSE {
            if bk.blocks & bit(c) != 0 && bk.established & bit(c) == 0 {
                bk.todo.push((c, None));
            }
        }
        bk.todo.extend(inherited);
        bk.refs = bk.blocks | bk.parent;
        bk.cur = 0;
        bk.stage = Stage::Decide;
        bk.main = Main::Blocks;
    }

    fn block_step(&mut self, b: usize, input: Input) {
        let t = Thread::Main(b);
        let bk = &self.backups[b];
        if bk.cur == bk.todo.len() {
            if !bk.bumped {
                // (c): the evidence is complete; only now the session and LIST gc/.
                self.backups[b].main = Main::SessionPut;
                return;
            }
            let (key, refs) = (bk.key, bk.refs);
            assert_eq!(refs & !bk.established, 0, "B{b} commits unestablished chunks");
            self.backups[b].sent_manifest = true;
            self.backups[b].main = Main::CommitAwait;
            self.send(t, Kind::Manifest { key, refs });
            return;
        }
        let (c, inherited) = bk.todo[bk.cur];
        match bk.stage {
            Stage::Decide => {
                if bk.fail_at == Some(bk.cur) {
                    self.note(format_args!("B{b} fails (source error): aborts"));
                    self.abort(b);
                    return;
                }
                match inherited {
                    // settle_inherited: wait until that sweep is over, then HEAD.
                    Some(g) => self.backups[b].stage = Stage::Waiting(g),
                    None => self.decide(b, c),
                }
            }
            Stage::Waiting(g) => {
                self.note(format_args!("B{b} wait for gen {g} is over (c{c})"));
                if inherited.is_some() || self.proto.mutation == Mutation::WaitNoRedecide {
                    self.backups[b].stage = Stage::Head;
                } else {
                    self.decide(b, c);
                }
            }
            Stage::Head => {
                if self.store.chunks & bit(c) != 0 {
                    self.note(format_args!("B{b} HEAD c{c} -> exists"));
                    self.established(b, c);
                } else if inherited.is_some() {
                    self.note(format_args!("B{b} HEAD inherited c{c} -> missing: error"));
                    self.abort(b);
                } else {
                    self.backups[b].stage = Stage::PutAwait;
                    self.backups[b].tries = 0;
                    self.note(format_args!("B{b} HEAD c{c} -> missing"));
                    self.send(t, Kind::Chunk(c));
                }
            }
            Stage::PutAwait => match input {
                Input::Resp(_) => self.established(b, c),
                _ if self.again(t) => self.send(t, Kind::Chunk(c)),
                _ => {
                    self.note(format_args!("B{b} upload of c{c} failed: aborts"));
                    self.abort(b);
                }
            },
        }
    }

    /// Decides chunk `c` under the gate: Wait, or Go (index or HEAD), or Verify (HEAD).
    fn decide(&mut self, b: usize, c: u8) {
        let bk = &mut self.backups[b];
        if let Some(g) = bk.active_gen_of(c) {
            bk.stage = Stage::Waiting(g);
            bk.waited |= 1 << g;
            self.stats.waits += 1;
            self.note(format_args!("B{b} decides c{c}: Wait(gen {g})"));
            return;
        }
        bk.decided |= bit(c);
        let idx = &self.index[bk.host];
        let exists = self.store.chunks & bit(c) != 0;
        let stamp = idx.stamp[c as usize];
        if bk.suspect & bit(c) != 0 {
            if stamp == Some(idx.gc_gen) && !exists {
                self.stats.suspect_saved += 1;
            }
            bk.stage = Stage::Head;
            self.note(format_args!("B{b} decides c{c}: Verify, suspect (HEAD)"));
            return;
        }
        match stamp {
            Some(s) if s == idx.gc_gen || self.proto.mutation == Mutation::IndexIgnoresStamp => {
                self.note(format_args!("B{b} decides c{c}: Go, index (stamp {s}) trusted"));
                self.established(b, c);
            }
            Some(s) => {
                if !exists {
                    self.stats.stale_entry_expired += 1;
                }
                bk.stage = Stage::Head;
                let gg = idx.gc_gen;
                self.note(format_args!("B{b} decides c{c}: Go, index stamp {s} != gc_gen {gg} (HEAD)"));
            }
            None => {
                bk.stage = Stage::Head;
                self.note(format_args!("B{b} decides c{c}: Go (HEAD)"));
            }
        }
    }

    fn established(&mut self, b: usize, c: u8) {
        let bk = &mut self.backups[b];
        bk.established |= bit(c);
        bk.cur += 1;
        bk.stage = Stage::Decide;
    }

    /// A backup that fails before its commit fences its own name (once, best effort).
    fn abort(&mut self, b: usize) {
        let key = self.backups[b].key;
        self.backups[b].main = Main::AbortAwait;
        self.send(Thread::Main(b), Kind::Fence { key });
    }

    fn committed(&mut self, b: usize, how: &str) {
        let bk = &mut self.backups[b];
        bk.outcome = Outcome::Committed;
        bk.main = Main::EndAwait;
        self.stats.commits += 1;
        let key = bk.key;
        self.note(format_args!("B{b} COMMITTED k{key} ({how})"));
        if !self.store.keys[key].landed {
            self.fail(format!("S5: B{b} reports success but its manifest never landed at k{key}"));
        }
        self.backups[b].tries = 0;
        self.send(Thread::Main(b), Kind::End { sid: b });
    }

    fn finish(&mut self, b: usize, o: Outcome, how: &str) {
        let bk = &mut self.backups[b];
        bk.outcome = o;
        bk.main = Main::Finished;
        bk.life = Life::Done;
        if o == Outcome::Aborted {
            self.stats.aborted += 1;
        }
        self.note(format_args!("B{b} {o:?} ({how})"));
        self.maybe_rerun(b);
    }

    /// A backup that did not commit is sometimes run again (a new backup, a new name).
    fn maybe_rerun(&mut self, b: usize) {
        if self.phase != Phase::Main || self.backups.len() >= 8 || !self.rng.pm(500) {
            return;
        }
        let bk = &self.backups[b];
        let (host, volume, blocks, parent) = (bk.host, bk.volume, bk.blocks, bk.want_parent);
        let start = self.now + self.rng.range(1, 30);
        let n = self.add_backup(host, volume, blocks, parent, start);
        self.note(format_args!("B{b} will be run again as B{n}"));
    }

    fn backup_watch(&mut self, b: usize, input: Input) {
        let t = Thread::Watch(b);
        match self.backups[b].watch {
            Watch::Idle if !self.backups[b].pending_acks.is_empty() => {
                let (gen, refs) = self.backups[b].pending_acks[0];
                self.backups[b].watch = Watch::PendingAwait;
                self.backups[b].wtries = 0;
                self.send(t, Kind::Ack { sid: b, gen, refs });
            }
            Watch::PendingAwait => match input {
                Input::Resp(_) => {
                    let bk = &mut self.backups[b];
                    bk.pending_acks.remove(0);
                    if let Some(&(gen, refs)) = bk.pending_acks.first() {
                        bk.wtries = 0;
                        self.send(t, Kind::Ack { sid: b, gen, refs });
                    } else {
                        bk.wlist.reset();
                        bk.watch = Watch::List;
                    }
                }
                _ if self.again(t) => {
                    let (gen, refs) = self.backups[b].pending_acks[0];
                    self.send(t, Kind::Ack { sid: b, gen, refs });
                }
                _ => self.watch_failed(b),
            },
            Watch::Idle | Watch::List => {
                let mut l = std::mem::take(&mut self.backups[b].wlist);
                if self.backups[b].watch == Watch::Idle {
                    l.reset();
                    self.backups[b].watch = Watch::List;
                }
                self.list_page(Space::Gc, &mut l);
                self.note(format_args!("B{b}w LIST gc/ page -> {}", gc_keys(&l)));
                if l.done {
                    let known = self.backups[b].known;
                    let new: Vec<u32> = l
                        .gens()
                        .into_iter()
                        .filter(|&g| {
                            let f = l.gen_flags(g);
                            f & SWEEP != 0 && f & (END | ABANDONED) == 0 && known & (1 << g) == 0
                        })
                        .collect();
                    if new.is_empty() {
                        self.backups[b].wlist = l;
                        self.retire(b);
                        return;
                    }
                    self.backups[b].new_gens = new;
                    self.backups[b].watch = Watch::GetK;
                }
                self.backups[b].wlist = l;
            }
            Watch::GetK => {
                let g = self.backups[b].new_gens[0];
                let Some(k) = self.store.gen(g).sweep else {
                    // Cleaned up since the listing: over, nothing to do.
                    self.next_new_gen(b);
                    return;
                };
                let bk = &mut self.backups[b];
                let ack = bk.decided & k;
                bk.active.push((g, k));
                bk.known |= 1 << g;
                if bk.waited & ((1 << g) - 1) != 0 {
                    self.stats.ack_after_wait += 1;
                }
                bk.watch = Watch::AckAwait;
                bk.ack_refs = ack;
                bk.wtries = 0;
                self.stats.acks += 1;
                self.note(format_args!("B{b}w GET gc/{g}/sweep K={}: ack = decided & K, K is Wait", Ids(k)));
                self.send(t, Kind::Ack { sid: b, gen: g, refs: ack });
            }
            Watch::AckAwait => match input {
                Input::Resp(_) => self.next_new_gen(b),
                // put_record gave up: the ack stays pending (sent again first on the next
                // look) and this look ends.
                _ if !self.again(t) => {
                    let bk = &mut self.backups[b];
                    bk.pending_acks.push((bk.new_gens[0], bk.ack_refs));
                    bk.new_gens.clear();
                    self.watch_failed(b);
                }
                _ => {
                    // The retry carries the same set: the gate computed it once.
                    let (gen, refs) = (self.backups[b].new_gens[0], self.backups[b].ack_refs);
                    self.send(t, Kind::Ack { sid: b, gen, refs });
                }
            },
        }
    }

    /// A look at `gc/` failed (watch_once returned an error): the next one comes after H.
    fn watch_failed(&mut self, b: usize) {
        let bk = &mut self.backups[b];
        bk.watch = Watch::Idle;
        bk.next_watch = self.now + self.p.watch_every;
        self.note(format_args!("B{b}w look failed: an ack is pending"));
    }

    fn next_new_gen(&mut self, b: usize) {
        self.backups[b].new_gens.remove(0);
        if self.backups[b].new_gens.is_empty() {
            self.retire(b);
        } else {
            self.backups[b].watch = Watch::GetK;
        }
    }

    /// Moves the K of every sweep the last listing showed over (or gone) to the suspect set.
    fn retire(&mut self, b: usize) {
        let nosuspect = self.proto.mutation == Mutation::NoSuspect;
        let bk = &mut self.backups[b];
        let mut i = 0;
        while i < bk.active.len() {
            let (g, k) = bk.active[i];
            let f = bk.wlist.gen_flags(g);
            if f & (END | ABANDONED) != 0 || f & SWEEP == 0 {
                bk.active.remove(i);
                if !nosuspect {
                    bk.suspect |= k;
                }
                if let Some(tr) = &mut self.trace {
                    tr.push(format!("{:>5}  B{b}w retires gen {g}: {} suspect", self.now, Ids(k)));
                }
            } else {
                i += 1;
            }
        }
        bk.watch = Watch::Idle;
        bk.next_watch = self.now + self.p.watch_every;
    }

    // ---------------------------------------------------------------------------- prune

    fn prune_step(&mut self, p: usize) {
        let v = self.prunes[p].volume;
        if !self.prunes[p].listed {
            let mut l = std::mem::take(&mut self.prunes[p].list);
            self.list_page(Space::Volumes(Some(v)), &mut l);
            self.prunes[p].listed = l.done;
            self.prunes[p].list = l;
            return;
        }
        // Only manifests (size > 0 in the listing) are candidates.
        let seen: Vec<usize> = self.prunes[p]
            .list
            .seen
            .iter()
            .map(|&k| (k & 0xFFFF) as usize)
            .filter(|&k| matches!(self.store.keys[k].obj, Obj::Manifest(_)))
            .collect();
        if let Some(&k) = seen.get(self.rng.below(seen.len().max(1) as u64) as usize) {
            self.store.keys[k].obj = Obj::Empty;
            self.store.keys[k].pruned = true;
            self.note(format_args!("P{p} DELETE manifest k{k}"));
            let marking = self
                .gcs
                .iter()
                .any(|g| g.life == Life::Running && g.gen > 0 && self.store.gen(g.gen).sweep.is_none());
            let read_by_running = self
                .backups
                .iter()
                .any(|bk| bk.life == Life::Running && bk.parent_key == Some(k) && !bk.sent_manifest);
            if marking && read_by_running {
                self.stats.parent_pruned_in_mark += 1;
            }
        }
        let pr = &mut self.prunes[p];
        pr.left -= 1;
        pr.list.reset();
        pr.listed = false;
        if pr.left == 0 {
            pr.life = Life::Done;
        }
    }

    // ------------------------------------------------------------------------------- GC

    /// The oracle behind "its pid is not alive, or --takeover": gen `g` may be taken over.
    fn gen_dead(&self, g: u32) -> bool {
        match self.store.gen(g).run {
            Some(owner) => {
                let o = &self.gcs[owner];
                o.life != Life::Running || o.pc == GcPc::Finished || self.now > o.deadline
            }
            None => true,
        }
    }

    fn gc_finish(&mut self, g: usize, result: &'static str) {
        let gc = &mut self.gcs[g];
        gc.pc = GcPc::Finished;
        gc.life = Life::Done;
        gc.result = result;
        let gen = gc.gen;
        self.note(format_args!("G{g} (gen {gen}) finishes: {result}"));
    }

    fn gc_step(&mut self, g: usize, input: Input) {
        let t = Thread::Gc(g);
        let m = self.proto.mutation;
        let gen = self.gcs[g].gen;
        match self.gcs[g].pc {
            GcPc::ClaimList => {
                let mut l = std::mem::take(&mut self.gcs[g].list);
                self.list_page(Space::Gc, &mut l);
                self.note(format_args!("G{g} LIST gc/ page -> {}", gc_keys(&l)));
                if l.done {
                    let mut dead = Vec::new();
                    let mut refuse = None;
                    for x in l.gens() {
                        let f = l.gen_flags(x);
                        if f & RUN != 0 && f & (END | ABANDONED) == 0 {
                            if self.gen_dead(x) {
                                if self.pending_delete_of(x) {
                                    self.stats.takeover_in_flight += 1;
                                }
                                dead.push(x);
                            } else if m != Mutation::NoClaim {
                                refuse = Some(x);
                            }
                        }
                    }
                    let gc = &mut self.gcs[g];
                    gc.dead = dead;
                    gc.i = 0;
                    gc.pc = if gc.dead.is_empty() { GcPc::Claim } else { GcPc::Abandon };
                    if let Some(x) = refuse {
                        self.gcs[g].list = l;
                        self.note(format_args!("G{g}: gen {x} is running"));
                        self.gc_finish(g, "refused");
                        return;
                    }
                }
                self.gcs[g].list = l;
            }
            GcPc::Abandon => {
                let x = self.gcs[g].dead[self.gcs[g].i];
                let rec = self.store.gen_mut(x);
                if !rec.abandoned {
                    rec.abandoned = true;
                    self.stats.abandoned += 1;
                }
                self.note(format_args!("G{g} PUT gc/{x}/abandoned"));
                let gc = &mut self.gcs[g];
                gc.i += 1;
                if gc.i == gc.dead.len() {
                    gc.pc = GcPc::Claim;
                }
            }
            GcPc::Claim => {
                let seen_max = self.gcs[g].list.gens().last().copied().unwrap_or(0);
                let mut n = seen_max + 1;
                if m == Mutation::NoClaim {
                    n = n.max(self.next_gen);
                }
                self.next_gen = self.next_gen.max(n + 1);
                assert!(n < 64, "too many generations for the bit sets");
                if self.store.gen(n).run.is_some() {
                    self.note(format_args!("G{g} PUT gc/{n}/run -> 412"));
                    self.gc_finish(g, "refused");
                    return;
                }
                self.store.gen_mut(n).run = Some(g);
                let dl = match self.phase {
                    Phase::Main => self.now + self.p.gc_deadline,
                    Phase::Drain => self.now + self.p.gc_deadline.max(1000),
                    Phase::Final => u64::MAX / 2,
                };
                let gc = &mut self.gcs[g];
                gc.gen = n;
                gc.deadline = dl;
                gc.pc = GcPc::MarkList;
                gc.list.reset();
                self.note(format_args!("G{g} PUT gc/{n}/run -> 201 (takeover possible after {dl})"));
            }
            GcPc::MarkList => {
                let mut l = std::mem::take(&mut self.gcs[g].list);
                let from = l.seen.len();
                self.list_page(Space::Volumes(None), &mut l);
                // The listing shows sizes: a 0-byte object is a fence.
                for &k in &l.seen[from..] {
                    let key = (k & 0xFFFF) as usize;
                    assert!(key < 64, "too many manifest keys for the bit sets");
                    if self.store.keys[key].obj == Obj::Fence {
                        self.gcs[g].listed_fences |= 1 << key;
                    } else {
                        self.gcs[g].keys.push(key);
                    }
                }
                if l.done {
                    let (keys, fences) = (self.gcs[g].keys.clone(), self.gcs[g].listed_fences);
                    let fences: Vec<usize> = (0..64).filter(|k| fences & (1 << k) != 0).collect();
                    self.note(format_args!(
                        "G{g} mark LIST volumes/ done -> manifests {keys:?}, fences {fences:?}"
                    ));
                    l.reset();
                    let gc = &mut self.gcs[g];
                    gc.i = 0;
                    gc.pc = if gc.keys.is_empty() { GcPc::ChunkList } else { GcPc::MarkGet };
                } else {
                    self.note(format_args!("G{g} mark LIST volumes/ page"));
                }
                self.gcs[g].list = l;
            }
            GcPc::MarkGet => {
                let gc = &self.gcs[g];
                let key = gc.keys[gc.i];
                let o = self.store.keys[key].obj;
                if let Obj::Manifest(r) = o {
                    self.gcs[g].r |= r;
                }
                self.note(format_args!("G{g} mark GET k{key} -> {o:?}"));
                let gc = &mut self.gcs[g];
                gc.i += 1;
                if gc.i == gc.keys.len() {
                    gc.pc = GcPc::ChunkList;
                }
            }
            GcPc::ChunkList => {
                let mut l = std::mem::take(&mut self.gcs[g].list);
                self.list_page(Space::Chunks, &mut l);
                if l.done {
                    let listed = l.seen.iter().fold(0, |s, &c| s | bit(c as u8));
                    let gc = &mut self.gcs[g];
                    gc.k = listed & !gc.r;
                    gc.pc = GcPc::Sweep;
                    let (r, k) = (gc.r, gc.k);
                    l.reset();
                    self.note(format_args!("G{g} LIST chunks/ done: R={} K={}", Ids(r), Ids(k)));
                }
                self.gcs[g].list = l;
            }
            GcPc::Sweep => {
                let k = self.gcs[g].k;
                self.store.gen_mut(gen).sweep = Some(k);
                self.gcs[g].pc = GcPc::SessList;
                self.note(format_args!("G{g} PUT gc/{gen}/sweep K={}", Ids(k)));
            }
            GcPc::SessList => {
                let mut l = std::mem::take(&mut self.gcs[g].list);
                self.list_page(Space::Sessions, &mut l);
                if l.done {
                    let mut views: Vec<SessView> = Vec::new();
                    for &k in &l.seen {
                        let (sid, sub) = (((k >> 8) & 0xFF) as usize, k & 0xFF);
                        if views.last().is_none_or(|v| v.sid != sid) {
                            views.push(SessView {
                                sid,
                                record: false,
                                end: false,
                                acks: 0,
                            });
                        }
                        let v = views.last_mut().expect("pushed");
                        match sub {
                            SUB_SESSION => v.record = true,
                            SUB_END => v.end = true,
                            gen => v.acks |= 1 << gen,
                        }
                    }
                    let sids: Vec<usize> = views.iter().map(|v| v.sid).collect();
                    self.note(format_args!("G{g} LIST sessions/ done -> {sids:?}"));
                    l.reset();
                    let gc = &mut self.gcs[g];
                    gc.sess = views;
                    gc.i = 0;
                    gc.pc = GcPc::Classify;
                    if gc.sess.is_empty() {
                        self.start_sweep(g);
                    }
                } else {
                    self.note(format_args!("G{g} LIST sessions/ page"));
                }
                self.gcs[g].list = l;
            }
            GcPc::Classify => {
                let gc = &self.gcs[g];
                let si = gc.i;
                let v = gc.sess[si];
                let key = self.store.sessions[v.sid].key;
                let listed_fence = gc.listed_fences & (1 << key) != 0;
                let listed_manifest = gc.keys.contains(&key);
                if listed_fence || (self.proto.ended_if_listed && listed_manifest) {
                    self.note(format_args!("G{g} session {}: k{key} was occupied at the mark: ended", v.sid));
                    self.gcs[g].ended.push(si);
                } else if v.end && listed_manifest {
                    // Committed before the mark listed (and read) its manifest.
                    self.stats.ended_by_end += 1;
                    self.note(format_args!("G{g} session {} has end, k{key} was listed: ended", v.sid));
                    self.gcs[g].ended.push(si);
                } else if v.end {
                    let o = self.store.keys[key].obj;
                    if let Obj::Manifest(r) = o {
                        self.gcs[g].r |= r;
                    }
                    self.stats.ended_by_end += 1;
                    self.note(format_args!("G{g} session {} has end: GET k{key} -> {o:?}: ended", v.sid));
                    self.gcs[g].ended.push(si);
                } else {
                    if listed_manifest {
                        self.stats.listed_running += 1;
                        let bk = &self.backups[v.sid];
                        if self.store.keys[key].obj == Obj::Empty && bk.life == Life::Running && bk.outcome == Outcome::Running {
                            self.stats.listed_pruned_running += 1;
                        }
                    }
                    self.note(format_args!("G{g} session {} (k{key}) is running", v.sid));
                    self.gcs[g].open.push(si);
                }
                let gc = &mut self.gcs[g];
                gc.i += 1;
                if gc.i == gc.sess.len() {
                    gc.settle_deadline = self.now + self.p.ack_timeout;
                    gc.i = 0;
                    self.round_check(g);
                }
            }
            GcPc::Settle => {
                let gc = &self.gcs[g];
                let si = gc.open[gc.i];
                let sid = gc.sess[si].sid;
                let key = self.store.sessions[sid].key;
                let o = self.store.keys[key].obj;
                self.note(format_args!("G{g} settle session {sid}: GET k{key} -> {o:?}"));
                let gc = &mut self.gcs[g];
                match o {
                    Obj::Manifest(r) => {
                        gc.r |= r;
                        gc.ended.push(si);
                        gc.open.remove(gc.i);
                    }
                    Obj::Fence => {
                        gc.ended.push(si);
                        gc.open.remove(gc.i);
                    }
                    Obj::Empty if m == Mutation::NoAckWait => {
                        gc.open.remove(gc.i);
                    }
                    Obj::Empty => {
                        gc.pc = GcPc::AckGet;
                        return;
                    }
                }
                self.round_check(g);
            }
            GcPc::AckGet => {
                let gc = &self.gcs[g];
                let si = gc.open[gc.i];
                let sid = gc.sess[si].sid;
                let a = self.store.ack(sid, gen);
                self.note(format_args!(
                    "G{g} GET sessions/{sid}/ack/{gen} -> {}",
                    a.map_or("404".into(), |a| Ids(a).to_string())
                ));
                let gc = &mut self.gcs[g];
                match a {
                    Some(a) => {
                        gc.r |= a;
                        gc.open.remove(gc.i);
                    }
                    None => gc.i += 1,
                }
                self.round_check(g);
            }
            GcPc::Sleep => {
                self.stats.settle_rounds += 1;
                let gc = &mut self.gcs[g];
                gc.i = 0;
                gc.pc = GcPc::Settle;
            }
            GcPc::FenceSend => {
                let gc = &self.gcs[g];
                let sid = gc.sess[gc.open[gc.i]].sid;
                let key = self.store.sessions[sid].key;
                if m == Mutation::NoFence {
                    self.note(format_args!("G{g}: no answer from session {sid}: ignored (mutation)"));
                    self.gcs[g].i += 1;
                    self.fence_next(g);
                } else {
                    self.note(format_args!("G{g}: no answer from session {sid} in time: fence"));
                    self.gcs[g].pc = GcPc::FenceAwait;
                    self.gcs[g].tries = 0;
                    self.send(t, Kind::Fence { key });
                }
            }
            GcPc::FenceAwait => {
                let si = self.gcs[g].open[self.gcs[g].i];
                match input {
                    Input::Resp(Res::Created) => {
                        self.stats.gc_fences += 1;
                        let bk = &self.backups[self.gcs[g].sess[si].sid];
                        if bk.life == Life::Running && bk.observed & (1 << gen) != 0 {
                            self.stats.needless_fences += 1;
                        }
                        self.gcs[g].ended.push(si);
                        self.gcs[g].i += 1;
                        self.fence_next(g);
                    }
                    Input::Resp(_) => self.gcs[g].pc = GcPc::FenceReadBack,
                    _ if self.again(t) => {
                        let key = self.store.sessions[self.gcs[g].sess[si].sid].key;
                        self.send(t, Kind::Fence { key });
                    }
                    _ => {
                        // The retry policy gave up: the GC returns the error before it deletes
                        // anything, and abandons its own generation on the way out.
                        self.stats.gc_failed += 1;
                        self.store.gen_mut(gen).abandoned = true;
                        self.note(format_args!("G{g} PUT gc/{gen}/abandoned (its own: an error)"));
                        self.gc_finish(g, "failed");
                    }
                }
            }
            GcPc::FenceReadBack => {
                let si = self.gcs[g].open[self.gcs[g].i];
                let key = self.store.sessions[self.gcs[g].sess[si].sid].key;
                let o = self.store.keys[key].obj;
                if let Obj::Manifest(r) = o {
                    self.gcs[g].r |= r;
                }
                self.note(format_args!("G{g} fence got 412: GET k{key} -> {o:?}"));
                self.gcs[g].ended.push(si);
                self.gcs[g].i += 1;
                self.fence_next(g);
            }
            GcPc::Cleanup => {
                // One HEAD of `abandoned` first; then the listed objects of every ended
                // session, their `end` records last (a second pass).
                let gc = &self.gcs[g];
                let n = gc.ended.len();
                if gc.i == 2 * n {
                    self.gcs[g].pc = if self.proto.cleanup_after_end {
                        GcPc::CleanupGens
                    } else {
                        GcPc::End
                    };
                    return;
                }
                if gc.i == 0 && self.proto.cleanup_checks_abandoned && self.store.gen(gen).abandoned {
                    self.note(format_args!("G{g} HEAD gc/{gen}/abandoned -> 200: stops before its cleanup"));
                    self.gc_finish(g, "stopped");
                    return;
                }
                let v = gc.sess[gc.ended[gc.i % n]];
                let st = &mut self.store;
                if gc.i < n {
                    st.sessions[v.sid].record &= !v.record;
                    st.acks.retain(|a| a.0 != v.sid || v.acks & (1 << a.1) == 0);
                    self.note(format_args!("G{g} cleanup: DELETE the listed record and acks of session {}", v.sid));
                } else {
                    st.sessions[v.sid].end &= !v.end;
                    self.note(format_args!("G{g} cleanup: DELETE the listed end of session {}", v.sid));
                }
                self.gcs[g].i += 1;
            }
            GcPc::Delete => {
                let d = self.gcs[g].d;
                if d == 0 {
                    // (No batch left, so no HEAD: an empty sweep checks nothing.)
                    if self.proto.cleanup_after_end {
                        self.gcs[g].pc = GcPc::End;
                    } else {
                        self.begin_cleanup(g);
                    }
                    return;
                }
                // HEAD gc/<gen>/abandoned and the DELETE are one step: the protocol's timing
                // assumption covers a live GC taken over between the two.
                if self.store.gen(gen).abandoned {
                    self.note(format_args!("G{g} HEAD gc/{gen}/abandoned -> 200: stops"));
                    self.gc_finish(g, "stopped");
                    return;
                }
                let c = d.trailing_zeros() as u8;
                self.gcs[g].d &= !bit(c);
                self.gcs[g].deleted |= bit(c);
                self.gcs[g].pc = GcPc::DeleteAwait;
                self.send(t, Kind::Delete { chunk: c, gen });
            }
            GcPc::DeleteAwait => self.gcs[g].pc = GcPc::Delete,
            GcPc::End => {
                if self.proto.cleanup_checks_abandoned && !self.proto.cleanup_after_end && self.store.gen(gen).abandoned {
                    self.note(format_args!("G{g} HEAD gc/{gen}/abandoned -> 200: stops before its end"));
                    self.gc_finish(g, "stopped");
                    return;
                }
                let deleted = self.gcs[g].deleted;
                self.store.gen_mut(gen).end = Some(deleted);
                self.stats.sweeps_ended += 1;
                self.note(format_args!("G{g} PUT gc/{gen}/end D={}", Ids(deleted)));
                if self.proto.cleanup_after_end {
                    self.begin_cleanup(g);
                } else {
                    self.gcs[g].pc = GcPc::CleanupGens;
                }
            }
            GcPc::CleanupGens => {
                let lag = self.p.gen_lag;
                for x in 1..gen.saturating_sub(lag) {
                    let rec = &mut self.store.gens[x as usize];
                    *rec = GenRec {
                        abandoned: rec.abandoned && self.proto.keep_abandoned,
                        ..GenRec::default()
                    };
                }
                self.note(format_args!("G{g} cleanup: DELETE gc/<m>/* for m < {}", gen.saturating_sub(lag)));
                self.gc_finish(g, "ended");
            }
            GcPc::Finished => {}
        }
    }

    /// After a settling step: the next open session of this round, the next round (after a
    /// sleep), or — every session settled or the ack timeout passed — the fences.
    fn round_check(&mut self, g: usize) {
        let now = self.now;
        let poll = self.p.gc_poll;
        let gc = &mut self.gcs[g];
        if gc.i < gc.open.len() {
            gc.pc = GcPc::Settle;
        } else if gc.open.is_empty() || now >= gc.settle_deadline {
            gc.i = 0;
            self.fence_next(g);
        } else {
            gc.wake = now + poll;
            gc.pc = GcPc::Sleep;
        }
    }

    /// The next session still open after the rounds is fenced; then the sweep.
    fn fence_next(&mut self, g: usize) {
        let gc = &mut self.gcs[g];
        if gc.i < gc.open.len() {
            gc.pc = GcPc::FenceSend;
        } else {
            self.start_sweep(g);
        }
    }

    /// The sessions to clean up are those found ended (with (e): every session listed).
    fn begin_cleanup(&mut self, g: usize) {
        let gc = &mut self.gcs[g];
        gc.i = 0;
        gc.pc = GcPc::Cleanup;
        if self.proto.mutation == Mutation::CleanupLive {
            gc.ended = (0..gc.sess.len()).collect();
        }
    }

    /// Every session is settled: the sweep, then the cleanup of the ended sessions and `end`
    /// (in the previous order: `end`, then the cleanup).
    fn start_sweep(&mut self, g: usize) {
        let gc = &mut self.gcs[g];
        gc.d = gc.k & !gc.r;
        gc.pc = GcPc::Delete;
        let (r, d) = (gc.r, gc.d);
        self.note(format_args!("G{g} sessions settled: R={} D={}", Ids(r), Ids(d)));
    }

    // ----------------------------------------------------------------------- invariants

    fn check(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let st = &self.store;
        for (i, k) in st.keys.iter().enumerate() {
            if let Obj::Manifest(r) = k.obj {
                if r & !st.chunks != 0 {
                    let who = k.owner.map_or("an old backup".to_string(), |b| format!("B{b}"));
                    let msg = format!("S1: manifest k{i} ({who}) references deleted {}", Ids(r & !st.chunks));
                    return self.fail(msg);
                }
                if k.ever_fenced {
                    return self.fail(format!("S5: k{i} held a fence and now holds a manifest"));
                }
            }
        }
        let sweeping = st
            .gens
            .iter()
            .filter(|r| r.sweep.is_some() && r.end.is_none() && !r.abandoned)
            .count();
        if sweeping > 1 && self.proto.mutation != Mutation::NoClaim {
            return self.fail(format!("S6: {sweeping} generations are sweeping at once"));
        }
        if !self.proto.early_checks {
            return;
        }
        // S3 as the brief states it ("an entry whose stamp equals the index's gc_gen names an
        // existing chunk") is NOT an invariant of this protocol: gc_gen only moves to a
        // generation that is over, so while sweep n deletes (and after it, until a backup on
        // that host starts and bumps), the entries stamped n-1 are current and some name
        // deleted chunks. Correctness comes from elsewhere: a backup running during sweep n has
        // K_n in its active set (Wait) and, after n, in its suspect set (HEAD); a backup that
        // starts after n is over bumps gc_gen past every older stamp. Two true forms:
        //
        // S3a (gc.md's wording): if a host's gc_gen equals the newest generation that has
        // published a sweep (or is over), every entry with that stamp names an existing chunk.
        // (An entry stamped n was written after a commit that saw n over; only a later sweep
        // m > n can delete its chunk, and m's marker makes the newest generation >= m.)
        let newest = st
            .gens
            .iter()
            .rposition(|r| r.sweep.is_some() || r.end.is_some() || r.abandoned)
            .unwrap_or(0) as u32;
        for (h, idx) in self.index.iter().enumerate() {
            if idx.gc_gen != newest {
                continue;
            }
            for c in 0..UNIVERSE {
                if idx.stamp[c as usize] == Some(newest) && st.chunks & bit(c) == 0 {
                    let msg = format!("S3a: host {h} is at the newest generation {newest} and its index lists deleted c{c}");
                    return self.fail(msg);
                }
            }
        }
        for (b, bk) in self.backups.iter().enumerate() {
            // S2 and S3b hold for a backup that is still deciding: it has observed gc/ and
            // bumped its index, has not sent its manifest, has not crashed, is not fenced.
            // Once its manifest PUT is sent it decides nothing more, a GC reads its manifest
            // instead of waiting for its ack, and a prune may delete that manifest (and a GC
            // then its chunks): from there on only S1 speaks for it.
            //
            // S2: every chunk it decided (Go) and established (parent, trusted index, HEAD or
            // upload) still exists. (Decided but not yet established may be missing: it is
            // about to be uploaded; chunks that Wait are not decided.)
            if bk.life != Life::Running || !bk.bumped || bk.sent_manifest || st.keys[bk.key].obj == Obj::Fence {
                continue;
            }
            let missing = bk.established & !st.chunks;
            if missing != 0 {
                let msg = format!("S2: B{b} established {} which no longer exist(s)", Ids(missing));
                return self.fail(msg);
            }
            // S3b: what this backup would trust from its host's index (current stamp, not in
            // its active or suspect set) exists.
            let idx = &self.index[bk.host];
            let excluded = bk.active_union() | bk.suspect;
            for c in 0..UNIVERSE {
                if idx.stamp[c as usize] == Some(idx.gc_gen) && excluded & bit(c) == 0 && st.chunks & bit(c) == 0 {
                    let msg = format!(
                        "S3b: host {} index trusts c{c} (stamp {}) for B{b} but c{c} is deleted",
                        bk.host, idx.gc_gen
                    );
                    return self.fail(msg);
                }
            }
        }
    }

    // -------------------------------------------------------------------------- running

    fn any_running(&self) -> bool {
        self.backups.iter().any(|b| b.life == Life::Running)
            || self.gcs.iter().any(|g| g.life == Life::Running)
            || self.prunes.iter().any(|p| p.life == Life::Running)
    }

    fn unfinished_gen(&self) -> bool {
        self.store.gens.iter().any(|r| r.run.is_some() && !r.over())
    }

    /// Runs the whole seed: chaos, drain, flush, final GC, quiescence checks.
    fn run(&mut self) -> Result<(), String> {
        while self.now < self.p.budget && self.violation.is_none() {
            if !self.step() {
                break;
            }
        }
        self.drain()?;
        self.quiesce()
    }

    fn err(&self) -> Result<(), String> {
        match &self.violation {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    /// No more chaos; a GC takes over whatever crashed; every actor finishes.
    fn drain(&mut self) -> Result<(), String> {
        self.err()?;
        self.phase = Phase::Drain;
        self.note(format_args!("--- drain: no more crashes, timeouts or lost responses"));
        for b in &mut self.backups {
            b.start = b.start.min(self.now);
        }
        for g in &mut self.gcs {
            g.start = g.start.min(self.now);
        }
        for p in &mut self.prunes {
            p.start = p.start.min(self.now);
        }
        let cap = self.now + 4000;
        while self.any_running() || !self.pending.is_empty() {
            if !self.gcs.iter().any(|g| g.life == Life::Running) && self.unfinished_gen() {
                let g = self.add_gc(self.now);
                self.note(format_args!("--- drain GC G{g}"));
            }
            // (A step with nothing enabled lets time pass, so slow requests become due.)
            self.step();
            self.err()?;
            if self.now > cap {
                return Err("L2: the world did not drain (liveness)".into());
            }
        }
        Ok(())
    }

    /// A final uncontended GC, then the end-state properties.
    fn quiesce(&mut self) -> Result<(), String> {
        self.phase = Phase::Final;
        let g = self.add_gc(self.now);
        self.note(format_args!("--- final GC G{g}"));
        let cap = self.now + 4000;
        while self.gcs[g].life == Life::Running || !self.pending.is_empty() {
            if !self.step() {
                break;
            }
            self.err()?;
            if self.now > cap {
                return Err("L2: the final GC did not finish".into());
            }
        }
        if self.gcs[g].result != "ended" {
            return Err(format!("L1: the final GC did not end ({})", self.gcs[g].result));
        }
        let mut refs = 0;
        for k in &self.store.keys {
            if let Obj::Manifest(r) = k.obj {
                refs |= r;
            }
        }
        if self.store.chunks != refs {
            return Err(format!(
                "L1: after a final GC the chunks are {} but the manifests reference {}",
                Ids(self.store.chunks),
                Ids(refs)
            ));
        }
        for (b, bk) in self.backups.iter().enumerate() {
            if bk.outcome != Outcome::Committed {
                continue;
            }
            let k = &self.store.keys[bk.key];
            match k.obj {
                Obj::Manifest(r) if r == bk.refs => {
                    if r & !self.store.chunks != 0 {
                        return Err(format!("L1: committed B{b} does not restore"));
                    }
                }
                // Pruned (a GC may have fenced the free key since).
                _ if k.pruned => {}
                o => return Err(format!("L1: committed B{b} is missing: k{} holds {o:?}", bk.key)),
            }
        }
        Ok(())
    }

    fn world(&self) -> String {
        let mut s = String::new();
        let p = &self.p;
        let _ = writeln!(
            s,
            "seed {} proto {:?}\nparams: ack_timeout {} watch_every {} gc_deadline {} lag {} pct {} crash {} timeout {} \
             loss {} drop {} slow {} budget {}",
            self.seed,
            self.proto,
            p.ack_timeout,
            p.watch_every,
            p.gc_deadline,
            p.gen_lag,
            p.pct_pm,
            p.crash_pm,
            p.timeout_pm,
            p.loss_pm,
            p.drop_pm,
            p.slow_pm,
            p.budget
        );
        for (i, k) in self.store.keys.iter().enumerate() {
            if k.owner.is_none() {
                let _ = writeln!(s, "k{i}: old manifest of volume {}, now {:?}", k.volume, k.obj);
            }
        }
        for (b, bk) in self.backups.iter().enumerate() {
            let _ = writeln!(
                s,
                "B{b}: host {} volume {} key k{} blocks {} parent {} start {} fail_at {:?}",
                bk.host,
                bk.volume,
                bk.key,
                Ids(bk.blocks),
                bk.want_parent,
                bk.start,
                bk.fail_at
            );
        }
        for (g, gc) in self.gcs.iter().enumerate() {
            let _ = writeln!(s, "G{g}: start {}", gc.start);
        }
        for (p, pr) in self.prunes.iter().enumerate() {
            let _ = writeln!(s, "P{p}: volume {} start {}", pr.volume, pr.start);
        }
        s
    }
}

fn name(t: Thread) -> String {
    match t {
        Thread::Main(b) => format!("B{b}"),
        Thread::Watch(b) => format!("B{b}w"),
        Thread::Gc(g) => format!("G{g}"),
        Thread::Prune(p) => format!("P{p}"),
    }
}

fn gc_keys(l: &Listing) -> String {
    let kinds = ["abandoned", "end", "run", "sweep"];
    let v: Vec<String> = l.seen.iter().map(|&k| format!("{}/{}", k / 4, kinds[(k % 4) as usize])).collect();
    format!("[{}]{}", v.join(" "), if l.done { " (done)" } else { "" })
}

// ------------------------------------------------------------------------------- harness

/// Runs one seed: its stats, or the violation.
fn run_plain(seed: u64, proto: Proto) -> Result<Stats, String> {
    let mut s = Sim::random(seed, proto);
    s.stats.seeds = 1;
    s.run().map(|()| s.stats)
}

/// Runs one seed; on failure replays it with a trace and returns the report.
fn run_seed(seed: u64, proto: Proto) -> Result<Stats, String> {
    run_plain(seed, proto).map_err(|e| report(seed, proto, &e, 120))
}

fn report(seed: u64, proto: Proto, e: &str, last: usize) -> String {
    let mut s = Sim::random(seed, proto);
    s.trace = Some(Vec::new());
    let again = s.run();
    let trace = s.trace.take().unwrap_or_default();
    let mut out = format!("seed {seed}: {e}\n{}", s.world());
    if again.is_ok() {
        out.push_str("(the replay did not fail: the simulator is not deterministic!)\n");
    }
    let from = trace.len().saturating_sub(last);
    let _ = writeln!(out, "last {} of {} steps:", trace.len() - from, trace.len());
    for l in &trace[from..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn ten_thousand_interleavings_keep_every_manifest_whole() {
    let n = env_u64("FERRY_SIM_SEEDS").unwrap_or(10_000);
    let from = env_u64("FERRY_SIM_FIRST_SEED").unwrap_or(0);
    let mode = std::env::var("FERRY_SIM_MODE").unwrap_or_default();
    let proto = Proto::from_name(&mode).expect("FERRY_SIM_MODE: unknown mode");
    let t0 = std::time::Instant::now();
    let mut total = Stats::default();
    for seed in from..from + n {
        match run_seed(seed, proto) {
            Ok(st) => total.add(&st),
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("{n} seeds from {from} ({mode:?}) in {:.1?}: {total:?}", t0.elapsed());
    if !mode.is_empty() {
        return;
    }
    // The runs must have exercised what they claim to.
    assert!(total.commits > n, "{total:?}");
    assert!(total.deletes > n / 4, "{total:?}");
    assert!(
        total.fenced_at_commit > 0 && total.commit_unknown > 0 && total.crashed_after_put > 0 && total.resolved_pruned > 0,
        "{total:?}"
    );
    assert!(
        total.gc_fences > 0 && total.acks > 0 && total.start_acks > 0 && total.waits > 0 && total.abandoned > 0,
        "{total:?}"
    );
    // (listed_pruned_running, the case of `manifest_listed_then_pruned_while_the_backup_resolves`,
    // comes up about once in 10,000 seeds: the scripted test covers it.)
    assert!(
        total.ended_by_end > 0 && total.listed_running > 0 && total.settle_rounds > 0,
        "{total:?}"
    );
    assert!(
        total.stale_entry_expired > 0 && total.suspect_saved > 0 && total.ack_after_wait > 0,
        "{total:?}"
    );
    assert!(total.parent_pruned_in_mark > 0 && total.gc_failed > 0, "{total:?}");
    // The timing assumption holds by construction: no DELETE lands after its generation is
    // over, although takeovers do find DELETEs in flight (and wait for them).
    assert!(total.takeover_in_flight > 0, "{total:?}");
    assert_eq!(total.late_deletes, 0);
}

#[test]
fn replay_seed() {
    let Some(seed) = env_u64("FERRY_SIM_SEED") else {
        return;
    };
    let mode = std::env::var("FERRY_SIM_MODE").unwrap_or_default();
    let proto = Proto::from_name(&mode).expect("FERRY_SIM_MODE: unknown mode");
    let mut s = Sim::random(seed, proto);
    s.trace = Some(Vec::new());
    let r = s.run();
    eprintln!("{}", s.world());
    for l in s.trace.take().unwrap_or_default() {
        eprintln!("{l}");
    }
    eprintln!("result: {r:?}\nstats: {:?}", s.stats);
    r.unwrap();
}

// ----------------------------------------------------------------------- mutation checks

/// The first seed below `limit` whose run breaks S1 or S5 under `proto`.
fn first_catch(proto: Proto, limit: u64) -> Option<(u64, String)> {
    (0..limit).find_map(|seed| match run_plain(seed, proto) {
        Err(e) if e.starts_with("S1") || e.starts_with("S5") => Some((seed, e)),
        _ => None,
    })
}

fn mutation_seeds() -> u64 {
    env_u64("FERRY_SIM_MUTATION_SEEDS").unwrap_or(20_000)
}

fn assert_caught(m: Mutation) {
    let limit = mutation_seeds();
    match first_catch(Proto::mutated(m), limit) {
        Some((seed, e)) => eprintln!("mutation {m:?}: caught at seed {seed} ({} seeds): {e}", seed + 1),
        None => panic!("mutation {m:?}: no S1/S5 violation in {limit} seeds: the simulator is too weak"),
    }
}

#[test]
fn mutation_a_gc_skips_the_fence_is_caught() {
    assert_caught(Mutation::NoFence);
}

/// "Backups don't ack" alone is safe: the GC then fences every running session (a liveness
/// cost only). What must be caught is a GC that neither waits nor fences.
#[test]
fn mutation_b_gc_neither_waits_for_acks_nor_fences_is_caught() {
    assert_caught(Mutation::NoAckWait);
}

#[test]
fn mutation_c_evidence_before_dekker_is_caught() {
    assert_caught(Mutation::NoDekker);
}

#[test]
fn mutation_d1_index_ignores_its_stamp_is_caught() {
    assert_caught(Mutation::IndexIgnoresStamp);
}

#[test]
fn mutation_d2_no_suspect_set_is_caught() {
    assert_caught(Mutation::NoSuspect);
}

/// (e) scripted: B decides c1 (an orphan: HEAD, it exists) and acks G1's sweep with it; G1
/// keeps c1 and (mutated) deletes B's session objects (all it listed: the record and the ack)
/// although B runs on; G2 marks (B has not committed), lists `sessions/` before B's watcher
/// acks its sweep, and deletes c1.
fn cleanup_of_a_running_session(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1) | bit(2), false, 0);
    let g1 = s.add_gc(0);
    let g2 = s.add_gc(0);
    let (bt, wt, g1t, g2t) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g1), Thread::Gc(g2));
    s.until(bt, "c1 decided and found", |s| s.backups[b].cur == 1);
    s.until(g1t, "sweep written", |s| s.gcs[g1].pc == GcPc::SessList);
    s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
    s.until(g1t, "finished", |s| s.finished(g1t));
    assert!(s.has(1), "kept for B's ack");
    s.until(g2t, "sessions listed", |s| sessions_listed(s, g2));
    assert_eq!(s.gcs[g2].k, bit(1));
    s.until(wt, "gen 2 acked", |s| acked(s, b, 2));
    s.until(g2t, "finished", |s| s.finished(g2t));
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn mutation_e_cleanup_of_sessions_not_ended_is_caught() {
    let s = cleanup_of_a_running_session(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1));
    cleanup_of_a_running_session(Proto::mutated(Mutation::CleanupLive)).assert_broken("S1");
    assert_caught(Mutation::CleanupLive);
}

#[test]
fn mutation_f_no_one_gc_at_a_time_claim_is_caught() {
    assert_caught(Mutation::NoClaim);
}

#[test]
fn mutation_g_waited_chunk_not_decided_again_is_caught() {
    assert_caught(Mutation::WaitNoRedecide);
}

// -------------------------------------------------------------------------- scripting

impl Sim {
    /// A scripted world: no chaos, requests are applied only when the script says so.
    fn script(proto: Proto) -> Sim {
        let mut s = Sim::empty(7, proto);
        s.p.ack_timeout = 8;
        s.p.watch_every = 2;
        s
    }

    /// One step of thread `t` (a watcher waiting for its next look, or a GC between two
    /// settling rounds, is woken).
    fn run_t(&mut self, t: Thread) {
        match t {
            Thread::Watch(b) if self.backups[b].watch == Watch::Idle => {
                self.now = self.now.max(self.backups[b].next_watch);
            }
            Thread::Gc(g) if self.gcs[g].pc == GcPc::Sleep => self.now = self.now.max(self.gcs[g].wake),
            _ => {}
        }
        assert!(self.enabled(t), "{} cannot step now\n{}", name(t), self.dump());
        self.exec(Step::Run(t));
        self.after_step();
    }

    /// Runs `t` until `done` holds; the requests `t` itself waits for are applied promptly.
    fn until(&mut self, t: Thread, what: &str, done: impl Fn(&Sim) -> bool) {
        for _ in 0..1000 {
            if done(self) {
                return;
            }
            match self.wait_state(t) {
                Some(r) if self.reqs[r].applied.is_none() => {
                    self.apply(r);
                    self.after_step();
                }
                _ => self.run_t(t),
            }
        }
        panic!("{} never got to: {what}\n{}", name(t), self.dump());
    }

    fn finished(&self, t: Thread) -> bool {
        self.life(t).0 != Life::Running
    }

    /// Applies the request `t` waits for.
    fn deliver(&mut self, t: Thread) {
        let r = self.wait_state(t).expect("a waiting thread");
        self.apply(r);
        self.after_step();
    }

    /// The response to the (applied) request `t` waits for is lost: `t` goes on, outcome
    /// unknown.
    fn lose_response(&mut self, t: Thread) {
        let r = self.wait_of(t).take().expect("a waiting thread");
        assert!(self.reqs[r].applied.is_some());
        self.reqs[r].awaited = false;
        self.note(format_args!("{}: response to #{r} lost", name(t)));
        self.run_thread(t, Input::Unknown);
        self.after_step();
    }

    /// Applies the request `t` waits for, but its response is lost.
    fn deliver_lost(&mut self, t: Thread) {
        self.deliver(t);
        self.lose_response(t);
    }

    /// `t` gives up waiting (outcome unknown); its request stays in flight.
    fn time_out(&mut self, t: Thread) {
        self.exec(Step::Timeout(t));
        self.after_step();
    }

    /// Applies the oldest request in flight that `f` selects.
    fn apply_where(&mut self, f: impl Fn(&Kind) -> bool) {
        let r = *self
            .pending
            .iter()
            .find(|&&r| f(&self.reqs[r].kind))
            .expect("no such request in flight");
        self.apply(r);
        self.after_step();
    }

    /// Whatever is still in flight lands.
    fn flush(&mut self) {
        while let Some(&r) = self.pending.first() {
            self.apply(r);
            self.after_step();
        }
    }

    fn kill(&mut self, t: Thread) {
        self.crash(t);
        self.after_step();
    }

    /// A prune deletes manifest `k`.
    fn prune_key(&mut self, k: usize) {
        assert!(matches!(self.store.keys[k].obj, Obj::Manifest(_)));
        self.store.keys[k].obj = Obj::Empty;
        self.store.keys[k].pruned = true;
        self.note(format_args!("prune DELETE manifest k{k}"));
        self.after_step();
    }

    fn dump(&self) -> String {
        self.trace.as_ref().map(|t| t.join("\n")).unwrap_or_default()
    }

    fn assert_safe(&self) {
        assert!(self.violation.is_none(), "{}\n{:?}", self.dump(), self.violation);
    }

    fn assert_broken(&self, what: &str) {
        let v = self.violation.as_deref().unwrap_or("");
        assert!(v.starts_with(what), "expected a {what} violation, got {v:?}\n{}", self.dump());
    }

    fn has(&self, c: u8) -> bool {
        self.store.chunks & bit(c) != 0
    }
}

/// A scripted world with tracing on.
fn traced(proto: Proto) -> Sim {
    let mut s = Sim::script(proto);
    s.trace = Some(Vec::new());
    s
}

/// The GC has published its sweep and listed `sessions/`.
fn sessions_listed(s: &Sim, g: usize) -> bool {
    !matches!(
        s.gcs[g].pc,
        GcPc::ClaimList | GcPc::Abandon | GcPc::Claim | GcPc::MarkList | GcPc::MarkGet | GcPc::ChunkList | GcPc::Sweep | GcPc::SessList
    )
}

/// Backup `b`'s watcher has acked generation `gen` and is idle again.
fn acked(s: &Sim, b: usize, gen: u32) -> bool {
    s.backups[b].known & (1 << gen) != 0 && s.backups[b].watch == Watch::Idle
}

// ------------------------------------------------------------- review problems (scripted)

/// Problem 1: the backup crashes right after its manifest PUT lands. Whether the mark lists
/// the manifest or not (the GC's sweep came first), the session has no `end`: the GC settles
/// it as running, reads the manifest, and keeps its chunks.
fn problem_1(gc_marks_first: bool) -> Sim {
    let mut s = traced(Proto::IMPLEMENTED);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    if gc_marks_first {
        s.until(gt, "sweep written", |s| s.gcs[g].pc == GcPc::SessList);
        assert_eq!(s.gcs[g].k, bit(1), "c1 is a candidate");
    }
    s.deliver(bt);
    s.kill(bt);
    s.until(gt, "finished", |s| s.finished(gt));
    s
}

#[test]
fn problem_1_crash_right_after_the_manifest_put() {
    for first in [false, true] {
        let s = problem_1(first);
        s.assert_safe();
        assert!(s.has(1) && s.gcs[0].result == "ended", "{}", s.dump());
        assert_eq!(s.stats.crashed_after_put, 1);
        assert_eq!(s.stats.listed_running, u64::from(!first), "listed by the mark, no `end`: running");
    }
}

/// Problem 2: a paused backup's manifest PUT lands after the GC fenced its key.
#[test]
fn problem_2_paused_commit_lands_after_the_fence() {
    let mut s = traced(Proto::IMPLEMENTED);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    // The backup (and its watcher) pause; the GC polls until its ack timeout, then fences.
    s.until(gt, "finished", |s| s.finished(gt));
    assert!(!s.has(1) && s.store.keys[s.backups[b].key].obj == Obj::Fence, "{}", s.dump());
    assert!(s.stats.settle_rounds > 0);
    s.deliver(bt);
    s.until(bt, "finished", |s| s.finished(bt));
    s.assert_safe();
    assert_eq!(s.backups[b].outcome, Outcome::Fenced);
    assert_eq!((s.stats.gc_fences, s.stats.fenced_at_commit), (1, 1));
}

/// Problem 3: the manifest PUT's outcome is unknown (timeout); the request is still in flight.
/// The backup resolves it with its own fence, and whichever lands first decides.
fn problem_3(fence_first: bool) -> Sim {
    let mut s = traced(Proto::IMPLEMENTED);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    s.time_out(bt);
    assert_eq!(s.backups[b].main, Main::ResolveAwait);
    let is_manifest = |k: &Kind| matches!(k, Kind::Manifest { .. });
    if fence_first {
        s.deliver(bt);
        s.apply_where(is_manifest);
    } else {
        s.apply_where(is_manifest);
        s.deliver(bt);
    }
    s.until(bt, "finished", |s| s.finished(bt));
    s.until(gt, "finished", |s| s.finished(gt));
    s
}

#[test]
fn problem_3_unknown_outcome_of_the_manifest_put() {
    let s = problem_3(true);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Aborted);
    assert!(!s.has(1), "nothing references c1 any more: collected");
    let s = problem_3(false);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1));
    assert!(s.store.sessions[0].end || !s.store.sessions[0].record, "committed: `end` written");
}

/// Problem 4: a backup waits for sweep 1; meanwhile sweep 1 ends and a second GC runs. The
/// chunk that waited is decided again after the wait, so the ack to sweep 2 covers it.
fn problem_4(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let g1 = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(1) | bit(3), false, 0);
    let g2 = s.add_gc(0);
    let (bt, wt, g1t, g2t) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g1), Thread::Gc(g2));
    s.until(g1t, "sessions listed", |s| sessions_listed(s, g1));
    s.until(bt, "c1 waits for gen 1", |s| s.backups[b].stage == Stage::Waiting(1));
    assert_eq!(s.stats.start_acks, 1, "gen 1 was active at the start: acked (empty)");
    s.until(g1t, "finished", |s| s.finished(g1t));
    assert!(!s.has(1));
    s.until(wt, "gen 1 retired", |s| s.backups[b].active.is_empty());
    s.until(bt, "c1 re-uploaded", |s| s.backups[b].cur == 1);
    s.store.chunks |= bit(3); // left by a backup that aborted
    s.until(g2t, "sessions listed", |s| sessions_listed(s, g2));
    assert_eq!(s.gcs[g2].k, bit(1) | bit(3));
    s.until(wt, "gen 2 acked", |s| acked(s, b, 2));
    s.until(g2t, "finished", |s| s.finished(g2t));
    s.until(bt, "c3 waits for gen 2", |s| s.backups[b].stage == Stage::Waiting(2));
    s.until(wt, "gen 2 retired", |s| s.backups[b].active.is_empty());
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn problem_4_second_gc_while_a_backup_waits() {
    let s = problem_4(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1) && s.has(3));
    assert_eq!(s.stats.ack_after_wait, 1);
    // A chunk whose Wait is over must be *decided again* (and so join `decided`): "then HEAD c
    // and PUT-create it" alone loses it from later acks.
    problem_4(Proto::mutated(Mutation::WaitNoRedecide)).assert_broken("S1");
}

/// Problem 7: host 0's index knows c1 (stamp 0); GC 1 deletes c1 and crashes; GC 2 takes
/// over. The stamp is stale once the backup has seen gen 1 abandoned: HEAD, upload.
fn problem_7(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    s.index[0].stamp[1] = Some(0);
    let g1 = s.add_gc(0);
    let g2 = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let (bt, g1t, g2t) = (Thread::Main(b), Thread::Gc(g1), Thread::Gc(g2));
    s.until(g1t, "DELETE c1 sent", |s| s.gcs[g1].pc == GcPc::DeleteAwait);
    s.deliver(g1t);
    s.kill(g1t);
    s.until(g2t, "took over", |s| s.gcs[g2].pc == GcPc::MarkList);
    s.until(bt, "finished", |s| s.finished(bt));
    s.until(g2t, "finished", |s| s.finished(g2t));
    s
}

#[test]
fn problem_7_index_entry_from_before_a_crashed_sweep() {
    let s = problem_7(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert_eq!((s.stats.stale_entry_expired, s.stats.abandoned), (1, 1));
    problem_7(Proto::mutated(Mutation::IndexIgnoresStamp)).assert_broken("S1");
}

/// Problem 7 (b), "index entry from before a sweep": the backup runs through a whole sweep;
/// afterwards its index entry for c1 has the current stamp, but c1 is in the suspect set.
fn problem_7b(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(0) | bit(1);
    s.index[0].stamp[1] = Some(0);
    let b = s.add_backup(0, 0, bit(0) | bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, wt, gt) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g));
    s.until(bt, "c0 decided", |s| s.backups[b].cur == 1);
    s.until(gt, "sessions listed", |s| sessions_listed(s, g));
    s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
    s.until(gt, "finished", |s| s.finished(gt));
    assert!(s.has(0) && !s.has(1), "{}", s.dump());
    s.until(wt, "gen 1 retired", |s| s.backups[b].active.is_empty());
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn problem_7b_index_entry_from_before_a_sweep_the_backup_saw() {
    let s = problem_7b(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert_eq!(s.stats.suspect_saved, 1);
    problem_7b(Proto::mutated(Mutation::NoSuspect)).assert_broken("S1");
}

/// Problem 8: a backup decides c1 before GC 0 publishes its sweep (K = {c1}) and commits
/// (with `end`) before GC 0 lists `sessions/`. A second GC that ran now would end the session
/// and clean it up, and GC 0 would never see it: it is refused (one GC at a time).
fn problem_8(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let g0 = s.add_gc(0);
    let g1 = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let (bt, g0t, g1t) = (Thread::Main(b), Thread::Gc(g0), Thread::Gc(g1));
    s.until(bt, "c1 decided", |s| s.backups[b].cur == 1);
    s.until(g0t, "marked", |s| s.gcs[g0].pc == GcPc::Sweep);
    assert_eq!(s.gcs[g0].k, bit(1));
    s.until(bt, "finished", |s| s.finished(bt));
    assert_eq!(s.backups[b].outcome, Outcome::Committed);
    assert!(s.store.sessions[b].end);
    s.until(g1t, "finished", |s| s.finished(g1t));
    s.until(g0t, "finished", |s| s.finished(g0t));
    s
}

#[test]
fn problem_8_cleanup_of_a_session_another_gc_needs() {
    let s = problem_8(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.gcs[1].result, "refused");
    assert_eq!(s.stats.ended_by_end, 1);
    assert!(s.has(1) && !s.store.sessions[0].record && !s.store.sessions[0].end, "{}", s.dump());
    problem_8(Proto::mutated(Mutation::NoClaim)).assert_broken("S1");
}

/// Problem 9 (PSA-2025-00019-1): an incremental reads its parent while the parent is pruned
/// during the GC's mark. `ack_first`: the watcher acks the sweep between the parent read and
/// the parent's decision (then the parent's chunk is checked after the sweep, and is missing:
/// the backup fails).
fn problem_9(ack_first: bool) -> Sim {
    let mut s = traced(Proto::IMPLEMENTED);
    let parent = s.add_manifest(0, bit(1));
    let g = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(2), true, 0);
    let (bt, wt, gt) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g));
    s.until(gt, "claimed", |s| s.gcs[g].pc == GcPc::MarkList);
    s.until(bt, "parent read", |s| s.backups[b].main == Main::ParentDecide);
    s.prune_key(parent);
    s.until(gt, "sessions listed", |s| sessions_listed(s, g));
    assert_eq!(s.gcs[g].k, bit(1));
    if ack_first {
        s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
        s.until(bt, "c1 waits", |s| s.backups[b].stage == Stage::Waiting(1));
    } else {
        s.until(bt, "parent decided", |s| s.backups[b].main == Main::Blocks);
        s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
    }
    s.until(gt, "finished", |s| s.finished(gt));
    s.until(wt, "gen 1 retired", |s| s.backups[b].active.is_empty());
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn problem_9_parent_pruned_during_the_mark() {
    let s = problem_9(false);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1), "the ack kept the inherited chunk");
    let s = problem_9(true);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Aborted, "inherited chunk missing after the wait");
    assert!(!s.has(1));
}

/// Problem 9 once more, with the whole sweep between the parent read and `inherit` (for RBD,
/// the snapshot and the start of export-diff come in between): the watcher acks the sweep
/// before the parent's chunks are decided (ack = {}), the GC deletes c1, the sweep ends and
/// K = {c1} moves to the suspect set; then `inherit` decides c1 and, as implemented, checks
/// only chunks of an active K: c1 is referenced unchecked. With the fix (the suspect set too
/// is checked before the commit) the backup finds c1 missing and fails.
fn problem_9_sweep_over_before_inherit(proto: Proto) -> Sim {
    let mut s = traced(proto);
    let parent = s.add_manifest(0, bit(1));
    let g = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(2), true, 0);
    let (bt, wt, gt) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g));
    s.until(gt, "claimed", |s| s.gcs[g].pc == GcPc::MarkList);
    s.until(bt, "parent read", |s| s.backups[b].main == Main::ParentDecide);
    s.prune_key(parent);
    s.until(gt, "sessions listed", |s| sessions_listed(s, g));
    assert_eq!(s.gcs[g].k, bit(1));
    s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
    s.until(gt, "finished", |s| s.finished(gt));
    assert!(!s.has(1));
    s.until(wt, "gen 1 retired", |s| s.backups[b].active.is_empty());
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn problem_9_sweep_over_before_the_parent_is_decided() {
    let s = problem_9_sweep_over_before_inherit(Proto {
        inherit_checks_suspect: false,
        ..Proto::IMPLEMENTED
    });
    s.assert_broken("S2");
    let s = problem_9_sweep_over_before_inherit(Proto::named("inherit-no-verify,s1-only"));
    if std::env::var("FERRY_SIM_SHOW").is_ok() {
        eprintln!("{}", s.dump());
    }
    s.assert_broken("S1");
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    let s = problem_9_sweep_over_before_inherit(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Aborted, "c1 is missing: the backup fails");
}

/// Problem 9 without the Dekker order (the draft's): the parent is read and decided before
/// the session exists, so no GC waits for this backup.
#[test]
fn problem_9_without_dekker_breaks() {
    let mut s = traced(Proto::mutated(Mutation::NoDekker));
    let parent = s.add_manifest(0, bit(1));
    let g = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(2), true, 0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "parent read", |s| s.backups[b].main == Main::ParentDecide);
    s.prune_key(parent);
    s.until(gt, "finished", |s| s.finished(gt));
    s.until(bt, "finished", |s| s.finished(bt));
    s.assert_broken("S1");
}

/// The index's gc_gen must be *raised*, never set: a backup that listed `gc/` before sweep 1
/// ended bumps after a newer backup raised gc_gen to 1. (The random worlds find (h) too.)
fn index_gen_regress(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    s.index[0].stamp[1] = Some(0);
    let g = s.add_gc(0);
    let old = s.add_backup(0, 0, bit(2), false, 0);
    let new = s.add_backup(0, 0, bit(1), false, 0);
    let (ot, nt, gt) = (Thread::Main(old), Thread::Main(new), Thread::Gc(g));
    s.until(ot, "listed gc/", |s| s.backups[old].main == Main::Bump);
    s.until(gt, "finished", |s| s.finished(gt));
    assert!(!s.has(1));
    s.until(nt, "bumped", |s| s.backups[new].bumped);
    assert_eq!(s.index[0].gc_gen, 1);
    s.run_t(ot);
    s.until(nt, "finished", |s| s.finished(nt));
    s
}

#[test]
fn mutation_h_index_gc_gen_lowered_is_caught() {
    let s = index_gen_regress(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!((s.index[0].gc_gen, s.stats.stale_entry_expired), (1, 1));
    index_gen_regress(Proto::mutated(Mutation::IndexGenAssign)).assert_broken("S1");
    assert_caught(Mutation::IndexGenAssign);
}

// ------------------------------------------------------ the manifest PUT sent again (a flaw)

/// The previous commit sent the manifest PUT again when an outcome was unknown. Attempt 1
/// lands (its response lost); attempt 2 times out and stays in flight; attempt 3 gets 412,
/// reads back its manifest: committed, `end`. A prune deletes the manifest; a GC finds the
/// session ended (`end`), the manifest gone, and deletes c1; attempt 2 lands and re-creates the
/// manifest. As implemented the PUT is sent once and an unknown outcome is resolved with the
/// fence: the same schedule sends fences instead, and nothing can re-create the manifest.
fn manifest_retry_after_prune(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    s.deliver_lost(bt);
    s.time_out(bt);
    s.until(bt, "finished", |s| s.finished(bt));
    assert_eq!(s.backups[b].outcome, Outcome::Committed);
    s.prune_key(s.backups[b].key);
    s.until(gt, "finished", |s| s.finished(gt));
    assert!(!s.has(1) && s.stats.ended_by_end == 1, "{}", s.dump());
    s.flush();
    s
}

/// The previous helper's trace against gc-protocol.md (attempt 1 lands, its response lost; the
/// GC's L0 saw the key occupied; a prune deletes the manifest; the mark misses it; attempt 2
/// re-creates it), with the L0 step gone. As implemented, B resolves with the fence: 201 on
/// the pruned name, not committed. Even the retrying commit is safe on this schedule now: its
/// re-created manifest is committed with `end`, and the GC lists the session and reads it.
fn previous_retry_trace(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    s.deliver_lost(bt);
    s.until(gt, "claimed", |s| s.gcs[g].pc == GcPc::MarkList);
    s.prune_key(s.backups[b].key);
    s.until(gt, "sweep written", |s| s.gcs[g].pc == GcPc::SessList);
    assert_eq!(s.gcs[g].k, bit(1));
    s.until(bt, "finished", |s| s.finished(bt));
    s.until(gt, "finished", |s| s.finished(gt));
    s.flush();
    s
}

#[test]
fn as_written_manifest_put_retry_recreates_a_pruned_manifest() {
    let s = previous_retry_trace(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Aborted);
    assert!(!s.has(1));
    let retry = Proto::named("retry-commit");
    let s = previous_retry_trace(retry);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1) && s.stats.ended_by_end == 1);
    // What still breaks the retrying commit: an attempt in flight after the commit settled.
    manifest_retry_after_prune(retry).assert_broken("S1");
    let s = manifest_retry_after_prune(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(
        s.store.keys[s.backups[0].key].obj,
        Obj::Fence,
        "the stray fence landed on the pruned name"
    );
    // The random worlds find it too.
    let found = first_catch(retry, mutation_seeds());
    eprintln!("retry-commit: {found:?}");
    assert!(found.is_some(), "the retrying commit must break S1");
}

/// FORMAT.md §12.3 step 4, "a listed manifest without `end` is running": B's manifest lands
/// but B has not seen the response; the mark LISTs it; a prune deletes it before the mark's
/// GET; the GC publishes K = {c1}; only then is B's response lost and B resolves its commit.
/// `ack`: B's watcher acks the sweep (decided ∩ K = {c1}) before the GC settles B.
fn listed_then_pruned(proto: Proto, ack: bool) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let g = s.add_gc(0);
    let (bt, wt, gt) = (Thread::Main(b), Thread::Watch(b), Thread::Gc(g));
    let key = s.backups[b].key;
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    s.deliver(bt);
    s.until(gt, "mark listed", |s| s.gcs[g].pc == GcPc::MarkGet);
    assert_eq!(s.gcs[g].keys, vec![key], "the mark lists B's manifest");
    s.prune_key(key);
    s.until(gt, "sessions listed", |s| sessions_listed(s, g));
    assert_eq!(s.gcs[g].k, bit(1));
    s.lose_response(bt);
    if ack {
        s.until(wt, "gen 1 acked", |s| acked(s, b, 1));
    }
    s.until(gt, "finished", |s| s.finished(gt));
    s.until(bt, "finished", |s| s.finished(bt));
    s.flush();
    s
}

#[test]
fn manifest_listed_then_pruned_while_the_backup_resolves() {
    // As implemented: the session has no `end`, so it is running: its ack keeps c1, or it is
    // fenced; B's fence then finds the key empty (201) or fenced (412): not committed.
    for ack in [false, true] {
        let s = listed_then_pruned(Proto::IMPLEMENTED, ack);
        s.assert_safe();
        assert_eq!(s.backups[0].outcome, Outcome::Aborted, "{}", s.dump());
        assert_eq!((s.stats.listed_running, s.stats.listed_pruned_running), (1, 1));
        assert_eq!(s.has(1), ack, "{}", s.dump());
    }
    // Each change alone makes this schedule safe: the retrying commit's second PUT meets the
    // GC's fence; the previous GC rule ended the session, but B's fence cannot re-create the
    // manifest. Together (the code before this change) they re-create a pruned manifest whose
    // chunk the GC deleted.
    listed_then_pruned(Proto::named("retry-commit"), false).assert_safe();
    listed_then_pruned(Proto::named("ended-if-listed"), false).assert_safe();
    let s = listed_then_pruned(Proto::named("pre-change"), false);
    s.assert_broken("S1");
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
}

/// The previous GC rule (a session whose manifest key the mark listed as occupied is ended),
/// with the commit as implemented: no seed breaks S1 or S5 (10^6 seeds, with the two fixes
/// so that their flaws do not mask the answer), because a listed manifest was either read by
/// the mark or pruned, and nothing can create it again. The rule that a listed manifest
/// without `end` is running is a second line of defence (see the test above).
#[test]
fn ended_if_listed_alone_is_harmless_with_the_single_manifest_put() {
    let p = Proto {
        early_checks: true,
        ..Proto::named("ended-if-listed,fixed")
    };
    for seed in 0..1500 {
        run_seed(seed, p).unwrap_or_else(|e| panic!("{e}"));
    }
}

// --------------------------------------------------------------- the zombie DELETE

/// A GC's DELETE is in flight when it crashes; a second GC takes over; a backup starts, sees
/// the sweep abandoned, finds c1 and references it. If the DELETE may land after the takeover
/// (zombie), S1 breaks; by the protocol's assumption it cannot, and the takeover waits.
fn zombie(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let g0 = s.add_gc(0);
    let g1 = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let (bt, g0t, g1t) = (Thread::Main(b), Thread::Gc(g0), Thread::Gc(g1));
    s.until(g0t, "DELETE c1 sent", |s| s.gcs[g0].pc == GcPc::DeleteAwait);
    s.kill(g0t);
    s.until(g1t, "found gen 1 dead", |s| s.gcs[g1].pc == GcPc::Abandon);
    if !proto.zombie {
        assert!(!s.enabled(g1t), "no abandoned marker while a DELETE of gen 1 is in flight");
        s.apply_where(|k| matches!(k, Kind::Delete { .. }));
    }
    s.until(g1t, "took over", |s| s.gcs[g1].pc == GcPc::MarkList);
    s.until(bt, "manifest sent", |s| s.backups[b].sent_manifest);
    if proto.zombie {
        s.apply_where(|k| matches!(k, Kind::Delete { .. }));
    }
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn zombie_delete_after_takeover_breaks_closure() {
    let z = Proto::named("zombie");
    let s = zombie(z);
    s.assert_broken("S1");
    assert_eq!(s.stats.late_deletes, 1);
    // Random worlds too: every S1 found in zombie mode comes from a late DELETE.
    let (seed, e) = first_catch(z, mutation_seeds()).expect("zombie mode must break S1");
    let mut st = Sim::random(seed, z);
    let _ = st.run();
    eprintln!("zombie: seed {seed}: {e}");
    assert!(st.stats.late_deletes > 0);
}

/// The assumption must also cover the GC's own `end`: a DELETE that timed out may still be in
/// flight, and a backup that starts after `end` trusts what it HEADs.
#[test]
fn end_written_with_a_delete_in_flight_breaks_closure() {
    let p = Proto::named("end-early");
    let (seed, e) = first_catch(p, mutation_seeds()).expect("end-early must break S1");
    eprintln!("end-early: caught at seed {seed}: {e}");
    let mut s = Sim::random(seed, p);
    let _ = s.run();
    assert!(s.stats.late_deletes > 0);
}

#[test]
fn default_mode_never_applies_a_delete_after_takeover() {
    let s = zombie(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert!(s.has(1), "the backup saw c1 deleted and uploaded it again");
    // (The random worlds of the main test check late_deletes == 0 with takeovers.)
}

// ------------------------------------------------------------------------- liveness

/// Liveness (not safety): a backup whose session PUT falls between `sweep` and the GC's LIST
/// of `sessions/` sees the sweep active at its start. If it never acked that sweep (the
/// previous protocol), the GC would fence it after the ack timeout although it was doing
/// everything right; as implemented it acks it at once (empty: nothing is decided yet).
fn observed_at_start(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let g = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(2), false, 0);
    let (bt, gt) = (Thread::Main(b), Thread::Gc(g));
    s.until(gt, "sweep written", |s| s.gcs[g].pc == GcPc::SessList);
    s.until(bt, "observed gen 1", |s| s.backups[b].bumped);
    s.until(gt, "finished", |s| s.finished(gt));
    s.until(bt, "finished", |s| s.finished(bt));
    s
}

#[test]
fn liveness_backup_that_observed_the_sweep_at_start_is_not_fenced() {
    let s = observed_at_start(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Committed);
    assert_eq!((s.stats.start_acks, s.stats.needless_fences), (1, 0));
    let s = observed_at_start(Proto::named("no-start-ack"));
    s.assert_safe();
    assert_eq!(s.backups[0].outcome, Outcome::Fenced);
    assert_eq!(s.stats.needless_fences, 1);
}

/// With the cleanup guarded (see `live_takeover_then_unguarded_cleanup_hides_a_committed_session`)
/// the previous order (clean up the ended sessions after `end`) is safe too: a session a GC
/// finds ended has ended before that GC's `end` (or, guarded, before any takeover of it), so
/// before the next GC's mark, which therefore lists its manifest (or it was pruned, or it is a
/// fence); and a GC settles a session by its manifest and its ack, never by its record. (The
/// previous order's cost was the L0 ⊆ L1 refusal of the next GC, and there is no L0 any more.)
/// Unguarded, either order loses a session to a GC taken over while alive.
#[test]
fn cleanup_after_end_is_safe_too_when_guarded() {
    let p = Proto::named("cleanup-after-end,fixed");
    for seed in 0..1500 {
        run_seed(seed, p).unwrap_or_else(|e| panic!("{e}"));
    }
}

// ------------------------------------------------------- a live GC's unguarded cleanup

/// A GC that was taken over while alive (`--takeover` of a GC that hung past its deadline)
/// goes on settling sessions, and its cleanup deletes the objects of the sessions it found
/// ended without looking at `abandoned` (068c879: only sweep batches did, and a sweep with
/// nothing to delete, or taken over after its last batch, made no check at all). G0 claims gen 1 and
/// hangs; B decides c1 (HEAD: it exists); G1 takes over, claims gen 2, marks (B has not
/// committed), publishes K = {c1}; B commits and writes `end`; G0 wakes up, marks B's
/// manifest (its D is empty), lists `sessions/`, finds B ended (`end`) and deletes B's
/// session objects; G1 lists `sessions/`, does not see B, and deletes c1, which B's manifest
/// references. As implemented since 21c8d1a the cleanup is guarded (HEAD `abandoned` first,
/// stop if it exists): every session G0 then deletes was found ended before the check, so
/// before the takeover and G1's mark, which lists its manifest (or it was pruned, or it is a
/// fence). One check before the whole cleanup is enough for that reason.
fn live_takeover_cleanup(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1);
    let g0 = s.add_gc(0);
    let g1 = s.add_gc(0);
    let b = s.add_backup(0, 0, bit(1), false, 0);
    let (bt, g0t, g1t) = (Thread::Main(b), Thread::Gc(g0), Thread::Gc(g1));
    s.until(g0t, "claimed gen 1", |s| s.gcs[g0].pc == GcPc::MarkList);
    s.gcs[g0].deadline = 0; // G0 hangs past its deadline: the operator takes it over.
    s.until(bt, "c1 decided and found", |s| s.backups[b].cur == 1);
    s.until(g1t, "took over, marked, published", |s| s.gcs[g1].pc == GcPc::SessList);
    assert_eq!((s.gcs[g1].gen, s.gcs[g1].k), (2, bit(1)));
    s.until(bt, "committed", |s| s.finished(bt));
    assert_eq!(s.backups[b].outcome, Outcome::Committed);
    s.until(g0t, "G0 goes on", |s| s.finished(g0t));
    s.until(g1t, "finished", |s| s.finished(g1t));
    s
}

#[test]
fn live_takeover_then_unguarded_cleanup_hides_a_committed_session() {
    let s = live_takeover_cleanup(Proto::named("unguarded-cleanup"));
    s.assert_broken("S1");
    assert!(!s.store.sessions[0].record, "G0 deleted B's session");
    let s = live_takeover_cleanup(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.gcs[0].result, "stopped");
    assert!(s.has(1));
}

/// A GC taken over while alive hangs in its sweep (between two DELETE batches) while three
/// more GCs run; the third removes generation 1's objects, `abandoned` included. G0 resumes,
/// HEADs `gc/1/abandoned` (404) and deletes c2, which a backup committed meanwhile (G1's mark
/// kept it). With GENS_KEPT = 16 that takes a GC that hangs through 16 later runs (a paused
/// VM); keeping the `abandoned` markers (0 bytes each, one per takeover) closes it.
fn hung_through_generations(proto: Proto) -> Sim {
    let mut s = traced(proto);
    s.store.chunks = bit(1) | bit(2);
    let g0 = s.add_gc(0);
    let g0t = Thread::Gc(g0);
    s.until(g0t, "c1 deleted", |s| s.gcs[g0].pc == GcPc::Delete && s.gcs[g0].deleted == bit(1));
    assert_eq!(s.gcs[g0].d, bit(2));
    s.gcs[g0].deadline = 0; // G0 hangs: the operator takes it over.
    let g1 = s.add_gc(s.now);
    let g1t = Thread::Gc(g1);
    s.until(g1t, "took over", |s| s.gcs[g1].pc == GcPc::MarkList);
    let b = s.add_backup(0, 0, bit(2), false, s.now);
    let bt = Thread::Main(b);
    s.until(bt, "committed", |s| s.finished(bt));
    assert_eq!(s.backups[b].outcome, Outcome::Committed);
    s.until(g1t, "finished", |s| s.finished(g1t));
    for _ in 0..2 {
        let g = s.add_gc(s.now);
        s.until(Thread::Gc(g), "finished", |s| s.finished(Thread::Gc(g)));
        assert_eq!(s.gcs[g].result, "ended");
    }
    assert!(s.has(2) && s.store.gen(1).run.is_none(), "{}", s.dump());
    s.until(g0t, "G0 resumes", |s| s.finished(g0t));
    s
}

#[test]
fn a_gc_that_resumes_after_its_abandoned_marker_was_removed_deletes_again() {
    let s = hung_through_generations(Proto::named("drop-abandoned"));
    s.assert_broken("S6");
    assert!(!s.has(2));
    let s = hung_through_generations(Proto::IMPLEMENTED);
    s.assert_safe();
    assert_eq!(s.gcs[0].result, "stopped");
    assert!(s.has(2));
}
