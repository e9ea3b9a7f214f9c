//! A real Linux guest, checkpointed by ckptfs and restored by unmodified QEMU.
//!
//! Debian's kernel and a busybox initramfs boot under QEMU TCG with guest RAM
//! in a `memory-backend-file` (share=on). The guest reads files from a
//! 1 KiB-block ext4 disk and from an MBR disk holding a 4 KiB-block ext4 at
//! sector 63 and another at a 1 MiB-aligned partition, hashes them and a
//! buffer in anonymous memory, and is saved with `x-ignore-shared` (RAM stays
//! in the file, the device state goes to a file). `ckptfs create` makes the
//! checkpoint from the RAM file, the disks and that state; QEMU restores from
//! the mounted `memory` (share=off) and `vmm-state`, and the guest must give
//! the same answers without reading its disks again. The checkpoint's size is
//! compared with a floor counted here, independently of ckptfs.
//!
//! A second test does the same through the user's commands: `ckptfs qemu
//! save` checkpoints the running guest over QMP, `ckptfs qemu restore --exec`
//! runs the saved VM's own command line restored from the mount; a third
//! checks that a save refuses RAM that is not in a shared file, in one line.
//!
//! Run alone (prints the numbers):
//! `cargo build -p mountd && cargo test --test qemu_linux -- --nocapture`.
//! Needs what scripts/setup-qemu.sh installs; the test runs it first.

mod qemu;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu::floor::Census;
use qemu::guest::{self, ALIGNED_FS, Guest, Kernel, Placed};
use qemu::mount::Mounted;
use qemu::vm::{DiskImage, Idle, Machine, Qemu};
use qemu::{ckptfs_json, sh_quote};
use serde_json::Value;

/// Format v2 (disk references at any 512-byte offset, qcow2 disk images): the
/// test also checkpoints qcow2 copies of the disks and restores from that
/// checkpoint, and holds the checkpoint to the true floor (pages neither zero
/// nor on a disk at any 512-byte offset) + 1 %; `false` would check only
/// format v1's 4 KiB-aligned reach.
const FORMAT_V2: bool = true;

/// Guest RAM.
const GUEST_MIB: u64 = 256;
/// Bytes of random data the guest keeps in a shell variable (anonymous memory).
const ANON_BYTES: u64 = 3_000_000;
/// Generous limits: TCG on two cores shared with compiling colleagues.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The migration capability that leaves file-backed shared RAM out of the stream.
const IGNORE_SHARED: &str = "x-ignore-shared";

/// What the guest answers: computed in the guest, compared across the restore.
#[derive(Debug, PartialEq)]
struct Answers {
    /// md5sum of every test file, by guest path.
    md5: BTreeMap<String, String>,
    /// md5sum of the random buffer in the command loop's shell variable.
    anon_md5: String,
    /// Same boot, not a reboot.
    boot_id: String,
}

/// The guest's disk-read counters: unchanged if the page cache served every read.
#[derive(Debug, PartialEq)]
struct ReadCounters {
    /// (device, reads completed, sectors read) from /sys/block/DEV/stat.
    disks: Vec<(String, u64, u64)>,
    /// /proc/vmstat pgpgin (KiB read from block devices).
    pgpgin: u64,
}

#[test]
fn linux_guest_restored_from_mounted_checkpoint_keeps_answers_and_page_cache() {
    let t0 = Instant::now();
    guest::install_and_check_tools();
    let kernel = Kernel::cached();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let guest = Guest::build(dir, &kernel);
    let mut times = vec![("build guest", t0.elapsed())];

    let ram = dir.join("guest-ram");
    let state = dir.join("qemu-state");
    let (answers, counters, boot) = run_and_save(&guest, dir, &ram, &state);
    times.push(("boot", boot));
    times.push(("run + save", t0.elapsed() - times.iter().map(|t| t.1).sum()));

    let t = Instant::now();
    let raw_disks = guest.raw_disks();
    let ckpt = dir.join("vm.ckpt");
    let (summary, inspection) = create_and_verify(&ram, &raw_disks, &state, &ckpt);
    times.push(("create + verify", t.elapsed()));

    let t = Instant::now();
    let census = Census::of(&std::fs::read(&ram).unwrap(), &guest);
    times.push(("floor census", t.elapsed()));

    let t = Instant::now();
    let stats = restore_and_check(&guest, dir, &ckpt, &raw_disks, &answers, &counters);
    times.push(("restore + check", t.elapsed()));

    if FORMAT_V2 {
        let t = Instant::now();
        qcow2_round_trip(&guest, dir, &ram, &state, &inspection, &answers, &counters);
        times.push(("qcow2 create + restore", t.elapsed()));
    }
    times.push(("total", t0.elapsed()));
    report(
        &kernel,
        &guest.placed,
        &census,
        &summary,
        &inspection,
        &stats,
        &times,
    );
    assert_against_floor(&census, &guest.placed, &inspection);
}

