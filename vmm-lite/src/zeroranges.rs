//! `restore --zero-ranges`: map the checkpoint's runs of zero pages anonymous (FaaSnap).
//!
//! After guest RAM is mapped `MAP_PRIVATE` from the memory file, each long enough run of zero
//! pages is replaced with anonymous memory (`MAP_FIXED`), so the guest's first touch of those
//! pages is a minor fault on the zero page instead of a read through the file (a FUSE round
//! trip on a ckptfs mount).
//!
//! The file is the text form of `ckptfs::source::format_zero_ranges` (one line
//! `FIRST_PAGE PAGE_COUNT` per run), as a ckptfs mount serves it in `MOUNT/zero-ranges`. It
//! must describe the same checkpoint as the memory file: the VMM cannot tell a page that is
//! zero from one the file merely claims is (that would cost the very reads this avoids), and
//! a wrong claim silently zeroes guest memory. Pages that identify the VM (its stack, boot
//! info, page tables) are checked against the state after this step, so a file from another
//! checkpoint that covers one of them is caught there (see `binding`).
//!
//! Each mapped run splits the file mapping, adding up to two VMAs, and a process has at most
//! `vm.max_map_count` (65530 by default) of them. So runs that touch are merged, runs shorter
//! than [`MIN_RUN_PAGES`] are left to the file (a 64 KiB read costs about what a fault does),
//! and at most [`MAX_MAPPINGS`] runs, the longest, are mapped: at most ~16,400 extra VMAs.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::abi;
use crate::memory::GuestMemory;

/// Shortest run mapped anonymous, in pages (64 KiB: also the kernel's fault-around window).
pub const MIN_RUN_PAGES: u64 = 16;
/// Most runs mapped anonymous (each adds up to two VMAs).
pub const MAX_MAPPINGS: usize = 8192;

/// What `--zero-ranges` did (part of the restore report).
#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub struct ZeroRangesReport {
    /// Runs listed in the file.
    pub ranges_in_file: u64,
    /// Pages those runs cover.
    pub pages_in_file: u64,
    /// Runs mapped anonymous (after merging touching runs).
    pub ranges_mapped: u64,
    /// Bytes mapped anonymous.
    pub bytes_mapped: u64,
    /// Runs left to the file for being shorter than [`MIN_RUN_PAGES`].
    pub skipped_short: u64,
    /// Runs left to the file beyond the [`MAX_MAPPINGS`] longest.
    pub skipped_over_cap: u64,
    /// Time to read the file and map the runs, ms.
    pub ms: f64,
}

/// Errors from `--zero-ranges`.
#[derive(Debug, thiserror::Error)]
pub enum ZeroRangesError {
    /// The file could not be read.
    #[error("zero-ranges file {path}: cannot read")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file does not parse, or names pages outside guest RAM.
    #[error("zero-ranges file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Which line and why.
        #[source]
        source: ckptfs::source::ZeroRangesError,
    },
    /// mmap failed.
    #[error("zero-ranges file {path}: mapping guest pages {first}..{end} anonymous")]
    Map {
        /// The file.
        path: PathBuf,
        /// First page.
        first: u64,
        /// Page after the last.
        end: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
}

/// The runs to map: touching runs merged, runs shorter than `min_pages` dropped, the `cap`
/// longest kept (sorted by position). Returns (runs, skipped short, skipped over the cap).
pub fn select(ranges: &[Range<u64>], min_pages: u64, cap: usize) -> (Vec<Range<u64>>, u64, u64) {
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => merged.push(r.clone()),
        }
    }
    let before = merged.len();
    merged.retain(|r| r.end - r.start >= min_pages);
    let short = (before - merged.len()) as u64;
    let mut over_cap = 0;
    if merged.len() > cap {
        over_cap = (merged.len() - cap) as u64;
        // Longest first; equal lengths by position, so the choice is deterministic.
        merged.sort_unstable_by_key(|r| (std::cmp::Reverse(r.end - r.start), r.start));
        merged.truncate(cap);
        merged.sort_unstable_by_key(|r| r.start);
    }
    (merged, short, over_cap)
}

