//! `bench incremental`: checkpointing a restored VM again, incrementally or in full, and
//! restoring from a chain of incremental checkpoints or from its flattened twin.
//!
//! For each guest size, vmm-lite boots the guest and checkpoints it (the base). Then:
//!
//! - Saves: for each share of RAM the guest is made to write (DIRTY requests, `--dirty-pct`)
//!   and each repetition, the base is mounted (cold page cache, no loading set) and restored
//!   lazily; the VM writes that share, serves WORK requests for the rest of `--work-seconds`,
//!   and is checkpointed incrementally (`restore -o`). The same again with
//!   `--full-checkpoint --raw-out`: a full ckptfs checkpoint of the same lazily restored VM,
//!   then a raw dump of its RAM (what a VMM without ckptfs writes; every page is resident by
//!   then, so the dump only writes). Each save is flushed to disk (fsync).
//! - Chains: base -> c1 -> c2, each link an incremental checkpoint of the previous one
//!   restored through a mount after the same work; `c2` is flattened. Each repetition
//!   restores `c2` and its flattened twin from a cold page cache, lazily (a mount, timed
//!   from the mount command) and eagerly (`restore --ckpt`, every page rebuilt first), and
//!   serves READ requests for `--ttr-seconds`; TTR comes from the timelines (see
//!   [`crate::ttr`]) against the warm rate of an eager restore in the same repetition.
//!
//! Run it under `flock /tmp/ckptfs-bench.lock`: it drops the page cache between runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::restore::{evict, files_under, median};
use crate::ttr;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Guest sizes, MiB.
    pub sizes: Vec<u64>,
    /// Guest workload.
    pub workload: String,
    /// Shares of RAM the guest writes before a save, percent.
    pub dirty_pcts: Vec<f64>,
    /// Repetitions per cell.
    pub reps: usize,
    /// Seconds of work (writes included) between restore and save.
    pub work_seconds: f64,
    /// Seconds a measured restore serves requests.
    pub ttr_seconds: f64,
    /// Share of RAM each link of the chain writes, percent.
    pub chain_pct: f64,
}

use crate::fleet::{Bins, Mount, run_json};

/// A mount of `ckpt` without a loading set (one daemon per restore).
fn mount(bins: &Bins, ckpt: &Path, point: &Path) -> Result<Mount> {
    Mount::new(bins, ckpt, point, &["--no-loading-set".to_owned()])
}

/// `--mem-file` and `--state` of a restore from `m`.
fn memory_args(m: &Mount, cmd: &mut Command) {
    cmd.arg("--mem-file")
        .arg(m.memory())
        .arg("--state")
        .arg(m.point.join("vmm-state"));
}

/// One save measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Save {
    /// Guest MiB.
    pub mib: u64,
    /// Share of RAM the guest was asked to write, percent.
    pub dirty_pct: f64,
    /// Repetition.
    pub rep: usize,
    /// "incremental" or "full".
    pub kind: &'static str,
    /// Pages written since the restore / guest pages.
    pub written_fraction: f64,
    /// Save time (pause to checkpoint on disk), ms.
    pub save_ms: f64,
    /// Checkpoint bytes.
    pub bytes: u64,
    /// Raw dump time after the full save, ms.
    pub raw_ms: Option<f64>,
}

/// One restore measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ttr {
    /// Guest MiB.
    pub mib: u64,
    /// Repetition.
    pub rep: usize,
    /// "chain" (the top of base -> c1 -> c2) or "flat".
    pub variant: &'static str,
    /// "mount" (lazy) or "eager".
    pub method: &'static str,
    /// Mount command to mounted, ms (lazy only).
    pub mount_ms: Option<f64>,
    /// Memory rebuilt, ms (eager only).
    pub memory_ms: Option<f64>,
    /// First response, ms from the start (mount included).
    pub first_ms: f64,
    /// TTR, ms from the start.
    pub ttr_ms: Option<f64>,
    /// The CHECK equals the checkpoint's.
    pub check_ok: bool,
}

/// The chain built for the TTR runs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ChainInfo {
    /// Guest MiB.
    pub mib: u64,
    /// Size of each file, base first, MiB.
    pub file_mib: Vec<f64>,
    /// Pages of the top each file holds, base first.
    pub holds: Vec<u64>,
    /// Size of the flattened file, MiB.
    pub flat_mib: f64,
    /// Time to flatten, ms.
    pub flatten_ms: f64,
}

/// Everything measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Results {
    /// Saves.
    pub saves: Vec<Save>,
    /// Restores.
    pub ttrs: Vec<Ttr>,
    /// Chains.
    pub chains: Vec<ChainInfo>,
}

