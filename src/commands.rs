//! Subcommands of the `ckptfs` CLI.

mod qemu;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use ckptfs::verify::{self, Inspection, VerifyReport};
use ckptfs::{Checkpoint, CreateOptions, MemoryImage, OpenError, OpenOptions, Summary};
use clap::{Parser, Subcommand};

/// Space-optimized VM memory checkpoints and lazy restore through FUSE.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a checkpoint from a raw guest memory dump and the guest's disk images.
    Create {
        /// Raw guest memory dump (e.g. QEMU memory-backend-file, Firecracker memory file).
        #[arg(long)]
        mem: PathBuf,
        /// Disk image (raw or qcow2) whose bytes the guest's page cache may hold (repeatable).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Opaque VMM state to store in the checkpoint.
        #[arg(long)]
        state: Option<PathBuf>,
        /// An earlier checkpoint of the same guest: unchanged pages refer to it.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Output checkpoint.
        #[arg(short, long)]
        output: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what a checkpoint (a file or s3://BUCKET/PREFIX) holds.
    Inspect {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// For s3://: disk image to use instead of a recorded path (repeatable).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild every page, check every CRC, and optionally compare with the original dump.
    Verify {
        /// The checkpoint (a file or s3://BUCKET/PREFIX).
        checkpoint: PathBuf,
        /// For s3://: disk image to use instead of a recorded path (repeatable).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// For s3://: the block cache folder [default: /var/cache/ckptfs/remote].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// The original raw memory dump, compared byte for byte.
        #[arg(long)]
        mem: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Upload a checkpoint (and its loading set) to an S3-compatible object store.
    Push {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// Where: s3://BUCKET/PREFIX (endpoint and credentials from AWS_* variables).
        url: String,
        /// The loading set to push [default: CHECKPOINT.ls when it exists].
        #[arg(long)]
        loading_set: Option<PathBuf>,
        /// Push no loading set.
        #[arg(long)]
        no_loading_set: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a pushed checkpoint into a local file, byte for byte as pushed.
    Pull {
        /// s3://BUCKET/PREFIX.
        url: String,
        /// Output checkpoint (its loading set goes to OUTPUT.ls).
        output: PathBuf,
        /// Disk image to use instead of a recorded path, in disk-table order
        /// (repeatable; needed to write the loading set when the paths differ).
        #[arg(long)]
        disk: Vec<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a self-contained copy of a checkpoint that has parents (no parent needed to open it).
    Flatten {
        /// The checkpoint (e.g. an incremental checkpoint at the end of a chain).
        checkpoint: PathBuf,
        /// Output checkpoint.
        #[arg(short, long)]
        output: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a checkpoint's guest RAM as a FUSE file: `ckptfs mount VM.ckpt MOUNTPOINT
    /// [options]`, options anywhere (runs ckptfs-mountd; `ckptfs mount --help` lists them).
    #[command(disable_help_flag = true)]
    Mount {
        /// VM.ckpt MOUNTPOINT and ckptfs-mountd's options, in any order.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Checkpoint a running QEMU VM (`qemu save`), or restore one lazily from a
    /// mounted checkpoint (`qemu restore`).
    Qemu {
        #[command(subcommand)]
        command: qemu::QemuCommand,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Create {
            mem,
            disk,
            state,
            parent,
            output,
            json,
        } => create(&mem, disk, state, parent, &output, json),
        Command::Inspect {
            checkpoint,
            disk,
            json,
        } => match remote_url(&checkpoint)? {
            Some(url) => crate::remote_cmds::inspect(&url, disk, json),
            None => inspect(&checkpoint, json),
        },
        Command::Verify {
            checkpoint,
            disk,
            cache_dir,
            mem,
            json,
        } => match remote_url(&checkpoint)? {
            Some(url) => crate::remote_cmds::verify(&url, disk, cache_dir, mem.as_deref(), json),
            None => verify_cmd(&checkpoint, mem.as_deref(), json),
        },
        Command::Push {
            checkpoint,
            url,
            loading_set,
            no_loading_set,
            json,
        } => crate::remote_cmds::push(&checkpoint, &url, loading_set, no_loading_set, json),
        Command::Pull {
            url,
            output,
            disk,
            json,
        } => crate::remote_cmds::pull(&url, &output, disk, json),
        Command::Flatten {
            checkpoint,
            output,
            json,
        } => flatten(&checkpoint, &output, json),
        Command::Mount { args } => mount(&args),
        Command::Qemu { command } => qemu::run(command),
    }
}

/// The s3:// location `arg` names, if it names one.
fn remote_url(arg: &Path) -> Result<Option<ckptfs::remote::S3Url>> {
    match arg.to_str() {
        Some(s) if ckptfs::remote::is_remote(s) => Ok(Some(ckptfs::remote::S3Url::parse(s)?)),
        _ => Ok(None),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn create(
    mem: &Path,
    disks: Vec<PathBuf>,
    state: Option<PathBuf>,
    parent: Option<PathBuf>,
    out: &Path,
    json: bool,
) -> Result<ExitCode> {
    if let Some(s) = state.as_deref().filter(|s| same_file(s, out)) {
        bail!(
            "output {} is one of the input files ({}); refusing to overwrite it",
            out.display(),
            s.display()
        );
    }
    let image = MemoryImage::open(mem)?;
    let (vmm_state, input_modes) = match state {
        Some(p) => {
            let (bytes, meta) = ckptfs::input::read_regular(&p, ckptfs::format::MAX_STATE_LEN)
                .with_context(|| format!("VMM state file {}", p.display()))?;
            (Some(bytes), vec![ckptfs::input::mode_bits(&meta)])
        }
        None => (None, Vec::new()),
    };
    let opts = CreateOptions {
        disks,
        scan_disks: true,
        parent,
        vmm_state,
        input_modes,
        progress: std::io::stderr().is_terminal(),
        ..Default::default()
    };
    let summary = ckptfs::create::create_from_image(&image, &opts, out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(out, &summary);
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn print_summary(out: &Path, s: &Summary) {
    println!(
        "wrote {} in {:.2}s ({:.0} MiB/s of guest RAM)",
        out.display(),
        s.seconds,
        mib(s.guest_bytes) / s.seconds.max(1e-9)
    );
    println!(
        "  guest RAM   {:>10.1} MiB  {:>9} pages",
        mib(s.guest_bytes),
        s.pages
    );
    println!(
        "  zero        {:>10.1} MiB  {:>9} pages  {:5.1}%",
        mib(s.zero_pages * 4096),
        s.zero_pages,
        pct(s.zero_pages, s.pages)
    );
    println!(
        "  disk        {:>10.1} MiB  {:>9} pages  {:5.1}%",
        mib(s.disk_pages * 4096),
        s.disk_pages,
        pct(s.disk_pages, s.pages)
    );
    if s.parent_pages > 0 {
        println!(
            "  parent      {:>10.1} MiB  {:>9} pages  {:5.1}%",
            mib(s.parent_pages * 4096),
            s.parent_pages,
            pct(s.parent_pages, s.pages)
        );
    }
    println!(
        "  blob        {:>10.1} MiB  {:>9} pages  {:5.1}%  ({} stored after dedup)",
        mib(s.blob_pages * 4096),
        s.blob_pages,
        pct(s.blob_pages, s.pages),
        s.blobs_stored
    );
    if let Some(ix) = &s.index {
        let phases: Vec<String> = ix.disks.iter().map(|d| d.phases.to_string()).collect();
        println!(
            "  disk index  {:>10.1} MiB  {:>9} windows in {:.2}s (phases mod 4096: {})",
            mib(ix.memory_bytes),
            ix.windows,
            ix.seconds,
            phases.join(" | ")
        );
    }
    println!(
        "  checkpoint  {:>10.1} MiB  = {:.1}% of guest RAM",
        mib(s.checkpoint_bytes),
        100.0 * s.size_ratio
    );
}

/// Show what the checkpoint holds; when a disk or parent cannot be used, show
/// it anyway (marked) and fail with the line `mount` would print.
fn inspect(path: &Path, json: bool) -> Result<ExitCode> {
    let (ck, unusable) = match Checkpoint::open(path) {
        Ok(ck) => (ck, None),
        Err(
            e @ (OpenError::Disk { .. }
            | OpenError::Parent { .. }
            | OpenError::ParentChanged { .. }),
        ) => {
            let lenient = OpenOptions {
                allow_missing: true,
                ..OpenOptions::default()
            };
            (Checkpoint::open_with(path, &lenient)?, Some(e))
        }
        Err(e) => return Err(e.into()),
    };
    let ins = verify::inspect(&ck);
    if json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
    } else {
        print_inspection(&ins);
    }
    if let Some(e) = unusable {
        return Err(e.into());
    }
    Ok(if ins.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_inspection(i: &Inspection) {
    println!(
        "{}: ckptfs checkpoint, format version {}",
        i.path, i.version
    );
    println!(
        "  guest RAM   {:>10.1} MiB  {:>9} pages",
        mib(i.guest_bytes),
        i.pages
    );
    for (kind, n) in [
        ("ZERO", i.zero_pages),
        ("DISK", i.disk_pages),
        ("PARENT", i.parent_pages),
        ("BLOB", i.blob_pages),
    ] {
        println!("  {kind:<10}  {n:>10} pages  {:5.1}%", pct(n, i.pages));
    }
    println!("  blobs       {:>10} stored", i.blobs_stored);
    println!("  VMM state   {:>10} bytes", i.vmm_state_bytes);
    println!(
        "  checkpoint  {:>10.1} MiB  = {:.1}% of guest RAM",
        mib(i.checkpoint_bytes),
        100.0 * i.size_ratio
    );
    for (n, d) in i.disks.iter().enumerate() {
        println!(
            "  disk {n}: {} ({}, {:.1} MiB, {} pages reference it){}",
            d.path,
            d.format.name(),
            mib(d.size),
            d.pages,
            d.missing
                .as_ref()
                .map(|m| format!(" UNUSABLE: {m}"))
                .unwrap_or_default()
        );
    }
    for (n, p) in i.parents.iter().enumerate() {
        println!(
            "  parent {n}: {} ({:.1} MiB, identity {}, {} pages reference it){}",
            p.path,
            mib(p.size),
            p.identity,
            p.pages,
            p.missing
                .as_ref()
                .map(|m| format!(" UNUSABLE: {m}"))
                .unwrap_or_default()
        );
    }
    if i.invalid_entries > 0 {
        println!("  INVALID page-table entries: {}", i.invalid_entries);
    }
    if i.chain.len() > 1 {
        print_chain(i);
    }
}

fn print_chain(i: &Inspection) {
    println!(
        "  chain       {:>10} files, this checkpoint first; the pages each one holds:",
        i.chain.len()
    );
    for (n, l) in i.chain.iter().enumerate() {
        let parents: Vec<String> = l
            .parents
            .iter()
            .map(|p| p.map_or("missing".into(), |p| format!("#{p}")))
            .collect();
        let parents = match parents.is_empty() {
            true => String::new(),
            false => format!(", parent {}", parents.join(" ")),
        };
        println!(
            "    #{n} {:>9} pages {:5.1}%  {} ({:.1} MiB, {} blobs, {} PARENT entries{parents})",
            l.holds,
            pct(l.holds, i.pages),
            l.path,
            mib(l.size),
            l.blobs_stored,
            l.stored.parent
        );
    }
    if i.unresolved_pages > 0 {
        println!(
            "    {} pages come from a parent that cannot be used",
            i.unresolved_pages
        );
    }
}

fn flatten(path: &Path, out: &Path, json: bool) -> Result<ExitCode> {
    let ck = Checkpoint::open(path)?;
    let s = ckptfs::flatten::flatten(&ck, out, std::io::stderr().is_terminal())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "wrote {} in {:.2}s: {} checkpoint files made one",
        out.display(),
        s.seconds,
        s.chain_files
    );
    for (kind, n) in [
        ("ZERO", s.zero_pages),
        ("DISK", s.disk_pages),
        ("BLOB", s.blob_pages),
    ] {
        println!("  {kind:<10}  {n:>10} pages  {:5.1}%", pct(n, s.pages));
    }
    println!(
        "  blobs       {:>10} stored ({} copied from parents)",
        s.blobs_stored, s.blobs_from_ancestors
    );
    println!(
        "  checkpoint  {:>10.1} MiB, {} disk images",
        mib(s.checkpoint_bytes),
        s.disks
    );
    Ok(ExitCode::SUCCESS)
}

fn verify_cmd(path: &Path, mem: Option<&Path>, json: bool) -> Result<ExitCode> {
    let ck = Checkpoint::open(path)?;
    let dump = mem.map(MemoryImage::open).transpose()?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(ck.page_count())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = verify::verify(&ck, dump.as_ref().map(MemoryImage::bytes), |done| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(path, &report);
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) fn print_report(path: &Path, r: &VerifyReport) {
    let against = if r.compared_with_dump {
        " and matches the memory dump"
    } else {
        ""
    };
    let through = match r.chain_files {
        1 => String::new(),
        n => format!(" through a chain of {n} checkpoint files"),
    };
    if r.ok() {
        println!(
            "{}: OK: all {} pages rebuild with correct CRCs{through}{against}",
            path.display(),
            r.pages
        );
        return;
    }
    eprintln!(
        "{}: FAILED: {} of {} pages are bad",
        path.display(),
        r.bad_pages,
        r.pages
    );
    for b in &r.first_bad {
        eprintln!("  page {}: {}", b.page, b.problem);
    }
    if r.bad_pages as usize > r.first_bad.len() {
        eprintln!(
            "  ... and {} more",
            r.bad_pages as usize - r.first_bad.len()
        );
    }
}

/// Find `ckptfs-mountd` next to this executable, else on PATH.
/// The daemon: beside this executable (cargo builds both into one folder),
/// else on PATH.
fn mountd_path() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("ckptfs-mountd")));
    sibling
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ckptfs-mountd"))
}

/// Exec ckptfs-mountd with the arguments as given: it parses them (options go
/// anywhere, as in every clap and mount(8) tool).
fn mount(args: &[std::ffi::OsString]) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let daemon = mountd_path();
    // The daemon handles its own signals: do not hand it our blocked mask.
    ckptfs::atomic_file::unblock_signals();
    let err = std::process::Command::new(&daemon).args(args).exec();
    bail!(
        "cannot run {}: {err}; build it beside ckptfs with `cargo build --release` or install it with `cargo install --path mountd`",
        daemon.display()
    )
}
