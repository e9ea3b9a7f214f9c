//! Reading a checkpoint back: open once, then rebuild any run of pages.
//! (API stub: implementation lands next.)

use std::path::{Path, PathBuf};

use crate::types::{DiskIndex, DiskOffset, PageIndex};

/// Where a page's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// An all-zero page.
    Zero,
    /// A 4 KiB block of a backing disk image.
    Disk {
        /// Which disk image.
        disk: DiskIndex,
        /// Aligned byte offset of the block in that image.
        offset: DiskOffset,
    },
    /// A page stored in the checkpoint's blob section.
    Blob(crate::types::BlobIndex),
}

/// One page-table entry: its source and the CRC32 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Where the bytes come from.
    pub source: PageSource,
    /// CRC32 (crc32fast, IEEE) of the page's 4096 bytes.
    pub crc: u32,
}

/// Bytes rebuilt by one [`Checkpoint::read_pages`] call, by source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// Bytes of zero pages.
    pub zero_bytes: u64,
    /// Bytes read from disk images.
    pub disk_bytes: u64,
    /// Bytes copied from the blob section.
    pub blob_bytes: u64,
    /// Number of pread calls issued on disk images (after coalescing).
    pub disk_reads: u64,
}

/// Errors from opening a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Placeholder.
    #[error("{0}")]
    Other(String),
}

/// Errors from rebuilding pages.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The requested range is outside guest memory or not page aligned.
    #[error("pages {first}..{end} are outside guest memory of {pages} pages")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// One past the last page asked for.
        end: u64,
        /// Pages in guest memory.
        pages: u64,
    },
    /// A rebuilt page's CRC32 does not match the page table.
    #[error("{page}: CRC mismatch (expected {expected:#010x}, got {actual:#010x}) for bytes from {source_name}")]
    CrcMismatch {
        /// The bad page.
        page: PageIndex,
        /// CRC in the page table.
        expected: u32,
        /// CRC of the bytes rebuilt.
        actual: u32,
        /// "zero", "blob section of <ckpt>", or the disk image path.
        source_name: String,
    },
    /// Reading a disk image failed.
    #[error("reading {page} from disk image {disk}")]
    DiskRead {
        /// First page of the failed read.
        page: PageIndex,
        /// Path of the disk image.
        disk: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// An open checkpoint: header validated, page table and blobs mapped, disk images open.
pub struct Checkpoint {}

impl Checkpoint {
    /// Open and validate `path`, and open every disk image it references
    /// (checking each one's size and fingerprint).
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let _ = path;
        unimplemented!()
    }

    /// Guest memory size in bytes (a multiple of 4096).
    pub fn guest_size(&self) -> u64 {
        unimplemented!()
    }

    /// Number of guest pages.
    pub fn page_count(&self) -> u64 {
        unimplemented!()
    }

    /// The page-table entry of `page`. Panics if `page` is out of range.
    pub fn entry(&self, page: PageIndex) -> PageEntry {
        let _ = page;
        unimplemented!()
    }

    /// The opaque VMM-state section (empty if the checkpoint has none).
    pub fn vmm_state(&self) -> &[u8] {
        unimplemented!()
    }

    /// Rebuild pages `[first, first + out.len() / 4096)` into `out`
    /// (`out.len()` a multiple of 4096), coalescing adjacent DISK pages into
    /// one pread, checking every page's CRC. Thread-safe (`&self`, pread).
    pub fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        let _ = (first, out);
        unimplemented!()
    }
}
