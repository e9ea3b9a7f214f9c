//! The page-source layer: whatever can rebuild guest pages, behind one small
//! trait, so the FUSE daemon never knows whether pages come from a local
//! checkpoint file, a qcow2 image or (later) an object store.
//!
//! [`crate::Checkpoint`] implements [`PageReader`]; [`MemReader`] holds guest
//! memory in a `Vec` for tests (the redb `StorageBackend` / `InMemoryBackend`
//! split).

use std::collections::HashSet;
use std::ops::Range;

use crate::checkpoint::{Checkpoint, PageEntry, PageSource, ReadCounts, ReadError};
use crate::types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// A read-only source of guest pages.
pub trait PageReader: Send + Sync + 'static {
    /// Number of guest pages.
    fn page_count(&self) -> u64;

    /// Rebuild pages `[first, first + out.len() / 4096)` into `out`, checking
    /// each page against its CRC32: never returns wrong bytes.
    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError>;

    /// Where `page` comes from and the CRC32 of its bytes.
    fn entry(&self, page: PageIndex) -> Result<PageEntry, ReadError>;

    /// A number that identifies this guest image's content (equal for two
    /// opens of the same checkpoint, different for another checkpoint): files
    /// derived from one checkpoint, like a loading set, carry it.
    fn identity(&self) -> u64;

    /// Guest memory size in bytes.
    fn guest_size(&self) -> u64 {
        self.page_count() * PAGE_SIZE_U64
    }

    /// Where `page` lives on a backing disk, if it is a DISK page (background
    /// fetches sort by this so their disk reads stay sequential).
    fn disk_location(&self, page: PageIndex) -> Option<(DiskIndex, DiskOffset)> {
        match self.entry(page).ok()?.source {
            PageSource::Disk { disk, offset } => Some((disk, offset)),
            PageSource::Zero | PageSource::Blob(_) | PageSource::ParentBlob { .. } => None,
        }
    }

    /// Whether `page` is a ZERO page (an invalid entry counts as not zero).
    fn is_zero(&self, page: PageIndex) -> bool {
        matches!(self.entry(page), Ok(e) if e.source == PageSource::Zero)
    }
}

impl PageReader for Checkpoint {
    fn page_count(&self) -> u64 {
        Checkpoint::page_count(self)
    }

    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        Checkpoint::read_pages(self, first, out)
    }

    fn entry(&self, page: PageIndex) -> Result<PageEntry, ReadError> {
        if page.0 >= Checkpoint::page_count(self) {
            return Err(ReadError::OutOfRange {
                first: page.0,
                end: page.0 + 1,
                pages: Checkpoint::page_count(self),
            });
        }
        self.try_entry(page)
    }

    fn identity(&self) -> u64 {
        Checkpoint::identity(self)
    }
}

/// Guest memory held in a `Vec`, for tests. All-zero pages are ZERO pages,
/// pages in `disk_pages` pretend to live on disk 0 at the given offset, every
/// other page is a BLOB; pages in `bad_pages` fail with a CRC mismatch.
#[derive(Debug, Default)]
pub struct MemReader {
    /// The guest memory image.
    pub data: Vec<u8>,
    /// Pages that fail to rebuild.
    pub bad_pages: HashSet<u64>,
    /// (page, disk offset) pairs reported as DISK pages.
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

    fn page(&self, page: u64) -> &[u8] {
        &self.data[page as usize * PAGE_SIZE..][..PAGE_SIZE]
    }
}

impl PageReader for MemReader {
    fn page_count(&self) -> u64 {
        (self.data.len() / PAGE_SIZE) as u64
    }

    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        let pages = (out.len() / PAGE_SIZE) as u64;
        let end = first.0.saturating_add(pages);
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

    fn entry(&self, page: PageIndex) -> Result<PageEntry, ReadError> {
        if page.0 >= self.page_count() {
            return Err(ReadError::OutOfRange {
                first: page.0,
                end: page.0 + 1,
                pages: self.page_count(),
            });
        }
        let bytes = self.page(page.0);
        let source = if let Some(&(_, off)) = self.disk_pages.iter().find(|(p, _)| *p == page.0) {
            PageSource::Disk {
                disk: DiskIndex(0),
                offset: DiskOffset(off),
            }
        } else if bytes.iter().all(|&b| b == 0) {
            PageSource::Zero
        } else {
            PageSource::Blob(BlobIndex(page.0))
        };
        Ok(PageEntry {
            source,
            crc: crc32fast::hash(bytes),
        })
    }