/// A booted, checkpointed guest of `mib` MiB.
struct Vm {
    dir: PathBuf,
    mib: u64,
    disk: PathBuf,
}

impl Vm {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn prepare(bins: &Bins, root: &Path, workload: &str, mib: u64) -> Result<Vm> {
    let dir = root.join(format!("incremental-{workload}-{mib}"));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    let st = bins
        .vmm()
        .arg("mkdisk")
        .arg(&disk)
        .arg("--size")
        .arg(format!("{}M", mib.max(64)))
        .stdout(Stdio::null())
        .status()?;
    ensure!(st.success(), "mkdisk failed");
    eprintln!("bench: {workload} {mib} MiB: booting and checkpointing the base");
    run_json(
        bins.vmm()
            .args(["run", "--mem", &format!("{mib}M"), "--workload", workload])
            .args(["--checkpoint-after", "1", "--no-scan", "--disk"])
            .arg(&disk)
            .arg("-o")
            .arg(dir.join("base.ckpt")),
    )?;
    Ok(Vm { dir, mib, disk })
}

/// Restore `parent` through a cold mount, write `pct` % of RAM, work until `seconds`
/// have passed, then save into `out` (`extra`: `--full-checkpoint`, ...).
fn save_after_work(
    bins: &Bins,
    vm: &Vm,
    parent: &Path,
    out: &Path,
    pct: f64,
    seconds: f64,
    extra: &[&str],
) -> Result<serde_json::Value> {
    evict(&files_under(&vm.dir))?;
    let m = mount(bins, parent, &vm.path("mnt"))?;
    let mut cmd = bins.vmm();
    cmd.arg("restore").arg("--disk").arg(&vm.disk);
    memory_args(&m, &mut cmd);
    cmd.args(["--checkpoint-after", &seconds.to_string(), "--writes"])
        .args(["--dirty-pct", &pct.to_string(), "-o"])
        .arg(out)
        .args(extra);
    run_json(&mut cmd)
}

fn saves(bins: &Bins, vm: &Vm, plan: &Plan, results: &mut Results) -> Result<()> {
    let base = vm.path("base.ckpt");
    for &pct in &plan.dirty_pcts {
        for rep in 0..plan.reps {
            eprintln!("bench: {} MiB, {pct} % written, rep {rep}: saves", vm.mib);
            let inc = save_after_work(
                bins,
                vm,
                &base,
                &vm.path("inc.ckpt"),
                pct,
                plan.work_seconds,
                &[],
            )?;
            let raw = vm.path("raw.bin");
            let raw_s = raw.display().to_string();
            let full_args = ["--full-checkpoint", "--raw-out", raw_s.as_str()];
            let full = save_after_work(
                bins,
                vm,
                &base,
                &vm.path("full.ckpt"),
                pct,
                plan.work_seconds,
                &full_args,
            )?;
            std::fs::remove_file(&raw)?;
            for (kind, r) in [("incremental", &inc), ("full", &full)] {
                results.saves.push(save_row(vm.mib, pct, rep, kind, r)?);
            }
        }
    }
    Ok(())
}

fn save_row(
    mib: u64,
    pct: f64,
    rep: usize,
    kind: &'static str,
    r: &serde_json::Value,
) -> Result<Save> {
    let c = &r["checkpoint"];
    let num = |v: &serde_json::Value| v.as_f64().context("restore report lacks a field");
    Ok(Save {
        mib,
        dirty_pct: pct,
        rep,
        kind,
        written_fraction: num(&c["written_pages"])? / num(&c["pages"])?,
        save_ms: num(&c["save_ms"])?,
        bytes: c["summary"]["checkpoint_bytes"]
            .as_u64()
            .context("no checkpoint_bytes")?,
        raw_ms: r["raw_save_ms"].as_f64(),
    })
}

/// base -> c1 -> c2, and c2 flattened; returns the CHECK at c2.
fn chain(bins: &Bins, vm: &Vm, plan: &Plan, results: &mut Results) -> Result<String> {
    let names = ["base.ckpt", "c1.ckpt", "c2.ckpt"];
    let mut check = String::new();
    for w in names.windows(2) {
        eprintln!("bench: {} MiB: chain link {}", vm.mib, w[1]);
        let r = save_after_work(
            bins,
            vm,
            &vm.path(w[0]),
            &vm.path(w[1]),
            plan.chain_pct,
            plan.work_seconds,
            &[],
        )?;
        check = r["check"].as_str().context("no check")?.to_owned();
    }
    let top = ckptfs::Checkpoint::open(&vm.path("c2.ckpt"))?;
    let started = Instant::now();
    let flat = vm.path("flat.ckpt");
    ckptfs::flatten::flatten(&top, &flat, false)?;
    let flatten_ms = started.elapsed().as_secs_f64() * 1e3;
    let ins = ckptfs::verify::inspect(&top);
    let mib_of = |b: u64| b as f64 / (1 << 20) as f64;
    results.chains.push(ChainInfo {
        mib: vm.mib,
        file_mib: ins.chain.iter().rev().map(|l| mib_of(l.size)).collect(),
        holds: ins.chain.iter().rev().map(|l| l.holds).collect(),
        flat_mib: mib_of(std::fs::metadata(&flat)?.len()),
        flatten_ms,
    });
    Ok(check)
}

/// WORK/READ completion times of a timeline, ns, shifted by `offset`.
fn timeline(path: &Path, offset: u64) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(path)?;
    let mut times = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["kind"] == "work" {
            times.push(v["t_ns"].as_u64().context("t_ns")? + offset);
        }
    }
    if times.is_empty() {
        bail!("timeline {} has no requests", path.display());
    }
    Ok(times)
}

