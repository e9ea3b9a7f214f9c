//! `vmm-lite restore`: resume a checkpointed VM and time every request.
//!
//! Guest RAM comes from one of three places, matching the restore strategies compared:
//! - `Map`: `MAP_PRIVATE` of a memory file; pages come in on first touch (lazy). The file may
//!   be a ckptfs FUSE mount's `memory` file or a raw dump;
//! - `Eager`: the whole memory file copied into anonymous memory first (eager, raw);
//! - `Checkpoint`: every page rebuilt through `ckptfs::Checkpoint::read_pages` first
//!   (eager, space-optimized).
//!
//! Timestamps count from `origin` (the start of the command), so the time-to-responsiveness
//! includes mapping or copying memory.
//!
//! The steps: load the state, map or fill guest RAM, map the zero ranges anonymous
//! (`--zero-ranges`, see `zeroranges`), start counting touched pages (`--touched-out`, see
//! `touched`), check that the state belongs to this RAM and set the session's request seed
//! (`Machine::restore`), then serve the requests and the CHECK.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckptfs::{Checkpoint, PageIndex, ReadCounts};

use crate::binding::BindingError;
use crate::block::{BlockDevice, BlockError};
use crate::driver::{Completion, LatencyStats, PlanDriver, WorkLimit};
use crate::machine::{Machine, MachineError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::run::hex;
use crate::save::{self, Parent, ParentChoice, SaveError, SaveOptions, SaveReport};
use crate::state::{self, StateError, VmState};
use crate::touched::{self, Touched, TouchedError};
use crate::zeroranges::{self, ZeroRangesError, ZeroRangesReport};

/// Where guest RAM comes from.
#[derive(Clone, Debug)]
pub enum MemorySource {
    /// `MAP_PRIVATE` of this file (lazy).
    Map(PathBuf),
    /// This file copied into anonymous memory first.
    Eager(PathBuf),
    /// Every page rebuilt from this checkpoint first.
    Checkpoint(PathBuf),
}

impl MemorySource {
    fn mode(&self) -> &'static str {
        match self {
            MemorySource::Map(_) => "mmap",
            MemorySource::Eager(_) => "eager",
            MemorySource::Checkpoint(_) => "ckpt-eager",
        }
    }

    /// "memory file X" or "checkpoint X", for error messages.
    fn describe(&self) -> String {
        match self {
            MemorySource::Map(p) | MemorySource::Eager(p) => format!("memory file {}", p.display()),
            MemorySource::Checkpoint(p) => format!("checkpoint {}", p.display()),
        }
    }
}

/// What `restore` does.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Guest RAM.
    pub memory: MemorySource,
    /// VMM state file; None = the checkpoint's state section (with `MemorySource::Checkpoint`).
    pub state: Option<PathBuf>,
    /// Disk image.
    pub disk: PathBuf,
    /// WORK requests before the final CHECK.
    pub limit: WorkLimit,
    /// Issue WORK requests (which modify guest memory and write to the disk overlay) instead
    /// of READ requests; the final CHECK then no longer equals the checkpoint's.
    pub writes: bool,
    /// Where to write one JSON line per completed request ("-" = stdout).
    pub timeline: Option<PathBuf>,
    /// The session's request seed: varies the pages requests pick (0 = the stream the VM
    /// would have served had it not been checkpointed).
    pub request_seed: u64,
    /// Zero ranges of the checkpoint to map anonymous (with `MemorySource::Map`).
    pub zero_ranges: Option<PathBuf>,
    /// Where to write the guest pages faulted in before the CHECK (with `MemorySource::Map`).
    pub touched_out: Option<PathBuf>,
    /// Share of guest RAM, in percent, the guest writes (DIRTY requests) before its other
    /// requests.
    pub dirty_pct: f64,
    /// Checkpoint the VM after the CHECK (`-o`), incremental or full.
    pub checkpoint: Option<SaveOptions>,
    /// After the CHECK (and the checkpoint), write guest RAM here as a raw dump.
    pub raw_out: Option<PathBuf>,
    /// Start of the command: timestamps count from here.
    pub origin: Instant,
}

