//! `bench big`: one large guest (16 GiB by default) through the whole pipeline on this
//! host: boot and checkpoint (vmm-lite, I/O tracking), `ckptfs create` from the raw dump
//! (content scan), `ckptfs verify`, `ckptfs inspect`, then a cold lazy restore from a
//! ckptfs mount with its CHECK, beside a lazy restore of the raw dump (and an eager one
//! when the host has the memory for it). For every step: wall time and peak RSS (the
//! kernel's `ru_maxrss` of the child, exact); for the restores also the VMM's anonymous
//! and file pages over time and the daemon's peak RSS (`VmHWM`, read before unmount),
//! which must stay bounded by `--cache-mb` plus a small per-GiB overhead. A smaller guest
//! is run the same way first, so the per-GiB overhead is a measured slope, not a guess.

use std::io::{Read, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::fleet::{self, Bins, Mount};
use crate::restore::evict;

const MIB: f64 = 1048576.0;

/// What to run.
pub struct Plan {
    /// Guest sizes, GiB (the largest is the one the issue asks about).
    pub sizes_gib: Vec<u64>,
    /// Guest workload.
    pub workload: String,
    /// The daemon's `--cache-mb`.
    pub cache_mb: u64,
    /// Seconds each restored VM serves requests before its CHECK.
    pub duration: f64,
}

/// Wall time and peak memory of one child process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Step {
    /// Wall time, ms.
    pub ms: f64,
    /// Peak resident set (`ru_maxrss`), bytes: anonymous pages and mapped file pages.
    pub peak_rss: u64,
    /// Peak anonymous bytes (sampled every 100 ms): what the process itself allocated.
    #[serde(default)]
    pub peak_anon: u64,
    /// Peak mapped file bytes (sampled): page cache it maps, shared, evictable.
    #[serde(default)]
    pub peak_file: u64,
}

/// One restore of the large guest.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreRun {
    /// Method label.
    pub method: String,
    /// Mount time (ckptfs), ms.
    pub mount_ms: f64,
    /// From the start (mount included) to the first response, ms.
    pub first_response_ms: f64,
    /// From the start to the VMM's exit (requests, then a CHECK over all of RAM), ms.
    pub total_ms: f64,
    /// Requests served.
    pub requests: u64,
    /// The VMM's peak RSS, and of it the peak anonymous and file-backed parts.
    pub vmm: Step,
    /// The daemon's peak RSS (ckptfs).
    pub daemon_peak_rss: u64,
    /// Bytes the daemon rebuilt from disk images and stored pages (ckptfs stats).
    pub daemon_read_bytes: u64,
    /// The final CHECK equals the checkpoint's.
    pub check_ok: bool,
    /// (seconds, VMM anon MiB, VMM file MiB, daemon MiB) every 100 ms.
    pub series: Vec<Sample>,
}

/// Everything measured for one guest size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SizeRun {
    /// Guest GiB.
    pub gib: u64,
    /// Disk image GiB.
    pub disk_gib: u64,
    /// `vmm-lite run`: boot, warm-up, checkpoint (library create from I/O hints), raw dump.
    pub run: Step,
    /// Its report's boot time, ms.
    pub boot_ms: f64,
    /// Its report's time to write every output (checkpoint, raw dump, state), ms.
    pub save_ms: f64,
    /// `ckptfs create` from the raw dump and the disk (content scan).
    pub create: Step,
    /// `ckptfs verify` of the checkpoint against the raw dump.
    pub verify: Step,
    /// Checkpoint bytes (vmm-lite's) and the content scan's.
    pub ckpt_bytes: u64,
    /// The content scan's checkpoint bytes.
    pub scan_ckpt_bytes: u64,
    /// Page-table bytes in the checkpoint.
    pub table_bytes: u64,
    /// Pages by kind, from `ckptfs inspect --json`.
    pub pages: serde_json::Value,
    /// The restores.
    pub restores: Vec<RestoreRun>,
}

/// Runs `cmd` to completion; its stdout, and its wall time and `ru_maxrss`.
fn measured(cmd: &mut Command) -> Result<(String, Step)> {
    let (stdout, step, _) = sampled(cmd, None)?;
    Ok((stdout, step))
}

