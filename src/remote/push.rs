//! `ckptfs push VM.ckpt s3://BUCKET/PREFIX`: upload a checkpoint (and its
//! loading set) in the layout [`super::manifest`] describes.
//!
//! Named steps: open and (if it has parents) flatten the checkpoint, order
//! its stored pages (loading set first), cut them into packs, upload the
//! packs that are not there yet (a HEAD first: content-addressed names make
//! a present pack a shared one), and write the manifest last.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use object_store::{ObjectStoreExt, PutPayload, path::Path as ObjPath};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use super::manifest::{self, LoadingSetRecord, Manifest, PackRecord, Slot};
use super::store::{REQUEST_TIMEOUT, Store};
use super::{RemoteError, pack};
use crate::checkpoint::{Checkpoint, OpenOptions, PageSource};
use crate::format::{CheckpointWriter, Location};
use crate::loadset::{LoadSetError, LoadingSet};
use crate::types::{BlobIndex, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// Packs uploaded at once.
pub const PARALLEL_UPLOADS: usize = 8;

/// Options of [`push`].
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// The loading set to push [default: `VM.ckpt.ls` when it exists].
    pub loading_set: Option<PathBuf>,
    /// Push no loading set.
    pub no_loading_set: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What a push did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PushSummary {
    /// Where it went.
    pub url: String,
    /// Guest pages.
    pub pages: u64,
    /// Stored pages (blobs) in the checkpoint.
    pub stored_pages: u64,
    /// Packs the checkpoint's pages make.
    pub packs: u64,
    /// Packs uploaded.
    pub packs_uploaded: u64,
    /// Bytes uploaded in packs.
    pub bytes_uploaded: u64,
    /// Packs already in the store (shared with an earlier push).
    pub packs_skipped: u64,
    /// Bytes not uploaded because their pack was there.
    pub bytes_skipped: u64,
    /// Size of the manifest object.
    pub manifest_bytes: u64,
    /// Loading-set pages (stored and zero), if one was pushed.
    pub loading_set_pages: Option<u64>,
    /// Packs holding the loading set.
    pub loading_set_packs: u64,
    /// A loading set that exists but was not pushed, and why.
    pub loading_set_warning: Option<String>,
    /// The checkpoint had parents and was pushed flattened.
    pub flattened: bool,
    /// Wall time.
    pub seconds: f64,
}

/// Upload `path` to `store`'s location.
pub fn push(path: &Path, store: &Store, opts: &PushOptions) -> Result<PushSummary, RemoteError> {
    let t0 = Instant::now();
    let open = OpenOptions {
        skip_fingerprint: true,
        allow_missing: true,
        ..OpenOptions::default()
    };
    let original = Checkpoint::open_with(path, &open)?;
    let (loading_set, ls_warning) = open_loading_set(path, &original, opts);
    let flat_dir;
    let (ck, flattened) = if original.parent_records().is_empty() {
        (original, false)
    } else {
        flat_dir = tempfile::Builder::new()
            .prefix(".ckptfs-push")
            .tempdir_in(
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )
            .map_err(RemoteError::io(path))?;
        let flat = flat_dir.path().join("flat.ckpt");
        flatten(&original, &flat)?;
        (Checkpoint::open_with(&flat, &open)?, true)
    };
    let file = File::open(ck.path()).map_err(RemoteError::io(ck.path()))?;
    let order = blob_order(&ck, loading_set.as_ref());
    let crcs = blob_crcs(&ck)?;
    let hashes = page_hashes(&ck, &file, &order.blobs)?;
    let ranges = pack::cut(&hashes, order.loadset_blobs);
    let mut summary = PushSummary {
        url: store.url().to_string(),
        pages: ck.page_count(),
        stored_pages: ck.header().blob_count,
        packs: ranges.len() as u64,
        loading_set_pages: loading_set
            .as_ref()
            .map(|l| l.runs.iter().map(|r| u64::from(r.pages)).sum()),
        loading_set_warning: ls_warning,
        flattened,
        ..PushSummary::default()
    };
    let bar = super::packs_bar(opts.progress, ranges.len() as u64, "pushing");
    let mut packs = Vec::with_capacity(ranges.len());
    let mut slots = vec![Slot { pack: 0, index: 0 }; order.blobs.len()];
    let mut uploads = Vec::new();
    summary.loading_set_packs = order.loadset_packs(&ranges) as u64;
    let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL_UPLOADS));
    for (k, r) in ranges.iter().enumerate() {
        let blobs = &order.blobs[r.clone()];
        let data = read_pack(&ck, &file, blobs, &crcs)?;
        let rec = PackRecord {
            pages: blobs.len() as u32,
            hash: xxh3_128(&data),
        };
        for (i, b) in blobs.iter().enumerate() {
            slots[b.0 as usize] = Slot {
                pack: k as u32,
                index: i as u32,
            };
        }
        packs.push(rec);
        let permit = store
            .run(REQUEST_TIMEOUT, permits.clone().acquire_owned())
            .and_then(Result::ok);
        let up = upload_pack(
            store.inner().clone(),
            store.object(&rec.key()),
            rec,
            data,
            permit,
        );
        uploads.push(store.handle().spawn(up));
    }
    for u in uploads {
        let res = store
            .run(REQUEST_TIMEOUT * 6, u)
            .ok_or_else(|| RemoteError::Timeout {
                object: store.object(manifest::PACK_ROOT),
            })?;
        bar.inc(1);
        match res.expect("upload task does not panic")? {
            (true, n) => {
                summary.packs_uploaded += 1;
                summary.bytes_uploaded += n;
            }
            (false, n) => {
                summary.packs_skipped += 1;
                summary.bytes_skipped += n;
            }
        }
    }
    bar.finish_and_clear();
    let m = Manifest {
        file_len: ck.file_size(),
        file_hash: super::file_hash(&file, ck.path(), ck.file_size())?,
        front: read_at(&file, ck.path(), 0, ck.header().blobs_offset)?,
        state: ck.vmm_state().to_vec(),
        packs,
        blobs: slots,
        loading_set,
        loadset_packs: summary.loading_set_packs as u32,
    };
    summary.manifest_bytes = put_manifest(store, m.encode())?;
    summary.seconds = t0.elapsed().as_secs_f64();
    log::info!(
        "push: {} -> {}: {} packs uploaded, {} skipped",
        path.display(),
        summary.url,
        summary.packs_uploaded,
        summary.packs_skipped
    );
    Ok(summary)
}

