//! Pre-warming the page cache from the loading set (REAP, FaaSnap).
//!
//! At mount, the daemon reads the loading-set file front to back at full speed
//! and pushes its pages into the kernel page cache of `memory` with
//! FUSE_NOTIFY_STORE, before (or while) the VMM starts: those pages then fault
//! in at page-cache speed and never reach the daemon. The kernel accepts a
//! store only for an inode it holds, so the loader opens `memory` through the
//! mount itself and keeps it open while it pushes, rather than waiting for the
//! VMM. Every page is checked against the checkpoint's CRC before it is
//! pushed; a page that does not match (a stale or damaged set) stops the
//! loader with a warning, and the mount goes on serving from the checkpoint.
//!
//! One thread reads blocks sequentially; `threads` threads verify and push
//! them (one thread stores 0.3-0.55 GB/s here, about a disk's speed).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use ckptfs::PAGE_SIZE;
use ckptfs::loadset::{Block, LoadSetError, LoadingSet};
use log::{debug, info, warn};

use crate::cache::lock;
use crate::shared::Shared;
use crate::stats::{self, LoadState};

const PAGE: u64 = PAGE_SIZE as u64;
/// Bytes read per block (one notify-store at most: a FUSE request's size).
const BLOCK_BYTES: usize = 1 << 20;

/// Take the loading set at `path` (as `LoadingSet::open` read it, before the daemon built
/// `shared`: whether there is one decides the default policy) for `shared`'s checkpoint
/// and mark it as loading (so the background sweep waits). A missing file is normal; a bad
/// one is a warning and the mount goes on without it.
pub fn open(
    shared: &Shared,
    path: &Path,
    opened: Result<LoadingSet, LoadSetError>,
) -> Option<LoadingSet> {
    let st = &shared.loadset;
    lock(&st.text).0 = path.display().to_string();
    match opened {
        Ok(set) => {
            let pages: u64 = set.runs().iter().map(|r| u64::from(r.pages)).sum();
            stats::add(&st.pages, pages);
            stats::add(&st.data_bytes, set.data_bytes());
            st.set_state(LoadState::Loading);
            info!(
                "mountd: loading set {}: {} pages ({} MiB stored) to push first",
                path.display(),
                pages,
                set.data_bytes() >> 20
            );
            Some(set)
        }
        Err(LoadSetError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            debug!("mountd: no loading set at {}", path.display());
            None
        }
        Err(e) => {
            refuse(shared, &e);
            None
        }
    }
}

/// Give up on the loading set (the first reason wins).
fn refuse(shared: &Shared, e: &LoadSetError) {
    let why = crate::chain(e);
    let mut text = lock(&shared.loadset.text);
    if shared.loadset.state() == LoadState::Refused {
        return;
    }
    warn!("mountd: ignoring the loading set: {why}");
    text.1 = why;
    shared.loadset.set_state(LoadState::Refused);
}

fn now_us(shared: &Shared) -> u64 {
    shared.started.elapsed().as_micros() as u64
}

/// Push `set` into the page cache on a thread of its own; `memory` is the
/// mount's `memory` file, `done` runs when the loader has finished.
pub fn start(
    shared: Arc<Shared>,
    set: LoadingSet,
    memory: std::path::PathBuf,
    threads: usize,
    done: Box<dyn FnOnce() + Send>,
) -> std::io::Result<JoinHandle<()>> {
    let set = Arc::new(set);
    thread::Builder::new()
        .name("ckptfs-loadset".into())
        .spawn(move || {
            load(&shared, &set, &memory, threads);
            done();
        })
}

fn load(shared: &Arc<Shared>, set: &Arc<LoadingSet>, memory: &Path, threads: usize) {
    let st = &shared.loadset;
    st.started_us.store(now_us(shared), Ordering::Relaxed);
    // Looking `memory` up makes the kernel hold the inode; the open file keeps
    // it held while we push.
    let held = match File::open(memory) {
        Ok(f) => f,
        Err(e) => {
            warn!(
                "mountd: cannot open {} to push the loading set: {e}",
                memory.display()
            );
            lock(&st.text).1 = format!("cannot open {}: {e}", memory.display());
            st.set_state(LoadState::Refused);
            return;
        }
    };
    let failed = Arc::new(AtomicBool::new(false));
    let (tx, rx) = sync_channel::<Block>(threads.max(1) * 2);
    let rx = Arc::new(Mutex::new(rx));
    let pushers: Vec<_> = (0..threads.max(1))
        .filter_map(|i| {
            let (shared, set, rx, failed) =
                (shared.clone(), set.clone(), rx.clone(), failed.clone());
            thread::Builder::new()
                .name(format!("ckptfs-push-{i}"))
                .spawn(move || push_blocks(&shared, &set, &rx, &failed))
                .ok()
        })
        .collect();
    let mut reader = set.blocks(BLOCK_BYTES);
    let result = loop {
        if failed.load(Ordering::Acquire) {
            break Ok(());
        }
        match reader.next_block() {
            Ok(Some(b)) => {
                stats::add(&st.read_bytes, b.data.len() as u64);
                if tx.send(b).is_err() {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    for p in pushers {
        let _ = p.join();
    }
    if let Err(e) = result {
        refuse(shared, &e);
    }
    if !failed.load(Ordering::Acquire) && st.state() == LoadState::Loading {
        push_zero_runs(shared, set);
        st.set_state(LoadState::Done);
    }
    st.finished_us
        .store(now_us(shared).max(1), Ordering::Release);
    drop(held);
    let snap = st.snapshot();
    let secs = snap.seconds.unwrap_or(0.0);
    info!(
        "mountd: loading set {:?}: pushed {} MiB in {secs:.2} s ({:.0} MB/s read)",
        snap.state,
        snap.pushed_bytes >> 20,
        snap.read_bytes as f64 / 1e6 / secs.max(1e-6)
    );
}

fn push_blocks(
    shared: &Shared,
    set: &LoadingSet,
    rx: &Mutex<Receiver<Block>>,
    failed: &AtomicBool,
) {
    loop {
        let Ok(block) = lock(rx).recv() else {
            return;
        };
        if failed.load(Ordering::Acquire) {
            continue; // drain
        }
        for p in &block.pieces {
            let bytes = &block.data[p.at..p.at + p.pages as usize * PAGE_SIZE];
            if let Err(e) = set.verify(&*shared.source, p.first_page, bytes) {
                if !failed.swap(true, Ordering::AcqRel) {
                    refuse(shared, &e);
                }
                break;
            }
            let n = shared.store_pages(p.first_page, bytes);
            stats::add(&shared.loadset.pushed_bytes, n);
        }
    }
}

/// Zero pages of the set are pushed from a zero buffer (no I/O).
fn push_zero_runs(shared: &Shared, set: &LoadingSet) {
    static ZEROS: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
    let per = (BLOCK_BYTES / PAGE_SIZE) as u64;
    for r in set.runs().iter().filter(|r| r.zero) {
        let end = r.first_page + u64::from(r.pages);
        let mut p = r.first_page;
        while p < end {
            let n = per.min(end - p);
            let stored = shared.store_pages(p, &ZEROS[..(n * PAGE) as usize]);
            stats::add(&shared.loadset.pushed_bytes, stored);
            p += n;
        }
    }
}
