//! Push, read, pull and faults against object_store's in-memory store,
//! wrapped to fail, truncate or count requests on demand.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use super::*;
use crate::checkpoint::ReadError;
use crate::synth::{self, Mix};
use crate::types::{PAGE_SIZE, PageIndex};
use crate::{CreateOptions, PageReader};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// GETs fail.
    Fail,
    /// GET bodies come back one byte short.
    Truncate,
}

/// InMemory with faults and counters.
#[derive(Debug)]
struct Faulty {
    inner: InMemory,
    fault: Mutex<Fault>,
    /// Fail every PUT after this many.
    puts_left: AtomicU64,
    gets: AtomicU64,
    get_bytes: AtomicU64,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty")
    }
}

impl Faulty {
    fn new() -> Arc<Self> {
        Arc::new(Faulty {
            inner: InMemory::new(),
            fault: Mutex::new(Fault::None),
            puts_left: AtomicU64::new(u64::MAX),
            gets: AtomicU64::new(0),
            get_bytes: AtomicU64::new(0),
        })
    }

    fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    fn err() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "injected failure: connection refused".into(),
        }
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, p: &ObjPath, b: PutPayload, o: PutOptions) -> Result<PutResult> {
        let left = self.puts_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(Self::err());
        }
        self.puts_left
            .store(left.saturating_sub(1), Ordering::SeqCst);
        self.inner.put_opts(p, b, o).await
    }
    async fn put_multipart_opts(
        &self,
        p: &ObjPath,
        o: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(p, o).await
    }
    async fn get_opts(&self, p: &ObjPath, o: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(p, o).await
    }
    async fn get_ranges(&self, p: &ObjPath, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let fault = *self.fault.lock().unwrap();
        if fault == Fault::Fail {
            return Err(Self::err());
        }
        let mut got = self.inner.get_ranges(p, ranges).await?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        let n: u64 = got.iter().map(|b| b.len() as u64).sum();
        self.get_bytes.fetch_add(n, Ordering::SeqCst);
        if fault == Fault::Truncate {
            let last = got.last_mut().unwrap();
            *last = last.slice(..last.len() - 1);
        }
        Ok(got)
    }
    fn delete_stream(
        &self,
        l: BoxStream<'static, Result<ObjPath>>,
    ) -> BoxStream<'static, Result<ObjPath>> {
        self.inner.delete_stream(l)
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(&self, f: &ObjPath, t: &ObjPath, o: CopyOptions) -> Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

struct Fx {
    dir: tempfile::TempDir,
    mem: Vec<u8>,
    ckpt: PathBuf,
}

/// A checkpoint of a mixed guest of `pages` pages.
fn fixture(pages: usize, seed: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let disk_data = synth::disk_image(512, seed);
    std::fs::write(&disk, &disk_data).unwrap();
    let plan = synth::plan(pages, 512, Mix::MIXED, seed);
    let mem = synth::memory_image(&plan, &disk_data, seed);
    let ckpt = dir.path().join("vm.ckpt");
    let opts = CreateOptions {
        disks: vec![disk],
        scan_disks: true,
        ..Default::default()
    };
    crate::create(&mem, &opts, &ckpt).unwrap();
    Fx { dir, mem, ckpt }
}

fn store_at(s: &Arc<Faulty>, prefix: &str) -> Store {
    let url = S3Url::parse(&format!("s3://test/{prefix}")).unwrap();
    Store::with_store(s.clone(), url).unwrap()
}

fn open(s: &Arc<Faulty>, prefix: &str, cache: &Path, retry: Duration) -> RemoteCheckpoint {
    let opts = RemoteOptions {
        cache_dir: cache.to_owned(),
        retry_for: retry,
        ..RemoteOptions::default()
    };
    RemoteCheckpoint::open_in(store_at(s, prefix), &opts).unwrap()
}

fn blob_page(rc: &RemoteCheckpoint) -> u64 {
    (0..rc.page_count())
        .find(|&p| {
            matches!(
                rc.entry(PageIndex(p)).unwrap().source,
                crate::PageSource::Blob(_)
            )
        })
        .unwrap()
}

