//! Incremental checkpoints of restored VMs, on real KVM and real ckptfs mounts:
//! boot -> checkpoint -> mount -> restore -> work -> incremental checkpoint -> mount it ->
//! restore -> the CHECK is the one taken at the second checkpoint; the same again for a chain
//! of three; flattening gives the identical memory; a changed or missing parent is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckptfs::{Checkpoint, PageIndex};
use common::{Setup, run_fails, run_json, s};

const MEM: &str = "16M";

/// ckptfs-mountd, built beside vmm-lite (`cargo test --workspace` builds both).
fn mountd() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_vmm-lite")).with_file_name("ckptfs-mountd");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        p.display()
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is required for these tests"
    );
    p
}

/// A detached ckptfs mount of a checkpoint; unmounted (and its daemon waited for) on drop.
struct Mount {
    point: PathBuf,
    pid: u64,
}

impl Mount {
    fn new(ckpt: &Path, point: &Path) -> Mount {
        std::fs::create_dir_all(point).unwrap();
        let out = Command::new(mountd())
            .arg(ckpt)
            .arg(point)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ckptfs-mountd {}: {}",
            ckpt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats = std::fs::read_to_string(point.join("stats")).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        Mount {
            point: point.to_owned(),
            pid: stats["pid"].as_u64().unwrap(),
        }
    }

    fn memory(&self) -> String {
        s(&self.point.join("memory"))
    }

    fn state(&self) -> String {
        s(&self.point.join("vmm-state"))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.point)
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        let gone = |pid: u64| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|st| st.contains(") Z "))
                .unwrap_or(true)
        };
        while !gone(self.pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Boots a guest, serves `warmup` WORK requests and checkpoints it into `base.ckpt`.
fn base(t: &Setup, workload: &str, warmup: &str) -> (PathBuf, serde_json::Value) {
    let ckpt = t.path("base.ckpt");
    let disk = t.disk();
    let report = run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--workload",
        workload,
        "--warmup-requests",
        warmup,
        "-o",
        &s(&ckpt),
    ]);
    (ckpt, report)
}

fn read_all(path: &Path) -> Vec<u8> {
    let ck = Checkpoint::open(path).unwrap();
    let mut out = vec![0u8; ck.guest_size() as usize];
    ck.read_pages(PageIndex(0), &mut out).unwrap();
    out
}

fn check_of(report: &serde_json::Value) -> String {
    report["check"].as_str().unwrap().to_owned()
}

/// Restores a mount of `ckpt`, serves `args`' requests, CHECKs, checkpoints into `out`
/// (parent derived from the mount); returns the report.
fn restore_mount_and_checkpoint(
    t: &Setup,
    ckpt: &Path,
    out: &Path,
    args: &[&str],
) -> serde_json::Value {
    let m = Mount::new(ckpt, &t.path("mnt"));
    let (mem, state, disk, out) = (m.memory(), m.state(), t.disk(), s(out));
    let mut all = vec![
        "restore",
        "--mem-file",
        &mem,
        "--state",
        &state,
        "--disk",
        &disk,
        "-o",
        &out,
    ];
    all.extend(args);
    run_json(&all)
}

