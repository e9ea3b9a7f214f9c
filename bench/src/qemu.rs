//! `bench qemu`: restoring a real Linux guest under QEMU TCG, four ways.
//!
//! Debian's kernel boots with a busybox initramfs (the harness of
//! `tests/qemu_linux.rs`, included below) and 1 GiB of RAM in a shared file.
//! Its workload: 48 files of 8 MiB read from its ext4 disk into the page
//! cache, and `heapwalk` (bench/guest/heapwalk.rs, a static binary on the
//! disk) holding a 256 MiB heap of linked pseudo-random nodes, 64 MiB of them
//! hot. The task hashes 8 of the cached files (64 MiB) with md5sum and walks
//! the hot heap once; the first answer is `echo`.
//!
//! The guest is checkpointed once, paused: QEMU's own migration stream with
//! RAM (for eager), then `ckptfs qemu save` (the device state with
//! x-ignore-shared, and the checkpoint; the RAM file is lazy-raw's dump).
//! Two recording restores through `ckptfs qemu restore --record-loading-set`
//! run the task on a different file set (files 0-7 instead of 1-8) and heap
//! seed: one keeps the set as the mount records it (whole 2 MiB windows, as
//! QEMU faults), one with `--refine-loading-set` (only the pages QEMU
//! mapped). Then every method restores from a cold host page cache:
//! - eager: `-incoming` of QEMU's stream (`exec:cat`), what `virsh restore` does;
//! - lazy-raw: mem-path on the raw RAM file, share=off, device state migrated in;
//! - ckptfs / ckptfs-ls: `ckptfs qemu restore --exec` without / with the loading set
//!   (QEMU 7.2: the set is pushed while QEMU runs, see src/qemu/restore.rs);
//! - ckptfs-ls-refined: with the refined loading set;
//! - ckptfs-ls-wait, ckptfs-ls-refined-wait: `--wait-loading-set`, which on
//!   QEMU 7.2 waits for the set once QEMU has mapped `memory` and reads again
//!   what the mapping dropped, before the VM resumes;
//! - ckptfs-ls-demand: with the loading set, `--prefetch none` (no background
//!   sweep of the rest competing with demand reads for the storage);
//! - warm: lazy-raw with the RAM file in the page cache: the guest-CPU floor.
//!
//! Times are from the restore command's start (mount and QEMU start included)
//! to the first answer and to the task's end; bytes read are those of the
//! restore's processes (its blkio group). "Cold" evicts this benchmark's own
//! files from the page cache (posix_fadvise DONTNEED), as `bench restore` does.

#[allow(dead_code)]
#[path = "../../tests/qemu/initramfs.rs"]
mod initramfs;
#[allow(dead_code)]
#[path = "../../tests/qemu/vm.rs"]
mod vm;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use plotters::prelude::*;

use crate::restore::{evict, median};
use crate::tier::{Throttle, Tier};
use initramfs::GuestMount;
use vm::{Machine, Qemu};

const GUEST_MIB: u64 = 1024;
const FILES: usize = 48;
const FILE_MIB: usize = 8;
const HEAP_MIB: u64 = 256;
const HOT_MIB: u64 = 64;
/// The measured task hashes files 1..=8; the recording hashes 0..=7.
const TASK_FILES: std::ops::Range<usize> = 1..9;
const RECORD_FILES: std::ops::Range<usize> = 0..8;
const TASK_SEED: u64 = 7;
const RECORD_SEED: u64 = 1_000_003;
const DISK: GuestMount = GuestMount {
    dev: "vda",
    dir: "/mnt/d",
};
/// TCG on two shared cores: generous.
const SLOW: Duration = Duration::from_secs(600);

/// A way to restore the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// QEMU's migration stream with RAM.
    Eager,
    /// mem-path on the raw RAM file, share=off.
    LazyRaw,
    /// ckptfs qemu restore, no loading set.
    Ckptfs,
    /// ckptfs qemu restore with the loading set.
    CkptfsLs,
    /// ckptfs qemu restore with the loading set refined to the pages QEMU mapped.
    CkptfsLsRefined,
    /// The loading set waited for once QEMU has mapped `memory` (`--wait-loading-set`).
    CkptfsLsWait,
    /// The refined loading set, waited for.
    CkptfsLsRefinedWait,
    /// ckptfs qemu restore with the loading set and no background sweep
    /// (`--prefetch none`: only demand reads and the loading set use the storage).
    CkptfsLsDemand,
    /// lazy-raw with the RAM file cached.
    Warm,
}

