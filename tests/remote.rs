//! Checkpoints on a real SeaweedFS on loopback: a VM checkpointed by
//! vmm-lite is pushed, mounted on a "second host" (a fresh cache folder and
//! another mount point) and restored with the right CHECK; pulled byte for
//! byte; and restored while the store is killed and started again.
//!
//! vmm-lite and ckptfs-mountd are found beside the ckptfs binary
//! (`cargo test --workspace` builds them); `weed` is installed by
//! scripts/setup.sh. Nothing here skips itself.

mod seaweed;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seaweed::Weed;

fn ckptfs() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ckptfs"))
}

fn beside(name: &str) -> PathBuf {
    let p = ckptfs().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is not built: run cargo test --workspace",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The JSON report in a command's output (pretty-printed or on one line).
fn json_line(text: &str) -> serde_json::Value {
    let at = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON report in: {text}"));
    if let Ok(v) = serde_json::from_str(&text[at..]) {
        return v;
    }
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A VM checkpointed by vmm-lite: its folder, disk and the CHECK to reach.
struct Vm {
    dir: tempfile::TempDir,
    check: String,
}

impl Vm {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new(seed: u32) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("ckptfs-remote")
            .tempdir()
            .unwrap();
        let vmm = beside("vmm-lite");
        let disk = dir.path().join("disk.img");
        run(Command::new(&vmm)
            .arg("mkdisk")
            .arg(&disk)
            .args(["--size", "64M"]));
        let report = run(Command::new(&vmm)
            .args([
                "run",
                "--mem",
                "32M",
                "--workload",
                "mixed",
                "--checkpoint-after",
                "0.5",
            ])
            .args(["--seed", &seed.to_string()])
            .arg("--disk")
            .arg(&disk)
            .arg("-o")
            .arg(dir.path().join("vm.ckpt"))
            .arg("--raw-out")
            .arg(dir.path().join("mem.raw")));
        let check = json_line(&report)["check"].as_str().unwrap().to_owned();
        Vm { dir, check }
    }

    /// Restore from a mount's memory for `secs`; returns its CHECK.
    fn restore(&self, mnt: &Path, secs: f64) -> Command {
        let mut cmd = Command::new(beside("vmm-lite"));
        cmd.arg("restore")
            .arg("--mem-file")
            .arg(mnt.join("memory"))
            .arg("--state")
            .arg(mnt.join("vmm-state"))
            .arg("--disk")
            .arg(self.path("disk.img"))
            .args(["--duration", &secs.to_string()]);
        cmd
    }
}

fn mounted(point: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(point.to_str().unwrap())
}

/// A mount, unmounted on drop (also when a test fails).
struct Mount(PathBuf);

impl Mount {
    fn new(weed: &Weed, url: &str, point: PathBuf, args: &[&str]) -> Mount {
        std::fs::create_dir_all(&point).unwrap();
        run(weed.env(
            Command::new(ckptfs())
                .arg("mount")
                .arg(url)
                .arg(&point)
                .args(args),
        ));
        assert!(mounted(&point));
        Mount(point)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..100 {
            if !mounted(&self.0) {
                return;
            }
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.0)
            .status();
    }
}

#[test]
fn pushed_vm_restores_on_a_second_host_and_pulls_byte_for_byte() {
    let t0 = Instant::now();
    let vm = Vm::new(3);
    // Record a loading set on the first host, as a real deployment would.
    {
        let rec = vm.path("rec");
        std::fs::create_dir_all(&rec).unwrap();
        run(Command::new(ckptfs())
            .arg("mount")
            .arg(vm.path("vm.ckpt"))
            .arg(&rec)
            .args(["--record-loading-set", "--loading-set-window", "1"]));
        let m = Mount(rec.clone());
        run(&mut vm.restore(&rec, 1.3));
        drop(m);
        let ls = vm.path("vm.ckpt.ls");
        let t = Instant::now();
        while !ls.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ls.exists(), "the recording mount wrote no loading set");
    }
    let mut weed = Weed::start(&vm.path("weed"));
    weed.wait_serving(&ckptfs());
    let url = "s3://ckpt/vms/a";
    let push = json_line(&run(weed.env(
        Command::new(ckptfs())
            .arg("push")
            .arg(vm.path("vm.ckpt"))
            .arg(url)
            .arg("--json"),
    )));
    assert!(push["packs_uploaded"].as_u64().unwrap() > 0, "{push}");
    assert!(push["loading_set_pages"].as_u64().unwrap() > 0, "{push}");
    // Pushing again uploads nothing: every pack is there by name.
    let again = json_line(&run(weed.env(
        Command::new(ckptfs())
            .arg("push")
            .arg(vm.path("vm.ckpt"))
            .arg("s3://ckpt/vms/b")
            .arg("--json"),
    )));
    assert_eq!(again["packs_uploaded"], 0, "{again}");

    // The second host: its own cache folder and mount point.
    let cache = vm.path("host2-cache");
    let cache_arg = cache.to_str().unwrap();
    let m = Mount::new(
        &weed,
        url,
        vm.path("host2-mnt"),
        &["--cache-dir", cache_arg, "--wait-loading-set"],
    );
    let report = json_line(&run(&mut vm.restore(&m.0, 0.5)));
    assert_eq!(
        report["check"].as_str(),
        Some(vm.check.as_str()),
        "{report}"
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.0.join("stats")).unwrap()).unwrap();
    assert_eq!(stats["loading_set"]["state"], "done", "{stats}");
    let memory = std::fs::read(m.0.join("memory")).unwrap();
    assert!(
        memory == std::fs::read(vm.path("mem.raw")).unwrap(),
        "memory differs from the dump"
    );
    drop(m);

    // Pull: the same file, byte for byte, and its loading set.
    let pulled = vm.path("pulled.ckpt");
    run(weed.env(Command::new(ckptfs()).arg("pull").arg(url).arg(&pulled)));
    assert!(std::fs::read(&pulled).unwrap() == std::fs::read(vm.path("vm.ckpt")).unwrap());
    assert!(
        std::fs::read(vm.path("pulled.ckpt.ls")).unwrap()
            == std::fs::read(vm.path("vm.ckpt.ls")).unwrap()
    );
    run(weed.env(
        Command::new(ckptfs())
            .args(["verify", url, "--mem"])
            .arg(vm.path("mem.raw"))
            .arg("--cache-dir")
            .arg(vm.path("verify-cache")),
    ));

    // A second mount on the same host starts warm: it serves all of memory
    // from its cache even with the store gone.
    let m = Mount::new(
        &weed,
        url,
        vm.path("host2-mnt2"),
        &[
            "--cache-dir",
            cache_arg,
            "--prefetch",
            "none",
            "--no-loading-set",
        ],
    );
    weed.kill();
    let memory = std::fs::read(m.0.join("memory")).unwrap();
    assert!(
        memory == std::fs::read(vm.path("mem.raw")).unwrap(),
        "warm memory differs"
    );
    eprintln!("remote round trip: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn a_store_killed_mid_restore_costs_time_not_bytes() {
    let t0 = Instant::now();
    let vm = Vm::new(4);
    let mut weed = Weed::start(&vm.path("weed"));
    weed.wait_serving(&ckptfs());
    let url = "s3://ckpt/vms/killed";
    run(weed.env(
        Command::new(ckptfs())
            .arg("push")
            .arg(vm.path("vm.ckpt"))
            .arg(url),
    ));

    // Killed while the VM faults its memory in, back a second later: demand
    // reads retry until it answers, and the VM ends in the right state.
    let cache = vm.path("cache");
    let mnt = vm.path("mnt");
    let m = Mount::new(
        &weed,
        url,
        mnt.clone(),
        &["--cache-dir", cache.to_str().unwrap(), "--prefetch", "none"],
    );
    let restore = vm
        .restore(&mnt, 1.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    weed.kill();
    std::thread::sleep(Duration::from_millis(800));
    weed.restart();
    let out = restore.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "restore failed while the store restarted: {stderr}"
    );
    let report = json_line(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        report["check"].as_str(),
        Some(vm.check.as_str()),
        "{report}"
    );
    drop(m);

    // Down for longer than reads retry: exactly the stored pages not fetched
    // yet fail (EIO, logged with the pack's name); disk and zero pages are
    // served; once the store is back the same pages read right.
    weed.wait_serving(&ckptfs());
    let log = vm.path("mountd.log");
    let mnt2 = vm.path("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let mut daemon = weed
        .env(Command::new(beside("ckptfs-mountd")).arg(url).arg(&mnt2))
        .args([
            "--foreground",
            "--prefetch",
            "none",
            "--no-loading-set",
            "--retry-secs",
            "0.5",
        ])
        .arg("--cache-dir")
        .arg(vm.path("cache2"))
        .env("RUST_LOG", "mountd=info,ckptfs=warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !mounted(&mnt2) && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _m2 = Mount(mnt2.clone());
    weed.kill();
    let ck = ckptfs::Checkpoint::open(&vm.path("vm.ckpt")).unwrap();
    let dump = std::fs::read(vm.path("mem.raw")).unwrap();
    let kind = |want: &dyn Fn(&ckptfs::PageSource) -> bool| {
        (0..ck.page_count())
            .find(|&p| want(&ck.entry(ckptfs::PageIndex(p)).source))
            .unwrap()
    };
    let blob = kind(&|s| matches!(s, ckptfs::PageSource::Blob(_)));
    let disk = kind(&|s| matches!(s, ckptfs::PageSource::Disk { .. }));
    let zero = kind(&|s| matches!(s, ckptfs::PageSource::Zero));
    let memory = std::fs::File::open(mnt2.join("memory")).unwrap();
    let read = |p: u64| {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 4096];
        memory.read_exact_at(&mut b, p * 4096).map(|()| b)
    };
    let err = read(blob).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    for p in [disk, zero] {
        assert!(
            read(p).unwrap()[..] == dump[p as usize * 4096..][..4096],
            "page {p}"
        );
    }
    weed.restart();
    weed.wait_serving(&ckptfs());
    // The failure is remembered for a second, and a restarted store may take
    // a moment to answer for its volumes: the page must come back right.
    let back = Instant::now();
    let bytes = loop {
        match read(blob) {
            Ok(b) => break b,
            Err(e) if back.elapsed() < Duration::from_secs(20) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("page {blob} still fails 20 s after the store came back: {e}"),
        }
    };
    assert!(bytes[..] == dump[blob as usize * 4096..][..4096]);
    drop(memory);
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt2).status();
    let _ = daemon.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("page {blob}")) && text.contains("s3://ckpt/ckptfs-packs/"),
        "the EIO is not logged with its page and object:\n{text}"
    );
    eprintln!("store kill/restart: {:.1} s", t0.elapsed().as_secs_f64());
}
