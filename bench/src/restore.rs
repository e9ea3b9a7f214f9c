//! `bench restore`: time-to-responsiveness of every restore method, side by side.
//!
//! For each workload and guest size, vmm-lite boots the guest, warms it up and
//! checkpoints it (a ckptfs checkpoint, a raw dump and a state file); one
//! recording restore (its own request seed) writes the loading set. Then each
//! method restores the same VM, from a cold page cache unless it is the warm
//! ideal, with a request seed per repetition that differs from the recording's
//! (so the loading set predicts the restore only as well as a real one would),
//! and vmm-lite logs every completed request; TTR and the other measures come
//! from those timelines (see [`crate::ttr`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    /// A ckptfs mount.
    Ckptfs(CkptfsOpts),
    /// Memory already resident (warm page cache, raw dump mapped).
    Warm,
}

/// How a ckptfs restore is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CkptfsOpts {
    /// Push the loading set before the VM starts (`--wait-loading-set`).
    pub loading_set: bool,
    /// vmm-lite maps the checkpoint's zero ranges anonymous.
    pub zero_ranges: bool,
    /// The mount's read-around (`--readahead-kb`), if not the default.
    pub readahead_kb: Option<u32>,
    /// Start the VM at once while the loading set streams in (no `--wait-loading-set`).
    pub no_wait: bool,
    /// The mount's `--prefetch` policy, if not the default (`none` with a loading set, else `all`).
    pub prefetch: Option<&'static str>,
    /// The mount's `--background-share`, if not the default.
    pub background_share: Option<u32>,
}

impl Method {
    /// Label used in tables and plots: `ckptfs[-ls][-zero][-raN]` for ckptfs.
    pub fn label(self) -> String {
        match self {
            Method::EagerRaw => "eager-raw".into(),
            Method::EagerOptimized => "eager-optimized".into(),
            Method::LazyRaw => "lazy-raw".into(),
            Method::Warm => "warm".into(),
            Method::Ckptfs(o) => {
                let mut s = String::from("ckptfs");
                if o.loading_set {
                    s.push_str("-ls");
                }
                if o.zero_ranges {
                    s.push_str("-zero");
                }
                if o.no_wait {
                    s.push_str("-nowait");
                }
                if let Some(kb) = o.readahead_kb {
                    s.push_str(&format!("-ra{kb}"));
                }
                if let Some(p) = o.prefetch {
                    s.push_str(&format!("-p{p}"));
                }
                if let Some(b) = o.background_share {
                    s.push_str(&format!("-bs{b}"));
                }
                s
            }
        }
    }

    /// ckptfs without a loading set.
    pub const CKPTFS: Method = Method::Ckptfs(CkptfsOpts {
        loading_set: false,
        zero_ranges: false,
        readahead_kb: None,
        no_wait: false,
        prefetch: None,
        background_share: None,
    });
    /// ckptfs with the loading set.
    pub const CKPTFS_LS: Method = Method::Ckptfs(CkptfsOpts {
        loading_set: true,
        zero_ranges: false,
        readahead_kb: None,
        no_wait: false,
        prefetch: None,
        background_share: None,
    });

    /// ckptfs with the loading set, zero ranges mapped anonymous.
    pub const CKPTFS_LS_ZERO: Method = Method::Ckptfs(CkptfsOpts {
        loading_set: true,
        zero_ranges: true,
        readahead_kb: None,
        no_wait: false,
        prefetch: None,
        background_share: None,
    });

    /// Every method of the standard matrix, the baselines first.
    pub fn all() -> Vec<Method> {
        vec![
            Method::EagerRaw,
            Method::EagerOptimized,
            Method::LazyRaw,
            Method::CKPTFS,
            Method::CKPTFS_LS,
            Method::CKPTFS_LS_ZERO,
            Method::Warm,
        ]
    }

