//! The read path: demand reads are served chunk by chunk from the cache or by
//! rebuilding the chunk through a [`PageReader`]; every demand read also feeds
//! the stream detector and, when recording, the working-set recorder.
//!
//! Nothing here holds a lock across I/O: the cache lock covers only LRU
//! bookkeeping, and two threads missing the same chunk both rebuild it (rare,
//! and cheaper than making a demand read wait on someone else's I/O).

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ckptfs::checkpoint::ReadError;
use ckptfs::{PAGE_SIZE, PageIndex};
use log::{debug, error};

use crate::cache::{AtomicBitmap, Chunk, ChunkCache, lock};
use crate::prefetch::{Policy, PrefetchQueue, StreamTable};
use crate::stats::{self, Stats};
use crate::workingset::Run;
use ckptfs::PageReader;

const PAGE: u64 = PAGE_SIZE as u64;
/// Reads up to this size feed the stream detector (FUSE's default readahead).
const SMALL_READ: u64 = 128 * 1024;

/// Where prefetched chunks can be pushed so the kernel serves them without asking
/// (FUSE notify-store into the page cache of the `memory` inode).
pub trait KernelCache: Send + Sync {
    /// Store `data` at byte `offset` of `memory` in the kernel page cache.
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Drop `[offset, offset + len)` of `memory` from the kernel page cache.
    fn invalidate(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Tunables of the read path.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Bytes per cached chunk (a multiple of 4096).
    pub chunk_bytes: usize,
    /// Cache bound in bytes.
    pub cache_bytes: u64,
    /// Prefetch policy.
    pub policy: Policy,
    /// Push prefetched chunks into the kernel page cache.
    pub notify_store: bool,
    /// Record the demand working set.
    pub record: bool,
    /// Shown in stats.
    pub checkpoint_name: String,
}

/// Why a read of a chunk was being made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A FUSE read.
    Demand,
    /// Stream readahead.
    Readahead,
    /// Working-set replay.
    WorkingSet,
    /// Background sweep.
    Background,
}

/// Shared state of the daemon's read path.
pub struct Engine {
    reader: Arc<dyn PageReader>,
    cfg: EngineConfig,
    guest_size: u64,
    chunk_count: u64,
    cache: ChunkCache,
    /// Counters served by the stats file.
    pub stats: Stats,
    fetched: AtomicBitmap,
    /// Chunks being rebuilt right now (prefetchers skip them; demand never waits).
    busy: AtomicBitmap,
    stored: AtomicBitmap,
    demand_seen: AtomicBitmap,
    recorded: Mutex<Vec<u64>>,
    streams: Mutex<StreamTable>,
    /// Chunks asked for by readahead and working set, consumed by the prefetchers.
    pub queue: PrefetchQueue,
    demand_in_flight: AtomicU64,
    memory_lookups: AtomicU64,
    kernel: OnceLock<Box<dyn KernelCache>>,
    started: Instant,
    /// Set when the background sweep has visited every chunk.
    pub background_complete: AtomicBool,
    /// Chunks loaded from the working-set sidecar.
    pub workingset_loaded: AtomicU64,
}

