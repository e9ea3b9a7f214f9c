//! Rebuilding pages: zeros, blob copies (of this file or an ancestor), and
//! disk reads coalesced into runs, every page checked against its CRC32.

use std::io;

use super::{Checkpoint, PageEntry, PageSource, ReadCounts, ReadError};
use crate::format;
use crate::types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

impl Checkpoint {
    /// Rebuild pages `[first, first + out.len() / 4096)` into `out`
    /// (`out.len()` a multiple of 4096), coalescing adjacent DISK pages into
    /// one read, checking every page's CRC. Thread-safe (`&self`, pread).
    pub fn read_pages(&self, first: PageIndex, out: &mut [u8]) -> Result<ReadCounts, ReadError> {
        let n = (out.len() / PAGE_SIZE) as u64;
        let end = first.0.saturating_add(n);
        if !out.len().is_multiple_of(PAGE_SIZE) || end > self.header.page_count {
            return Err(ReadError::OutOfRange {
                first: first.0,
                end,
                pages: self.header.page_count,
            });
        }
        let mut counts = ReadCounts::default();
        let mut i = 0u64;
        while i < n {
            let page = PageIndex(first.0 + i);
            let entry = self.try_entry(page)?;
            let buf = &mut out[(i as usize) * PAGE_SIZE..];
            let run = match entry.source {
                PageSource::Zero => {
                    buf[..PAGE_SIZE].fill(0);
                    counts.zero_bytes += PAGE_SIZE_U64;
                    1
                }
                PageSource::Blob(b) => {
                    let run = self.run_len(page, entry.source, n - i)?;
                    let len = run as usize * PAGE_SIZE;
                    self.read_blobs(b, &mut buf[..len])
                        .map_err(|source| self.blob_error(page, &self.path, source))?;
                    counts.blob_bytes += len as u64;
                    run
                }
                PageSource::ParentBlob { ancestor, blob } => {
                    let run = self.run_len(page, entry.source, n - i)?;
                    let len = run as usize * PAGE_SIZE;
                    let a = &self.ancestors[usize::from(ancestor.0)];
                    a.read_blobs(blob, &mut buf[..len], self.drop_read_blobs)
                        .map_err(|source| self.blob_error(page, &a.path, source))?;
                    counts.blob_bytes += len as u64;
                    run
                }
                PageSource::Disk { disk, offset } => {
                    let run = self.run_len(page, entry.source, n - i)?;
                    let len = run as usize * PAGE_SIZE;
                    self.read_disk(page, disk, offset, &mut buf[..len])?;
                    counts.disk_bytes += len as u64;
                    counts.disk_reads += 1;
                    run
                }
            };
            self.check_crcs(page, &entry, &buf[..run as usize * PAGE_SIZE])?;
            i += run;
        }
        Ok(counts)
    }

    fn read_disk(
        &self,
        page: PageIndex,
        disk: DiskIndex,
        offset: DiskOffset,
        buf: &mut [u8],
    ) -> Result<(), ReadError> {
        let slot = &self.disks[usize::from(disk.0)];
        let result = match &slot.image {
            Some(image) => image.read_exact_at(buf, offset.0),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the disk image could not be opened",
            )),
        };
        result.map_err(|source| ReadError::DiskRead {
            page,
            disk: slot.record.path.clone(),
            source,
        })
    }

    /// A blob read failed: the file shrank or failed under us.
    fn blob_error(&self, page: PageIndex, path: &std::path::Path, source: io::Error) -> ReadError {
        ReadError::BlobRead {
            page,
            path: path.to_owned(),
            source,
        }
    }

    /// How many pages from `page` (at most `max`) continue the run that starts
    /// with `first`: consecutive blocks of one disk, or consecutive blobs of
    /// one file, which one read fetches together.
    fn run_len(&self, page: PageIndex, first: PageSource, max: u64) -> Result<u64, ReadError> {
        let next = |k: u64| match first {
            PageSource::Disk { disk, offset } => Some(PageSource::Disk {
                disk,
                offset: DiskOffset(offset.0 + k * PAGE_SIZE_U64),
            }),
            PageSource::Blob(b) => Some(PageSource::Blob(BlobIndex(b.0 + k))),
            PageSource::ParentBlob { ancestor, blob } => Some(PageSource::ParentBlob {
                ancestor,
                blob: BlobIndex(blob.0 + k),
            }),
            PageSource::Zero => None,
        };
        let mut run = 1;
        while run < max {
            let Some(want) = next(run) else { break };
            // try_entry decodes and bounds-checks the entry; an invalid one fails the
            // read here, as it would when the main loop reached it.
            if self.try_entry(PageIndex(page.0 + run))?.source != want {
                break;
            }
            run += 1;
        }
        Ok(run)
    }

    /// Check the CRC of every page of `data` (a run starting at `first`, whose
    /// first entry is `entry`; the others are of the same kind).
    fn check_crcs(
        &self,
        first: PageIndex,
        entry: &PageEntry,
        data: &[u8],
    ) -> Result<(), ReadError> {
        for (k, page_bytes) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page = PageIndex(first.0 + k as u64);
            let expected = format::get_u32(self.raw_entry(page.0), size_of::<u64>());
            let actual = if entry.source == PageSource::Zero {
                format::zero_page_crc()
            } else {
                crc32fast::hash(page_bytes)
            };
            if actual != expected {
                let source = if k == 0 {
                    entry.source
                } else {
                    self.try_entry(page)?.source
                };
                return Err(ReadError::CrcMismatch {
                    page,
                    expected,
                    actual,
                    source_name: self.source_name(source),
                });
            }
        }
        Ok(())
    }

    fn source_name(&self, source: PageSource) -> String {
        match source {
            PageSource::Zero => "zero".into(),
            PageSource::Blob(_) => format!("blob section of {}", self.path.display()),
            PageSource::ParentBlob { ancestor, .. } => format!(
                "blob section of parent {}",
                self.ancestors[usize::from(ancestor.0)].path.display()
            ),
            PageSource::Disk { disk, offset } => format!(
                "disk image {} at {offset}",
                self.disks[usize::from(disk.0)].record.path.display()
            ),
        }
    }
}
