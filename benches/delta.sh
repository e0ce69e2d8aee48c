#!/usr/bin/env bash
# Ship what changed (issue 11): what an incremental of scattered 4 KiB writes uploads.
#
# One image of incompressible data (SIZE_MIB, default 512; ~12 × that in disk space) in the dev cluster; then three
# rounds of random 4 KiB page writes — 1 %, 5 % and 20 % of the pages — each between a full
# backup (of a volume of its own, so every round starts a fresh delta chain; dedup makes it
# upload nothing after the first) and an incremental:
#   - ferry            (delta objects, FORMAT.md §14)           → bytes added to its repository
#   - ferry --no-deltas (whole blocks: ferry before deltas)     → bytes added to its repository
#   - Benji 0.17 with hints from `rbd diff` (4 MiB blocks, zstd 3 + AES-GCM; compare.sh's venv)
#   - the exact `rbd export-diff` between the same snapshots, raw and `zstd -3`
# After the 5 % round (every block a delta), restore time of the newest backup of
# each ferry repository (same image state: delta-heavy vs delta-free), best of ROUNDS (3).
#
#   scripts/ceph-dev up; benches/delta.sh           (results in $WORK/delta.tsv and on stdout)
#
# Measure on a quiet machine: the script waits (like compare.sh) for the CPUs to calm down.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib.sh
log() { printf '[delta %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
. "$ROOT/benches/lib.sh"
SIZE_MIB=${SIZE_MIB:-512}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/ferry-bench-delta}
BENJI=${BENJI:-/tmp/ferry-bench/benji-venv/bin/benji}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FERRY=$CARGO_TARGET_DIR/release/ferry
IMAGE=ferry-bench-delta

log "building ferry (release)"
(cd "$ROOT" && cargo build --release --locked --bin ferry >&2)
eval "$("$ROOT/scripts/ceph-dev" env)"
POOL=${POOL:-rbd}
SPEC=$POOL/$IMAGE

rm -rf "$WORK"
mkdir -p "$WORK"
# Repositories, Benji's storage and exports take about 12 × the image; the dev cluster's OSD
# file grows too. A full disk crashes the OSD (bluestore aborts on the I/O error): refuse.
need=$((SIZE_MIB * 14))
avail=$(df --output=avail -m "$WORK" | tail -n 1)
if [[ $avail -lt $need ]]; then
    log "only $avail MiB free under $WORK, this run needs about $need MiB (SIZE_MIB=$SIZE_MIB): refusing"
    exit 1
fi
cleanup() {
    rbd snap purge "$SPEC" >/dev/null 2>&1 || true
    rbd rm --no-progress "$SPEC" >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT

export FERRY_PASSWORD=bench-password FERRY_INDEX_DIR=$WORK/index
ferry_a=("$FERRY" --repo "file://$WORK/repo-delta")
ferry_b=("$FERRY" --repo "file://$WORK/repo-whole")
"${ferry_a[@]}" init >/dev/null
"${ferry_b[@]}" init >/dev/null

log "image: $SIZE_MIB MiB of random data"
python3 -c "import random,sys; r=random.Random(11); [sys.stdout.buffer.write(r.randbytes(1<<20)) for _ in range($SIZE_MIB)]" >"$WORK/image.raw"
rbd import --no-progress "$WORK/image.raw" "$SPEC" >/dev/null
rm -f "$WORK/image.raw"

# Benji: file I/O over exports of the snapshots, hints from rbd diff (its documented use).
benji_ok=0
if [[ -x $BENJI ]]; then
    mkdir -p "$WORK/benji/storage"
    benji_config "$WORK/benji" ferry-bench-password
    benji=("$BENJI" -c "$WORK/benji/benji.yaml" --log-level WARNING)
    "${benji[@]}" database-init >/dev/null 2>&1 && benji_ok=1
else
    log "Benji not installed at $BENJI (benches/compare.sh installs it): its column stays empty"
fi

# The newest ferry snapshot of a volume (its to_snap from the JSON summary).
snap_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["to_snap"])'; }
bytes_of() { du -sb "$1" | cut -f1; }

if [[ $benji_ok = 1 ]]; then
    log "Benji: full backup"
    rbd snap create --no-progress "$SPEC@benji0" >/dev/null
    rbd export --no-progress "$SPEC@benji0" "$WORK/export.raw" >/dev/null
    "${benji[@]}" -m backup -u v0 -s s0 "file:$WORK/export.raw" bench >/dev/null
fi

pages=$((SIZE_MIB * 256))
printf 'pages_pct\twrites\texport_diff\texport_diff_zstd3\tferry\tferry_no_deltas\tbenji\n' >"$WORK/delta.tsv"
round=0
for pct in 1 5 20; do
    round=$((round + 1))
    n=$((pages * pct / 100))
    log "round $round: full backups of volumes delta-$pct and whole-$pct"
    prev_a=$("${ferry_a[@]}" backup "rbd:$SPEC" --volume "delta-$pct" --keep-snapshots 2 --json | snap_of)
    "${ferry_b[@]}" backup "rbd:$SPEC" --volume "whole-$pct" --no-deltas --json >/dev/null
    log "round $round: $n random 4 KiB writes ($pct % of the pages)"
    python3 - "$((SIZE_MIB << 20))" "$n" "$round" <<'EOF' | rbd import-diff --no-progress - "$SPEC"
