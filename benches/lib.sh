# Shared by compare.sh and scale.sh (sourced; expects a `log` function).
# shellcheck shell=bash

# cpu_busy: percent of all CPUs busy over one second (from /proc/stat).
cpu_busy() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%d", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }'
}

# wait_quiet: this machine is shared; wait (at most QUIET_WAIT seconds) until other processes
# use at most QUIET_BUSY percent of the CPUs, so a run does not compete with someone's build.
# Sets BUSY to the last reading.
QUIET_WAIT=${QUIET_WAIT:-180}
QUIET_BUSY=${QUIET_BUSY:-15}
wait_quiet() {
    local start=$SECONDS said=0
    while :; do
        BUSY=$(cpu_busy)
        [[ $BUSY -le $QUIET_BUSY ]] && return 0
        if [[ $((SECONDS - start)) -ge $QUIET_WAIT ]]; then
            log "CPUs still ${BUSY}% busy after ${QUIET_WAIT} s of waiting: measuring anyway"
            return 0
        fi
        [[ $said -eq 1 ]] || log "CPUs ${BUSY}% busy (other processes): waiting for quiet (up to ${QUIET_WAIT} s)"
        said=1
        sleep 4
    done
}

# benji_config DIR PASSWORD: DIR/benji.yaml for Benji 0.17 — sqlite in DIR, file storage in
# DIR/storage, 4 MiB blocks, zstd 3 then AES-256-GCM (as ferry stores), file I/O.
# Schema: benji/schemas/v1/benji.config.yaml, benji.storage.file.yaml,
# benji.transform.{zstd,aes_256_gcm}.yaml, benji.io.file.yaml in the installed package.
benji_config() {
    local dir=$1 password=$2
    cat >"$dir/benji.yaml" <<EOF
configurationVersion: '1'
databaseEngine: sqlite:///$dir/benji.sqlite
defaultStorage: storage-1
logFile: $dir/benji.log
blockSize: 4194304
storages:
  - name: storage-1
    storageId: 1
    module: file
    configuration:
      path: $dir/storage
      activeTransforms: [zstd, encryption]
transforms:
  - name: zstd
    module: zstd
    configuration:
      level: 3
  - name: encryption
    module: aes_256_gcm
    configuration:
      kdfSalt: 'ZmVycnktYmVuY2gtc2FsdA=='
      kdfIterations: 20000
      password: '$password'
ios:
  - name: file
    module: file
EOF
}
