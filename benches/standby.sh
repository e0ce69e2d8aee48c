#!/usr/bin/env bash
# The worst day (issue 12): a warm standby and a second bucket.
#
# One image of incompressible data (SIZE_MIB, default 2048) in the dev cluster, a full backup
# into a file:// repository, then:
#   - full replay onto a standby image (the first `ferry replay`: a full restore into RBD),
#     against `rbd import` of the raw image;
#   - 10 random 4 KiB writes in 10 different 4 MiB blocks, an incremental backup, and the
#     replay of that change into the standby (best of ROUNDS, each on a fresh change);
#   - `ferry sync` of the repository to a second file:// repository (ciphertext copy), and an
#     incremental sync after the change.
# Every replay is checked: the standby's snapshot equals the source's (`rbd export` hashes).
#
#   scripts/ceph-dev up; benches/standby.sh       (results in $WORK/standby.tsv and on stdout)
set -Eeuo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[standby %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=lib.sh
. "$ROOT/benches/lib.sh"
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/ferry-bench-standby}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FERRY=$CARGO_TARGET_DIR/release/ferry

log "building ferry (release)"
(cd "$ROOT" && cargo build --release --locked --bin ferry >&2)
eval "$("$ROOT/scripts/ceph-dev" env)"
POOL=${POOL:-rbd}
SRC=$POOL/ferry-bench-standby-src
DR=$POOL/ferry-bench-standby-dr
PLAIN=$POOL/ferry-bench-standby-import
INSTANT=$POOL/ferry-bench-standby-instant

rm -rf "$WORK"
mkdir -p "$WORK"
need=$((SIZE_MIB * 5))
avail=$(df --output=avail -m "$WORK" | tail -n 1)
if [[ $avail -lt $need ]]; then
    log "only $avail MiB free under $WORK, this run needs about $need MiB (SIZE_MIB=$SIZE_MIB): refusing"
    exit 1
fi
cleanup() {
    for i in "$SRC" "$DR" "$PLAIN" "$INSTANT"; do
        rbd snap purge "$i" >/dev/null 2>&1 || true
        rbd rm --no-progress "$i" >/dev/null 2>&1 || true
    done
}
cleanup
trap cleanup EXIT

export FERRY_PASSWORD=bench-password FERRY_INDEX_DIR=$WORK/index
ferry=("$FERRY" --repo "file://$WORK/repo")
"${ferry[@]}" init >/dev/null
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
snap_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["to_snap"])'; }
hash_of() { rbd export --no-progress "$1" - | sha256sum | cut -d' ' -f1; }

log "image: $SIZE_MIB MiB of random data"
python3 -c "import random,sys; r=random.Random(12); [sys.stdout.buffer.write(r.randbytes(1<<20)) for _ in range($SIZE_MIB)]" >"$WORK/image.raw"
rbd import --no-progress "$WORK/image.raw" "$SRC" >/dev/null
wait_quiet
t0=$EPOCHREALTIME
rbd import --no-progress "$WORK/image.raw" "$PLAIN" >/dev/null
t_import=$(secs "$t0" "$EPOCHREALTIME")
rm -f "$WORK/image.raw"
rbd rm --no-progress "$PLAIN" >/dev/null

log "full backup"
snap=$("${ferry[@]}" backup "rbd:$SRC" --volume vol --json | snap_of)
wait_quiet
t0=$EPOCHREALTIME
"${ferry[@]}" replay vol --onto "rbd:$DR" --json >"$WORK/replay-full.json"
t_full=$(secs "$t0" "$EPOCHREALTIME")
[[ $(hash_of "$DR@$snap") = $(hash_of "$SRC@$snap") ]] || { log "full replay differs from the source"; exit 1; }
log "instant restore"
wait_quiet
"${ferry[@]}" restore vol --to "rbd:$INSTANT" --instant --json >"$WORK/instant.json"
read -r t_usable t_complete < <(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["instant"]; print("%.2f %.2f" % (j["usable_after_s"], j["complete_after_s"]))' "$WORK/instant.json")
[[ $(hash_of "$INSTANT") = $(hash_of "$SRC@$snap") ]] || { log "instant restore differs from the source"; exit 1; }
rbd rm --no-progress "$INSTANT" >/dev/null
wait_quiet
t0=$EPOCHREALTIME
"${ferry[@]}" sync --to "file://$WORK/copy" --json >"$WORK/sync-full.json"
t_sync_full=$(secs "$t0" "$EPOCHREALTIME")

best=""
best_sync=""
for round in $(seq "$ROUNDS"); do
    log "round $round: 10 random 4 KiB writes in 10 blocks, incremental backup, replay"
    python3 - "$((SIZE_MIB << 20))" "$round" <<'PYEOF' | rbd import-diff --no-progress - "$SRC"
import random, struct, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(100 + seed)
blocks = r.sample(range(size >> 22), 10)
out = sys.stdout.buffer
out.write(b"rbd diff v1\n" + b"s" + struct.pack("<Q", size))
for b in sorted(blocks):
    out.write(b"w" + struct.pack("<QQ", (b << 22) + r.randrange(1024) * 4096, 4096) + r.randbytes(4096))
out.write(b"e")
PYEOF
    snap=$("${ferry[@]}" backup "rbd:$SRC" --volume vol --json | snap_of)
    wait_quiet
    t0=$EPOCHREALTIME
    "${ferry[@]}" replay vol --onto "rbd:$DR" --json >"$WORK/replay-$round.json"
    t=$(secs "$t0" "$EPOCHREALTIME")
    [[ $(hash_of "$DR@$snap") = $(hash_of "$SRC@$snap") ]] || { log "replay $round differs from the source"; exit 1; }
    written=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blocks_written"])' "$WORK/replay-$round.json")
    [[ $written = 10 ]] || { log "replay $round wrote $written blocks, not 10"; exit 1; }
    if [[ -z $best ]] || python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$t" "$best"; then best=$t; fi
    wait_quiet
    t0=$EPOCHREALTIME
    "${ferry[@]}" sync --to "file://$WORK/copy" --json >"$WORK/sync-$round.json"
    t=$(secs "$t0" "$EPOCHREALTIME")
    if [[ -z $best_sync ]] || python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$t" "$best_sync"; then best_sync=$t; fi
done
copied=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["objects_copied"], j["bytes_copied"])' "$WORK/sync-$ROUNDS.json")

printf 'size_mib\trbd_import_s\treplay_full_s\tinstant_usable_s\tinstant_complete_s\treplay_10_blocks_s\tsync_full_s\tsync_incremental_s\n' >"$WORK/standby.tsv"
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$SIZE_MIB" "$t_import" "$t_full" "$t_usable" "$t_complete" "$best" "$t_sync_full" "$best_sync" >>"$WORK/standby.tsv"
cat <<REPORT
standby replay and sync, $SIZE_MIB MiB of random data (dev cluster, file:// repositories)
  rbd import of the raw image            $t_import s
  first replay (full restore into RBD)   $t_full s   ($(python3 -c "print(f'{float($t_full)/float($t_import):.2f}')") × rbd import)
  instant restore: usable after          $t_usable s   (complete after $t_complete s)
  replay of a 10-block change            $best s   (best of $ROUNDS; 10 blocks written each)
  sync to a second repository (full)     $t_sync_full s
  sync of one incremental                $best_sync s   (objects and bytes copied in the last: $copied)
REPORT