/// A mount of `ckpt` restored with no work: its CHECK.
fn check_through_a_mount(t: &Setup, ckpt: &Path) -> String {
    let m = Mount::new(ckpt, &t.path("mnt"));
    let (mem, state, disk) = (m.memory(), m.state(), t.disk());
    let r = run_json(&[
        "restore",
        "--mem-file",
        &mem,
        "--state",
        &state,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    check_of(&r)
}

#[test]
fn a_chain_of_incremental_checkpoints_through_mounts_restores_each_state() {
    let t = Setup::new("16M");
    let (base, _) = base(&t, "desktop", "200");
    let work = ["--requests", "80", "--writes", "--dirty-pct", "5"];

    let next1 = t.path("next1.ckpt");
    let r1 = restore_mount_and_checkpoint(&t, &base, &next1, &work);
    let saved = &r1["checkpoint"];
    let abs_base = std::path::absolute(&base).unwrap();
    assert_eq!(
        saved["parent"],
        s(&abs_base),
        "parent named by the mount's stats"
    );
    let pages = saved["pages"].as_u64().unwrap();
    let written = saved["written_pages"].as_u64().unwrap();
    // 5 % of 4096 pages by DIRTY requests, plus what the WORK requests and the stack wrote.
    assert!((205..300).contains(&written), "{saved}");
    assert_eq!(
        saved["summary"]["unchanged_pages"],
        pages - written,
        "{saved}"
    );
    assert_eq!(check_through_a_mount(&t, &next1), check_of(&r1));

    // The next link: restored from a mount of the incremental checkpoint.
    let next2 = t.path("next2.ckpt");
    let r2 = restore_mount_and_checkpoint(&t, &next1, &next2, &work);
    assert_ne!(check_of(&r2), check_of(&r1));
    assert_eq!(check_through_a_mount(&t, &next2), check_of(&r2));
    let ck = Checkpoint::open(&next2).unwrap();
    assert_eq!(ck.ancestors().len(), 2);
    let ins = ckptfs::verify::inspect(&ck);
    let holds: u64 = ins.chain.iter().map(|l| l.holds).sum();
    assert_eq!(holds, pages);
    assert!(ins.chain.iter().all(|l| l.holds > 0), "{:?}", ins.chain);

    // Flattened: the same memory, one file, the same CHECK when restored eagerly.
    let flat = t.path("flat.ckpt");
    ckptfs::flatten::flatten(&ck, &flat, false).unwrap();
    assert!(
        read_all(&flat) == read_all(&next2),
        "flatten changed the memory"
    );
    let disk = t.disk();
    let r = run_json(&[
        "restore",
        "--ckpt",
        &s(&flat),
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(check_of(&r), check_of(&r2));
    assert_eq!(check_through_a_mount(&t, &flat), check_of(&r2));
}

#[test]
fn an_incremental_checkpoint_holds_the_memory_a_full_one_of_the_same_run_holds() {
    let t = Setup::new("16M");
    let (base, _) = base(&t, "mixed", "150");
    let (disk, base) = (t.disk(), s(&base));
    // Counted requests and DIRTY pages: both runs leave the guest in the same state.
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--ckpt",
            &base,
            "--disk",
            &disk,
            "--requests",
            "60",
            "--writes",
            "--dirty-pct",
            "10",
            "-o",
            out,
        ];
        args.extend(extra);
        run_json(&args)
    };
    let inc = run(&t.p("inc.ckpt"), &[]);
    let raw = t.p("raw.bin");
    let full = run(&t.p("full.ckpt"), &["--full-checkpoint", "--raw-out", &raw]);
    assert_eq!(inc["check"], full["check"]);
    assert!(full["checkpoint"].get("parent").is_none());
    assert!(full["raw_save_ms"].as_f64().unwrap() > 0.0);
    let raw = std::fs::read(&raw).unwrap();
    assert!(
        read_all(&t.path("full.ckpt")) == raw,
        "the full checkpoint differs from the raw dump"
    );
    assert!(
        read_all(&t.path("inc.ckpt")) == raw,
        "the incremental checkpoint's memory differs from the raw dump of the same run"
    );
    let size = |r: &serde_json::Value| {
        r["checkpoint"]["summary"]["checkpoint_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        size(&inc) * 2 < size(&full),
        "{} vs {}",
        size(&inc),
        size(&full)
    );
    assert_eq!(full["checkpoint"]["summary"]["unchanged_pages"], 0);
}

#[test]
fn the_io_tracking_map_survives_a_restore() {
    let t = Setup::new("16M");
    let (base, report) = base(&t, "pagecache", "100");
    let disk = t.disk();
    let r = run_json(&[
        "restore",
        "--ckpt",
        &s(&base),
        "--disk",
        &disk,
        "--requests",
        "0",
        "--full-checkpoint",
        "-o",
        &t.p("full.ckpt"),
    ]);
    let summary = &r["checkpoint"]["summary"];
    // The restored tracker hints every page the first run hinted (a CHECK writes none).
    assert_eq!(r["checkpoint"]["hints"], report["hints"], "{r}");
    assert_eq!(summary["hints_verified"], report["hints"], "{r}");
    assert_eq!(
        summary["disk_pages"], report["checkpoint"]["disk_pages"],
        "{r}"
    );
}

#[test]
fn a_changed_or_missing_parent_is_refused_by_every_dependent() {
    let t = Setup::new("16M");
    let (base, _) = base(&t, "mixed", "100");
    let (disk, base_s) = (t.disk(), s(&base));
    let next = t.p("next.ckpt");
    run_json(&[
        "restore",
        "--ckpt",
        &base_s,
        "--disk",
        &disk,
        "--requests",
        "20",
        "--writes",
        "-o",
        &next,
    ]);
    let abs_base = std::path::absolute(&base).unwrap();
    let good = std::fs::read(&base).unwrap();

    // Re-created by another run: same size, another identity.
    std::fs::remove_file(&base).unwrap();
    run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--seed",
        "9",
        "--warmup-requests",
        "100",
        "-o",
        &base_s,
    ]);
    let err = run_fails(&[
        "restore",
        "--ckpt",
        &next,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "vmm-lite: error: checkpoint {next}: parent checkpoint {} changed since it was made: ",
            abs_base.display()
        )),
        "{err}"
    );
    let point = t.path("mnt");
    std::fs::create_dir_all(&point).unwrap();
    let out = Command::new(mountd())
        .arg(&next)
        .arg(&point)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a mount of the dependent must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("changed since it was made"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Deleted.
    std::fs::remove_file(&base).unwrap();
    let err = run_fails(&[
        "restore",
        "--ckpt",
        &next,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(
        err,
        format!(
            "vmm-lite: error: checkpoint {next} needs its parent checkpoint: checkpoint {}: No such file or directory (os error 2)\n",
            abs_base.display()
        )
    );
    // Put back, the dependent restores again.
    std::fs::write(&base, &good).unwrap();
    run_json(&[
        "restore",
        "--ckpt",
        &next,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
}

#[test]
fn the_parent_must_be_the_checkpoint_the_vm_was_restored_from() {
    let t = Setup::new("16M");
    let disk = t.disk();
    let (raw, state, base) = (t.p("mem.raw"), t.p("state.bin"), t.p("base.ckpt"));
    run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--warmup-requests",
        "100",
        "-o",
        &base,
        "--raw-out",
        &raw,
        "--state-out",
        &state,
    ]);
    let other = t.p("other.ckpt");
    run_json(&[
        "run",
        "--mem",
        MEM,
        "--disk",
        &disk,
        "--warmup-requests",
        "101",
        "-o",
        &other,
    ]);
    let next = t.p("next.ckpt");
    let lazy_raw = [
        "restore",
        "--mem-file",
        &raw,
        "--state",
        &state,
        "--disk",
        &disk,
    ];
    let head = [&lazy_raw[..], &["--requests", "10", "-o", &next]].concat();

    // A raw dump names no checkpoint: say how to name one.
    let err = run_fails(&head);
    assert!(
        err.contains(&format!(
            "memory file {raw} is not a ckptfs mount's `memory`"
        )),
        "{err}"
    );
    assert!(
        err.contains("--parent-ckpt") && err.contains("--full-checkpoint"),
        "{err}"
    );
    // Another checkpoint's state is not the one the VM resumes from.
    let err = run_fails(&[&head[..], &["--parent-ckpt", &other]].concat());
    assert_eq!(
        err,
        format!(
            "vmm-lite: error: parent checkpoint {other} does not hold the state this VM was restored from (file {state}): the memory and state must come from the parent (--parent-ckpt)\n"
        )
    );
    assert!(!Path::new(&next).exists());
    // The checkpoint the dump came from is.
    let r = run_json(&[&head[..], &["--parent-ckpt", &base]].concat());
    let rr = run_json(&[
        "restore",
        "--ckpt",
        &next,
        "--disk",
        &disk,
        "--requests",
        "0",
    ]);
    assert_eq!(rr["check"], r["check"]);
    // -o over the parent, or over its parent, is refused before the VM runs.
    let err = run_fails(&["restore", "--ckpt", &next, "--disk", &disk, "-o", &base]);
    assert_eq!(
        err,
        format!(
            "vmm-lite: error: output {base} is the parent checkpoint or one of its parents; refusing to overwrite it\n"
        )
    );
}
