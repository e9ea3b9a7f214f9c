//! Checkpointing a restored VM (`restore -o`): incremental against the checkpoint it was
//! restored from, or full.
//!
//! Incremental: every guest page that neither the guest (KVM's dirty log, on from the moment
//! the memory slot exists, before the vCPU first runs) nor this VMM (a disk read into guest
//! RAM, a device's result, the session seed: `GuestMemory::track_writes`, on from the moment
//! RAM is loaded) wrote since the restore still holds the parent's page. Those pages become
//! PARENT references (ZERO where the parent's page is zero) without being read, which matters
//! most for a lazily restored VM: most of its memory was never even fetched from the mount.
//! The written pages are classified as `run` classifies every page: zero, a disk reference
//! where the I/O tracker (restored with the state) knows the block, or stored. The I/O
//! hints only, never a content scan: scanning reads the whole disk.
//!
//! Which checkpoint is the parent: `--parent-ckpt`, else the `--ckpt` restored from, else the
//! checkpoint a ckptfs mount serves (the `checkpoint` field of the `stats` file beside the
//! `--mem-file`). [`Parent::check`] makes sure, before the VM resumes, that the parent can be
//! one: it opens (so its own parents are there and unchanged), its VMM-state section is
//! byte for byte the state the VM resumes from (so its memory is the memory the VM resumes
//! with: the state is bound to its memory, see `binding`), its guest size is the VM's, and
//! one more link fits its chain.

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ckptfs::checkpoint::MAX_PARENT_DEPTH;
use ckptfs::{Checkpoint, DiskHint, DiskIndex, PageSet};

use crate::machine::{Machine, MachineError};
use crate::state;

/// Where `restore -o` takes the parent of its checkpoint from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentChoice {
    /// The checkpoint the VM was restored from (`--ckpt`, or the mount's `stats`).
    FromRestore,
    /// This checkpoint (`--parent-ckpt`).
    Path(PathBuf),
    /// None: a full checkpoint (`--full-checkpoint`).
    Full,
}

/// What `restore -o` writes.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// The new checkpoint.
    pub out: PathBuf,
    /// Its parent.
    pub parent: ParentChoice,
}

/// A checked parent (see [`Parent::check`]).
#[derive(Debug)]
pub struct Parent {
    path: PathBuf,
}

/// What `restore -o` wrote (part of the restore report).
#[derive(Debug, serde::Serialize)]
pub struct SaveReport {
    /// The new checkpoint.
    pub path: String,
    /// Its parent (absent for a full checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Pages written since the restore (guest and VMM): the pages classified.
    pub written_pages: u64,
    /// Of those, pages KVM's dirty log reported (the guest's writes).
    pub guest_written_pages: u64,
    /// Pages this VMM wrote into guest RAM (disk reads, device results).
    pub vmm_written_pages: u64,
    /// Guest pages.
    pub pages: u64,
    /// I/O-tracking hints given for the pages classified.
    pub hints: u64,
    /// Pause to checkpoint written, ms (state, dirty log, ckptfs::create).
    pub save_ms: f64,
    /// What ckptfs::create reported.
    pub summary: ckptfs::Summary,
}

/// Errors from checkpointing a restored VM.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// No parent could be derived from how the VM was restored.
    #[error(
        "memory file {0} is not a ckptfs mount's `memory` (no `stats` beside it naming the \
         checkpoint): give the checkpoint it holds with --parent-ckpt, or --full-checkpoint"
    )]
    NoParent(PathBuf),
    /// The mount's stats file could not be read.
    #[error("ckptfs mount stats {path}: cannot read the checkpoint it serves")]
    Stats {
        /// The stats file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The parent checkpoint does not open.
    #[error("parent checkpoint {path}")]
    ParentOpen {
        /// The parent.
        path: PathBuf,
        /// Why.
        #[source]
        source: ckptfs::OpenError,
    },
    /// The parent does not hold the state the VM resumes from.
    #[error(
        "parent checkpoint {path} does not hold the state this VM was restored from ({state}): \
         the memory and state must come from the parent (--parent-ckpt)"
    )]
    NotTheParent {
        /// The parent.
        path: PathBuf,
        /// Where the state came from.
        state: String,
    },
    /// The parent's guest is another size.
    #[error("parent checkpoint {path} holds {actual} bytes of guest RAM, the VM has {expected}")]
    ParentSize {
        /// The parent.
        path: PathBuf,
        /// Its guest size.
        actual: u64,
        /// The VM's.
        expected: u64,
    },
    /// One more link would make the chain too long to open.
    #[error(
        "parent checkpoint {path} ends a chain of {files} checkpoint files, the most a \
         checkpoint may have: flatten it first (`ckptfs flatten`) and restore from that"
    )]
    ChainTooLong {
        /// The parent.
        path: PathBuf,
        /// Files in its chain.
        files: usize,
    },
    /// `-o` would replace the parent or one of its ancestors.
    #[error("output {0} is the parent checkpoint or one of its parents; refusing to overwrite it")]
    OutputIsParent(PathBuf),
    /// The VM's written pages are unknown (dirty logging or write tracking was off).
    #[error("the VM was not restored with dirty logging, so its written pages are unknown")]
    NotTracked,
    /// Writing the raw dump (`--raw-out`) failed.
    #[error("writing raw memory dump {path}")]
    RawDump {
        /// The dump.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Pausing and saving the machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// ckptfs::create failed.
    #[error("writing checkpoint {path}")]
    Create {
        /// The new checkpoint.
        path: PathBuf,
        /// The library error.
        #[source]
        source: ckptfs::CreateError,
    },
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The checkpoint a ckptfs mount serves: `stats` beside the memory file names it (mountd
/// makes the path absolute), or None if the memory file is not a mount's `memory`.
pub fn mount_checkpoint(mem_file: &Path) -> Result<Option<PathBuf>, SaveError> {
    let (Some(dir), Some("memory")) = (
        mem_file.parent(),
        mem_file.file_name().and_then(|n| n.to_str()),
    ) else {
        return Ok(None);
    };
    let stats = dir.join("stats");
    if !stats.exists() {
        return Ok(None);
    }
    let err = |source| SaveError::Stats {
        path: stats.clone(),
        source,
    };
    let text = std::fs::read_to_string(&stats).map_err(err)?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.into()))?;
    let path = doc["checkpoint"]
        .as_str()
        .ok_or_else(|| err(io::Error::other("no \"checkpoint\" field")))?;
    Ok(Some(PathBuf::from(path)))
}

