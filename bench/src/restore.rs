//! `bench restore`: time-to-responsiveness of every restore method, side by side.
//!
//! For each workload and guest size, vmm-lite boots the guest, warms it up and
//! checkpoints it (a ckptfs checkpoint, a raw dump and a state file). Then each
//! method restores the same VM, from a cold page cache unless it is the warm
//! ideal, and vmm-lite logs every completed request; TTR and the other measures
//! come from those timelines (see [`crate::ttr`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::ttr;

/// A way to restore the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Read the whole raw dump into memory, then resume.
    EagerRaw,
    /// Rebuild every page from the checkpoint, then resume.
    EagerOptimized,
    /// mmap the raw dump MAP_PRIVATE (Firecracker's File backend).
    LazyRaw,
    /// ckptfs mount with this prefetch policy.
    Ckptfs(&'static str),
    /// Memory already resident (warm page cache, raw dump mapped).
    Warm,
}

impl Method {
    /// Label used in tables and plots.
    pub fn label(self) -> String {
        match self {
            Method::EagerRaw => "eager-raw".into(),
            Method::EagerOptimized => "eager-optimized".into(),
            Method::LazyRaw => "lazy-raw".into(),
            Method::Ckptfs(p) => format!("ckptfs-{p}"),
            Method::Warm => "warm".into(),
        }
    }

    /// Every method, the baselines first.
    pub fn all() -> Vec<Method> {
        let mut m = vec![Method::EagerRaw, Method::EagerOptimized, Method::LazyRaw];
        m.extend(["none", "all"].map(Method::Ckptfs));
        m.push(Method::Warm);
        m
    }
}

/// Where the built binaries are.
pub struct Tools {
    vmm: PathBuf,
    mountd: PathBuf,
}

impl Tools {
    /// The binaries beside this one (cargo puts the workspace's in one folder).
    pub fn find() -> Result<Self> {
        let dir = std::env::current_exe()?
            .parent()
            .context("bench has no folder")?
            .to_owned();
        let tools = Tools {
            vmm: dir.join("vmm-lite"),
            mountd: dir.join("ckptfs-mountd"),
        };
        for p in [&tools.vmm, &tools.mountd] {
            ensure!(
                p.exists(),
                "{} is not built; run `cargo build --release --workspace`",
                p.display()
            );
        }
        Ok(tools)
    }
}

/// One checkpointed VM, restored by every method.
pub struct Vm {
    /// Its folder.
    pub dir: PathBuf,
    /// Workload name.
    pub workload: String,
    /// Guest RAM in MiB.
    pub mib: u64,
    /// The CHECK taken at checkpoint time.
    pub check: String,
    /// Checkpoint size / guest RAM.
    pub size_ratio: f64,
}

impl Vm {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn run_json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({})", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON report")?;
    serde_json::from_str(last).with_context(|| format!("parsing the report of {cmd:?}"))
}

/// Make the disk and checkpoint the VM.
pub fn prepare(tools: &Tools, root: &Path, workload: &str, mib: u64) -> Result<Vm> {
    let dir = root.join(format!("{workload}-{mib}"));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    let disk_mib = mib.max(64);
    run_status(
        Command::new(&tools.vmm)
            .arg("mkdisk")
            .arg(&disk)
            .arg("--size")
            .arg(format!("{disk_mib}M")),
    )?;
    eprintln!("bench: {workload} {mib} MiB: booting, warming up, checkpointing");
    let report = run_json(
        Command::new(&tools.vmm)
            .args([
                "run",
                "--mem",
                &format!("{mib}M"),
                "--workload",
                workload,
                "--checkpoint-after",
                "1",
            ])
            .arg("--disk")
            .arg(&disk)
            .arg("-o")
            .arg(dir.join("vm.ckpt"))
            .arg("--raw-out")
            .arg(dir.join("mem.raw"))
            .arg("--state-out")
            .arg(dir.join("state.bin")),
    )?;
    let check = report["check"]
        .as_str()
        .context("run report has no check")?
        .to_owned();
    let ckpt_bytes = std::fs::metadata(dir.join("vm.ckpt"))?.len();
    Ok(Vm {
        dir,
        workload: workload.into(),
        mib,
        check,
        size_ratio: ckpt_bytes as f64 / (mib << 20) as f64,
    })
}

