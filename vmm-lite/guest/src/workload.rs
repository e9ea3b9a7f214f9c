//! The workloads: what the heap holds and what a request does with it.
//!
//! Heap layout (heap page = (guest address - HEAP_ADDR) / 4096):
//!
//! ```text
//! [0, cache)              page cache: heap page i holds disk block i (read at boot)
//! [cache, cache + anon)   computed data: never on disk, never zero
//! [cache + anon, heap)    untouched: stays zero
//! ```
//!
//! except `desktop`, which interleaves the three in 2 MiB segments (see `desktop.rs`).
//!
//! A `READ` request does the same reads and changes nothing. A `WORK` request reads a word from each of [`PAGES_PER_REQUEST`] pages of the working set
//! (cache + anon), 90 % of them from a hot tenth, and sometimes modifies one; page-cache
//! writes are sometimes written back to disk (a modified page, like a file system flushing it).
//!
//! Instruction counts are kept small on purpose: KVM here emulates the guest CPU at about a
//! microsecond per instruction, so a request is a few hundred instructions, computed data is
//! a few words per page, and the whole-memory CHECK uses the VMM's hash device.

use crate::desktop::{Desktop, FileRead};
use crate::{BootInfo, abi, io};
use core::fmt::Write;

/// Pages a WORK request reads.
const PAGES_PER_REQUEST: u64 = 8;
/// Words of computed data written per anon page (spread over the page).
const ANON_WORDS_PER_PAGE: usize = 4;
/// One WORK request in this many modifies a working-set page.
const MODIFY_EVERY: u64 = 32;
/// One WORK request in this many modifies a page-cache page and writes it back.
const WRITEBACK_EVERY: u64 = 64;
/// Write-backs go to the first this many page-cache pages (bounds the VMM's disk overlay).
const WRITEBACK_PAGES: u64 = 64;
/// Step of the DIRTY walk over the heap: a prime (2^32 - 5) larger than any heap's page
/// count, so the walk visits every page once before repeating.
const DIRTY_STRIDE: u64 = 4_294_967_291;
/// Pages per disk read while filling the page cache.
pub const READ_CHUNK_PAGES: u64 = 64;
const WORDS: usize = (abi::PAGE_SIZE / 8) as usize;

type Page = [u64; WORDS];

/// The workload's whole state besides the heap (lives on the guest's stack).
#[repr(C)]
pub struct State {
    workload: u64,
    rng: u64,
    heap_pages: u64,
    cache_pages: u64,
    anon_pages: u64,
    requests: u64,
    modified: u64,
    written_back: u64,
    /// Desktop layout and working set (all zero for the other workloads).
    desk: Desktop,
    /// Pages DIRTY requests have written (the position in their walk over the heap).
    dirtied: u64,
}

pub fn page(heap_page: u64) -> &'static mut Page {
    let addr = page_addr(heap_page);
    // SAFETY: callers pass heap pages below `heap_pages`, which are guest RAM that only this
    // program uses; requests run one at a time, so no two references are live at once.
    unsafe { &mut *(addr as *mut Page) }
}

/// Heap page index of the APIC page ([`abi::APIC_HOLE_ADDR`]).
pub const APIC_HEAP_PAGE: u64 = (abi::APIC_HOLE_ADDR - abi::HEAP_ADDR) / abi::PAGE_SIZE;

/// Guest address of heap page `heap_page`: heap pages are numbered without the APIC page,
/// which pages from it up skip (only guests over 4 GiB reach it: the desktop keeps below
/// it and the others fill at most 3/4 of a 4 GiB heap).
pub fn page_addr(heap_page: u64) -> u64 {
    let skip = u64::from(heap_page >= APIC_HEAP_PAGE);
    abi::HEAP_ADDR + (heap_page + skip) * abi::PAGE_SIZE
}

/// Heap pages of a guest of `mem_size` bytes: from [`abi::HEAP_ADDR`] to the end of RAM,
/// less the APIC page if RAM covers it.
pub fn heap_pages(mem_size: u64) -> u64 {
    let pages = mem_size.saturating_sub(abi::HEAP_ADDR) / abi::PAGE_SIZE;
    pages - u64::from(pages > APIC_HEAP_PAGE)
}

/// Of `n` heap pages from `first`, how many are contiguous in guest memory (a disk read
/// into them must stop at the APIC page).
pub fn contiguous(first: u64, n: u64) -> u64 {
    if first < APIC_HEAP_PAGE && first + n > APIC_HEAP_PAGE {
        APIC_HEAP_PAGE - first
    } else {
        n
    }
}

/// splitmix64 finaliser: computed data that is neither zero nor on disk.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// xorshift64*.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// A working-set page out of `n`: 90 % from the hot tenth (every tenth page), else uniform.
fn pick(rng: &mut u64, n: u64) -> u64 {
    let r = xorshift(rng);
    if n >= 10 && (r >> 40) % 10 < 9 {
        (r % (n / 10)) * 10 + 3
    } else {
        r % n
    }
}