/// What `restore` did (printed as JSON).
#[derive(Debug, serde::Serialize)]
pub struct RestoreReport {
    /// mmap, eager or ckpt-eager.
    pub mode: &'static str,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Time to map or fill guest RAM, ms.
    pub memory_ms: f64,
    /// Command start to the vCPU ready to run, ms.
    pub resume_ms: f64,
    /// Command start to the first response, ms.
    pub first_response_ms: f64,
    /// WORK requests served.
    pub requests: u64,
    /// Command start to the last WORK response, ms.
    pub last_response_ms: f64,
    /// WORK requests per second, from the first request handed out.
    pub requests_per_sec: f64,
    /// WORK latencies.
    pub latency: LatencyStats,
    /// The final CHECK (hex): equals the checkpoint's unless `writes`.
    pub check: String,
    /// How long the CHECK took, ms.
    pub check_ms: f64,
    /// Requests the guest has completed in its life, including before the checkpoint.
    pub requests_served: u64,
    /// Bytes rebuilt by source (ckpt-eager only).
    pub rebuilt: Option<RebuiltBytes>,
    /// The session's request seed.
    pub request_seed: u64,
    /// What `--zero-ranges` mapped anonymous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_ranges: Option<ZeroRangesReport>,
    /// Guest pages faulted in before the CHECK (with `--touched-out`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub touched_pages: Option<u64>,
    /// Pages the guest was asked to write with DIRTY requests (`--dirty-pct`).
    pub dirty_pages: u64,
    /// The checkpoint written after the CHECK (`-o`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<SaveReport>,
    /// Time to write and flush the raw dump (`--raw-out`), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_save_ms: Option<f64>,
}

/// Bytes `read_pages` rebuilt, by source.
#[derive(Debug, serde::Serialize)]
pub struct RebuiltBytes {
    /// Zero pages.
    pub zero_bytes: u64,
    /// From disk images.
    pub disk_bytes: u64,
    /// From the blob section.
    pub blob_bytes: u64,
    /// preads on disk images.
    pub disk_reads: u64,
}