import random, struct, sys
size, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
pages = sorted(r.sample(range(size // 4096), n))
out = sys.stdout.buffer
out.write(b"rbd diff v1\n" + b"s" + struct.pack("<Q", size))
for p in pages:
    out.write(b"w" + struct.pack("<QQ", p * 4096, 4096) + r.randbytes(4096))
out.write(b"e")
EOF
    before_a=$(bytes_of "$WORK/repo-delta")
    before_b=$(bytes_of "$WORK/repo-whole")
    wait_quiet
    snap=$("${ferry_a[@]}" backup "rbd:$SPEC" --volume "delta-$pct" --keep-snapshots 2 --json | tee "$WORK/ferry-$pct.json" | snap_of)
    "${ferry_b[@]}" backup "rbd:$SPEC" --volume "whole-$pct" --no-deltas --json >"$WORK/ferry-whole-$pct.json"
    up_a=$(($(bytes_of "$WORK/repo-delta") - before_a))
    up_b=$(($(bytes_of "$WORK/repo-whole") - before_b))
    rbd export-diff --no-progress --from-snap "$prev_a" "$SPEC@$snap" "$WORK/exact.diff" >/dev/null
    diff_raw=$(stat -c %s "$WORK/exact.diff")
    diff_zstd=$(zstd -3 -q -c "$WORK/exact.diff" | wc -c)
    rm -f "$WORK/exact.diff"
    up_benji=""
    if [[ $benji_ok = 1 ]]; then
        before=$(bytes_of "$WORK/benji/storage")
        rm -f "$WORK/export.raw"
        rbd export --no-progress "$SPEC@$snap" "$WORK/export.raw" >/dev/null
        # Benji's base is its previous version (the image before this round's writes).
        rbd diff --from-snap "$prev_a" --format json "$SPEC@$snap" >"$WORK/hints.json"
        "${benji[@]}" -m backup -u "v$round" -s "s$round" -r "$WORK/hints.json" -f "v$((round - 1))" "file:$WORK/export.raw" bench >/dev/null
        up_benji=$(($(bytes_of "$WORK/benji/storage") - before))
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pct" "$n" "$diff_raw" "$diff_zstd" "$up_a" "$up_b" "$up_benji" >>"$WORK/delta.tsv"
    if [[ $pct = 5 ]]; then
        rbd export --no-progress "$SPEC@$snap" "$WORK/expected.raw" >/dev/null
        want=$(b3sum --no-names "$WORK/expected.raw" 2>/dev/null || sha256sum "$WORK/expected.raw" | cut -d' ' -f1)
        rm -f "$WORK/expected.raw"
        for which in delta whole; do
            repo=("${ferry_a[@]}")
            [[ $which = whole ]] && repo=("${ferry_b[@]}")
            best=""
            for _ in $(seq "$ROUNDS"); do
                rm -f "$WORK/restore.raw"
                sync
                wait_quiet
                t0=$(date +%s.%N)
                "${repo[@]}" restore "$which-5" --to "$WORK/restore.raw" >/dev/null
                t=$(echo "$(date +%s.%N) - $t0" | bc)
                if [[ -z $best ]] || (($(echo "$t < $best" | bc))); then best=$t; fi
            done
            got=$(b3sum --no-names "$WORK/restore.raw" 2>/dev/null || sha256sum "$WORK/restore.raw" | cut -d' ' -f1)
            [[ $got = "$want" ]] || { log "restore of $which differs from the snapshot"; exit 1; }
            printf 'restore_%s_s\t%s\n' "$which" "$best" >>"$WORK/restore.tsv"
            rm -f "$WORK/restore.raw"
        done
    fi
done
rm -f "$WORK/export.raw"

python3 - "$WORK/delta.tsv" "$WORK/restore.tsv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
mib = lambda b: f"{int(b) / 2**20:9.2f}" if b else "        -"
print("pages  writes  export-diff  zstd -3   ferry  ferry --no-deltas    Benji   ferry/zstd  no-deltas/ferry  Benji/ferry")
for r in rows:
    z, f, w, b = int(r["export_diff_zstd3"]), int(r["ferry"]), int(r["ferry_no_deltas"]), r["benji"]
    print(f'{r["pages_pct"]:>4}% {r["writes"]:>7} {mib(r["export_diff"])} {mib(z)} {mib(f)} {mib(w)} {mib(b)}'
          f'   {f / z:9.3f}   {w / f:13.1f}   ' + (f"{int(b) / f:9.1f}" if b else "        -"))
t = dict(line.split("\t") for line in open(sys.argv[2]).read().split("\n") if line)
d, w = float(t["restore_delta_s"]), float(t["restore_whole_s"])
print(f"restore after the 5 % round: delta-heavy {d:.2f} s, delta-free {w:.2f} s: {w / d * 100:.0f} % of the delta-free speed")
EOF
