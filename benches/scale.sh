#!/usr/bin/env bash
# scale.sh — ferry on a 1 TiB sparse volume: does an incremental cost what changed, or what the
# volume is? See benches/README.md.
#
#   benches/scale.sh [--size 1T] [--small 8G] [--data-blocks 256] [--work DIR] [--out FILE]
#
#   --size SIZE         the big volume (default 1T); only its export-diff streams are written
#   --small SIZE        the same data and changes on a small volume, for comparison (default 8G)
#   --data-blocks N     4 MiB data blocks in the full backup (default 256 = 1 GiB)
#   --work DIR          work directory (default /tmp/ferry-bench/scale); needs ~2.5 x N x 4 MiB
#   --out FILE          also write the Markdown report to FILE (default DIR/report.md)
#
# Per volume: a full backup of N scattered data blocks, then incrementals of 4, 16 and 64
# changed blocks (7 of 8 rewritten, 1 of 8 discarded), a restore of the last backup to a
# sparse file (deleted afterwards) and to an import-diff stream on /dev/null.
# Environment: CARGO_TARGET_DIR (default /tmp/target-bench), CARGO_JOBS (default 2),
# QUIET_BUSY / QUIET_WAIT (see compare.sh).
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIG=1T
SMALL=8G
DATA_BLOCKS=256
WORK=/tmp/ferry-bench/scale
OUT=""
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
CARGO_JOBS=${CARGO_JOBS:-2}

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) BIG=$2; shift ;;
    --small) SMALL=$2; shift ;;
    --data-blocks) DATA_BLOCKS=$2; shift ;;
    --work) WORK=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "scale.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$WORK/report.md}

log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$WORK"
LOGS=$WORK/logs
mkdir -p "$LOGS"
need=$((DATA_BLOCKS * 4 * 3 << 20))
avail=$(df -B1 --output=avail "$WORK" | tail -n 1)
[[ $avail -ge $need ]] || die "$WORK has $((avail >> 30)) GiB free, needs about $((need >> 30)) GiB"
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time; } >/dev/null 2>&1 || die "cannot install GNU time"

log "building ferry (release, target dir $CARGO_TARGET_DIR)"
(cd "$ROOT" && cargo build --release --workspace -j "$CARGO_JOBS" --quiet) || die "cargo build failed"
FERRY=$CARGO_TARGET_DIR/release/ferry
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo +dirty)"
TESTDATA=$CARGO_TARGET_DIR/release/ferry-testdata

export FERRY_PASSWORD=ferry-bench-password
ROWS=$WORK/rows.md
: >"$ROWS"

drop_caches() { sync; { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true; }

# cpu_busy and wait_quiet (the machine is shared: measure when it is quiet).
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# timed NAME CMD...: sets SECS, CPU, RSS_MIB (of the largest process).
timed() {
    local name=$1; shift
    drop_caches
    wait_quiet
    local t0 t1
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%e %M %U %S' -o "$LOGS/$name.time" "$@" 2>"$LOGS/$name.err" ||
        die "$name failed: $(tail -n 5 "$LOGS/$name.err")"
    t1=$EPOCHREALTIME
    SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    RSS_MIB=$(awk 'END { printf "%.0f", $2 / 1024 }' "$LOGS/$name.time")
    CPU=$(awk 'END { printf "%.2f", $3 + $4 }' "$LOGS/$name.time")
    log "$name: $SECS s, $CPU CPU s, peak RSS $RSS_MIB MiB"
}

human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }

row() { # row CELL... -> one Markdown table row
    local line="|" c
    for c in "$@"; do line+=" $c |"; done
    echo "$line" >>"$ROWS"
}

run_volume() { # run_volume NAME SIZE
    local vol=$1 size=$2 dir=$WORK/$1
    rm -rf "$dir"
    mkdir -p "$dir"
    export FERRY_REPO="file://$dir/repo" FERRY_INDEX_DIR="$dir/index"
    "$FERRY" init >"$LOGS/$vol-init.log" 2>&1 || die "ferry init failed: $(cat "$LOGS/$vol-init.log")"
    log "$vol ($size): generating the diff streams"
    "$TESTDATA" sparse-diff "$size" 7 "$DATA_BLOCKS" s1 "$dir/full.diff"
    "$TESTDATA" sparse-incr "$size" 11 4 s1 s2 "$dir/incr4.diff"
    "$TESTDATA" sparse-incr "$size" 12 16 s2 s3 "$dir/incr16.diff"
    "$TESTDATA" sparse-incr "$size" 13 64 s3 s4 "$dir/incr64.diff"
    local step
    for step in full incr4 incr16 incr64; do
        timed "$vol.$step" "$FERRY" backup --volume "$vol" --diff "$dir/$step.diff" --json >"$LOGS/$vol.$step.json"
        # The newest manifest object is the last in sort order (sortable time prefix).
        local manifest
        manifest=$(find "$dir/repo/volumes/$vol/backups" -type f -printf '%f %s\n' | sort | tail -n 1 | awk '{ print $2 }')
        row "$size" "backup $step" "$(human "$(stat -c %s "$dir/$step.diff")")" "$SECS s" "$CPU" "$RSS_MIB MiB" "$(human "$manifest")"
    done
    rm -f "$dir"/*.diff
    timed "$vol.restore-file" "$FERRY" restore "$vol" --to "$dir/restored.raw" --force --json >"$LOGS/$vol.restore-file.json"
    local apparent allocated
    apparent=$(stat -c %s "$dir/restored.raw")
    allocated=$(($(stat -c %b "$dir/restored.raw") * $(stat -c %B "$dir/restored.raw")))
    row "$size" "restore to sparse file" "$(human "$allocated") written of $(human "$apparent")" "$SECS s" "$CPU" "$RSS_MIB MiB" ""
    rm -f "$dir/restored.raw"
    timed "$vol.restore-import-diff" bash -c "'$FERRY' restore '$vol' --to - --format import-diff --json >/dev/null"
    row "$size" "restore as import-diff stream to /dev/null" "" "$SECS s" "$CPU" "$RSS_MIB MiB" ""
    log "$vol: repository $(du -sh "$dir/repo" | cut -f1)"
}

run_volume big "$BIG"
run_volume small "$SMALL"

{
    echo "Scale check $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), ferry $COMMIT"
    echo "Full backup: $DATA_BLOCKS scattered 4 MiB data blocks; incrementals: N changed blocks (7/8 rewritten, 1/8 discarded)."
    echo
    echo "| volume | step | diff stream / data | wall time | CPU s | peak RSS | manifest object |"
    echo "|---|---|---|---|---|---|---|"
    cat "$ROWS"
} | tee "$OUT"
log "report written to $OUT"
