//! Making a checkpoint from a raw guest memory image.
//!
//! Every page is classified, in this order:
//! 1. all zero -> ZERO;
//! 2. a caller's hint (the VMM tracked a disk read into this page) whose disk
//!    block has the same bytes -> DISK (the paper's way: no disk scan);
//! 3. with `scan_disks`, a block of some disk with the same bytes, found through
//!    an index of every disk block keyed by xxh3 and confirmed byte for byte -> DISK;
//! 4. otherwise -> BLOB, stored once per distinct content (xxh3 index, confirmed
//!    byte for byte against the first page that had it).
//!
//! Memory use is the page table (12 bytes a page) plus the two indexes; the
//! guest image and the disks are read through mmap and never copied whole.
//! The output is written to a temporary file beside `out` and renamed into
//! place only when complete, so a failed run leaves nothing half-written.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::Mmap;
use nohash_hasher::IntMap;
use xxhash_rust::xxh3::xxh3_64;

use crate::disk::{DiskError, DiskImage};
use crate::format::{self, DiskRecord, ENTRY_LEN, HEADER_LEN, Header, Location};
use crate::types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// A page the caller knows to hold a disk block (e.g. tracked by the VMM's disk I/O).
/// Hints are verified by content; a wrong hint just falls back to scanning/blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskHint {
    /// Guest page.
    pub page: PageIndex,
    /// Index into [`CreateOptions::disks`].
    pub disk: DiskIndex,
    /// 4 KiB-aligned byte offset in that disk image.
    pub offset: DiskOffset,
}

/// What to build a checkpoint from.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Raw disk images the guest's page cache may hold blocks of.
    pub disks: Vec<PathBuf>,
    /// Page -> disk block hints from I/O tracking.
    pub hints: Vec<DiskHint>,
    /// Also find disk pages by indexing every disk block's content (the scan path).
    /// With hints only (the paper's way), set this to false.
    pub scan_disks: bool,
    /// Opaque VMM state stored in the checkpoint.
    pub vmm_state: Option<Vec<u8>>,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

/// What a create run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Guest pages.
    pub pages: u64,
    /// Pages stored as ZERO.
    pub zero_pages: u64,
    /// Pages stored as DISK references.
    pub disk_pages: u64,
    /// Pages stored as BLOB references (including duplicates).
    pub blob_pages: u64,
    /// Distinct blobs stored.
    pub blobs_stored: u64,
    /// Hints whose content matched the disk.
    pub hints_verified: u64,
    /// Hints whose content did not match (page became something else).
    pub hints_rejected: u64,
    /// Disk blocks in the scan index (0 without `scan_disks`).
    pub disk_blocks_indexed: u64,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Checkpoint file size in bytes.
    pub checkpoint_bytes: u64,
    /// checkpoint_bytes / guest_bytes.
    pub size_ratio: f64,
    /// Seconds spent indexing disks.
    pub index_seconds: f64,
    /// Wall-clock seconds in all.
    pub seconds: f64,
}