    /// The method labelled `s` (`ckptfs-ls-ra4`, `eager-raw`, ...).
    pub fn parse(s: &str) -> Result<Method> {
        if let Some(m) = [
            Method::EagerRaw,
            Method::EagerOptimized,
            Method::LazyRaw,
            Method::Warm,
        ]
        .into_iter()
        .find(|m| m.label() == s)
        {
            return Ok(m);
        }
        let rest = s
            .strip_prefix("ckptfs")
            .with_context(|| format!("unknown method {s:?}"))?;
        let mut o = CkptfsOpts::default();
        for part in rest.split('-').filter(|p| !p.is_empty()) {
            match part {
                "ls" => o.loading_set = true,
                "zero" => o.zero_ranges = true,
                "nowait" => o.no_wait = true,
                "pnone" => o.prefetch = Some("none"),
                "preadahead" => o.prefetch = Some("readahead"),
                "pall" => o.prefetch = Some("all"),
                p if p.starts_with("bs") => {
                    o.background_share = Some(
                        p[2..]
                            .parse()
                            .with_context(|| format!("bad share in method {s:?}"))?,
                    );
                }
                p => {
                    let kb = p
                        .strip_prefix("ra")
                        .and_then(|n| n.parse().ok())
                        .with_context(|| format!("unknown part {p:?} of method {s:?}"))?;
                    o.readahead_kb = Some(kb);
                }
            }
        }
        Ok(Method::Ckptfs(o))
    }
}

/// Where the built binaries are.
pub type Tools = crate::fleet::Bins;

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
    /// A file in the VM's folder.
    pub fn path(&self, name: &str) -> PathBuf {
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

/// Make the disk and checkpoint the VM; `run_args` go to `vmm-lite run`
/// (e.g. the desktop workload's parameters).
pub fn prepare(
    tools: &Tools,
    root: &Path,
    workload: &str,
    mib: u64,
    run_args: &[String],
) -> Result<Vm> {
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
            .args(run_args)
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

/// Drop `files` from the page cache, so a restore of them starts cold. Only
/// these files: a global `drop_caches` would also evict whatever else runs on
/// this shared machine (and their evictions ours).
pub fn evict(files: &[PathBuf]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for p in files.iter().filter(|p| p.exists()) {
        let f = std::fs::File::open(p).with_context(|| format!("evicting {}", p.display()))?;
        f.sync_all()?;
        // SAFETY: posix_fadvise only advises the kernel about an open descriptor.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(
            rc == 0,
            "evicting {} from the page cache: error {rc}",
            p.display()
        );
    }
    Ok(())
}

impl Vm {
    /// Every file a restore of this VM reads.
    pub fn files(&self) -> Vec<PathBuf> {
        ["mem.raw", "vm.ckpt", "vm.ckpt.ls", "disk.img", "state.bin"]
            .iter()
            .map(|f| self.path(f))
            .collect()
    }
}

/// What one restore measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measured {
    /// Workload.
    pub workload: String,
    /// Guest RAM MiB.
    pub mib: u64,
    /// Storage tier label.
    pub tier: String,
    /// Method label.
    pub method: String,
    /// Repetition.
    pub rep: usize,
    /// The restore's request seed.
    pub seed: u64,
    /// Completion times, ns since the restore started (mount included).
    #[serde(skip)]
    pub times: Vec<u64>,
    /// First completed request, ms.
    pub first_response_ms: f64,
    /// Every page resident (eager: when memory was loaded; ckptfs: when the background fetch finished), ms.
    pub resident_ms: Option<f64>,
    /// Bytes the restore's processes read from the disk (their blkio group's count).
    pub storage_bytes: u64,
    /// The restored VM's final CHECK equals the checkpointed one.
    pub check_ok: bool,
    /// Loading set: bytes pushed before the VM resumed.
    pub loadset_bytes: Option<u64>,
    /// Loading set: seconds from mount to all pushed.
    pub loadset_seconds: Option<f64>,
    /// Requests completed within the horizon (the run's duration from its start).
    pub count_at_horizon: u64,
    /// TTR, ms (filled in once the warm rate is known).
    pub ttr_ms: Option<f64>,
    /// Work lag against the median warm run, ms (filled in by [`score`]).
    pub lag_ms: Option<f64>,
}