fn hash_words(words: &[u64], seed: u64) -> u64 {
    const K: u64 = 0x9fb2_1c65_1e98_df25;
    let mut lanes = [seed, seed ^ 1, seed ^ 2, seed ^ 3];
    for chunk in words.chunks_exact(4) {
        for (lane, w) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(31);
        }
    }
    for w in words.chunks_exact(4).remainder() {
        lanes[0] = (lanes[0] ^ w).wrapping_mul(K).rotate_left(31);
    }
    mix(lanes[0] ^ lanes[1].rotate_left(16) ^ lanes[2].rotate_left(32) ^ lanes[3].rotate_left(48))
}

/// A session's request seed (see [`abi::BOOT_SESSION_OFFSET`]) as requests use it, derived
/// once per session rather than at every request.
#[derive(Clone, Copy)]
pub struct Session {
    /// Added to a READ's PRNG seed: nothing for seed 0, so the READ stream of session 0 is
    /// the one from before sessions existed.
    salt: u64,
    /// The desktop's session key (which runs and singles this session replaces).
    desktop_key: u64,
}

impl Session {
    /// The session with request seed `seed`.
    pub fn new(seed: u64) -> Self {
        Session {
            salt: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            desktop_key: crate::desktop::session_key(seed),
        }
    }
}

impl State {
    /// Lays out the heap for the boot info's workload and fills it.
    pub fn init(info: &BootInfo) -> Self {
        let heap_pages = heap_pages(info.mem_size);
        let disk_pages = info.disk_size / abi::PAGE_SIZE;
        let mut desk = Desktop::default();
        let (cache_pages, anon_pages) = match info.workload {
            abi::WORKLOAD_PAGECACHE => (disk_pages.min(heap_pages * 3 / 4), 0),
            abi::WORKLOAD_ANON => (0, heap_pages * 3 / 4),
            abi::WORKLOAD_MIXED => (disk_pages.min(heap_pages / 3), heap_pages / 3),
            abi::WORKLOAD_DESKTOP => {
                desk = Desktop::new(&info.desktop(), heap_pages, disk_pages);
                (desk.cache_pages(), desk.anon_pages())
            }
            other => panic!("unknown workload {other}"),
        };
        let mut state = State {
            workload: info.workload,
            rng: info.seed | 1,
            heap_pages,
            cache_pages,
            anon_pages,
            requests: 0,
            modified: 0,
            written_back: 0,
            desk,
            dirtied: 0,
        };
        if state.is_desktop() {
            state.desk.fill_cache();
        } else {
            state.fill_cache();
        }
        state.fill_anon();
        let _ = writeln!(
            io::Serial,
            "guest: workload {} heap {} pages: cache {}, computed {}, untouched {}",
            state.workload,
            heap_pages,
            cache_pages,
            anon_pages,
            heap_pages - cache_pages - anon_pages
        );
        state
    }

    fn is_desktop(&self) -> bool {
        self.workload == abi::WORKLOAD_DESKTOP
    }

    /// Heap page of page-cache page `c` (which holds disk block `c`).
    fn cache_heap(&self, c: u64) -> u64 {
        if self.is_desktop() {
            self.desk.cache_heap(c)
        } else {
            c
        }
    }

    /// Reads disk blocks [0, cache) into heap pages [0, cache). Like an OS allocator, it
    /// writes each buffer page before the read (its header word), so these pages are dirty
    /// in KVM's log when the read happens.
    fn fill_cache(&mut self) {
        let mut first = 0;
        while first < self.cache_pages {
            let n = contiguous(first, READ_CHUNK_PAGES.min(self.cache_pages - first));
            for p in first..first + n {
                page(p)[0] = 0;
            }
            io::disk_read(first * abi::PAGE_SIZE, page_addr(first), n * abi::PAGE_SIZE);
            first += n;
        }
    }

    fn fill_anon(&mut self) {
        for a in 0..self.anon_pages {
            let p = if self.is_desktop() {
                self.desk.anon_heap(a)
            } else {
                self.cache_pages + a
            };
            self.fill_anon_page(p);
        }
    }

    fn fill_anon_page(&self, p: u64) {
        const STRIDE: usize = WORDS / ANON_WORDS_PER_PAGE;
        let words = page(p);
        for j in 0..ANON_WORDS_PER_PAGE {
            words[j * STRIDE] = mix(self.rng ^ (p << 9 | j as u64)) | 1;
        }
    }

    fn next(&mut self) -> u64 {
        xorshift(&mut self.rng)
    }

    /// One working-set page for a WORK request to modify.
    fn pick(&mut self, session: &Session) -> u64 {
        if self.is_desktop() {
            let mut rng = self.rng;
            let sk = session.desktop_key;
            let p = self.desk.next_page(&mut rng, sk, &mut FileRead::default());
            self.rng = rng;
            p
        } else {
            pick(&mut self.rng, self.cache_pages + self.anon_pages)
        }
    }

    /// Reads one word from each of `PAGES_PER_REQUEST` working-set pages chosen by `rng`
    /// (and, for the desktop, the session seed).
    fn read_pages(&self, rng: &mut u64, acc: u64, session: &Session) -> u64 {
        if self.is_desktop() {
            self.read_desktop_pages(rng, acc, session)
        } else {
            self.read_working_set(rng, acc)
        }
    }

