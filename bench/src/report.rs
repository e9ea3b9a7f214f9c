//! Tables and plots from restore measurements.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::plot::{self, Series};
use crate::restore::{LoadingSetInfo, Measured, Vm, median};
use crate::ttr;

/// TTR floored at one window (100 ms), the metric's resolution, for ratios.
fn ttr_floor(ms: f64) -> f64 {
    ms.max(ttr::WINDOW_NS as f64 / 1e6)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

/// One workload x size x tier.
pub struct Cell<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Tier label.
    pub tier: String,
    /// Bandwidth of the tier, MB/s (the cap, or the measured cold read speed).
    pub mbps: f64,
    /// The loading set.
    pub loadset: &'a LoadingSetInfo,
    /// Every restore of this cell.
    pub runs: Vec<&'a Measured>,
}

impl Cell<'_> {
    fn of(&self, method: &str) -> Vec<&Measured> {
        self.runs
            .iter()
            .copied()
            .filter(|m| m.method == method)
            .collect()
    }

    /// Median TTR of `method` (None if any repetition never became responsive).
    pub fn median_ttr(&self, method: &str) -> Option<f64> {
        let v = self.of(method);
        if v.is_empty() || v.iter().any(|m| m.ttr_ms.is_none()) {
            return None;
        }
        median(v.iter().filter_map(|m| m.ttr_ms).collect())
    }

    /// Median work lag of `method`.
    pub fn median_lag(&self, method: &str) -> Option<f64> {
        median(self.of(method).iter().filter_map(|m| m.lag_ms).collect())
    }

    /// Warm's own run-to-run spread of the work lag (max - min), ms.
    pub fn warm_spread(&self) -> Option<f64> {
        let lags: Vec<f64> = self.of("warm").iter().filter_map(|m| m.lag_ms).collect();
        let (lo, hi) = range(&lags)?;
        Some(hi - lo)
    }

    /// Lower bound on ckptfs-ls's TTR: the loading set read at the tier's bandwidth, ms.
    pub fn bound_ms(&self) -> f64 {
        self.loadset.data_bytes as f64 / 1e6 / self.mbps * 1e3
    }
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

/// One cell: a markdown table of every method, then ratios and the loading set.
pub fn table(cell: &Cell, methods: &[String]) -> String {
    let mut s = String::new();
    let vm = cell.vm;
    let reps = cell.runs.iter().map(|m| m.rep).max().map_or(0, |r| r + 1);
    let _ = writeln!(
        s,
        "### {} guest, {} MiB, storage {} ({:.0} MB/s); checkpoint {:.1} % of RAM; {reps} repetitions\n",
        vm.workload,
        vm.mib,
        cell.tier,
        cell.mbps,
        100.0 * vm.size_ratio,
    );
    s.push_str("| method | TTR ms median | TTR range | work lag ms median | lag range | first response ms | read from storage MiB | state check |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
    for method in methods {
        let mine = cell.of(method);
        if mine.is_empty() {
            continue;
        }
        let ttrs: Vec<f64> = mine.iter().filter_map(|m| m.ttr_ms).collect();
        let ttr_range = match range(&ttrs) {
            Some((lo, hi)) if ttrs.len() == mine.len() => format!("{lo:.0}-{hi:.0}"),
            _ => format!("{} of {} never", mine.len() - ttrs.len(), mine.len()),
        };
        let lags: Vec<f64> = mine.iter().filter_map(|m| m.lag_ms).collect();
        let lag_range = range(&lags).map_or("-".into(), |(lo, hi)| format!("{lo:.0} to {hi:.0}"));
        let _ = writeln!(
            s,
            "| {method} | {} | {ttr_range} | {} | {lag_range} | {} | {:.0} | {} |",
            fmt_ms(cell.median_ttr(method)),
            fmt_ms(cell.median_lag(method)),
            fmt_ms(median(mine.iter().map(|m| m.first_response_ms).collect())),
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
    s.push_str(&ratios(cell, methods));
    let ls_ttr = cell.median_ttr("ckptfs-ls").map(ttr_floor);
    let _ = writeln!(
        s,
        "Loading set: {} pages in {} runs, {:.1} MiB stored (recorded over {:.1} s, another request seed); \
         it holds {:.1} % of the {} pages a measured restore touched. Physical limit at {:.0} MB/s: {:.0} ms; ckptfs-ls efficiency (limit / TTR): {}. \
         Noise floor: warm's own work-lag spread {} ms.\n",
        cell.loadset.pages,
        cell.loadset.runs,
        cell.loadset.data_bytes as f64 / 1048576.0,
        cell.loadset.window_seconds,
        100.0 * cell.loadset.coverage,
        cell.loadset.measured_touched,
        cell.mbps,
        cell.bound_ms(),
        ls_ttr.map_or("-".into(), |t| format!("{:.2}", cell.bound_ms() / t)),
        fmt_ms(cell.warm_spread()),
    );
    s
}

/// TTR(ckptfs*) divided by each baseline's TTR.
fn ratios(cell: &Cell, methods: &[String]) -> String {
    let mut s = String::from(
        "| ckptfs method | / eager-raw | / eager-optimized | / lazy-raw | lag - warm's spread x2 |\n|---|---:|---:|---:|---:|\n",
    );
    let base = |m: &str| cell.median_ttr(m).map(ttr_floor);
    for method in methods.iter().filter(|m| m.starts_with("ckptfs")) {
        let Some(mine) = cell.median_ttr(method).map(ttr_floor) else {
            let _ = writeln!(s, "| {method} | never responsive | | | |");
            continue;
        };
        let r = |b: &str| base(b).map_or("-".into(), |b| format!("{:.2}", mine / b));
        let lag = match (cell.median_lag(method), cell.warm_spread()) {
            (Some(l), Some(w)) => format!("{:.0}", l - 2.0 * w),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {method} | {} | {} | {} | {lag} |",
            r("eager-raw"),
            r("eager-optimized"),
            r("lazy-raw"),
        );
    }
    s.push('\n');
    s
}

/// Plot repetition 0 of every method.
pub fn plot(out: &Path, cell: &Cell, methods: &[String]) -> Result<()> {
    let series: Vec<Series> = methods
        .iter()
        .filter_map(|method| {
            let m = cell
                .runs
                .iter()
                .find(|m| &m.method == method && m.rep == 0)?;
            Some(Series {
                label: method.clone(),
                per_window: ttr::per_window(&m.times, ttr::WINDOW_NS),
            })
        })
        .collect();
    let title = format!(
        "{} guest, {} MiB, {}: requests per 100 ms after restore",
        cell.vm.workload, cell.vm.mib, cell.tier
    );
    plot::throughput(out, &title, ttr::WINDOW_NS / 1_000_000, &series)
}