/// A mount of the VM's checkpoint.
struct Mount {
    point: PathBuf,
    /// The detached daemon's pid (from its stats file).
    pid: Option<u64>,
}

/// How to mount.
#[derive(Clone, Copy, Debug)]
enum MountMode {
    /// Record the loading set (window in seconds).
    Record(f64),
    /// Serve as a ckptfs method asks.
    Serve(CkptfsOpts),
}

impl Mount {
    fn new(tools: &Tools, vm: &Vm, mode: MountMode) -> Result<Self> {
        let point = vm.path("mnt");
        std::fs::create_dir_all(&point)?;
        let mut cmd = Command::new(&tools.mountd);
        cmd.arg(vm.path("vm.ckpt")).arg(&point);
        match mode {
            MountMode::Record(window) => {
                cmd.arg("--record-loading-set")
                    .arg("--loading-set-window")
                    .arg(window.to_string());
            }
            MountMode::Serve(o) => {
                match (o.loading_set, o.no_wait) {
                    (false, _) => cmd.arg("--no-loading-set"),
                    (true, false) => cmd.arg("--wait-loading-set"),
                    (true, true) => &mut cmd,
                };
                if let Some(kb) = o.readahead_kb {
                    cmd.arg("--readahead-kb").arg(kb.to_string());
                }
                if let Some(p) = o.prefetch {
                    cmd.arg("--prefetch").arg(p);
                }
                if let Some(b) = o.background_share {
                    cmd.arg("--background-share").arg(b.to_string());
                }
            }
        }
        run_status(&mut cmd)?;
        let pid = Self::stats_at(&point).ok().and_then(|v| v["pid"].as_u64());
        Ok(Mount { point, pid })
    }

    fn stats_at(point: &Path) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(point.join("stats"))?;
        Ok(serde_json::from_str(&text)?)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        Self::stats_at(&self.point)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.point)
            .status();
        // Wait for the daemon to exit: it writes the recorded loading set after
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
        for _ in 0..1500 {
            if self.pid.is_none_or(gone) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: ckptfs-mountd on {} did not exit within 30 s",
            self.point.display()
        );
    }
}

/// `vmm-lite restore` of `vm`'s disk, serving requests for `duration_s` seconds
/// with request seed `seed`.
fn restore_cmd(tools: &Tools, vm: &Vm, duration_s: f64, seed: u64) -> Command {
    let mut cmd = Command::new(&tools.vmm);
    cmd.arg("restore").arg("--disk").arg(vm.path("disk.img"));
    cmd.args(["--duration", &duration_s.to_string()]);
    cmd.args(["--request-seed", &seed.to_string()]);
    cmd
}

/// One restore to run.
pub struct Trial<'a> {
    /// How.
    pub method: Method,
    /// Repetition number.
    pub rep: usize,
    /// Request seed.
    pub seed: u64,
    /// Seconds the VM serves requests.
    pub duration_s: f64,
    /// Storage tier label.
    pub tier: &'a str,
    /// The blkio group the restore runs in (counts its reads).
    pub group: &'a crate::tier::Throttle,
}

