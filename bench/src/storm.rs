//! `bench storm`: a morning login storm. `vms` guests, each booted with its own seed on
//! one shared disk image (a golden image) and checkpointed, each with its own loading set
//! (recorded alone through a recording mount, request seed [`RECORD_SEED`]), are restored
//! at the same moment from storage capped at `mbps` MB/s: every process (VMMs, daemons,
//! eager reads) in one blkio cgroup (see [`crate::tier`]). Page caches are cold for every
//! method (each input file evicted, never a global drop_caches) except `warm`, which runs
//! the same storm from raw dumps held in the page cache and gives each VM's warm rate.
//!
//! Each VM's TTR is [`crate::ttr`]'s, from the storm's start (mounts included), against
//! the warm rate of the same VM in the warm storm of the same repetition; the storm's TTR
//! is its last VM's. Measured restores use request seeds 1, 2, ... (VM i of repetition r:
//! seed 1 + r * vms + i), never the recording's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use crate::fleet::{self, Bins, FleetVm, Memory, Mount, Restore, stat};
use crate::restore::{CkptfsOpts, Method, RECORD_SEED, evict, median};
use crate::tier::Throttle;
use crate::ttr;

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// VMs in the storm.
    pub vms: usize,
    /// Guest MiB each.
    pub mib: u64,
    /// Workload.
    pub workload: String,
    /// Storage read limit, MB/s.
    pub mbps: u64,
    /// Methods.
    pub methods: Vec<Method>,
    /// Repetitions.
    pub reps: usize,
    /// Seconds each VM serves requests, from its first request.
    pub duration: f64,
    /// TTR window, ms (see [`run`]).
    pub window_ms: u64,
}

/// One VM of one storm.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmRun {
    /// VM index.
    pub vm: usize,
    /// Request seed.
    pub seed: u64,
    /// Completion times, ns since the storm started.
    #[serde(skip, default)]
    pub times: Vec<u64>,
    /// Its VMM started (mount done), ms since the storm started.
    pub launched_ms: f64,
    /// First response, ms since the storm started.
    pub first_ms: f64,
    /// TTR, ms since the storm started (None: never within the run).
    pub ttr_ms: Option<f64>,
    /// Work lag at the storm's horizon, ms: how far behind a VM running at its warm rate
    /// since the storm started it is (see [`work_lag_ms`]).
    #[serde(default)]
    pub lag_ms: Option<f64>,
    /// CHECK equals the checkpoint's.
    pub check_ok: bool,
    /// Requests completed in each 100 ms since the storm started (for rescoring).
    pub per_100ms: Vec<u64>,
}

/// One storm.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StormRun {
    /// Method label.
    pub method: String,
    /// Repetition.
    pub rep: usize,
    /// Its VMs.
    pub vms: Vec<VmRun>,
    /// Bytes the storm's processes read from storage.
    pub storage_bytes: u64,
    /// TTR of the last VM, ms (None if one never became responsive).
    pub last_ttr_ms: Option<f64>,
    /// The largest work lag of its VMs, ms.
    #[serde(default)]
    pub max_lag_ms: Option<f64>,
}

/// The storm's TTR: its last VM's, None if any VM never became responsive.
pub fn last_ttr(vms: &[VmRun]) -> Option<f64> {
    vms.iter()
        .map(|v| v.ttr_ms)
        .try_fold(0.0f64, |acc, t| t.map(|t| acc.max(t)))
}

