//! The scheduler: what the daemon reads, in explicit priority order.
//!
//! 1. **Demand** reads are served inline by the FUSE threads and never wait for
//!    anything else; the scheduler counts them so prefetch can step aside.
//! 2. The **loading set** (see [`crate::loader`]) streams first, before or
//!    while the VM starts.
//! 3. **Readahead** of sequential streams detected on small reads.
//! 4. The **background** sweep fetches every page still missing, in disk
//!    order, only once the loading set is settled. It pauses while demand
//!    reads are in flight, and while the VM has faulted recently it only
//!    trickles (one chunk every [`TRICKLE`]): on storage with a bandwidth cap
//!    (a blkio limit, a shared array) every byte it reads is a byte a fault
//!    waits for, whatever its I/O priority, and on a busy host every chunk it
//!    rebuilds is CPU the VM does not get (measured: a sweep paced to a
//!    quarter of the time still doubled the work lag of a 512 MiB desktop).
//!
//! Readahead and background share one low-priority worker thread (nice 19,
//! idle I/O class), readahead first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ckptfs::{DiskIndex, DiskOffset, PageIndex};
use log::{debug, info, warn};

use crate::cache::lock;
use crate::shared::{Purpose, Shared};

/// Bound on queued readahead chunks (older requests are dropped first).
const QUEUE_MAX: usize = 1024;
/// Longest the background waits for demand reads to drain before taking one
/// chunk anyway (so a VM that faults nonstop still gets restored).
const MAX_YIELD: Duration = Duration::from_millis(20);
/// A demand read this recent means the VM is still faulting.
const RECENT_DEMAND: Duration = Duration::from_millis(100);
/// While the VM faults, the sweep fetches at most one chunk this often.
const TRICKLE: Duration = Duration::from_millis(50);

