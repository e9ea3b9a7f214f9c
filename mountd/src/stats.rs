//! Counters behind the `stats` file: lock-free atomics updated on the read path
//! and a log-linear latency histogram (8 sub-buckets per power of two, so a
//! percentile is within 12.5 % of the true value).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use ckptfs::ReadCounts;
use serde::Serialize;

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 nanosecond value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A concurrent histogram of durations in nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn bucket_of(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros();
        let shift = msb - SUB_BITS;
        let mantissa = (ns >> shift) & (SUB - 1);
        ((shift as u64 + 1) * SUB + mantissa) as usize
    }

    /// Upper bound (inclusive) of bucket `b`, in nanoseconds.
    fn bucket_high(b: usize) -> u64 {
        let b = b as u64;
        if b < SUB {
            return b;
        }
        let shift = b / SUB - 1;
        let mantissa = b % SUB;
        ((SUB + mantissa + 1) << shift).saturating_sub(1)
    }

    /// Record one duration.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The `q`-quantile (0..=1) in nanoseconds, 0 if empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bucket_high(b).min(self.max_ns());
            }
        }
        self.max_ns()
    }

    /// Largest duration recorded, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns.load(Ordering::Relaxed)
    }
}

/// Every counter the daemon keeps.
#[derive(Debug, Default)]
pub struct Stats {
    /// FUSE read requests on `memory`.
    pub reads: AtomicU64,
    /// Bytes returned by those reads.
    pub read_bytes: AtomicU64,
    /// Reads answered with EIO.
    pub read_errors: AtomicU64,
    /// Rebuilt bytes of zero pages (demand and prefetch).
    pub zero_bytes: AtomicU64,
    /// Rebuilt bytes read from disk images.
    pub disk_bytes: AtomicU64,
    /// Rebuilt bytes copied from the blob section.
    pub blob_bytes: AtomicU64,
    /// pread calls on disk images.
    pub disk_reads: AtomicU64,
    /// Demand reads served (partly) from the daemon cache.
    pub cache_hits: AtomicU64,
    /// Demand reads rebuilt from the page source.
    pub cache_misses: AtomicU64,
    /// Bytes rebuilt by stream readahead.
    pub readahead_bytes: AtomicU64,
    /// Bytes fetched for the loading set (the set's own bytes are counted in
    /// [`LoadStatus`]; this counts only fallbacks read from the checkpoint).
    pub loadset_bytes: AtomicU64,
    /// Bytes rebuilt by the background sweep.
    pub background_bytes: AtomicU64,
    /// Prefetched bytes pushed into the kernel page cache (notify-store).
    pub stored_bytes: AtomicU64,
    /// Set when the background sweep has visited every page.
    pub background_complete: AtomicBool,
    /// Prefetched chunk bytes later hit by a demand read in the daemon cache.
    pub prefetch_used_bytes: AtomicU64,
    /// Chunks the prefetcher failed to rebuild.
    pub prefetch_errors: AtomicU64,
    /// Demand read latency.
    pub latency: Histogram,
}

impl Stats {
    /// Add one rebuild's per-source byte counts.
    pub fn add_counts(&self, c: &ReadCounts) {
        self.zero_bytes.fetch_add(c.zero_bytes, Ordering::Relaxed);
        self.disk_bytes.fetch_add(c.disk_bytes, Ordering::Relaxed);
        self.blob_bytes.fetch_add(c.blob_bytes, Ordering::Relaxed);
        self.disk_reads.fetch_add(c.disk_reads, Ordering::Relaxed);
    }
}

/// Shorthand for a relaxed load.
pub(crate) fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Shorthand for a relaxed add.
pub(crate) fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}

/// The JSON document served by the `stats` file.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct Snapshot {
    pub pid: u32,
    pub checkpoint: String,
    pub guest_bytes: u64,
    pub chunk_bytes: u64,
    pub prefetch_policy: String,
    pub notify_store: bool,
    pub elapsed_seconds: f64,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_errors: u64,
    pub bytes_by_source: BySource,
    pub disk_reads: u64,
    pub cache: CacheSnapshot,
    pub prefetch: PrefetchSnapshot,
    pub latency_us: LatencySnapshot,
    pub pages: PagesSnapshot,
    pub background_complete: bool,
    pub loading_set: LoadSnapshot,
    pub recording: RecordingSnapshot,
}

/// Rebuilt bytes by page source.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct BySource {
    pub zero: u64,
    pub disk: u64,
    pub blob: u64,
}

/// Daemon cache counters.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct CacheSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub resident_chunks: u64,
    pub capacity_chunks: u64,
}