/// Boot the guest with RAM in `ram` (share=on), let it read and hash its files
/// and fill anonymous memory, then stop it and save its device state to `state`
/// with `x-ignore-shared`. Returns its answers, its disk-read counters and the
/// boot time.
fn run_and_save(
    guest: &Guest,
    dir: &Path,
    ram: &Path,
    state: &Path,
) -> (Answers, ReadCounters, Duration) {
    let t = Instant::now();
    let disks = guest.raw_disks();
    let mut vm = Qemu::start(&machine(guest, dir, ram, true, &disks, "save"));
    vm.console.wait_ready(BOOT_TIMEOUT);
    let boot = t.elapsed();
    let answers = ask(&mut vm, guest, true);
    assert_eq!(
        answers.md5,
        guest.expected_md5(),
        "the guest read wrong file contents"
    );
    let counters = read_counters(&mut vm);
    let file_bytes: usize = guest.files.iter().map(|f| f.data.len()).sum();
    assert!(
        counters.disks.iter().map(|d| d.2).sum::<u64>() * 512 >= file_bytes as u64,
        "the guest did not read its files from disk: {counters:?}"
    );
    vm.qmp.stop().unwrap();
    vm.qmp.set_capability(IGNORE_SHARED, true).unwrap();
    vm.qmp
        .migrate(&format!("exec:cat > {}", sh_quote(state)))
        .unwrap();
    vm.qmp.wait_migration(MIGRATION_TIMEOUT).unwrap();
    vm.quit();
    let state_len = std::fs::metadata(state).unwrap().len();
    assert!(
        state_len < 32 << 20,
        "{state_len} bytes of device state: guest RAM went into the stream, not just the file"
    );
    (answers, counters, boot)
}

fn machine<'a>(
    guest: &'a Guest,
    dir: &'a Path,
    mem_path: &'a Path,
    share: bool,
    disks: &'a [DiskImage],
    name: &'a str,
) -> Machine<'a> {
    Machine {
        mem_mib: GUEST_MIB,
        mem_path,
        share,
        vmlinuz: &guest.vmlinuz,
        initrd: &guest.initrd,
        cmdline: &guest.cmdline,
        disks,
        incoming: !share,
        run_dir: dir,
        name,
        extra_args: Vec::new(),
        ram_object: None,
    }
}

/// Ask the guest for its answers; `fill` first fills the anonymous buffer.
fn ask(vm: &mut Qemu, guest: &Guest, fill: bool) -> Answers {
    let c = &mut vm.console;
    if fill {
        c.run(
            &format!("A=$(head -c {ANON_BYTES} /dev/urandom | base64 | tr -d '\\n')"),
            COMMAND_TIMEOUT,
        );
    }
    let len = c.run("echo ${#A}", COMMAND_TIMEOUT);
    assert_eq!(len.trim(), (ANON_BYTES.div_ceil(3) * 4).to_string());
    let dirs: Vec<String> = guest
        .placed
        .iter()
        .map(|p| format!("{}/*.bin", p.fs.mount.dir))
        .collect();
    let md5 = c
        .run(&format!("md5sum {}", dirs.join(" ")), COMMAND_TIMEOUT)
        .lines()
        .map(|l| {
            let (sum, path) = l.split_once("  ").expect("md5sum output");
            (path.to_string(), sum.to_string())
        })
        .collect();
    let anon = c.run("echo -n \"$A\" | md5sum", COMMAND_TIMEOUT);
    let boot_id = c.run("cat /proc/sys/kernel/random/boot_id", COMMAND_TIMEOUT);
    Answers {
        md5,
        anon_md5: anon[..32].to_string(),
        boot_id: boot_id.trim().to_string(),
    }
}