/// Restores `ckpt` (cold cache) lazily through a mount or eagerly; READ requests for
/// `seconds` with request seed `seed`. Returns the report, the completion times (ns from
/// the start, mount included) and the mount time.
fn restore_timed(
    bins: &Bins,
    vm: &Vm,
    ckpt: &Path,
    lazy: bool,
    seconds: f64,
    seed: u64,
) -> Result<(serde_json::Value, Vec<u64>, Option<f64>)> {
    evict(&files_under(&vm.dir))?;
    let start = Instant::now();
    let mount = if lazy {
        Some(mount(bins, ckpt, &vm.path("mnt"))?)
    } else {
        None
    };
    let mount_ms = mount.as_ref().map(|_| start.elapsed().as_secs_f64() * 1e3);
    let tl = vm.path("timeline.jsonl");
    let mut cmd = bins.vmm();
    cmd.arg("restore").arg("--disk").arg(&vm.disk);
    match &mount {
        Some(m) => memory_args(m, &mut cmd),
        None => {
            cmd.arg("--ckpt").arg(ckpt);
        }
    }
    cmd.args([
        "--duration",
        &seconds.to_string(),
        "--request-seed",
        &seed.to_string(),
    ])
    .arg("--timeline")
    .arg(&tl);
    let launched = start.elapsed().as_nanos() as u64;
    let report = run_json(&mut cmd)?;
    drop(mount);
    let mut times = timeline(&tl, launched)?;
    times.sort_unstable();
    Ok((report, times, mount_ms))
}

fn ttrs(bins: &Bins, vm: &Vm, plan: &Plan, check: &str, results: &mut Results) -> Result<()> {
    for rep in 0..plan.reps {
        let seed = rep as u64 + 1;
        let mut runs = Vec::new();
        for (variant, file) in [("chain", "c2.ckpt"), ("flat", "flat.ckpt")] {
            for (method, lazy) in [("mount", true), ("eager", false)] {
                eprintln!("bench: {} MiB rep {rep}: {variant} {method}", vm.mib);
                let (r, times, mount_ms) =
                    restore_timed(bins, vm, &vm.path(file), lazy, plan.ttr_seconds, seed)?;
                runs.push((variant, method, r, times, mount_ms));
            }
        }
        // The warm rate: eager restores run with every page resident once memory is
        // loaded (their rate counts from their first request on).
        let rate = median(
            runs.iter()
                .filter(|r| r.1 == "eager")
                .map(|r| ttr::resident_rate(&r.3, ttr::WINDOW_NS))
                .collect(),
        )
        .unwrap_or(0.0);
        for (variant, method, r, times, mount_ms) in runs {
            results.ttrs.push(Ttr {
                mib: vm.mib,
                rep,
                variant,
                method,
                mount_ms,
                memory_ms: (method == "eager")
                    .then(|| r["memory_ms"].as_f64())
                    .flatten(),
                first_ms: times[0] as f64 / 1e6,
                ttr_ms: ttr::ttr(&times, rate, ttr::WINDOW_NS, ttr::UTILIZATION)
                    .map(|t| t as f64 / 1e6),
                check_ok: r["check"].as_str() == Some(check),
            });
        }
    }
    Ok(())
}