/// Run the plan in `dir`; writes storm.md, storm.jsonl and storm.png into `out`.
pub fn run(plan: &Plan, dir: &Path, out: &Path) -> Result<()> {
    let bins = Bins::find()?;
    std::fs::create_dir_all(out)?;
    ensure!(
        plan.methods.contains(&Method::Warm),
        "storm needs the warm method (it gives each VM's warm rate)"
    );
    let fleet = fleet::boot(&bins, dir, &plan.workload, plan.mib, plan.vms)?;
    if plan
        .methods
        .iter()
        .any(|m| matches!(m, Method::Ckptfs(o) if o.loading_set))
    {
        for vm in &fleet {
            record(&bins, vm, dir, plan.duration)?;
        }
    }
    let sets: Vec<u64> = fleet.iter().map(loadset_bytes).collect();
    let started = Instant::now();
    let mut runs = Vec::new();
    for rep in 0..plan.reps {
        let mut mine = Vec::new();
        for &method in &plan.methods {
            eprintln!(
                "bench storm: rep {rep}: {} x {} MiB, {}, {} MB/s ({:.0} s so far)",
                plan.vms,
                plan.mib,
                method.label(),
                plan.mbps,
                started.elapsed().as_secs_f64()
            );
            let r = storm(&bins, &fleet, dir, plan, method, rep)?;
            mine.push(r);
        }
        score(&mut mine, plan.window_ms);
        print_scores(rep, &mine);
        runs.extend(mine);
    }
    let jsonl: Vec<String> = runs
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("storm.jsonl"), jsonl.join("\n") + "\n")?;
    let md = report(plan, &runs, &sets);
    std::fs::write(out.join("storm.md"), &md)?;
    plot(&out.join("storm.png"), plan, &runs)?;
    println!("{md}");
    for vm in &fleet {
        for f in vm.files() {
            if f != vm.disk {
                std::fs::remove_file(f).ok();
            }
        }
    }
    ensure!(
        runs.iter().all(|r| r.vms.iter().all(|v| v.check_ok)),
        "a restored VM's CHECK differs from its checkpoint's"
    );
    Ok(())
}

fn loadset_bytes(vm: &FleetVm) -> u64 {
    let Ok(ck) = ckptfs::Checkpoint::open(&vm.ckpt) else {
        return 0;
    };
    let ls = vm.files()[1].clone();
    ckptfs::loadset::LoadingSet::open(&ls, &ck).map_or(0, |s| s.data_bytes())
}

/// Records VM `vm`'s loading set alone: a recording mount, one restore with the recording
/// seed over `window` seconds (and half a second more, so its final CHECK stays out).
fn record(bins: &Bins, vm: &FleetVm, dir: &Path, window: f64) -> Result<()> {
    eprintln!("bench storm: VM {}: recording its loading set", vm.index);
    let m = Mount::new(
        bins,
        &vm.ckpt,
        &dir.join(format!("mnt{}", vm.index)),
        &[
            "--record-loading-set".into(),
            "--loading-set-window".into(),
            window.to_string(),
        ],
    )?;
    let r = Restore {
        memory: Memory::Map(m.memory()),
        state: m.point.join("vmm-state"),
        disk: vm.disk.clone(),
        duration_s: window + 0.5,
        seed: RECORD_SEED,
        dirty_pct: 0.0,
        zero_ranges: None,
        timeline: dir.join(format!("record{}.jsonl", vm.index)),
    };
    fleet::finish(r.spawn(bins)?)?;
    drop(m);
    let ck = ckptfs::Checkpoint::open(&vm.ckpt)?;
    ckptfs::loadset::LoadingSet::open(&vm.files()[1], &ck)
        .context("the recording mount wrote no usable loading set")?;
    Ok(())
}

/// The daemon's arguments for a ckptfs method (as `bench restore` mounts).
pub fn mount_args(o: &CkptfsOpts) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    match (o.loading_set, o.no_wait) {
        (false, _) => a.push("--no-loading-set".into()),
        (true, false) => a.push("--wait-loading-set".into()),
        (true, true) => {}
    }
    if let Some(kb) = o.readahead_kb {
        a.extend(["--readahead-kb".into(), kb.to_string()]);
    }
    if let Some(p) = o.prefetch {
        a.extend(["--prefetch".into(), p.to_string()]);
    }
    if let Some(b) = o.background_share {
        a.extend(["--background-share".into(), b.to_string()]);
    }
    a
}

/// One storm: every VM restored at once by `method`.
fn storm(
    bins: &Bins,
    fleet: &[FleetVm],
    dir: &Path,
    plan: &Plan,
    method: Method,
    rep: usize,
) -> Result<StormRun> {
    let files: Vec<PathBuf> = fleet.iter().flat_map(FleetVm::files).collect();
    if method == Method::Warm {
        for vm in fleet {
            std::fs::read(&vm.raw).map(drop)?;
        }
    } else {
        evict(&files)?;
    }
    let throttle = Throttle::start(dir, Some(plan.mbps))?;
    let before = throttle.read_bytes();
    let start = Instant::now();
    let vms: Vec<Result<VmRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = fleet
            .iter()
            .map(|vm| {
                let seed = 1 + (rep * plan.vms + vm.index) as u64;
                s.spawn(move || one_vm(bins, vm, dir, plan, method, seed, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a VM thread panicked")))
            })
            .collect()
    });
    let storage_bytes = throttle.read_bytes() - before;
    drop(throttle);
    Ok(StormRun {
        method: method.label(),
        rep,
        vms: vms.into_iter().collect::<Result<_>>()?,
        storage_bytes,
        last_ttr_ms: None,
        max_lag_ms: None,
    })
}

