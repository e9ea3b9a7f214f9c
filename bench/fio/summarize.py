"""Turn bench/fio/run.sh's raw fio JSON into the markdown tables of bench/RESULTS.md.

usage: summarize.py OUT_DIR GUEST_MIB POLICY REPEAT
Each cell is the median over the REPEAT runs named NAME-r1..rN.
"""
import json
import os
import statistics
import sys

out, guest_mib, policy, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def load_one(name):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return None
    text = open(path).read()
    return json.loads(text[text.index("{"):])


def load(name):
    """Median metrics over the repeats of NAME, or None."""
    runs = [load_one(f"{name}-r{i}") for i in range(1, repeat + 1)]
    runs = [metrics(r) for r in runs if r]
    if not runs:
        return None
    med = [statistics.median(col) for col in zip(*runs)]
    med[3] = sum(r[3] for r in runs)  # errors: total, not median
    return tuple(med)


def metrics(report):
    """(MB/s summed over jobs, p50 completion latency in us of the first job, IOPS sum, errors)."""
    jobs = report["jobs"]
    bw = sum(j["read"]["bw_bytes"] for j in jobs) / 1e6
    iops = sum(j["read"]["iops"] for j in jobs)
    pct = jobs[0]["read"]["clat_ns"].get("percentile", {})
    p50 = pct.get("50.000000", 0) / 1000
    errors = sum(j["error"] for j in jobs)
    return bw, p50, iops, errors


def mem(name):
    path = os.path.join(out, name + ".mem")
    if not os.path.exists(path):
        return ""
    fields = dict(line.split(":", 1) for line in open(path).read().splitlines())
    return ", ".join(f"{k} {v.strip()}" for k, v in fields.items())


print(f"Guest {guest_mib} MiB (mkfixture: 40 % zero, 35 % disk, 25 % blob pages), "
      f"prefetch `{policy}` for the main table; medians of {repeat} runs.\n")

rows = []
for job in ["seq-1m", "rand-4k", "mmap", "multi"]:
    for temp in ["cold", "warm"]:
        n, f = load(f"native-{temp}-{job}"), load(f"fuse-{temp}-{job}")
        if not n or not f:
            continue
        nb, np50, niops, ne = n
        fb, fp50, fiops, fe = f
        rows.append((job, temp, nb, fb, fb / nb if nb else 0, np50, fp50,
                     fp50 / np50 if np50 else 0, ne + fe))
if rows:
    print("| job | cache | native MB/s | FUSE MB/s | throughput ratio | native p50 us "
          "| FUSE p50 us | p50 ratio (FUSE/native) | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.2f} | {r[5]:.1f} "
              f"| {r[6]:.1f} | {r[7]:.2f} | {r[8]} |")
    print()
    for job in ["seq-1m", "rand-4k", "mmap", "multi"]:
        m = mem(f"main-{job}")
        if m:
            print(f"- daemon memory after {job}: {m}")
    print()

prow = []
for p in ["none", "readahead", "loadingset", "all"]:
    s, r = load(f"policy-{p}-seq-1m"), load(f"policy-{p}-rand-4k")
    if not s or not r:
        continue
    sb = s[0]
    rb, rp50, riops, _ = r
    prow.append((p, sb, riops, rp50, mem(f"policy-{p}-seq-1m")))
if prow:
    print("Prefetch policies, cold (fresh daemon, dropped caches); the working set was "
          "recorded from one earlier rand-4k run:\n")
    print("| policy | seq-1m MB/s | rand-4k IOPS | rand-4k p50 us | daemon memory after seq-1m |")
    print("|---|---:|---:|---:|---|")
    for p in prow:
        print(f"| {p[0]} | {p[1]:.0f} | {p[2]:.0f} | {p[3]:.1f} | {p[4]} |")
    print()

crow = []
for kb in ["64", "256", "1024"]:
    s, r = load(f"chunk-{kb}-seq-1m"), load(f"chunk-{kb}-rand-4k")
    if s and r:
        crow.append((kb, s[0], s[1], r[2], r[1]))
if crow:
    print("Chunk size (cold, prefetch none):\n")
    print("| chunk | seq-1m MB/s | seq-1m p50 us | rand-4k IOPS | rand-4k p50 us |")
    print("|---:|---:|---:|---:|---:|")
    for c in crow:
        print(f"| {c[0]} KiB | {c[1]:.0f} | {c[2]:.1f} | {c[3]:.0f} | {c[4]:.1f} |")
    print()

for store in ["true", "false"]:
    path = os.path.join(out, f"store-{store}.time")
    if os.path.exists(path):
        a, b = map(float, open(path).read().split())
        st = json.load(open(os.path.join(out, f"store-{store}.stats.json")))
        print(f"- mmap page-touch of the whole guest after the background fetch, notify-store "
              f"{store}: {b - a:.2f} s, {st['reads']} FUSE reads reached the daemon")