/// The loading set to push, or why the one there is not pushed.
fn open_loading_set(
    path: &Path,
    ck: &Checkpoint,
    opts: &PushOptions,
) -> (Option<LoadingSetRecord>, Option<String>) {
    if opts.no_loading_set {
        return (None, None);
    }
    let ls_path = opts.loading_set.clone().unwrap_or_else(|| {
        let mut p = path.as_os_str().to_owned();
        p.push(".ls");
        PathBuf::from(p)
    });
    match LoadingSet::open(&ls_path, ck) {
        Ok(set) => (
            Some(LoadingSetRecord {
                window_ms: set.header().window_ms,
                runs: set.runs().to_vec(),
            }),
            None,
        ),
        Err(LoadSetError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && opts.loading_set.is_none() =>
        {
            (None, None)
        }
        Err(e) => {
            let why = crate::checkpoint::error_chain(&e);
            log::warn!("push: not pushing the loading set: {why}");
            (None, Some(why))
        }
    }
}

/// Stored pages in push order: the loading set's first.
struct Order {
    blobs: Vec<BlobIndex>,
    loadset_blobs: usize,
}

impl Order {
    /// How many leading packs hold loading-set pages.
    fn loadset_packs(&self, ranges: &[std::ops::Range<usize>]) -> usize {
        ranges
            .iter()
            .filter(|r| r.end <= self.loadset_blobs)
            .count()
    }
}

fn blob_order(ck: &Checkpoint, ls: Option<&LoadingSetRecord>) -> Order {
    let n = ck.header().blob_count as usize;
    let mut placed = vec![false; n];
    let mut blobs = Vec::with_capacity(n);
    let runs = ls.map(|l| l.runs.as_slice()).unwrap_or(&[]);
    for r in runs.iter().filter(|r| !r.zero) {
        for p in r.first_page..r.first_page + u64::from(r.pages) {
            if let Ok(e) = ck.try_entry(PageIndex(p))
                && let PageSource::Blob(b) = e.source
                && !std::mem::replace(&mut placed[b.0 as usize], true)
            {
                blobs.push(b);
            }
        }
    }
    let loadset_blobs = blobs.len();
    blobs.extend(
        (0..n as u64)
            .map(BlobIndex)
            .filter(|b| !placed[b.0 as usize]),
    );
    Order {
        blobs,
        loadset_blobs,
    }
}

/// The CRC of every blob, from a page that references it (a blob no page
/// references is pushed unchecked: the format allows it, nothing reads it).
fn blob_crcs(ck: &Checkpoint) -> Result<Vec<Option<u32>>, RemoteError> {
    let mut crcs = vec![None; ck.header().blob_count as usize];
    for p in 0..ck.page_count() {
        let e = ck
            .try_entry(PageIndex(p))
            .map_err(|e| RemoteError::Unpushable {
                path: ck.path().to_owned(),
                what: e.to_string(),
            })?;
        if let PageSource::Blob(b) = e.source {
            crcs[b.0 as usize] = Some(e.crc);
        }
    }
    Ok(crcs)
}

fn read_at(file: &File, path: &Path, at: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, at)
        .map_err(RemoteError::io(path))?;
    Ok(buf)
}

