//! Hostile and odd inputs (issue 10): a symlink planted at the output, input
//! modes, sparse files claiming huge sections, FIFOs and devices given as
//! inputs, an empty dump, and each bad page reported once.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ckptfs::format::{ENTRY_LEN, Header, Layout};
use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run the CLI, killing it (and failing) if it has not finished in 20 s.
fn ckptfs_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("ckptfs {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ckptfs(args: &[&str]) -> Output {
    ckptfs_env(args, &[])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_error_line(o: &Output, want: &str) {
    assert!(!o.status.success(), "expected failure");
    assert_eq!(stderr(o), format!("ckptfs: error: {want}\n"));
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn a_symlink_planted_at_the_output_is_replaced_not_followed() {
    let f = fixture(64, 16, 1);
    let victim = f.dir.path().join("victim");
    std::fs::write(&victim, b"root's file").unwrap();
    std::os::unix::fs::symlink(&victim, &f.ckpt).unwrap();
    // The name format v1 used for its temp file, planted too: never opened now.
    let old_tmp = f
        .dir
        .path()
        .join(format!(".vm.ckpt.tmp{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&f.disk),
        "-o",
        s(&f.ckpt),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
    assert!(std::fs::symlink_metadata(&f.ckpt).unwrap().is_file());
    ckptfs::Checkpoint::open(&f.ckpt).unwrap();
    // Nothing but the inputs, the checkpoint and the planted names is left.
    let mut names: Vec<String> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want = vec![
        "disk.img".to_string(),
        "mem.raw".into(),
        "victim".into(),
        "vm.ckpt".into(),
        format!(".vm.ckpt.tmp{}", std::process::id()),
    ];
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn a_checkpoint_is_no_more_readable_than_its_inputs() {
    let f = fixture(64, 16, 2);
    set_mode(&f.mem_path, 0o600);
    set_mode(&f.disk, 0o644);
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&f.disk),
        "-o",
        s(&f.ckpt),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&f.ckpt), 0o600);
    // A 0640 state file limits it as well.
    set_mode(&f.mem_path, 0o644);
    let state = f.dir.path().join("state");
    std::fs::write(&state, b"regs").unwrap();
    set_mode(&state, 0o640);
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--state",
        s(&state),
        "-o",
        s(&f.ckpt),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&f.ckpt), 0o640 & !ckptfs::atomic_file::umask());
    // Memory given as bytes (a VMM's own RAM) counts as 0600.
    let opts = ckptfs::CreateOptions {
        disks: vec![f.disk.clone()],
        ..Default::default()
    };
    let sum = ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    assert_eq!((sum.mode, mode(&f.ckpt)), (0o600, 0o600));
}

/// A sparse file whose header claims `page_count` pages and `state_len` bytes
/// of state, with valid CRCs over its (few) written bytes.
fn sparse_claim(path: &Path, page_count: u64, state_len: u64) {
    let disks = ckptfs::format::encode_disks(&[]);
    let parents = ckptfs::format::encode_parents(&[]);
    let layout = Layout::new(page_count, disks.len() as u64, parents.len() as u64);
    let h = Header {
        disks_crc: crc32fast::hash(&disks),
        parents_crc: crc32fast::hash(&parents),
        ..layout.finish(0, state_len)
    };
    let f = std::fs::File::create(path).unwrap();
    f.set_len(h.file_len()).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&h.encode(), 0).unwrap();
    f.write_all_at(&disks, h.disks_offset).unwrap();
    f.write_all_at(&parents, h.parents_offset).unwrap();
    assert_eq!(h.table_len, page_count * ENTRY_LEN as u64);
}

