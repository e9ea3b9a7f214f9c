//! Fetching blocks of packs: ranged GETs, in three classes of priority, with
//! retries, one fetch per block at a time, and the on-disk cache in front.
//!
//! - **Demand** (a FUSE read): the blocks a read needs, all packs in
//!   parallel, adjacent blocks of a pack in one range; never queued behind
//!   prefetch (each class has its own permits, and a block already on the
//!   wire is joined rather than fetched twice).
//! - **Loading set**: whole loading-set packs, many at once, started at mount.
//! - **Background**: what an idle-I/O-priority thread (the daemon's sweep)
//!   reads, a MiB at a time, two requests at most.
//!
//! A failed request is retried with exponential backoff until the class's
//! deadline; then every block it carried fails, with the object's name, and
//! stays failed for [`FAIL_MEMO`] so that the page-by-page retry of a failed
//! read answers at once; after that the store is asked again.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStore, path::Path as ObjPath};
use tokio::sync::Semaphore;

use super::cache::{BLOCK_PAGES, BlockKey, DiskCache};
use super::manifest::PackRecord;
use super::store::REQUEST_TIMEOUT;
use crate::types::PAGE_SIZE_U64;

/// How long a block that could not be fetched fails at once.
pub const FAIL_MEMO: Duration = Duration::from_secs(1);
/// First pause between attempts; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Requests in flight per class: demand, loading set, background.
const PERMITS: [usize; 3] = [32, 16, 2];
/// Blocks a background read fetches ahead in the same pack (1 MiB in all).
const BACKGROUND_AHEAD: u32 = 3;
/// Bytes in a block.
pub const BLOCK_BYTES: u64 = BLOCK_PAGES as u64 * PAGE_SIZE_U64;

/// Who is asking, which decides the permits a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A read the VM waits for.
    Demand,
    /// The loading set, pushed at mount.
    LoadingSet,
    /// Everything else, when nothing more urgent runs.
    Background,
}

thread_local! {
    static CLASS: Cell<Option<Class>> = const { Cell::new(None) };
}

/// Run `f` with this thread's fetches in class `c`.
pub fn with_class<R>(c: Class, f: impl FnOnce() -> R) -> R {
    let before = CLASS.with(|k| k.replace(Some(c)));
    let r = f();
    CLASS.with(|k| k.set(before));
    r
}

/// The calling thread's class: as set by [`with_class`], else Background for
/// a thread in the idle I/O-priority class (the daemon's prefetch worker
/// puts itself there), else Demand.
pub fn current_class() -> Class {
    if let Some(c) = CLASS.with(Cell::get) {
        return c;
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    // SAFETY: ioprio_get takes two integers and reads no memory; who = 0 is this thread.
    let prio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    if prio >= 0 && prio >> 13 == IOPRIO_CLASS_IDLE {
        Class::Background
    } else {
        Class::Demand
    }
}

/// A block being fetched; waiters block on it.
#[derive(Default)]
struct Pending {
    result: Mutex<Option<Result<Bytes, String>>>,
    done: Condvar,
}

impl Pending {
    fn complete(&self, r: Result<Bytes, String>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.done.notify_all();
    }

    fn wait(&self, until: Instant) -> Result<Bytes, String> {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = &*g {
                return r.clone();
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the store did not answer in time".into());
            }
            g = self
                .done
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Counters of the fetcher.
#[derive(Debug, Default, serde::Serialize)]
pub struct FetchStats {
    /// Ranged GETs that succeeded.
    pub requests: AtomicU64,
    /// Bytes they brought.
    pub bytes: AtomicU64,
    /// Blocks found in the on-disk cache.
    pub cache_hits: AtomicU64,
    /// Attempts that failed (each retried or reported).
    pub failed_attempts: AtomicU64,
    /// Blocks that could not be fetched before the deadline.
    pub failed_blocks: AtomicU64,
}

/// A fetch that failed: the object and why.
#[derive(Clone, Debug)]
pub struct FetchFailure {
    /// `s3://bucket/key`.
    pub object: String,
    /// Why, in one line.
    pub what: String,
}

/// What fetch tasks share (the runtime is not in here: a task may be the
/// last to drop this, and a runtime must not be dropped inside itself).
pub struct Shared {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    packs: Vec<PackRecord>,
    cache: DiskCache,
    inflight: Mutex<HashMap<BlockKey, Arc<Pending>>>,
    failed: Mutex<HashMap<BlockKey, Instant>>,
    permits: [Arc<Semaphore>; 3],
    retry_for: Duration,
    /// Counters.
    pub stats: FetchStats,
}

fn class_index(c: Class) -> usize {
    match c {
        Class::Demand => 0,
        Class::LoadingSet => 1,
        Class::Background => 2,
    }
}

impl Shared {
    /// Fetch state over `packs` of `store` (bucket `bucket`), retrying for up to `retry_for`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        bucket: String,
        packs: Vec<PackRecord>,
        cache: DiskCache,
        retry_for: Duration,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            store,
            bucket,
            packs,
            cache,
            inflight: Mutex::default(),
            failed: Mutex::default(),
            permits: PERMITS.map(|n| Arc::new(Semaphore::new(n))),
            retry_for,
            stats: FetchStats::default(),
        })
    }

    /// The object name of pack `p`.
    pub fn object(&self, p: u32) -> String {
        format!("s3://{}/{}", self.bucket, self.packs[p as usize].key())
    }

    fn key(&self, p: u32, block: u32) -> BlockKey {
        BlockKey {
            pack: self.packs[p as usize].hash,
            block,
        }
    }

    /// Blocks in pack `p`.
    pub fn blocks_in(&self, p: u32) -> u32 {
        self.packs[p as usize].pages.div_ceil(BLOCK_PAGES)
    }

    fn block_range(&self, p: u32, block: u32) -> Range<u64> {
        let len = self.packs[p as usize].len();
        let start = u64::from(block) * BLOCK_BYTES;
        start..(start + BLOCK_BYTES).min(len)
    }

    /// Drop a cached block whose pages failed their CRCs.
    pub fn forget(&self, p: u32, block: u32) {
        self.cache.remove(&self.key(p, block));
    }

    fn recently_failed(&self, key: &BlockKey) -> bool {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match f.get(key) {
            Some(t) if t.elapsed() < FAIL_MEMO => true,
            Some(_) => {
                f.remove(key);
                false
            }
            None => false,
        }
    }

    /// The on-disk cache.
    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }
}

