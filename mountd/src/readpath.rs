//! The demand read path: a FUSE read of `memory` is served with exactly the
//! pages it asks for, rebuilt through the page source (or copied from the
//! daemon cache, which only holds prefetched chunks the kernel could not take).
//! No lock is held across I/O and a demand read never waits for a prefetch.
//!
//! How many pages a fault asks for is the kernel's read-around, i.e. the
//! mount's `read_ahead_kb` (set by the daemon; see `--readahead-kb`).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ckptfs::{PAGE_SIZE, PageIndex};
use log::{debug, error};

use crate::cache::lock;
use crate::scheduler::Scheduler;
use crate::shared::Shared;
use crate::stats;
use crate::stream::StreamTable;

const PAGE: u64 = PAGE_SIZE as u64;
/// Reads up to this size feed the stream detector (larger ones mean the
/// kernel is already reading ahead).
const SMALL_READ: u64 = 128 * 1024;

/// Serves demand reads.
pub struct ReadPath {
    shared: Arc<Shared>,
    sched: Arc<Scheduler>,
    streams: Mutex<StreamTable>,
}

impl ReadPath {
    /// A read path over `shared`, reporting demand to `sched`.
    pub fn new(shared: Arc<Shared>, sched: Arc<Scheduler>) -> Self {
        ReadPath {
            shared,
            sched,
            streams: Mutex::new(StreamTable::default()),
        }
    }