/// Runs `cmd` to completion, sampling its memory (and `daemon`'s RSS) every 100 ms: its
/// stdout, its wall time and peaks, and the samples.
fn sampled(cmd: &mut Command, daemon: Option<u32>) -> Result<(String, Step, Vec<Sample>)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let sampler = Sampler::start(pid, daemon);
    let mut out = child.stdout.take().context("no stdout")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let (status, rss) = wait4(pid)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    // The child was reaped by wait4: std must not wait for it again.
    std::mem::forget(child);
    let series = sampler.finish();
    let stdout = reader.join().expect("reader thread")?;
    ensure!(
        status.success(),
        "{cmd:?} failed ({status}): {}",
        stdout.lines().last().unwrap_or("")
    );
    let step = Step {
        ms,
        peak_rss: rss,
        peak_anon: peak_of(&series, |s| s.1),
        peak_file: peak_of(&series, |s| s.2),
    };
    Ok((stdout, step, series))
}

/// (seconds, anonymous MiB, mapped file MiB, daemon RSS MiB).
type Sample = (f64, f64, f64, f64);

/// Peak of one column of a sampler's series, bytes.
fn peak_of(series: &[Sample], f: fn(&Sample) -> f64) -> u64 {
    (series.iter().map(f).fold(0.0, f64::max) * MIB) as u64
}

/// Reaps `pid`: its exit status and peak RSS in bytes.
fn wait4(pid: u32) -> Result<(std::process::ExitStatus, u64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: plain syscall on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
        if r == pid as i32 {
            break;
        }
        let e = std::io::Error::last_os_error();
        ensure!(e.kind() == std::io::ErrorKind::Interrupted, "wait4: {e}");
    }
    Ok((
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss as u64 * 1024,
    ))
}

/// A `/proc/PID/status` field in bytes (0 when absent or the process is gone).
fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| crate::procmem::parse_fields(&s).get(key).copied())
        .unwrap_or(0)
}

/// Samples the VMM's anonymous and file pages and the daemon's RSS every 100 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(vmm: u32, daemon: Option<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let t0 = Instant::now();
            let mut series = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let d = daemon.map_or(0, |p| status_field(p, "VmRSS"));
                series.push((
                    t0.elapsed().as_secs_f64(),
                    status_field(vmm, "RssAnon") as f64 / MIB,
                    status_field(vmm, "RssFile") as f64 / MIB,
                    d as f64 / MIB,
                ));
                thread::sleep(Duration::from_millis(100));
            }
            series
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler thread")
    }
}

/// The JSON a command printed: all of its stdout (`ckptfs inspect --json` prints a
/// pretty document), else its last line that is an object (vmm-lite's reports).
fn json_of(stdout: &str) -> Result<serde_json::Value> {
    serde_json::from_str(stdout).or_else(|_| fleet::last_json(stdout))
}

fn gib_arg(gib: u64) -> String {
    format!("{}M", gib << 10)
}

/// The bytes this host could give a new process without swapping (MemAvailable).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            crate::procmem::parse_fields(&s)
                .get("MemAvailable")
                .copied()
        })
        .unwrap_or(0)
}

/// Boot, checkpoint, create, verify and inspect a guest of `gib` GiB in `dir`.
fn prepare(bins: &Bins, plan: &Plan, dir: &Path, gib: u64) -> Result<(SizeRun, String)> {
    std::fs::create_dir_all(dir)?;
    // A third of RAM is page cache and a third computed data (`mixed`): with the disk at a
    // third of RAM, the two run past the APIC page and past 4 GiB in any guest over 6 GiB.
    let disk_gib = gib.div_ceil(3);
    let disk = dir.join("disk.img");
    let raw = dir.join("mem.raw");
    let ckpt = dir.join("vm.ckpt");
    let state = dir.join("state.bin");
    eprintln!("bench big: {gib} GiB guest: making a {disk_gib} GiB disk");
    measured(
        Command::new(&bins.vmm)
            .arg("mkdisk")
            .arg(&disk)
            .args(["--size", &gib_arg(disk_gib)]),
    )?;
    eprintln!(
        "bench big: {gib} GiB guest: booting ({}), checkpointing",
        plan.workload
    );
    let (out, run) = measured(
        Command::new(&bins.vmm)
            .args(["run", "--mem", &gib_arg(gib), "--workload", &plan.workload])
            .args(["--checkpoint-after", "1", "--disk"])
            .arg(&disk)
            .arg("-o")
            .arg(&ckpt)
            .arg("--raw-out")
            .arg(&raw)
            .arg("--state-out")
            .arg(&state),
    )?;
    let report = json_of(&out)?;
    let check = report["check"]
        .as_str()
        .context("run report without check")?
        .to_owned();
    eprintln!("bench big: {gib} GiB guest: ckptfs create (content scan of the raw dump)");
    let scan = dir.join("scan.ckpt");
    let (_, create) = measured(
        Command::new(&bins.ckptfs)
            .args(["create", "--json", "--mem"])
            .arg(&raw)
            .arg("--disk")
            .arg(&disk)
            .arg("--state")
            .arg(&state)
            .arg("-o")
            .arg(&scan),
    )?;
    let scan_ckpt_bytes = std::fs::metadata(&scan)?.len();
    std::fs::remove_file(&scan)?;
    eprintln!("bench big: {gib} GiB guest: ckptfs verify");
    evict(&[ckpt.clone(), raw.clone(), disk.clone()])?;
    let (_, verify) = measured(
        Command::new(&bins.ckptfs)
            .args(["verify", "--json", "--mem"])
            .arg(&raw)
            .arg(&ckpt),
    )?;
    let (out, _) = measured(
        Command::new(&bins.ckptfs)
            .args(["inspect", "--json"])
            .arg(&ckpt),
    )?;
    let inspect = json_of(&out)?;
    let page_count = inspect["pages"].as_u64().context("inspect without pages")?;
    let table_bytes = page_count * ckptfs::format::ENTRY_LEN as u64;
    let pages = serde_json::json!({
        "zero": inspect["zero_pages"],
        "disk": inspect["disk_pages"],
        "stored": inspect["blob_pages"],
        "distinct_stored": inspect["blobs_stored"],
    });
    Ok((
        SizeRun {
            gib,
            disk_gib,
            run,
            boot_ms: report["boot_ms"].as_f64().unwrap_or(f64::NAN),
            save_ms: report["save_ms"].as_f64().unwrap_or(f64::NAN),
            create,
            verify,
            ckpt_bytes: std::fs::metadata(&ckpt)?.len(),
            scan_ckpt_bytes,
            table_bytes,
            pages,
            restores: Vec::new(),
        },
        check,
    ))
}

