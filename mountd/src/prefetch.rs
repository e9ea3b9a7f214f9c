//! Prefetching: stream readahead, working-set replay and the background sweep.
//!
//! Two low-priority threads (nice 19, idle I/O class):
//! - the readahead worker rebuilds chunks ahead of detected sequential streams;
//! - the background worker replays the recorded working set, then (policy `all`)
//!   rebuilds every remaining chunk in disk-offset order so disk reads stay
//!   sequential, pausing while demand reads are in flight (demand always first:
//!   the complaint Nydus users have about prefetch stealing bandwidth).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ckptfs::{DiskIndex, DiskOffset, PageIndex};
use log::{debug, info, warn};

use crate::cache::lock;
use crate::engine::{Engine, Purpose, chain};
use crate::stats;

/// Which prefetching runs; each policy includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Demand reads only.
    None,
    /// Plus readahead of sequential streams.
    Readahead,
    /// Plus replay of the recorded working set.
    Workingset,
    /// Plus background fetch of every page.
    All,
}

impl Policy {
    /// Stream readahead is on.
    pub fn readahead(self) -> bool {
        self != Policy::None
    }

    /// Working-set replay is on.
    pub fn workingset(self) -> bool {
        matches!(self, Policy::Workingset | Policy::All)
    }

    /// The background sweep is on.
    pub fn background(self) -> bool {
        self == Policy::All
    }

    /// The CLI spelling.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Readahead => "readahead",
            Policy::Workingset => "workingset",
            Policy::All => "all",
        }
    }
}

/// Streams tracked at once.
const STREAMS: usize = 8;
/// Readahead never runs further than this past a stream.
const MAX_WINDOW: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    next: u64,
    hits: u32,
    queued_until: u64,
    last_use: u64,
}

/// Recently seen sequential streams (several readers, or a VMM faulting a few
/// regions at once, interleave their requests).
#[derive(Debug, Default)]
pub struct StreamTable {
    streams: [Stream; STREAMS],
    clock: u64,
}

impl StreamTable {
    /// Note a demand read of `[start, end)`; returns a byte range to read ahead
    /// once a stream has been seen at least twice. Requests a few chunks out of
    /// order (the kernel sends async readahead from several threads) still count.
    pub fn observe(&mut self, start: u64, end: u64, chunk: u64) -> Option<Range<u64>> {
        self.clock += 1;
        let slack = 4 * chunk;
        let hit = self
            .streams
            .iter_mut()
            .find(|s| s.hits > 0 && start + slack >= s.next && start <= s.next + slack);
        let Some(s) = hit else {
            let victim = self.streams.iter_mut().min_by_key(|s| s.last_use)?;
            *victim = Stream {
                next: end,
                hits: 1,
                queued_until: end,
                last_use: self.clock,
            };
            return None;
        };
        s.hits += 1;
        s.last_use = self.clock;
        s.next = s.next.max(end);
        let window = (u64::from(s.hits) * 2 * chunk).min(MAX_WINDOW);
        let target = s.next + window;
        // Re-queue only once the stream has eaten half the window.
        if target <= s.queued_until + window / 2 {
            return None;
        }
        let from = s.queued_until.max(s.next);
        s.queued_until = target;
        Some(from..target)
    }
}

/// Chunks waiting for the readahead worker.
#[derive(Debug, Default)]
pub struct PrefetchQueue {
    readahead: Mutex<VecDeque<u64>>,
    wake: Condvar,
    shutdown: AtomicBool,
}

/// Bound on queued readahead chunks (older requests are dropped first).
const QUEUE_MAX: usize = 1024;

impl PrefetchQueue {
    /// Queue chunks for readahead.
    pub fn push_readahead(&self, chunks: &[u64]) {
        if chunks.is_empty() {
            return;
        }
        let mut q = lock(&self.readahead);
        q.extend(chunks.iter().copied());
        while q.len() > QUEUE_MAX {
            q.pop_front();
        }
        self.wake.notify_one();
    }

    /// Next chunk to read ahead, if any (no waiting).
    pub fn pop_readahead(&self) -> Option<u64> {
        lock(&self.readahead).pop_front()
    }

