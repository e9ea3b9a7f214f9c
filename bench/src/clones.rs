//! `bench clones`: host memory of N VMs restored at once from one checkpoint.
//!
//! One guest is booted and checkpointed (ckptfs checkpoint, raw dump, state). For each
//! method and N in `counts`, from a cold page cache (the VM's files evicted one by one),
//! N `vmm-lite restore`s start together, each with its own request seed, each first
//! writing `dirty_pct` % of guest RAM (DIRTY requests), then serving READs:
//!
//! - `ckptfs`: one mount of the checkpoint (`--no-loading-set --prefetch none`: only what
//!   the VMs fault), every VMM mapping its `memory` MAP_PRIVATE;
//! - `lazy-raw`: every VMM maps the raw dump MAP_PRIVATE;
//! - `eager-raw`: every VMM copies the raw dump into anonymous memory first.
//!
//! Once every clone has written its share (its guest-RAM mapping holds that many
//! anonymous pages; eager: all of RAM is resident) and half a second more, the bench
//! samples `/proc/PID/smaps_rollup` and `status` of the VMMs and the daemon and the page
//! cache of every input file (`mincore`). The host memory they use together is
//! anonymous memory + page tables of every process + the page cache of the memory file
//! (mount `memory` or raw dump), the checkpoint and the disk image: anonymous pages and
//! page cache never overlap, unlike PSS/USS (which count mapped page cache too; reported
//! beside). Every clone's final CHECK must equal a reference restore's (the guest's
//! writes change it; its READs do not).
//!
//! Then the disk check: two VMs of the same disk image (booted with different seeds) are
//! mounted at once and restored one after the other; the disk image's page cache after
//! both must be about what it was after the first.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::fleet::{self, Bins, FleetVm, Memory, Mount, Restore, stat};
use crate::procmem::{self, ProcMem};
use crate::restore::{evict, median};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Guest MiB.
    pub mib: u64,
    /// Workload.
    pub workload: String,
    /// Numbers of clones.
    pub counts: Vec<usize>,
    /// Methods: ckptfs, lazy-raw, eager-raw.
    pub methods: Vec<String>,
    /// Repetitions.
    pub reps: usize,
    /// Share of RAM each clone writes, percent.
    pub dirty_pct: f64,
    /// Seconds each clone serves requests.
    pub duration: f64,
}

/// One sample: N clones by one method.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Method.
    pub method: String,
    /// Clones.
    pub n: usize,
    /// Repetition.
    pub rep: usize,
    /// Sum over the VMMs.
    pub vmms: ProcMem,
    /// The daemon (ckptfs only).
    pub daemon: Option<ProcMem>,
    /// Anonymous bytes in each clone's guest-RAM mapping (its written pages; eager: all).
    pub written: Vec<u64>,
    /// Page cache of the memory file the clones map or copy (mount `memory` or raw dump).
    pub cache_memory: u64,
    /// Page cache of the checkpoint file.
    pub cache_ckpt: u64,
    /// Page cache of the disk image.
    pub cache_disk: u64,
    /// Host memory used together, bytes (see the module doc).
    pub total: u64,
    /// Every clone had written its share before the sample.
    pub settled: bool,
    /// Clones whose final CHECK equals the reference.
    pub checks_ok: usize,
}

/// The disk-sharing check.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskShare {
    /// Repetition.
    pub rep: usize,
    /// Disk image page cache after the first VM's restore.
    pub after_one: u64,
    /// ... after both.
    pub after_both: u64,
    /// Bytes each daemon rebuilt from the disk (stats `bytes_by_source.disk`).
    pub disk_bytes_read: [u64; 2],
    /// Both CHECKs right.
    pub checks_ok: bool,
}

/// Everything measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Results {
    /// Samples.
    pub samples: Vec<Sample>,
    /// Disk-sharing checks.
    pub disk: Vec<DiskShare>,
}