/// One VM of a storm: mount (ckptfs), restore, its timeline.
fn one_vm(
    bins: &Bins,
    vm: &FleetVm,
    dir: &Path,
    plan: &Plan,
    method: Method,
    seed: u64,
    start: Instant,
) -> Result<VmRun> {
    let mut mount = None;
    let (memory, state, zero) = match method {
        Method::EagerRaw => (Memory::Eager(vm.raw.clone()), vm.state.clone(), None),
        Method::LazyRaw | Method::Warm => (Memory::Map(vm.raw.clone()), vm.state.clone(), None),
        Method::Ckptfs(o) => {
            let point = dir.join(format!("mnt{}", vm.index));
            let m = Mount::new(bins, &vm.ckpt, &point, &mount_args(&o))?;
            let zero = o.zero_ranges.then(|| point.join("zero-ranges"));
            let r = (Memory::Map(m.memory()), point.join("vmm-state"), zero);
            mount = Some(m);
            r
        }
        Method::EagerOptimized => anyhow::bail!("storm does not run eager-optimized"),
    };
    let r = Restore {
        memory,
        state,
        disk: vm.disk.clone(),
        duration_s: plan.duration,
        seed,
        dirty_pct: 0.0,
        zero_ranges: zero,
        timeline: dir.join(format!("storm{}.jsonl", vm.index)),
    };
    let launched = start.elapsed().as_nanos() as u64;
    let report = fleet::finish(r.spawn(bins)?)?;
    drop(mount);
    let times = fleet::timeline(&r.timeline, launched)?;
    let per_100ms = ttr::per_window(&times, 100_000_000);
    Ok(VmRun {
        vm: vm.index,
        seed,
        first_ms: times[0] as f64 / 1e6,
        times,
        launched_ms: launched as f64 / 1e6,
        ttr_ms: None,
        lag_ms: None,
        check_ok: report["check"].as_str() == Some(vm.check.as_str()),
        per_100ms,
    })
}

/// The storm's common horizon, ns: the earliest last completion of its VMs. After it, a
/// VM that is done runs its final CHECK (which reads all of its RAM, from storage unless
/// it is resident) while the others still serve requests; windows past it would judge
/// that, not the restore.
pub fn horizon(vms: &[VmRun]) -> u64 {
    vms.iter()
        .filter_map(|v| v.times.last().copied())
        .min()
        .unwrap_or(0)
}

/// Work lag, ms: `horizon` (ns since the storm started) minus the time a VM running at
/// `rate` requests per window `w` from the start would need for the requests `times`
/// completed by then. Less sensitive than TTR to one slow window late in the run.
pub fn work_lag_ms(times: &[u64], horizon: u64, rate: f64, w: u64) -> Option<f64> {
    if rate <= 0.0 {
        return None;
    }
    let done = times.iter().filter(|&&t| t <= horizon).count() as f64;
    Some((horizon as f64 - done / rate * w as f64) / 1e6)
}

/// Completion times rebuilt from counts per 100 ms (spread evenly in each bin).
pub fn times_from_bins(bins: &[u64]) -> Vec<u64> {
    let bin = 100_000_000u64;
    let mut out = Vec::new();
    for (k, &c) in bins.iter().enumerate() {
        out.extend((0..c).map(|j| k as u64 * bin + (2 * j + 1) * bin / (2 * c)));
    }
    out
}

/// Fills in TTRs against each VM's warm rate in the warm storm of the same repetition,
/// with windows of `window_ms`, each storm judged up to its [`horizon`].
fn score(runs: &mut [StormRun], window_ms: u64) {
    let w = window_ms * 1_000_000;
    let upto =
        |v: &VmRun, h: u64| -> Vec<u64> { v.times.iter().copied().filter(|&t| t <= h).collect() };
    let Some(warm) = runs.iter().find(|r| r.method == "warm") else {
        return;
    };
    let warm_h = horizon(&warm.vms);
    let rates: Vec<f64> = warm
        .vms
        .iter()
        .map(|v| ttr::warm_rate(&upto(v, warm_h), w))
        .collect();
    for r in runs.iter_mut() {
        let h = horizon(&r.vms);
        for v in &mut r.vms {
            v.ttr_ms =
                ttr::ttr(&upto(v, h), rates[v.vm], w, ttr::UTILIZATION).map(|t| t as f64 / 1e6);
            v.lag_ms = work_lag_ms(&v.times, h, rates[v.vm], w);
        }
        r.last_ttr_ms = last_ttr(&r.vms);
        r.max_lag_ms = r.vms.iter().filter_map(|v| v.lag_ms).reduce(f64::max);
    }
}

