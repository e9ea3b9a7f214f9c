//! `ckptfs qemu save` and `ckptfs qemu restore`.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ckptfs::Checkpoint;
use ckptfs::qemu::qmp::Version;
use ckptfs::qemu::restore::{self, Plan, sh_quote};
use ckptfs::qemu::save::{self, After, SaveOptions, SaveReport};
use clap::Subcommand;

mod exec;

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
            Some(cmd) => exec::exec_restore(self, &plan, &opts, cmd),
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