/// One cold restore of the guest in `dir` by `method` (ckptfs, lazy-raw, eager-raw).
fn restore(bins: &Bins, plan: &Plan, dir: &Path, check: &str, method: &str) -> Result<RestoreRun> {
    let (raw, ckpt, state, disk) = (
        dir.join("mem.raw"),
        dir.join("vm.ckpt"),
        dir.join("state.bin"),
        dir.join("disk.img"),
    );
    evict(&[ckpt.clone(), raw.clone(), disk.clone(), state.clone()])?;
    eprintln!("bench big: restoring ({method})");
    let t0 = Instant::now();
    let mut mount = None;
    let (memory, state, zero) = match method {
        "ckptfs" => {
            let args: Vec<String> = vec![
                "--no-loading-set".into(),
                "--cache-mb".into(),
                plan.cache_mb.to_string(),
            ];
            let m = Mount::new(bins, &ckpt, &dir.join("mnt"), &args)?;
            let r = (
                fleet::Memory::Map(m.memory()),
                m.point.join("vmm-state"),
                Some(m.point.join("zero-ranges")),
            );
            mount = Some(m);
            r
        }
        "lazy-raw" => (fleet::Memory::Map(raw), state, None),
        "eager-raw" => (fleet::Memory::Eager(raw), state, None),
        other => anyhow::bail!("bench big: unknown method {other}"),
    };
    let mount_ms = t0.elapsed().as_secs_f64() * 1e3;
    let r = fleet::Restore {
        memory,
        state,
        disk,
        duration_s: plan.duration,
        seed: 7,
        dirty_pct: 0.0,
        zero_ranges: zero,
        timeline: dir.join(format!("timeline-{method}.jsonl")),
    };
    let launched = t0.elapsed().as_nanos() as u64;
    let (stdout, vmm, series) = sampled(&mut r.command(bins), mount.as_ref().map(|m| m.pid))?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let report = json_of(&stdout)?;
    let (daemon_peak_rss, daemon_read_bytes) = match &mount {
        Some(m) => (status_field(m.pid, "VmHWM"), {
            let st = m.stats()?;
            let by = &st["bytes_by_source"];
            by["disk"].as_u64().unwrap_or(0) + by["blob"].as_u64().unwrap_or(0)
        }),
        None => (0, 0),
    };
    drop(mount);
    let times = fleet::timeline(&r.timeline, launched)?;
    Ok(RestoreRun {
        method: method.into(),
        mount_ms: if method == "ckptfs" { mount_ms } else { 0.0 },
        first_response_ms: times[0] as f64 / 1e6,
        total_ms,
        requests: times.len() as u64,
        vmm,
        daemon_peak_rss,
        daemon_read_bytes,
        check_ok: report["check"].as_str() == Some(check),
        series,
    })
}