#[test]
fn pushed_checkpoint_reads_back_every_page_and_pulls_byte_for_byte() {
    let fx = fixture(2048, 5);
    let s = Faulty::new();
    let sum = push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).unwrap();
    assert!(sum.packs_uploaded > 0 && sum.packs_skipped == 0, "{sum:?}");
    let rc = open(&s, "vm", &fx.dir.path().join("cache"), DEFAULT_RETRY);
    let mut got = vec![0u8; fx.mem.len()];
    rc.read_pages(PageIndex(0), &mut got).unwrap();
    assert!(got == fx.mem, "rebuilt memory differs");
    assert_eq!(
        rc.identity(),
        crate::Checkpoint::open(&fx.ckpt).unwrap().identity()
    );
    let out = fx.dir.path().join("pulled.ckpt");
    pull(&store_at(&s, "vm"), &out, &PullOptions::default()).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&fx.ckpt).unwrap());
}

#[test]
fn a_read_fetches_blocks_not_pages_and_a_second_open_starts_warm() {
    let fx = fixture(2048, 6);
    let s = Faulty::new();
    push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).unwrap();
    let cache = fx.dir.path().join("cache");
    let rc = open(&s, "vm", &cache, DEFAULT_RETRY);
    let before = s.get_bytes.load(Ordering::SeqCst);
    let p = blob_page(&rc);
    let mut page = vec![0u8; PAGE_SIZE];
    rc.read_pages(PageIndex(p), &mut page).unwrap();
    let fetched = s.get_bytes.load(Ordering::SeqCst) - before;
    assert!(
        fetched > PAGE_SIZE as u64,
        "one page fetched alone ({fetched} bytes)"
    );
    assert!(
        fetched <= cache::BLOCK_PAGES as u64 * 4096,
        "{fetched} bytes for one page"
    );
    let mut all = vec![0u8; fx.mem.len()];
    rc.read_pages(PageIndex(0), &mut all).unwrap();
    drop(rc);
    let gets = s.gets.load(Ordering::SeqCst);
    let rc = open(&s, "vm", &cache, DEFAULT_RETRY);
    rc.read_pages(PageIndex(0), &mut all).unwrap();
    assert!(all == fx.mem);
    assert_eq!(
        s.gets.load(Ordering::SeqCst),
        gets,
        "the second open fetched"
    );
}

#[test]
fn a_failing_store_fails_exactly_the_pages_it_holds_then_recovers() {
    let fx = fixture(2048, 7);
    let s = Faulty::new();
    push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).unwrap();
    let rc = open(
        &s,
        "vm",
        &fx.dir.path().join("cache"),
        Duration::from_millis(300),
    );
    s.set(Fault::Fail);
    let p = blob_page(&rc);
    let mut page = vec![0u8; PAGE_SIZE];
    let err = rc.read_pages(PageIndex(p), &mut page).unwrap_err();
    let text = crate::checkpoint::error_chain(&err);
    assert!(matches!(err, ReadError::Remote { .. }), "{text}");
    assert!(
        text.contains("s3://test/ckptfs-packs/") && text.contains("connection refused"),
        "{text}"
    );
    // Pages that are not stored still read: zero and disk pages need no store.
    for q in (0..rc.page_count()).filter(|&q| {
        !matches!(
            rc.entry(PageIndex(q)).unwrap().source,
            crate::PageSource::Blob(_)
        )
    }) {
        rc.read_pages(PageIndex(q), &mut page).unwrap();
        assert!(page[..] == fx.mem[q as usize * PAGE_SIZE..][..PAGE_SIZE]);
    }
    s.set(Fault::None);
    std::thread::sleep(fetch::FAIL_MEMO);
    rc.read_pages(PageIndex(p), &mut page).unwrap();
    assert!(page[..] == fx.mem[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
}

#[test]
fn truncated_bodies_are_refused_never_served() {
    let fx = fixture(1024, 8);
    let s = Faulty::new();
    push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).unwrap();
    let rc = open(
        &s,
        "vm",
        &fx.dir.path().join("cache"),
        Duration::from_millis(300),
    );
    s.set(Fault::Truncate);
    let p = blob_page(&rc);
    let mut page = vec![0u8; PAGE_SIZE];
    let err = rc.read_pages(PageIndex(p), &mut page).unwrap_err();
    assert!(
        crate::checkpoint::error_chain(&err).contains("truncated body"),
        "{err}"
    );
    s.set(Fault::None);
    std::thread::sleep(fetch::FAIL_MEMO);
    rc.read_pages(PageIndex(p), &mut page).unwrap();
    assert!(page[..] == fx.mem[p as usize * PAGE_SIZE..][..PAGE_SIZE]);
}

