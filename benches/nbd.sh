#!/usr/bin/env bash
# Opening a backup without restoring it (issue 12 item 3): sequential reads of a backup served
# by `ferry serve --nbd` against `ferry restore` of the same backup to a file.
#
# The reference image of benches/compare.sh (SIZE, default 2G, seed 42: the content mix of
# real volumes, with holes) is backed up into a file:// repository; then, best of ROUNDS,
# each on a fresh server (nothing decoded yet):
#   - ferry restore VOLUME --to FILE
#   - nbdcopy nbd://… FILE        (libnbd: 4 connections, 64 requests of 256 KiB in flight)
#   - qemu-img convert nbd://… FILE   (16 requests in flight, block status for holes)
# Every copy is compared with the image (sha256).
#
#   benches/nbd.sh          (results in $WORK/nbd.tsv and on stdout; no Ceph needed)
set -Eeuo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[nbd %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=lib.sh
. "$ROOT/benches/lib.sh"
SIZE=${SIZE:-2G}
SEED=${SEED:-42}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/ferry-bench-nbd}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FERRY=$CARGO_TARGET_DIR/release/ferry
TESTDATA=$CARGO_TARGET_DIR/release/ferry-testdata

for tool in nbdcopy qemu-img; do
    command -v "$tool" >/dev/null || { log "$tool is needed (apt-get install libnbd-bin qemu-utils)"; exit 1; }
done
log "building ferry (release)"
(cd "$ROOT" && cargo build --release --locked --bin ferry >&2 && cargo build --release --locked -p ferry-testdata >&2)

rm -rf "$WORK"
mkdir -p "$WORK"
export FERRY_PASSWORD=bench-password FERRY_INDEX_DIR=$WORK/index
ferry=("$FERRY" --repo "file://$WORK/repo")
"${ferry[@]}" init >/dev/null
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

log "image: $SIZE (seed $SEED), its full diff, a backup"
"$TESTDATA" image "$SIZE" "$SEED" "$WORK/image.raw"
"$TESTDATA" full-diff "$WORK/image.raw" s1 "$WORK/full.diff"
"${ferry[@]}" backup --volume bench --diff "$WORK/full.diff" >/dev/null
rm -f "$WORK/full.diff"
want=$(sha256sum "$WORK/image.raw" | cut -d' ' -f1)
bytes=$(stat -c %s "$WORK/image.raw")
rm -f "$WORK/image.raw"

check() {
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [[ $got == "$want" ]] || { log "$1 DIFFERS from the image"; exit 1; }
    rm -f "$1"
}

server_pid=
start_server() {
    "${ferry[@]}" serve bench --nbd 127.0.0.1:0 --json >"$WORK/serve.out" 2>"$WORK/serve.err" &
    server_pid=$!
    for _ in $(seq 100); do
        [[ -s $WORK/serve.out ]] && break
        sleep 0.1
    done
    URL=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["nbd"])' "$WORK/serve.out")
}
stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    tail -n 1 "$WORK/serve.out" >&2
}

declare -A best
keep_best() {
    local k=$1 v=$2
    if [[ -z ${best[$k]:-} ]] || python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$v" "${best[$k]}"; then
        best[$k]=$v
    fi
}

for round in $(seq "$ROUNDS"); do
    wait_quiet
    sync
    t0=$(date +%s.%N)
    "${ferry[@]}" restore bench --to "$WORK/restored.raw" >/dev/null
    t1=$(date +%s.%N)
    keep_best restore "$(secs "$t0" "$t1")"
    check "$WORK/restored.raw"

    start_server
    t0=$(date +%s.%N)
    nbdcopy "$URL" "$WORK/nbdcopy.raw"
    t1=$(date +%s.%N)
    stop_server
    keep_best nbdcopy "$(secs "$t0" "$t1")"
    check "$WORK/nbdcopy.raw"

    start_server
    t0=$(date +%s.%N)
    qemu-img convert -f raw -O raw "$URL" "$WORK/qemu.raw"
    t1=$(date +%s.%N)
    stop_server
    keep_best qemu "$(secs "$t0" "$t1")"
    check "$WORK/qemu.raw"
    log "round $round: restore ${best[restore]} s, nbdcopy ${best[nbdcopy]} s, qemu-img ${best[qemu]} s (best so far)"
done

mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]) / 2**20:.0f}')" "$bytes" "$1"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
{
    printf 'run\tseconds\tMiB/s\tvs restore\n'
    printf 'ferry restore to a file\t%s\t%s\t1.00\n' "${best[restore]}" "$(mib "${best[restore]}")"
    printf 'nbdcopy from ferry serve --nbd\t%s\t%s\t%s\n' "${best[nbdcopy]}" "$(mib "${best[nbdcopy]}")" "$(ratio "${best[nbdcopy]}" "${best[restore]}")"
    printf 'qemu-img convert from ferry serve --nbd\t%s\t%s\t%s\n' "${best[qemu]}" "$(mib "${best[qemu]}")" "$(ratio "${best[qemu]}" "${best[restore]}")"
} | tee "$WORK/nbd.tsv"
