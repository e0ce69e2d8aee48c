#!/usr/bin/env bash
# gc.sh — garbage collection of a repository with 100 backups of a 2 GiB volume: time,
# requests, peak RSS, mark memory. See benches/README.md.
#
#   benches/gc.sh [--size 2G] [--backups 100] [--writes 200] [--keep 50] [--work DIR] [--out FILE]
#
#   --size SIZE      the volume (default 2G)
#   --backups N      one full backup and N-1 incrementals (default 100)
#   --writes W       64 KiB random writes between backups (default 8: each rewrites a 4 MiB block)
#   --keep K         prune --keep-last K before the GC (default 50)
#   --work DIR       work directory (default /tmp/ferry-bench/gc)
#   --out FILE       also write the Markdown report to FILE (default DIR/report.md)
#
# Then: a dry run, the GC itself (under /usr/bin/time -v for peak RSS), a second GC (nothing
# to do: the cost of the mark alone), and an audit that every chunk the manifests reference is
# present. Environment: CARGO_TARGET_DIR (default /tmp/target-bench), CARGO_JOBS (default 2).
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SIZE=2G
BACKUPS=100
WRITES=8
KEEP=50
WORK=/tmp/ferry-bench/gc
OUT=""
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
CARGO_JOBS=${CARGO_JOBS:-2}

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --size) SIZE=$2; shift ;;
    --backups) BACKUPS=$2; shift ;;
    --writes) WRITES=$2; shift ;;
    --keep) KEEP=$2; shift ;;
    --work) WORK=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gc.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$WORK/report.md}
command -v /usr/bin/time >/dev/null || { echo "gc.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 2; }

(cd "$ROOT" && cargo build --release -j "$CARGO_JOBS" -p ferry -p ferry-testdata >&2)
FERRY=$CARGO_TARGET_DIR/release/ferry
TD=$CARGO_TARGET_DIR/release/ferry-testdata

rm -rf "$WORK"
mkdir -p "$WORK"
export FERRY_REPO="file://$WORK/repo" FERRY_PASSWORD=bench FERRY_INDEX_DIR="$WORK/index"
"$FERRY" init --block-size 4M >/dev/null
"$TD" image "$SIZE" 7 "$WORK/img"
"$TD" full-diff "$WORK/img" s1 "$WORK/d"
start=$(date +%s.%N)
"$FERRY" backup --volume v --diff "$WORK/d" >/dev/null
for i in $(seq 2 "$BACKUPS"); do
    "$TD" mutate "$WORK/img" "$i" "$WRITES" "s$((i - 1))" "s$i" "$WORK/d"
    "$FERRY" backup --volume v --diff "$WORK/d" >/dev/null
done
made=$(echo "$(date +%s.%N) - $start" | bc)
rm -f "$WORK/d" "$WORK/img"
"$FERRY" prune v --keep-last "$KEEP" >/dev/null
chunks_before=$(find "$WORK/repo/chunks" -type f | wc -l)
bytes_before=$(du -sb "$WORK/repo/chunks" | cut -f1)

run_gc() { # name, args...
    local name=$1
    shift
    /usr/bin/time -v -o "$WORK/$name.time" "$FERRY" gc --json "$@" >"$WORK/$name.json"
}
run_gc dry --dry-run
run_gc gc
run_gc again
"$FERRY" audit --json >"$WORK/audit.json" || { echo "gc.sh: audit failed after GC" >&2; cat "$WORK/audit.json" >&2; exit 1; }
chunks_after=$(find "$WORK/repo/chunks" -type f | wc -l)

python3 - "$WORK" "$SIZE" "$BACKUPS" "$WRITES" "$KEEP" "$made" "$chunks_before" "$bytes_before" "$chunks_after" >"$OUT" <<'PY'
import json, re, sys
work, size, backups, writes, keep, made, cb, bb, ca = sys.argv[1:]
def t(name):
    txt = open(f"{work}/{name}.time").read()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", txt).group(1)
    parts = [float(x) for x in wall.split(":")]
    secs = parts[-1] + 60 * (parts[-2] if len(parts) > 1 else 0) + 3600 * (parts[-3] if len(parts) > 2 else 0)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt).group(1))
    return secs, rss / 1024
audit = json.load(open(f"{work}/audit.json"))
print(f"# ferry gc: {backups} backups of a {size} volume, prune --keep-last {keep}\n")
print(f"Built the repository in {float(made):.0f} s ({writes} x 64 KiB writes between backups); "
      f"{cb} chunk objects, {int(bb) / 2**30:.2f} GiB before GC.\n")
print("| run | time | peak RSS | manifests | referenced | candidates | deleted | freed | requests (LIST/GET/DELETE/PUT) | mark bytes/chunk |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ["dry", "gc", "again"]:
    j = json.load(open(f"{work}/{name}.json"))
    secs, rss = t(name)
    r = j["requests"]
    per = j["mark_bytes"] / max(j["chunks_referenced"], 1)
    print(f"| {name} | {secs:.2f} s | {rss:.0f} MiB | {j['manifests']} | {j['chunks_referenced']} | {j['candidates']} | "
          f"{j['chunks_deleted']} | {j['bytes_freed'] / 2**20:.0f} MiB | {r['list']}/{r['get']}/{r['delete']}/{r['put']} | {per:.1f} |")
print(f"\nChunk objects after GC: {ca}; audit after GC: ok={audit['ok']}, {audit['chunks_referenced']} referenced, {audit['chunks_present']} present.")
PY
cat "$OUT"
