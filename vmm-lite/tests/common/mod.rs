//! Helpers for the vmm-lite integration tests: they run the real binary on real KVM.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// These tests need /dev/kvm. Every machine of this project has it and CI checks it, so a
/// missing device is a failure, never a silent skip.
pub fn require_kvm() {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    assert!(
        kvm.is_ok(),
        "/dev/kvm is required for vmm-lite's tests: {:?}",
        kvm.err()
    );
}

pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm-lite"))
}

/// Runs vmm-lite with `args`, asserts success, returns the last JSON line of stdout.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = vmm().args(args).output().expect("running vmm-lite");
    assert!(
        out.status.success(),
        "vmm-lite {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON report");
    serde_json::from_str(last).expect("valid JSON report")
}

/// Runs vmm-lite with `args` expecting failure; returns stderr.
pub fn run_fails(args: &[&str]) -> String {
    let out: Output = vmm().args(args).output().expect("running vmm-lite");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "vmm-lite {args:?} should have failed"
    );
    assert!(
        !stderr.contains("panicked"),
        "vmm-lite {args:?} panicked: {stderr}"
    );
    stderr
}

/// A temp dir with a disk image.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
}

impl Setup {
    pub fn new(disk_size: &str) -> Setup {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        let out = vmm()
            .arg("mkdisk")
            .arg(&disk)
            .args(["--size", disk_size])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkdisk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Setup { dir, disk }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn p(&self, name: &str) -> String {
        s(&self.path(name))
    }

    pub fn disk(&self) -> String {
        s(&self.disk)
    }
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}
