//! The restore matrix: every workload x size x storage tier x repetition x method.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::report::{self, Cell};
use crate::restore::{self, LoadingSetInfo, Measured, Method, Tools, Vm};
use crate::tier::{self, Throttle, Tier};

/// What to run.
pub struct Matrix {
    /// Workload names.
    pub workloads: Vec<String>,
    /// Guest sizes, MiB.
    pub sizes: Vec<u64>,
    /// Storage tiers.
    pub tiers: Vec<Tier>,
    /// Methods.
    pub methods: Vec<Method>,
    /// Repetitions per cell.
    pub reps: usize,
    /// Seconds each restore serves requests.
    pub duration: f64,
    /// Loading-set recording window, seconds.
    pub window: f64,
    /// Extra `vmm-lite run` arguments (workload parameters).
    pub run_args: Vec<String>,
}

struct Done {
    vm: Vm,
    loadset: LoadingSetInfo,
    tier: Tier,
    mbps: f64,
    runs: Vec<Measured>,
}

/// Run the matrix in `dir`, writing tables, plots and raw results to `out`.
pub fn run(m: &Matrix, dir: &Path, out: &Path) -> Result<()> {
    let tools = Tools::find()?;
    std::fs::create_dir_all(out)?;
    let labels: Vec<String> = m.methods.iter().map(|x| x.label()).collect();
    let cells = m.workloads.len() * m.sizes.len() * m.tiers.len();
    eprintln!(
        "bench restore: {cells} cells x {} methods x {} reps",
        m.methods.len(),
        m.reps,
    );
    let started = Instant::now();
    let mut md = String::from("## Restore: time-to-responsiveness\n\n");
    let mut done: Vec<Done> = Vec::new();
    for &mib in &m.sizes {
        for workload in &m.workloads {
            let vm = restore::prepare(&tools, dir, workload, mib, &m.run_args)?;
            eprintln!("bench: {workload} {mib} MiB: recording the loading set");
            let mut loadset = restore::record_loading_set(&tools, &vm, m.window)?;
            (loadset.measured_touched, loadset.coverage) =
                restore::coverage(&tools, &vm, 1, m.duration)?;
            let local_mbps = tier::cold_read_mbps(&vm.path("mem.raw"))?;
            for &tier in &m.tiers {
                let runs = run_tier(&tools, m, &vm, tier)?;
                let mbps = match tier {
                    Tier::Local => local_mbps,
                    Tier::Mbps(n) => n as f64,
                };
                let d = Done {
                    vm: Vm {
                        dir: vm.dir.clone(),
                        workload: vm.workload.clone(),
                        mib: vm.mib,
                        check: vm.check.clone(),
                        size_ratio: vm.size_ratio,
                    },
                    loadset: loadset.clone(),
                    tier,
                    mbps,
                    runs,
                };
                let cell = cell_of(&d);
                let table = report::table(&cell, &labels);
                eprintln!("{table}");
                md.push_str(&table);
                let slug = tier.label().replace([' ', '/'], "");
                let png = out.join(format!("restore-{workload}-{mib}-{slug}.png"));
                report::plot(&png, &cell, &labels)?;
                md.push_str(&format!(
                    "![{workload} {mib} MiB {}]({})\n\n",
                    tier.label(),
                    png.file_name().unwrap().to_string_lossy()
                ));
                done.push(d);
            }
            std::fs::remove_dir_all(&vm.dir).ok();
        }
    }
    md.insert_str(0, &summary(&done));
    let json: Vec<String> = done
        .iter()
        .flat_map(|d| d.runs.iter())
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("restore.jsonl"), json.join("\n") + "\n")?;
    std::fs::write(out.join("restore.md"), &md)?;
    eprintln!(
        "bench restore: done in {:.0} s; tables in {}",
        started.elapsed().as_secs_f64(),
        out.join("restore.md").display()
    );
    Ok(())
}

fn cell_of(d: &Done) -> Cell<'_> {
    Cell {
        vm: &d.vm,
        tier: d.tier.label(),
        mbps: d.mbps,
        loadset: &d.loadset,
        runs: d.runs.iter().collect(),
    }
}

/// Every method, repetition by repetition (methods side by side in time).
fn run_tier(tools: &Tools, m: &Matrix, vm: &Vm, tier: Tier) -> Result<Vec<Measured>> {
    let throttle = Throttle::start(
        &vm.dir,
        match tier {
            Tier::Local => None,
            Tier::Mbps(n) => Some(n),
        },
    )?;
    let mut runs = Vec::new();
    for rep in 0..m.reps {
        for &method in &m.methods {
            eprintln!(
                "bench: {} {} MiB {} rep {rep}: {}",
                vm.workload,
                vm.mib,
                tier.label(),
                method.label()
            );
            let seed = rep as u64 + 1;
            let label = tier.label();
            let trial = restore::Trial {
                method,
                rep,
                seed,
                duration_s: m.duration,
                tier: &label,
                group: &throttle,
            };
            runs.push(restore::restore(tools, vm, &trial)?);
        }
    }
    restore::score(&mut runs);
    Ok(runs)
}

/// The goals of the loading-set issue, one row per cell.
fn summary(done: &[Done]) -> String {
    let mut s = String::from(
        "## Summary: ckptfs with a loading set against the baselines (median TTR ratios)\n\n\
         | workload | MiB | storage | ckptfs-ls TTR ms | / eager-raw | / eager-optimized | / lazy-raw | efficiency | lag ms | warm spread ms |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for d in done {
        let c = cell_of(d);
        let floor = |x: f64| x.max(100.0);
        let ls = c.median_ttr("ckptfs-ls");
        let r = |b: &str| match (ls, c.median_ttr(b)) {
            (Some(a), Some(b)) => format!("{:.2}", floor(a) / floor(b)),
            (Some(_), None) => "< (never)".into(),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.vm.workload,
            d.vm.mib,
            c.tier,
            ls.map_or("never".into(), |t| format!("{t:.0}")),
            r("eager-raw"),
            r("eager-optimized"),
            r("lazy-raw"),
            ls.map_or("-".into(), |t| format!("{:.2}", c.bound_ms() / floor(t))),
            c.median_lag("ckptfs-ls")
                .map_or("-".into(), |l| format!("{l:.0}")),
            c.warm_spread().map_or("-".into(), |l| format!("{l:.0}")),
        );
    }
    s.push('\n');
    s
}
