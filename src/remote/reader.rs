//! [`RemoteCheckpoint`]: a pushed checkpoint as a [`PageReader`].
//!
//! Opening costs one GET (the manifest) and the checks a local open does:
//! the disk images are opened and their format, size and fingerprint checked
//! (`--disk` maps them when the paths differ on this host). A read rebuilds
//! ZERO pages from nothing, DISK pages from the local images (adjacent ones in
//! one pread), and stored pages from 256 KiB blocks of their packs: from the
//! on-disk cache, or fetched (see [`super::fetch`]); every page is checked
//! against its CRC, so a read returns the right bytes or an error naming the
//! page and the object, never wrong bytes.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::cache::{BLOCK_PAGES, DiskCache};
use super::fetch::{self, Class, FetchFailure};
use super::manifest::{self, Checked};
use super::store::Store;
use super::{RemoteError, S3Url, fetch_manifest};
use crate::checkpoint::{PageEntry, PageSource, ReadCounts, ReadError};
use crate::disk::DiskImage;
use crate::format::{self, DiskRecord, ENTRY_LEN, HEADER_LEN, Header, Location};
use crate::loadset::Run;
use crate::source::PageReader;
use crate::types::{DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// Default bound of the on-disk cache: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Default time a read keeps retrying a store that fails.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(8);

/// How to open a remote checkpoint.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// Use these disk images instead of the recorded paths (same order and count).
    pub disk_override: Option<Vec<PathBuf>>,
    /// Open even when a disk image is missing or changed (its pages then fail).
    pub allow_missing: bool,
    /// The on-disk block cache.
    pub cache_dir: PathBuf,
    /// Its bound in bytes.
    pub cache_bytes: u64,
    /// How long a read retries a failing store before it fails.
    pub retry_for: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            disk_override: None,
            allow_missing: false,
            cache_dir: PathBuf::from(super::cache::DEFAULT_DIR),
            cache_bytes: DEFAULT_CACHE_BYTES,
            retry_for: DEFAULT_RETRY,
        }
    }
}

/// A checkpoint pushed to an object store, served lazily.
pub struct RemoteCheckpoint {
    checked: Checked,
    object: String,
    disks: Vec<Option<DiskImage>>,
    missing: Vec<(PathBuf, String)>,
    fetch: Arc<fetch::Shared>,
    // Last: the runtime stops after nothing can use it any more.
    store: Store,
}

impl std::fmt::Debug for RemoteCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCheckpoint")
            .field("manifest", &self.object)
            .finish()
    }
}

impl RemoteCheckpoint {
    /// Open `url` with the store from the environment.
    pub fn open(url: &S3Url, opts: &RemoteOptions) -> Result<Self, RemoteError> {
        Self::open_in(Store::from_env(url)?, opts)
    }

    /// Open the checkpoint at `store`'s location.
    pub fn open_in(store: Store, opts: &RemoteOptions) -> Result<Self, RemoteError> {
        let checked = fetch_manifest(&store)?;
        let object = store.object(&store.url().key(manifest::MANIFEST_NAME));
        let cache = DiskCache::open(&opts.cache_dir, opts.cache_bytes)
            .map_err(RemoteError::io(&opts.cache_dir))?;
        let fetch = fetch::Shared::new(
            store.inner().clone(),
            store.url().bucket.clone(),
            checked.manifest.packs.clone(),
            cache,
            opts.retry_for,
        );
        let mut ck = RemoteCheckpoint {
            checked,
            object,
            disks: Vec::new(),
            missing: Vec::new(),
            fetch,
            store,
        };
        ck.open_disks(opts)?;
        log::info!(
            "remote: opened {} ({} pages, {} packs)",
            ck.object,
            ck.checked.header.page_count,
            ck.checked.manifest.packs.len()
        );
        Ok(ck)
    }

