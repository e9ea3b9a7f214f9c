//! `ckptfs qemu restore --exec`: the mount daemon and QEMU as children of
//! this process, the incoming migration over a private QMP socket, the
//! loading set waited for or recorded, and everything stopped and unmounted
//! however this process ends.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ckptfs::Checkpoint;
use ckptfs::qemu::pagemap::{self, Touched};
use ckptfs::qemu::qmp::Qmp;
use ckptfs::qemu::restore::Plan;

use super::{INCOMING_TIMEOUT, MOUNT_TIMEOUT, QMP_TIMEOUT, RestoreArgs, one_line};
use crate::commands::mountd_path;

/// Prepare a child: its signal mask emptied (`main` blocks SIGINT, SIGTERM
/// and SIGHUP for its signal thread, and a mask survives fork and exec: QEMU
/// would ignore them), and SIGTERM sent to it when this process dies, however
/// it dies (the signal thread exits without unwinding).
fn supervised(cmd: &mut Command) {
    // SAFETY: sigemptyset, sigprocmask and prctl are async-signal-safe; the
    // closure touches only its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A private directory for QEMU's QMP socket, removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Result<RunDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("ckptfs-qemu-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mount daemon in the foreground, a child of this process: unmounted
/// and waited for on drop, and told to unmount (SIGTERM) if this process dies.
struct Daemon {
    child: Child,
    mountpoint: PathBuf,
    /// Its stderr until the mount is up (then passed through as it comes).
    early: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Daemon {
    fn start(ckpt: &Path, mountpoint: &Path, opts: &[OsString]) -> Result<Daemon> {
        let mut cmd = Command::new(mountd_path());
        cmd.arg(ckpt)
            .arg(mountpoint)
            .args(opts)
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        supervised(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", mountd_path().display()))?;
        let early = std::sync::Arc::new(std::sync::Mutex::new(Some(String::new())));
        let stderr = child.stderr.take().expect("piped");
        let tap = early.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match tap.lock().unwrap().as_mut() {
                    Some(buf) => {
                        buf.push_str(&line);
                        buf.push('\n');
                    }
                    None => eprintln!("{line}"),
                }
            }
        });
        let mut d = Daemon {
            child,
            mountpoint: mountpoint.to_owned(),
            early,
        };
        d.wait_mounted()?;
        Ok(d)
    }

    /// Until the mount point is another file system holding `memory`.
    fn wait_mounted(&mut self) -> Result<()> {
        let parent_dev = self
            .mountpoint
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.dev());
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                // Let the tap read what the daemon said last.
                std::thread::sleep(Duration::from_millis(50));
                let said = self.early.lock().unwrap().take().unwrap_or_default();
                bail!("{}", one_line(&said, st));
            }
            let dev = std::fs::metadata(&self.mountpoint).ok().map(|m| m.dev());
            if dev.is_some() && dev != parent_dev && self.mountpoint.join("memory").exists() {
                if let Some(said) = self.early.lock().unwrap().take() {
                    eprint!("{said}");
                }
                return Ok(());
            }
            if t0.elapsed() > MOUNT_TIMEOUT {
                bail!(
                    "{} was not mounted within {MOUNT_TIMEOUT:?}",
                    self.mountpoint.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The mount's live stats.
    fn stats(&self) -> Result<serde_json::Value> {
        let path = self.mountpoint.join("stats");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Until the loading set is in the page cache (or absent, or refused).
    fn wait_loading_set(&self) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < INCOMING_TIMEOUT {
            if self.stats()?["loading_set"]["state"] != "loading" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "the loading set of {} did not load within {INCOMING_TIMEOUT:?}",
            self.mountpoint.display()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let unmount = |lazy: bool| {
            let mut c = Command::new("fusermount3");
            c.arg("-u");
            if lazy {
                c.arg("-z");
            }
            c.arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // Lazily if something still holds the file (QEMU killed on an error path).
        if !unmount(false) {
            unmount(true);
        }
        // It writes a recorded loading set after the unmount: give it time.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU, a child of this process: killed on drop unless it has exited.
struct QemuChild(Child);

impl Drop for QemuChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Mount in the foreground, run QEMU, load the device state, resume, wait
/// for QEMU, unmount.
pub(super) fn exec_restore(
    args: &RestoreArgs,
    plan: &Plan,
    opts: &[OsString],
    cmd: &[OsString],
) -> Result<ExitCode> {
    let (ckpt, mountpoint) = (args.checkpoint.as_path(), args.mountpoint.as_path());
    // QEMU < 8.2 drops what the loader pushed before it mapped `memory`: wait
    // for the set once QEMU runs, and read that part again (see below).
    let wait_after_map = !plan.readonly && args.wants_wait();
    let t0 = Instant::now();
    let run = RunDir::new()?;
    let daemon = Daemon::start(ckpt, mountpoint, opts)?;
    if plan.readonly {
        daemon.wait_loading_set()?;
    }
    let socket = run.0.join("qmp.sock");
    let mut qemu_cmd = Command::new(&cmd[0]);
    qemu_cmd
        .args(plan.rewrite(&cmd[1..])?)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
    supervised(&mut qemu_cmd);
    let mut qemu = QemuChild(
        qemu_cmd
            .spawn()
            .with_context(|| format!("cannot run {}", Path::new(&cmd[0]).display()))?,
    );
    let mut qmp = connect(&mut qemu, &socket)?;
    // Connected: the socket's name is not needed any more, and nothing is
    // left behind if this process is killed (its signal thread does not unwind).
    drop(run);
    // QMP answers once the machine is built, so QEMU has mapped `memory`.
    let pushed_before_map = if wait_after_map {
        daemon.stats()?["loading_set"]["pushed_bytes"]
            .as_u64()
            .unwrap_or(0)
    } else {
        0
    };
    let status = qmp.query_status()?;
    if status.status != "inmigrate" {
        bail!(
            "QEMU is {} instead of waiting for the incoming migration",
            status.status
        );
    }
    plan.incoming(&mut qmp, INCOMING_TIMEOUT)?;
    if wait_after_map {
        daemon.wait_loading_set()?;
        reread_dropped(ckpt, opts, &plan.memory, pushed_before_map)?;
    }
    let start_paused = cmd[1..].iter().any(|a| a == "-S");
    if !start_paused && !qmp.query_status()?.running {
        qmp.cont()?;
    }
    log::info!(
        "qemu restore: {} restored into QEMU pid {} in {:.2} s",
        ckpt.display(),
        qemu.0.id(),
        t0.elapsed().as_secs_f64()
    );
    drop(qmp);
    let recording = args.refine && opts.iter().any(|o| o == "--record-loading-set");
    let mut touched = recording.then(|| Touched::new(qemu.0.id(), &plan.memory, plan.size / 4096));
    let st = loop {
        if let Some(st) = qemu.0.try_wait()? {
            break st;
        }
        match touched.as_mut() {
            Some(t) => {
                // QEMU may exit between the check and the read: keep what we have.
                let _ = t.sample();
                log::trace!("qemu restore: {} pages mapped by QEMU so far", t.count());
                std::thread::sleep(Duration::from_millis(50));
            }
            None => break qemu.0.wait()?,
        }
    };
    // The daemon writes a recorded loading set as it goes.
    drop(daemon);
    if let Some(t) = touched {
        refine_loading_set(ckpt, opts, &t)?;
    }
    Ok(match st.code() {
        Some(c) => ExitCode::from(c.clamp(0, 255) as u8),
        None => {
            use std::os::unix::process::ExitStatusExt;
            ExitCode::from(128 + st.signal().unwrap_or(0).clamp(0, 127) as u8)
        }
    })
}

/// Keep, of the loading set the mount recorded, the pages QEMU mapped: the
/// mount saw 2 MiB reads (QEMU's MADV_HUGEPAGE), QEMU's page tables say which
/// pages of them the guest used.
fn refine_loading_set(ckpt: &Path, opts: &[OsString], touched: &Touched) -> Result<()> {
    if !touched.found() {
        eprintln!(
            "ckptfs: warning: QEMU's mapping of the mount's memory was not found; the loading set stays as recorded"
        );
        return Ok(());
    }
    let path = loading_set_path(ckpt, opts);
    let ck = Checkpoint::open(ckpt)?;
    let (before, after) = pagemap::refine(&path, &ck, touched)
        .with_context(|| format!("refining the loading set {}", path.display()))?;
    eprintln!(
        "ckptfs: loading set {}: {after} of the {before} recorded pages kept (those QEMU mapped)",
        path.display()
    );
    Ok(())
}

/// The loading-set file the mount uses: `--loading-set FILE`, else `VM.ckpt.ls`.
fn loading_set_path(ckpt: &Path, opts: &[OsString]) -> PathBuf {
    opts.iter()
        .position(|o| o == "--loading-set")
        .and_then(|i| opts.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let mut p = ckpt.as_os_str().to_owned();
            p.push(".ls");
            PathBuf::from(p)
        })
}

/// Read again, through the mount, the first `bytes` of the loading set in
/// its order: the loader pushed them before QEMU < 8.2 mapped `memory`, and
/// the kernel dropped them then. A read-only open keeps the page cache, so
/// the pages stay for QEMU's faults.
fn reread_dropped(ckpt: &Path, opts: &[OsString], memory: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let ck = Checkpoint::open(ckpt)?;
    let Ok(set) = ckptfs::loadset::LoadingSet::open(&loading_set_path(ckpt, opts), &ck) else {
        return Ok(()); // no usable set: the mount said why
    };
    let file =
        std::fs::File::open(memory).with_context(|| format!("opening {}", memory.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    for r in set.runs() {
        if done >= bytes {
            break;
        }
        let (mut at, end) = (
            r.first_page * 4096,
            (r.first_page + u64::from(r.pages)) * 4096,
        );
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading {} at {at}", memory.display()))?;
            at += n as u64;
            if !r.zero {
                done += n as u64;
            }
        }
    }
    log::info!("qemu restore: read {done} bytes of the loading set again after QEMU mapped memory");
    Ok(())
}

/// Connect to QEMU's QMP socket once it is there; fails if QEMU exits first.
fn connect(qemu: &mut QemuChild, socket: &Path) -> Result<Qmp> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = qemu.0.try_wait()? {
            bail!("QEMU exited ({st}) before its QMP socket was up");
        }
        match Qmp::connect(socket, Duration::from_millis(100)) {
            Ok(q) => return Ok(q),
            Err(e) if t0.elapsed() > QMP_TIMEOUT => return Err(e.into()),
            Err(_) => {}
        }
    }
}