#[test]
fn sparse_files_claiming_huge_sections_are_refused_at_open_fast() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("pages.ckpt");
    sparse_claim(&pages, 1 << 28, 0);
    let state = dir.path().join("state.ckpt");
    sparse_claim(&state, 1, 4 << 30);
    let start = Instant::now();
    for cmd in ["inspect", "verify"] {
        let o = ckptfs(&[cmd, s(&pages)]);
        assert_error_line(
            &o,
            &format!(
                "checkpoint {}: page table section (0x108 + 0xc0000000) is not backed by data: the file has a hole at 0x1000",
                pages.display()
            ),
        );
        let o = ckptfs(&[cmd, s(&state)]);
        assert_error_line(
            &o,
            &format!(
                "checkpoint {}: VMM-state section of 4294967296 bytes is larger than the 268435456-byte limit",
                state.display()
            ),
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn fifos_and_devices_are_refused_by_type_without_hanging() {
    let f = fixture(64, 16, 3);
    let fifo = f.dir.path().join("fifo");
    mkfifo(&fifo);
    let not_regular =
        |what: &str| format!("{what} {}: not a regular file (a FIFO)", fifo.display());
    let o = ckptfs(&["inspect", s(&fifo)]);
    assert_error_line(&o, &not_regular("checkpoint"));
    let o = ckptfs(&["create", "--mem", s(&fifo), "-o", s(&f.ckpt)]);
    assert_error_line(&o, &not_regular("memory image"));
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&fifo),
        "-o",
        s(&f.ckpt),
    ]);
    assert_error_line(&o, &not_regular("disk image"));
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--state",
        s(&fifo),
        "-o",
        s(&f.ckpt),
    ]);
    assert_error_line(&o, &not_regular("VMM state file"));
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--state",
        "/dev/zero",
        "-o",
        s(&f.ckpt),
    ]);
    assert_error_line(
        &o,
        "VMM state file /dev/zero: not a regular file (a character device)",
    );
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--parent",
        s(&fifo),
        "-o",
        s(&f.ckpt),
    ]);
    assert_error_line(
        &o,
        &format!(
            "cannot use the parent checkpoint: {}",
            not_regular("checkpoint")
        ),
    );
    assert!(!f.ckpt.exists());
    // A good checkpoint whose disk was replaced by a FIFO, and verify --mem FIFO.
    let o = ckptfs(&[
        "create",
        "--mem",
        s(&f.mem_path),
        "--disk",
        s(&f.disk),
        "-o",
        s(&f.ckpt),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ckptfs(&["verify", s(&f.ckpt), "--mem", s(&fifo)]);
    assert_error_line(&o, &not_regular("memory image"));
    std::fs::remove_file(&f.disk).unwrap();
    mkfifo(&f.disk);
    let disk = std::path::absolute(&f.disk).unwrap();
    for cmd in ["inspect", "verify"] {
        let o = ckptfs(&[cmd, s(&f.ckpt)]);
        assert_error_line(
            &o,
            &format!(
                "checkpoint {} needs a backing disk image: disk image {}: not a regular file (a FIFO)",
                f.ckpt.display(),
                disk.display()
            ),
        );
    }
}

#[test]
fn an_empty_memory_dump_is_refused() {
    let f = fixture(16, 16, 4);
    std::fs::write(&f.mem_path, b"").unwrap();
    let o = ckptfs(&["create", "--mem", s(&f.mem_path), "-o", s(&f.ckpt)]);
    assert_error_line(
        &o,
        &format!(
            "memory image {} is empty (0 bytes): no guest memory to checkpoint",
            f.mem_path.display()
        ),
    );
    assert!(!f.ckpt.exists());
}

#[test]
fn verify_reports_and_logs_each_bad_page_once() {
    let f = fixture(256, 64, 5);
    let opts = ckptfs::CreateOptions {
        disks: vec![f.disk.clone()],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    // Corrupt two different blobs; every page sharing them is bad.
    let ck = ckptfs::Checkpoint::open(&f.ckpt).unwrap();
    let blobs: Vec<u64> = (0..256)
        .filter_map(|p| match ck.entry(ckptfs::PageIndex(p)).source {
            ckptfs::PageSource::Blob(b) => Some(b.0),
            _ => None,
        })
        .collect();
    let (b1, b2) = (blobs[0], *blobs.last().unwrap());
    let bad: Vec<u64> = (0..256)
        .filter(|&p| {
            matches!(ck.entry(ckptfs::PageIndex(p)).source,
                ckptfs::PageSource::Blob(b) if b.0 == b1 || b.0 == b2)
        })
        .collect();
    let at = |b: u64| (ck.header().blobs_offset + b * 4096 + 9) as usize;
    let (a1, a2) = (at(b1), at(b2));
    drop(ck);
    let mut bytes = std::fs::read(&f.ckpt).unwrap();
    bytes[a1] ^= 1;
    bytes[a2] ^= 1;
    std::fs::write(&f.ckpt, bytes).unwrap();
    for env in [&[][..], &[("RUST_LOG", "debug")][..]] {
        let o = ckptfs_env(&["verify", s(&f.ckpt)], env);
        assert!(!o.status.success());
        let err = stderr(&o);
        for p in &bad {
            let report = format!("  page {p}: ");
            let log = format!("verify: page {p}: ");
            assert_eq!(err.matches(&report).count(), 1, "{err}");
            let logged = if env.is_empty() { 0 } else { 1 };
            assert_eq!(err.matches(&log).count(), logged, "{err}");
            // The page's own description appears once per report line and log line.
            let named = format!("page {p} (guest address");
            assert_eq!(err.matches(&named).count(), 1 + logged, "{err}");
        }
    }
}

#[test]
fn each_failing_step_of_create_names_itself_and_leaves_no_temp_file() {
    let f = fixture(16, 16, 6);
    let missing_dir = f.dir.path().join("no/such/dir/vm.ckpt");
    let o = ckptfs(&["create", "--mem", s(&f.mem_path), "-o", s(&missing_dir)]);
    assert_error_line(
        &o,
        &format!(
            "creating a temporary file beside {}: No such file or directory (os error 2)",
            missing_dir.display()
        ),
    );
    // The output is a directory: everything is written, the rename fails.
    let dir_out = f.dir.path().join("out.d");
    std::fs::create_dir(&dir_out).unwrap();
    std::fs::write(dir_out.join("x"), b"x").unwrap();
    let before: Vec<_> = std::fs::read_dir(f.dir.path()).unwrap().collect();
    let o = ckptfs(&["create", "--mem", s(&f.mem_path), "-o", s(&dir_out)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!(
            "ckptfs: error: renaming the finished checkpoint into place as {}: ",
            dir_out.display()
        )) && err.lines().count() == 1,
        "{err}"
    );
    let after: Vec<_> = std::fs::read_dir(f.dir.path()).unwrap().collect();
    assert_eq!(
        before.len(),
        after.len(),
        "a temporary file was left behind"
    );
}
