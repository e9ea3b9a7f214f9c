//! Serving a checkpoint pushed to an object store (`ckptfs-mountd
//! s3://BUCKET/PREFIX MOUNTPOINT`): the source is a
//! [`ckptfs::remote::RemoteCheckpoint`], and the loading set comes from its
//! manifest rather than a `.ls` file.
//!
//! Everything else is the daemon as it is for a local checkpoint: demand
//! reads go through the `PageReader` (which fetches the blocks they need,
//! never behind prefetch), the sweep runs on an idle-I/O-priority thread
//! (which the remote source takes as its background class). At mount the
//! loader asks for every loading-set pack at once, then pushes the set's
//! runs into the page cache in first-touch order as their packs arrive.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::SystemTime;

use ckptfs::remote::fetch::{Class, with_class};
use ckptfs::remote::{RemoteCheckpoint, RemoteOptions, S3Url};
use ckptfs::{PAGE_SIZE, PageIndex, PageReader};
use log::{info, warn};

use crate::cache::lock;
use crate::fs::Ownership;
use crate::options::Settings;
use crate::shared::Shared;
use crate::stats::{self, LoadState};

/// Pages per read of a loading-set run (1 MiB).
const PIECE_PAGES: u64 = 256;

/// The opened remote source: the checkpoint, who owns the mount's files
/// (the daemon's user, mode 0600: guest memory is private), its VMM state.
pub fn open(
    s: &Settings,
    url: &str,
) -> anyhow::Result<(Arc<RemoteCheckpoint>, Ownership, Vec<u8>)> {
    let url = S3Url::parse(url)?;
    let mut opts = RemoteOptions {
        disk_override: (!s.disks.is_empty()).then(|| s.disks.clone()),
        cache_bytes: s.cache_bytes,
        retry_for: s.retry,
        ..RemoteOptions::default()
    };
    if let Some(d) = &s.cache_dir {
        opts.cache_dir = d.clone();
    }
    let rc = Arc::new(RemoteCheckpoint::open(&url, &opts)?);
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let owner = Ownership {
        uid,
        gid,
        mode: 0o600,
        mtime: SystemTime::now(),
    };
    let state = rc.vmm_state().to_vec();
    Ok((rc, owner, state))
}

/// Mark the manifest's loading set as loading (so the sweep waits for it);
/// false if there is none.
pub fn begin_loading_set(shared: &Shared, rc: &RemoteCheckpoint) -> bool {
    let Some(runs) = rc.loading_set() else {
        return false;
    };
    let st = &shared.loadset;
    lock(&st.text).0 = format!("{} (loading set)", rc.object());
    let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
    let data: u64 = runs
        .iter()
        .filter(|r| !r.zero)
        .map(|r| u64::from(r.pages))
        .sum();
    stats::add(&st.pages, pages);
    stats::add(&st.data_bytes, data * PAGE_SIZE as u64);
    st.set_state(LoadState::Loading);
    info!(
        "mountd: loading set of {}: {pages} pages to push first",
        rc.object()
    );
    true
}

/// Push the loading set on a thread of its own; `done` runs at the end.
pub fn start_loader(
    shared: Arc<Shared>,
    rc: Arc<RemoteCheckpoint>,
    memory: PathBuf,
    done: Box<dyn FnOnce() + Send>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("ckptfs-loadset".into())
        .spawn(move || {
            load(&shared, &rc, &memory);
            done();
        })
}

fn now_us(shared: &Shared) -> u64 {
    shared.started.elapsed().as_micros() as u64
}

fn load(shared: &Shared, rc: &RemoteCheckpoint, memory: &Path) {
    let st = &shared.loadset;
    st.started_us.store(now_us(shared), Ordering::Relaxed);
    rc.prefetch_loading_set();
    let result = File::open(memory)
        .map_err(|e| format!("cannot open {}: {e}", memory.display()))
        .and_then(|held| {
            let r = with_class(Class::LoadingSet, || push_runs(shared, rc));
            drop(held);
            r
        });
    if shared.config.policy.background() {
        rc.prefetch_rest();
    }
    match result {
        Ok(()) => st.set_state(LoadState::Done),
        Err(why) => {
            warn!("mountd: loading set not pushed in full: {why}");
            lock(&st.text).1 = why;
            st.set_state(LoadState::Refused);
        }
    }
    st.finished_us
        .store(now_us(shared).max(1), Ordering::Release);
    let snap = st.snapshot();
    info!(
        "mountd: loading set {:?}: pushed {} MiB in {:.2} s",
        snap.state,
        snap.pushed_bytes >> 20,
        snap.seconds.unwrap_or(0.0)
    );
}

/// Every run, in first-touch order, read through the source (its packs are
/// on the way) and stored into the page cache.
fn push_runs(shared: &Shared, rc: &RemoteCheckpoint) -> Result<(), String> {
    let runs = rc.loading_set().unwrap_or(&[]);
    let mut buf = Vec::new();
    for r in runs {
        let end = r.first_page + u64::from(r.pages);
        let mut p = r.first_page;
        while p < end {
            let n = PIECE_PAGES.min(end - p);
            buf.resize(n as usize * PAGE_SIZE, 0);
            if r.zero {
                buf.fill(0);
            } else {
                rc.read_pages(PageIndex(p), &mut buf)
                    .map_err(|e| crate::chain(&e))?;
                stats::add(&shared.loadset.read_bytes, buf.len() as u64);
            }
            let stored = shared.store_pages(p, &buf);
            stats::add(&shared.loadset.pushed_bytes, stored);
            p += n;
        }
    }
    Ok(())
}

/// With `--prefetch all` and no loading set to push first, start fetching
/// every pack in the background at once.
pub fn start_background(shared: &Shared, rc: &RemoteCheckpoint, loading: bool) {
    if !loading && shared.config.policy.background() {
        rc.prefetch_rest();
    }
}

/// Log what the remote source fetched (at unmount).
pub fn log_stats(rc: &RemoteCheckpoint) {
    let s = rc.fetch_stats();
    info!(
        "mountd: {}: {} GETs, {} MiB fetched, {} blocks from the cache ({} MiB held), {} failed attempts, {} blocks failed",
        rc.object(),
        s.requests.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed) >> 20,
        s.cache_hits.load(Ordering::Relaxed),
        rc.cache_bytes() >> 20,
        s.failed_attempts.load(Ordering::Relaxed),
        s.failed_blocks.load(Ordering::Relaxed)
    );
}