/// Microseconds since the process started (a clock the atomics can hold).
fn now_us() -> u64 {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Priority state shared by the read path and the workers.
#[derive(Debug, Default)]
pub struct Scheduler {
    demand: AtomicU64,
    /// When the last demand read ended ([`now_us`]; 0 = never).
    last_demand_us: AtomicU64,
    readahead: Mutex<VecDeque<u64>>,
    wake: Condvar,
    shutdown: AtomicBool,
}

/// Held while a demand read is being served.
pub struct DemandGuard<'a>(&'a Scheduler);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0
            .last_demand_us
            .store(now_us().max(1), Ordering::Release);
        self.0.demand.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Scheduler {
    /// A demand read starts; it ends when the guard drops.
    pub fn demand(&self) -> DemandGuard<'_> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        DemandGuard(self)
    }

    /// Demand reads in flight.
    pub fn demand_in_flight(&self) -> u64 {
        self.demand.load(Ordering::Acquire)
    }

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

    /// Next readahead chunk, if any (no waiting).
    pub fn pop_readahead(&self) -> Option<u64> {
        lock(&self.readahead).pop_front()
    }

    /// Wait up to `d` for readahead work or shutdown.
    fn wait(&self, d: Duration) {
        let q = lock(&self.readahead);
        if q.is_empty() && !self.is_shut_down() {
            let _ = self.wake.wait_timeout(q, d);
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

    /// Whether the VM read on demand within [`RECENT_DEMAND`].
    pub fn demand_is_recent(&self) -> bool {
        let last = self.last_demand_us.load(Ordering::Acquire);
        last > 0 && now_us().saturating_sub(last) < RECENT_DEMAND.as_micros() as u64
    }

    /// After a background fetch that took `took`: while the VM is still
    /// faulting, wait out the rest of [`TRICKLE`].
    pub fn pace(&self, took: Duration) {
        if self.demand_is_recent() {
            thread::sleep(TRICKLE.saturating_sub(took));
        }
    }

    /// Wait (at most [`MAX_YIELD`]) while demand reads are in flight.
    pub fn yield_to_demand(&self) {
        let t0 = Instant::now();
        while self.demand_in_flight() > 0 && t0.elapsed() < MAX_YIELD {
            thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The running prefetch worker.
#[derive(Debug, Default)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Start the readahead/background worker if the policy asks for either.
    pub fn start(shared: Arc<Shared>, sched: Arc<Scheduler>) -> std::io::Result<Self> {
        let policy = shared.config.policy;
        let mut threads = Vec::new();
        if policy.readahead() || policy.background() {
            threads.push(
                thread::Builder::new()
                    .name("ckptfs-prefetch".into())
                    .spawn(move || worker(&shared, &sched))?,
            );
        }
        Ok(Workers { threads })
    }

    /// Wait for the workers (after [`Scheduler::shut_down`]).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Lower this thread's CPU and I/O priority (best effort).
pub fn become_low_priority() {
    // SAFETY: plain syscalls on the calling thread (who = 0); no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        // ioprio_set(IOPRIO_WHO_PROCESS, 0 = this thread, IOPRIO_CLASS_IDLE << 13).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

fn prefetch(shared: &Shared, c: u64, why: Purpose) {
    if let Err(e) = shared.prefetch_chunk(c, why) {
        warn!("mountd: prefetch of chunk {c} failed: {}", crate::chain(&e));
    }
}

/// The sweep's position: chunks in disk order, and how many it may fetch.
struct Sweep {
    order: Vec<u64>,
    next: usize,
    budget: u64,
    done: u64,
    started: Instant,
}

impl Sweep {
    fn new(shared: &Shared) -> Self {
        let t0 = Instant::now();
        let order = disk_order(shared);
        debug!("mountd: background order computed in {:.2?}", t0.elapsed());
        // Without notify-store the daemon cache is the only place prefetched
        // chunks go: fetching more than it holds would evict what came before.
        let budget = if shared.stores_to_kernel() {
            u64::MAX
        } else {
            (shared.cache.capacity() as u64 * 3 / 4).max(1)
        };
        Sweep {
            order,
            next: 0,
            budget,
            done: 0,
            started: Instant::now(),
        }
    }

    /// Fetch the next missing chunk; false once the sweep is over.
    fn step(&mut self, shared: &Shared, sched: &Scheduler) -> bool {
        while let Some(&c) = self.order.get(self.next) {
            self.next += 1;
            let pages = shared.chunk_pages_range(c);
            if shared.resident.all_set(pages.start, pages.end) || shared.cache.contains(c) {
                continue;
            }
            if self.done >= self.budget {
                info!(
                    "mountd: background fetch stopped at the cache bound ({} chunks)",
                    self.done
                );
                return false;
            }
            sched.yield_to_demand();
            let t0 = Instant::now();
            prefetch(shared, c, Purpose::Background);
            sched.pace(t0.elapsed());
            self.done += 1;
            return true;
        }
        shared
            .stats
            .background_complete
            .store(true, Ordering::Release);
        info!(
            "mountd: background fetch complete: {} chunks in {:.2?}",
            self.done,
            self.started.elapsed()
        );
        false
    }
}

fn worker(shared: &Shared, sched: &Scheduler) {
    become_low_priority();
    let mut sweep: Option<Sweep> = None;
    let mut sweeping = shared.config.policy.background();
    while !sched.is_shut_down() {
        if let Some(c) = sched.pop_readahead() {
            prefetch(shared, c, Purpose::Readahead);
            continue;
        }
        // The sweep waits for the loading set, and, with notify-store, for the
        // kernel to hold `memory` (a store to an inode it does not hold is lost).
        let ready =
            shared.loadset.settled() && (!shared.stores_to_kernel() || shared.kernel.holds_inode());
        if sweeping && ready {
            let sweep = sweep.get_or_insert_with(|| Sweep::new(shared));
            sweeping = sweep.step(shared, sched);
            continue;
        }
        sched.wait(Duration::from_millis(10));
    }
}

/// Chunks sorted by their first DISK page's (disk, offset); chunks without disk
/// pages (zeros and blobs, cheap to rebuild) follow in address order.
pub fn disk_order(shared: &Shared) -> Vec<u64> {
    let src = &shared.source;
    let mut keyed: Vec<(Option<(DiskIndex, DiskOffset)>, u64)> = (0..shared.chunk_count())
        .map(|c| {
            let key = shared
                .chunk_pages_range(c)
                .find_map(|p| src.disk_location(PageIndex(p)));
            (key, c)
        })
        .collect();
    keyed.sort_by_key(|&(key, c)| (key.is_none(), key, c));
    keyed.into_iter().map(|(_, c)| c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelCache;
    use crate::options::Policy;
    use crate::shared::Config;
    use ckptfs::MemReader;

    const CHUNK: u64 = 64 * 1024;

    fn config(policy: Policy, notify_store: bool, cache_bytes: u64) -> Config {
        Config {
            chunk_bytes: CHUNK as usize,
            cache_bytes,
            policy,
            notify_store,
            checkpoint_name: "t".into(),
        }
    }

    /// Wait (at most 10 s) for the background sweep to report completion.
    fn wait_for_sweep(s: &Shared) {
        let t0 = Instant::now();
        while !s.stats.background_complete.load(Ordering::Acquire) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "sweep did not finish"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn background_order_follows_disk_offsets_then_the_rest() {
        let mut r = MemReader::new(vec![1u8; 4 * CHUNK as usize]);
        let cp = CHUNK / 4096;
        // chunk 2 holds disk block 0, chunk 0 holds disk block 9 (at its 2nd page).
        r.disk_pages = vec![(2 * cp, 0), (1, 9 * 4096)];
        let s = Shared::new(Arc::new(r), config(Policy::All, false, 1 << 20), None);
        assert_eq!(disk_order(&s), vec![2, 0, 1, 3]);
    }

    /// Records notify-store calls.
    #[derive(Default)]
    struct FakeKernel(Mutex<Vec<(u64, usize)>>);

    impl KernelCache for Arc<FakeKernel> {
        fn store(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            lock(&self.0).push((offset, data.len()));
            Ok(())
        }
        fn invalidate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sweep_waits_for_a_lookup_then_stores_only_missing_pages() {
        let r = MemReader::new(vec![1u8; 4 * CHUNK as usize]);
        // The cache is smaller than the guest: stores are not bounded by it.
        let s = Arc::new(Shared::new(
            Arc::new(r),
            config(Policy::All, true, CHUNK),
            None,
        ));
        let kernel = Arc::new(FakeKernel::default());
        s.kernel.set_sink(Box::new(kernel.clone()));
        // Pages 1 and 2 of chunk 0 are already in the kernel (a demand read).
        s.resident.set_range(1, 3);
        let sched = Arc::new(Scheduler::default());
        let w = Workers::start(s.clone(), sched.clone()).unwrap();
        thread::sleep(Duration::from_millis(50));
        assert!(
            lock(&kernel.0).is_empty(),
            "no store before the inode is looked up"
        );
        s.kernel.looked_up(1);
        wait_for_sweep(&s);
        sched.shut_down();
        w.join();
        let mut stored = lock(&kernel.0).clone();
        stored.sort();
        let mut want = vec![(0, 4096), (3 * 4096, CHUNK as usize - 3 * 4096)];
        want.extend((1..4).map(|c| (c * CHUNK, CHUNK as usize)));
        assert_eq!(stored, want);
        assert_eq!(s.resident.count(), 4 * CHUNK / 4096);
    }

    #[test]
    fn sweep_without_notify_store_fills_the_daemon_cache_up_to_its_bound() {
        let r = MemReader::new(vec![1u8; 8 * CHUNK as usize]);
        let s = Arc::new(Shared::new(
            Arc::new(r),
            config(Policy::All, false, 4 * CHUNK),
            None,
        ));
        let sched = Arc::new(Scheduler::default());
        let w = Workers::start(s.clone(), sched.clone()).unwrap();
        let t0 = Instant::now();
        while s.cache.len() < 3 && t0.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(50));
        sched.shut_down();
        w.join();
        assert_eq!(s.cache.len(), 3, "3/4 of a 4-chunk cache");
        assert!(!s.stats.background_complete.load(Ordering::Acquire));
    }

    #[test]
    fn recent_demand_paces_the_background() {
        let sched = Scheduler::default();
        assert!(!sched.demand_is_recent(), "no demand yet");
        drop(sched.demand());
        assert!(sched.demand_is_recent());
        let t0 = Instant::now();
        sched.pace(Duration::from_millis(2));
        assert!(
            t0.elapsed() >= Duration::from_millis(6),
            "paced 3x the fetch"
        );
        thread::sleep(RECENT_DEMAND + Duration::from_millis(10));
        let t0 = Instant::now();
        sched.pace(Duration::from_millis(2));
        assert!(
            t0.elapsed() < Duration::from_millis(5),
            "idle VM: full speed"
        );
    }

    #[test]
    fn the_sweep_waits_for_the_loading_set() {
        let r = MemReader::new(vec![1u8; 2 * CHUNK as usize]);
        let s = Arc::new(Shared::new(
            Arc::new(r),
            config(Policy::All, false, 1 << 20),
            None,
        ));
        s.loadset.set_state(crate::stats::LoadState::Loading);
        let sched = Arc::new(Scheduler::default());
        let w = Workers::start(s.clone(), sched.clone()).unwrap();
        thread::sleep(Duration::from_millis(60));
        assert_eq!(
            s.cache.len(),
            0,
            "nothing fetched while the loading set loads"
        );
        s.loadset.set_state(crate::stats::LoadState::Done);
        wait_for_sweep(&s);
        sched.shut_down();
        w.join();
        assert_eq!(s.cache.len(), 2);
    }
}