/// Host memory used together (see the module doc).
pub fn host_total(vmms: &ProcMem, daemon: Option<&ProcMem>, caches: &[u64]) -> u64 {
    let procs = vmms.anon + vmms.page_tables + daemon.map_or(0, |d| d.anon + d.page_tables);
    procs + caches.iter().sum::<u64>()
}

/// Per-clone increment: (total(N) - total(1)) / (N - 1).
pub fn increment(total_1: f64, total_n: f64, n: usize) -> Option<f64> {
    (n > 1).then(|| (total_n - total_1) / (n - 1) as f64)
}

/// Rewrites clones.md and clones.png in `out` from the rows of an earlier run's
/// clones.jsonl (`plan` says which methods and counts, in what order).
pub fn render(plan: &Plan, jsonl: &Path, out: &Path) -> Result<()> {
    let mut results = Results::default();
    let text = std::fs::read_to_string(jsonl)?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v.get("method").is_some() {
            results.samples.push(serde_json::from_value(v)?);
        } else {
            results.disk.push(serde_json::from_value(v)?);
        }
    }
    let md = report(plan, &results);
    std::fs::write(out.join("clones.md"), &md)?;
    plot(&out.join("clones.png"), plan, &results)?;
    println!("{md}");
    Ok(())
}

/// Run the plan in `dir`; writes clones.md, clones.png and clones.jsonl into `out`.
pub fn run(plan: &Plan, dir: &Path, out: &Path) -> Result<()> {
    let bins = Bins::find()?;
    std::fs::create_dir_all(out)?;
    let vms = fleet::boot(&bins, dir, &plan.workload, plan.mib, 2)?;
    let vm = &vms[0];
    let reference = reference_check(&bins, vm, plan)?;
    eprintln!(
        "bench clones: reference CHECK after {} % written: {reference}",
        plan.dirty_pct
    );
    let mut results = Results::default();
    for rep in 0..plan.reps {
        for method in &plan.methods {
            for &n in &plan.counts {
                eprintln!("bench clones: rep {rep}: {n} x {method}");
                let s = sample(&bins, vm, plan, method, n, rep, &reference)?;
                eprintln!(
                    "bench clones:   total {:.1} MiB, written/clone {:.1} MiB, checks {}/{n}",
                    mib(s.total as f64),
                    mib(median_u64(&s.written)),
                    s.checks_ok
                );
                results.samples.push(s);
            }
        }
        results.disk.push(disk_share(&bins, &vms, dir, rep)?);
    }
    let jsonl: Vec<String> = results
        .samples
        .iter()
        .map(serde_json::to_string)
        .chain(results.disk.iter().map(serde_json::to_string))
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("clones.jsonl"), jsonl.join("\n") + "\n")?;
    let md = report(plan, &results);
    std::fs::write(out.join("clones.md"), &md)?;
    plot(&out.join("clones.png"), plan, &results)?;
    println!("{md}");
    ensure!(
        results.samples.iter().all(|s| s.checks_ok == s.n)
            && results.disk.iter().all(|d| d.checks_ok),
        "a clone's CHECK differs from the reference"
    );
    Ok(())
}

fn mib(b: f64) -> f64 {
    b / 1048576.0
}

fn median_u64(v: &[u64]) -> f64 {
    median(v.iter().map(|&x| x as f64).collect()).unwrap_or(f64::NAN)
}

/// The CHECK every clone must end with: one lazy restore of the raw dump that writes the
/// same share.
fn reference_check(bins: &Bins, vm: &FleetVm, plan: &Plan) -> Result<String> {
    let r = Restore {
        memory: Memory::Map(vm.raw.clone()),
        state: vm.state.clone(),
        disk: vm.disk.clone(),
        duration_s: 0.3,
        seed: 0,
        dirty_pct: plan.dirty_pct,
        zero_ranges: None,
        timeline: vm.raw.with_extension("ref.jsonl"),
    };
    let report = fleet::finish(r.spawn(bins)?)?;
    Ok(report["check"].as_str().context("no check")?.to_owned())
}

