//! What every part of the read path shares: the page source, the kernel page
//! cache of `memory`, the daemon's own chunk cache, which pages the kernel
//! holds, the recorder, and the counters. Each piece has its own file; this one
//! only holds them together and installs prefetched pages.
//!
//! ```text
//!  FUSE read ──► readpath ──► PageReader (checkpoint) ◄── scheduler: loading set,
//!                   │                                       readahead, background
//!                   ▼                                              │
//!            recorder (first touches)        kernel page cache ◄──┘ notify-store
//! ```

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ckptfs::checkpoint::ReadError;
use ckptfs::{PAGE_SIZE, PageIndex, PageReader};

use crate::bitmap::AtomicBitmap;
use crate::cache::ChunkCache;
use crate::kernel::Kernel;
use crate::options::Policy;
use crate::record::Recorder;
use crate::stats::{self, LoadStatus, Stats};

const PAGE: u64 = PAGE_SIZE as u64;

/// Tunables of the read path.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes per prefetch chunk and daemon-cache entry (a multiple of 4096).
    pub chunk_bytes: usize,
    /// Daemon cache bound in bytes.
    pub cache_bytes: u64,
    /// Prefetch policy.
    pub policy: Policy,
    /// Push prefetched pages into the kernel page cache.
    pub notify_store: bool,
    /// Shown in stats.
    pub checkpoint_name: String,
}

/// Why pages were fetched ahead of demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Stream readahead.
    Readahead,
    /// The loading set.
    LoadingSet,
    /// Background sweep.
    Background,
}

/// The mount's shared state.
pub struct Shared {
    /// Where pages come from.
    pub source: Arc<dyn PageReader>,
    /// The kernel page cache of `memory`.
    pub kernel: Kernel,
    /// Prefetched chunks the kernel could not take (notify-store off).
    pub cache: ChunkCache,
    /// Pages the kernel has asked for or been given (page granular).
    pub resident: AtomicBitmap,
    /// First-touch recorder, when recording a loading set.
    pub recorder: Option<Recorder>,
    /// Counters.
    pub stats: Stats,
    /// Progress of the loading set.
    pub loadset: LoadStatus,
    /// Tunables.
    pub config: Config,
    /// When the mount started.
    pub started: Instant,
}

impl Shared {
    /// Shared state over `source`; `recorder` set when recording.
    pub fn new(source: Arc<dyn PageReader>, config: Config, recorder: Option<Recorder>) -> Self {
        assert!(config.chunk_bytes >= PAGE_SIZE && config.chunk_bytes.is_multiple_of(PAGE_SIZE));
        let pages = source.page_count();
        Shared {
            kernel: Kernel::new(config.notify_store && recorder.is_none()),
            cache: ChunkCache::new(config.cache_bytes, config.chunk_bytes),
            resident: AtomicBitmap::new(pages),
            recorder,
            stats: Stats::default(),
            loadset: LoadStatus::default(),
            started: Instant::now(),
            source,
            config,
        }
    }

    /// Guest memory size in bytes.
    pub fn guest_size(&self) -> u64 {
        self.source.guest_size()
    }

    /// Number of guest pages.
    pub fn page_count(&self) -> u64 {
        self.source.page_count()
    }

    /// Pages per chunk.
    pub fn chunk_pages(&self) -> u64 {
        self.config.chunk_bytes as u64 / PAGE
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.page_count().div_ceil(self.chunk_pages())
    }

    /// Pages of chunk `c`.
    pub fn chunk_pages_range(&self, c: u64) -> Range<u64> {
        let cp = self.chunk_pages();
        c * cp..((c + 1) * cp).min(self.page_count())
    }

    /// Whether prefetched pages can go to the kernel (else only to the daemon cache).
    pub fn stores_to_kernel(&self) -> bool {
        self.kernel.can_store()
    }

