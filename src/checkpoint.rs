//! Reading a checkpoint back: open once, then rebuild any run of pages.
//!
//! [`Checkpoint::open`] validates the header, the disk table and the page table
//! (their CRCs and bounds), and opens every disk image, checking its size and
//! fingerprint. The file itself is mapped with mmap and never read whole: a
//! 16 GiB guest costs a 48 MiB page table that the kernel pages in as it is used.
//! [`Checkpoint::read_pages`] rebuilds a run of pages, coalescing adjacent disk
//! blocks into one pread, and checks every page against its CRC32, so it never
//! returns wrong bytes.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::disk::{DiskError, DiskImage};
use crate::format::{self, DiskRecord, ENTRY_LEN, FormatError, Header, Location};
use crate::types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// Where a page's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// An all-zero page.
    Zero,
    /// A 4 KiB block of a backing disk image.
    Disk {
        /// Which disk image.
        disk: DiskIndex,
        /// Aligned byte offset of the block in that image.
        offset: DiskOffset,
    },
    /// A page stored in the checkpoint's blob section.
    Blob(BlobIndex),
}

impl From<Location> for PageSource {
    fn from(l: Location) -> Self {
        match l {
            Location::Zero => PageSource::Zero,
            Location::Disk(disk, offset) => PageSource::Disk { disk, offset },
            Location::Blob(b) => PageSource::Blob(b),
        }
    }
}

/// One page-table entry: its source and the CRC32 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Where the bytes come from.
    pub source: PageSource,
    /// CRC32 (crc32fast, IEEE) of the page's 4096 bytes.
    pub crc: u32,
}

/// Bytes rebuilt by one [`Checkpoint::read_pages`] call, by source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// Bytes of zero pages.
    pub zero_bytes: u64,
    /// Bytes read from disk images.
    pub disk_bytes: u64,
    /// Bytes copied from the blob section.
    pub blob_bytes: u64,
    /// Number of pread calls issued on disk images (after coalescing).
    pub disk_reads: u64,
}

impl std::ops::AddAssign for ReadCounts {
    fn add_assign(&mut self, o: Self) {
        self.zero_bytes += o.zero_bytes;
        self.disk_bytes += o.disk_bytes;
        self.blob_bytes += o.blob_bytes;
        self.disk_reads += o.disk_reads;
    }
}

/// Errors from opening a checkpoint. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The checkpoint file could not be opened, read or mapped.
    #[error("checkpoint {path}")]
    Io {
        /// The checkpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The checkpoint's bytes are not a valid checkpoint.
    #[error("checkpoint {path}: {source}")]
    Format {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong (shown inline: it is the whole message).
        source: FormatError,
    },
    /// A backing disk image is missing, not raw, or changed.
    #[error("checkpoint {path} needs a backing disk image")]
    Disk {
        /// The checkpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: DiskError,
    },
}