fn restores(vm: &FleetVm, plan: &Plan, memory: &Memory, n: usize) -> Vec<Restore> {
    (0..n)
        .map(|i| Restore {
            memory: memory.clone(),
            state: vm.state.clone(),
            disk: vm.disk.clone(),
            duration_s: plan.duration,
            seed: i as u64 + 1,
            dirty_pct: plan.dirty_pct,
            zero_ranges: None,
            timeline: vm.raw.with_file_name(format!("clone{i}.jsonl")),
        })
        .collect()
}

/// Restores `n` clones by `method` and samples their memory.
fn sample(
    bins: &Bins,
    vm: &FleetVm,
    plan: &Plan,
    method: &str,
    n: usize,
    rep: usize,
    reference: &str,
) -> Result<Sample> {
    evict(&vm.files())?;
    let mount = match method {
        "ckptfs" => Some(Mount::new(
            bins,
            &vm.ckpt,
            &vm.raw.with_file_name("mnt"),
            &[
                "--no-loading-set".into(),
                "--prefetch".into(),
                "none".into(),
            ],
        )?),
        _ => None,
    };
    let memory = match (method, &mount) {
        ("eager-raw", _) => Memory::Eager(vm.raw.clone()),
        ("lazy-raw", _) => Memory::Map(vm.raw.clone()),
        ("ckptfs", Some(m)) => Memory::Map(m.memory()),
        _ => anyhow::bail!("unknown clones method {method:?} (ckptfs, lazy-raw, eager-raw)"),
    };
    let plans = restores(vm, plan, &memory, n);
    let children: Vec<Child> = plans.iter().map(|r| r.spawn(bins)).collect::<Result<_>>()?;
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let (map_file, eager) = match &memory {
        Memory::Map(p) => (std::fs::canonicalize(p)?, false),
        Memory::Eager(p) => (p.clone(), true),
    };
    let settled = wait_written(&pids, &map_file, eager, vm.mib << 20, plan);
    std::thread::sleep(Duration::from_millis(500));
    let taken = take(&pids, mount.as_ref(), &map_file, vm);
    let mut checks_ok = 0;
    for c in children {
        let report = fleet::finish(c)?;
        checks_ok += usize::from(report["check"].as_str() == Some(reference));
    }
    drop(mount);
    Ok(Sample {
        method: method.to_owned(),
        n,
        rep,
        settled,
        checks_ok,
        ..taken?
    })
}

/// Samples the processes and the page cache while the clones run.
fn take(pids: &[u32], mount: Option<&Mount>, map_file: &Path, vm: &FleetVm) -> Result<Sample> {
    let size = vm.mib << 20;
    let vmms: Vec<ProcMem> = pids
        .iter()
        .map(|&p| ProcMem::of(p))
        .collect::<Result<_>>()?;
    let written = pids
        .iter()
        .map(|&p| procmem::guest_ram_of(p, map_file, size).map(|(_, anon)| anon))
        .collect::<Result<Vec<_>>>()?;
    let daemon = mount.map(|m| ProcMem::of(m.pid)).transpose()?;
    // An eager clone copied the raw dump: its page cache is the memory file's.
    let cache_memory = procmem::cached_bytes(map_file)?;
    let cache_ckpt = procmem::cached_bytes(&vm.ckpt)?;
    let cache_disk = procmem::cached_bytes(&vm.disk)?;
    let vmms = ProcMem::sum(&vmms);
    let total = host_total(
        &vmms,
        daemon.as_ref(),
        &[cache_memory, cache_ckpt, cache_disk],
    );
    Ok(Sample {
        method: String::new(),
        n: pids.len(),
        rep: 0,
        vmms,
        daemon,
        written,
        cache_memory,
        cache_ckpt,
        cache_disk,
        total,
        settled: false,
        checks_ok: 0,
    })
}