fn read_counters(vm: &mut Qemu) -> ReadCounters {
    let c = &mut vm.console;
    let disks = ["vda", "vdb"]
        .iter()
        .map(|dev| {
            let stat = c.run(&format!("cat /sys/block/{dev}/stat"), COMMAND_TIMEOUT);
            let f: Vec<u64> = stat
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            (dev.to_string(), f[0], f[2])
        })
        .collect();
    let pgpgin = c.run("grep '^pgpgin ' /proc/vmstat", COMMAND_TIMEOUT);
    ReadCounters {
        disks,
        pgpgin: pgpgin.split_whitespace().nth(1).unwrap().parse().unwrap(),
    }
}

/// `ckptfs create` (raw or qcow2 disks) then `ckptfs verify` against the RAM
/// file; returns create's summary and inspect's view.
fn create_and_verify(ram: &Path, disks: &[DiskImage], state: &Path, ckpt: &Path) -> (Value, Value) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"create", &"--mem", &ram];
    for d in disks {
        args.push(&"--disk");
        args.push(&d.path);
    }
    args.extend([&"--state" as &dyn AsRef<_>, &state, &"-o", &ckpt]);
    let summary = ckptfs_json(&args);
    let report = ckptfs_json(&[&"verify", &ckpt, &"--mem", &ram]);
    assert_eq!(report["bad_pages"], 0, "verify: {report}");
    let inspection = ckptfs_json(&[&"inspect", &ckpt]);
    (summary, inspection)
}

/// Mount `ckpt`, restore the guest from its `memory` (share=off) and
/// `vmm-state` with unmodified QEMU, and check that the guest answers as
/// before without reading its disks. Returns the daemon's stats.
fn restore_and_check(
    guest: &Guest,
    dir: &Path,
    ckpt: &Path,
    disks: &[DiskImage],
    want: &Answers,
    want_counters: &ReadCounters,
) -> Value {
    let label = disks[0].format;
    let mnt = Mounted::new(ckpt, &dir.join(format!("mnt-{label}")));
    let memory = mnt.memory();
    let name = format!("restore-{label}");
    let mut vm = Qemu::start(&machine(guest, dir, &memory, false, disks, &name));
    vm.qmp.set_capability(IGNORE_SHARED, true).unwrap();
    vm.qmp
        .migrate_incoming(&format!("exec:cat {}", sh_quote(&mnt.vmm_state())))
        .unwrap();
    vm.qmp.wait_migration(MIGRATION_TIMEOUT).unwrap();
    let status = vm.qmp.query_status().unwrap();
    // The run state travels with the device state: saved paused, restored paused.
    assert_eq!(status.status, "paused", "after the incoming migration");
    vm.qmp.cont().unwrap();
    assert!(vm.qmp.query_status().unwrap().running);
    let got = ask(&mut vm, guest, false);
    assert_eq!(
        got, *want,
        "the restored guest ({label} disks) answers differently"
    );
    let counters = read_counters(&mut vm);
    assert_eq!(
        counters, *want_counters,
        "the restored guest ({label} disks) read its disks: its page cache was not restored"
    );
    let stats = mnt.stats();
    vm.quit();
    mnt.unmount();
    stats
}

/// Format v2: the same checkpoint from qcow2 copies of the disks must find the
/// same pages, rebuild every page, and restore the guest with qcow2 disks.
fn qcow2_round_trip(
    guest: &Guest,
    dir: &Path,
    ram: &Path,
    state: &Path,
    raw: &Value,
    want: &Answers,
    want_counters: &ReadCounters,
) {
    let disks: Vec<DiskImage> = guest
        .disks
        .iter()
        .map(|d| {
            let path = d.with_extension("qcow2");
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(d)
                .arg(&path)
                .status()
                .unwrap();
            assert!(st.success(), "qemu-img convert {}", d.display());
            DiskImage {
                path,
                format: "qcow2",
            }
        })
        .collect();
    let ckpt = dir.join("vm-qcow2.ckpt");
    let (_, inspection) = create_and_verify(ram, &disks, state, &ckpt);
    for field in ["zero_pages", "disk_pages", "blob_pages", "blobs_stored"] {
        assert_eq!(inspection[field], raw[field], "qcow2 vs raw disks: {field}");
    }
    restore_and_check(guest, dir, &ckpt, &disks, want, want_counters);
}

