//! Many VMs on one host: the binaries, ckptfs mounts that clean up after
//! themselves, VMs booted from one shared disk image, and `vmm-lite restore`
//! processes run side by side (`bench clones`, `bench storm`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// The binaries beside this one.
pub struct Bins {
    /// vmm-lite.
    pub vmm: PathBuf,
    /// ckptfs-mountd.
    pub mountd: PathBuf,
    /// The ckptfs CLI.
    pub ckptfs: PathBuf,
}

impl Bins {
    /// Finds them (cargo puts a workspace's binaries in one folder).
    pub fn find() -> Result<Self> {
        let dir = std::env::current_exe()?
            .parent()
            .context("bench has no folder")?
            .to_owned();
        let bins = Bins {
            vmm: dir.join("vmm-lite"),
            mountd: dir.join("ckptfs-mountd"),
            ckptfs: dir.join("ckptfs"),
        };
        for p in [&bins.vmm, &bins.mountd, &bins.ckptfs] {
            ensure!(
                p.exists(),
                "{} is not built; run `cargo build --release --workspace`",
                p.display()
            );
        }
        Ok(bins)
    }

    /// A `vmm-lite` command whose stderr goes to ours.
    pub fn vmm(&self) -> Command {
        let mut c = Command::new(&self.vmm);
        c.stderr(Stdio::inherit());
        c
    }
}

/// Runs `cmd` and parses the last JSON line of its stdout.
pub fn run_json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed ({})", out.status);
    last_json(&String::from_utf8_lossy(&out.stdout))
}

/// The last line of `text` that is a JSON object, parsed.
pub fn last_json(text: &str) -> Result<serde_json::Value> {
    let last = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON report")?;
    Ok(serde_json::from_str(last)?)
}

/// One checkpointed VM of a fleet: every VM shares the fleet's disk image.
#[derive(Clone, Debug)]
pub struct FleetVm {
    /// Its index (the guest seed is index + 1).
    pub index: usize,
    /// Checkpoint.
    pub ckpt: PathBuf,
    /// Raw memory dump.
    pub raw: PathBuf,
    /// VMM state.
    pub state: PathBuf,
    /// The shared disk image.
    pub disk: PathBuf,
    /// Guest MiB.
    pub mib: u64,
    /// CHECK at checkpoint time.
    pub check: String,
}

impl FleetVm {
    /// Every file a restore of it reads.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut ls = self.ckpt.clone().into_os_string();
        ls.push(".ls");
        vec![
            self.ckpt.clone(),
            ls.into(),
            self.raw.clone(),
            self.state.clone(),
            self.disk.clone(),
        ]
    }
}

/// Makes `dir/disk.img` (once) and boots `count` VMs of `mib` MiB on it, each with its own
/// guest seed, warmed up and checkpointed (ckptfs checkpoint, raw dump, state).
pub fn boot(
    bins: &Bins,
    dir: &Path,
    workload: &str,
    mib: u64,
    count: usize,
) -> Result<Vec<FleetVm>> {
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("disk.img");
    if !disk.exists() {
        let st = Command::new(&bins.vmm)
            .arg("mkdisk")
            .arg(&disk)
            .args(["--size", &format!("{}M", mib.max(64))])
            .stdout(Stdio::null())
            .status()?;
        ensure!(st.success(), "mkdisk failed");
    }
    (0..count)
        .map(|i| {
            eprintln!("bench: booting {workload} VM {i} ({mib} MiB), warming up, checkpointing");
            let vm = FleetVm {
                index: i,
                ckpt: dir.join(format!("vm{i}.ckpt")),
                raw: dir.join(format!("mem{i}.raw")),
                state: dir.join(format!("state{i}.bin")),
                disk: disk.clone(),
                mib,
                check: String::new(),
            };
            let report = run_json(
                Command::new(&bins.vmm)
                    .args(["run", "--mem", &format!("{mib}M"), "--workload", workload])
                    .args(["--seed", &(i + 1).to_string(), "--checkpoint-after", "1"])
                    .arg("--disk")
                    .arg(&disk)
                    .arg("-o")
                    .arg(&vm.ckpt)
                    .arg("--raw-out")
                    .arg(&vm.raw)
                    .arg("--state-out")
                    .arg(&vm.state),
            )?;
            let check = report["check"]
                .as_str()
                .context("run report has no check")?;
            Ok(FleetVm {
                check: check.to_owned(),
                ..vm
            })
        })
        .collect()
}

/// A detached ckptfs mount; unmounted, and its daemon waited for, on drop.
pub struct Mount {
    /// Mount point.
    pub point: PathBuf,
    /// The daemon's pid.
    pub pid: u32,
}

