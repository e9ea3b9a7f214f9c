//! Ctrl-C (SIGINT) or SIGTERM during `ckptfs create` leaves nothing behind: the
//! hidden temporary checkpoint is removed and the exit status is 128 + signal.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// A raw dump of `mib` MiB of pseudo-random pages (every page is stored, so
/// `create` works for a while).
fn random_dump(path: &std::path::Path, mib: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

fn interrupted_create_leaves_no_temp_file(signal: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("vm.mem");
    random_dump(&mem, 1024);
    let out = dir.path().join("vm.ckpt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(["create", "--mem"])
        .arg(&mem)
        .arg("-o")
        .arg(&out)
        .spawn()
        .unwrap();
    let temp = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".vm.ckpt.tmp"))
    };
    let t0 = Instant::now();
    while temp().is_none() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "create ended before it could be interrupted"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no temp file appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + signal), "{status}");
    assert!(temp().is_none(), "the temporary checkpoint was left behind");
    assert!(!out.exists(), "a partial checkpoint appeared");
}

#[test]
fn ctrl_c_during_create_removes_the_temp_file() {
    interrupted_create_leaves_no_temp_file(libc::SIGINT);
}

#[test]
fn sigterm_during_create_removes_the_temp_file() {
    interrupted_create_leaves_no_temp_file(libc::SIGTERM);
}