impl Method {
    /// Every method, baselines first.
    pub const ALL: [Method; 9] = [
        Method::Eager,
        Method::LazyRaw,
        Method::Ckptfs,
        Method::CkptfsLs,
        Method::CkptfsLsRefined,
        Method::CkptfsLsWait,
        Method::CkptfsLsRefinedWait,
        Method::CkptfsLsDemand,
        Method::Warm,
    ];

    /// Label in tables.
    pub fn label(self) -> &'static str {
        match self {
            Method::Eager => "eager",
            Method::LazyRaw => "lazy-raw",
            Method::Ckptfs => "ckptfs",
            Method::CkptfsLs => "ckptfs-ls",
            Method::CkptfsLsRefined => "ckptfs-ls-refined",
            Method::CkptfsLsWait => "ckptfs-ls-wait",
            Method::CkptfsLsRefinedWait => "ckptfs-ls-refined-wait",
            Method::CkptfsLsDemand => "ckptfs-ls-demand",
            Method::Warm => "warm",
        }
    }

    /// The method labelled `s`.
    pub fn parse(s: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.label() == s)
            .with_context(|| {
                format!("unknown method {s:?} (eager, lazy-raw, ckptfs, ckptfs-ls[-refined][-wait], ckptfs-ls-demand, warm)")
            })
    }
}

/// What to run.
pub struct Config {
    /// Repetitions per method and tier.
    pub reps: usize,
    /// Storage tiers.
    pub tiers: Vec<Tier>,
    /// Methods.
    pub methods: Vec<Method>,
}

/// One measured restore.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    /// Tier label.
    pub tier: String,
    /// Method label.
    pub method: String,
    /// Repetition.
    pub rep: usize,
    /// Restore start to the first answer, ms.
    pub first_ms: f64,
    /// Restore start to the task's end, ms.
    pub done_ms: f64,
    /// The task alone, ms.
    pub task_ms: f64,
    /// Bytes the restore's processes read from the disk (blkio group).
    pub read_bytes: u64,
    /// The restored guest gave the checkpointed answers.
    pub answers_ok: bool,
}

/// Everything one checkpoint needs, in `dir`.
struct Guest {
    dir: PathBuf,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    cmdline: String,
    disk: PathBuf,
    /// The live RAM file (share=on).
    ram: PathBuf,
    /// Its copy at the checkpoint: the raw dump lazy-raw and warm map.
    raw: PathBuf,
}

impl Guest {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn disks(&self) -> Vec<vm::DiskImage> {
        vec![vm::DiskImage {
            path: self.disk.clone(),
            format: "raw",
        }]
    }

    /// The machine as saved (RAM file share=on) or, `incoming`, waiting for a migration.
    fn machine<'a>(
        &'a self,
        disks: &'a [vm::DiskImage],
        name: &'a str,
        share: bool,
        incoming: bool,
    ) -> Machine<'a> {
        Machine {
            mem_mib: GUEST_MIB,
            // share=off with -incoming: lazy-raw and warm map the dump (eager
            // replaces the backend with anonymous RAM).
            mem_path: if !share && incoming {
                &self.raw
            } else {
                &self.ram
            },
            share,
            vmlinuz: &self.vmlinuz,
            initrd: &self.initrd,
            cmdline: &self.cmdline,
            disks,
            incoming,
            run_dir: &self.dir,
            name,
            extra_args: Vec::new(),
            ram_object: None,
        }
    }
}

fn ckptfs_bin() -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("bench has no folder")?
        .join("ckptfs");
    ensure!(
        p.exists(),
        "{} is not built; run `cargo build --release --workspace`",
        p.display()
    );
    Ok(p)
}