impl Mount {
    /// Mounts `ckpt` on `point` with `args` (returns once the daemon is ready, i.e. with
    /// `--wait-loading-set` once the loading set is in).
    pub fn new(bins: &Bins, ckpt: &Path, point: &Path, args: &[String]) -> Result<Self> {
        std::fs::create_dir_all(point)?;
        let st = Command::new(&bins.mountd)
            .arg(ckpt)
            .arg(point)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .context("running ckptfs-mountd")?;
        ensure!(
            st.success(),
            "ckptfs-mountd {} failed ({st})",
            ckpt.display()
        );
        let stats = Self::stats_at(point)?;
        Ok(Mount {
            point: point.to_owned(),
            pid: stats["pid"].as_u64().context("stats without pid")? as u32,
        })
    }

    fn stats_at(point: &Path) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            point.join("stats"),
        )?)?)
    }

    /// The daemon's live stats.
    pub fn stats(&self) -> Result<serde_json::Value> {
        Self::stats_at(&self.point)
    }

    /// The mount's `memory`.
    pub fn memory(&self) -> PathBuf {
        self.point.join("memory")
    }
}

/// Whether process `pid` has exited (gone, or a zombie).
pub fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.point)
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if exited(self.pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: ckptfs-mountd {} did not exit", self.pid);
    }
}

/// How a VMM gets its memory.
#[derive(Clone, Debug)]
pub enum Memory {
    /// Copy the raw dump first (`--eager`).
    Eager(PathBuf),
    /// Map this file MAP_PRIVATE (a raw dump or a mount's `memory`).
    Map(PathBuf),
}

/// One `vmm-lite restore` to start.
#[derive(Clone, Debug)]
pub struct Restore {
    /// Memory.
    pub memory: Memory,
    /// State file.
    pub state: PathBuf,
    /// Disk image.
    pub disk: PathBuf,
    /// Seconds of requests.
    pub duration_s: f64,
    /// Request seed.
    pub seed: u64,
    /// Share of RAM the guest writes first, percent.
    pub dirty_pct: f64,
    /// A mount's zero-ranges file, mapped anonymous.
    pub zero_ranges: Option<PathBuf>,
    /// Timeline file.
    pub timeline: PathBuf,
}

impl Restore {
    /// The command.
    pub fn command(&self, bins: &Bins) -> Command {
        let mut cmd = Command::new(&bins.vmm);
        cmd.arg("restore").arg("--disk").arg(&self.disk);
        match &self.memory {
            Memory::Eager(p) => cmd.arg("--mem-file").arg(p).arg("--eager"),
            Memory::Map(p) => cmd.arg("--mem-file").arg(p),
        };
        cmd.arg("--state").arg(&self.state);
        cmd.args(["--duration", &self.duration_s.to_string()])
            .args(["--request-seed", &self.seed.to_string()])
            .args(["--dirty-pct", &self.dirty_pct.to_string()])
            .arg("--timeline")
            .arg(&self.timeline);
        if let Some(z) = &self.zero_ranges {
            cmd.arg("--zero-ranges").arg(z);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        cmd
    }

    /// Starts it.
    pub fn spawn(&self, bins: &Bins) -> Result<Child> {
        self.command(bins).spawn().context("starting vmm-lite")
    }
}

/// Waits for a VMM started by [`Restore::spawn`] and returns its report.
pub fn finish(child: Child) -> Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "vmm-lite restore failed ({})",
        out.status
    );
    last_json(&String::from_utf8_lossy(&out.stdout))
}

/// Request completion times of a timeline (kind "work"), ns, shifted by `offset`, sorted.
pub fn timeline(path: &Path, offset: u64) -> Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("timeline {}", path.display()))?;
    let mut times = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["kind"] == "work" {
            times.push(v["t_ns"].as_u64().context("timeline entry without t_ns")? + offset);
        }
    }
    if times.is_empty() {
        bail!("timeline {} has no completed requests", path.display());
    }
    times.sort_unstable();
    Ok(times)
}

/// "median [min-max]" of the finite values of `v`, with `digits` decimals.
pub fn stat(v: &[f64], digits: usize) -> String {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let Some(m) = crate::restore::median(v.clone()) else {
        return "-".into();
    };
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 {
        return format!("{m:.digits$}");
    }
    format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_gives_median_and_range() {
        assert_eq!(stat(&[3.0, 1.0, 2.0], 0), "2 [1-3]");
        assert_eq!(stat(&[1.25], 1), "1.2");
        assert_eq!(stat(&[f64::NAN], 0), "-");
    }

    #[test]
    fn the_last_json_line_is_the_report() {
        let v = last_json("log\n{\"a\":1}\nnoise\n{\"check\":\"ab\"}\n").unwrap();
        assert_eq!(v["check"], "ab");
        assert!(last_json("nothing").is_err());
    }
}