    /// [`Self::read_pages`] of the pagecache, anon and mixed workloads. Its own function, so
    /// that their requests cost the same instructions (register saves included) as before
    /// the desktop workload existed: an instruction costs about a microsecond here.
    #[inline(never)]
    fn read_working_set(&self, rng: &mut u64, mut acc: u64) -> u64 {
        for _ in 0..PAGES_PER_REQUEST {
            let p = pick(rng, self.cache_pages + self.anon_pages);
            let w = page(p)[(*rng % WORDS as u64) as usize];
            acc = (acc ^ w ^ p).wrapping_mul(0x100_0000_01b3);
        }
        acc
    }

    #[inline(never)]
    fn read_desktop_pages(&self, rng: &mut u64, mut acc: u64, session: &Session) -> u64 {
        let sk = session.desktop_key;
        let mut file = FileRead::default();
        for _ in 0..PAGES_PER_REQUEST {
            let p = self.desk.next_page(rng, sk, &mut file);
            let w = page(p)[((*rng ^ p) % WORDS as u64) as usize];
            acc = (acc ^ w ^ p).wrapping_mul(0x100_0000_01b3);
        }
        acc
    }

    /// A READ request: like WORK without side effects; `arg` (from the VMM) and the session
    /// seed vary the pages.
    pub fn read(&self, arg: u32, session: &Session) -> u64 {
        if self.cache_pages + self.anon_pages == 0 {
            return 0;
        }
        // The desktop's session changes what it touches, not the order of its accesses
        // (desktop.rs); the other workloads draw a whole new stream per session.
        let salt = if self.is_desktop() { 0 } else { session.salt };
        let mut rng = mix(self.rng ^ u64::from(arg) ^ salt) | 1;
        self.read_pages(&mut rng, u64::from(arg), session) & 0xffff_ffff
    }

    fn modify(&mut self, p: u64) {
        let r = self.next();
        let w = &mut page(p)[(r % WORDS as u64) as usize];
        *w = w.wrapping_add(1 + (r >> 60));
        self.modified += 1;
    }

    /// One unit of work; returns a checksum of the pages it read. The session seed only
    /// matters to the desktop (which runs are in its working set).
    pub fn work(&mut self, session: &Session) -> u64 {
        if self.cache_pages + self.anon_pages == 0 {
            return 0;
        }
        let mut rng = self.rng;
        let acc = self.read_pages(&mut rng, self.requests, session);
        self.rng = rng;
        if self.next() % MODIFY_EVERY == 0 {
            let p = self.pick(session);
            self.modify(p);
        }
        if self.cache_pages > 0 && self.next() % WRITEBACK_EVERY == 0 {
            let c = self.next() % WRITEBACK_PAGES.min(self.cache_pages);
            let p = self.cache_heap(c);
            self.modify(p);
            io::disk_write(c * abi::PAGE_SIZE, page_addr(p), abi::PAGE_SIZE);
            self.written_back += 1;
        }
        self.requests += 1;
        acc & 0xffff_ffff
    }

    /// A DIRTY request: writes one word of each of the next `n` pages of a walk that
    /// visits every heap page below the APIC page once (heap page k * DIRTY_STRIDE mod
    /// usable: the stride is a prime larger than any heap, so coprime with its size), the
    /// word and the value varying with k. Returns the pages written in all.
    pub fn dirty(&mut self, n: u64) -> u64 {
        let usable = self.heap_pages.min(APIC_HEAP_PAGE);
        if usable == 0 {
            return self.dirtied;
        }
        for k in self.dirtied..self.dirtied + n {
            let p = k.wrapping_mul(DIRTY_STRIDE) % usable;
            let w = &mut page(p)[(k % WORDS as u64) as usize];
            *w ^= (k | 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        self.dirtied += n;
        self.dirtied
    }

    /// Checksum of everything this program's behaviour depends on: this state and every
    /// heap page (the untouched ones included, hashed by the VMM's hash device). Changes
    /// nothing.
    pub fn check(&self) -> u64 {
        let fields = [
            self.workload,
            self.rng,
            self.heap_pages,
            self.cache_pages,
            self.anon_pages,
            self.requests,
            self.modified,
            self.written_back,
        ];
        let mut h = hash_words(&fields, 0);
        if self.is_desktop() {
            h ^= hash_words(&self.desk.fields(), 1);
        }
        // Only once DIRTY requests ran, so every other CHECK is the one it always was.
        if self.dirtied != 0 {
            h ^= hash_words(&[self.dirtied], 2);
        }
        // To the end of RAM (the APIC page included: the device reads RAM, not the APIC).
        let heap = io::hash_memory(abi::HEAP_ADDR, page_addr(self.heap_pages) - abi::HEAP_ADDR);
        let h = mix(h ^ heap);
        // Never 0, and the high half is never 0 either, so the response always carries 64 bits.
        h | (1 << 63)
    }
}