/// Today (format v1) ckptfs must reference every page within its reach (on a
/// disk at a 4 KiB-aligned offset: the aligned partition's cached files among
/// them) and store every other distinct non-zero page once: the floor as seen
/// from 4 KiB offsets. With format v2 its reach is every 512-byte offset, so
/// every cached file page is referenced and it stores at most the floor + 1 %.
fn assert_against_floor(c: &Census, placed: &[Placed], ins: &Value) {
    for f in &c.file_pages {
        assert_eq!(
            f.in_ram, f.total,
            "not all file data is in the page cache: {f:?}"
        );
    }
    let n = |v: &Value| v.as_u64().unwrap();
    let (disk_pages, stored) = (n(&ins["disk_pages"]), n(&ins["blobs_stored"]));
    let (reach, floor) = if FORMAT_V2 {
        (c.on_disk_512_total(), c.floor_pages)
    } else {
        (c.on_disk_4k_total(), c.floor_pages_4k)
    };
    assert!(
        reach <= disk_pages && disk_pages <= c.on_disk_512_total(),
        "ckptfs references {disk_pages} pages to disks; {reach} are within its reach, {} on a disk",
        c.on_disk_512_total()
    );
    for (d, disk) in ins["disks"].as_array().unwrap().iter().enumerate() {
        let cached_files: u64 = placed
            .iter()
            .filter(|p| p.disk == d && (FORMAT_V2 || p.fs.mount.dev == ALIGNED_FS.mount.dev))
            .map(|p| c.files_on(p.fs.mount.dev).1)
            .sum();
        assert!(
            n(&disk["pages"]) >= cached_files,
            "disk {d}: ckptfs references {} pages, but {cached_files} cached file pages are there",
            disk["pages"]
        );
    }
    assert!(
        stored as f64 <= floor as f64 * 1.01,
        "ckptfs stores {stored} pages, the floor is {floor} (+1 %)"
    );
}