/// Errors from creating a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The memory image is not whole pages.
    #[error("memory image is {0} bytes, not a multiple of 4096")]
    MemSize(u64),
    /// A disk image could not be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Too many disks for the format.
    #[error("{0} disk images given; a checkpoint holds at most {max}", max = format::MAX_DISKS)]
    TooManyDisks(usize),
    /// The output would overwrite an input.
    #[error("output {0} is one of the input files; refusing to overwrite it")]
    OutputIsInput(PathBuf),
    /// Mapping a disk image failed.
    #[error("mapping disk image {path}")]
    Map {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the checkpoint failed.
    #[error("writing checkpoint {path}")]
    Write {
        /// The output path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// An opened, mapped disk.
struct MappedDisk {
    image: DiskImage,
    map: Option<Mmap>,
}

impl MappedDisk {
    fn block(&self, offset: DiskOffset) -> Option<&[u8]> {
        let start = usize::try_from(offset.0).ok()?;
        self.map.as_ref()?.get(start..start.checked_add(PAGE_SIZE)?)
    }
}

fn is_zero(page: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorizes this loop.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

fn open_disks(paths: &[PathBuf], out: &Path) -> Result<Vec<MappedDisk>, CreateError> {
    if paths.len() > format::MAX_DISKS {
        return Err(CreateError::TooManyDisks(paths.len()));
    }
    let out_canon = out.canonicalize().ok();
    paths
        .iter()
        .map(|p| {
            let image = DiskImage::open(p)?;
            if out_canon.is_some() && p.canonicalize().ok() == out_canon {
                return Err(CreateError::OutputIsInput(out.to_owned()));
            }
            let map = if image.size == 0 {
                None
            } else {
                // SAFETY: the image is opened read-only and we only read through the
                // map; a concurrent writer could change bytes under us, which at worst
                // misclassifies a page, and every page is CRC-checked on restore.
                let m = unsafe { Mmap::map(&image.file) }.map_err(|source| CreateError::Map {
                    path: p.clone(),
                    source,
                })?;
                Some(m)
            };
            Ok(MappedDisk { image, map })
        })
        .collect()
}

/// Pack a disk index and block number into one map value.
fn pack(disk: u16, block: u64) -> u64 {
    (u64::from(disk) << 48) | block
}

fn unpack(v: u64) -> (DiskIndex, DiskOffset) {
    (
        DiskIndex((v >> 48) as u16),
        DiskOffset((v & ((1 << 48) - 1)) * PAGE_SIZE_U64),
    )
}

/// Index every non-zero block of every disk by xxh3 (first occurrence wins).
fn index_disks(disks: &[MappedDisk], bar: &indicatif::ProgressBar) -> IntMap<u64, u64> {
    let total: u64 = disks.iter().map(|d| d.image.blocks()).sum();
    let mut index = IntMap::default();
    index.reserve(total as usize);
    for (i, d) in disks.iter().enumerate() {
        let Some(map) = &d.map else { continue };
        for (block, data) in map.chunks_exact(PAGE_SIZE).enumerate() {
            if !is_zero(data) {
                index
                    .entry(xxh3_64(data))
                    .or_insert(pack(i as u16, block as u64));
            }
            if block % 4096 == 4095 {
                bar.inc(4096 * PAGE_SIZE_U64);
            }
        }
    }
    index
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Accumulates the page table and the blob section while pages are classified.
struct Classifier<'a> {
    mem: &'a [u8],
    disks: &'a [MappedDisk],
    disk_index: IntMap<u64, u64>,
    hints: IntMap<u64, (DiskIndex, DiskOffset)>,
    blob_index: IntMap<u64, (BlobIndex, PageIndex)>,
    table: Vec<u8>,
    summary: Summary,
}

impl Classifier<'_> {
    fn hinted(&mut self, page: PageIndex, data: &[u8]) -> Option<Location> {
        let &(disk, offset) = self.hints.get(&page.0)?;
        let block = self
            .disks
            .get(usize::from(disk.0))
            .and_then(|d| d.block(offset));
        if offset.0 % PAGE_SIZE_U64 == 0 && block == Some(data) {
            self.summary.hints_verified += 1;
            Some(Location::Disk(disk, offset))
        } else {
            self.summary.hints_rejected += 1;
            None
        }
    }

    fn scanned(&self, hash: u64, data: &[u8]) -> Option<Location> {
        let (disk, offset) = unpack(*self.disk_index.get(&hash)?);
        let block = self.disks[usize::from(disk.0)].block(offset)?;
        (block == data).then_some(Location::Disk(disk, offset))
    }

    /// Returns the blob location and whether the page must be written out.
    fn blob(&mut self, page: PageIndex, hash: u64, data: &[u8]) -> (Location, bool) {
        let next = BlobIndex(self.summary.blobs_stored);
        if let Some(&(idx, first)) = self.blob_index.get(&hash) {
            let start = first.0 as usize * PAGE_SIZE;
            if &self.mem[start..start + PAGE_SIZE] == data {
                return (Location::Blob(idx), false);
            }
        } else {
            self.blob_index.insert(hash, (next, page));
        }
        self.summary.blobs_stored += 1;
        (Location::Blob(next), true)
    }

    fn classify(&mut self, page: PageIndex, data: &[u8]) -> (Location, bool) {
        if is_zero(data) {
            return (Location::Zero, false);
        }
        if let Some(loc) = self.hinted(page, data) {
            return (loc, false);
        }
        let hash = xxh3_64(data);
        if let Some(loc) = self.scanned(hash, data) {
            return (loc, false);
        }
        self.blob(page, hash, data)
    }

    fn count(&mut self, loc: Location) {
        match loc {
            Location::Zero => self.summary.zero_pages += 1,
            Location::Disk(..) => self.summary.disk_pages += 1,
            Location::Blob(_) => self.summary.blob_pages += 1,
        }
    }
}

/// Classify every page of `mem` (a raw guest memory image, length a multiple of 4096)
/// and write the checkpoint to `out` (atomically: a temp file renamed at the end).
pub fn create(mem: &[u8], opts: &CreateOptions, out: &Path) -> Result<Summary, CreateError> {
    let input = Input {
        mem,
        holes: &[],
        release_behind: false,
    };
    create_from(&input, opts, out)
}

/// [`create`] from a memory image file: holes of a sparse image are ZERO pages
/// without being read, and classified pages are unmapped behind the scan so the
/// process's resident memory stays bounded whatever the guest size.
pub fn create_from_image(
    image: &MemoryImage,
    opts: &CreateOptions,
    out: &Path,
) -> Result<Summary, CreateError> {
    let input = Input {
        mem: image.bytes(),
        holes: &image.holes,
        release_behind: true,
    };
    create_from(&input, opts, out)
}

/// Pages classified between two progress updates (and two releases): 64 MiB.
const RELEASE_PAGES: usize = 16384;

/// The guest memory to classify.
struct Input<'a> {
    mem: &'a [u8],
    /// Sorted page ranges known to be zero (holes of a sparse file).
    holes: &'a [Range<u64>],
    /// `mem` is a read-only shared file mapping that may be released behind the scan.
    release_behind: bool,
}

/// Drop this process's mapping of `range` (of a read-only shared file mapping);
/// the bytes stay in the page cache and fault back in if touched again.
fn release(range: &[u8]) {
    // SAFETY: only called on ranges of a MemoryImage, a read-only MAP_SHARED
    // mapping of a file: MADV_DONTNEED there discards nothing but page-table
    // entries, and a later access re-reads the same bytes from the page cache.
    let rc = unsafe {
        libc::madvise(
            range.as_ptr() as *mut libc::c_void,
            range.len(),
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        log::debug!(
            "create: madvise(DONTNEED) failed: {}",
            io::Error::last_os_error()
        );
    }
}

fn create_from(
    input: &Input<'_>,
    opts: &CreateOptions,
    out: &Path,
) -> Result<Summary, CreateError> {
    let start = Instant::now();
    let mem = input.mem;
    if !mem.len().is_multiple_of(PAGE_SIZE) {
        return Err(CreateError::MemSize(mem.len() as u64));
    }
    let disks = open_disks(&opts.disks, out)?;
    let records = disk_records(&disks)?;
    let disk_bytes: u64 = if opts.scan_disks {
        disks.iter().map(|d| d.image.size).sum()
    } else {
        0
    };
    let bar = progress_bar(opts.progress, disk_bytes + mem.len() as u64);

    bar.set_message("indexing");
    let disk_index = if opts.scan_disks {
        index_disks(&disks, &bar)
    } else {
        IntMap::default()
    };
    let index_seconds = start.elapsed().as_secs_f64();
    log::info!(
        "create: indexed {} disk blocks in {index_seconds:.2}s",
        disk_index.len()
    );
    bar.set_position(disk_bytes);

    let page_count = (mem.len() / PAGE_SIZE) as u64;
    let mut c = Classifier {
        mem,
        disks: &disks,
        summary: Summary {
            pages: page_count,
            guest_bytes: mem.len() as u64,
            disk_blocks_indexed: disk_index.len() as u64,
            index_seconds,
            ..Summary::default()
        },
        disk_index,
        hints: opts
            .hints
            .iter()
            .map(|h| (h.page.0, (h.disk, h.offset)))
            .collect(),
        blob_index: IntMap::default(),
        table: Vec::with_capacity(page_count as usize * ENTRY_LEN),
    };

    let disks_bytes = format::encode_disks(&records);
    let state = opts.vmm_state.as_deref().unwrap_or_default();
    let mut header = Header {
        guest_size: mem.len() as u64,
        page_count,
        disks_offset: HEADER_LEN as u64,
        disks_len: disks_bytes.len() as u64,
        disks_crc: crc32fast::hash(&disks_bytes),
        state_len: state.len() as u64,
        state_crc: crc32fast::hash(state),
        ..Header::default()
    };
    header.table_offset = header.disks_offset + header.disks_len;
    header.table_len = page_count * ENTRY_LEN as u64;
    header.blobs_offset = format::page_align(header.table_offset + header.table_len);

    let tmp = temp_path(out);
    let write_err = |source| CreateError::Write {
        path: out.to_owned(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.seek(SeekFrom::Start(header.blobs_offset))?;
        bar.set_message("classifying");
        let zero_entry = format::encode_entry(Location::Zero, format::zero_page_crc());
        let mut holes = input.holes.iter().peekable();
        for (i, data) in mem.chunks_exact(PAGE_SIZE).enumerate() {
            let page = PageIndex(i as u64);
            while holes.next_if(|h| h.end <= page.0).is_some() {}
            if holes.peek().is_some_and(|h| h.contains(&page.0)) {
                // A hole of a sparse image: zero without faulting the page in.
                c.summary.zero_pages += 1;
                c.table.extend_from_slice(&zero_entry);
            } else {
                let (loc, store) = c.classify(page, data);
                if store {
                    w.write_all(data)?;
                }
                c.count(loc);
                c.table
                    .extend_from_slice(&format::encode_entry(loc, crc32fast::hash(data)));
            }
            if i % RELEASE_PAGES == RELEASE_PAGES - 1 {
                bar.inc(RELEASE_PAGES as u64 * PAGE_SIZE_U64);
                if input.release_behind {
                    release(&mem[(i + 1 - RELEASE_PAGES) * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                }
            }
        }
        header.blob_count = c.summary.blobs_stored;
        header.state_offset = header.blobs_offset + header.blob_count * PAGE_SIZE_U64;
        header.table_crc = crc32fast::hash(&c.table);
        w.write_all(state)?;
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&header.encode())?;
        w.write_all(&disks_bytes)?;
        w.write_all(&c.table)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        // Sections may end before the blob offset (no blobs, no state): give the
        // file its full length so every section lies inside it.
        file.set_len(header.state_offset + header.state_len)?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)?;
        Ok(header.state_offset + header.state_len)
    })();
    bar.finish_and_clear();
    let size = result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e)
    })?;

    let mut summary = c.summary;
    summary.checkpoint_bytes = size;
    summary.size_ratio = if mem.is_empty() {
        0.0
    } else {
        size as f64 / mem.len() as f64
    };
    summary.seconds = start.elapsed().as_secs_f64();
    log::info!(
        "create: {} pages: {} zero, {} disk, {} blob ({} stored); {} bytes in {:.2}s",
        summary.pages,
        summary.zero_pages,
        summary.disk_pages,
        summary.blob_pages,
        summary.blobs_stored,
        size,
        summary.seconds
    );
    Ok(summary)
}