    fn identity(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.data)
    }
}

/// The runs of ZERO pages of `src`, as sorted page ranges (FaaSnap maps these
/// anonymous so the guest never faults them through the file).
pub fn zero_ranges(src: &dyn PageReader) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for p in 0..src.page_count() {
        if !src.is_zero(PageIndex(p)) {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.end == p => r.end = p + 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

/// Zero ranges as text: one line `FIRST_PAGE PAGE_COUNT` per run (the
/// `zero-ranges` file of a mount).
pub fn format_zero_ranges(ranges: &[Range<u64>]) -> String {
    let mut s = String::with_capacity(ranges.len() * 16);
    for r in ranges {
        s.push_str(&format!("{} {}\n", r.start, r.end - r.start));
    }
    s
}

/// Why a zero-ranges text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct ZeroRangesError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub what: &'static str,
}

/// Parse [`format_zero_ranges`] text for a guest of `page_count` pages: ranges
/// must be non-empty, sorted, disjoint and inside guest memory.
pub fn parse_zero_ranges(text: &str, page_count: u64) -> Result<Vec<Range<u64>>, ZeroRangesError> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let err = |what| ZeroRangesError { line: i + 1, what };
        let mut f = l.split_ascii_whitespace();
        let (Some(a), Some(n), None) = (f.next(), f.next(), f.next()) else {
            return Err(err("expected two numbers"));
        };
        let (Ok(a), Ok(n)) = (a.parse::<u64>(), n.parse::<u64>()) else {
            return Err(err("expected two numbers"));
        };
        let end = a.checked_add(n).ok_or(err("range overflows"))?;
        if n == 0 || end > page_count {
            return Err(err("range is empty or outside guest memory"));
        }
        if out.last().is_some_and(|r| r.end > a) {
            return Err(err("ranges overlap or are not sorted"));
        }
        out.push(a..end);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_reader_classifies_zero_disk_and_blob_pages() {
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        data[PAGE_SIZE..].fill(5);
        let mut r = MemReader::new(data);
        r.disk_pages = vec![(2, 8192)];
        assert!(r.is_zero(PageIndex(0)));
        assert!(!r.is_zero(PageIndex(1)));
        assert_eq!(
            r.disk_location(PageIndex(2)),
            Some((DiskIndex(0), DiskOffset(8192)))
        );
        assert_eq!(r.disk_location(PageIndex(1)), None);
        assert!(r.entry(PageIndex(3)).is_err());
        let e = r.entry(PageIndex(1)).unwrap();
        assert_eq!(e.crc, crc32fast::hash(&[5u8; PAGE_SIZE]));
    }

    #[test]
    fn zero_ranges_round_trip_through_text() {
        let mut data = vec![0u8; 6 * PAGE_SIZE];
        data[2 * PAGE_SIZE] = 1;
        data[5 * PAGE_SIZE] = 1;
        let r = MemReader::new(data);
        let ranges = zero_ranges(&r);
        assert_eq!(ranges, vec![0..2, 3..5]);
        let text = format_zero_ranges(&ranges);
        assert_eq!(text, "0 2\n3 2\n");
        assert_eq!(parse_zero_ranges(&text, 6).unwrap(), ranges);
    }

    #[test]
    fn bad_zero_ranges_are_refused_with_their_line() {
        assert_eq!(parse_zero_ranges("0 2\n1 1\n", 8).unwrap_err().line, 2);
        assert!(parse_zero_ranges("7 2\n", 8).is_err());
        assert!(parse_zero_ranges("3 0\n", 8).is_err());
        assert!(parse_zero_ranges("x 1\n", 8).is_err());
        assert!(parse_zero_ranges("18446744073709551615 2\n", 8).is_err());
        assert!(parse_zero_ranges("", 8).unwrap().is_empty());
    }

    #[test]
    fn identity_differs_with_content() {
        let a = MemReader::new(vec![1u8; PAGE_SIZE]);
        let b = MemReader::new(vec![2u8; PAGE_SIZE]);
        assert_ne!(a.identity(), b.identity());
        assert_eq!(
            a.identity(),
            MemReader::new(vec![1u8; PAGE_SIZE]).identity()
        );
    }
}