    fn wait_readahead(&self) -> Option<u64> {
        let mut q = lock(&self.readahead);
        loop {
            if self.is_shut_down() {
                return None;
            }
            if let Some(c) = q.pop_front() {
                return Some(c);
            }
            q = self
                .wake
                .wait_timeout(q, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stop the workers.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    /// Whether the workers were asked to stop.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
}

/// The running prefetch threads.
#[derive(Debug, Default)]
pub struct Prefetcher {
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Start the workers the engine's policy asks for; `workingset` is the replay
    /// order (chunk indices) loaded from the sidecar.
    pub fn start(engine: Arc<Engine>, workingset: Vec<u64>) -> std::io::Result<Self> {
        let policy = engine.config().policy;
        let mut threads = Vec::new();
        if policy.readahead() {
            let e = engine.clone();
            threads.push(
                thread::Builder::new()
                    .name("ckptfs-readahead".into())
                    .spawn(move || readahead_worker(&e))?,
            );
        }
        if policy.workingset() || policy.background() {
            let e = engine.clone();
            threads.push(
                thread::Builder::new()
                    .name("ckptfs-background".into())
                    .spawn(move || background_worker(&e, &workingset))?,
            );
        }
        Ok(Prefetcher { threads })
    }

    /// Ask the workers to stop and wait for them.
    pub fn stop(self, engine: &Engine) {
        engine.queue.shut_down();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Lower this thread's CPU and I/O priority (best effort).
fn become_low_priority() {
    // SAFETY: plain syscalls on the calling thread (who = 0); no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        // ioprio_set(IOPRIO_WHO_PROCESS, 0 = this thread, IOPRIO_CLASS_IDLE << 13).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

fn readahead_worker(engine: &Engine) {
    become_low_priority();
    while let Some(c) = engine.queue.wait_readahead() {
        if engine.chunk_is_present(c) || engine.chunk_was_fetched(c) {
            continue;
        }
        prefetch_one(engine, c, Purpose::Readahead);
    }
}

fn prefetch_one(engine: &Engine, c: u64, why: Purpose) -> bool {
    match engine.fill_chunk(c, why) {
        Ok(_) => true,
        Err(e) => {
            stats::add(&engine.stats.prefetch_errors, 1);
            warn!("mountd: prefetch of chunk {c} failed: {}", chain(&e));
            false
        }
    }
}

/// Longest the background worker waits for demand reads to drain before taking
/// one chunk anyway (so a VM that faults nonstop still gets restored).
const MAX_YIELD: Duration = Duration::from_millis(20);

fn yield_to_demand(engine: &Engine) {
    let t0 = Instant::now();
    while engine.demand_in_flight() > 0 && t0.elapsed() < MAX_YIELD {
        thread::sleep(Duration::from_micros(200));
    }
}

fn background_worker(engine: &Engine, workingset: &[u64]) {
    become_low_priority();
    // Notify-store needs the kernel to know the `memory` inode: until someone looks
    // it up, prefetched chunks could only go to the daemon cache, so wait.
    while engine.stores_to_kernel() && !engine.memory_known() {
        if engine.queue.is_shut_down() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let mut fetched = 0u64;
    for &c in workingset {
        if engine.queue.is_shut_down() {
            return;
        }
        if engine.chunk_was_fetched(c) && engine.chunk_is_present(c) {
            continue;
        }
        yield_to_demand(engine);
        fetched += u64::from(prefetch_one(engine, c, Purpose::WorkingSet));
    }
    if !workingset.is_empty() {
        info!(
            "mountd: working set replayed: {fetched} of {} chunks fetched in {:.2?}",
            workingset.len(),
            t0.elapsed()
        );
    }
    if engine.config().policy.background() {
        sweep(engine);
    }
}

/// Rebuild every chunk not yet fetched, in disk-offset order.
fn sweep(engine: &Engine) {
    let t0 = Instant::now();
    let order = disk_order(engine);
    debug!("mountd: background order computed in {:.2?}", t0.elapsed());
    // Without notify-store the daemon cache is the only place prefetched chunks go:
    // fetching more than it holds would only evict what was fetched before.
    let budget = if engine.stores_to_kernel() {
        u64::MAX
    } else {
        (engine.cache_capacity() as u64 * 3 / 4).max(1)
    };
    let mut done = 0u64;
    for c in order {
        if engine.queue.is_shut_down() {
            return;
        }
        if engine.chunk_was_fetched(c) || engine.chunk_is_present(c) {
            continue;
        }
        if done >= budget {
            info!("mountd: background fetch stopped at the cache bound ({done} chunks)");
            return;
        }
        yield_to_demand(engine);
        prefetch_one(engine, c, Purpose::Background);
        done += 1;
    }
    engine.background_complete.store(true, Ordering::Release);
    info!(
        "mountd: background fetch complete: {done} chunks in {:.2?}",
        t0.elapsed()
    );
}

/// Chunks sorted by their first DISK page's (disk, offset); chunks without disk
/// pages (zeros and blobs, cheap to rebuild) follow in address order.
pub fn disk_order(engine: &Engine) -> Vec<u64> {
    let cp = engine.chunk_pages();
    let pages = engine.reader().page_count();
    let mut keyed: Vec<(Option<(DiskIndex, DiskOffset)>, u64)> = (0..engine.chunk_count())
        .map(|c| {
            let first = c * cp;
            let key = (first..(first + cp).min(pages))
                .find_map(|p| engine.reader().disk_location(PageIndex(p)));
            (key, c)
        })
        .collect();
    keyed.sort_by_key(|&(key, c)| (key.is_none(), key, c));
    keyed.into_iter().map(|(_, c)| c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use ckptfs::MemReader;

    const CHUNK: u64 = 64 * 1024;

    /// Wait (at most 10 s) for the background sweep to report completion.
    fn wait_for_sweep(e: &Engine) {
        let t0 = Instant::now();
        while !e.background_complete.load(Ordering::Acquire) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "sweep did not finish"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stream_needs_two_reads_then_reads_ahead() {
        let mut t = StreamTable::default();
        assert_eq!(t.observe(0, CHUNK, CHUNK), None);
        let ra = t
            .observe(CHUNK, 2 * CHUNK, CHUNK)
            .expect("second read starts readahead");
        assert_eq!(ra.start, 2 * CHUNK);
        assert!(ra.end > ra.start);
    }

    #[test]
    fn random_reads_do_not_read_ahead() {
        let mut t = StreamTable::default();
        for off in [100u64, 7, 300, 42, 900, 13, 555, 250, 777, 1] {
            assert_eq!(
                t.observe(off * CHUNK * 10, off * CHUNK * 10 + 4096, CHUNK),
                None
            );
        }
    }

    #[test]
    fn interleaved_streams_are_tracked_separately() {
        let mut t = StreamTable::default();
        let far = 1000 * CHUNK;
        t.observe(0, CHUNK, CHUNK);
        t.observe(far, far + CHUNK, CHUNK);
        assert!(t.observe(CHUNK, 2 * CHUNK, CHUNK).is_some());
        assert!(t.observe(far + CHUNK, far + 2 * CHUNK, CHUNK).is_some());
    }

    #[test]
    fn background_order_follows_disk_offsets_then_the_rest() {
        let mut r = MemReader::new(vec![0u8; 4 * CHUNK as usize]);
        let cp = CHUNK / 4096;
        // chunk 2 holds disk block 0, chunk 0 holds disk block 9 (at its 2nd page).
        r.disk_pages = vec![(2 * cp, 0), (1, 9 * 4096)];
        let cfg = EngineConfig {
            chunk_bytes: CHUNK as usize,
            cache_bytes: 1 << 20,
            policy: Policy::All,
            notify_store: false,
            record: false,
            checkpoint_name: "t".into(),
        };
        let e = Engine::new(Arc::new(r), cfg);
        assert_eq!(disk_order(&e), vec![2, 0, 1, 3]);
    }

    /// Records notify-store calls.
    #[derive(Default)]
    struct FakeKernel(Mutex<Vec<(u64, usize)>>);

    impl crate::engine::KernelCache for Arc<FakeKernel> {
        fn store(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            lock(&self.0).push((offset, data.len()));
            Ok(())
        }
        fn invalidate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn background_sweep_waits_for_a_lookup_then_stores_every_chunk() {
        let r = MemReader::new(vec![1u8; 4 * CHUNK as usize]);
        let cfg = EngineConfig {
            chunk_bytes: CHUNK as usize,
            cache_bytes: CHUNK, // smaller than the guest: stores are not bounded by it
            policy: Policy::All,
            notify_store: true,
            record: false,
            checkpoint_name: "t".into(),
        };
        let e = Arc::new(Engine::new(Arc::new(r), cfg));
        let kernel = Arc::new(FakeKernel::default());
        e.set_kernel_cache(Box::new(kernel.clone()));
        let p = Prefetcher::start(e.clone(), Vec::new()).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert!(
            lock(&kernel.0).is_empty(),
            "no store before the inode is looked up"
        );
        e.memory_looked_up(1);
        wait_for_sweep(&e);
        p.stop(&e);
        let mut stored = lock(&kernel.0).clone();
        stored.sort();
        let want: Vec<(u64, usize)> = (0..4).map(|c| (c * CHUNK, CHUNK as usize)).collect();
        assert_eq!(stored, want);
        assert_eq!(e.snapshot().prefetch.stored_in_kernel_bytes, 4 * CHUNK);
    }

    #[test]
    fn background_sweep_fetches_everything_and_completes() {
        let r = MemReader::new(vec![1u8; 8 * CHUNK as usize]);
        let cfg = EngineConfig {
            chunk_bytes: CHUNK as usize,
            cache_bytes: 1 << 20,
            policy: Policy::All,
            notify_store: false,
            record: false,
            checkpoint_name: "t".into(),
        };
        let e = Arc::new(Engine::new(Arc::new(r), cfg));
        let p = Prefetcher::start(e.clone(), vec![5, 1]).unwrap();
        wait_for_sweep(&e);
        p.stop(&e);
        let snap = e.snapshot();
        assert_eq!(snap.pages.fetched, snap.pages.total);
        assert_eq!(snap.prefetch.workingset_bytes, 2 * CHUNK);
        assert_eq!(snap.prefetch.background_bytes, 6 * CHUNK);
    }
}