/// Get blocks `(pack, block)` for a caller of `class`, waiting for them;
/// `rt` runs the requests. Results are in the order asked.
///
/// A prefetch class takes its permit before it claims a block, so a block
/// that is claimed is on the wire (or about to be): a demand read that joins
/// it never waits behind queued prefetch work.
pub fn get_blocks(
    shared: &Arc<Shared>,
    rt: &tokio::runtime::Handle,
    wanted: &[(u32, u32)],
    class: Class,
) -> Vec<Result<Bytes, FetchFailure>> {
    let mut results: Vec<Option<Result<Bytes, FetchFailure>>> = vec![None; wanted.len()];
    let mut need: HashMap<u32, Vec<(usize, u32)>> = HashMap::new();
    for (i, &(p, b)) in wanted.iter().enumerate() {
        let key = shared.key(p, b);
        if let Some(data) = shared.cache.get(&key) {
            shared.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            results[i] = Some(Ok(Bytes::from(data)));
        } else if shared.recently_failed(&key) {
            results[i] = Some(Err(FetchFailure {
                object: shared.object(p),
                what: "failed moments ago; not asking the store again yet".into(),
            }));
        } else {
            need.entry(p).or_default().push((i, b));
        }
    }
    let mut waits: Vec<(usize, u32, Arc<Pending>)> = Vec::new();
    for (p, blocks) in need {
        let permit = (class != Class::Demand).then(|| {
            let sem = shared.permits[class_index(class)].clone();
            rt.block_on(sem.acquire_owned()).ok()
        });
        let mut fresh = Vec::new();
        for (i, b) in blocks {
            let (pending, new) = claim(shared, shared.key(p, b));
            if new {
                fresh.push((b, pending.clone()));
            }
            waits.push((i, p, pending));
        }
        if class == Class::Background {
            add_read_ahead(shared, p, &mut fresh);
        }
        if !fresh.is_empty() {
            rt.spawn(fetch_pack_blocks(
                shared.clone(),
                p,
                fresh,
                class,
                permit.flatten(),
            ));
        }
    }
    let until = Instant::now() + shared.retry_for + REQUEST_TIMEOUT;
    for (i, p, pending) in waits {
        results[i] = Some(pending.wait(until).map_err(|what| FetchFailure {
            object: shared.object(p),
            what,
        }));
    }
    results
        .into_iter()
        .map(|r| r.expect("every block answered"))
        .collect()
}

/// Start fetching whole packs `packs` in class `class` (no waiting): the
/// loading set's packs at mount. Each pack claims its blocks only once it
/// holds a permit.
pub fn prefetch_packs(
    shared: &Arc<Shared>,
    rt: &tokio::runtime::Handle,
    packs: Range<u32>,
    class: Class,
) {
    for p in packs {
        let shared = shared.clone();
        rt.spawn(async move {
            let sem = shared.permits[class_index(class)].clone();
            let Ok(permit) = sem.acquire_owned().await else {
                return;
            };
            let blocks: Vec<(u32, Arc<Pending>)> = (0..shared.blocks_in(p))
                .filter(|&b| !shared.cache.contains(&shared.key(p, b)))
                .filter_map(|b| {
                    let (pending, new) = claim(&shared, shared.key(p, b));
                    new.then_some((b, pending))
                })
                .collect();
            if !blocks.is_empty() {
                fetch_pack_blocks(shared, p, blocks, class, Some(permit)).await;
            }
        });
    }
}

/// The pending fetch of `key`, and whether this caller must start it.
fn claim(shared: &Shared, key: BlockKey) -> (Arc<Pending>, bool) {
    let mut inflight = shared.inflight.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = inflight.get(&key) {
        return (p.clone(), false);
    }
    let p = Arc::new(Pending::default());
    inflight.insert(key, p.clone());
    (p, true)
}