/// Errors from `restore`.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file could not be read.
    #[error("state file {path}: cannot read")]
    StateRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The state is invalid.
    #[error("state {origin}")]
    State {
        /// "file <path>" or "section of checkpoint <path>".
        origin: String,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The state was saved with other guest RAM.
    #[error("state {state} does not belong to {memory}")]
    NotThisMemory {
        /// "file <path>" or "section of checkpoint <path>".
        state: String,
        /// "memory file <path>" or "checkpoint <path>".
        memory: String,
        /// Which page differs.
        #[source]
        source: BindingError,
    },
    /// An identifying page that the state records as non-zero was mapped anonymous.
    #[error(
        "zero-ranges file {path} maps guest page {page:#x} ({what}) as zero, but the state \
         says it is not: the file comes from another checkpoint"
    )]
    ZeroRangesNotThisCheckpoint {
        /// The zero-ranges file.
        path: PathBuf,
        /// The page.
        page: u64,
        /// What it holds.
        what: &'static str,
    },
    /// `--zero-ranges`.
    #[error(transparent)]
    ZeroRanges(#[from] ZeroRangesError),
    /// `--touched-out`.
    #[error(transparent)]
    Touched(#[from] TouchedError),
    /// Neither a state file nor a checkpoint was given.
    #[error("no VMM state: give --state (or --ckpt, whose state section is used)")]
    NoState,
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The disk image.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// Running the VM.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Opening the checkpoint failed (the library's error names it).
    #[error(transparent)]
    CheckpointOpen(ckptfs::checkpoint::OpenError),
    /// `--raw-out` names the memory file itself.
    #[error("raw dump {0} is the memory file the VM runs on; refusing to overwrite it")]
    RawOutIsMemory(PathBuf),
    /// Checkpointing the restored VM (`-o`).
    #[error(transparent)]
    Save(#[from] SaveError),
    /// Rebuilding pages from the checkpoint failed.
    #[error("checkpoint {path}: rebuilding guest RAM")]
    CheckpointRead {
        /// The checkpoint.
        path: PathBuf,
        /// The library error.
        #[source]
        source: ckptfs::checkpoint::ReadError,
    },
    /// The checkpoint's RAM size differs from the state's.
    #[error("checkpoint {path} holds {actual} bytes of RAM, the state says {expected}")]
    SizeMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// Checkpoint guest size.
        actual: u64,
        /// State mem_size.
        expected: u64,
    },
    /// Writing the timeline failed.
    #[error("writing timeline {path}")]
    Timeline {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn ms_since(origin: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(origin).as_secs_f64() * 1e3
}

/// Runs the whole `restore` command.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let checkpoint = match &opts.memory {
        MemorySource::Checkpoint(path) => Some(open_checkpoint(path)?),
        _ => None,
    };
    refuse_raw_out_over_memory(opts)?;
    let raw_state = read_state(opts, checkpoint.as_ref())?;
    let state = decode_state(&raw_state)?;
    let parent = checked_parent(opts, &raw_state, state.devices.mem_size)?;
    // A checkpoint of the restored VM needs its writes: KVM's dirty log (on with tracking)
    // and this VMM's own (GuestMemory::track_writes, from the moment RAM is loaded).
    let save = opts.checkpoint.is_some();
    let block = BlockDevice::open(&opts.disk, save)?;
    block.check_size(state.devices.disk_size)?;
    memory::report_sigbus();
    let memory_started = Instant::now();
    let (mut mem, rebuilt) = load_memory(opts, &state, checkpoint.as_ref())?;
    let memory_ms = memory_started.elapsed().as_secs_f64() * 1e3;
    if save {
        mem.track_writes();
    }
    drop(checkpoint);
    let (zero_report, zero_runs) = match &opts.zero_ranges {
        Some(path) => {
            let (report, runs) = zeroranges::apply(&mut mem, path)?;
            (Some(report), runs)
        }
        None => (None, Vec::new()),
    };
    let touched = match opts.touched_out {
        Some(_) => Some(Touched::start(&mut mem)?),
        None => None,
    };
    let mut machine = Machine::restore(mem, block, &state, opts.request_seed)
        .map_err(|e| not_this_memory(e, opts, &zero_runs))?;
    let resumed = Instant::now();
    log::info!(
        "vmm: resuming ({}) after {:.1} ms",
        opts.memory.mode(),
        ms_since(opts.origin, resumed)
    );

    let dirty_pages = dirty_pages(opts.dirty_pct, state.devices.mem_size);
    let mut driver = PlanDriver::new(opts.limit, opts.origin, true)
        .pure(!opts.writes)
        .dirty(dirty_pages)
        .pause_before_check(touched.is_some());
    let touched_pages = serve(&mut machine, &mut driver, touched.as_ref(), opts)?;
    if let Some(path) = &opts.timeline {
        write_timeline(path, driver.completions())?;
    }
    let mut report = report(opts, &state, memory_ms, resumed, &driver, &machine, rebuilt);
    report.zero_ranges = zero_report;
    report.touched_pages = touched_pages;
    report.dirty_pages = dirty_pages;
    save_outputs(&mut machine, opts, parent.as_ref(), &mut report)?;
    Ok(report)
}

/// `--raw-out` over the memory file the VM runs on would truncate its RAM under it.
fn refuse_raw_out_over_memory(opts: &RestoreOptions) -> Result<(), RestoreError> {
    if let (Some(raw), MemorySource::Map(m) | MemorySource::Eager(m)) =
        (&opts.raw_out, &opts.memory)
        && matches!((raw.canonicalize(), m.canonicalize()), (Ok(a), Ok(b)) if a == b)
    {
        return Err(RestoreError::RawOutIsMemory(raw.clone()));
    }
    Ok(())
}

/// After the CHECK: the checkpoint (`-o`), then the raw dump (`--raw-out`).
fn save_outputs(
    machine: &mut Machine,
    opts: &RestoreOptions,
    parent: Option<&Parent>,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    if let Some(save) = &opts.checkpoint {
        let saved = save::checkpoint(machine, &opts.disk, &save.out, parent)?;
        report.checkpoint = Some(saved);
    }
    if let Some(path) = &opts.raw_out {
        report.raw_save_ms = Some(save::raw_dump(machine, path)?);
    }
    Ok(())
}

/// Pages `--dirty-pct` asks the guest to write: that share of guest RAM, in pages.
fn dirty_pages(pct: f64, mem_size: u64) -> u64 {
    let pages = mem_size / crate::abi::PAGE_SIZE;
    ((pct.clamp(0.0, 100.0) / 100.0) * pages as f64).round() as u64
}

/// Runs the plan; with `touched`, writes the pages faulted in before the CHECK (which reads
/// all of memory) to `--touched-out` and returns their number.
fn serve(
    machine: &mut Machine,
    driver: &mut PlanDriver,
    touched: Option<&Touched>,
    opts: &RestoreOptions,
) -> Result<Option<u64>, RestoreError> {
    let (Some(touched), Some(path)) = (touched, &opts.touched_out) else {
        machine.run(driver)?;
        return Ok(None);
    };
    if driver.plans_work() {
        machine.run(driver)?; // pauses after the last request, before the CHECK
    }
    let pages = touched.scan(machine.memory())?;
    touched::write(path, &pages)?;
    machine.run(driver)?;
    Ok(Some(touched::count(&pages)))
}

/// Names the files when the state does not belong to guest RAM: the zero-ranges file if the
/// differing page is one it mapped anonymous, else the state and the memory.
fn not_this_memory(
    err: MachineError,
    opts: &RestoreOptions,
    zero_runs: &[Range<u64>],
) -> RestoreError {
    let MachineError::NotThisMemory(source) = err else {
        return err.into();
    };
    if let (BindingError::Differs { page, what }, Some(path)) = (&source, &opts.zero_ranges)
        && zero_runs.iter().any(|r| r.contains(page))
    {
        return RestoreError::ZeroRangesNotThisCheckpoint {
            path: path.clone(),
            page: *page,
            what,
        };
    }
    let state = match (&opts.state, &opts.memory) {
        (Some(path), _) => format!("file {}", path.display()),
        (None, MemorySource::Checkpoint(path)) => {
            format!("section of checkpoint {}", path.display())
        }
        (None, _) => "(none)".to_string(),
    };
    RestoreError::NotThisMemory {
        state,
        memory: opts.memory.describe(),
        source,
    }
}

fn report(
    opts: &RestoreOptions,
    state: &VmState,
    memory_ms: f64,
    resumed: Instant,
    driver: &PlanDriver,
    machine: &Machine,
    rebuilt: Option<RebuiltBytes>,
) -> RestoreReport {
    let completions = driver.completions();
    let works: Vec<&Completion> = completions.iter().filter(|c| c.kind == "work").collect();
    let first_ns = completions.first().map_or(0, |c| c.t_ns);
    let last_ns = works.last().map_or(first_ns, |c| c.t_ns);
    let served_from = driver
        .first_request()
        .map_or(0.0, |t| ms_since(opts.origin, t));
    let span_s = (last_ns as f64 / 1e6 - served_from).max(1e-6) / 1e3;
    RestoreReport {
        mode: opts.memory.mode(),
        mem_bytes: state.devices.mem_size,
        memory_ms,
        resume_ms: ms_since(opts.origin, resumed),
        first_response_ms: first_ns as f64 / 1e6,
        requests: driver.work_done(),
        last_response_ms: last_ns as f64 / 1e6,
        requests_per_sec: if works.is_empty() {
            0.0
        } else {
            works.len() as f64 / span_s
        },
        latency: driver.latency_stats(),
        check: hex(driver.check().expect("the plan ends with a CHECK")),
        check_ms: driver.check_latency_ns() as f64 / 1e6,
        requests_served: machine.requests_served(),
        rebuilt,
        request_seed: opts.request_seed,
        zero_ranges: None,
        touched_pages: None,
        dirty_pages: 0,
        checkpoint: None,
        raw_save_ms: None,
    }
}

/// Open the checkpoint an eager restore rebuilds every page of, with
/// readahead for that whole pass.
fn open_checkpoint(path: &Path) -> Result<Checkpoint, RestoreError> {
    let ck = Checkpoint::open(path).map_err(RestoreError::CheckpointOpen)?;
    ck.advise_reading_all();
    Ok(ck)
}

/// The VMM state as stored, and where it came from ("file <path>" or "section of
/// checkpoint <path>").
struct RawState {
    bytes: Vec<u8>,
    origin: String,
}

fn read_state(
    opts: &RestoreOptions,
    checkpoint: Option<&Checkpoint>,
) -> Result<RawState, RestoreError> {
    if let Some(path) = &opts.state {
        let bytes = std::fs::read(path).map_err(|source| RestoreError::StateRead {
            path: path.clone(),
            source,
        })?;
        let origin = format!("file {}", path.display());
        return Ok(RawState { bytes, origin });
    }
    let (Some(ckpt), MemorySource::Checkpoint(path)) = (checkpoint, &opts.memory) else {
        return Err(RestoreError::NoState);
    };
    Ok(RawState {
        bytes: ckpt.vmm_state().to_vec(),
        origin: format!("section of checkpoint {}", path.display()),
    })
}

fn decode_state(raw: &RawState) -> Result<VmState, RestoreError> {
    state::decode(&raw.bytes).map_err(|source| RestoreError::State {
        origin: raw.origin.clone(),
        source,
    })
}

/// The parent of the checkpoint `-o` asks for, checked before the VM resumes (None for a
/// full checkpoint, or without `-o`).
fn checked_parent(
    opts: &RestoreOptions,
    raw: &RawState,
    mem_size: u64,
) -> Result<Option<Parent>, RestoreError> {
    let Some(save) = &opts.checkpoint else {
        return Ok(None);
    };
    let path = match (&save.parent, &opts.memory) {
        (ParentChoice::Full, _) => return Ok(None),
        (ParentChoice::Path(p), _) => p.clone(),
        (ParentChoice::FromRestore, MemorySource::Checkpoint(p)) => p.clone(),
        (ParentChoice::FromRestore, MemorySource::Map(m) | MemorySource::Eager(m)) => {
            save::mount_checkpoint(m)?.ok_or_else(|| SaveError::NoParent(m.clone()))?
        }
    };
    let parent = Parent::check(&path, &save.out, &raw.bytes, &raw.origin, mem_size)?;
    Ok(Some(parent))
}

fn load_memory(
    opts: &RestoreOptions,
    state: &VmState,
    checkpoint: Option<&Checkpoint>,
) -> Result<(GuestMemory, Option<RebuiltBytes>), RestoreError> {
    let size = state.devices.mem_size;
    memory::check_size(size)?;
    match (&opts.memory, checkpoint) {
        (MemorySource::Map(path), _) => Ok((GuestMemory::map_file_private(path, size)?, None)),
        (MemorySource::Eager(path), _) => Ok((GuestMemory::copy_file(path, size)?, None)),
        (MemorySource::Checkpoint(path), Some(ckpt)) => rebuild(path, ckpt, size),
        (MemorySource::Checkpoint(path), None) => unreachable!("{} was opened", path.display()),
    }
}

/// Rebuilds all of guest RAM from the checkpoint (the eager space-optimized baseline).
fn rebuild(
    path: &Path,
    ckpt: &Checkpoint,
    size: u64,
) -> Result<(GuestMemory, Option<RebuiltBytes>), RestoreError> {
    if ckpt.guest_size() != size {
        return Err(RestoreError::SizeMismatch {
            path: path.to_owned(),
            actual: ckpt.guest_size(),
            expected: size,
        });
    }
    const CHUNK: usize = 4 << 20;
    let mut mem = GuestMemory::anonymous(size)?;
    let mut total = ReadCounts::default();
    for (i, chunk) in mem.as_mut_slice().chunks_mut(CHUNK).enumerate() {
        let first = PageIndex((i * CHUNK / ckptfs::PAGE_SIZE) as u64);
        let counts =
            ckpt.read_pages(first, chunk)
                .map_err(|source| RestoreError::CheckpointRead {
                    path: path.to_owned(),
                    source,
                })?;
        total.zero_bytes += counts.zero_bytes;
        total.disk_bytes += counts.disk_bytes;
        total.blob_bytes += counts.blob_bytes;
        total.disk_reads += counts.disk_reads;
    }
    let rebuilt = RebuiltBytes {
        zero_bytes: total.zero_bytes,
        disk_bytes: total.disk_bytes,
        blob_bytes: total.blob_bytes,
        disk_reads: total.disk_reads,
    };
    Ok((mem, Some(rebuilt)))
}

fn write_timeline(path: &Path, completions: &[Completion]) -> Result<(), RestoreError> {
    let err = |source| RestoreError::Timeline {
        path: path.to_owned(),
        source,
    };
    let sink: Box<dyn Write> = if path == Path::new("-") {
        Box::new(io::stdout().lock())
    } else {
        Box::new(File::create(path).map_err(err)?)
    };
    let mut out = BufWriter::new(sink);
    for c in completions {
        serde_json::to_writer(&mut out, c).map_err(|e| err(e.into()))?;
        out.write_all(b"\n").map_err(err)?;
    }
    out.flush().map_err(err)
}

/// Parses `--duration` seconds.
pub fn duration_limit(secs: f64) -> WorkLimit {
    WorkLimit::For(Duration::from_secs_f64(secs.max(0.0)))
}
