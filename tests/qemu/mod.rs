//! Support for `tests/qemu_linux.rs`: a Debian kernel and busybox guest under
//! QEMU TCG, its disks, the `ckptfs` CLI, and an independent count of the
//! checkpoint-size floor. The QMP client is the library's (`ckptfs::qemu::qmp`).

pub mod floor;
pub mod guest;
pub mod initramfs;
pub mod mount;
pub mod vm;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// The `ckptfs` binary of this build (`ckptfs mount` runs `ckptfs-mountd` from beside it).
pub fn ckptfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckptfs")
}

/// Run `ckptfs ARGS... --json` and parse its output; panics with its stderr on failure.
pub fn ckptfs_json(args: &[&dyn AsRef<OsStr>]) -> serde_json::Value {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = Command::new(ckptfs_bin())
        .args(&args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ckptfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `path` quoted for a POSIX shell (QEMU runs `exec:` URIs with /bin/sh -c).
pub fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}