impl Parent {
    /// Opens `path` and checks that `out`, a checkpoint of the VM resuming from
    /// `state_bytes` (described as `state_origin`) with `mem_size` bytes of RAM, can name it
    /// as its parent.
    pub fn check(
        path: &Path,
        out: &Path,
        state_bytes: &[u8],
        state_origin: &str,
        mem_size: u64,
    ) -> Result<Parent, SaveError> {
        let ck = Checkpoint::open(path).map_err(|source| SaveError::ParentOpen {
            path: path.to_owned(),
            source,
        })?;
        let chain = std::iter::once(path).chain(ck.ancestors().iter().map(|a| a.path()));
        if let Some(p) = chain.into_iter().find(|p| same_file(p, out)) {
            log::debug!("vmm: -o {} is {}", out.display(), p.display());
            return Err(SaveError::OutputIsParent(out.to_owned()));
        }
        if ck.vmm_state() != state_bytes {
            return Err(SaveError::NotTheParent {
                path: path.to_owned(),
                state: state_origin.to_owned(),
            });
        }
        if ck.guest_size() != mem_size {
            return Err(SaveError::ParentSize {
                path: path.to_owned(),
                actual: ck.guest_size(),
                expected: mem_size,
            });
        }
        // A chain of n files opens when n <= MAX_PARENT_DEPTH + 1 (see ckptfs::checkpoint).
        let files = 1 + ck.ancestors().len();
        if files > MAX_PARENT_DEPTH {
            return Err(SaveError::ChainTooLong {
                path: path.to_owned(),
                files,
            });
        }
        Ok(Parent {
            path: path.to_owned(),
        })
    }

    /// Path of the parent.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes all of guest RAM to `path` and flushes it to disk (what a VMM without ckptfs
/// writes for a full snapshot); returns the time it took, ms. The file gets mode 0600
/// (guest RAM holds secrets).
pub fn raw_dump(machine: &Machine, path: &Path) -> Result<f64, SaveError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let started = Instant::now();
    let err = |source| SaveError::RawDump {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(machine.memory().as_slice()).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// The I/O tracker's hints for the pages in `only` (all pages without it): looked up page
/// by page, so an incremental checkpoint's cost follows the pages written, not the tracker.
fn hints(machine: &Machine, only: Option<&PageSet>) -> Vec<DiskHint> {
    let Some(tracker) = machine.block().tracker() else {
        return Vec::new();
    };
    let Some(only) = only else {
        return tracker.hints(DiskIndex(0));
    };
    only.iter()
        .filter_map(|page| {
            let offset = tracker.block_of(page)?;
            Some(DiskHint {
                page,
                disk: DiskIndex(0),
                offset,
            })
        })
        .collect()
}

/// Checkpoints the paused `machine` (just after a CHECK) into `out`: against `parent`
/// (incremental), or full without one.
pub fn checkpoint(
    machine: &mut Machine,
    disk: &Path,
    out: &Path,
    parent: Option<&Parent>,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    machine.harvest_dirty_log()?;
    let written = machine.written_pages().ok_or(SaveError::NotTracked)?;
    let state = state::encode(&machine.save()?);
    let pages = written.all.pages();
    let hints = hints(machine, parent.map(|_| &written.all));
    log::debug!(
        "vmm: dirty log, state and hints ready after {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let hint_count = hints.len() as u64;
    let opts = ckptfs::CreateOptions {
        disks: vec![disk.to_owned()],
        hints,
        scan_disks: false,
        parent: parent.map(|p| p.path.clone()),
        changed: parent.map(|_| written.all.clone()),
        vmm_state: Some(state),
        progress: io::stderr().is_terminal(),
        ..Default::default()
    };
    let summary = ckptfs::create(machine.memory().as_slice(), &opts, out).map_err(|source| {
        SaveError::Create {
            path: out.to_owned(),
            source,
        }
    })?;
    let save_ms = started.elapsed().as_secs_f64() * 1e3;
    log::info!(
        "vmm: wrote checkpoint {} ({} of {} pages written since the restore, {} bytes) in {save_ms:.1} ms",
        out.display(),
        written.all.count(),
        pages,
        summary.checkpoint_bytes
    );
    Ok(SaveReport {
        path: out.display().to_string(),
        parent: parent.map(|p| p.path.display().to_string()),
        written_pages: written.all.count(),
        guest_written_pages: written.by_guest,
        vmm_written_pages: written.by_vmm,
        pages,
        hints: hint_count,
        save_ms,
        summary,
    })
}
