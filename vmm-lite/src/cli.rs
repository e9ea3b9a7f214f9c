//! The command line: argument definitions and what each command calls.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::driver::WorkLimit;
use crate::guest::Workload;
use crate::restore::{MemorySource, RestoreOptions};
use crate::run::RunOptions;

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
    /// Guest RAM, e.g. 64M (multiple of 2 MiB, 4M..4G).
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
    #[arg(long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// Serve requests for this many seconds (from the first request) instead.
    #[arg(long)]
    duration: Option<f64>,
    /// Send WORK requests, which modify guest memory, instead of side-effect-free READ
    /// requests (the final CHECK then differs from the checkpoint's).
    #[arg(long)]
    writes: bool,
    /// One JSON line per completed request: {"i","kind","t_ns","latency_ns","response"}
    /// with t_ns counted from the start of this command ("-" = stdout).
    #[arg(long)]
    timeline: Option<PathBuf>,
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
    let limit = match (args.requests, args.duration) {
        (_, Some(secs)) => crate::restore::duration_limit(secs),
        (n, None) => WorkLimit::Count(n.unwrap_or(1000)),
    };
    let opts = RestoreOptions {
        memory,
        state: args.state,
        disk: args.disk,
        limit,
        writes: args.writes,
        timeline: args.timeline,
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