fn disk_records(disks: &[MappedDisk]) -> Result<Vec<DiskRecord>, CreateError> {
    disks
        .iter()
        .map(|d| {
            let path = std::path::absolute(&d.image.path).map_err(|source| DiskError::Io {
                path: d.image.path.clone(),
                source,
            })?;
            Ok(DiskRecord {
                path,
                size: d.image.size,
                fingerprint: d.image.fingerprint()?,
            })
        })
        .collect()
}

fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// A raw guest memory image opened for [`create`] or `verify`, mapped read-only.
pub struct MemoryImage {
    map: Option<Mmap>,
    holes: Vec<Range<u64>>,
}

/// Errors from opening a memory image.
#[derive(Debug, thiserror::Error)]
pub enum MemoryImageError {
    /// Open, stat or mmap failed.
    #[error("memory image {path}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not whole pages.
    #[error(
        "memory image {path} is {size} bytes, not a multiple of 4096 (is it a raw memory dump?)"
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

impl MemoryImage {
    /// Open and map `path`, checking it is whole 4 KiB pages.
    pub fn open(path: &Path) -> Result<Self, MemoryImageError> {
        let io_err = |source| MemoryImageError::Io {
            path: path.to_owned(),
            source,
        };
        let (file, len) = crate::disk::open_regular(path).map_err(io_err)?;
        if len % PAGE_SIZE_U64 != 0 {
            return Err(MemoryImageError::Size {
                path: path.to_owned(),
                size: len,
            });
        }
        if len == 0 {
            return Ok(MemoryImage {
                map: None,
                holes: Vec::new(),
            });
        }
        // SAFETY: read-only map of a file we only read; a concurrent truncation
        // by another process would SIGBUS, as with any mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        // One front-to-back pass: let the kernel read ahead and drop behind.
        let _ = map.advise(memmap2::Advice::Sequential);
        let holes = find_holes(&file, len).map_err(io_err)?;
        Ok(MemoryImage {
            map: Some(map),
            holes,
        })
    }

    /// Page ranges that are holes of the (sparse) file, sorted.
    pub fn holes(&self) -> &[Range<u64>] {
        &self.holes
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}

/// Whole pages inside holes of `file` (SEEK_DATA/SEEK_HOLE), as sorted page ranges.
fn find_holes(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    match seek_holes(file, len) {
        // A filesystem without SEEK_DATA: treat the whole file as data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        r => r,
    }
}

fn seek_holes(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid open descriptor; it only moves the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            // ENXIO: no data (or hole) at or after `off`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut holes = Vec::new();
    let mut at = 0;
    while at < len {
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        // Only whole pages of the hole count; a partial page is read normally.
        let (first, end) = (at.div_ceil(PAGE_SIZE_U64), data / PAGE_SIZE_U64);
        if end > first {
            holes.push(first..end);
        }
        if data >= len {
            break;
        }
        at = seek(data, libc::SEEK_HOLE)?.unwrap_or(len);
    }
    Ok(holes)
}
