//! `ckptfs mount` of a checkpoint, unmounted on drop (lazily, so a failed test
//! never leaves a mount behind even while QEMU still maps `memory`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ckptfs_bin;

/// A mounted checkpoint.
pub struct Mounted {
    pub dir: PathBuf,
    unmounted: bool,
}

impl Mounted {
    /// `ckptfs mount CKPT DIR` (the daemon detaches once the mount is up).
    pub fn new(ckpt: &Path, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new(ckptfs_bin())
            .arg("mount")
            .arg(ckpt)
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ckptfs mount failed (cargo test --workspace builds ckptfs-mountd beside ckptfs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted {
            dir: dir.to_path_buf(),
            unmounted: false,
        }
    }

    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    pub fn vmm_state(&self) -> PathBuf {
        self.dir.join("vmm-state")
    }

    /// The daemon's live counters.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("stats")).unwrap()).unwrap()
    }

    /// `fusermount3 -u`, which must succeed (nothing maps the file any more).
    pub fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -u {} failed", self.dir.display());
        self.unmounted = true;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.unmounted {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}
