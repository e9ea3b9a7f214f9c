//! Tables and plots from restore measurements.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::plot::{self, Series};
use crate::restore::{Measured, Vm, median};
use crate::ttr;

/// TTR floored at one window (100 ms), the metric's resolution, for ratios.
fn ttr_floor(ms: f64) -> f64 {
    ms.max(ttr::WINDOW_NS as f64 / 1e6)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

/// Median TTR of `method` in `runs` (None if any repetition never became responsive).
fn median_ttr(runs: &[&Measured], method: &str) -> Option<f64> {
    let v: Vec<&&Measured> = runs.iter().filter(|m| m.method == method).collect();
    if v.is_empty() || v.iter().any(|m| m.ttr_ms.is_none()) {
        return None;
    }
    median(v.iter().filter_map(|m| m.ttr_ms).collect())
}

/// One workload x size: a markdown table of every method, and the ckptfs ratios.
pub fn table(vm: &Vm, runs: &[&Measured], methods: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {} guest, {} MiB (checkpoint {:.1} % of RAM; {} repetitions)\n",
        vm.workload,
        vm.mib,
        100.0 * vm.size_ratio,
        runs.iter().map(|m| m.rep).max().map_or(0, |r| r + 1)
    );
    s.push_str("| method | TTR ms (median) | TTR range | first response ms | all resident ms | read from storage MiB | state check |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    for method in methods {
        let mine: Vec<&&Measured> = runs.iter().filter(|m| &m.method == method).collect();
        if mine.is_empty() {
            continue;
        }
        let ttrs: Vec<f64> = mine.iter().filter_map(|m| m.ttr_ms).collect();
        let range = if ttrs.len() == mine.len() {
            let lo = ttrs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ttrs.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0}-{hi:.0}")
        } else {
            format!(
                "{} of {} never responsive",
                mine.len() - ttrs.len(),
                mine.len()
            )
        };
        let _ = writeln!(
            s,
            "| {method} | {} | {range} | {} | {} | {:.0} | {} |",
            fmt_ms(median_ttr(runs, method)),
            fmt_ms(median(mine.iter().map(|m| m.first_response_ms).collect())),
            fmt_ms(
                median(mine.iter().filter_map(|m| m.resident_ms).collect())
                    .filter(|_| mine.iter().all(|m| m.resident_ms.is_some()))
            ),
            median(
                mine.iter()
                    .map(|m| m.storage_bytes as f64 / 1048576.0)
                    .collect()
            )
            .unwrap_or(0.0),
            if mine.iter().all(|m| m.check_ok) {
                "identical"
            } else {
                "MISMATCH"
            },
        );
    }
    s.push('\n');
    s.push_str(&ratios(runs, methods));
    s
}

/// TTR(ckptfs-*) divided by each baseline's TTR.
fn ratios(runs: &[&Measured], methods: &[String]) -> String {
    let mut s = String::from(
        "| ckptfs policy | / eager-raw (goal <= 0.25) | / eager-optimized (<= 0.2) | / lazy-raw (<= 0.7) | / warm (<= 1.5) |\n|---|---:|---:|---:|---:|\n",
    );
    let base = |m: &str| median_ttr(runs, m).map(ttr_floor);
    for method in methods.iter().filter(|m| m.starts_with("ckptfs-")) {
        let Some(mine) = median_ttr(runs, method).map(ttr_floor) else {
            let _ = writeln!(s, "| {method} | never responsive | | | |");
            continue;
        };
        let r = |b: &str| base(b).map_or("-".into(), |b| format!("{:.2}", mine / b));
        let _ = writeln!(
            s,
            "| {method} | {} | {} | {} | {} |",
            r("eager-raw"),
            r("eager-optimized"),
            r("lazy-raw"),
            r("warm")
        );
    }
    s.push('\n');
    s
}

/// Plot repetition 0 of every method.
pub fn plot(out: &Path, vm: &Vm, runs: &[&Measured], methods: &[String]) -> Result<()> {
    let series: Vec<Series> = methods
        .iter()
        .filter_map(|method| {
            let m = runs.iter().find(|m| &m.method == method && m.rep == 0)?;
            Some(Series {
                label: method.clone(),
                per_window: ttr::per_window(&m.times, ttr::WINDOW_NS),
            })
        })
        .collect();
    let title = format!(
        "{} guest, {} MiB: requests per 100 ms after restore",
        vm.workload, vm.mib
    );
    plot::throughput(out, &title, ttr::WINDOW_NS / 1_000_000, &series)
}