/// Waits until every clone's guest RAM holds its written share (eager: all of RAM
/// resident), at most 80 % of the run; false on timeout.
fn wait_written(pids: &[u32], file: &Path, eager: bool, size: u64, plan: &Plan) -> bool {
    let want = (plan.dirty_pct / 100.0 * size as f64 * 0.98) as u64;
    let t0 = Instant::now();
    // The run's clock starts at each VM's first request, after the eager copy.
    let limit = Duration::from_secs_f64(plan.duration * 0.8 + if eager { 30.0 } else { 2.0 });
    while t0.elapsed() < limit {
        let done = pids.iter().all(|&p| {
            procmem::guest_ram_of(p, file, size)
                .is_ok_and(|(rss, anon)| if eager { rss >= size } else { anon >= want })
        });
        if done {
            if eager {
                // The copy is in; give the DIRTY requests a moment.
                std::thread::sleep(Duration::from_millis(500));
            }
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("bench clones: not every clone had written its share in time; sampling anyway");
    false
}

/// The disk check: VMs 0 and 1 (one disk image) mounted at once, restored one by one.
fn disk_share(bins: &Bins, vms: &[FleetVm], dir: &Path, rep: usize) -> Result<DiskShare> {
    eprintln!("bench clones: rep {rep}: two checkpoints of one disk image, two mounts");
    for vm in vms {
        evict(&vm.files())?;
    }
    let args: Vec<String> = ["--no-loading-set", "--prefetch", "none"]
        .map(String::from)
        .to_vec();
    let mounts: Vec<Mount> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| Mount::new(bins, &vm.ckpt, &dir.join(format!("share-mnt{i}")), &args))
        .collect::<Result<_>>()?;
    let mut caches = Vec::new();
    let mut checks_ok = true;
    for (vm, m) in vms.iter().zip(&mounts) {
        let r = Restore {
            memory: Memory::Map(m.memory()),
            state: m.point.join("vmm-state"),
            disk: vm.disk.clone(),
            duration_s: 0.5,
            seed: 1,
            dirty_pct: 0.0,
            zero_ranges: None,
            timeline: dir.join(format!("share{}.jsonl", vm.index)),
        };
        // The final CHECK hashes all of RAM: every page is rebuilt, disk pages included.
        let report = fleet::finish(r.spawn(bins)?)?;
        checks_ok &= report["check"].as_str() == Some(vm.check.as_str());
        caches.push(procmem::cached_bytes(&vm.disk)?);
    }
    let disk_read = |m: &Mount| -> u64 {
        m.stats()
            .ok()
            .and_then(|s| s["bytes_by_source"]["disk"].as_u64())
            .unwrap_or(0)
    };
    Ok(DiskShare {
        rep,
        after_one: caches[0],
        after_both: caches[1],
        disk_bytes_read: [disk_read(&mounts[0]), disk_read(&mounts[1])],
        checks_ok,
    })
}

/// Median host total against N, one line per method.
fn plot(out: &Path, plan: &Plan, r: &Results) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = plan
        .methods
        .iter()
        .map(|m| {
            let points = plan
                .counts
                .iter()
                .filter_map(|&n| {
                    let v = r
                        .samples
                        .iter()
                        .filter(|x| &x.method == m && x.n == n)
                        .map(|x| mib(x.total as f64))
                        .collect();
                    Some((n as f64, median(v)?))
                })
                .collect();
            (m.clone(), points)
        })
        .collect();
    let title = format!(
        "{} MiB {} clones, each writing {} %: host memory used together",
        plan.mib, plan.workload, plan.dirty_pct
    );
    crate::plot::lines(out, &title, ("clones (N)", "MiB"), &series)
}

