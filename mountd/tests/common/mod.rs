//! Shared helpers for the real-mount tests: fixtures and a mount guard that
//! always unmounts (`fusermount3 -u -z`), even when the test panics.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mountd::fixture::{self, Fixture};

/// Guest size of the test fixture.
pub const GUEST_MIB: u64 = 32;
/// Disk size of the test fixture.
pub const DISK_MIB: u64 = 16;

pub fn mountd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckptfs-mountd")
}

/// FUSE must be there: the project's machines all have it, so never skip.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need FUSE (see scripts/setup.sh)"
    );
    assert!(
        Command::new("fusermount3").arg("-V").output().is_ok(),
        "fusermount3 is missing: install fuse3 (scripts/setup.sh)"
    );
}

/// A fresh fixture in its own temp dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub fx: Fixture,
    pub mnt: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        require_fuse();
        let dir = tempfile::tempdir().unwrap();
        let fx = fixture::write(dir.path(), GUEST_MIB << 20, DISK_MIB << 20, 42).unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        Env { dir, fx, mnt }
    }

    pub fn memory(&self) -> PathBuf {
        self.mnt.join("memory")
    }

    pub fn original(&self) -> Vec<u8> {
        fs::read(&self.fx.mem).unwrap()
    }

    /// Mount detached (the default mode): returns once the parent exited 0.
    pub fn mount(&self, args: &[&str]) -> Mount {
        let out = Command::new(mountd_bin())
            .arg(&self.fx.ckpt)
            .arg(&self.mnt)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ckptfs-mountd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = Mount {
            mnt: self.mnt.clone(),
            child: None,
        };
        assert!(
            is_mounted(&self.mnt),
            "parent exited 0 but nothing is mounted"
        );
        m
    }

    /// Mount in the foreground as a child process, stderr into `log`.
    pub fn mount_foreground(&self, args: &[&str], log: &Path) -> Mount {
        let child = Command::new(mountd_bin())
            .arg(&self.fx.ckpt)
            .arg(&self.mnt)
            .arg("--foreground")
            .args(args)
            .env("RUST_LOG", "mountd=info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount {
            mnt: self.mnt.clone(),
            child: Some(child),
        };
        let t0 = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ckptfs-mountd exited with {status} before mounting: {}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "mount did not appear"
            );
            thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

/// Whether `mnt` is a mount point in this mount namespace.
pub fn is_mounted(mnt: &Path) -> bool {
    let mnt = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    let want = mnt.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A live mount; dropping it unmounts lazily and reaps a foreground daemon.
pub struct Mount {
    pub mnt: PathBuf,
    pub child: Option<Child>,
}

impl Mount {
    pub fn stats(&self) -> serde_json::Value {
        let text = fs::read_to_string(self.mnt.join("stats")).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stats is not JSON ({e}): {text}"))
    }

    /// `fusermount3 -u` (not lazy), then wait for the daemon to exit.
    pub fn unmount(mut self) -> Option<std::process::ExitStatus> {
        let pid = self.stats()["pid"].as_u64().unwrap() as i32;
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "fusermount3 -u failed");
        let status = self.wait_exit(pid);
        assert!(!is_mounted(&self.mnt));
        status
    }

    /// Wait (up to 10 s) for daemon `pid` to exit; returns its status if it is our child.
    pub fn wait_exit(&mut self, pid: i32) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        if let Some(mut c) = self.child.take() {
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    return Some(s);
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    panic!("daemon did not exit after unmount");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        while Path::new(&format!("/proc/{pid}")).exists() {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "daemon did not exit after unmount"
            );
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// xxh-free content hash for "unchanged" checks.
pub fn hash_file(p: &Path) -> u32 {
    crc32fast::hash(&fs::read(p).unwrap())
}

/// pread with O_DIRECT, 4 KiB at a time, so each read reaches the daemon alone.
pub struct DirectFile {
    fd: std::fs::File,
    buf: *mut u8,
}

impl DirectFile {
    pub fn open(p: &Path) -> DirectFile {
        use std::os::unix::fs::OpenOptionsExt;
        let fd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)
            .unwrap();
        let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let buf = unsafe { std::alloc::alloc(layout) };
        assert!(!buf.is_null());
        DirectFile { fd, buf }
    }

    /// Read page `page`; Err(errno) on failure.
    pub fn read_page(&self, page: u64) -> Result<Vec<u8>, i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` points to 4096 writable bytes owned by self.
        let n = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                self.buf.cast(),
                4096,
                (page * 4096) as libc::off_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: pread wrote `n` bytes into `buf`.
        Ok(unsafe { std::slice::from_raw_parts(self.buf, n as usize) }.to_vec())
    }
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: `buf` was allocated with this layout in `open`.
        unsafe { std::alloc::dealloc(self.buf, layout) };
    }
}