/// Run the benchmark in `dir`, writing results to `out`.
pub fn run(cfg: &Config, dir: &Path, out: &Path) -> Result<()> {
    let ckptfs = ckptfs_bin()?;
    let t0 = Instant::now();
    let guest = build(dir)?;
    eprintln!(
        "bench qemu: guest built in {:.0} s; booting, filling, saving",
        t0.elapsed().as_secs_f64()
    );
    let saved = boot_fill_save(&guest, &ckptfs)?;
    eprintln!("bench qemu: saved ({saved}); recording the loading set");
    let ls = record_loading_sets(&guest, &ckptfs)?;
    eprintln!("bench qemu: loading set {ls}");
    let mut runs = Vec::new();
    for &tier in &cfg.tiers {
        for rep in 0..cfg.reps {
            for &method in &cfg.methods {
                let r = restore(&guest, &ckptfs, method, tier, rep)?;
                eprintln!(
                    "bench qemu: {} {} rep {rep}: first {:.0} ms, done {:.0} ms, {:.0} MiB read{}",
                    r.tier,
                    r.method,
                    r.first_ms,
                    r.done_ms,
                    r.read_bytes as f64 / 1048576.0,
                    if r.answers_ok { "" } else { ", WRONG ANSWERS" }
                );
                runs.push(r);
            }
        }
    }
    std::fs::create_dir_all(out)?;
    let mut jsonl = String::new();
    for r in &runs {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    std::fs::write(out.join("qemu.jsonl"), jsonl)?;
    let md = report(cfg, &runs, &saved, &ls);
    std::fs::write(out.join("qemu.md"), &md)?;
    plot(&out.join("qemu.png"), cfg, &runs)?;
    println!("{md}");
    ensure!(
        runs.iter().all(|r| r.answers_ok),
        "a restored guest answered differently"
    );
    Ok(())
}

/// The host's TSC rate in kHz, measured over 100 ms (the guest's TSC runs at it).
fn host_tsc_khz() -> u64 {
    let t0 = Instant::now();
    // SAFETY: RDTSC only reads the time-stamp counter.
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    (c1 - c0) * 1000 / t0.elapsed().as_micros() as u64
}

/// Kernel, initramfs, the disk with the files and heapwalk, the RAM file.
fn build(dir: &Path) -> Result<Guest> {
    let cache = std::env::var_os("CKPTFS_LINUX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ckptfs/linux"))
        .join("current");
    ensure!(
        cache.join("load-order").exists(),
        "no Debian kernel in {}: run scripts/setup-qemu.sh",
        cache.display()
    );
    let modules: Vec<PathBuf> = std::fs::read_to_string(cache.join("load-order"))?
        .lines()
        .map(|m| cache.join("modules").join(m))
        .collect();
    let stage = dir.join("stage");
    std::fs::create_dir_all(&stage)?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/heapwalk.rs");
    let st = Command::new("rustc")
        .args([
            "-O",
            "--edition",
            "2021",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(stage.join("heapwalk"))
        .arg(&src)
        .status()
        .context("running rustc")?;
    ensure!(st.success(), "building {} failed", src.display());
    for n in 0..FILES {
        std::fs::write(
            stage.join(format!("f{n:02}.bin")),
            pseudo_random(FILE_MIB << 20, n as u64 + 1),
        )?;
    }
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(((FILES * FILE_MIB) as u64 + 64) << 20)?;
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&stage)
        .arg(&disk)
        .status()
        .context("running mkfs.ext4")?;
    ensure!(st.success(), "mkfs.ext4 failed");
    std::fs::remove_dir_all(&stage)?;
    let initrd = dir.join("initrd.cpio");
    initramfs::write(&initrd, &modules, &[DISK]);
    let ram = dir.join("ram");
    std::fs::File::create(&ram)?.set_len(GUEST_MIB << 20)?;
    let khz = host_tsc_khz();
    Ok(Guest {
        dir: dir.to_owned(),
        vmlinuz: cache.join("vmlinuz"),
        initrd,
        cmdline: format!(
            "console=ttyS0 quiet loglevel=1 panic=-1 8250.nr_uarts=1 tsc_early_khz={khz} lpj={}",
            khz * 1000 / 250
        ),
        disk,
        raw: dir.join("ram.raw"),
        ram,
    })
}

/// Pseudo-random bytes (splitmix64): every page distinct, none zero.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The task: md5sum of `files`, then one walk of the hot heap.
fn task(files: std::ops::Range<usize>, seed: u64) -> String {
    let names: Vec<String> = files.map(|n| format!("{}/f{n:02}.bin", DISK.dir)).collect();
    format!(
        "md5sum {} && echo walk {seed} >&3 && read -r h <&4 && echo $h",
        names.join(" ")
    )
}

/// Boot with RAM in the shared file, fill the page cache and the heap, run the
/// task once (its answer is the reference), then save: QEMU's full stream for
/// eager, then `ckptfs qemu save --quit`. Returns a summary line.
fn boot_fill_save(guest: &Guest, ckptfs: &Path) -> Result<String> {
    let disks = guest.disks();
    let ckptfs_qmp = guest.path("ckptfs.qmp");
    let mut m = guest.machine(&disks, "save", true, false);
    m.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", ckptfs_qmp.display()),
    ];
    let mut vm = Qemu::start(&m);
    let t = Instant::now();
    vm.console.wait_ready(SLOW);
    let boot = t.elapsed();
    let c = &mut vm.console;
    let t = Instant::now();
    c.run(&format!("cat {}/f*.bin > /dev/null", DISK.dir), SLOW);
    let fill_files = t.elapsed();
    let t = Instant::now();
    c.run("mkdir -p /tmp && mkfifo /tmp/c /tmp/r", SLOW);
    // The shell's FIFO opens return once heapwalk has filled its heap.
    c.run(
        &format!(
            "{}/heapwalk {HEAP_MIB} {HOT_MIB} /tmp/c /tmp/r & exec 3>/tmp/c 4</tmp/r",
            DISK.dir
        ),
        SLOW,
    );
    let fill_heap = t.elapsed();
    let t = Instant::now();
    let answer = c.run(&task(TASK_FILES, TASK_SEED), SLOW);
    let task_cold = t.elapsed();
    let t = Instant::now();
    let again = c.run(&task(TASK_FILES, TASK_SEED), SLOW);
    let task_warm = t.elapsed();
    ensure!(
        answer == again,
        "the task's answer changed between two runs"
    );
    let free = c.run("free -m | sed -n 2p", SLOW);
    // `ckptfs qemu save` stops the VM and saves it; the RAM file as it is
    // then is lazy-raw's dump (it matches the saved device state). QEMU
    // refuses a second migration of a VM paused by the first, so the guest
    // runs (idle) for a moment before the eager stream is taken: that stream
    // holds its own RAM and device state, consistent with each other.
    let out = Command::new(ckptfs)
        .args(["qemu", "save", "--qmp"])
        .arg(&ckptfs_qmp)
        .arg("--mem-file")
        .arg(&guest.ram)
        .arg("--disk")
        .arg(&guest.disk)
        .arg("-o")
        .arg(guest.path("vm.ckpt"))
        .args(["--leave-paused", "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "ckptfs qemu save failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&guest.ram)
        .arg(&guest.raw)
        .status()?;
    ensure!(st.success(), "copying the RAM file failed");
    vm.qmp.cont()?;
    vm.qmp.stop()?;
    let t = Instant::now();
    vm.qmp
        .migrate(&format!("exec:cat > {}", guest.path("eager.mig").display()))?;
    vm.qmp.wait_migration(SLOW)?;
    let eager_s = t.elapsed();
    vm.quit();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ck = ckptfs::Checkpoint::open(&guest.path("vm.ckpt"))?;
    std::fs::write(guest.path("state.bin"), ck.vmm_state())?;
    // The reference answer, for every restore to match.
    std::fs::write(guest.path("answer.txt"), &answer)?;
    let s = &report["checkpoint"];
    Ok(format!(
        "boot {:.1} s, page cache fill {:.1} s, heap fill {:.1} s, task {:.1} s cold in the guest / {:.1} s again; guest `free -m`: {}; \
         QEMU stream with RAM {:.0} MiB in {:.1} s; checkpoint {:.0} MiB ({} zero, {} disk, {} blob pages), device state {} KiB, save {:.1} s",
        boot.as_secs_f64(),
        fill_files.as_secs_f64(),
        fill_heap.as_secs_f64(),
        task_cold.as_secs_f64(),
        task_warm.as_secs_f64(),
        free.split_whitespace().collect::<Vec<_>>().join(" "),
        std::fs::metadata(guest.path("eager.mig"))?.len() as f64 / 1048576.0,
        eager_s.as_secs_f64(),
        s["checkpoint_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        s["zero_pages"],
        s["disk_pages"],
        s["blob_pages"],
        report["state_bytes"].as_u64().unwrap_or(0) / 1024,
        s["seconds"].as_f64().unwrap_or(0.0) + report["state_seconds"].as_f64().unwrap_or(0.0),
    ))
}

/// `ckptfs qemu restore VM.ckpt MNT OPTS --exec -- qemu-system-x86_64` as a launcher.
fn ckptfs_launcher(guest: &Guest, ckptfs: &Path, opts: &[&str]) -> Result<Vec<std::ffi::OsString>> {
    let mnt = guest.path("mnt");
    std::fs::create_dir_all(&mnt)?;
    let mut l: Vec<std::ffi::OsString> = vec![
        ckptfs.into(),
        "qemu".into(),
        "restore".into(),
        guest.path("vm.ckpt").into(),
        mnt.into(),
    ];
    l.extend(opts.iter().map(Into::into));
    l.extend(["--exec".into(), "--".into(), "qemu-system-x86_64".into()]);
    Ok(l)
}

/// Wait until the restored VM runs.
fn wait_running(vm: &mut Qemu) -> Result<()> {
    let t = Instant::now();
    while !vm.qmp.query_status()?.running {
        if t.elapsed() > SLOW {
            bail!("the restored VM did not resume");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Loading sets, recorded by one restore each running the recording variant
/// of the task: as the mount records them (2 MiB windows) and refined to the
/// pages QEMU mapped (`--refine-loading-set`).
const LS_WINDOWS: &str = "ls-windows.ls";
const LS_REFINED: &str = "ls-refined.ls";

/// Record both loading sets; returns a summary line.
fn record_loading_sets(guest: &Guest, ckptfs: &Path) -> Result<String> {
    let mut out = Vec::new();
    for (name, refine) in [(LS_WINDOWS, false), (LS_REFINED, true)] {
        let disks = guest.disks();
        let m = guest.machine(&disks, "record", true, false);
        let mut opts = vec!["--record-loading-set", "--loading-set-window", "3600"];
        if refine {
            opts.push("--refine-loading-set");
        }
        let mut vm = Qemu::start_via(&m, &ckptfs_launcher(guest, ckptfs, &opts)?);
        wait_running(&mut vm)?;
        vm.console.run("echo ok", SLOW);
        vm.console.run(&task(RECORD_FILES, RECORD_SEED), SLOW);
        vm.quit();
        let ck = ckptfs::Checkpoint::open(&guest.path("vm.ckpt"))?;
        let recorded = guest.path("vm.ckpt.ls");
        let set = ckptfs::loadset::LoadingSet::open(&recorded, &ck)
            .context("the recording mount wrote no usable loading set")?;
        let pages: u64 = set.runs().iter().map(|r| u64::from(r.pages)).sum();
        out.push(format!(
            "{name}: {pages} pages in {} runs, {:.0} MiB stored",
            set.runs().len(),
            set.data_bytes() as f64 / 1048576.0
        ));
        std::fs::rename(&recorded, guest.path(name))?;
    }
    Ok(out.join("; "))
}

/// Restore with `method` on `tier` and run the task.
fn restore(guest: &Guest, ckptfs: &Path, method: Method, tier: Tier, rep: usize) -> Result<Run> {
    let want = std::fs::read_to_string(guest.path("answer.txt"))?;
    // Cold: this benchmark's own files leave the page cache (nothing else on
    // the machine is disturbed); warm: the raw dump is read into it.
    let files: Vec<PathBuf> = [
        "disk.img",
        "vm.ckpt",
        LS_WINDOWS,
        LS_REFINED,
        "eager.mig",
        "ram.raw",
        "state.bin",
    ]
    .iter()
    .map(|f| guest.path(f))
    .collect();
    evict(&files)?;
    if method == Method::Warm {
        std::fs::read(&guest.raw).map(drop)?;
    }
    // Every process of the restore reads through this blkio group: capped on
    // a slow tier, counted on all.
    let throttle = Throttle::start(
        &guest.dir,
        match tier {
            Tier::Local => None,
            Tier::Mbps(n) => Some(n),
        },
    )?;
    let disks = guest.disks();
    let read0 = throttle.read_bytes();
    let t0 = Instant::now();
    let mut vm = match method {
        Method::Eager => {
            let mut m = guest.machine(&disks, "eager", false, true);
            m.ram_object = Some(format!("memory-backend-ram,id=pc.ram,size={GUEST_MIB}M"));
            let mut vm = Qemu::start(&m);
            vm.qmp
                .migrate_incoming(&format!("exec:cat {}", guest.path("eager.mig").display()))?;
            vm
        }
        Method::LazyRaw | Method::Warm => {
            let m = guest.machine(&disks, "lazy", false, true);
            let mut vm = Qemu::start(&m);
            vm.qmp
                .set_capability(ckptfs::qemu::stream::IGNORE_SHARED, true)?;
            vm.qmp
                .migrate_incoming(&format!("exec:cat {}", guest.path("state.bin").display()))?;
            vm
        }
        Method::Ckptfs
        | Method::CkptfsLs
        | Method::CkptfsLsRefined
        | Method::CkptfsLsWait
        | Method::CkptfsLsRefinedWait
        | Method::CkptfsLsDemand => {
            let m = guest.machine(&disks, "ckptfs", true, false);
            let windows = guest.path(LS_WINDOWS).display().to_string();
            let refined = guest.path(LS_REFINED).display().to_string();
            let opts: Vec<&str> = match method {
                Method::Ckptfs => vec!["--no-loading-set"],
                Method::CkptfsLs => vec!["--loading-set", &windows],
                Method::CkptfsLsRefined => vec!["--loading-set", &refined],
                Method::CkptfsLsWait => vec!["--loading-set", &windows, "--wait-loading-set"],
                Method::CkptfsLsRefinedWait => {
                    vec!["--loading-set", &refined, "--wait-loading-set"]
                }
                _ => vec!["--loading-set", &windows, "--prefetch", "none"],
            };
            Qemu::start_via(&m, &ckptfs_launcher(guest, ckptfs, &opts)?)
        }
    };
    if matches!(method, Method::Eager | Method::LazyRaw | Method::Warm) {
        vm.qmp.wait_migration(SLOW)?;
        vm.qmp.cont()?;
    }
    wait_running(&mut vm)?;
    vm.console.run("echo ok", SLOW);
    let first = t0.elapsed();
    let got = vm.console.run(&task(TASK_FILES, TASK_SEED), SLOW);
    let done = t0.elapsed();
    let read_bytes = throttle.read_bytes() - read0;
    vm.quit();
    Ok(Run {
        tier: tier.label(),
        method: method.label().into(),
        rep,
        first_ms: first.as_secs_f64() * 1e3,
        done_ms: done.as_secs_f64() * 1e3,
        task_ms: (done - first).as_secs_f64() * 1e3,
        read_bytes,
        answers_ok: got == want,
    })
}

fn of<'a>(runs: &'a [Run], tier: &str, method: &str) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| r.tier == tier && r.method == method)
        .collect()
}

fn med(v: &[&Run], f: impl Fn(&Run) -> f64) -> Option<f64> {
    median(v.iter().map(|r| f(r)).collect())
}

fn range(v: &[&Run], f: impl Fn(&Run) -> f64) -> String {
    let xs: Vec<f64> = v.iter().map(|r| f(r)).collect();
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() {
        "-".into()
    } else {
        format!("{:.1}-{:.1}", lo / 1e3, hi / 1e3)
    }
}

/// Markdown: per tier, every method's medians and ranges, and the ratios of the goal.
fn report(cfg: &Config, runs: &[Run], saved: &str, ls: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Setup: {saved}. Loading sets (recorded on files 0-7, heap seed {RECORD_SEED}; measured task: files 1-8, seed {TASK_SEED}): {ls}.\n"
    );
    for tier in &cfg.tiers {
        let t = tier.label();
        let _ = writeln!(s, "#### Storage {t}, {} repetitions\n", cfg.reps);
        s.push_str("| method | first answer s (median, range) | task done s (median, range) | task alone s | memory part s (done - warm) | read MiB | answers |\n|---|---:|---:|---:|---:|---:|---|\n");
        let warm_done = med(&of(runs, &t, "warm"), |r| r.done_ms);
        for m in &cfg.methods {
            let v = of(runs, &t, m.label());
            if v.is_empty() {
                continue;
            }
            let done = med(&v, |r| r.done_ms);
            let _ = writeln!(
                s,
                "| {} | {:.1} ({}) | {:.1} ({}) | {:.1} | {} | {:.0} | {} |",
                m.label(),
                med(&v, |r| r.first_ms).unwrap_or(f64::NAN) / 1e3,
                range(&v, |r| r.first_ms),
                done.unwrap_or(f64::NAN) / 1e3,
                range(&v, |r| r.done_ms),
                med(&v, |r| r.task_ms).unwrap_or(f64::NAN) / 1e3,
                match (done, warm_done) {
                    (Some(d), Some(w)) => format!("{:.1}", (d - w) / 1e3),
                    _ => "-".into(),
                },
                med(&v, |r| r.read_bytes as f64).unwrap_or(0.0) / 1048576.0,
                if v.iter().all(|r| r.answers_ok) {
                    "same"
                } else {
                    "WRONG"
                }
            );
        }
        let done = |m: &str| med(&of(runs, &t, m), |r| r.done_ms);
        let _ = writeln!(s);
        for m in [
            "ckptfs",
            "ckptfs-ls",
            "ckptfs-ls-refined",
            "ckptfs-ls-demand",
        ] {
            if let Some(d) = done(m) {
                let ratio = |b: &str| done(b).map_or("-".into(), |b| format!("{:.2}", d / b));
                let _ = writeln!(
                    s,
                    "- {m}: task done / eager = {}, / lazy-raw = {}",
                    ratio("eager"),
                    ratio("lazy-raw")
                );
            }
        }
        let _ = writeln!(s);
    }
    s
}

/// Grouped bars: median time to the task's end per method, one group per tier.
fn plot(out: &Path, cfg: &Config, runs: &[Run]) -> Result<()> {
    let font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes =
        std::fs::read(font).with_context(|| format!("font {font} (run scripts/setup.sh)"))?;
    let _ = plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    );
    let root = BitMapBackend::new(out, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = cfg.methods.len();
    let max = runs.iter().map(|r| r.done_ms).fold(0.0, f64::max) / 1e3 * 1.15;
    let groups = cfg.tiers.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Linux guest, {GUEST_MIB} MiB, QEMU TCG: restore until the task is done (median; dark = first answer)"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(groups * (n + 1)) as f64, 0.0..max.max(1.0))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("seconds since the restore command started")
        .draw()?;
    for (g, tier) in cfg.tiers.iter().enumerate() {
        let t = tier.label();
        let x0 = (g * (n + 1)) as f64;
        chart.draw_series(std::iter::once(Text::new(
            format!("storage {t}"),
            (x0 + n as f64 / 2.0 - 0.6, max * 0.97),
            ("sans-serif", 18),
        )))?;
        for (i, m) in cfg.methods.iter().enumerate() {
            let v = of(runs, &t, m.label());
            let (Some(done), Some(first)) = (med(&v, |r| r.done_ms), med(&v, |r| r.first_ms))
            else {
                continue;
            };
            let x = x0 + i as f64 + 0.1;
            let color = Palette99::pick(i).to_rgba();
            let bar = chart.draw_series(std::iter::once(Rectangle::new(
                [(x, 0.0), (x + 0.8, done / 1e3)],
                color.mix(0.6).filled(),
            )))?;
            if g == 0 {
                bar.label(m.label()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            }
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x, 0.0), (x + 0.8, first / 1e3)],
                color.filled(),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing plot {}", out.display()))?;
    Ok(())
}