/// Prefetcher counters.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct PrefetchSnapshot {
    pub prefetched_bytes: u64,
    pub readahead_bytes: u64,
    pub background_bytes: u64,
    pub stored_in_kernel_bytes: u64,
    pub store_errors: u64,
    pub used_by_demand_bytes: u64,
    pub errors: u64,
}

/// Demand read latency percentiles, microseconds.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct LatencySnapshot {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Page counts: `resident` = pages the kernel asked for or was given.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct PagesSnapshot {
    pub total: u64,
    pub resident: u64,
}

/// Loading-set recording.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct RecordingSnapshot {
    pub active: bool,
    pub window_seconds: f64,
    pub touched_pages: u64,
}

/// Where the loading set stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    /// No loading set file (or loading sets are off).
    Absent = 0,
    /// Being pushed into the page cache.
    Loading = 1,
    /// Every page pushed.
    Done = 2,
    /// Refused (foreign, damaged, stale): the mount goes on without it.
    Refused = 3,
}

/// Progress of the loading set, updated by the loader.
#[derive(Debug, Default)]
pub struct LoadStatus {
    state: AtomicU8,
    /// Pages listed (stored and zero).
    pub pages: AtomicU64,
    /// Bytes of stored pages in the file.
    pub data_bytes: AtomicU64,
    /// Bytes pushed into the page cache (stored pages and zero pages).
    pub pushed_bytes: AtomicU64,
    /// Bytes read from the loading-set file.
    pub read_bytes: AtomicU64,
    /// Microseconds from mount to the start of loading.
    pub started_us: AtomicU64,
    /// Microseconds from mount to the end of loading.
    pub finished_us: AtomicU64,
    /// The file and, if refused, why.
    pub text: Mutex<(String, String)>,
}

impl LoadStatus {
    /// Current state.
    pub fn state(&self) -> LoadState {
        match self.state.load(Ordering::Acquire) {
            1 => LoadState::Loading,
            2 => LoadState::Done,
            3 => LoadState::Refused,
            _ => LoadState::Absent,
        }
    }

    /// Move to `s`.
    pub fn set_state(&self, s: LoadState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Whether loading is over (done, refused or absent).
    pub fn settled(&self) -> bool {
        self.state() != LoadState::Loading
    }

    /// The JSON view.
    pub fn snapshot(&self) -> LoadSnapshot {
        let text = self.text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let s = |us: u64| us as f64 / 1e6;
        let (start, end) = (get(&self.started_us), get(&self.finished_us));
        LoadSnapshot {
            state: self.state(),
            path: text.0,
            warning: text.1,
            pages: get(&self.pages),
            data_bytes: get(&self.data_bytes),
            read_bytes: get(&self.read_bytes),
            pushed_bytes: get(&self.pushed_bytes),
            started_at_seconds: s(start),
            finished_at_seconds: (end > 0).then(|| s(end)),
            seconds: (end > 0).then(|| s(end.saturating_sub(start))),
        }
    }
}

/// Loading-set progress as served in `stats`.
#[derive(Debug, Serialize)]
#[allow(missing_docs)]
pub struct LoadSnapshot {
    pub state: LoadState,
    pub path: String,
    pub warning: String,
    pub pages: u64,
    pub data_bytes: u64,
    pub read_bytes: u64,
    pub pushed_bytes: u64,
    pub started_at_seconds: f64,
    pub finished_at_seconds: Option<f64>,
    pub seconds: Option<f64>,
}

impl Stats {
    /// Latency percentiles in microseconds.
    pub fn latency_snapshot(&self) -> LatencySnapshot {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySnapshot {
            p50: us(self.latency.quantile_ns(0.50)),
            p90: us(self.latency.quantile_ns(0.90)),
            p99: us(self.latency.quantile_ns(0.99)),
            max: us(self.latency.max_ns()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_contain_their_values() {
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1000,
            12_345,
            1 << 40,
            u64::MAX / 3,
        ] {
            let b = Histogram::bucket_of(ns);
            assert!(Histogram::bucket_high(b) >= ns, "{ns} above bucket {b}");
            if b > 0 {
                assert!(Histogram::bucket_high(b - 1) < ns, "{ns} below bucket {b}");
            }
        }
    }

    #[test]
    fn percentiles_are_within_an_eighth() {
        let h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_ns(0.5) as f64;
        assert!((50_000.0..=50_000.0 * 1.125).contains(&p50), "p50 {p50}");
        assert_eq!(h.quantile_ns(1.0), 100_000);
        assert_eq!(h.max_ns(), 100_000);
    }
}
