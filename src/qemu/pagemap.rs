//! Which guest pages a QEMU process really touched, from its page tables.
//!
//! QEMU madvises its RAM MADV_HUGEPAGE, so every fault on the mounted
//! `memory` reads a 2 MiB window: a recording mount sees all 512 pages of
//! each window as touched, and the loading set swells with neighbours the
//! guest never used. QEMU's own page tables know better: a page is mapped
//! (or copied on write) only once the guest touched it, give or take the
//! kernel's fault-around (up to 64 KiB of already cached neighbours).
//! [`Touched::sample`] reads `/proc/PID/pagemap` over QEMU's mappings of the
//! file, and [`refine`] keeps, of a recorded loading set, only the pages seen
//! mapped, in the recorded order.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::loadset::{self, LoadSetError, LoadingSet, Run};
use crate::types::PAGE_SIZE_U64;

/// pagemap entry bits: page present in RAM, or swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// One mapping of the file in the process: virtual start, length, file offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    len: u64,
    offset: u64,
}

/// Pages of a guest seen mapped in a process, accumulated over samples.
pub struct Touched {
    pid: u32,
    file: PathBuf,
    bits: Vec<u64>,
    mappings: Vec<Mapping>,
}

impl Touched {
    /// Track process `pid`'s mappings of `file` (a guest RAM file of `pages` pages).
    pub fn new(pid: u32, file: &Path, pages: u64) -> Touched {
        Touched {
            pid,
            file: file.to_owned(),
            bits: vec![0; pages.div_ceil(64) as usize],
            mappings: Vec::new(),
        }
    }

    /// Add the pages mapped right now. The mappings are looked up until found.
    pub fn sample(&mut self) -> io::Result<()> {
        if self.mappings.is_empty() {
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))?;
            self.mappings = parse_maps(&maps, &self.file);
        }
        let pagemap = File::open(format!("/proc/{}/pagemap", self.pid))?;
        let mut buf = Vec::new();
        for m in &self.mappings {
            let pages = (m.len / PAGE_SIZE_U64) as usize;
            buf.resize(pages * 8, 0);
            pagemap.read_exact_at(&mut buf, m.start / PAGE_SIZE_U64 * 8)?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap());
                let page = m.offset / PAGE_SIZE_U64 + i as u64;
                if e & (PM_PRESENT | PM_SWAPPED) != 0 && (page as usize) < self.bits.len() * 64 {
                    self.bits[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
        }
        Ok(())
    }

    /// Whether any mapping of the file was found.
    pub fn found(&self) -> bool {
        !self.mappings.is_empty()
    }

    /// Whether `page` was seen mapped.
    pub fn contains(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Pages seen mapped.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The mappings of `file` in a /proc/PID/maps text.
fn parse_maps(maps: &str, file: &Path) -> Vec<Mapping> {
    let want = file.to_string_lossy();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, _perms, offset) = (f.next()?, f.next()?, f.next()?);
            let (_dev, _inode) = (f.next()?, f.next()?);
            let path: Vec<&str> = f.collect();
            if path.join(" ") != want {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let start = u64::from_str_radix(a, 16).ok()?;
            let end = u64::from_str_radix(b, 16).ok()?;
            Some(Mapping {
                start,
                len: end.checked_sub(start)?,
                offset: u64::from_str_radix(offset, 16).ok()?,
            })
        })
        .collect()
}

/// Keep, of `runs`, only the pages `keep` says, in order; runs split where
/// pages drop out.
pub fn filter_runs(runs: &[Run], keep: impl Fn(u64) -> bool) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for r in runs {
        let mut current: Option<Run> = None;
        for page in r.first_page..r.first_page + u64::from(r.pages) {
            if !keep(page) {
                out.extend(current.take());
                continue;
            }
            match current.as_mut() {
                Some(c) => c.pages += 1,
                None => {
                    current = Some(Run {
                        first_page: page,
                        pages: 1,
                        ..*r
                    })
                }
            }
        }
        out.extend(current);
    }
    out
}

/// Rewrite the loading set at `path` (recorded from `ck`) with only the pages
/// in `touched`; returns (pages before, pages after).
pub fn refine(path: &Path, ck: &Checkpoint, touched: &Touched) -> Result<(u64, u64), LoadSetError> {
    let set = LoadingSet::open(path, ck)?;
    let before: u64 = set.runs().iter().map(|r| u64::from(r.pages)).sum();
    let runs = filter_runs(set.runs(), |p| touched.contains(p));
    let after: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    let window_ms = set.header().window_ms;
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0o600);
    drop(set);
    loadset::write(path, ck, &runs, window_ms, mode)?;
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_of_the_file_give_start_length_offset() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:00 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0040000000 rw-p 00000000 00:2d 2 /mnt/my vm/memory
7f0040000000-7f0040200000 rw-p 40000000 00:2d 2 /mnt/my vm/memory
7f0050000000-7f0050001000 rw-p 00000000 00:00 0 
";
        let m = parse_maps(maps, Path::new("/mnt/my vm/memory"));
        assert_eq!(
            m,
            vec![
                Mapping {
                    start: 0x7f00_0000_0000,
                    len: 1 << 30,
                    offset: 0
                },
                Mapping {
                    start: 0x7f00_4000_0000,
                    len: 2 << 20,
                    offset: 1 << 30
                }
            ]
        );
    }

    #[test]
    fn filtering_keeps_order_and_splits_runs() {
        let runs = loadset::runs_from_touches(&[
            (10, 0, false),
            (11, 0, false),
            (12, 0, false),
            (13, 1, false),
            (0, 2, true),
            (1, 2, true),
            (5, 3, false),
        ]);
        let kept = filter_runs(&runs, |p| p != 12 && p != 1 && p != 5);
        let got: Vec<(u64, u32, u32, bool)> = kept
            .iter()
            .map(|r| (r.first_page, r.pages, r.t_ms, r.zero))
            .collect();
        assert_eq!(
            got,
            vec![(10, 2, 0, false), (13, 1, 0, false), (0, 1, 2, true)]
        );
    }

    #[test]
    fn this_process_sees_its_own_touched_pages() {
        // Large enough that one fault cannot map it all: the kernel maps the
        // cached neighbours of a faulting page (fault-around, and whole large
        // folios, up to 2 MiB), so a small file can come out fully mapped.
        const PAGES: usize = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, vec![7u8; PAGES * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        // SAFETY: a private read-only map of a file only this test uses.
        let map = unsafe { memmap2::MmapOptions::new().map(&f) }.unwrap();
        let _ = map.advise(memmap2::Advice::Random);
        let touched_page = 2100;
        assert_eq!(std::hint::black_box(map[touched_page * 4096]), 7);
        let mut t = Touched::new(std::process::id(), &path, PAGES as u64);
        t.sample().unwrap();
        assert!(t.found());
        assert!(t.contains(touched_page as u64));
        assert!(t.count() <= 1024, "{} of {PAGES} pages seen", t.count());
    }
}