/// Runs the plan in `dir`, writing big.jsonl, big.md and big.png to `out`.
pub fn run(plan: &Plan, dir: &Path, out: &Path) -> Result<()> {
    let bins = Bins::find()?;
    std::fs::create_dir_all(out)?;
    let jsonl = out.join("big.jsonl");
    let _ = std::fs::remove_file(&jsonl);
    let mut runs = Vec::new();
    for &gib in &plan.sizes_gib {
        let d = dir.join(format!("g{gib}"));
        let (mut size, check) = prepare(&bins, plan, &d, gib)?;
        let mut methods = vec!["ckptfs", "lazy-raw"];
        // An eager restore holds all of guest RAM as anonymous memory, with the dump's
        // page cache beside it: only when the host has the room.
        let need = (gib << 30) + (gib << 30) / 4;
        if mem_available() > need {
            methods.push("eager-raw");
        } else {
            eprintln!(
                "bench big: {gib} GiB: no eager-raw restore (MemAvailable {} MiB < {} MiB)",
                mem_available() >> 20,
                need >> 20
            );
        }
        for m in methods {
            size.restores.push(restore(&bins, plan, &d, &check, m)?);
        }
        for r in &size.restores {
            ensure!(
                r.check_ok,
                "{gib} GiB {}: wrong CHECK after restore",
                r.method
            );
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl)?;
        writeln!(f, "{}", serde_json::to_string(&size)?)?;
        println!("{}", serde_json::to_string(&summary(&size))?);
        runs.push(size);
        std::fs::remove_dir_all(&d)?;
    }
    render_runs(plan, &runs, out)
}

/// The one-line JSON summary of a size (what `--json` users want, without the series).
fn summary(s: &SizeRun) -> serde_json::Value {
    let restores: Vec<serde_json::Value> = s
        .restores
        .iter()
        .map(|r| {
            serde_json::json!({
                "method": r.method,
                "first_response_ms": r.first_response_ms,
                "total_ms": r.total_ms,
                "vmm_peak_rss": r.vmm.peak_rss,
                "daemon_peak_rss": r.daemon_peak_rss,
                "check_ok": r.check_ok,
            })
        })
        .collect();
    serde_json::json!({
        "gib": s.gib,
        "create_ms": s.create.ms,
        "create_peak_rss": s.create.peak_rss,
        "verify_ms": s.verify.ms,
        "table_bytes": s.table_bytes,
        "restores": restores,
    })
}

/// Rewrites big.md and big.png from an earlier run's big.jsonl.
pub fn render(plan: &Plan, jsonl: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(jsonl).with_context(|| format!("{}", jsonl.display()))?;
    let runs = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<Vec<SizeRun>, _>>()?;
    render_runs(plan, &runs, out)
}

fn render_runs(plan: &Plan, runs: &[SizeRun], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let md = report(plan, runs);
    std::fs::write(out.join("big.md"), &md)?;
    eprint!("{md}");
    if let Some(big) = runs.iter().max_by_key(|r| r.gib) {
        plot(&out.join("big.png"), plan, big)?;
    }
    Ok(())
}

fn rss(s: &Step) -> String {
    format!(
        "{} MiB ({} / {})",
        mib(s.peak_rss),
        mib(s.peak_anon),
        mib(s.peak_file)
    )
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / MIB)
}

/// Per GiB of guest: the slope of `f` between the smallest and the largest size.
fn slope(runs: &[SizeRun], f: impl Fn(&SizeRun) -> Option<u64>) -> Option<f64> {
    let lo = runs.iter().min_by_key(|r| r.gib)?;
    let hi = runs.iter().max_by_key(|r| r.gib)?;
    if hi.gib == lo.gib {
        return None;
    }
    Some((f(hi)? as f64 - f(lo)? as f64) / MIB / (hi.gib - lo.gib) as f64)
}

fn ckptfs_restore(r: &SizeRun) -> Option<&RestoreRun> {
    r.restores.iter().find(|x| x.method == "ckptfs")
}

