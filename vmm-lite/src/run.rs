//! `vmm-lite run`: boot, warm up, pause after a CHECK, save state, write the checkpoint.
//!
//! The steps, in order: [`boot`], serve WORK requests for the warm-up time then one CHECK
//! (the guest changes nothing between its CHECK response and the pause), harvest the dirty
//! log so the hints reflect every guest write, [`save_outputs`] (state, raw dumps,
//! `ckptfs::create`), and optionally keep running to prove the saved state continues the same
//! way a restore of it does (`--continue-requests`).

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckptfs::DiskIndex;

use crate::block::{BlockDevice, BlockError};
use crate::driver::{LatencyStats, PlanDriver, WorkLimit};
use crate::guest::{BootParams, DesktopParams, Workload};
use crate::machine::{Machine, MachineError};
use crate::memory::{GuestMemory, MemoryError};
use crate::state;

/// What `run` does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// Disk image.
    pub disk: PathBuf,
    /// Guest workload.
    pub workload: Workload,
    /// Guest PRNG seed.
    pub seed: u64,
    /// Desktop parameters (used with `Workload::Desktop`).
    pub desktop: DesktopParams,
    /// Warm-up: WORK requests to serve after the guest is ready (a count makes the whole run,
    /// and so the checkpoint, deterministic for a given seed).
    pub warmup: WorkLimit,
    /// Checkpoint file to write through ckptfs.
    pub out: Option<PathBuf>,
    /// Raw guest RAM dump to write.
    pub raw_out: Option<PathBuf>,
    /// VMM state file to write.
    pub state_out: Option<PathBuf>,
    /// I/O-tracking hints to write as JSON `[[page, disk_offset], ...]`.
    pub hints_out: Option<PathBuf>,
    /// Let ckptfs also scan the disk by content (not just the hints).
    pub scan_disks: bool,
    /// After checkpointing, serve this many more requests and a CHECK (WORK requests with
    /// `continue_writes`, else READ).
    pub continue_requests: u64,
    /// See `continue_requests`.
    pub continue_writes: bool,
}

/// What `run` did (printed as JSON).
#[derive(Debug, serde::Serialize)]
pub struct RunReport {
    /// Guest workload.
    pub workload: Workload,
    /// Desktop parameters (desktop only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desktop: Option<DesktopParams>,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// VM creation to the guest's first request (workload set up), ms.
    pub boot_ms: f64,
    /// WORK requests in the warm-up.
    pub warmup_requests: u64,
    /// Warm-up WORK requests per second.
    pub warm_requests_per_sec: f64,
    /// Warm-up request latencies.
    pub warm_latency: LatencyStats,
    /// The CHECK taken right before the checkpoint, as 0x-prefixed hex.
    pub check: String,
    /// Latency of that CHECK (a full pass over guest memory), ms.
    pub check_ms: f64,
    /// Block read requests served.
    pub disk_reads: u64,
    /// Block write requests (kept in the overlay).
    pub disk_writes: u64,
    /// Blocks in the write overlay.
    pub overlay_blocks: u64,
    /// Dirty pages in the final harvest.
    pub final_dirty_pages: u64,
    /// Pages the I/O tracker maps to disk blocks (hints given to ckptfs).
    pub hints: u64,
    /// Bytes of the VMM state section.
    pub state_bytes: u64,
    /// What ckptfs::create reported (when `-o` was given).
    pub checkpoint: Option<ckptfs::Summary>,
    /// Time to write every output, ms.
    pub save_ms: f64,
    /// CHECK after `--continue-requests` more requests (hex).
    pub check_after_continue: Option<String>,
}

/// Errors from `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The disk image.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// Running the VM.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Writing an output file.
    #[error("writing {what} {path}")]
    Write {
        /// Which output.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// ckptfs::create failed.
    #[error("writing checkpoint {path}")]
    Checkpoint {
        /// The checkpoint path.
        path: PathBuf,
        /// The library error.
        #[source]
        source: ckptfs::create::CreateError,
    },
}