/// One line per scored storm of repetition `rep` on the terminal.
fn print_scores(rep: usize, storms: &[StormRun]) {
    for r in storms {
        eprintln!(
            "bench storm: rep {rep} {}: last VM TTR {}, largest work lag {:.0} ms",
            r.method,
            r.last_ttr_ms
                .map_or("never".into(), |t| format!("{t:.0} ms")),
            r.max_lag_ms.unwrap_or(f64::NAN)
        );
    }
}

/// Rescores the rows of an earlier run's storm.jsonl (times rebuilt from their counts per
/// 100 ms) and rewrites storm.md and storm.png in `out`.
pub fn render(plan: &Plan, jsonl: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(jsonl)?;
    let mut runs: Vec<StormRun> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    for r in &mut runs {
        for v in &mut r.vms {
            v.times = times_from_bins(&v.per_100ms);
        }
    }
    let reps = runs.iter().map(|r| r.rep).max().map_or(0, |r| r + 1);
    let mut scored = Vec::new();
    for rep in 0..reps {
        let mut mine: Vec<StormRun> = runs.iter().filter(|r| r.rep == rep).cloned().collect();
        score(&mut mine, plan.window_ms);
        print_scores(rep, &mine);
        scored.extend(mine);
    }
    let md = report(plan, &scored, &[]);
    std::fs::write(out.join("storm.md"), &md)?;
    plot(&out.join("storm.png"), plan, &scored)?;
    println!("{md}");
    Ok(())
}

fn report(plan: &Plan, runs: &[StormRun], sets: &[u64]) -> String {
    let mut s = String::new();
    let set_mib: f64 = sets.iter().sum::<u64>() as f64 / 1048576.0;
    let _ = writeln!(
        s,
        "{} {} VMs of {} MiB (one disk image, guest seeds 1..{}), restored at once from storage capped at {} MB/s (one blkio cgroup); {} repetitions, {} s of READs per VM; TTR with {} ms windows at {} % of the VM's warm rate, judged up to the storm's first VM to finish; medians [min-max].\n\
         Loading sets: {:.1} MiB together (limit at {} MB/s: {:.0} ms; 0 = not known to a rescoring).\n",
        plan.vms,
        plan.workload,
        plan.mib,
        plan.vms,
        plan.mbps,
        plan.reps,
        plan.duration,
        plan.window_ms,
        ttr::UTILIZATION * 100.0,
        set_mib,
        plan.mbps,
        set_mib * 1.048576 / plan.mbps as f64 * 1e3,
    );
    let _ = writeln!(
        s,
        "| method | last VM TTR ms | never (storms) | largest work lag ms | per-VM TTR ms | last VM first response ms | last VM launched ms | read from storage MiB | / eager-raw (last VM TTR) | CHECKs |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let eager = median(
        runs.iter()
            .filter(|r| r.method == "eager-raw")
            .map(|r| r.last_ttr_ms.unwrap_or(f64::NAN))
            .collect(),
    );
    for m in &plan.methods {
        let label = m.label();
        let rows: Vec<&StormRun> = runs.iter().filter(|r| r.method == label).collect();
        let last: Vec<f64> = rows.iter().filter_map(|r| r.last_ttr_ms).collect();
        let never = rows.len() - last.len();
        let per_vm: Vec<f64> = rows
            .iter()
            .flat_map(|r| r.vms.iter().filter_map(|v| v.ttr_ms))
            .collect();
        let first: Vec<f64> = rows
            .iter()
            .map(|r| r.vms.iter().map(|v| v.first_ms).fold(0.0, f64::max))
            .collect();
        let launched: Vec<f64> = rows
            .iter()
            .map(|r| r.vms.iter().map(|v| v.launched_ms).fold(0.0, f64::max))
            .collect();
        let read: Vec<f64> = rows
            .iter()
            .map(|r| r.storage_bytes as f64 / 1048576.0)
            .collect();
        let ratio = match (never, median(last.clone()), eager) {
            (0, Some(a), Some(b)) => format!("{:.2}", a.max(100.0) / b.max(100.0)),
            _ => "-".into(),
        };
        let ok: usize = rows
            .iter()
            .map(|r| r.vms.iter().filter(|v| v.check_ok).count())
            .sum();
        let _ = writeln!(
            s,
            "| {label} | {} | {never} of {} | {} | {} | {} | {} | {} | {ratio} | {ok}/{} |",
            if never > rows.len() / 2 {
                "never".into()
            } else {
                stat(&last, 0)
            },
            rows.len(),
            stat(
                &rows.iter().filter_map(|r| r.max_lag_ms).collect::<Vec<_>>(),
                0
            ),
            stat(&per_vm, 0),
            stat(&first, 0),
            stat(&launched, 0),
            stat(&read, 0),
            rows.len() * plan.vms,
        );
    }
    s
}

