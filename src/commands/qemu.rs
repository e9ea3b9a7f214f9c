//! `ckptfs qemu save` and `ckptfs qemu restore`.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ckptfs::Checkpoint;
use ckptfs::qemu::pagemap::{self, Touched};
use ckptfs::qemu::qmp::{Qmp, Version};
use ckptfs::qemu::restore::{self, Plan, sh_quote};
use ckptfs::qemu::save::{self, After, SaveOptions, SaveReport};
use clap::Subcommand;

/// How long QEMU may take to load the device state, and a mount to come up.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(300);
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

const RESTORE_USAGE: &str = "\
Mount a checkpoint made by `ckptfs qemu save` and print (or, with --exec, run)
the QEMU arguments that restore it.

Usage: ckptfs qemu restore VM.ckpt MOUNTPOINT [--json] [--qemu BINARY] [mount options]
                           [--exec [--] QEMU ARGS...]

  VM.ckpt MOUNTPOINT  first, then options
  --json              print the arguments and QMP steps as JSON
  --qemu BINARY       the QEMU whose version decides readonly=on (default
                      qemu-system-x86_64; with --exec, the program run)
  mount options       passed to ckptfs-mountd (`ckptfs mount --help`)
  --refine-loading-set
                      with --record-loading-set and --exec: keep, of the
                      recorded set, only the pages QEMU mapped (its page
                      tables, sampled every 50 ms), not every page of the
                      2 MiB windows its faults read
  --exec [--] QEMU ARGS...
                      run QEMU with ARGS (the saved VM's command line): its
                      memory backend of the saved id is replaced, any -incoming
                      dropped, the device state loaded over a private QMP
                      socket, the VM resumed (unless ARGS has -S); ckptfs waits
                      for QEMU, then unmounts, and exits with QEMU's status

Without --exec the mount stays up; stdout is the arguments to add to QEMU's
command line (in place of its memory-backend-file and any -incoming), stderr
says which QMP commands load the state. QEMU < 8.2 opens mem-path read-write,
which drops pages pushed into the page cache before QEMU maps the file, so
--wait-loading-set is left out of the mount there (the loading set is pushed
while QEMU runs); with --exec it then means: once QEMU has loaded the device
state, wait for the set, read again what QEMU's mapping dropped, then resume.
QEMU >= 8.2 gets readonly=on,rom=off and the mount waits for the set.";

/// `ckptfs qemu ...`.
#[derive(Subcommand, Debug)]
pub enum QemuCommand {
    /// Checkpoint a running QEMU VM whose RAM is a memory-backend-file with share=on:
    /// stop it, save its device state with x-ignore-shared, make the checkpoint from
    /// the RAM file and the disks, then resume it (or leave it paused, or quit it).
    Save {
        /// QEMU's QMP socket (-qmp unix:SOCKET,server=on,wait=off).
        #[arg(long)]
        qmp: PathBuf,
        /// The RAM file: mem-path of QEMU's memory-backend-file.
        #[arg(long)]
        mem_file: PathBuf,
        /// Disk images of the VM (raw), whose blocks the guest's page cache may hold.
        #[arg(long, num_args = 1..)]
        disk: Vec<PathBuf>,
        /// The checkpoint to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Quit QEMU once the checkpoint is written.
        #[arg(long, conflicts_with = "leave_paused")]
        quit: bool,
        /// Leave the VM paused (default: resume it if it was running).
        #[arg(long)]
        leave_paused: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mount a checkpoint and print (or, with --exec, run) the QEMU arguments that
    /// restore it: `ckptfs qemu restore VM.ckpt MOUNTPOINT [--json] [mount options]
    /// [--exec -- QEMU ARGS...]` (`ckptfs qemu restore --help` says more).
    #[command(disable_help_flag = true)]
    Restore {
        /// VM.ckpt MOUNTPOINT, options, and --exec -- QEMU ARGS...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
}

/// Run a `ckptfs qemu` command.
pub fn run(cmd: QemuCommand) -> Result<ExitCode> {
    match cmd {
        QemuCommand::Save {
            qmp,
            mem_file,
            disk,
            output,
            quit,
            leave_paused,
            json,
        } => {
            if super::same_file(&mem_file, &output)
                || disk.iter().any(|d| super::same_file(d, &output))
            {
                bail!(
                    "output {} is one of the input files; refusing to overwrite it",
                    output.display()
                );
            }
            let after = match (quit, leave_paused) {
                (true, _) => After::Quit,
                (_, true) => After::LeavePaused,
                _ => After::Resume,
            };
            let opts = SaveOptions {
                qmp,
                mem_file,
                disks: disk,
                output,
                after,
                progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                timeout: INCOMING_TIMEOUT,
            };
            let report = save::save(&opts)?;
            for w in &report.warnings {
                eprintln!("ckptfs: warning: {w}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_save(&opts.output, &report);
            }
            Ok(ExitCode::SUCCESS)
        }
        QemuCommand::Restore { args } => {
            let Some(args) = RestoreArgs::parse(&args)? else {
                println!("{RESTORE_USAGE}");
                return Ok(ExitCode::SUCCESS);
            };
            args.run()
        }
    }
}

fn print_save(out: &Path, r: &SaveReport) {
    let s = &r.checkpoint;
    println!(
        "wrote {}: QEMU {} ({}), RAM backend {}, {:.1} MiB of guest RAM in a {:.1} MiB checkpoint ({:.1} %), {} KiB of device state",
        out.display(),
        r.qemu_version,
        r.machine.as_deref().unwrap_or("machine type not sent"),
        r.backend,
        s.guest_bytes as f64 / 1048576.0,
        s.checkpoint_bytes as f64 / 1048576.0,
        100.0 * s.size_ratio,
        r.state_bytes.div_ceil(1024),
    );
    let paused = r
        .paused_seconds
        .map_or(String::new(), |p| format!(" after {p:.2} s paused"));
    println!("the VM is {}{paused}", r.vm);
}

/// `ckptfs qemu restore`'s command line.
#[derive(Debug)]
struct RestoreArgs {
    checkpoint: PathBuf,
    mountpoint: PathBuf,
    json: bool,
    /// Keep, of a recorded loading set, only the pages QEMU mapped.
    refine: bool,
    qemu: Option<PathBuf>,
    mount_opts: Vec<OsString>,
    /// Program and arguments after --exec.
    exec: Option<Vec<OsString>>,
}

impl RestoreArgs {
    /// Parse; None for --help.
    fn parse(args: &[OsString]) -> Result<Option<RestoreArgs>> {
        let (before, exec) = match args.iter().position(|a| a == "--exec") {
            Some(i) => {
                let mut rest = &args[i + 1..];
                if rest.first().is_some_and(|a| a == "--") {
                    rest = &rest[1..];
                }
                if rest.is_empty() {
                    bail!(
                        "--exec needs the QEMU program and its arguments: --exec -- qemu-system-x86_64 ARGS..."
                    );
                }
                (&args[..i], Some(rest.to_vec()))
            }
            None => (args, None),
        };
        let mut positional = Vec::new();
        let mut r = RestoreArgs {
            checkpoint: PathBuf::new(),
            mountpoint: PathBuf::new(),
            json: false,
            refine: false,
            qemu: None,
            mount_opts: Vec::new(),
            exec,
        };
        let mut it = before.iter();
        while let Some(a) = it.next() {
            match a.to_str() {
                Some("-h" | "--help") => return Ok(None),
                Some("--json") => r.json = true,
                Some("--refine-loading-set") => r.refine = true,
                Some("--qemu") => {
                    r.qemu = Some(it.next().context("--qemu needs a program")?.into());
                }
                Some(s) if s.starts_with("--qemu=") => r.qemu = Some(s["--qemu=".len()..].into()),
                _ if positional.len() < 2
                    && r.mount_opts.is_empty()
                    && !a.to_string_lossy().starts_with('-') =>
                {
                    positional.push(PathBuf::from(a));
                }
                _ => r.mount_opts.push(a.clone()),
            }
        }
        let [ckpt, mnt] = <[PathBuf; 2]>::try_from(positional)
            .map_err(|_| anyhow::anyhow!("usage: ckptfs qemu restore VM.ckpt MOUNTPOINT [options] [--exec -- QEMU ARGS...] (VM.ckpt and MOUNTPOINT first)"))?;
        if r.refine
            && (r.exec.is_none() || !r.mount_opts.iter().any(|o| o == "--record-loading-set"))
        {
            bail!("--refine-loading-set needs --record-loading-set and --exec");
        }
        r.checkpoint = ckpt;
        r.mountpoint =
            std::path::absolute(&mnt).with_context(|| format!("mount point {}", mnt.display()))?;
        Ok(Some(r))
    }

    /// The QEMU whose version matters.
    fn qemu_binary(&self) -> PathBuf {
        match (&self.exec, &self.qemu) {
            (Some(e), _) => PathBuf::from(&e[0]),
            (None, Some(q)) => q.clone(),
            (None, None) => PathBuf::from("qemu-system-x86_64"),
        }
    }

    fn run(&self) -> Result<ExitCode> {
        let ck = Checkpoint::open(&self.checkpoint)?;
        let binary = self.qemu_binary();
        let version = match restore::qemu_version(&binary) {
            Ok(v) => Some(v),
            Err(e) if self.exec.is_none() => {
                eprintln!(
                    "ckptfs: warning: {:#}; assuming QEMU older than 8.2 (no readonly=on)",
                    anyhow::Error::from(e)
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        let plan = Plan::new(&ck, &self.mountpoint, version)?;
        drop(ck);
        let opts = self.mount_options(&plan, version);
        match &self.exec {
            None => self.mount_and_print(&plan, &opts),
            Some(cmd) => exec_restore(self, &plan, &opts, cmd),
        }
    }

    /// The user's mount options, with --wait-loading-set only where QEMU
    /// opens the file read-only.
    fn mount_options(&self, plan: &Plan, version: Option<Version>) -> Vec<OsString> {
        let mut opts = self.mount_opts.clone();
        let wait = OsStr::new("--wait-loading-set");
        if plan.readonly {
            if !opts.iter().any(|o| o == wait) {
                opts.push(wait.into());
            }
        } else if opts.iter().any(|o| o == wait) {
            // With --exec, the wait happens once QEMU has mapped the file.
            if self.exec.is_none() {
                let v = version.map_or("of unknown version".into(), save::version_string);
                eprintln!(
                    "ckptfs: warning: QEMU {v} opens mem-path read-write, which drops pages pushed into the page cache before it maps the file: mounting without --wait-loading-set (the loading set is pushed while QEMU runs)"
                );
            }
            opts.retain(|o| o != wait);
        }
        opts
    }

    /// Whether the user asked for the loading set before the VM runs.
    fn wants_wait(&self) -> bool {
        self.mount_opts.iter().any(|o| o == "--wait-loading-set")
    }

    fn mount_and_print(&self, plan: &Plan, opts: &[OsString]) -> Result<ExitCode> {
        let out = Command::new(super::mountd_path())
            .arg(&self.checkpoint)
            .arg(&self.mountpoint)
            .args(opts)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot run {}", super::mountd_path().display()))?;
        let daemon_says = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{}", one_line(&daemon_says, out.status));
        }
        eprint!("{daemon_says}");
        let args = plan.args();
        if self.json {
            let v = serde_json::json!({
                "mountpoint": self.mountpoint,
                "plan": plan,
                "qemu_args": args,
                "qmp": plan.qmp_commands(),
                "mount_options": opts.iter().map(|o| o.to_string_lossy()).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        let line: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
        println!("{}", line.join(" "));
        eprintln!(
            "ckptfs: {} mounted on {}. Start the saved VM's QEMU command line (machine {}) with its memory-backend-file {} and any -incoming replaced by the arguments above, then send over QMP:",
            self.checkpoint.display(),
            self.mountpoint.display(),
            plan.machine.as_deref().unwrap_or("as saved"),
            plan.backend
        );
        for c in plan.qmp_commands() {
            eprintln!("  {c}");
        }
        eprintln!(
            "ckptfs: unmount once QEMU has exited: fusermount3 -u {}",
            sh_quote(&self.mountpoint.display().to_string())
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// What a failed ckptfs-mountd said, on one line (or its exit status).
fn one_line(said: &str, status: std::process::ExitStatus) -> String {
    let lines: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        format!("ckptfs-mountd failed ({status})")
    } else {
        lines.join("; ")
    }
}

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
        let mut cmd = Command::new(super::mountd_path());
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
            .with_context(|| format!("cannot run {}", super::mountd_path().display()))?;
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
fn exec_restore(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<RestoreArgs>> {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        RestoreArgs::parse(&v)
    }

    #[test]
    fn restore_args_split_at_exec_and_keep_mount_options() {
        let r = parse(&[
            "vm.ckpt",
            "/mnt/vm",
            "--json",
            "--cache-mb",
            "64",
            "--qemu=/opt/qemu",
            "--exec",
            "--",
            "qemu-system-x86_64",
            "-m",
            "1G",
            "--json",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.checkpoint, PathBuf::from("vm.ckpt"));
        assert_eq!(r.mountpoint, PathBuf::from("/mnt/vm"));
        assert!(r.json);
        assert_eq!(r.qemu, Some(PathBuf::from("/opt/qemu")));
        assert_eq!(
            r.mount_opts,
            vec![OsString::from("--cache-mb"), "64".into()]
        );
        let exec = r.exec.as_ref().unwrap();
        assert_eq!(exec[0], "qemu-system-x86_64");
        assert_eq!(
            exec.last().unwrap(),
            "--json",
            "QEMU's arguments are QEMU's"
        );
        assert_eq!(r.qemu_binary(), PathBuf::from("qemu-system-x86_64"));
    }

    #[test]
    fn restore_args_refuse_what_cannot_work() {
        assert!(parse(&["--help"]).unwrap().is_none());
        let e = parse(&["--cache-mb", "64", "vm.ckpt", "/mnt"])
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("VM.ckpt and MOUNTPOINT first"),
            "{e}"
        );
        let e = parse(&["vm.ckpt", "/mnt", "--exec"]).err().unwrap();
        assert!(
            e.to_string().contains("--exec needs the QEMU program"),
            "{e}"
        );
        let e = parse(&["vm.ckpt", "/mnt", "--refine-loading-set", "--exec", "qemu"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs --record-loading-set"), "{e}");
        assert!(
            parse(&[
                "vm.ckpt",
                "/mnt",
                "--record-loading-set",
                "--refine-loading-set",
                "--exec",
                "qemu"
            ])
            .unwrap()
            .unwrap()
            .refine
        );
    }
}
