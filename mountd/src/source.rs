//! What the daemon serves bytes from: a small trait over "rebuild these pages",
//! implemented by [`ckptfs::Checkpoint`] and by [`MemReader`] for tests
//! (the redb `StorageBackend` / `InMemoryBackend` split).

use std::collections::HashSet;

use ckptfs::checkpoint::ReadError;
use ckptfs::{Checkpoint, DiskIndex, DiskOffset, PAGE_SIZE, PageIndex, PageSource, ReadCounts};

/// A read-only source of guest pages.
pub trait PageReader: Send + Sync + 'static {
    /// Number of guest pages.
    fn page_count(&self) -> u64;

    /// Rebuild pages `[first, first + out.len() / 4096)` into `out`, checking each page.
    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError>;

    /// Where `page` lives on a backing disk, if it is a DISK page. The background
    /// fetcher sorts chunks by this so its disk reads stay sequential.
    fn disk_location(&self, page: PageIndex) -> Option<(DiskIndex, DiskOffset)>;

    /// Guest memory size in bytes.
    fn guest_size(&self) -> u64 {
        self.page_count() * PAGE_SIZE as u64
    }
}

impl PageReader for Checkpoint {
    fn page_count(&self) -> u64 {
        Checkpoint::page_count(self)
    }

    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        Checkpoint::read_pages(self, first, out)
    }

    fn disk_location(&self, page: PageIndex) -> Option<(DiskIndex, DiskOffset)> {
        match self.try_entry(page).ok()?.source {
            PageSource::Disk { disk, offset } => Some((disk, offset)),
            PageSource::Zero | PageSource::Blob(_) => None,
        }
    }
}

/// Guest memory held in a `Vec`, for tests. Pages in `bad_pages` fail with a CRC
/// mismatch, pages in `disk_pages` pretend to live on disk 0 at `offset`.
#[derive(Debug, Default)]
pub struct MemReader {
    /// The guest memory image.
    pub data: Vec<u8>,
    /// Pages that fail to rebuild.
    pub bad_pages: HashSet<u64>,
    /// (page, disk offset) pairs reported by `disk_location`.
    pub disk_pages: Vec<(u64, u64)>,
}

impl MemReader {
    /// A reader over `data` (length a multiple of 4096) with no bad pages.
    pub fn new(data: Vec<u8>) -> Self {
        assert!(
            data.len().is_multiple_of(PAGE_SIZE),
            "memory image must be page aligned"
        );
        MemReader {
            data,
            ..MemReader::default()
        }
    }
}

impl PageReader for MemReader {
    fn page_count(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }

    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        let pages = (out.len() / PAGE_SIZE) as u64;
        let end = first.0 + pages;
        if end > self.page_count() || !out.len().is_multiple_of(PAGE_SIZE) {
            return Err(ReadError::OutOfRange {
                first: first.0,
                end,
                pages: self.page_count(),
            });
        }
        if let Some(bad) = (first.0..end).find(|p| self.bad_pages.contains(p)) {
            return Err(ReadError::CrcMismatch {
                page: PageIndex(bad),
                expected: 0,
                actual: 1,
                source_name: "test memory".into(),
            });
        }
        let start = first.byte_offset() as usize;
        out.copy_from_slice(&self.data[start..start + out.len()]);
        Ok(ReadCounts {
            blob_bytes: out.len() as u64,
            ..ReadCounts::default()
        })
    }

    fn disk_location(&self, page: PageIndex) -> Option<(DiskIndex, DiskOffset)> {
        self.disk_pages
            .iter()
            .find(|(p, _)| *p == page.0)
            .map(|&(_, off)| (DiskIndex(0), DiskOffset(off)))
    }
}