/// Requests per 100 ms of all VMs together, repetition 0, one line per method.
fn plot(out: &Path, plan: &Plan, runs: &[StormRun]) -> Result<()> {
    let series: Vec<crate::plot::Series> = runs
        .iter()
        .filter(|r| r.rep == 0)
        .map(|r| {
            let mut all: Vec<u64> = r.vms.iter().flat_map(|v| v.times.iter().copied()).collect();
            all.sort_unstable();
            crate::plot::Series {
                label: r.method.clone(),
                per_window: ttr::per_window(&all, ttr::WINDOW_NS),
            }
        })
        .collect();
    let title = format!(
        "storm: {} x {} MiB {}, {} MB/s: requests of all VMs per 100 ms",
        plan.vms, plan.mib, plan.workload, plan.mbps
    );
    crate::plot::throughput(out, &title, ttr::WINDOW_NS / 1_000_000, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(i: usize, ttr: Option<f64>) -> VmRun {
        VmRun {
            vm: i,
            seed: 1,
            times: Vec::new(),
            launched_ms: 0.0,
            first_ms: 0.0,
            ttr_ms: ttr,
            lag_ms: None,
            check_ok: true,
            per_100ms: Vec::new(),
        }
    }

    #[test]
    fn the_storm_is_responsive_when_its_last_vm_is() {
        assert_eq!(
            last_ttr(&[vm(0, Some(300.0)), vm(1, Some(900.0))]),
            Some(900.0)
        );
        assert_eq!(last_ttr(&[vm(0, Some(300.0)), vm(1, None)]), None);
        assert_eq!(last_ttr(&[]), Some(0.0));
    }

    #[test]
    fn storms_are_judged_up_to_their_first_vm_to_finish() {
        let mut a = vm(0, None);
        a.times = vec![5, 10, 900];
        let mut b = vm(1, None);
        b.times = vec![7, 400];
        assert_eq!(horizon(&[a, b]), 400);
        assert_eq!(horizon(&[]), 0);
    }

    #[test]
    fn work_lag_is_the_time_lost_against_the_warm_rate() {
        // Warm: 10 per 100 ms. Nothing for 1 s, then warm: 2 s in, 10 requests behind x 10.
        let t: Vec<u64> = (0..100).map(|i| 1_000_000_000 + i * 10_000_000).collect();
        let lag = work_lag_ms(&t, 2_000_000_000, 10.0, 100_000_000).unwrap();
        assert!((lag - 1000.0).abs() < 11.0, "{lag}");
        assert_eq!(work_lag_ms(&t, 2_000_000_000, 0.0, 100_000_000), None);
    }

    #[test]
    fn times_rebuilt_from_bins_land_in_their_bins() {
        let t = times_from_bins(&[2, 0, 1]);
        assert_eq!(t, vec![25_000_000, 75_000_000, 250_000_000]);
        assert_eq!(ttr::per_window(&t, 100_000_000), vec![2, 0, 1]);
    }

    #[test]
    fn mount_args_follow_the_method() {
        let Method::Ckptfs(o) = Method::parse("ckptfs-ls-zero").unwrap() else {
            panic!()
        };
        assert_eq!(mount_args(&o), vec!["--wait-loading-set"]);
        let Method::Ckptfs(o) = Method::parse("ckptfs-ra16").unwrap() else {
            panic!()
        };
        assert_eq!(
            mount_args(&o),
            vec!["--no-loading-set", "--readahead-kb", "16"]
        );
    }
}
