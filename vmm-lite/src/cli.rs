//! The command line: argument definitions and what each command calls.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::driver::WorkLimit;
use crate::guest::{DesktopParams, Workload};
use crate::restore::{MemorySource, RestoreOptions};
use crate::run::RunOptions;
use crate::save::{ParentChoice, SaveOptions};

/// The vmm-lite command line.
#[derive(Parser)]
#[command(
    name = "vmm-lite",
    version,
    about = "Minimal KVM VMM: checkpoint and restore a guest through ckptfs"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot, warm up, pause after a CHECK, write the checkpoint (and raw dumps).
    Run(RunArgs),
    /// Resume a checkpointed VM from a memory file and time each request.
    Restore(RestoreArgs),
    /// Write a disk image of distinct, non-zero blocks.
    Mkdisk {
        /// Image to write.
        path: PathBuf,
        /// Size, e.g. 256M.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Content seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Guest RAM, e.g. 64M (multiple of 2 MiB, 4M..64G).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    mem: u64,
    /// Disk image (never modified: guest writes stay in an overlay saved with the state).
    #[arg(long)]
    disk: PathBuf,
    /// What the guest does with its memory.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    workload: Workload,
    /// Guest PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    desktop: DesktopArgs,
    /// Serve requests this many seconds after the guest is ready, then checkpoint.
    #[arg(long, default_value_t = 1.0)]
    checkpoint_after: f64,
    /// Serve exactly N requests instead, then checkpoint (deterministic for a given seed).
    #[arg(long, conflicts_with = "checkpoint_after")]
    warmup_requests: Option<u64>,
    /// Checkpoint file (ckptfs format).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Also write guest RAM as a raw dump.
    #[arg(long)]
    raw_out: Option<PathBuf>,
    /// Also write the VMM state section as a file.
    #[arg(long)]
    state_out: Option<PathBuf>,
    /// Also write the I/O-tracking hints as JSON [[page, disk_offset], ...].
    #[arg(long)]
    hints_out: Option<PathBuf>,
    /// Use only the I/O-tracking hints (the paper's way), no content scan of the disk.
    #[arg(long)]
    no_scan: bool,
    /// After checkpointing, serve N more requests and report a second CHECK (what a
    /// `restore --requests N` of this checkpoint must report too).
    #[arg(long, default_value_t = 0)]
    continue_requests: u64,
    /// Make those WORK requests (they modify memory) instead of READ requests.
    #[arg(long)]
    continue_writes: bool,
}

/// The desktop workload's parameters (README: "The desktop workload").
#[derive(Args)]
struct DesktopArgs {
    /// Desktop: page cache, percent of the heap (bounded by the disk) [default: 45].
    #[arg(long, value_name = "PCT")]
    desktop_cache_pct: Option<u64>,
    /// Desktop: computed data, percent of the heap [default: 20].
    #[arg(long, value_name = "PCT")]
    desktop_anon_pct: Option<u64>,
    /// Desktop: working set, percent of the heap [default: 12].
    #[arg(long, value_name = "PCT")]
    desktop_ws_pct: Option<u64>,
    /// Desktop: accesses to pages outside the working set, per mille [default: 15].
    #[arg(long, value_name = "PERMILLE")]
    desktop_cold_permille: Option<u64>,
}

impl DesktopArgs {
    /// The parameters, checked; `--desktop-*` options need `--workload desktop`.
    fn params(&self, workload: Workload) -> anyhow::Result<DesktopParams> {
        let given = [
            self.desktop_cache_pct,
            self.desktop_anon_pct,
            self.desktop_ws_pct,
            self.desktop_cold_permille,
        ];
        if workload != Workload::Desktop && given.iter().any(Option::is_some) {
            anyhow::bail!("--desktop-* options need --workload desktop");
        }
        let d = DesktopParams::default();
        let params = DesktopParams {
            cache_pct: self.desktop_cache_pct.unwrap_or(d.cache_pct),
            anon_pct: self.desktop_anon_pct.unwrap_or(d.anon_pct),
            ws_pct: self.desktop_ws_pct.unwrap_or(d.ws_pct),
            cold_permille: self.desktop_cold_permille.unwrap_or(d.cold_permille),
        };
        params.validate()?;
        Ok(params)
    }
}

