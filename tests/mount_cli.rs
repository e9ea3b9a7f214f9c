//! `ckptfs mount` runs ckptfs-mountd (built beside it by `cargo test --workspace`)
//! and serves the guest RAM byte for byte; a bad checkpoint is refused before mounting.

mod common;

use std::process::Command;

use common::*;

fn mounted(point: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(point.to_str().unwrap())
}

/// Unmounts on drop, so a failed assertion does not leave a mount behind.
struct Unmount<'a>(&'a std::path::Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        if mounted(self.0) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(self.0)
                .status();
        }
    }
}

#[test]
fn mount_serves_memory_and_unmounts() {
    let f = fixture(512, 128, 31);
    let opts = ckptfs::CreateOptions {
        disks: vec![f.disk.clone()],
        scan_disks: true,
        ..Default::default()
    };
    ckptfs::create(&f.mem, &opts, &f.ckpt).unwrap();
    let point = f.dir.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    // Options go anywhere, before the positionals too.
    let st = Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(["mount", "--prefetch", "none"])
        .arg(&f.ckpt)
        .arg("--cache-mb=16")
        .arg(&point)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "ckptfs mount failed (is ckptfs-mountd built? cargo test --workspace builds it)"
    );
    let _guard = Unmount(&point);
    assert!(mounted(&point));
    assert_eq!(std::fs::read(point.join("memory")).unwrap(), f.mem);
    assert!(
        Command::new("fusermount3")
            .arg("-u")
            .arg(&point)
            .status()
            .unwrap()
            .success()
    );
    for _ in 0..100 {
        if !mounted(&point) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} still mounted after fusermount3 -u", point.display());
}

#[test]
fn mount_help_lists_the_daemon_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .args(["mount", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--wait-loading-set",
        "--record-loading-set",
        "--prefetch",
        "--foreground",
    ] {
        assert!(help.contains(opt), "{opt} missing from: {help}");
    }
}

#[test]
fn mounting_a_corrupt_checkpoint_is_refused_with_one_line() {
    let f = fixture(64, 16, 3);
    std::fs::write(&f.ckpt, b"not a checkpoint at all, just some bytes that are long enough to hold a header......................................................").unwrap();
    let point = f.dir.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ckptfs"))
        .arg("mount")
        .arg(&f.ckpt)
        .arg(&point)
        .output()
        .unwrap();
    let _guard = Unmount(&point);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("vm.ckpt") && err.contains("bad magic"),
        "{err}"
    );
    assert!(!mounted(&point));
}