fn report(plan: &Plan, runs: &[SizeRun]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Workload {}, daemon --cache-mb {}, each restore serves READs for {} s, then a CHECK over all of RAM.\n",
        plan.workload, plan.cache_mb, plan.duration
    );
    let _ = writeln!(
        s,
        "| guest | disk | boot + checkpoint (vmm-lite run) | its save | run peak RSS (anon / file) | ckptfs create (scan) | create peak RSS (anon / file) | verify | verify peak RSS (anon / file) | checkpoint | scan's | page table |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        let _ = writeln!(
            s,
            "| {} GiB | {} GiB | {:.1} s (boot {:.1} s) | {:.1} s | {} | {:.1} s | {} | {:.1} s | {} | {} MiB | {} MiB | {:.1} MiB |",
            r.gib,
            r.disk_gib,
            r.run.ms / 1e3,
            r.boot_ms / 1e3,
            r.save_ms / 1e3,
            rss(&r.run),
            r.create.ms / 1e3,
            rss(&r.create),
            r.verify.ms / 1e3,
            rss(&r.verify),
            mib(r.ckpt_bytes),
            mib(r.scan_ckpt_bytes),
            r.table_bytes as f64 / MIB,
        );
    }
    let _ = writeln!(
        s,
        "\n| guest | method | mount | first response | requests, then CHECK: exit | VMM peak RSS | of it anon / file (sampled) | daemon peak RSS | CHECK |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for r in runs {
        for x in &r.restores {
            let _ = writeln!(
                s,
                "| {} GiB | {} | {} | {:.0} ms | {:.1} s | {} MiB | {} / {} MiB | {} | {} |",
                r.gib,
                x.method,
                if x.method == "ckptfs" {
                    format!("{:.0} ms", x.mount_ms)
                } else {
                    "-".into()
                },
                x.first_response_ms,
                x.total_ms / 1e3,
                mib(x.vmm.peak_rss),
                mib(x.vmm.peak_anon),
                mib(x.vmm.peak_file),
                if x.method == "ckptfs" {
                    format!("{} MiB", mib(x.daemon_peak_rss))
                } else {
                    "-".into()
                },
                if x.check_ok { "right" } else { "WRONG" },
            );
        }
    }
    if let Some(k) = slope(runs, |r| ckptfs_restore(r).map(|x| x.daemon_peak_rss)) {
        let _ = writeln!(
            s,
            "\nDaemon peak RSS per GiB of guest (slope between the sizes): {k:.2} MiB/GiB; page table per GiB: {:.2} MiB/GiB.",
            slope(runs, |r| Some(r.table_bytes)).unwrap_or(f64::NAN)
        );
    }
    if let Some(k) = slope(runs, |r| Some(r.create.peak_anon)) {
        let _ = writeln!(
            s,
            "`ckptfs create` peak anonymous memory per GiB of guest: {k:.2} MiB/GiB."
        );
    }
    s
}

fn plot(out: &Path, plan: &Plan, r: &SizeRun) -> Result<()> {
    let Some(x) = ckptfs_restore(r) else {
        return Ok(());
    };
    let pick = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        x.series.iter().map(|p| (p.0, f(p))).collect()
    };
    crate::plot::lines(
        out,
        &format!(
            "{} GiB guest restored from a ckptfs mount (cache-mb {})",
            r.gib, plan.cache_mb
        ),
        ("seconds since vmm-lite started", "MiB"),
        &[
            ("VMM anonymous".into(), pick(|p| p.1)),
            ("VMM file-backed (memory, page cache)".into(), pick(|p| p.2)),
            ("daemon RSS".into(), pick(|p| p.3)),
        ],
    )
}

/// The sizes `bench big` runs by default.
pub fn default_sizes(quick: bool) -> Vec<u64> {
    if quick { vec![1, 6] } else { vec![1, 16] }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(gib: u64, daemon: u64, table: u64) -> SizeRun {
        SizeRun {
            gib,
            table_bytes: table,
            restores: vec![RestoreRun {
                method: "ckptfs".into(),
                daemon_peak_rss: daemon,
                ..RestoreRun::default()
            }],
            ..SizeRun::default()
        }
    }

    #[test]
    fn the_per_gib_slope_is_between_the_smallest_and_largest_guest() {
        let runs = [size(16, 62 << 20, 48 << 20), size(1, 10 << 20, 3 << 20)];
        let k = slope(&runs, |r| ckptfs_restore(r).map(|x| x.daemon_peak_rss)).unwrap();
        assert!((k - 52.0 / 15.0).abs() < 1e-9, "{k}");
        assert_eq!(slope(&runs, |r| Some(r.table_bytes)), Some(3.0));
        assert_eq!(slope(&runs[..1], |r| Some(r.table_bytes)), None);
    }

    #[test]
    fn reports_are_read_whole_or_from_their_last_object_line() {
        let pretty = "{\n  \"pages\": 4\n}\n";
        assert_eq!(json_of(pretty).unwrap()["pages"], 4);
        let lines = "guest: booted\n{\"check\":\"0x1\"}\n";
        assert_eq!(json_of(lines).unwrap()["check"], "0x1");
        assert!(json_of("no json here\n").is_err());
    }
}