/// Reads the zero ranges in `path` and maps the selected runs of `mem` anonymous; returns
/// the report and the runs mapped.
pub fn apply(
    mem: &mut GuestMemory,
    path: &Path,
) -> Result<(ZeroRangesReport, Vec<Range<u64>>), ZeroRangesError> {
    let started = Instant::now();
    let text = std::fs::read_to_string(path).map_err(|source| ZeroRangesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let page_count = mem.size() / abi::PAGE_SIZE;
    let ranges = ckptfs::source::parse_zero_ranges(&text, page_count).map_err(|source| {
        ZeroRangesError::Parse {
            path: path.to_owned(),
            source,
        }
    })?;
    let (runs, skipped_short, skipped_over_cap) = select(&ranges, MIN_RUN_PAGES, MAX_MAPPINGS);
    for r in &runs {
        mem.map_anonymous_over(r.clone())
            .map_err(|source| ZeroRangesError::Map {
                path: path.to_owned(),
                first: r.start,
                end: r.end,
                source,
            })?;
    }
    let pages_mapped: u64 = runs.iter().map(|r| r.end - r.start).sum();
    let report = ZeroRangesReport {
        ranges_in_file: ranges.len() as u64,
        pages_in_file: ranges.iter().map(|r| r.end - r.start).sum(),
        ranges_mapped: runs.len() as u64,
        bytes_mapped: pages_mapped * abi::PAGE_SIZE,
        skipped_short,
        skipped_over_cap,
        ms: started.elapsed().as_secs_f64() * 1e3,
    };
    Ok((report, runs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn touching_runs_merge_and_short_runs_are_skipped() {
        let (runs, short, cap) = select(&[0..10, 10..20, 30..35, 40..80], 16, 100);
        assert_eq!(runs, vec![0..20, 40..80]);
        assert_eq!((short, cap), (1, 0));
    }

    #[test]
    fn only_the_longest_runs_up_to_the_cap_are_mapped() {
        let ranges: Vec<Range<u64>> = (0..10).map(|i| i * 100..i * 100 + 16 + i).collect();
        let (runs, short, cap) = select(&ranges, 16, 3);
        assert_eq!(runs, vec![700..723, 800..824, 900..925]);
        assert_eq!((short, cap), (0, 7));
    }

    #[test]
    fn file_runs_read_zero_and_other_pages_still_come_from_the_file() {
        let mut mem_file = tempfile::NamedTempFile::new().unwrap();
        mem_file.write_all(&vec![9u8; 4 << 20]).unwrap();
        let mut mem = GuestMemory::map_file_private(mem_file.path(), 4 << 20).unwrap();
        let mut z = tempfile::NamedTempFile::new().unwrap();
        z.write_all(b"16 32\n100 4\n").unwrap();
        let (report, runs) = apply(&mut mem, z.path()).unwrap();
        assert_eq!(runs, vec![16..48]);
        assert_eq!(report.ranges_in_file, 2);
        assert_eq!(report.pages_in_file, 36);
        assert_eq!(report.ranges_mapped, 1);
        assert_eq!(report.bytes_mapped, 32 * 4096);
        assert_eq!(report.skipped_short, 1);
        assert_eq!(mem.read_u32(16 * 4096), Some(0));
        assert_eq!(mem.read_u32(48 * 4096 - 4), Some(0));
        assert_eq!(mem.read_u32(48 * 4096), Some(0x0909_0909));
        assert_eq!(mem.read_u32(100 * 4096), Some(0x0909_0909));
    }

    #[test]
    fn a_bad_file_is_named_with_its_line() {
        let mut mem = GuestMemory::anonymous(4 << 20).unwrap();
        let mut z = tempfile::NamedTempFile::new().unwrap();
        z.write_all(b"16 32\n1000 100\n").unwrap();
        let err = apply(&mut mem, z.path()).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains(&z.path().display().to_string()), "{chain}");
        assert!(chain.contains("line 2"), "{chain}");
        let missing = z.path().with_extension("nope");
        let err = apply(&mut mem, &missing).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