    /// Push pages `first..` (`data`, whole pages) into the kernel page cache,
    /// skipping pages it already holds; returns the bytes stored.
    pub fn store_pages(&self, first: u64, data: &[u8]) -> u64 {
        let end = first + (data.len() / PAGE_SIZE) as u64;
        let mut stored = 0;
        for run in self.resident.clear_runs(first, end) {
            let at = ((run.start - first) * PAGE) as usize;
            let len = ((run.end - run.start) * PAGE) as usize;
            if !self.kernel.store(run.start * PAGE, &data[at..at + len]) {
                break;
            }
            self.resident.set_range(run.start, run.end);
            stored += len as u64;
        }
        stats::add(&self.stats.stored_bytes, stored);
        stored
    }

    /// Rebuild chunk `c` and install it: the pages the kernel does not hold
    /// yet go into its page cache when possible; otherwise the whole chunk goes
    /// into the daemon cache.
    pub fn prefetch_chunk(&self, c: u64, why: Purpose) -> Result<(), ReadError> {
        let pages = self.chunk_pages_range(c);
        if self.stores_to_kernel() && self.kernel.holds_inode() {
            let mut buf = Vec::new();
            for run in self.resident.clear_runs(pages.start, pages.end) {
                buf.resize(((run.end - run.start) * PAGE) as usize, 0);
                self.fetch(run.start, &mut buf, why)?;
                self.store_pages(run.start, &buf);
            }
            return Ok(());
        }
        if self.resident.all_set(pages.start, pages.end) || self.cache.contains(c) {
            return Ok(());
        }
        let len = ((pages.end - pages.start) * PAGE) as usize;
        let mut buf = self.cache.take_buffer();
        match self.fetch(pages.start, &mut buf[..len], why) {
            Ok(()) => {
                self.cache.insert(c, buf, true);
                Ok(())
            }
            Err(e) => {
                self.cache.give_back(buf);
                Err(e)
            }
        }
    }

    /// Rebuild pages `first..` into `buf` for a prefetch, counting them.
    fn fetch(&self, first: u64, buf: &mut [u8], why: Purpose) -> Result<(), ReadError> {
        match self.source.read_pages(PageIndex(first), buf) {
            Ok(counts) => self.stats.add_counts(&counts),
            Err(e) => {
                stats::add(&self.stats.prefetch_errors, 1);
                return Err(e);
            }
        }
        let counter = match why {
            Purpose::Readahead => &self.stats.readahead_bytes,
            Purpose::LoadingSet => &self.stats.loadset_bytes,
            Purpose::Background => &self.stats.background_bytes,
        };
        stats::add(counter, buf.len() as u64);
        Ok(())
    }

    /// The stats document.
    pub fn snapshot(&self) -> stats::Snapshot {
        use stats::get;
        let s = &self.stats;
        let prefetched = get(&s.readahead_bytes) + get(&s.loadset_bytes) + get(&s.background_bytes);
        let rec = self.recorder.as_ref();
        stats::Snapshot {
            pid: std::process::id(),
            checkpoint: self.config.checkpoint_name.clone(),
            guest_bytes: self.guest_size(),
            chunk_bytes: self.config.chunk_bytes as u64,
            prefetch_policy: self.config.policy.name().into(),
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
                background_bytes: get(&s.background_bytes),
                stored_in_kernel_bytes: get(&s.stored_bytes),
                store_errors: get(&self.kernel.store_errors),
                used_by_demand_bytes: get(&s.prefetch_used_bytes),
                errors: get(&s.prefetch_errors),
            },
            latency_us: s.latency_snapshot(),
            pages: stats::PagesSnapshot {
                total: self.page_count(),
                resident: self.resident.count(),
            },
            background_complete: s
                .background_complete
                .load(std::sync::atomic::Ordering::Acquire),
            loading_set: self.loadset.snapshot(),
            recording: stats::RecordingSnapshot {
                active: rec.is_some(),
                window_seconds: rec.map_or(0.0, |r| r.window().as_secs_f64()),
                touched_pages: rec.map_or(0, |r| r.touched()),
            },
        }
    }
}
