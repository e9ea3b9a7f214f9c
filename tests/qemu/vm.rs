//! A QEMU process under TCG with its serial console on stdio and QMP on a unix
//! socket; killed on drop, so a failed assertion never leaves a guest running.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckptfs::qemu::qmp::Qmp;

/// Printed by the guest's init when its command loop is ready.
pub const READY: &str = "@@READY";
/// Printed by the guest's command loop after each command, with its exit status.
pub const DONE: &str = "@@DONE ";

/// A disk image as QEMU attaches it.
#[derive(Clone)]
pub struct DiskImage {
    pub path: PathBuf,
    /// QEMU's format name: raw or qcow2.
    pub format: &'static str,
}

/// One QEMU machine: guest RAM in a file, a kernel, disks.
pub struct Machine<'a> {
    /// Guest RAM size.
    pub mem_mib: u64,
    /// The memory-backend-file's mem-path.
    pub mem_path: &'a Path,
    /// share=on (the RAM file receives every guest write) or share=off
    /// (MAP_PRIVATE: the file is only read).
    pub share: bool,
    /// Kernel, initramfs and command line (the same on save and restore, so the
    /// machines match).
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// Attached read-only as virtio-blk, in order (vda, vdb, ...).
    pub disks: &'a [DiskImage],
    /// Start with `-incoming defer`, waiting for `migrate-incoming`.
    pub incoming: bool,
    /// Where QMP's socket and QEMU's log go (a temp dir of this test).
    pub run_dir: &'a Path,
    /// A name for this QEMU's socket and log files.
    pub name: &'a str,
    /// More QEMU arguments (e.g. a second -qmp socket, -S).
    pub extra_args: Vec<String>,
    /// Another RAM backend instead of the memory-backend-file on `mem_path`
    /// (e.g. `memory-backend-ram,id=pc.ram,size=1024M`).
    pub ram_object: Option<String>,
}

impl Machine<'_> {
    /// This machine's QMP socket (the harness's own).
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp", self.name))
    }

    /// The QEMU command line, without the program.
    pub fn args(&self, qmp: &Path) -> Vec<String> {
        let share = if self.share { "on" } else { "off" };
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            format!("{}M", self.mem_mib),
            "-object".into(),
            self.ram_object.clone().unwrap_or_else(|| {
                format!(
                    "memory-backend-file,id=pc.ram,size={}M,mem-path={},share={share}",
                    self.mem_mib,
                    self.mem_path.display()
                )
            }),
            "-machine".into(),
            "pc,memory-backend=pc.ram".into(),
            "-kernel".into(),
            self.vmlinuz.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.cmdline.into(),
            "-serial".into(),
            "stdio".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-no-reboot".into(),
        ];
        for d in self.disks {
            a.push("-drive".into());
            a.push(format!(
                "file={},format={},if=virtio,readonly=on",
                d.path.display(),
                d.format
            ));
        }
        if self.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// The QEMU process and its log; dropping it kills the process.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connect to QMP once QEMU has created its socket, or panic if QEMU exits first.
    fn connect_qmp(&mut self, path: &Path) -> Qmp {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited with {status}: {}", self.log_text());
            }
            match Qmp::connect(path, Duration::from_millis(200)) {
                Ok(q) => return q,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                    panic!("{e}; QEMU log: {}", self.log_text())
                }
                Err(_) => {}
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A running QEMU; dropping it kills the process.
pub struct Qemu {
    pub qmp: Qmp,
    pub console: Console,
    process: Process,
}

impl Qemu {
    /// Start `m` and connect to its QMP socket.
    pub fn start(m: &Machine) -> Qemu {
        Qemu::start_via(m, &["qemu-system-x86_64".into()])
    }

    /// Start `m` through `launcher` (a program and its arguments, the last
    /// being the QEMU to run, e.g. `ckptfs qemu restore ... --exec --
    /// qemu-system-x86_64`), which gets the console's stdio; killing it on
    /// drop must stop QEMU.
    pub fn start_via(m: &Machine, launcher: &[std::ffi::OsString]) -> Qemu {
        let qmp_path = m.qmp_path();
        let log = m.run_dir.join(format!("{}.log", m.name));
        let child = Command::new(&launcher[0])
            .args(&launcher[1..])
            .args(m.args(&qmp_path))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("running qemu-system-x86_64 (scripts/setup-qemu.sh installs it)");
        // Owned by a guard before anything can panic, so the process is killed.
        let mut process = Process { child, log };
        let console = Console::new(
            process.child.stdin.take().unwrap(),
            process.child.stdout.take().unwrap(),
            process.log.clone(),
        );
        let qmp = process.connect_qmp(&qmp_path);
        Qemu {
            qmp,
            console,
            process,
        }
    }

    /// `quit` over QMP, then wait (up to 20 s) for the process to exit 0.
    pub fn quit(mut self) {
        self.qmp.quit();
        self.wait_exit();
    }

    /// Wait (up to 20 s) for the process to exit 0 (QEMU told to quit by
    /// someone else, or a launcher that exits after QEMU).
    pub fn wait_exit(mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                assert!(
                    status.success(),
                    "QEMU exited with {status}: {}",
                    self.process.log_text()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("QEMU did not exit after quit: {}", self.process.log_text());
    }
}

/// A QEMU that never starts its guest (`-S`), for refusals; killed on drop.
pub struct Idle(Child);

impl Idle {
    /// `qemu-system-x86_64 -S ARGS -qmp unix:QMP,...`, once its socket is up.
    pub fn start(args: &[String], qmp: &Path) -> Idle {
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
            .args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("running qemu-system-x86_64");
        let mut idle = Idle(child);
        let t0 = Instant::now();
        while !qmp.exists() {
            if let Ok(Some(st)) = idle.0.try_wait() {
                panic!("QEMU {args:?} exited with {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        idle
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's serial console: a command loop in its init reads one shell
/// command per line, runs it and prints `@@DONE <status>`.
pub struct Console {
    stdin: ChildStdin,
    lines: Receiver<String>,
    transcript: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
}

impl Console {
    fn new(stdin: ChildStdin, stdout: std::process::ChildStdout, log: PathBuf) -> Console {
        let (tx, lines) = mpsc::channel();
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let t = Arc::clone(&transcript);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                t.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Console {
            stdin,
            lines,
            transcript,
            log,
        }
    }

    /// The last console lines and QEMU's log, for failure messages.
    pub fn context(&self) -> String {
        let t = self.transcript.lock().unwrap();
        let tail = t[t.len().saturating_sub(30)..].join("\n");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("\n--- console (last lines) ---\n{tail}\n--- QEMU log ---\n{log}")
    }

    fn next_line(&self, deadline: Instant, waiting_for: &str) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("timed out waiting for {waiting_for}{}", self.context())
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "QEMU closed the console waiting for {waiting_for}{}",
                    self.context()
                )
            }
        }
    }

    /// Wait for the guest's init to print [`READY`] (the kernel booted, the
    /// modules loaded and the disks mounted).
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.next_line(deadline, "the guest to boot") != READY {}
    }

    /// Run `cmd` in the guest's shell and return its output; panics when it
    /// fails or takes longer than `timeout`.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> String {
        assert!(!cmd.contains('\n'), "one line per command");
        writeln!(self.stdin, "{cmd}").expect("writing to the guest console");
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        loop {
            let line = self.next_line(deadline, cmd);
            if let Some(status) = line.strip_prefix(DONE) {
                assert_eq!(
                    status.trim(),
                    "0",
                    "guest command {cmd:?} failed:\n{out}{}",
                    self.context()
                );
                return out;
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
}
