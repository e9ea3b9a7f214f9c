//! The desktop workload: a virtual desktop's memory and the pages a user session touches.
//!
//! Heap layout: segments of [`abi::DESKTOP_SEGMENT_PAGES`] pages (2 MiB), each
//!
//! ```text
//! [0, seg_cache)                     page cache: cache page c = disk block c (read at boot)
//! [seg_cache, seg_cache + seg_anon)  computed data
//! [seg_cache + seg_anon, 512)        free: stays zero
//! ```
//!
//! so free memory is spread over RAM as in a long-running OS, and cache page `c` lives in
//! segment `c / seg_cache`. "Used" pages are the cache and computed pages of every segment.
//!
//! The working set is a function, not a table (the guest CPU is emulated at about a
//! microsecond per instruction, so a request must stay a few hundred instructions: no
//! division on the request path, ranges come from a multiply, see [`below`]):
//! - `runs` file-page runs: run `k` lies in the cache part of segment `below(h, segs)` at a
//!   spread-out offset, and is 1-4 pages long (3 in 4 runs) or 8-64 pages (never longer than
//!   a segment's cache part); together about [`RUN_PAGES_PCT`] % of the working set;
//! - `singles` scattered heap pages: single `j` is a computed page of a spread-out segment;
//! - for each session (the request seed the VMM puts in the boot info), about
//!   [`SESSION_VARY_PER_1024`]/1024 of the runs and singles are replaced by session-specific
//!   ones (`key` = the index for the others), so two sessions share ~92 % of the working set.
//!
//! The sequence of accesses does not depend on the session (the READ stream's PRNG seed is
//! the checkpointed state and the request number, as for session 0 of the other workloads):
//! a resumed desktop redraws the same windows in the same order whoever uses it. What
//! differs is the items replaced and which page each cold access touches. So a session
//! touches, request by request, nearly the pages another session touched: a recording of one
//! covers ~90 % of another's first touches, whatever the RAM size and the session length.
//!
//! An access starts as: a cold page with probability `cold_permille`/1000 (applied in 1024ths;
//! uniform over used pages, so the VM keeps touching new pages slowly); else, one time in
//! two, a file read (up to [`FILE_READ_PAGES`] consecutive pages of one run, read one per
//! request slot); else a single.

use crate::abi;
use crate::io;
use crate::workload::{APIC_HEAP_PAGE, READ_CHUNK_PAGES, mix, page, page_addr, xorshift};

const SEG: u64 = abi::DESKTOP_SEGMENT_PAGES;
/// Share of the working set's pages in file-page runs (the rest are singles), percent.
pub const RUN_PAGES_PCT: u64 = 60;
/// Pages a file read reads at most (consecutive pages of one run).
pub const FILE_READ_PAGES: u64 = 8;
/// Runs and singles replaced per session, out of 1024 (about 4 %).
pub const SESSION_VARY_PER_1024: u64 = 41;
const SALT_START: u64 = 0x5354_4152_5400_0000;
const SALT_LEN: u64 = 0x4c45_4e00_0000_0000;
const SALT_SINGLE: u64 = 0x5349_4e47_4c45_0000;
/// Marks a session-specific key (base keys are indices, far below this bit).
const SESSION_KEY_BIT: u64 = 1 << 63;
/// The bit of an access's random word that makes it a file read (one time in two).
const FILE_READ_BIT: u64 = 1 << 40;

/// The desktop parameters the VMM passes in the boot info.
#[derive(Clone, Copy)]
pub struct DesktopParams {
    /// Page cache, percent of the heap (bounded by the disk).
    pub cache_pct: u64,
    /// Computed data, percent of the heap.
    pub anon_pct: u64,
    /// Working set, percent of the heap.
    pub ws_pct: u64,
    /// Accesses outside the working set, per mille.
    pub cold_permille: u64,
}

/// The desktop's layout and working set, fixed at boot (part of the workload state).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Desktop {
    segs: u64,
    seg_cache: u64,
    seg_anon: u64,
    runs: u64,
    singles: u64,
    /// An access is cold when the top 10 bits of its random word are below this (1024 = all,
    /// also when there is no working set).
    cold_per_1024: u64,
    /// An access is a file read when its random word masked with `file_mask` equals
    /// `file_want`: one time in two, or always/never when there are no singles/runs.
    file_mask: u64,
    file_want: u64,
}

/// A file read in progress: the next heap page and how many are left.
#[derive(Default)]
pub struct FileRead {
    next: u64,
    left: u64,
}