fn run_status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?} failed ({st})");
    Ok(())
}

/// Write back dirty pages and drop the page cache, so a restore starts cold.
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches (needs root)")
}

/// KiB read from block devices so far (/proc/vmstat pgpgin).
fn pgpgin_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("pgpgin "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What one restore measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measured {
    /// Workload.
    pub workload: String,
    /// Guest RAM MiB.
    pub mib: u64,
    /// Method label.
    pub method: String,
    /// Repetition.
    pub rep: usize,
    /// Completion times, ns since the restore started (mount included).
    #[serde(skip)]
    pub times: Vec<u64>,
    /// First completed request, ms.
    pub first_response_ms: f64,
    /// Every page resident (eager: when memory was loaded; ckptfs-all: when background fetch finished), ms.
    pub resident_ms: Option<f64>,
    /// Bytes read from block devices during the restore.
    pub storage_bytes: u64,
    /// The restored VM's final CHECK equals the checkpointed one.
    pub check_ok: bool,
    /// TTR, ms (filled in once the warm rate is known).
    pub ttr_ms: Option<f64>,
}

struct Mount {
    point: PathBuf,
    /// The detached daemon's pid (from its stats file).
    pid: Option<u64>,
}

impl Mount {
    /// Mount `vm`'s checkpoint; `record` = the recording window in seconds.
    fn new(tools: &Tools, vm: &Vm, policy: &str, record: Option<f64>) -> Result<Self> {
        let point = vm.path("mnt");
        std::fs::create_dir_all(&point)?;
        let mut cmd = Command::new(&tools.mountd);
        cmd.arg(vm.path("vm.ckpt"))
            .arg(&point)
            .args(["--prefetch", policy]);
        match (record, policy) {
            (Some(window), _) => {
                cmd.arg("--record-loading-set")
                    .arg("--loading-set-window")
                    .arg(window.to_string());
            }
            (None, "none") => {
                cmd.arg("--no-loading-set");
            }
            (None, _) => {
                cmd.arg("--wait-loading-set");
            }
        }
        run_status(&mut cmd)?;
        let pid = std::fs::read_to_string(point.join("stats"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["pid"].as_u64());
        Ok(Mount { point, pid })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.point)
            .status();
        // Wait for the daemon to exit: it writes the recorded working set after
        // the unmount, so the mount disappearing is not enough.
        // A zombie (state Z) has exited too; its parent may be slow to reap it.
        let gone = |pid: u64| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('Z'))
                })
                .unwrap_or(true)
        };
        for _ in 0..500 {
            if self.pid.is_none_or(gone) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: ckptfs-mountd on {} did not exit within 10 s",
            self.point.display()
        );
    }
}

/// Poll the mount's stats until background fetch completes; returns when it did.
fn watch_background(
    stats: PathBuf,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<f64>> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(&stats)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&s)
                && v["background_complete"] == true
            {
                return Some(start.elapsed().as_secs_f64() * 1e3);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
}

/// `vmm-lite restore` of `vm`'s disk, serving requests for `duration_s` seconds.
fn restore_cmd(tools: &Tools, vm: &Vm, duration_s: f64) -> Command {
    let mut cmd = Command::new(&tools.vmm);
    cmd.arg("restore").arg("--disk").arg(vm.path("disk.img"));
    cmd.args(["--duration", &duration_s.to_string()]);
    cmd
}