/// A background read also takes the next few blocks of its pack.
fn add_read_ahead(shared: &Shared, p: u32, fresh: &mut Vec<(u32, Arc<Pending>)>) {
    let Some(last) = fresh.iter().map(|b| b.0).max() else {
        return;
    };
    let end = (last + 1 + BACKGROUND_AHEAD).min(shared.blocks_in(p));
    for b in last + 1..end {
        let key = shared.key(p, b);
        if shared.cache.contains(&key) {
            continue;
        }
        let (pending, new) = claim(shared, key);
        if new {
            fresh.push((b, pending));
        }
    }
}

/// Byte ranges for sorted blocks of pack `p`: adjacent blocks share a range.
fn ranges_for(shared: &Shared, p: u32, blocks: &[u32]) -> Vec<(Range<u64>, Vec<u32>)> {
    let mut out: Vec<(Range<u64>, Vec<u32>)> = Vec::new();
    for &b in blocks {
        let r = shared.block_range(p, b);
        match out.last_mut() {
            Some((last, members)) if last.end == r.start => {
                last.end = r.end;
                members.push(b);
            }
            _ => out.push((r, vec![b])),
        }
    }
    out
}

/// Fetch `blocks` of pack `p` with retries, then complete every one.
async fn fetch_pack_blocks(
    shared: Arc<Shared>,
    p: u32,
    mut blocks: Vec<(u32, Arc<Pending>)>,
    class: Class,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    blocks.sort_by_key(|b| b.0);
    let numbers: Vec<u32> = blocks.iter().map(|b| b.0).collect();
    let ranges = ranges_for(&shared, p, &numbers);
    let permit = match permit {
        Some(p) => Some(p),
        None => shared.permits[class_index(class)]
            .clone()
            .acquire_owned()
            .await
            .ok(),
    };
    let result = fetch_with_retries(&shared, p, &ranges).await;
    drop(permit);
    let mut by_block: HashMap<u32, Result<Bytes, String>> = HashMap::new();
    match result {
        Ok(parts) => {
            for ((r, members), body) in ranges.iter().zip(parts) {
                for &b in members {
                    let br = shared.block_range(p, b);
                    let at = (br.start - r.start) as usize;
                    let data = body.slice(at..at + (br.end - br.start) as usize);
                    shared.cache.put(&shared.key(p, b), &data);
                    by_block.insert(b, Ok(data));
                }
            }
        }
        Err(what) => {
            log::warn!(
                "remote: giving up on {} blocks of {}: {what}",
                blocks.len(),
                shared.object(p)
            );
            shared
                .stats
                .failed_blocks
                .fetch_add(blocks.len() as u64, Ordering::Relaxed);
            let mut failed = shared.failed.lock().unwrap_or_else(|e| e.into_inner());
            for (b, _) in &blocks {
                failed.insert(shared.key(p, *b), Instant::now());
                by_block.insert(*b, Err(what.clone()));
            }
        }
    }
    let mut inflight = shared.inflight.lock().unwrap_or_else(|e| e.into_inner());
    for (b, pending) in &blocks {
        inflight.remove(&shared.key(p, *b));
        pending.complete(by_block.remove(b).expect("every block has a result"));
    }
}

/// GET `ranges` of pack `p`, retrying with backoff until the deadline.
async fn fetch_with_retries(
    shared: &Shared,
    p: u32,
    ranges: &[(Range<u64>, Vec<u32>)],
) -> Result<Vec<Bytes>, String> {
    let deadline = Instant::now() + shared.retry_for;
    let path = ObjPath::from(shared.packs[p as usize].key());
    let want: Vec<Range<u64>> = ranges.iter().map(|r| r.0.clone()).collect();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(
            left.clamp(Duration::from_millis(100), REQUEST_TIMEOUT),
            shared.store.get_ranges(&path, &want),
        )
        .await;
        let why = match attempt {
            Ok(Ok(parts)) => match check_lengths(&want, &parts) {
                Ok(()) => {
                    let n: u64 = parts.iter().map(|b| b.len() as u64).sum();
                    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                    shared.stats.bytes.fetch_add(n, Ordering::Relaxed);
                    return Ok(parts);
                }
                Err(why) => why,
            },
            Ok(Err(e)) => crate::checkpoint::error_chain(&e),
            Err(_) => "the store did not answer in time".into(),
        };
        shared.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if Instant::now() + backoff >= deadline {
            return Err(why);
        }
        log::debug!(
            "remote: {} failed ({why}); retrying in {backoff:?}",
            shared.object(p)
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn check_lengths(want: &[Range<u64>], got: &[Bytes]) -> Result<(), String> {
    if want.len() != got.len() {
        return Err(format!(
            "{} ranges asked, {} returned",
            want.len(),
            got.len()
        ));
    }
    for (w, g) in want.iter().zip(got) {
        if g.len() as u64 != w.end - w.start {
            return Err(format!(
                "got {} bytes of a {}-byte range (truncated body?)",
                g.len(),
                w.end - w.start
            ));
        }
    }
    Ok(())
}