    /// Serve a read of `len` bytes at `offset` into `out` (grown as needed,
    /// never shrunk, so a per-thread buffer stops allocating). Returns the
    /// number of bytes, short only at the end of memory.
    pub fn read(&self, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<usize> {
        let t0 = Instant::now();
        let res = {
            let _demand = self.sched.demand();
            self.read_inner(offset, len, out)
        };
        let s = &self.shared.stats;
        stats::add(&s.reads, 1);
        match &res {
            Ok(n) => stats::add(&s.read_bytes, *n as u64),
            Err(_) => stats::add(&s.read_errors, 1),
        }
        s.latency.record(t0.elapsed());
        res
    }

    fn read_inner(&self, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<usize> {
        let end = offset
            .saturating_add(u64::from(len))
            .min(self.shared.guest_size());
        if offset >= end {
            return Ok(0);
        }
        let (first, last) = (offset / PAGE, end.div_ceil(PAGE));
        let span = ((last - first) * PAGE) as usize;
        if out.len() < span {
            out.resize(span, 0);
        }
        if let Some(rec) = &self.shared.recorder {
            rec.note(&*self.shared.source, first, last);
        }
        self.fill(first, &mut out[..span])?;
        self.shared.resident.set_range(first, last);
        let skip = (offset - first * PAGE) as usize;
        if skip > 0 {
            out.copy_within(skip..span, 0);
        }
        if self.shared.config.policy.readahead() && end - offset <= SMALL_READ {
            self.note_stream(offset, end);
        }
        Ok((end - offset) as usize)
    }

    /// Rebuild pages `first..` into `buf`: from the daemon cache where a chunk
    /// is cached, else from the source, coalescing the uncached pages.
    fn fill(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let last = first + (buf.len() / PAGE_SIZE) as u64;
        if self.shared.cache.is_empty() {
            return self.rebuild(first, buf);
        }
        let cp = self.shared.chunk_pages();
        let mut pending: Option<(u64, u64)> = None;
        for c in first / cp..=(last - 1) / cp {
            let r = self.shared.chunk_pages_range(c);
            let (lo, hi) = (r.start.max(first), r.end.min(last));
            let Some(chunk) = self.shared.cache.get(c) else {
                pending = Some(pending.map_or((lo, hi), |(a, _)| (a, hi)));
                continue;
            };
            if let Some((a, b)) = pending.take() {
                self.rebuild(a, page_slice(buf, first, a, b))?;
            }
            stats::add(&self.shared.stats.cache_hits, 1);
            if chunk.prefetched.swap(false, Ordering::AcqRel) {
                stats::add(
                    &self.shared.stats.prefetch_used_bytes,
                    chunk.data.len() as u64,
                );
            }
            let src = ((lo - r.start) * PAGE) as usize..((hi - r.start) * PAGE) as usize;
            page_slice(buf, first, lo, hi).copy_from_slice(&chunk.data[src]);
        }
        if let Some((a, b)) = pending {
            self.rebuild(a, page_slice(buf, first, a, b))?;
        }
        Ok(())
    }

    /// Rebuild pages `first..` from the source; if that fails, page by page,
    /// so the error names the bad page (and is EIO).
    fn rebuild(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        stats::add(&self.shared.stats.cache_misses, 1);
        let src = &self.shared.source;
        match src.read_pages(PageIndex(first), buf) {
            Ok(counts) => {
                self.shared.stats.add_counts(&counts);
                return Ok(());
            }
            Err(e) => debug!("mountd: pages from {first} failed ({e}); retrying one by one"),
        }
        for (k, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let p = first + k as u64;
            match src.read_pages(PageIndex(p), page) {
                Ok(counts) => self.shared.stats.add_counts(&counts),
                Err(e) => {
                    error!(
                        "mountd: read of page {p} fails with EIO: {}",
                        crate::chain(&e)
                    );
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
        }
        Ok(())
    }

    fn note_stream(&self, start: u64, end: u64) {
        let cb = self.shared.config.chunk_bytes as u64;
        let Some(range) = lock(&self.streams).observe(start, end, cb) else {
            return;
        };
        let size = self.shared.guest_size();
        let (first, last) = (range.start / cb, range.end.min(size).saturating_sub(1) / cb);
        let want: Vec<u64> = (first..=last)
            .filter(|&c| {
                let r = self.shared.chunk_pages_range(c);
                c < self.shared.chunk_count()
                    && !self.shared.resident.all_set(r.start, r.end)
                    && !self.shared.cache.contains(c)
            })
            .collect();
        self.sched.push_readahead(&want);
    }
}

/// The bytes of pages `[a, b)` inside `buf`, which holds pages from `first`.
fn page_slice(buf: &mut [u8], first: u64, a: u64, b: u64) -> &mut [u8] {
    &mut buf[((a - first) * PAGE) as usize..((b - first) * PAGE) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::Rng;
    use crate::options::Policy;
    use crate::record::Recorder;
    use crate::shared::{Config, Purpose};
    use ckptfs::MemReader;
    use std::time::Duration;

    const CHUNK: usize = 64 * 1024;

    fn path_over(reader: MemReader, policy: Policy, record: bool) -> ReadPath {
        let cfg = Config {
            chunk_bytes: CHUNK,
            cache_bytes: 1 << 20,
            policy,
            notify_store: false,
            checkpoint_name: "test".into(),
        };
        let pages = reader.data.len() as u64 / PAGE;
        let rec = record.then(|| Recorder::new(pages, Duration::from_secs(60)));
        let shared = Arc::new(Shared::new(Arc::new(reader), cfg, rec));
        ReadPath::new(shared, Arc::new(Scheduler::default()))
    }

    fn random_mem(pages: usize) -> Vec<u8> {
        let mut v = vec![0u8; pages * PAGE_SIZE];
        Rng::new(7).fill(&mut v);
        v
    }

    #[test]
    fn reads_at_any_offset_return_the_original_bytes() {
        let mem = random_mem(100); // not a whole number of chunks
        let rp = path_over(MemReader::new(mem.clone()), Policy::None, false);
        let mut out = Vec::new();
        for (off, len) in [
            (0u64, 4096u32),
            (5, 100_000),
            (65_530, 20),
            (397_312, 8192),
            (409_000, 4096),
        ] {
            let n = rp.read(off, len, &mut out).unwrap();
            let end = (off as usize + len as usize).min(mem.len());
            assert_eq!(n, end - off as usize);
            assert_eq!(&out[..n], &mem[off as usize..end], "offset {off}");
        }
        assert_eq!(rp.read(mem.len() as u64, 10, &mut out).unwrap(), 0);
    }

    #[test]
    fn a_demand_read_rebuilds_only_the_pages_it_asks_for() {
        let rp = path_over(MemReader::new(random_mem(64)), Policy::None, false);
        let mut out = Vec::new();
        rp.read(5 * 4096, 4096, &mut out).unwrap();
        let snap = rp.shared.snapshot();
        assert_eq!(snap.bytes_by_source.blob, 4096, "one page, not a chunk");
        assert_eq!(snap.pages.resident, 1);
    }

    #[test]
    fn bad_page_fails_only_reads_that_include_it() {
        let mem = random_mem(32);
        let mut reader = MemReader::new(mem.clone());
        reader.bad_pages.insert(3);
        let rp = path_over(reader, Policy::None, false);
        let mut out = Vec::new();
        let err = rp.read(3 * 4096, 4096, &mut out).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(rp.read(0, 16384, &mut out).is_err());
        for p in [0u64, 2, 4, 15, 16, 31] {
            rp.read(p * 4096, 4096, &mut out).unwrap();
            assert_eq!(&out[..4096], &mem[p as usize * 4096..][..4096], "page {p}");
        }
        assert_eq!(stats::get(&rp.shared.stats.read_errors), 2);
    }

    #[test]
    fn records_first_touches_page_by_page() {
        let rp = path_over(MemReader::new(random_mem(64)), Policy::None, true);
        let mut out = Vec::new();
        for off in [CHUNK as u64 * 2, 0, CHUNK as u64 * 2 + 4096, CHUNK as u64] {
            rp.read(off, 4096, &mut out).unwrap();
        }
        let rec = rp.shared.recorder.as_ref().unwrap();
        let runs: Vec<(u64, u32)> = rec.runs().iter().map(|r| (r.first_page, r.pages)).collect();
        assert_eq!(runs, vec![(32, 1), (0, 1), (33, 1), (16, 1)]);
    }

    #[test]
    fn sequential_small_reads_queue_readahead() {
        let rp = path_over(MemReader::new(random_mem(256)), Policy::Readahead, false);
        let mut out = Vec::new();
        rp.read(0, CHUNK as u32, &mut out).unwrap();
        assert_eq!(rp.sched.pop_readahead(), None, "one read is not a stream");
        rp.read(CHUNK as u64, CHUNK as u32, &mut out).unwrap();
        assert_eq!(
            rp.sched.pop_readahead(),
            Some(2),
            "readahead starts after the stream"
        );
    }

    #[test]
    fn prefetched_chunk_in_the_daemon_cache_serves_demand_once_counted() {
        let mem = random_mem(32);
        let rp = path_over(MemReader::new(mem.clone()), Policy::All, false);
        rp.shared.prefetch_chunk(1, Purpose::Background).unwrap();
        let mut out = Vec::new();
        rp.read(CHUNK as u64 - 4096, 8192, &mut out).unwrap(); // straddles chunks 0 and 1
        assert_eq!(&out[..8192], &mem[CHUNK - 4096..CHUNK + 4096]);
        rp.read(CHUNK as u64 + 4096, 4096, &mut out).unwrap();
        let snap = rp.shared.snapshot();
        assert_eq!(snap.prefetch.background_bytes, CHUNK as u64);
        assert_eq!(snap.prefetch.used_by_demand_bytes, CHUNK as u64);
        assert_eq!(snap.cache.hits, 2);
        assert_eq!(snap.cache.misses, 1, "only page 15 came from the source");
    }
}