/// Run the whole plan in `dir`; writes `incremental.jsonl` and `incremental.md` into `out`
/// and prints the tables.
pub fn run(plan: &Plan, dir: &Path, out: &Path) -> Result<()> {
    let bins = Bins::find()?;
    std::fs::create_dir_all(out)?;
    let mut results = Results::default();
    for &mib in &plan.sizes {
        let vm = prepare(&bins, dir, &plan.workload, mib)?;
        saves(&bins, &vm, plan, &mut results)?;
        let check = chain(&bins, &vm, plan, &mut results)?;
        ttrs(&bins, &vm, plan, &check, &mut results)?;
    }
    std::fs::write(
        out.join("incremental.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = report(plan, &results);
    std::fs::write(out.join("incremental.md"), &md)?;
    println!("{md}");
    ensure!(
        results.ttrs.iter().all(|t| t.check_ok),
        "a restored VM's CHECK differs from the checkpoint's"
    );
    Ok(())
}

/// "median [min-max]" of `v`.
fn stat(v: Vec<f64>) -> String {
    let v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    let Some(m) = median(v.clone()) else {
        return "-".into();
    };
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.0} [{lo:.0}-{hi:.0}]")
}

fn report(plan: &Plan, r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Workload {}, {} repetitions, {} s of work (writes first) between restore and save; medians [min-max].\n",
        plan.workload, plan.reps, plan.work_seconds
    );
    let _ = writeln!(
        s,
        "| guest | written (asked) | written (measured) | incremental save ms | full save ms | raw dump ms | inc / full | inc / raw | incremental MiB | full MiB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for &mib in &plan.sizes {
        for &pct in &plan.dirty_pcts {
            let rows = |kind: &str| -> Vec<&Save> {
                r.saves
                    .iter()
                    .filter(|x| x.mib == mib && x.dirty_pct == pct && x.kind == kind)
                    .collect()
            };
            let (inc, full) = (rows("incremental"), rows("full"));
            let med = |v: Vec<f64>| median(v).unwrap_or(f64::NAN);
            let inc_ms = med(inc.iter().map(|x| x.save_ms).collect());
            let full_ms = med(full.iter().map(|x| x.save_ms).collect());
            let raw_ms = med(full.iter().filter_map(|x| x.raw_ms).collect());
            let mib_of = |v: &[&Save]| {
                med(v
                    .iter()
                    .map(|x| x.bytes as f64 / (1 << 20) as f64)
                    .collect())
            };
            let _ = writeln!(
                s,
                "| {mib} MiB | {pct} % | {:.1} % | {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} |",
                100.0 * med(inc.iter().map(|x| x.written_fraction).collect()),
                stat(inc.iter().map(|x| x.save_ms).collect()),
                stat(full.iter().map(|x| x.save_ms).collect()),
                stat(full.iter().filter_map(|x| x.raw_ms).collect()),
                inc_ms / full_ms,
                inc_ms / raw_ms,
                mib_of(&inc),
                mib_of(&full),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nChains (base -> c1 -> c2, each link {} % written):\n",
        plan.chain_pct
    );
    let _ = writeln!(
        s,
        "| guest | files, base first (MiB) | pages each holds | flattened (MiB) | flatten ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in &r.chains {
        let files: Vec<String> = c.file_mib.iter().map(|m| format!("{m:.0}")).collect();
        let holds: Vec<String> = c.holds.iter().map(|h| h.to_string()).collect();
        let _ = writeln!(
            s,
            "| {} MiB | {} | {} | {:.0} | {:.0} |",
            c.mib,
            files.join(" / "),
            holds.join(" / "),
            c.flat_mib,
            c.flatten_ms
        );
    }
    let _ = writeln!(
        s,
        "\nRestores of the chain's top and of its flattened twin, cold page cache, {} s of READs; ms from the start (mount included):\n",
        plan.ttr_seconds
    );
    let _ = writeln!(
        s,
        "| guest | method | restored from | mount ms | memory ms | first response ms | TTR ms | CHECK |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for &mib in &plan.sizes {
        for method in ["mount", "eager"] {
            for variant in ["chain", "flat"] {
                let rows: Vec<&Ttr> = r
                    .ttrs
                    .iter()
                    .filter(|t| t.mib == mib && t.method == method && t.variant == variant)
                    .collect();
                let label = match variant {
                    "chain" => "chain of 3",
                    _ => "flattened",
                };
                let _ = writeln!(
                    s,
                    "| {mib} MiB | {method} | {label} | {} | {} | {} | {} | {} |",
                    stat(rows.iter().filter_map(|t| t.mount_ms).collect()),
                    stat(rows.iter().filter_map(|t| t.memory_ms).collect()),
                    stat(rows.iter().map(|t| t.first_ms).collect()),
                    stat(rows.iter().map(|t| t.ttr_ms.unwrap_or(f64::NAN)).collect()),
                    if rows.iter().all(|t| t.check_ok) {
                        "ok"
                    } else {
                        "DIFFERS"
                    },
                );
            }
        }
    }
    s
}
