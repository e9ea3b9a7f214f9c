//! `bench fuzz`: a mutation fuzzer over what ckptfs parses from files and
//! command lines, on the stable toolchain (no libFuzzer/AFL needed).
//!
//! Each case takes a valid input, applies a few random edits (bit flips,
//! interesting values in header fields with the header CRC recomputed, so
//! the edits reach the checks behind it, truncation, extension), runs the
//! parser and the reads behind it, and checks the target's oracle (see
//! [`targets`]). Panics are caught and counted, a case that runs longer than
//! [`HANG_AFTER`] is a hang (the run stops), and the input of every failure is
//! saved. A short run is part of the test suite; the long run is
//! `cargo run --release -p bench -- fuzz --seconds 3600`.

mod mutate;
mod targets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ckptfs::synth::Rng;

use targets::{CheckpointTarget, LoadSetTarget, OptionsTarget, Target, ZeroRangesTarget};

/// A case running this long is reported as a hang.
pub const HANG_AFTER: Duration = Duration::from_secs(10);

/// Counts of one target.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TargetSummary {
    /// Target name.
    pub target: String,
    /// Cases run.
    pub executions: u64,
    /// Mutated inputs the parser accepted.
    pub accepted: u64,
    /// Pages (or entries) read back and checked equal to the original.
    pub pages_checked: u64,
    /// Panics caught.
    pub panics: u64,
    /// Oracle failures: wrong bytes accepted.
    pub wrong_bytes: u64,
}

/// The whole run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Seconds run.
    pub seconds: f64,
    /// Cases run in all.
    pub executions: u64,
    /// Panics in all.
    pub panics: u64,
    /// Hangs (the run stops at the first).
    pub hangs: u64,
    /// Wrong bytes accepted in all.
    pub wrong_bytes: u64,
    /// Per target.
    pub targets: Vec<TargetSummary>,
    /// Inputs of the failures, kept for reproduction.
    pub failures: Vec<String>,
}

/// How long to fuzz.
pub struct Options {
    /// Stop after this many seconds.
    pub seconds: f64,
    /// Or after this many cases in all.
    pub iterations: Option<u64>,
    /// Random seed.
    pub seed: u64,
    /// Work directory.
    pub dir: PathBuf,
    /// Where failing inputs are copied.
    pub failures_dir: PathBuf,
}

fn save_failure(target: &dyn Target, failures_dir: &Path, n: u64, what: &str) -> String {
    let _ = std::fs::create_dir_all(failures_dir);
    match target.input_path() {
        Some(p) => {
            let dest = failures_dir.join(format!("{}-{n}-{what}", target.name()));
            let _ = std::fs::copy(&p, &dest);
            dest.display().to_string()
        }
        None => format!("{} case {n} ({what}; command-line input)", target.name()),
    }
}

/// Run the fuzzer.
pub fn run(opts: &Options) -> Result<Summary> {
    let mut list: Vec<Box<dyn Target>> = vec![
        Box::new(CheckpointTarget::new(&opts.dir.join("ckpt"), opts.seed)?),
        Box::new(LoadSetTarget::new(&opts.dir.join("ls"), opts.seed)?),
        Box::new(OptionsTarget::new()),
        Box::new(ZeroRangesTarget::new()),
    ];
    let mut sums: Vec<TargetSummary> = list
        .iter()
        .map(|t| TargetSummary {
            target: t.name().into(),
            ..TargetSummary::default()
        })
        .collect();
    let mut summary = Summary::default();
    // Quiet the default panic printer: panics are counted and saved.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // The watchdog: a case that does not finish within HANG_AFTER ends the
    // run with the case named (its input is left where the target wrote it).
    let case_started = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let watchdog = {
        let (started, done, current) = (case_started.clone(), done.clone(), current.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let s = started.load(Ordering::Acquire);
                let now = t0.elapsed().as_millis() as u64;
                if s > 0 && now.saturating_sub(s) > HANG_AFTER.as_millis() as u64 {
                    let case = current.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("fuzz: hang: {case} ran for more than {HANG_AFTER:?}");
                    std::process::exit(3);
                }
            }
        })
    };
    let mut rng = Rng::new(opts.seed);
    let mut n = 0u64;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    while t0.elapsed().as_secs_f64() < opts.seconds && opts.iterations.is_none_or(|i| n < i) {
        let k = (n % list.len() as u64) as usize;
        let target = &mut list[k];
        let mut case_rng = Rng::new(rng.next_u64());
        if let Ok(mut c) = current.lock() {
            *c = format!(
                "{} case {n} (input: {})",
                target.name(),
                target
                    .input_path()
                    .map_or("command line".into(), |p| p.display().to_string())
            );
        }
        case_started.store(t0.elapsed().as_millis().max(1) as u64, Ordering::Release);
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            target.run_case(&mut case_rng)
        }));
        case_started.store(0, Ordering::Release);
        let s = &mut sums[k];
        s.executions += 1;
        match res {
            Ok(out) => {
                s.accepted += u64::from(out.accepted);
                s.pages_checked += out.pages_ok;
                if let Some(why) = out.wrong {
                    s.wrong_bytes += 1;
                    let at = save_failure(&**target, &opts.failures_dir, n, "wrong");
                    summary.failures.push(format!("{at}: {why}"));
                }
            }
            Err(_) => {
                s.panics += 1;
                let at = save_failure(&**target, &opts.failures_dir, n, "panic");
                summary.failures.push(format!("{at}: panic"));
            }
        }
        n += 1;
        if tty && n.is_multiple_of(500) {
            eprint!("\rfuzz: {n} cases, {:.0} s", t0.elapsed().as_secs_f64());
        }
    }
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    std::panic::set_hook(hook);
    if tty {
        eprintln!();
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    summary.executions = sums.iter().map(|s| s.executions).sum();
    summary.panics = sums.iter().map(|s| s.panics).sum();
    summary.wrong_bytes = sums.iter().map(|s| s.wrong_bytes).sum();
    summary.hangs = 0; // a hang exits the process (status 3) naming the case
    summary.targets = sums;
    Ok(summary)
}
