#!/usr/bin/env bash
# Run a command on a CPU of its own (cgroup v1 cpuset): every other task on
# the machine is moved to the remaining CPUs for the duration, so a benchmark
# on this shared 2-core machine is not disturbed by compiles or other
# benchmarks. Restores the CPUs afterwards. Root only.
#   bench/scripts/isolate-cpu.sh CPU COMMAND [ARGS...]
set -euo pipefail
cpu=$1; shift
root=/sys/fs/cgroup/cpuset
[ -w "$root/cgroup.procs" ] || { echo "isolate-cpu: $root is not a writable cpuset hierarchy" >&2; exit 1; }
all=$(cat "$root/cpuset.cpus")
rest=$(python3 -c "import sys
cpus=set()
for part in sys.argv[1].split(','):
    a,_,b=part.partition('-'); cpus.update(range(int(a), int(b or a)+1))
cpus.discard(int(sys.argv[2])); print(','.join(map(str,sorted(cpus))))" "$all" "$cpu")
[ -n "$rest" ] || { echo "isolate-cpu: no CPU left for the others" >&2; exit 1; }
mems=$(cat "$root/cpuset.mems")
mk() { mkdir -p "$root/$1"; echo "$mems" > "$root/$1/cpuset.mems"; echo "$2" > "$root/$1/cpuset.cpus"; }
mk ckptfs-rest "$rest"
mk ckptfs-bench "$cpu"
restore() {
  echo "$all" > "$root/ckptfs-rest/cpuset.cpus" 2>/dev/null || true
  for p in $(cat "$root/ckptfs-rest/tasks" "$root/ckptfs-bench/tasks" 2>/dev/null); do echo "$p" > "$root/tasks" 2>/dev/null || true; done
  rmdir "$root/ckptfs-bench" "$root/ckptfs-rest" 2>/dev/null || true
}
trap restore EXIT
for p in $(cat "$root/tasks"); do echo "$p" > "$root/ckptfs-rest/tasks" 2>/dev/null || true; done
echo $$ > "$root/ckptfs-bench/tasks"
"$@"