/// Cheap 64-bit spreader (one multiply): enough to scatter run starts.
fn spread(x: u64) -> u64 {
    let x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// `x` mapped onto [0, n) by its high bits: a multiply instead of a division (Lemire).
fn below(x: u64, n: u64) -> u64 {
    ((u128::from(x) * u128::from(n)) >> 64) as u64
}

/// Length of the run with this key: 1-4 pages (3 in 4 runs), else 8-64; at most `max`.
fn run_len(key: u64, max: u64) -> u64 {
    let l = spread(key ^ SALT_LEN);
    let len = if l >> 62 != 0 {
        1 + ((l >> 8) & 3)
    } else {
        8 + below(l << 2, 57)
    };
    len.min(max)
}

/// The key of item `k` in the session whose mixed seed is `sk`: `k` itself, or for a few
/// items (depending on both), a session-specific key.
fn item_key(k: u64, sk: u64) -> u64 {
    let h = spread(k ^ sk);
    if h >> 54 < SESSION_VARY_PER_1024 {
        (k ^ sk) | SESSION_KEY_BIT
    } else {
        k
    }
}

impl Desktop {
    /// Lays out `heap_pages` pages (a multiple of the segment size) for `params`. Segments
    /// from the APIC page up ([`abi::APIC_HOLE_ADDR`], in 4 GiB guests) stay free.
    pub fn new(params: &DesktopParams, heap_pages: u64, disk_pages: u64) -> Self {
        let below_apic = APIC_HEAP_PAGE / SEG;
        let segs = (heap_pages / SEG).min(below_apic);
        let cache_pct = params.cache_pct.min(100);
        let anon_pct = params.anon_pct.min(100 - cache_pct);
        let seg_cache = match segs {
            0 => 0,
            n => (SEG * cache_pct / 100).min(disk_pages / n),
        };
        let seg_anon = SEG * anon_pct / 100;
        let (cache_pages, anon_pages) = (segs * seg_cache, segs * seg_anon);
        let ws = (heap_pages * params.ws_pct.min(100) / 100).min(cache_pages + anon_pages);
        let run_target = match (cache_pages, anon_pages) {
            (0, _) => 0,
            (_, 0) => ws,
            _ => ws * RUN_PAGES_PCT / 100,
        }
        .min(cache_pages);
        let mut desk = Desktop {
            segs,
            seg_cache,
            seg_anon,
            runs: 0,
            singles: (ws - run_target).min(anon_pages),
            cold_per_1024: params.cold_permille.min(1000) * 1024 / 1000,
            file_mask: FILE_READ_BIT,
            file_want: FILE_READ_BIT,
        };
        let mut run_pages = 0;
        while run_pages < run_target {
            run_pages += run_len(desk.runs, seg_cache);
            desk.runs += 1;
        }
        match (desk.runs, desk.singles) {
            (0, 0) => desk.cold_per_1024 = 1024,
            (0, _) => (desk.file_mask, desk.file_want) = (0, 1),
            (_, 0) => (desk.file_mask, desk.file_want) = (0, 0),
            _ => {}
        }
        desk
    }

    /// Page-cache pages.
    pub fn cache_pages(&self) -> u64 {
        self.segs * self.seg_cache
    }

    /// Computed pages.
    pub fn anon_pages(&self) -> u64 {
        self.segs * self.seg_anon
    }

    /// What the CHECK hashes besides the common fields (the rest follows from these).
    pub fn fields(&self) -> [u64; 6] {
        [
            self.segs,
            self.seg_cache,
            self.seg_anon,
            self.runs,
            self.singles,
            self.cold_per_1024,
        ]
    }

    /// Heap page of cache page `c` (`c` < cache_pages; boot and write-back only).
    pub fn cache_heap(&self, c: u64) -> u64 {
        c / self.seg_cache * SEG + c % self.seg_cache
    }

    /// Heap page of computed page `a` (`a` < anon_pages; boot only).
    pub fn anon_heap(&self, a: u64) -> u64 {
        a / self.seg_anon * SEG + self.seg_cache + a % self.seg_anon
    }

    /// Reads each segment's page-cache part from the disk, in chunks like the other
    /// workloads, writing each buffer page first (as an allocator would).
    pub fn fill_cache(&self) {
        for s in 0..self.segs {
            let mut done = 0;
            while done < self.seg_cache {
                let n = READ_CHUNK_PAGES.min(self.seg_cache - done);
                let first = s * SEG + done;
                for p in first..first + n {
                    page(p)[0] = 0;
                }
                let disk_page = s * self.seg_cache + done;
                io::disk_read(
                    disk_page * abi::PAGE_SIZE,
                    page_addr(first),
                    n * abi::PAGE_SIZE,
                );
                done += n;
            }
        }
    }

    /// The next heap page an access touches: continues `file` if a file read is in progress,
    /// else starts a new access with `rng`. `sk` is the mixed session seed. Needs used pages.
    #[inline(always)]
    pub fn next_page(&self, rng: &mut u64, sk: u64, file: &mut FileRead) -> u64 {
        if file.left > 0 {
            file.left -= 1;
            file.next += 1;
            return file.next;
        }
        let r = xorshift(rng);
        if r >> 54 < self.cold_per_1024 {
            // Which page a cold access touches depends on the session.
            let c = spread(r ^ sk);
            return below(c, self.segs) * SEG + below(c << 20, self.seg_cache + self.seg_anon);
        }
        if r & self.file_mask == self.file_want {
            let key = item_key(below(r << 24, self.runs), sk);
            let h = spread(key ^ SALT_START);
            let len = run_len(key, self.seg_cache);
            let start = below(h, self.segs) * SEG + below(h << 24, self.seg_cache - len + 1);
            let n = len.min(FILE_READ_PAGES);
            let first = start + below(r << 44, len - n + 1);
            *file = FileRead {
                next: first,
                left: n - 1,
            };
            first
        } else {
            let key = item_key(below(r << 24, self.singles), sk ^ SALT_SINGLE);
            let h = spread(key ^ SALT_SINGLE);
            below(h, self.segs) * SEG + self.seg_cache + below(h << 24, self.seg_anon)
        }
    }
}

/// The mixed session seed that [`Desktop::next_page`] takes.
pub fn session_key(session: u64) -> u64 {
    mix(session ^ SALT_SINGLE.rotate_left(7))
}
