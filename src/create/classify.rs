//! Deciding what each page is: ZERO, PARENT, DISK (hinted or found by the
//! scan, confirmed byte for byte) or BLOB (deduplicated), and counting.

use std::time::Instant;

use nohash_hasher::IntMap;

use super::{CreateError, CreateOptions, Inputs, Summary};
use crate::checkpoint::{Checkpoint, PageSource};
use crate::format::{self, Location};
use crate::pageset::PageSet;
use crate::scan::{self, ContentIndex, IndexReport, ScanDisk};
use crate::types::{
    BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PageIndex, ParentIndex, SECTOR_SIZE,
};

/// What a page turned out to be.
pub(super) enum Found {
    /// A location that stores nothing new.
    At(Location),
    /// New content, to be stored as a blob (its key given for deduplication).
    NewBlob(u64),
}

/// Decides what each page is, and counts.
pub(super) struct Classifier<'a> {
    mem: &'a [u8],
    disks: &'a [ScanDisk<'a>],
    index: Option<ContentIndex>,
    hints: IntMap<u64, (DiskIndex, DiskOffset)>,
    parent: Option<&'a Checkpoint>,
    changed: Option<&'a PageSet>,
    blob_index: IntMap<u64, (BlobIndex, PageIndex)>,
    buf: Box<[u8; PAGE_SIZE]>,
    pub(super) summary: Summary,
}

impl<'a> Classifier<'a> {
    pub(super) fn new(
        mem: &'a [u8],
        disks: &'a [ScanDisk<'a>],
        index: Option<(ContentIndex, IndexReport)>,
        opts: &'a CreateOptions,
        inputs: &'a Inputs,
    ) -> Self {
        let (index, report) = index.unzip();
        let summary = Summary {
            pages: (mem.len() / PAGE_SIZE) as u64,
            guest_bytes: mem.len() as u64,
            disk_windows_indexed: report.as_ref().map_or(0, |r| r.windows),
            index_seconds: report.as_ref().map_or(0.0, |r| r.seconds),
            index: report,
            ..Summary::default()
        };
        Classifier {
            mem,
            disks,
            index,
            hints: opts
                .hints
                .iter()
                .map(|h| (h.page.0, (h.disk, h.offset)))
                .collect(),
            parent: inputs.parent.as_ref().map(|(ck, _)| ck),
            changed: opts.changed.as_ref(),
            blob_index: IntMap::default(),
            buf: Box::new([0u8; PAGE_SIZE]),
            summary,
        }
    }

    pub(super) fn classify(&mut self, page: PageIndex, data: &[u8], crc: u32) -> Found {
        if scan::is_zero(data) {
            return Found::At(Location::Zero);
        }
        if self.same_as_parent(page, data, crc) {
            return Found::At(Location::Parent(ParentIndex(0)));
        }
        if let Some(loc) = self.hinted(page, data) {
            return Found::At(loc);
        }
        let key = scan::page_key(data);
        if let Some(loc) = self.scanned(key, data) {
            return Found::At(loc);
        }
        self.blob(key, data)
    }

    /// A page the caller vouches is the parent's ([`CreateOptions::changed`]
    /// leaves it out): its entry, taken from the parent's page table without
    /// reading a byte. None for a page that must be classified.
    pub(super) fn unchanged(
        &mut self,
        page: PageIndex,
    ) -> Option<Result<(Location, u32), CreateError>> {
        let (Some(changed), Some(parent)) = (self.changed, self.parent) else {
            return None;
        };
        if changed.contains(page) {
            return None;
        }
        self.summary.unchanged_pages += 1;
        Some(match parent.try_entry(page) {
            Ok(e) if e.source == PageSource::Zero => Ok((Location::Zero, e.crc)),
            Ok(e) => Ok((Location::Parent(ParentIndex(0)), e.crc)),
            Err(source) => Err(CreateError::ParentEntry {
                page,
                parent: parent.path().to_owned(),
                source,
            }),
        })
    }

    /// The parent's same page has the same CRC, then the same bytes.
    fn same_as_parent(&mut self, page: PageIndex, data: &[u8], crc: u32) -> bool {
        let Some(parent) = self.parent else {
            return false;
        };
        if page.0 >= parent.page_count() || parent.try_entry(page).ok().map(|e| e.crc) != Some(crc)
        {
            return false;
        }
        let buf = &mut self.buf[..];
        parent.read_pages(page, buf).is_ok() && buf == data
    }

    fn disk_window(&mut self, disk: DiskIndex, offset: DiskOffset) -> Option<&[u8]> {
        self.disks
            .get(usize::from(disk.0))?
            .window(offset.0, &mut self.buf)
    }

    fn hinted(&mut self, page: PageIndex, data: &[u8]) -> Option<Location> {
        let &(disk, offset) = self.hints.get(&page.0)?;
        let ok = offset.0.is_multiple_of(SECTOR_SIZE)
            && offset.0 < format::MAX_DISK_OFFSET
            && self.disk_window(disk, offset) == Some(data);
        if ok {
            self.summary.hints_verified += 1;
            Some(Location::Disk(disk, offset))
        } else {
            self.summary.hints_rejected += 1;
            None
        }
    }

    fn scanned(&mut self, key: u64, data: &[u8]) -> Option<Location> {
        let (disk, offset) = self.index.as_ref()?.get(key)?;
        (self.disk_window(disk, offset)? == data).then_some(Location::Disk(disk, offset))
    }

    fn blob(&self, key: u64, data: &[u8]) -> Found {
        if let Some(&(idx, first)) = self.blob_index.get(&key) {
            let start = first.0 as usize * PAGE_SIZE;
            if &self.mem[start..start + PAGE_SIZE] == data {
                return Found::At(Location::Blob(idx));
            }
        }
        Found::NewBlob(key)
    }

    pub(super) fn remember_blob(&mut self, key: u64, b: BlobIndex, page: PageIndex) {
        self.blob_index.entry(key).or_insert((b, page));
        self.summary.blobs_stored += 1;
    }

    pub(super) fn count(&mut self, loc: Location) {
        match loc {
            Location::Zero => self.summary.zero_pages += 1,
            Location::Disk(..) => self.summary.disk_pages += 1,
            Location::Blob(_) => self.summary.blob_pages += 1,
            Location::Parent(_) => self.summary.parent_pages += 1,
        }
    }

    pub(super) fn finish(self, size: u64, mode: u32, start: Instant) -> Summary {
        let mut s = self.summary;
        s.checkpoint_bytes = size;
        s.size_ratio = size as f64 / s.guest_bytes as f64;
        s.mode = mode;
        s.seconds = start.elapsed().as_secs_f64();
        log::info!(
            "create: {} pages: {} zero, {} disk, {} parent, {} blob ({} stored); {} bytes in {:.2}s",
            s.pages,
            s.zero_pages,
            s.disk_pages,
            s.parent_pages,
            s.blob_pages,
            s.blobs_stored,
            size,
            s.seconds
        );
        s
    }
}