/// Errors from rebuilding pages.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The requested range is outside guest memory or not page aligned.
    #[error("pages {first}..{end} are outside guest memory of {pages} pages")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// One past the last page asked for.
        end: u64,
        /// Pages in guest memory.
        pages: u64,
    },
    /// A page-table entry is invalid or points outside its source.
    #[error("{page}: invalid page-table entry: {what}")]
    BadEntry {
        /// The page.
        page: PageIndex,
        /// What is wrong.
        what: String,
    },
    /// A rebuilt page's CRC32 does not match the page table.
    #[error(
        "{page}: CRC mismatch (expected {expected:#010x}, got {actual:#010x}) for bytes from {source_name}"
    )]
    CrcMismatch {
        /// The bad page.
        page: PageIndex,
        /// CRC in the page table.
        expected: u32,
        /// CRC of the bytes rebuilt.
        actual: u32,
        /// "zero", "blob section of <ckpt>", or the disk image path.
        source_name: String,
    },
    /// Reading a disk image failed.
    #[error("reading {page} from disk image {disk}")]
    DiskRead {
        /// First page of the failed read.
        page: PageIndex,
        /// Path of the disk image.
        disk: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// An open checkpoint: header validated, page table and blobs mapped, disk images open.
pub struct Checkpoint {
    path: PathBuf,
    map: Mmap,
    header: Header,
    disk_records: Vec<DiskRecord>,
    disks: Vec<DiskImage>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

/// Options for [`Checkpoint::open_with`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Use these disk images instead of the recorded paths (same order, same count).
    pub disk_override: Option<Vec<PathBuf>>,
    /// Skip the disk fingerprint check (per-page CRCs still apply).
    pub skip_fingerprint: bool,
}

impl Checkpoint {
    /// Open and validate `path`, and open every disk image it references
    /// (checking each one's size and fingerprint).
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Checkpoint::open`] with options.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        let fmt_err = |source| OpenError::Format {
            path: path.to_owned(),
            source,
        };
        let (file, file_len) = crate::disk::open_regular(path).map_err(io_err)?;
        if file_len < format::HEADER_LEN as u64 {
            return Err(fmt_err(FormatError::TooShort { len: file_len }));
        }
        // SAFETY: the file is opened read-only and only read through the map. If
        // someone truncates it while mapped, accesses past the end would SIGBUS;
        // checkpoints are immutable once written (create renames a finished file).
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = Header::decode(&map, file_len).map_err(fmt_err)?;
        let section = |off: u64, len: u64| &map[off as usize..(off + len) as usize];
        let disks_raw = section(header.disks_offset, header.disks_len);
        if crc32fast::hash(disks_raw) != header.disks_crc {
            return Err(fmt_err(FormatError::SectionCrc("disk table")));
        }
        if crc32fast::hash(section(header.table_offset, header.table_len)) != header.table_crc {
            return Err(fmt_err(FormatError::SectionCrc("page table")));
        }
        if crc32fast::hash(section(header.state_offset, header.state_len)) != header.state_crc {
            return Err(fmt_err(FormatError::SectionCrc("VMM state")));
        }
        let disk_records = format::decode_disks(disks_raw).map_err(fmt_err)?;
        let disks = open_disk_images(path, &disk_records, opts)?;
        log::debug!(
            "checkpoint: opened {} ({} pages)",
            path.display(),
            header.page_count
        );
        Ok(Checkpoint {
            path: path.to_owned(),
            map,
            header,
            disk_records,
            disks,
        })
    }

    /// Path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The disk table as recorded.
    pub fn disk_records(&self) -> &[DiskRecord] {
        &self.disk_records
    }

    /// Guest memory size in bytes (a multiple of 4096).
    pub fn guest_size(&self) -> u64 {
        self.header.guest_size
    }

    /// Number of guest pages.
    pub fn page_count(&self) -> u64 {
        self.header.page_count
    }

    /// Size of the checkpoint file in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    fn raw_entry(&self, page: u64) -> &[u8] {
        let at = self.header.table_offset as usize + page as usize * ENTRY_LEN;
        &self.map[at..at + ENTRY_LEN]
    }

    /// The page-table entry of `page`, checked against the disk table and blob
    /// count. Panics if `page` is out of range.
    pub fn try_entry(&self, page: PageIndex) -> Result<PageEntry, ReadError> {
        assert!(page.0 < self.header.page_count, "{page} out of range");
        let bad = |what: String| ReadError::BadEntry { page, what };
        let (loc, crc) =
            format::decode_entry(self.raw_entry(page.0), page.0).map_err(|e| bad(e.to_string()))?;
        match loc {
            Location::Disk(d, off) => {
                let Some(disk) = self.disks.get(usize::from(d.0)) else {
                    return Err(bad(format!(
                        "disk index {} but {} disks",
                        d.0,
                        self.disks.len()
                    )));
                };
                if off.0 + PAGE_SIZE_U64 > disk.size {
                    return Err(bad(format!(
                        "{off} is past the end of {}",
                        disk.path.display()
                    )));
                }
            }
            Location::Blob(b) if b.0 >= self.header.blob_count => {
                return Err(bad(format!(
                    "blob {} but {} blobs",
                    b.0, self.header.blob_count
                )));
            }
            _ => {}
        }
        Ok(PageEntry {
            source: loc.into(),
            crc,
        })
    }

    /// The page-table entry of `page`. Panics if `page` is out of range or the
    /// entry is invalid (use [`Checkpoint::try_entry`] for untrusted files).
    pub fn entry(&self, page: PageIndex) -> PageEntry {
        self.try_entry(page).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A 64-bit identity of this checkpoint's content: the xxh3 of its header,
    /// which carries the CRCs of the disk table, the page table (and with it
    /// every page's CRC) and the VMM state. Files derived from a checkpoint
    /// (loading sets) record it and are refused by any other checkpoint.
    pub fn identity(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.map[..format::HEADER_LEN])
    }

    /// The opaque VMM-state section (empty if the checkpoint has none).
    pub fn vmm_state(&self) -> &[u8] {
        let h = &self.header;
        &self.map[h.state_offset as usize..(h.state_offset + h.state_len) as usize]
    }

    /// The stored bytes of blob `b` (which must be in range).
    fn blob(&self, b: BlobIndex) -> &[u8] {
        let at = (self.header.blobs_offset + b.0 * PAGE_SIZE_U64) as usize;
        &self.map[at..at + PAGE_SIZE]
    }

    /// Rebuild pages `[first, first + out.len() / 4096)` into `out`
    /// (`out.len()` a multiple of 4096), coalescing adjacent DISK pages into
    /// one pread, checking every page's CRC. Thread-safe (`&self`, pread).
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
                    buf[..PAGE_SIZE].copy_from_slice(self.blob(b));
                    counts.blob_bytes += PAGE_SIZE_U64;
                    1
                }
                PageSource::Disk { disk, offset } => {
                    let run = self.disk_run(page, disk, offset, n - i)?;
                    let len = run as usize * PAGE_SIZE;
                    let image = &self.disks[usize::from(disk.0)];
                    image
                        .file
                        .read_exact_at(&mut buf[..len], offset.0)
                        .map_err(|source| ReadError::DiskRead {
                            page,
                            disk: image.path.clone(),
                            source,
                        })?;
                    counts.disk_bytes += len as u64;
                    counts.disk_reads += 1;
                    run
                }
            };
            self.check_crcs(page, run, &buf[..run as usize * PAGE_SIZE])?;
            i += run;
        }
        Ok(counts)
    }

    /// How many pages from `page` (at most `max`) continue the disk run that
    /// starts at `offset` on `disk`.
    fn disk_run(
        &self,
        page: PageIndex,
        disk: DiskIndex,
        offset: DiskOffset,
        max: u64,
    ) -> Result<u64, ReadError> {
        let mut run = 1;
        while run < max {
            let next = PageIndex(page.0 + run);
            // try_entry decodes and bounds-checks the entry; an invalid one fails the
            // read here, as it would when the main loop reached it.
            let want = PageSource::Disk {
                disk,
                offset: DiskOffset(offset.0 + run * PAGE_SIZE_U64),
            };
            if self.try_entry(next)?.source != want {
                break;
            }
            run += 1;
        }
        Ok(run)
    }

    fn check_crcs(&self, first: PageIndex, n: u64, data: &[u8]) -> Result<(), ReadError> {
        for (k, page_bytes) in data.chunks_exact(PAGE_SIZE).enumerate().take(n as usize) {
            let page = PageIndex(first.0 + k as u64);
            let (loc, expected) =
                format::decode_entry(self.raw_entry(page.0), page.0).map_err(|e| {
                    ReadError::BadEntry {
                        page,
                        what: e.to_string(),
                    }
                })?;
            let actual = if loc == Location::Zero {
                format::zero_page_crc()
            } else {
                crc32fast::hash(page_bytes)
            };
            if actual != expected {
                let source_name = self.source_name(loc);
                log::error!("checkpoint: {page}: CRC mismatch for bytes from {source_name}");
                return Err(ReadError::CrcMismatch {
                    page,
                    expected,
                    actual,
                    source_name,
                });
            }
        }
        Ok(())
    }

    fn source_name(&self, loc: Location) -> String {
        match loc {
            Location::Zero => "zero".into(),
            Location::Blob(_) => format!("blob section of {}", self.path.display()),
            Location::Disk(d, off) => format!(
                "disk image {} at {off}",
                self.disks[usize::from(d.0)].path.display()
            ),
        }
    }
}

fn open_disk_images(
    path: &Path,
    records: &[DiskRecord],
    opts: &OpenOptions,
) -> Result<Vec<DiskImage>, OpenError> {
    let disk_err = |source| OpenError::Disk {
        path: path.to_owned(),
        source,
    };
    if let Some(paths) = &opts.disk_override
        && paths.len() != records.len()
    {
        let what = format!(
            "{} disk images given, the checkpoint references {}",
            paths.len(),
            records.len()
        );
        return Err(disk_err(DiskError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, what),
        }));
    }
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let p = opts.disk_override.as_ref().map_or(&r.path, |o| &o[i]);
            let image = DiskImage::open(p).map_err(disk_err)?;
            if opts.skip_fingerprint {
                if image.size != r.size {
                    return Err(disk_err(DiskError::Changed {
                        path: p.clone(),
                        what: format!("size is {} bytes, was {}", image.size, r.size),
                    }));
                }
            } else {
                image.check(r.size, r.fingerprint).map_err(disk_err)?;
            }
            Ok(image)
        })
        .collect()
}