#[derive(Args)]
struct RestoreArgs {
    /// Guest RAM file to map MAP_PRIVATE (a ckptfs mount's `memory`, or a raw dump).
    #[arg(long, required_unless_present = "ckpt", conflicts_with = "ckpt")]
    mem_file: Option<PathBuf>,
    /// Copy the whole memory file into anonymous memory before resuming.
    #[arg(long, requires = "mem_file")]
    eager: bool,
    /// Rebuild all of RAM from this checkpoint before resuming (its state section is used
    /// unless --state is given).
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// VMM state file (e.g. `--state-out` of run, or a mount's `vmm-state`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Disk image the VM ran with.
    #[arg(long)]
    disk: PathBuf,
    /// Requests (READ, or WORK with --writes) before the final CHECK [default: 1000].
    #[arg(long, conflicts_with_all = ["duration", "checkpoint_after"])]
    requests: Option<u64>,
    /// Serve requests for this many seconds (from the first request) instead.
    #[arg(long, conflicts_with = "checkpoint_after")]
    duration: Option<f64>,
    /// After the final CHECK, checkpoint the VM into this file: incremental, against the
    /// checkpoint it was restored from (see --parent-ckpt), unless --full-checkpoint.
    #[arg(short = 'o', long, value_name = "NEXT_CKPT")]
    out: Option<PathBuf>,
    /// Serve requests for this many seconds, then CHECK and checkpoint into -o (the same as
    /// --duration with -o).
    #[arg(long, value_name = "SECONDS", requires = "out")]
    checkpoint_after: Option<f64>,
    /// The checkpoint the VM was restored from, the parent of -o's [default: the --ckpt
    /// restored from, or the checkpoint a ckptfs mount serves (its `stats` file, beside
    /// --mem-file)]. Its state section must be the state the VM resumes from.
    #[arg(
        long,
        value_name = "CKPT",
        requires = "out",
        conflicts_with = "full_checkpoint"
    )]
    parent_ckpt: Option<PathBuf>,
    /// Write -o as a full checkpoint (every page classified), not an incremental one.
    #[arg(long, requires = "out")]
    full_checkpoint: bool,
    /// After the final CHECK (and -o), also write guest RAM as a raw dump and flush it
    /// (timed: the report's raw_save_ms, what a full snapshot costs without ckptfs).
    #[arg(long, value_name = "FILE")]
    raw_out: Option<PathBuf>,
    /// Before its other requests, the guest writes this share of its RAM (percent; DIRTY
    /// requests, one word a page, each page once).
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    dirty_pct: f64,
    /// Send WORK requests, which modify guest memory, instead of side-effect-free READ
    /// requests (the final CHECK then differs from the checkpoint's).
    #[arg(long)]
    writes: bool,
    /// One JSON line per completed request: {"i","kind","t_ns","latency_ns","response"}
    /// with t_ns counted from the start of this command ("-" = stdout).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Request seed of this session: varies the pages the requests pick (0 = the stream the
    /// checkpointed VM would have served).
    #[arg(long, default_value_t = 0)]
    request_seed: u64,
    /// Map the checkpoint's zero-page runs listed in this file (`FIRST_PAGE PAGE_COUNT` lines,
    /// a mount's `zero-ranges`) anonymous over the memory file. It must come from the same
    /// checkpoint as the memory file.
    #[arg(
        long,
        value_name = "ZFILE",
        requires = "mem_file",
        conflicts_with = "eager"
    )]
    zero_ranges: Option<PathBuf>,
    /// Write the guest pages faulted in before the CHECK as `FIRST_PAGE PAGE_COUNT` lines
    /// (lazy --mem-file restores only; turns the kernel's fault-around off, see README).
    #[arg(
        long,
        value_name = "FILE",
        requires = "mem_file",
        conflicts_with = "eager"
    )]
    touched_out: Option<PathBuf>,
}

/// Parses "4096", "64K", "64M", "1G" (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("unknown size unit {unit:?} (use K, M or G)")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let opts = RunOptions {
        mem_size: args.mem,
        desktop: args.desktop.params(args.workload)?,
        disk: args.disk,
        workload: args.workload,
        seed: args.seed,
        warmup: match args.warmup_requests {
            Some(n) => WorkLimit::Count(n),
            None => WorkLimit::For(Duration::from_secs_f64(args.checkpoint_after.max(0.0))),
        },
        out: args.out,
        raw_out: args.raw_out,
        state_out: args.state_out,
        hints_out: args.hints_out,
        scan_disks: !args.no_scan,
        continue_requests: args.continue_requests,
        continue_writes: args.continue_writes,
    };
    let report = crate::run::run(&opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn restore(args: RestoreArgs, origin: Instant) -> anyhow::Result<()> {
    let memory = match (args.mem_file, args.ckpt) {
        (Some(path), _) if args.eager => MemorySource::Eager(path),
        (Some(path), _) => MemorySource::Map(path),
        (None, Some(ckpt)) => MemorySource::Checkpoint(ckpt),
        (None, None) => anyhow::bail!("give --mem-file or --ckpt"),
    };
    let limit = match (args.requests, args.duration.or(args.checkpoint_after)) {
        (_, Some(secs)) => crate::restore::duration_limit(secs),
        (n, None) => WorkLimit::Count(n.unwrap_or(1000)),
    };
    if !(0.0..=100.0).contains(&args.dirty_pct) {
        anyhow::bail!(
            "--dirty-pct {} is not a percentage (0 to 100)",
            args.dirty_pct
        );
    }
    let checkpoint = args.out.map(|out| SaveOptions {
        out,
        parent: match (args.parent_ckpt, args.full_checkpoint) {
            (_, true) => ParentChoice::Full,
            (Some(p), false) => ParentChoice::Path(p),
            (None, false) => ParentChoice::FromRestore,
        },
    });
    let opts = RestoreOptions {
        memory,
        state: args.state,
        disk: args.disk,
        limit,
        writes: args.writes,
        timeline: args.timeline,
        request_seed: args.request_seed,
        zero_ranges: args.zero_ranges,
        touched_out: args.touched_out,
        dirty_pct: args.dirty_pct,
        checkpoint,
        raw_out: args.raw_out,
        origin,
    };
    let report = crate::restore::restore(&opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs the parsed command; `origin` is when the process started (restore timestamps count
/// from it).
pub fn execute(cli: Cli, origin: Instant) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args, origin),
        Command::Mkdisk { path, size, seed } => Ok(crate::mkdisk::mkdisk(&path, size, seed)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("16K"), Ok(16 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