fn blob_offset(ck: &Checkpoint, b: BlobIndex) -> u64 {
    ck.header().blobs_offset + b.0 * PAGE_SIZE_U64
}

fn page_hashes(ck: &Checkpoint, file: &File, order: &[BlobIndex]) -> Result<Vec<u64>, RemoteError> {
    let mut page = [0u8; PAGE_SIZE];
    order
        .iter()
        .map(|&b| {
            file.read_exact_at(&mut page, blob_offset(ck, b))
                .map_err(RemoteError::io(ck.path()))?;
            Ok(xxh3_64(&page))
        })
        .collect()
}

/// The bytes of a pack, every page checked against the CRC of a page that uses it.
fn read_pack(
    ck: &Checkpoint,
    file: &File,
    blobs: &[BlobIndex],
    crcs: &[Option<u32>],
) -> Result<Vec<u8>, RemoteError> {
    let mut data = vec![0u8; blobs.len() * PAGE_SIZE];
    for (page, &b) in data.chunks_exact_mut(PAGE_SIZE).zip(blobs) {
        file.read_exact_at(page, blob_offset(ck, b))
            .map_err(RemoteError::io(ck.path()))?;
        if crcs[b.0 as usize].is_some_and(|c| c != crc32fast::hash(page)) {
            return Err(RemoteError::Unpushable {
                path: ck.path().to_owned(),
                what: format!("blob {} does not match its CRC (damaged file)", b.0),
            });
        }
    }
    Ok(data)
}

/// Upload one pack unless an object of that name and size is there:
/// returns (uploaded, bytes).
async fn upload_pack(
    inner: Arc<dyn object_store::ObjectStore>,
    object: String,
    rec: PackRecord,
    data: Vec<u8>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(bool, u64), RemoteError> {
    let path = ObjPath::from(rec.key());
    let len = data.len() as u64;
    let fut = async move {
        let _permit = permit;
        let present = match inner.head(&path).await {
            Ok(meta) => meta.size == len,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        if !present {
            inner.put(&path, PutPayload::from(data)).await?;
        }
        Ok((!present, len))
    };
    fut.await
        .map_err(|source| RemoteError::Store { object, source })
}

fn put_manifest(store: &Store, bytes: Vec<u8>) -> Result<u64, RemoteError> {
    let key = store.url().key(manifest::MANIFEST_NAME);
    let object = store.object(&key);
    let inner = store.inner().clone();
    let len = bytes.len() as u64;
    let path = ObjPath::from(key);
    let fut = async move { inner.put(&path, PutPayload::from(bytes)).await };
    match store.run(REQUEST_TIMEOUT * 6, fut) {
        None => Err(RemoteError::Timeout { object }),
        Some(Err(source)) => Err(RemoteError::Store { object, source }),
        Some(Ok(_)) => Ok(len),
    }
}

/// Write `ck` (which has parents) as a checkpoint that stands alone: every
/// page its parents hold becomes a blob of its own (deduplicated).
fn flatten(ck: &Checkpoint, out: &Path) -> Result<(), RemoteError> {
    let unpushable = |what: String| RemoteError::Unpushable {
        path: ck.path().to_owned(),
        what,
    };
    let own_disks = ck.disk_records().len();
    let mut f = File::create(out).map_err(RemoteError::io(out))?;
    let mut w = CheckpointWriter::new(&mut f, ck.page_count(), ck.disk_records(), &[])
        .map_err(RemoteError::io(out))?;
    let mut seen: HashMap<u128, BlobIndex> = HashMap::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..ck.page_count() {
        let e = ck
            .try_entry(PageIndex(p))
            .map_err(|e| unpushable(e.to_string()))?;
        let loc = match e.source {
            PageSource::Zero => Location::Zero,
            PageSource::Disk { disk, offset } if usize::from(disk.0) < own_disks => {
                Location::Disk(disk, offset)
            }
            PageSource::Disk { .. } => {
                return Err(unpushable(format!(
                    "page {p} is on a disk only its parent references; re-create it with that disk"
                )));
            }
            PageSource::Blob(_) | PageSource::ParentBlob { .. } => {
                ck.read_pages(PageIndex(p), &mut page)
                    .map_err(|e| unpushable(crate::checkpoint::error_chain(&e)))?;
                let h = xxh3_128(&page);
                let b = match seen.get(&h) {
                    Some(&b) => b,
                    None => {
                        let b = w.push_blob(&page).map_err(RemoteError::io(out))?;
                        seen.insert(h, b);
                        b
                    }
                };
                Location::Blob(b)
            }
        };
        w.push(loc, e.crc);
    }
    w.finish(ck.vmm_state()).map_err(RemoteError::io(out))?;
    Ok(())
}