    fn open_disks(&mut self, opts: &RemoteOptions) -> Result<(), RemoteError> {
        let records = self.checked.disks.clone();
        if let Some(o) = &opts.disk_override
            && o.len() != records.len()
        {
            return Err(RemoteError::Corrupt {
                object: self.object.clone(),
                what: format!(
                    "{} disk images given, the checkpoint references {}",
                    o.len(),
                    records.len()
                ),
            });
        }
        for (i, r) in records.iter().enumerate() {
            let p = opts.disk_override.as_ref().map_or(&r.path, |o| &o[i]);
            let opened = DiskImage::open(p).and_then(|image| {
                image.check(r, true)?;
                Ok(image)
            });
            match opened {
                Ok(image) => self.disks.push(Some(image)),
                Err(e) if opts.allow_missing => {
                    self.missing
                        .push((r.path.clone(), crate::checkpoint::error_chain(&e)));
                    self.disks.push(None);
                }
                Err(source) => {
                    return Err(RemoteError::Disk {
                        object: self.object.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The manifest's object name.
    pub fn object(&self) -> &str {
        &self.object
    }

    /// The checkpoint's header.
    pub fn header(&self) -> &Header {
        &self.checked.header
    }

    /// The disk table.
    pub fn disk_records(&self) -> &[DiskRecord] {
        &self.checked.disks
    }

    /// Disks that an `allow_missing` open could not use: (recorded path, why).
    pub fn missing(&self) -> &[(PathBuf, String)] {
        &self.missing
    }

    /// The manifest.
    pub fn manifest(&self) -> &manifest::Manifest {
        &self.checked.manifest
    }

    /// The VMM-state section.
    pub fn vmm_state(&self) -> &[u8] {
        &self.checked.manifest.state
    }

    /// The pushed loading set's runs, if any.
    pub fn loading_set(&self) -> Option<&[Run]> {
        self.checked
            .manifest
            .loading_set
            .as_ref()
            .map(|l| l.runs.as_slice())
    }

    /// Start fetching the loading set's packs, all at once (bounded), in the
    /// background; reads of their pages then join those fetches.
    pub fn prefetch_loading_set(&self) {
        let n = self.checked.manifest.loadset_packs;
        fetch::prefetch_packs(&self.fetch, self.store.handle(), 0..n, Class::LoadingSet);
    }

    /// Start fetching every pack after the loading set's, whole, in the
    /// background class (two at a time, never ahead of a demand read), into
    /// the on-disk cache: "the rest in the background".
    pub fn prefetch_rest(&self) {
        let m = &self.checked.manifest;
        let range = m.loadset_packs..m.packs.len() as u32;
        fetch::prefetch_packs(&self.fetch, self.store.handle(), range, Class::Background);
    }

    /// Start fetching every pack (for `verify` and `pull`-like full reads).
    pub fn prefetch_all(&self, class: Class) {
        let n = self.checked.manifest.packs.len() as u32;
        fetch::prefetch_packs(&self.fetch, self.store.handle(), 0..n, class);
    }

    /// Fetch counters.
    pub fn fetch_stats(&self) -> &fetch::FetchStats {
        &self.fetch.stats
    }

    /// Bytes held by the on-disk cache.
    pub fn cache_bytes(&self) -> u64 {
        self.fetch.cache().bytes()
    }

    fn raw_entry(&self, page: u64) -> &[u8] {
        let at = self.checked.header.table_offset as usize + page as usize * ENTRY_LEN;
        &self.checked.manifest.front[at..at + ENTRY_LEN]
    }

    fn location(&self, page: PageIndex) -> Result<(Location, u32), ReadError> {
        let bad = |what: String| ReadError::BadEntry { page, what };
        if page.0 >= self.checked.header.page_count {
            return Err(bad("page outside guest memory".into()));
        }
        let (loc, crc) =
            format::decode_entry(self.raw_entry(page.0), page.0).map_err(|e| bad(e.to_string()))?;
        match loc {
            Location::Disk(d, off) => {
                let r = self
                    .checked
                    .disks
                    .get(usize::from(d.0))
                    .ok_or_else(|| bad(format!("disk index {} out of range", d.0)))?;
                if off.0.checked_add(PAGE_SIZE_U64).is_none_or(|e| e > r.size) {
                    return Err(bad(format!(
                        "{off} is past the end of {}",
                        r.path.display()
                    )));
                }
            }
            Location::Blob(b) if b.0 >= self.checked.header.blob_count => {
                return Err(bad(format!("blob {} out of range", b.0)));
            }
            Location::Parent(_) => return Err(bad("PARENT entry in a pushed checkpoint".into())),
            Location::Zero | Location::Blob(_) => {}
        }
        Ok((loc, crc))
    }

    fn read_disk(
        &self,
        page: PageIndex,
        disk: DiskIndex,
        off: DiskOffset,
        buf: &mut [u8],
    ) -> Result<(), ReadError> {
        let slot = usize::from(disk.0);
        let r = match &self.disks[slot] {
            Some(image) => image.read_exact_at(buf, off.0),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the disk image could not be opened",
            )),
        };
        r.map_err(|source| ReadError::DiskRead {
            page,
            disk: self.checked.disks[slot].path.clone(),
            source,
        })
    }

    fn check_crc(
        &self,
        page: PageIndex,
        bytes: &[u8],
        crc: u32,
        from: &str,
    ) -> Result<(), ReadError> {
        let actual = crc32fast::hash(bytes);
        if actual != crc {
            return Err(ReadError::CrcMismatch {
                page,
                expected: crc,
                actual,
                source_name: from.to_owned(),
            });
        }
        Ok(())
    }

    /// Fill the stored pages of a read: fetch their blocks (all at once),
    /// copy and check each page. `stored` is (offset in `out`, page, blob slot, crc).
    fn fill_stored(
        &self,
        out: &mut [u8],
        stored: &[(usize, PageIndex, manifest::Slot, u32)],
        counts: &mut ReadCounts,
    ) -> Result<(), ReadError> {
        if stored.is_empty() {
            return Ok(());
        }
        let mut wanted: Vec<(u32, u32)> = stored
            .iter()
            .map(|(_, _, s, _)| (s.pack, s.index / BLOCK_PAGES))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let class = fetch::current_class();
        let mut blocks = fetch::get_blocks(&self.fetch, self.store.handle(), &wanted, class);
        let mut retried = false;
        for &(at, page, slot, crc) in stored {
            let k = wanted
                .binary_search(&(slot.pack, slot.index / BLOCK_PAGES))
                .expect("block was asked for");
            let bytes = page_of(&blocks[k], slot).map_err(|f| remote_error(page, f))?;
            let dst = &mut out[at..at + PAGE_SIZE];
            dst.copy_from_slice(&bytes);
            if self.check_crc(page, dst, crc, "").is_err() && !retried {
                // A damaged cached block: drop it and fetch it once more.
                retried = true;
                self.fetch.forget(slot.pack, slot.index / BLOCK_PAGES);
                let again =
                    fetch::get_blocks(&self.fetch, self.store.handle(), &[wanted[k]], class);
                blocks[k] = again.into_iter().next().expect("one block");
                let bytes = page_of(&blocks[k], slot).map_err(|f| remote_error(page, f))?;
                dst.copy_from_slice(&bytes);
            }
            self.check_crc(page, dst, crc, &self.fetch.object(slot.pack))?;
            counts.blob_bytes += PAGE_SIZE_U64;
        }
        Ok(())
    }
}

fn page_of(
    block: &Result<Bytes, FetchFailure>,
    slot: manifest::Slot,
) -> Result<Bytes, FetchFailure> {
    let b = block.as_ref().map_err(Clone::clone)?;
    let at = (slot.index % BLOCK_PAGES) as usize * PAGE_SIZE;
    if b.len() < at + PAGE_SIZE {
        return Err(FetchFailure {
            object: String::new(),
            what: "block shorter than its pages".into(),
        });
    }
    Ok(b.slice(at..at + PAGE_SIZE))
}

fn remote_error(page: PageIndex, f: FetchFailure) -> ReadError {
    ReadError::Remote {
        page,
        object: f.object,
        source: io::Error::other(f.what),
    }
}

impl PageReader for RemoteCheckpoint {
    fn page_count(&self) -> u64 {
        self.checked.header.page_count
    }

    fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        let n = (out.len() / PAGE_SIZE) as u64;
        let end = first.0.saturating_add(n);
        if !out.len().is_multiple_of(PAGE_SIZE) || end > self.page_count() {
            return Err(ReadError::OutOfRange {
                first: first.0,
                end,
                pages: self.page_count(),
            });
        }
        let mut counts = ReadCounts::default();
        let mut stored = Vec::new();
        let mut i = 0u64;
        while i < n {
            let page = PageIndex(first.0 + i);
            let at = i as usize * PAGE_SIZE;
            let (loc, crc) = self.location(page)?;
            match loc {
                Location::Zero => {
                    out[at..at + PAGE_SIZE].fill(0);
                    self.check_crc(page, &out[at..at + PAGE_SIZE], crc, "zero")?;
                    counts.zero_bytes += PAGE_SIZE_U64;
                    i += 1;
                }
                Location::Blob(b) => {
                    stored.push((at, page, self.checked.manifest.blobs[b.0 as usize], crc));
                    i += 1;
                }
                Location::Disk(d, off) => {
                    let run = self.disk_run(page, d, off, n - i)?;
                    let len = run as usize * PAGE_SIZE;
                    self.read_disk(page, d, off, &mut out[at..at + len])?;
                    for k in 0..run {
                        let p = PageIndex(page.0 + k);
                        let bytes = &out[at + k as usize * PAGE_SIZE..][..PAGE_SIZE];
                        let crc = format::get_u32(self.raw_entry(p.0), 8);
                        let from = format!(
                            "disk image {} at {}",
                            self.checked.disks[usize::from(d.0)].path.display(),
                            DiskOffset(off.0 + k * PAGE_SIZE_U64)
                        );
                        self.check_crc(p, bytes, crc, &from)?;
                    }
                    counts.disk_bytes += len as u64;
                    counts.disk_reads += 1;
                    i += run;
                }
                Location::Parent(_) => unreachable!("refused by location()"),
            }
        }
        self.fill_stored(out, &stored, &mut counts)?;
        Ok(counts)
    }

    fn entry(&self, page: PageIndex) -> Result<PageEntry, ReadError> {
        if page.0 >= self.page_count() {
            return Err(ReadError::OutOfRange {
                first: page.0,
                end: page.0 + 1,
                pages: self.page_count(),
            });
        }
        let (loc, crc) = self.location(page)?;
        let source = match loc {
            Location::Zero => PageSource::Zero,
            Location::Disk(disk, offset) => PageSource::Disk { disk, offset },
            Location::Blob(b) => PageSource::Blob(b),
            Location::Parent(_) => unreachable!("refused by location()"),
        };
        Ok(PageEntry { source, crc })
    }

    fn identity(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.checked.manifest.front[..HEADER_LEN])
    }
}

impl RemoteCheckpoint {
    /// How many pages from `page` (at most `max`) continue a disk run.
    fn disk_run(
        &self,
        page: PageIndex,
        d: DiskIndex,
        off: DiskOffset,
        max: u64,
    ) -> Result<u64, ReadError> {
        let mut run = 1;
        while run < max {
            let next = PageIndex(page.0 + run);
            let want = Location::Disk(d, DiskOffset(off.0 + run * PAGE_SIZE_U64));
            if self.location(next)?.0 != want {
                break;
            }
            run += 1;
        }
        Ok(run)
    }
}
