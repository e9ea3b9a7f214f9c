#!/usr/bin/env bash
# FUSE read throughput benchmark: the fio jobs of tests/fio/ on ckptfs-mountd's
# `memory` and on the raw dump on the local filesystem, cold (drop_caches and a
# fresh daemon) and warm (same mount, second run), reported as FUSE/native
# ratios; plus the prefetch policies compared cold, notify-store on/off for a
# VMM-like mmap reader, and the daemon's RSS. Needs root (drop_caches, mounts).
#
# usage: bench/fio/run.sh [GUEST_MIB (2048)] [DISK_MIB (1024)]
# env:   RUNTIME (s per fio run, 6), REPEAT (runs per cell, median reported, 3),
#        POLICY (prefetch for the main table, all),
#        MOUNTD_ARGS (extra ckptfs-mountd flags), WORK (/var/tmp/ckptfs-fio-bench),
#        ONLY (space-separated subset of: main policies chunks store)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
GUEST_MIB=${1:-2048}
DISK_MIB=${2:-1024}
RUNTIME=${RUNTIME:-6}
REPEAT=${REPEAT:-3}
POLICY=${POLICY:-all}
MOUNTD_ARGS=${MOUNTD_ARGS:-}
WORK=${WORK:-/var/tmp/ckptfs-fio-bench}
ONLY=${ONLY:-main policies chunks store}
JOBS=$ROOT/tests/fio
PY=/usr/bin/python3

for tool in fio fusermount3 "$PY"; do
  command -v "$tool" >/dev/null || { echo "fio bench: $tool is missing (scripts/setup.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "fio bench: run as root (drop_caches)" >&2; exit 1; }

cargo build -q --release -p mountd --bin ckptfs-mountd --example mkfixture
MOUNTD=$ROOT/target/release/ckptfs-mountd
FX=$WORK/g${GUEST_MIB}-d${DISK_MIB}
MNT=$FX/mnt
mkdir -p "$FX" "$MNT"
if [ ! -f "$FX/vm.ckpt" ]; then
  echo "fio bench: generating a ${GUEST_MIB} MiB guest over a ${DISK_MIB} MiB disk in $FX" >&2
  "$ROOT/target/release/examples/mkfixture" "$FX" "$GUEST_MIB" "$DISK_MIB" >/dev/null
fi
OUT=$WORK/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

unmount() {
  if grep -q " $MNT " /proc/self/mountinfo; then
    local pid
    pid=$("$PY" -c "import json;print(json.load(open('$MNT/stats'))['pid'])" 2>/dev/null || true)
    fusermount3 -u -z "$MNT" || true
    # Wait for the daemon to go, so the next cold run starts from nothing.
    for _ in $(seq 100); do [ -n "$pid" ] && [ -d "/proc/$pid" ] || break; sleep 0.05; done
  fi
}
trap unmount EXIT
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
mount_fresh() { # args: extra ckptfs-mountd flags
  unmount
  # shellcheck disable=SC2086
  "$MOUNTD" "$FX/vm.ckpt" "$MNT" $MOUNTD_ARGS "$@"
}
fio_run() { # name job file [invalidate]
  FILE=$3 RUNTIME=$RUNTIME INVALIDATE=${4:-1} fio --output-format=json "$JOBS/$2.fio" >"$OUT/$1.json"
}
daemon_mem() { # name: VmHWM/RssAnon/RssFile of the daemon into OUT/name.mem
  local pid
  pid=$("$PY" -c "import json;print(json.load(open('$MNT/stats'))['pid'])")
  grep -E 'VmHWM|RssAnon|RssFile' "/proc/$pid/status" | tr -s ' \t' ' ' >"$OUT/$1.mem"
  cp "$MNT/stats" "$OUT/$1.stats.json"
}
wait_background() {
  for _ in $(seq 600); do
    "$PY" -c "import json,sys;sys.exit(0 if json.load(open('$MNT/stats'))['background_complete'] else 1)" && return 0
    sleep 0.1
  done
  echo "fio bench: background fetch did not complete in 60 s" >&2
}

# The host disk is shared and noisy: native and FUSE runs alternate, REPEAT
# times, and the summary reports medians. Cold = dropped caches and a fresh
# daemon; warm = the same job again right after, keeping the page cache.
if [[ " $ONLY " == *" main "* ]]; then
  # No loading set here: one recorded from these very jobs would make the
  # random jobs replay their own offsets (that is the policies section's point).
  rm -f "$FX/vm.ckpt.ls"
  for rep in $(seq "$REPEAT"); do
    for job in seq-1m rand-4k mmap multi; do
      echo "fio bench: $job, run $rep" >&2
      drop_caches; fio_run "native-cold-$job-r$rep" "$job" "$FX/vm.mem"
      fio_run "native-warm-$job-r$rep" "$job" "$FX/vm.mem" 0
      drop_caches; mount_fresh --prefetch "$POLICY"
      fio_run "fuse-cold-$job-r$rep" "$job" "$MNT/memory"
      fio_run "fuse-warm-$job-r$rep" "$job" "$MNT/memory" 0
      daemon_mem "main-$job"
      unmount
    done
  done
fi

if [[ " $ONLY " == *" policies "* ]]; then
  # Record a loading set with the random job (REAP: the same workload again).
  rm -f "$FX/vm.ckpt.ls"
  drop_caches; mount_fresh --prefetch none --record-loading-set --loading-set-window 3600
  fio_run "record-rand-4k" rand-4k "$MNT/memory"
  unmount
  for rep in $(seq "$REPEAT"); do
    for policy in none readahead loadingset all; do
      for job in seq-1m rand-4k; do
        echo "fio bench: policy $policy, $job, run $rep" >&2
        case $policy in
          loadingset) flags=(--prefetch none --wait-loading-set) ;;
          *) flags=(--prefetch "$policy" --no-loading-set) ;;
        esac
        drop_caches; mount_fresh "${flags[@]}"
        fio_run "policy-$policy-$job-r$rep" "$job" "$MNT/memory"
        daemon_mem "policy-$policy-$job"
        unmount
      done
    done
  done
fi

if [[ " $ONLY " == *" chunks "* ]]; then
  for rep in $(seq "$REPEAT"); do
    for kb in 64 256 1024; do
      for job in seq-1m rand-4k; do
        echo "fio bench: chunk $kb KiB, $job, run $rep" >&2
        drop_caches; mount_fresh --prefetch none --chunk-kb "$kb"
        fio_run "chunk-$kb-$job-r$rep" "$job" "$MNT/memory"
        unmount
      done
    done
  done
fi

if [[ " $ONLY " == *" store "* ]]; then
  # A VMM touching every page through mmap after the background fetch finished:
  # with notify-store the kernel already holds the pages, without it each fault
  # is a FUSE round trip.
  for store in true false; do
    echo "fio bench: notify-store $store" >&2
    drop_caches; mount_fresh --prefetch all --notify-store "$store"
    exec 9<"$MNT/memory" # keep the inode looked up, as a VMM would
    wait_background
    start=$(date +%s.%N)
    "$PY" - "$MNT/memory" <<'EOF'
import mmap, os, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
s = 0
for off in range(0, len(m), 4096):
    s += m[off]
print(s, file=sys.stderr)
EOF
    end=$(date +%s.%N)
    echo "$start $end" >"$OUT/store-$store.time"
    daemon_mem "store-$store"
    exec 9<&-
    unmount
  done
fi

"$PY" "$ROOT/bench/fio/summarize.py" "$OUT" "$GUEST_MIB" "$POLICY" "$REPEAT" | tee "$OUT/summary.md"
echo "fio bench: raw results in $OUT" >&2