fn report(
    kernel: &Kernel,
    placed: &[Placed],
    c: &Census,
    summary: &Value,
    ins: &Value,
    stats: &Value,
    times: &[(&str, Duration)],
) {
    const MIB: f64 = 1024.0 * 1024.0;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let file_total: u64 = c.file_pages.iter().map(|f| f.total).sum();
    let file_in_ram: u64 = c.file_pages.iter().map(|f| f.in_ram).sum();
    let ckpt_bytes = n(&ins["checkpoint_bytes"]);
    let floor_bytes = c.floor_pages * 4096;
    println!(
        "qemu_linux: {}, {GUEST_MIB} MiB guest under TCG",
        kernel.package()
    );
    println!(
        "  guest RAM                {:>7} pages, {} zero",
        c.pages, c.zero
    );
    println!("  file data in page cache  {file_in_ram:>7} of {file_total} file pages");
    for (f, p) in c.file_pages.iter().zip(placed) {
        println!(
            "    {:<5} {:>4} B blocks, disk {} byte {:<9}{:>6} of {}",
            f.dev, p.fs.block_size, p.disk, p.offset, f.in_ram, f.total
        );
    }
    println!(
        "  on a disk, 512 B offsets {:>7} pages {:?}",
        c.on_disk_512_total(),
        c.on_disk_512
    );
    println!(
        "  on a disk, 4 KiB offsets {:>7} pages {:?}",
        c.on_disk_4k_total(),
        c.on_disk_4k
    );
    println!(
        "  ckptfs (format v{}, raw)  {:>7} disk refs {:?}, {} blob pages, {} stored",
        ins["version"],
        n(&ins["disk_pages"]),
        ins["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| n(&d["pages"]))
            .collect::<Vec<_>>(),
        n(&ins["blob_pages"]),
        n(&ins["blobs_stored"])
    );
    println!(
        "  floor                    {:>7} pages = {:.1} MiB (4 KiB offsets only: {} pages)",
        c.floor_pages,
        floor_bytes as f64 / MIB,
        c.floor_pages_4k
    );
    println!(
        "  checkpoint               {:.1} MiB = {:.1} % of RAM; floor = {:.1} % of RAM; checkpoint / floor = {:.2} (stored pages / floor pages = {:.2})",
        ckpt_bytes as f64 / MIB,
        100.0 * ckpt_bytes as f64 / (GUEST_MIB as f64 * MIB),
        100.0 * floor_bytes as f64 / (GUEST_MIB as f64 * MIB),
        ckpt_bytes as f64 / floor_bytes as f64,
        n(&ins["blobs_stored"]) as f64 / c.floor_pages as f64,
    );
    println!(
        "  create                   {:.2} s; the mount served {} bytes to the restore ({} reads, prefetch included)",
        summary["seconds"].as_f64().unwrap_or(0.0),
        n(&stats["read_bytes"]),
        n(&stats["reads"])
    );
    let t: Vec<String> = times
        .iter()
        .map(|(k, d)| format!("{k} {:.1} s", d.as_secs_f64()))
        .collect();
    println!("  times                    {}", t.join(", "));
    let json = serde_json::json!({ "census": c, "inspect": ins, "create": summary });
    println!("QEMU_LINUX_RESULTS {json}");
}

/// `ckptfs qemu save` then `ckptfs qemu restore --exec`, as a user runs them,
/// twice: recording the loading set (refined with QEMU's page tables), then
/// using it. Each restored guest gives the same answers without reading its
/// disks, and the mount is gone once QEMU has quit.
#[test]
fn qemu_save_and_restore_commands_round_trip_a_linux_guest() {
    let t0 = Instant::now();
    guest::install_and_check_tools();
    let kernel = Kernel::cached();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let guest = Guest::build(dir, &kernel);
    let ram = dir.join("guest-ram");
    let disks = guest.raw_disks();
    // The saved VM's command line; ckptfs gets a QMP socket of its own (a QMP
    // socket serves one client at a time and the harness holds its own).
    let ckptfs_qmp = dir.join("ckptfs.qmp");
    let mut m = machine(&guest, dir, &ram, true, &disks, "cli");
    m.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", ckptfs_qmp.display()),
    ];
    let mut vm = Qemu::start(&m);
    vm.console.wait_ready(BOOT_TIMEOUT);
    let want = ask(&mut vm, &guest, true);
    let want_counters = read_counters(&mut vm);
    let booted = t0.elapsed();

    let ckpt = dir.join("vm.ckpt");
    let mut save: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"qemu", &"save", &"--qmp", &ckptfs_qmp, &"--mem-file", &ram];
    save.push(&"--disk");
    for d in &disks {
        save.push(&d.path);
    }
    save.extend([&"-o" as &dyn AsRef<_>, &ckpt, &"--quit"]);
    let report = ckptfs_json(&save);
    vm.wait_exit();
    assert_eq!(report["backend"], "pc.ram", "{report}");
    assert_eq!(report["vm"], "quit", "{report}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    let state = report["state_bytes"].as_u64().unwrap();
    assert!(
        state < 32 << 20,
        "{state} bytes of device state: RAM went into the stream"
    );
    assert!(
        report["checkpoint"]["disk_pages"].as_u64().unwrap() > 0,
        "{report}"
    );
    let saved = t0.elapsed() - booted;

    // The same command line again, through ckptfs: once recording the
    // loading set, once using it.
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = machine(&guest, dir, &ram, true, &disks, "cli-record");
    let t = Instant::now();
    let stats = cli_restore(
        &m,
        &ckpt,
        &mnt,
        &["--record-loading-set", "--refine-loading-set"],
        &guest,
        &want,
        &want_counters,
    );
    let log = std::fs::read_to_string(dir.join("cli-record.log")).unwrap();
    assert!(
        log.contains("recorded pages kept (those QEMU mapped)"),
        "the recorded loading set was not refined with QEMU's page tables: {log}"
    );
    let ck = ckptfs::Checkpoint::open(&ckpt).unwrap();
    let set = ckptfs::loadset::LoadingSet::open(&dir.join("vm.ckpt.ls"), &ck).unwrap();
    let set_pages: u64 = set.runs().iter().map(|r| u64::from(r.pages)).sum();
    assert!(
        set_pages > 0 && set_pages < ck.page_count(),
        "loading set of {set_pages} pages"
    );
    let m = machine(&guest, dir, &ram, true, &disks, "cli-restore");
    // QEMU 7.2: --wait-loading-set waits once QEMU has mapped `memory` and
    // reads again what the mapping dropped, before the VM resumes.
    let with_set = cli_restore(
        &m,
        &ckpt,
        &mnt,
        &["--wait-loading-set"],
        &guest,
        &want,
        &want_counters,
    );
    assert_eq!(
        with_set["loading_set"]["state"], "done",
        "the restore did not use the loading set: {with_set}"
    );
    println!(
        "qemu_cli: boot {:.1} s, save {:.1} s ({state} bytes of device state, checkpoint {:.1} MiB), two restores + checks {:.1} s; the recording mount served {} bytes",
        booted.as_secs_f64(),
        saved.as_secs_f64(),
        report["checkpoint"]["checkpoint_bytes"].as_f64().unwrap() / 1048576.0,
        t.elapsed().as_secs_f64(),
        stats["read_bytes"]
    );
    println!("qemu_cli: loading set {set_pages} pages after refinement");
}