#[test]
fn an_interrupted_push_leaves_no_checkpoint() {
    let fx = fixture(2048, 9);
    let s = Faulty::new();
    s.puts_left.store(1, Ordering::SeqCst);
    assert!(push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).is_err());
    let err = fetch_manifest(&store_at(&s, "vm")).unwrap_err();
    assert!(matches!(err, RemoteError::NoManifest { .. }), "{err}");
}

#[test]
fn shared_pages_upload_once() {
    let fx = fixture(8192, 10);
    let s = Faulty::new();
    let a = push(&fx.ckpt, &store_at(&s, "a"), &PushOptions::default()).unwrap();
    // The same guest a little later: a few pages in one place changed.
    let mut mem = fx.mem.clone();
    for p in [4000usize, 4001, 4002] {
        mem[p * PAGE_SIZE..][..PAGE_SIZE].fill(p as u8 ^ 0x5a);
    }
    let later = fx.dir.path().join("later.ckpt");
    let opts = CreateOptions {
        disks: vec![fx.dir.path().join("disk.img")],
        scan_disks: true,
        ..Default::default()
    };
    crate::create(&mem, &opts, &later).unwrap();
    let b = push(&later, &store_at(&s, "b"), &PushOptions::default()).unwrap();
    assert!(a.packs >= 4, "{a:?}");
    assert!(
        b.bytes_skipped >= b.bytes_uploaded,
        "most of the later checkpoint was already there: {b:?}"
    );
}

#[test]
fn the_loading_set_is_pushed_first_and_contiguous() {
    let fx = fixture(4096, 11);
    let ck = crate::Checkpoint::open(&fx.ckpt).unwrap();
    let touches: Vec<(u64, u32, bool)> = (3000..3400u64)
        .chain(10..200)
        .map(|p| (p, 0, ck.is_zero(PageIndex(p))))
        .collect();
    let runs = crate::loadset::runs_from_touches(&touches);
    let ls = fx.dir.path().join("vm.ckpt.ls");
    crate::loadset::write(&ls, &ck, &runs, 1000, 0o600).unwrap();
    let s = Faulty::new();
    let sum = push(&fx.ckpt, &store_at(&s, "vm"), &PushOptions::default()).unwrap();
    assert!(
        sum.loading_set_pages == Some(590) && sum.loading_set_packs >= 1,
        "{sum:?}"
    );
    let rc = open(&s, "vm", &fx.dir.path().join("cache"), DEFAULT_RETRY);
    let m = rc.manifest();
    for p in (3000..3400u64).chain(10..200) {
        if let crate::PageSource::Blob(b) = rc.entry(PageIndex(p)).unwrap().source {
            assert!(m.blobs[b.0 as usize].pack < m.loadset_packs, "page {p}");
        }
    }
    let pulled = fx.dir.path().join("p.ckpt");
    let sum = pull(&store_at(&s, "vm"), &pulled, &PullOptions::default()).unwrap();
    assert!(sum.loading_set.is_some(), "{sum:?}");
    assert!(std::fs::read(fx.dir.path().join("p.ckpt.ls")).unwrap() == std::fs::read(&ls).unwrap());
}