fn report(plan: &Plan, r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} guest, {} MiB; each clone writes {} % of RAM ({:.1} MiB) then serves READs; {} repetitions; medians [min-max], MiB.\n",
        plan.workload,
        plan.mib,
        plan.dirty_pct,
        plan.dirty_pct / 100.0 * plan.mib as f64,
        plan.reps
    );
    let _ = writeln!(
        s,
        "| method | N | host total | per-clone increment | written / clone | increment / written | own / clone (anon + page tables) | own / written | page cache of memory file | ckpt + disk cache | VMMs anon | VMMs PSS | VMMs USS | daemon PSS | CHECKs |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for method in &plan.methods {
        for &n in &plan.counts {
            let rows: Vec<&Sample> = r
                .samples
                .iter()
                .filter(|x| &x.method == method && x.n == n)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let col =
                |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { rows.iter().map(|x| f(x)).collect() };
            // Increment against N = 1 of the same repetition.
            let inc: Vec<f64> = rows
                .iter()
                .filter_map(|x| {
                    let one = r
                        .samples
                        .iter()
                        .find(|y| y.method == x.method && y.n == 1 && y.rep == x.rep)?;
                    increment(one.total as f64, x.total as f64, n).map(mib)
                })
                .collect();
            let written: Vec<f64> = col(&|x| mib(median_u64(&x.written)));
            let ratio: Vec<f64> = inc.iter().zip(&written).map(|(i, w)| i / w).collect();
            let own: Vec<f64> = col(&|x| mib((x.vmms.anon + x.vmms.page_tables) as f64 / n as f64));
            let own_ratio: Vec<f64> = own.iter().zip(&written).map(|(o, w)| o / w).collect();
            let checks: usize = rows.iter().map(|x| x.checks_ok).sum();
            let _ = writeln!(
                s,
                "| {method} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {checks}/{}{} |",
                stat(&col(&|x| mib(x.total as f64)), 1),
                stat(&inc, 1),
                stat(&written, 1),
                stat(&ratio, 2),
                stat(&own, 1),
                stat(&own_ratio, 2),
                stat(&col(&|x| mib(x.cache_memory as f64)), 1),
                stat(&col(&|x| mib((x.cache_ckpt + x.cache_disk) as f64)), 1),
                stat(&col(&|x| mib(x.vmms.anon as f64)), 1),
                stat(&col(&|x| mib(x.vmms.pss as f64)), 1),
                stat(&col(&|x| mib(x.vmms.uss as f64)), 1),
                stat(
                    &col(&|x| x.daemon.map_or(f64::NAN, |d| mib(d.pss as f64))),
                    1
                ),
                rows.len() * n,
                if rows.iter().all(|x| x.settled) {
                    ""
                } else {
                    " (not all settled)"
                },
            );
        }
    }
    let _ = writeln!(
        s,
        "\nTwo checkpoints of one disk image (guest seeds 1 and 2), mounted at once, restored one after the other (each CHECK reads all of RAM):\n"
    );
    let _ = writeln!(
        s,
        "| rep | disk cache after one, MiB | after both, MiB | both / one | disk bytes rebuilt by each daemon, MiB | CHECKs |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---|");
    for d in &r.disk {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} / {:.1} | {} |",
            d.rep,
            mib(d.after_one as f64),
            mib(d.after_both as f64),
            d.after_both as f64 / d.after_one.max(1) as f64,
            mib(d.disk_bytes_read[0] as f64),
            mib(d.disk_bytes_read[1] as f64),
            if d.checks_ok { "ok" } else { "DIFFER" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_total_adds_anon_page_tables_and_caches_not_pss() {
        let vmms = ProcMem {
            pss: 1000,
            uss: 900,
            anon: 100,
            page_tables: 10,
        };
        let daemon = ProcMem {
            pss: 50,
            uss: 40,
            anon: 20,
            page_tables: 1,
        };
        assert_eq!(host_total(&vmms, Some(&daemon), &[500, 7]), 638);
        assert_eq!(host_total(&vmms, None, &[]), 110);
    }

    #[test]
    fn increment_is_per_added_clone() {
        assert_eq!(increment(100.0, 100.0, 1), None);
        assert_eq!(increment(100.0, 160.0, 4), Some(20.0));
    }
}