/// Restore `vm` as `t` says and measure it.
pub fn restore(tools: &Tools, vm: &Vm, t: &Trial) -> Result<Measured> {
    let (method, rep, seed, duration_s, tier, group) =
        (t.method, t.rep, t.seed, t.duration_s, t.tier, t.group);
    if method == Method::Warm {
        // Make the raw dump resident in the page cache.
        std::fs::read(vm.path("mem.raw")).map(drop)?;
    } else {
        evict(&vm.files())?;
    }
    let timeline = vm.path("timeline.jsonl");
    let read_before = group.read_bytes();
    let start = Instant::now();
    let mut cmd = restore_cmd(tools, vm, duration_s, seed);
    cmd.arg("--timeline").arg(&timeline);
    let mut mount = None;
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
        Method::Ckptfs(o) => {
            let m = Mount::new(tools, vm, MountMode::Serve(o))?;
            cmd.arg("--mem-file")
                .arg(m.point.join("memory"))
                .arg("--state")
                .arg(m.point.join("vmm-state"));
            if o.zero_ranges {
                cmd.arg("--zero-ranges").arg(m.point.join("zero-ranges"));
            }
            mount = Some(m);
        }
    }
    let launched = start.elapsed().as_nanos() as u64;
    let report = run_json(&mut cmd)?;
    let stats = mount.as_ref().and_then(|m| m.stats().ok());
    let storage_bytes_before_unmount = group.read_bytes() - read_before;
    drop(mount);
    let mut times = read_timeline(&timeline, launched)?;
    times.sort_unstable();
    let ls = stats.as_ref().map(|s| &s["loading_set"]);
    let resident_ms = match method {
        Method::EagerRaw | Method::EagerOptimized => report["memory_ms"]
            .as_f64()
            .map(|m| m + launched as f64 / 1e6),
        Method::Warm => Some(0.0),
        _ => None,
    };
    let horizon = (duration_s * 1e9) as u64;
    Ok(Measured {
        workload: vm.workload.clone(),
        mib: vm.mib,
        tier: tier.to_owned(),
        method: method.label(),
        rep,
        seed,
        first_response_ms: times.first().map_or(f64::NAN, |&t| t as f64 / 1e6),
        count_at_horizon: times.iter().filter(|&&t| t <= horizon).count() as u64,
        times,
        resident_ms,
        storage_bytes: storage_bytes_before_unmount,
        check_ok: report["check"].as_str() == Some(vm.check.as_str()),
        loadset_bytes: ls
            .filter(|l| l["state"] == "done")
            .and_then(|l| l["read_bytes"].as_u64()),
        loadset_seconds: ls.and_then(|l| l["seconds"].as_f64()),
        ttr_ms: None,
        lag_ms: None,
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

/// The request seed of the recording restore (measured restores use 1, 2, ...).
pub const RECORD_SEED: u64 = 1_000_003;

/// What the recording wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadingSetInfo {
    /// Pages listed (stored and zero).
    pub pages: u64,
    /// Bytes of stored pages.
    pub data_bytes: u64,
    /// Runs.
    pub runs: u64,
    /// Recording window, seconds.
    pub window_seconds: f64,
    /// Pages a measured restore (seed 1) touched before its CHECK.
    pub measured_touched: u64,
    /// Fraction of those in the loading set.
    pub coverage: f64,
}

/// Record the loading set: one restore (seed [`RECORD_SEED`]) through a
/// recording mount whose window is `window_s`; the restore runs past the
/// window so that its final whole-memory CHECK stays out of the set.
pub fn record_loading_set(tools: &Tools, vm: &Vm, window_s: f64) -> Result<LoadingSetInfo> {
    let m = Mount::new(tools, vm, MountMode::Record(window_s))?;
    let mut cmd = restore_cmd(tools, vm, window_s + 0.5, RECORD_SEED);
    cmd.arg("--mem-file")
        .arg(m.point.join("memory"))
        .arg("--state")
        .arg(m.point.join("vmm-state"));
    run_json(&mut cmd)?;
    drop(m);
    let ck = ckptfs::Checkpoint::open(&vm.path("vm.ckpt"))?;
    let set = ckptfs::loadset::LoadingSet::open(&vm.path("vm.ckpt.ls"), &ck)
        .context("the recording mount wrote no usable loading set")?;
    Ok(LoadingSetInfo {
        pages: set.runs().iter().map(|r| u64::from(r.pages)).sum(),
        data_bytes: set.data_bytes(),
        runs: set.runs().len() as u64,
        window_seconds: window_s,
        measured_touched: 0,
        coverage: f64::NAN,
    })
}

/// How much of a restore's first-touch set the loading set covered: one
/// lazy restore of the raw dump with request seed `seed` lists the pages it
/// touched before its final CHECK (`--touched-out`); returns (touched pages,
/// fraction of them in the loading set).
pub fn coverage(tools: &Tools, vm: &Vm, seed: u64, duration_s: f64) -> Result<(u64, f64)> {
    let out = vm.path("touched.txt");
    let mut cmd = restore_cmd(tools, vm, duration_s, seed);
    cmd.arg("--mem-file")
        .arg(vm.path("mem.raw"))
        .arg("--state")
        .arg(vm.path("state.bin"))
        .arg("--touched-out")
        .arg(&out);
    run_json(&mut cmd)?;
    let ck = ckptfs::Checkpoint::open(&vm.path("vm.ckpt"))?;
    let pages = ck.page_count();
    let text = std::fs::read_to_string(&out)?;
    let touched = ckptfs::source::parse_zero_ranges(&text, pages)
        .with_context(|| format!("touched pages in {}", out.display()))?;
    let set = ckptfs::loadset::LoadingSet::open(&vm.path("vm.ckpt.ls"), &ck)?;
    let mut in_set = vec![false; pages as usize];
    for r in set.runs() {
        let end = r.first_page + u64::from(r.pages);
        in_set[r.first_page as usize..end as usize].fill(true);
    }
    let total: u64 = touched.iter().map(|r| r.end - r.start).sum();
    let covered: u64 = touched
        .iter()
        .flat_map(|r| r.clone())
        .filter(|&p| in_set[p as usize])
        .count() as u64;
    Ok((total, covered as f64 / total.max(1) as f64))
}

/// Fill in TTRs and work lags against the warm runs of the same tier: TTR
/// against the warm rate of the same repetition, lag against the median warm
/// count at the horizon.
pub fn score(results: &mut [Measured]) {
    let warm: Vec<(String, usize, f64, u64)> = results
        .iter()
        .filter(|m| m.method == "warm")
        .map(|m| {
            let rate = ttr::warm_rate(&m.times, ttr::WINDOW_NS);
            (m.tier.clone(), m.rep, rate, m.count_at_horizon)
        })
        .collect();
    for m in results.iter_mut() {
        let same_tier: Vec<&(String, usize, f64, u64)> =
            warm.iter().filter(|w| w.0 == m.tier).collect();
        if let Some(w) = same_tier.iter().find(|w| w.1 == m.rep) {
            m.ttr_ms =
                ttr::ttr(&m.times, w.2, ttr::WINDOW_NS, ttr::UTILIZATION).map(|t| t as f64 / 1e6);
        }
        let rate_per_ms = median(same_tier.iter().map(|w| w.2).collect())
            .map(|r| r / (ttr::WINDOW_NS as f64 / 1e6));
        let warm_count = median(same_tier.iter().map(|w| w.3 as f64).collect());
        if let (Some(rate), Some(count)) = (rate_per_ms, warm_count)
            && rate > 0.0
        {
            m.lag_ms = Some((count - m.count_at_horizon as f64) / rate);
        }
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

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_parse_back() {
        for m in Method::all() {
            assert_eq!(Method::parse(&m.label()).unwrap(), m);
        }
        let m = Method::parse("ckptfs-ls-ra4").unwrap();
        assert_eq!(m.label(), "ckptfs-ls-ra4");
        let m = Method::parse("ckptfs-ls-nowait").unwrap();
        assert_eq!(m.label(), "ckptfs-ls-nowait");
        let m = Method::parse("ckptfs-ls-ra16-pnone").unwrap();
        assert_eq!(m.label(), "ckptfs-ls-ra16-pnone");
        assert!(Method::parse("ckptfs-fast").is_err());
        assert!(Method::parse("lazy").is_err());
    }
}