impl Engine {
    /// A read path over `reader`.
    pub fn new(reader: Arc<dyn PageReader>, cfg: EngineConfig) -> Self {
        assert!(cfg.chunk_bytes >= PAGE_SIZE && cfg.chunk_bytes.is_multiple_of(PAGE_SIZE));
        let guest_size = reader.guest_size();
        let chunk_count = guest_size.div_ceil(cfg.chunk_bytes as u64);
        Engine {
            cache: ChunkCache::new(cfg.cache_bytes, cfg.chunk_bytes),
            fetched: AtomicBitmap::new(chunk_count),
            busy: AtomicBitmap::new(chunk_count),
            stored: AtomicBitmap::new(chunk_count),
            demand_seen: AtomicBitmap::new(chunk_count),
            recorded: Mutex::new(Vec::new()),
            streams: Mutex::new(StreamTable::default()),
            queue: PrefetchQueue::default(),
            demand_in_flight: AtomicU64::new(0),
            memory_lookups: AtomicU64::new(0),
            kernel: OnceLock::new(),
            started: Instant::now(),
            background_complete: AtomicBool::new(false),
            workingset_loaded: AtomicU64::new(0),
            stats: Stats::default(),
            reader,
            cfg,
            guest_size,
            chunk_count,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Guest memory size in bytes.
    pub fn guest_size(&self) -> u64 {
        self.guest_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    /// Pages per chunk.
    pub fn chunk_pages(&self) -> u64 {
        self.cfg.chunk_bytes as u64 / PAGE
    }

    /// The page source.
    pub fn reader(&self) -> &dyn PageReader {
        &*self.reader
    }

    /// Byte range of chunk `c` in guest memory.
    pub fn chunk_range(&self, c: u64) -> Range<u64> {
        let start = c * self.cfg.chunk_bytes as u64;
        start..(start + self.cfg.chunk_bytes as u64).min(self.guest_size)
    }

    /// Install the kernel page-cache sink (once the FUSE session exists).
    pub fn set_kernel_cache(&self, k: Box<dyn KernelCache>) {
        let _ = self.kernel.set(k);
    }

    /// The kernel knows the `memory` inode `n` more times (lookup).
    pub fn memory_looked_up(&self, n: u64) {
        self.memory_lookups.fetch_add(n, Ordering::AcqRel);
    }

    /// The kernel forgot `n` lookups of `memory`.
    pub fn memory_forgotten(&self, n: u64) {
        let _ = self
            .memory_lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Whether the kernel currently holds a lookup of `memory`.
    pub fn memory_known(&self) -> bool {
        self.memory_lookups.load(Ordering::Acquire) > 0
    }

    /// Demand reads currently being served.
    pub fn demand_in_flight(&self) -> u64 {
        self.demand_in_flight.load(Ordering::Acquire)
    }

    /// Serve a demand read of `len` bytes at `offset` into `out` (resized as needed,
    /// never shrunk, so a per-thread buffer stops allocating after the first reads).
    /// Returns the number of bytes, short only at the end of memory.
    pub fn read(&self, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<usize> {
        let t0 = Instant::now();
        self.demand_in_flight.fetch_add(1, Ordering::AcqRel);
        let res = self.read_inner(offset, len, out);
        self.demand_in_flight.fetch_sub(1, Ordering::AcqRel);
        stats::add(&self.stats.reads, 1);
        match &res {
            Ok(n) => stats::add(&self.stats.read_bytes, *n as u64),
            Err(_) => stats::add(&self.stats.read_errors, 1),
        }
        self.stats.latency.record(t0.elapsed());
        res
    }

    fn read_inner(&self, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<usize> {
        let end = offset.saturating_add(u64::from(len)).min(self.guest_size);
        if offset >= end {
            return Ok(0);
        }
        let n = (end - offset) as usize;
        if out.len() < n {
            out.resize(n, 0);
        }
        let cb = self.cfg.chunk_bytes as u64;
        for c in offset / cb..=(end - 1) / cb {
            let range = self.chunk_range(c);
            let (lo, hi) = (offset.max(range.start), end.min(range.end));
            let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
            self.note_demand(c);
            let src = (lo - range.start) as usize..(hi - range.start) as usize;
            match self.demand_chunk(c) {
                Ok(chunk) => dst.copy_from_slice(&chunk.data[src]),
                Err(e) => {
                    debug!("mountd: chunk {c} failed ({e}); retrying pages {lo:#x}..{hi:#x} alone");
                    self.read_pages_alone(lo, dst)?;
                }
            }
        }
        // Large reads mean the kernel is already reading ahead (the mount's bdi
        // readahead is 8 MiB): daemon readahead would only race it for the same
        // chunks (measured: slower). Small sequential reads (O_DIRECT, faults on
        // MADV_RANDOM mappings) get no kernel readahead, so the daemon does it.
        if self.cfg.policy.readahead() && end - offset <= SMALL_READ {
            self.note_stream(offset, end);
        }
        Ok(n)
    }

    /// The chunk from the cache, or rebuilt and cached.
    fn demand_chunk(&self, c: u64) -> Result<Arc<Chunk>, ReadError> {
        if let Some(chunk) = self.cache.get(c) {
            stats::add(&self.stats.cache_hits, 1);
            if chunk.prefetched.swap(false, Ordering::AcqRel) {
                let r = self.chunk_range(c);
                stats::add(&self.stats.prefetch_used_bytes, r.end - r.start);
            }
            return Ok(chunk);
        }
        stats::add(&self.stats.cache_misses, 1);
        self.fill_chunk(c, Purpose::Demand)
    }

    /// Rebuild the pages covering `[lo, lo + dst.len())` one page at a time, so one
    /// bad page fails only the reads that include it.
    fn read_pages_alone(&self, lo: u64, dst: &mut [u8]) -> io::Result<()> {
        let hi = lo + dst.len() as u64;
        let mut page = [0u8; PAGE_SIZE];
        for p in lo / PAGE..hi.div_ceil(PAGE) {
            match self.reader.read_pages(PageIndex(p), &mut page) {
                Ok(counts) => self.stats.add_counts(&counts),
                Err(e) => {
                    error!(
                        "mountd: read of {:#x}..{hi:#x} fails with EIO: {}",
                        lo,
                        chain(&e)
                    );
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            let (pstart, pend) = (p * PAGE, (p + 1) * PAGE);
            let (a, b) = (lo.max(pstart), hi.min(pend));
            dst[(a - lo) as usize..(b - lo) as usize]
                .copy_from_slice(&page[(a - pstart) as usize..(b - pstart) as usize]);
        }
        Ok(())
    }

    /// Rebuild chunk `c` into a pooled buffer and cache it.
    pub fn fill_chunk(&self, c: u64, why: Purpose) -> Result<Arc<Chunk>, ReadError> {
        let range = self.chunk_range(c);
        let len = (range.end - range.start) as usize;
        let mut buf = self.cache.take_buffer();
        self.busy.test_and_set(c);
        let res = self
            .reader
            .read_pages(PageIndex(range.start / PAGE), &mut buf[..len]);
        self.busy.test_and_clear(c);
        match res {
            Ok(counts) => self.stats.add_counts(&counts),
            Err(e) => {
                self.cache.give_back(buf);
                return Err(e);
            }
        }
        self.fetched.test_and_set(c);
        let prefetched = why != Purpose::Demand;
        if prefetched {
            let counter = match why {
                Purpose::Readahead => &self.stats.readahead_bytes,
                Purpose::WorkingSet => &self.stats.workingset_bytes,
                _ => &self.stats.background_bytes,
            };
            stats::add(counter, len as u64);
            self.push_to_kernel(c, &buf[..len]);
        }
        Ok(self.cache.insert(c, buf, prefetched))
    }

    /// Notify-store a prefetched chunk, if enabled and the kernel knows the inode
    /// (FUSE_NOTIFY_STORE fails with ENOENT for an inode not in the inode cache).
    fn push_to_kernel(&self, c: u64, data: &[u8]) {
        if !self.cfg.notify_store
            || self.cfg.record
            || self.memory_lookups.load(Ordering::Acquire) == 0
        {
            return;
        }
        let Some(k) = self.kernel.get() else { return };
        match k.store(self.chunk_range(c).start, data) {
            Ok(()) => {
                self.stored.test_and_set(c);
                stats::add(&self.stats.stored_bytes, data.len() as u64);
            }
            Err(e) => debug!("mountd: notify-store of chunk {c} failed: {e}"),
        }
    }

    /// A refused write may have left modified pages in the kernel page cache (a
    /// writable MAP_SHARED mapping is written back through FUSE_WRITE, and the
    /// kernel keeps the folio's new bytes when writeback fails): drop them so
    /// readers see the checkpoint's bytes again. Runs on its own thread, after
    /// the EROFS reply: invalidating from the FUSE thread would wait for the very
    /// writeback that waits for that reply.
    pub fn invalidate_after_refused_write(self: &Arc<Self>, offset: u64, len: u64) {
        let engine = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ckptfs-inval".into())
            .spawn(move || {
                if let Some(k) = engine.kernel.get() {
                    let start = offset / PAGE * PAGE;
                    let end = (offset + len).div_ceil(PAGE) * PAGE;
                    if let Err(e) = k.invalidate(start, end - start) {
                        debug!("mountd: invalidating {start:#x}..{end:#x} failed: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            error!("mountd: cannot start invalidation thread: {e}");
        }
    }

    /// Whether chunk `c` needs no prefetching (cached, pushed to the kernel, or
    /// being rebuilt by someone else right now).
    pub fn chunk_is_present(&self, c: u64) -> bool {
        self.stored.get(c) || self.busy.get(c) || self.cache.contains(c)
    }

    /// Whether chunk `c` was ever rebuilt.
    pub fn chunk_was_fetched(&self, c: u64) -> bool {
        self.fetched.get(c)
    }

    /// Whether prefetched chunks reach the kernel page cache (else they only fill
    /// the daemon cache, which bounds how much the background sweep may fetch).
    pub fn stores_to_kernel(&self) -> bool {
        self.cfg.notify_store && !self.cfg.record && self.kernel.get().is_some()
    }

    /// Capacity of the daemon cache in chunks.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn note_demand(&self, c: u64) {
        if self.cfg.record && !self.demand_seen.test_and_set(c) {
            lock(&self.recorded).push(c);
        }
    }

    fn note_stream(&self, start: u64, end: u64) {
        let cb = self.cfg.chunk_bytes as u64;
        let ahead = lock(&self.streams).observe(start, end, cb);
        if let Some(range) = ahead {
            let first = range.start / cb;
            let last = (range.end.min(self.guest_size).saturating_sub(1)) / cb;
            let want: Vec<u64> = (first..=last)
                .filter(|&c| c < self.chunk_count && !self.chunk_is_present(c))
                .collect();
            self.queue.push_readahead(&want);
        }
    }

    /// The recorded working set as page runs, in first-touch order.
    pub fn recorded_runs(&self) -> Vec<Run> {
        lock(&self.recorded)
            .iter()
            .map(|&c| {
                let r = self.chunk_range(c);
                Run {
                    first_page: r.start / PAGE,
                    pages: ((r.end - r.start) / PAGE) as u32,
                }
            })
            .collect()
    }

    /// The stats document.
    pub fn snapshot(&self) -> stats::Snapshot {
        use stats::get;
        let s = &self.stats;
        let cp = self.chunk_pages();
        let prefetched =
            get(&s.readahead_bytes) + get(&s.workingset_bytes) + get(&s.background_bytes);
        stats::Snapshot {
            pid: std::process::id(),
            checkpoint: self.cfg.checkpoint_name.clone(),
            guest_bytes: self.guest_size,
            chunk_bytes: self.cfg.chunk_bytes as u64,
            prefetch_policy: self.cfg.policy.name().into(),
            notify_store: self.stores_to_kernel(),
            elapsed_seconds: self.started.elapsed().as_secs_f64(),
            reads: get(&s.reads),
            read_bytes: get(&s.read_bytes),
            read_errors: get(&s.read_errors),
            bytes_by_source: stats::BySource {
                zero: get(&s.zero_bytes),
                disk: get(&s.disk_bytes),
                blob: get(&s.blob_bytes),
            },
            disk_reads: get(&s.disk_reads),
            cache: stats::CacheSnapshot {
                hits: get(&s.cache_hits),
                misses: get(&s.cache_misses),
                resident_chunks: self.cache.len() as u64,
                capacity_chunks: self.cache.capacity() as u64,
            },
            prefetch: stats::PrefetchSnapshot {
                prefetched_bytes: prefetched,
                readahead_bytes: get(&s.readahead_bytes),
                workingset_bytes: get(&s.workingset_bytes),
                background_bytes: get(&s.background_bytes),
                stored_in_kernel_bytes: get(&s.stored_bytes),
                used_by_demand_bytes: get(&s.prefetch_used_bytes),
                errors: get(&s.prefetch_errors),
            },
            latency_us: s.latency_snapshot(),
            pages: stats::PagesSnapshot {
                total: self.guest_size / PAGE,
                fetched: (self.fetched.count() * cp).min(self.guest_size / PAGE),
                resident: (self.cache.len() as u64 * cp).min(self.guest_size / PAGE),
            },
            background_complete: self.background_complete.load(Ordering::Acquire),
            workingset: stats::WorkingSetSnapshot {
                loaded_chunks: self.workingset_loaded.load(Ordering::Relaxed),
                recording: self.cfg.record,
                recorded_chunks: lock(&self.recorded).len() as u64,
            },
        }
    }
}

/// An error and its sources on one line ("a: b: c").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::Rng;
    use ckptfs::MemReader;

    const CHUNK: usize = 64 * 1024;

    fn engine_over(reader: MemReader, cache_bytes: u64, policy: Policy, record: bool) -> Engine {
        let cfg = EngineConfig {
            chunk_bytes: CHUNK,
            cache_bytes,
            policy,
            notify_store: false,
            record,
            checkpoint_name: "test".into(),
        };
        Engine::new(Arc::new(reader), cfg)
    }

    fn random_mem(pages: usize) -> Vec<u8> {
        let mut v = vec![0u8; pages * PAGE_SIZE];
        Rng::new(7).fill(&mut v);
        v
    }

    #[test]
    fn reads_at_any_offset_return_the_original_bytes() {
        let mem = random_mem(100); // not a whole number of chunks
        let e = engine_over(MemReader::new(mem.clone()), 1 << 20, Policy::None, false);
        let mut out = Vec::new();
        for (off, len) in [
            (0u64, 4096u32),
            (5, 100_000),
            (65_530, 20),
            (397_312, 8192),
            (409_000, 4096),
        ] {
            let n = e.read(off, len, &mut out).unwrap();
            let end = (off as usize + len as usize).min(mem.len());
            assert_eq!(n, end - off as usize);
            assert_eq!(&out[..n], &mem[off as usize..end], "offset {off}");
        }
        assert_eq!(e.read(mem.len() as u64, 10, &mut out).unwrap(), 0);
    }

    #[test]
    fn second_read_of_a_chunk_hits_the_cache() {
        let e = engine_over(MemReader::new(random_mem(32)), 1 << 20, Policy::None, false);
        let mut out = Vec::new();
        e.read(0, 4096, &mut out).unwrap();
        e.read(8192, 4096, &mut out).unwrap();
        assert_eq!(stats::get(&e.stats.cache_misses), 1);
        assert_eq!(stats::get(&e.stats.cache_hits), 1);
    }

    #[test]
    fn bad_page_fails_only_reads_that_include_it() {
        let mem = random_mem(32);
        let mut reader = MemReader::new(mem.clone());
        reader.bad_pages.insert(3);
        let e = engine_over(reader, 1 << 20, Policy::None, false);
        let mut out = Vec::new();
        let err = e.read(3 * 4096, 4096, &mut out).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(e.read(0, 16384, &mut out).is_err());
        for p in [0u64, 2, 4, 15, 16, 31] {
            e.read(p * 4096, 4096, &mut out).unwrap();
            assert_eq!(&out[..4096], &mem[p as usize * 4096..][..4096], "page {p}");
        }
        assert_eq!(stats::get(&e.stats.read_errors), 2);
    }

    #[test]
    fn cache_stays_within_its_bound() {
        let e = engine_over(
            MemReader::new(random_mem(256)),
            2 * CHUNK as u64,
            Policy::None,
            false,
        );
        let mut out = Vec::new();
        for p in 0..256u64 {
            e.read(p * 4096, 4096, &mut out).unwrap();
        }
        assert_eq!(e.snapshot().cache.resident_chunks, 2);
    }

    #[test]
    fn records_first_demand_touch_order() {
        let e = engine_over(MemReader::new(random_mem(64)), 1 << 20, Policy::None, true);
        let mut out = Vec::new();
        for off in [CHUNK as u64 * 2, 0, CHUNK as u64 * 2 + 4096, CHUNK as u64] {
            e.read(off, 4096, &mut out).unwrap();
        }
        let firsts: Vec<u64> = e.recorded_runs().iter().map(|r| r.first_page).collect();
        assert_eq!(firsts, vec![32, 0, 16]);
    }

    #[test]
    fn sequential_reads_queue_readahead() {
        let e = engine_over(
            MemReader::new(random_mem(256)),
            1 << 22,
            Policy::Readahead,
            false,
        );
        let mut out = Vec::new();
        e.read(0, CHUNK as u32, &mut out).unwrap();
        assert_eq!(e.queue.pop_readahead(), None, "one read is not a stream");
        e.read(CHUNK as u64, CHUNK as u32, &mut out).unwrap();
        assert_eq!(
            e.queue.pop_readahead(),
            Some(2),
            "readahead starts right after the stream"
        );
    }

    #[test]
    fn prefetched_chunk_counts_as_used_once() {
        let e = engine_over(MemReader::new(random_mem(32)), 1 << 20, Policy::All, false);
        e.fill_chunk(1, Purpose::Background).unwrap();
        let mut out = Vec::new();
        e.read(CHUNK as u64, 4096, &mut out).unwrap();
        e.read(CHUNK as u64 + 4096, 4096, &mut out).unwrap();
        let snap = e.snapshot();
        assert_eq!(snap.prefetch.background_bytes, CHUNK as u64);
        assert_eq!(snap.prefetch.used_by_demand_bytes, CHUNK as u64);
        assert_eq!(snap.cache.misses, 0);
    }
}