/// `ckptfs qemu restore CKPT MNT OPTS --exec -- qemu-system-x86_64` of the
/// saved command line `m`: the guest must resume, answer `want` without
/// reading its disks, and the mount must be gone once QEMU has quit. Returns
/// the mount's stats.
fn cli_restore(
    m: &Machine,
    ckpt: &Path,
    mnt: &Path,
    opts: &[&str],
    guest: &Guest,
    want: &Answers,
    want_counters: &ReadCounters,
) -> Value {
    let mut launcher: Vec<std::ffi::OsString> = vec![
        qemu::ckptfs_bin().into(),
        "qemu".into(),
        "restore".into(),
        ckpt.into(),
        mnt.into(),
    ];
    launcher.extend(opts.iter().map(Into::into));
    launcher.extend(["--exec".into(), "--".into(), "qemu-system-x86_64".into()]);
    let mut vm = Qemu::start_via(m, &launcher);
    let t = Instant::now();
    while !vm.qmp.query_status().unwrap().running {
        assert!(
            t.elapsed() < MIGRATION_TIMEOUT,
            "ckptfs qemu restore did not resume the VM: {}",
            vm.console.context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = ask(&mut vm, guest, false);
    assert_eq!(
        got, *want,
        "the guest restored by ckptfs qemu restore {opts:?} answers differently"
    );
    assert_eq!(
        read_counters(&mut vm),
        *want_counters,
        "the guest restored by ckptfs qemu restore {opts:?} read its disks"
    );
    let stats: Value = serde_json::from_slice(&std::fs::read(mnt.join("stats")).unwrap()).unwrap();
    assert!(
        stats["reads"].as_u64().unwrap() > 0,
        "QEMU did not read the mount: {stats}"
    );
    vm.quit();
    assert!(
        !mnt.join("memory").exists(),
        "ckptfs qemu restore left {} mounted after QEMU quit",
        mnt.display()
    );
    stats
}

/// `ckptfs qemu save` refuses, in one line naming the backend and the fix,
/// RAM that is not a shared file; and names a socket nobody listens on.
#[test]
fn qemu_save_refuses_ram_that_is_not_a_shared_file_in_one_line() {
    guest::install_and_check_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ram = dir.join("ram");
    std::fs::File::create(&ram)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let backend = |share: &str| {
        vec![
            "-m".to_string(),
            "64M".into(),
            "-object".into(),
            format!(
                "memory-backend-file,id=pc.ram,size=64M,mem-path={},share={share}",
                ram.display()
            ),
            "-machine".into(),
            "pc,memory-backend=pc.ram".into(),
        ]
    };
    let cases: [(&str, Vec<String>, &[&str]); 3] = [
        (
            "private",
            backend("off"),
            &["pc.ram", "share=off", "add share=on"],
        ),
        (
            "anonymous",
            vec!["-m".into(), "64M".into()],
            &["not file-backed", "memory-backend-file", "share=on"],
        ),
        ("none", Vec::new(), &["no QEMU QMP socket at", "none.qmp"]),
    ];
    for (name, args, want) in cases {
        let qmp = dir.join(format!("{name}.qmp"));
        let _qemu = (!args.is_empty()).then(|| Idle::start(&args, &qmp));
        let out = std::process::Command::new(qemu::ckptfs_bin())
            .args(["qemu", "save", "--qmp"])
            .arg(&qmp)
            .arg("--mem-file")
            .arg(&ram)
            .arg("-o")
            .arg(dir.join("vm.ckpt"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the save succeeded");
        assert_eq!(err.lines().count(), 1, "{name}: not one line: {err}");
        for w in want {
            assert!(err.contains(w), "{name}: {err:?} does not say {w:?}");
        }
        assert!(
            !dir.join("vm.ckpt").exists(),
            "{name}: a checkpoint was written"
        );
    }
}