/// Formats a CHECK value the way reports print it.
pub fn hex(check: u64) -> String {
    format!("{check:#018x}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Creates the machine for `opts` (disk tracked, RAM fresh).
pub fn boot(opts: &RunOptions) -> Result<Machine, RunError> {
    let block = BlockDevice::open(&opts.disk, true)?;
    let mem = GuestMemory::anonymous(opts.mem_size)?;
    let params = BootParams {
        workload: opts.workload,
        disk_size: block.size(),
        seed: opts.seed,
        desktop: opts.desktop,
    };
    Ok(Machine::boot(mem, block, &params)?)
}

/// Runs the whole `run` command.
pub fn run(opts: &RunOptions) -> Result<RunReport, RunError> {
    let created = Instant::now();
    let mut machine = boot(opts)?;
    let mut warm = PlanDriver::new(opts.warmup, created, false);
    machine.run(&mut warm)?;
    let ready = warm.first_request().unwrap_or(created);
    // To the last WORK response: the CHECK after it hashes all of RAM (0.8 s at 4 GiB).
    let warm_secs = warm
        .last_work()
        .map_or(0.0, |t| t.duration_since(ready).as_secs_f64());
    let check = warm.check().expect("the plan ends with a CHECK");
    log::info!(
        "vmm: paused after {} requests, check {}",
        warm.work_done(),
        hex(check)
    );

    let final_dirty_pages = machine.harvest_dirty_log()?;
    let save_started = Instant::now();
    let (state_bytes, checkpoint) = save_outputs(&machine, opts)?;
    let save_ms = ms(save_started.elapsed());

    let check_after_continue = if opts.continue_requests > 0 {
        let limit = WorkLimit::Count(opts.continue_requests);
        let mut more = PlanDriver::new(limit, created, false).pure(!opts.continue_writes);
        machine.run(&mut more)?;
        more.check().map(hex)
    } else {
        None
    };
    let stats = warm.latency_stats();
    let (disk_reads, disk_writes) = machine.block().counts();
    Ok(RunReport {
        workload: opts.workload,
        desktop: (opts.workload == Workload::Desktop).then_some(opts.desktop),
        mem_bytes: opts.mem_size,
        boot_ms: ms(ready.duration_since(created)),
        warmup_requests: warm.work_done(),
        warm_requests_per_sec: warm.work_done() as f64 / warm_secs.max(1e-9),
        warm_latency: stats,
        check: hex(check),
        check_ms: warm.check_latency_ns() as f64 / 1e6,
        disk_reads,
        disk_writes,
        overlay_blocks: machine.block().overlay().count() as u64,
        final_dirty_pages,
        hints: machine.block().tracker().map_or(0, |t| t.len() as u64),
        state_bytes,
        checkpoint,
        save_ms,
        check_after_continue,
    })
}

/// Writes the state, raw dumps, hints and checkpoint of a paused machine.
fn save_outputs(
    machine: &Machine,
    opts: &RunOptions,
) -> Result<(u64, Option<ckptfs::Summary>), RunError> {
    let state = state::encode(&machine.save()?);
    let hints = machine
        .block()
        .tracker()
        .map(|t| t.hints(DiskIndex(0)))
        .unwrap_or_default();
    if let Some(path) = &opts.state_out {
        write_file("state file", path, &state)?;
    }
    if let Some(path) = &opts.raw_out {
        write_file("raw memory dump", path, machine.memory().as_slice())?;
    }
    if let Some(path) = &opts.hints_out {
        let pairs: Vec<[u64; 2]> = hints.iter().map(|h| [h.page.0, h.offset.0]).collect();
        let json = serde_json::to_vec(&pairs).expect("plain numbers serialize");
        write_file("hints file", path, &json)?;
    }
    let state_len = state.len() as u64;
    let Some(out) = &opts.out else {
        return Ok((state_len, None));
    };
    let create_opts = ckptfs::CreateOptions {
        disks: vec![opts.disk.clone()],
        hints,
        scan_disks: opts.scan_disks,
        vmm_state: Some(state),
        progress: io::stderr().is_terminal(),
        ..Default::default()
    };
    let summary =
        ckptfs::create(machine.memory().as_slice(), &create_opts, out).map_err(|source| {
            RunError::Checkpoint {
                path: out.clone(),
                source,
            }
        })?;
    log::info!(
        "vmm: wrote checkpoint {} ({} bytes)",
        out.display(),
        summary.checkpoint_bytes
    );
    Ok((state_len, Some(summary)))
}

fn write_file(what: &'static str, path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    std::fs::write(path, bytes).map_err(|source| RunError::Write {
        what,
        path: path.to_owned(),
        source,
    })
}