/// Restore `vm` with `method` and measure it.
pub fn restore(
    tools: &Tools,
    vm: &Vm,
    method: Method,
    rep: usize,
    duration_s: f64,
) -> Result<Measured> {
    if method == Method::Warm {
        // Make the raw dump resident in the page cache.
        std::fs::read(vm.path("mem.raw")).map(drop)?;
    } else {
        drop_caches()?;
    }
    let timeline = vm.path("timeline.jsonl");
    let pgpgin = pgpgin_kib();
    let start = Instant::now();
    let mut cmd = restore_cmd(tools, vm, duration_s);
    cmd.arg("--timeline").arg(&timeline);
    let mut mount = None;
    let mut watcher = None;
    let stop = Arc::new(AtomicBool::new(false));
    match method {
        Method::EagerRaw => {
            cmd.arg("--mem-file")
                .arg(vm.path("mem.raw"))
                .arg("--eager")
                .arg("--state")
                .arg(vm.path("state.bin"));
        }
        Method::EagerOptimized => {
            cmd.arg("--ckpt").arg(vm.path("vm.ckpt"));
        }
        Method::LazyRaw | Method::Warm => {
            cmd.arg("--mem-file")
                .arg(vm.path("mem.raw"))
                .arg("--state")
                .arg(vm.path("state.bin"));
        }
        Method::Ckptfs(policy) => {
            let m = Mount::new(tools, vm, policy, None)?;
            cmd.arg("--mem-file")
                .arg(m.point.join("memory"))
                .arg("--state")
                .arg(m.point.join("vmm-state"));
            if policy == "all" {
                watcher = Some(watch_background(m.point.join("stats"), start, stop.clone()));
            }
            mount = Some(m);
        }
    }
    let launched = start.elapsed().as_nanos() as u64;
    let report = run_json(&mut cmd)?;
    stop.store(true, Ordering::Relaxed);
    let background_ms = watcher.and_then(|w| w.join().ok().flatten());
    drop(mount);
    let storage_bytes = (pgpgin_kib() - pgpgin) * 1024;
    let mut times = read_timeline(&timeline, launched)?;
    times.sort_unstable();
    let resident_ms = match method {
        Method::EagerRaw | Method::EagerOptimized => report["memory_ms"]
            .as_f64()
            .map(|m| m + launched as f64 / 1e6),
        Method::Warm => Some(0.0),
        _ => background_ms,
    };
    Ok(Measured {
        workload: vm.workload.clone(),
        mib: vm.mib,
        method: method.label(),
        rep,
        first_response_ms: times.first().map_or(f64::NAN, |&t| t as f64 / 1e6),
        times,
        resident_ms,
        storage_bytes,
        check_ok: report["check"].as_str() == Some(vm.check.as_str()),
        ttr_ms: None,
    })
}

/// WORK completion times from a vmm-lite timeline, shifted by `offset` ns.
fn read_timeline(path: &Path, offset: u64) -> Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("timeline {}", path.display()))?;
    let mut times = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("timeline {}", path.display()))?;
        if v["kind"] == "work" {
            times.push(v["t_ns"].as_u64().context("timeline entry without t_ns")? + offset);
        }
    }
    if times.is_empty() {
        bail!("timeline {} has no completed requests", path.display());
    }
    Ok(times)
}

/// Record the loading set: one restore through a recording mount.
pub fn record_loading_set(tools: &Tools, vm: &Vm, duration_s: f64) -> Result<()> {
    // The guest's final CHECK reads all of memory: keep it out of the window.
    let m = Mount::new(tools, vm, "none", Some(duration_s * 0.8))?;
    let mut cmd = restore_cmd(tools, vm, duration_s);
    cmd.arg("--mem-file")
        .arg(m.point.join("memory"))
        .arg("--state")
        .arg(m.point.join("vmm-state"));
    run_json(&mut cmd)?;
    drop(m);
    ensure!(
        vm.path("vm.ckpt.ls").exists(),
        "recording mount wrote no loading set"
    );
    Ok(())
}

/// Fill in TTRs against the warm rate of the same repetition.
pub fn score(results: &mut [Measured]) {
    let warm: Vec<(usize, f64)> = results
        .iter()
        .filter(|m| m.method == "warm")
        .map(|m| (m.rep, ttr::warm_rate(&m.times, ttr::WINDOW_NS)))
        .collect();
    for m in results.iter_mut() {
        let Some(&(_, rate)) = warm.iter().find(|(r, _)| *r == m.rep) else {
            continue;
        };
        m.ttr_ms =
            ttr::ttr(&m.times, rate, ttr::WINDOW_NS, ttr::UTILIZATION).map(|t| t as f64 / 1e6);
    }
}

/// Median of the present values.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}
