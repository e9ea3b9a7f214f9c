//! Making a checkpoint from a raw guest memory image.
//! (API stub: implementation lands next.)

use std::path::{Path, PathBuf};

use crate::types::{DiskIndex, DiskOffset, PageIndex};

/// A page the caller knows to hold a disk block (e.g. tracked by the VMM's disk I/O).
/// Hints are verified by content; a wrong hint just falls back to scanning/blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskHint {
    /// Guest page.
    pub page: PageIndex,
    /// Index into [`CreateOptions::disks`].
    pub disk: DiskIndex,
    /// 4 KiB-aligned byte offset in that disk image.
    pub offset: DiskOffset,
}

/// What to build a checkpoint from.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Raw disk images the guest's page cache may hold blocks of.
    pub disks: Vec<PathBuf>,
    /// Page -> disk block hints from I/O tracking.
    pub hints: Vec<DiskHint>,
    /// Also find disk pages by indexing every disk block's content (the scan path).
    /// With hints only (the paper's way), set this to false.
    pub scan_disks: bool,
    /// Opaque VMM state stored in the checkpoint.
    pub vmm_state: Option<Vec<u8>>,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

/// What a create run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Guest pages.
    pub pages: u64,
    /// Pages stored as ZERO.
    pub zero_pages: u64,
    /// Pages stored as DISK references.
    pub disk_pages: u64,
    /// Pages stored as BLOB references (including duplicates).
    pub blob_pages: u64,
    /// Distinct blobs stored.
    pub blobs_stored: u64,
    /// Hints whose content matched the disk.
    pub hints_verified: u64,
    /// Hints whose content did not match (page became something else).
    pub hints_rejected: u64,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Checkpoint file size in bytes.
    pub checkpoint_bytes: u64,
    /// checkpoint_bytes / guest_bytes.
    pub size_ratio: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Errors from creating a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Placeholder.
    #[error("{0}")]
    Other(String),
}

/// Classify every page of `mem` (a raw guest memory image, length a multiple of 4096)
/// and write the checkpoint to `out` (atomically: a temp file renamed at the end).
pub fn create(mem: &[u8], opts: &CreateOptions, out: &Path) -> Result<Summary, CreateError> {
    let _ = (mem, opts, out);
    unimplemented!()
}
