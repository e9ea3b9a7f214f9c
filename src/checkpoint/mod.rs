//! Reading a checkpoint back: open once, then rebuild any run of pages.
//!
//! [`Checkpoint::open`] validates the header, the tables (their CRCs, bounds,
//! and that no section is a hole of a sparse file), opens every disk image
//! (checking its format, size and fingerprint) and every parent checkpoint
//! (checking its size, identity and fingerprint), and resolves every PARENT
//! entry to where its bytes really are (a disk block, or a blob of some
//! ancestor file at a byte offset), so a read never walks the chain. The file
//! is not mapped: its tables are read at open and its blobs with pread: a 16 GiB guest costs a 48 MiB page
//! table that the kernel pages in as it is used (plus 8 bytes a page in memory
//! when the checkpoint has a parent). [`Checkpoint::read_pages`] rebuilds a
//! run of pages, coalescing adjacent disk blocks into one read, and checks
//! every page against its CRC32, so it never returns wrong bytes.

mod parents;
mod read;
mod validate;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::{DiskError, DiskImage};
use crate::format::{
    self, DiskRecord, ENTRY_LEN, FormatError, HEADER_LEN, Header, Location, ParentRecord,
};
use crate::types::{AncestorIndex, BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE_U64, PageIndex};

pub use parents::{MAX_ANCESTORS, MAX_PARENT_DEPTH};

/// Where a page's bytes come from (PARENT entries already resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// An all-zero page.
    Zero,
    /// 4096 bytes of a backing disk at a sector-aligned offset.
    Disk {
        /// Which disk image (this checkpoint's disk table first, then disks
        /// only its ancestors reference; see [`Checkpoint::disk_path`]).
        disk: DiskIndex,
        /// Byte offset (a multiple of 512) in the disk as the guest sees it.
        offset: DiskOffset,
    },
    /// A page stored in this checkpoint's blob section.
    Blob(BlobIndex),
    /// A page stored in the blob section of an ancestor checkpoint (a PARENT
    /// entry, resolved at open).
    ParentBlob {
        /// Which ancestor file ([`Checkpoint::ancestors`]).
        ancestor: AncestorIndex,
        /// Blob index in that file.
        blob: BlobIndex,
    },
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
    /// Bytes copied from the blob section (of this file or an ancestor).
    pub blob_bytes: u64,
    /// Number of reads issued on disk images (after coalescing).
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
    /// The checkpoint file could not be opened, read or mapped (or is not a regular file).
    #[error("checkpoint {path}")]
    Io {
        /// The checkpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The checkpoint's bytes are not a valid checkpoint.
    #[error("checkpoint {path}")]
    Format {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A file the checkpoint needs may not be read by the user it is served for.
    #[error("{what} {path} is not readable by uid {uid}, for whom it would be served")]
    NotReadable {
        /// "checkpoint", "disk image" or "parent checkpoint".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The user.
        uid: u32,
    },
    /// A backing disk image is missing, unreadable, or changed.
    #[error("checkpoint {path} needs a backing disk image")]
    Disk {
        /// The checkpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: DiskError,
    },
    /// A parent checkpoint could not be opened.
    #[error("checkpoint {path} needs its parent checkpoint")]
    Parent {
        /// The checkpoint.
        path: PathBuf,
        /// Why the parent did not open (it names the parent).
        #[source]
        source: Box<OpenError>,
    },
    /// A parent checkpoint is not the file the checkpoint was made from.
    #[error("checkpoint {path}: parent checkpoint {parent} changed since it was made: {what}")]
    ParentChanged {
        /// The checkpoint.
        path: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// Size, identity or fingerprint.
        what: String,
    },
    /// The chain of parents is too long or too wide.
    #[error(
        "checkpoint {path}: its parent checkpoints are nested deeper than {MAX_PARENT_DEPTH} or number more than {MAX_ANCESTORS}"
    )]
    ParentChain {
        /// The checkpoint.
        path: PathBuf,
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
        /// "zero", "blob section of <ckpt>", or the disk image and offset.
        source_name: String,
    },
    /// Reading blobs of a checkpoint file failed (e.g. it shrank while served).
    #[error("reading {page} from the blob section of {path}")]
    BlobRead {
        /// First page of the failed read.
        page: PageIndex,
        /// The checkpoint (or ancestor) file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Fetching a stored page from an object store failed (after retries).
    #[error("fetching {page} from object {object}")]
    Remote {
        /// The page.
        page: PageIndex,
        /// The object (`s3://bucket/key`).
        object: String,
        /// Why (timeouts, refused connections, truncated bodies, ...).
        #[source]
        source: io::Error,
    },
    /// Reading a disk image failed (or it was missing at open).
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

/// Options for [`Checkpoint::open_with`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Use these disk images instead of the recorded paths (same order, same
    /// count as this checkpoint's own disk table).
    pub disk_override: Option<Vec<PathBuf>>,
    /// Skip the disk fingerprint check (per-page CRCs still apply).
    pub skip_fingerprint: bool,
    /// Open even when a disk image or parent is missing, unreadable or changed
    /// (for `inspect`): what failed is listed by [`Checkpoint::missing`], and
    /// reads of the pages it holds fail.
    pub allow_missing: bool,
    /// Serve only what this user may read: the checkpoint, every disk image
    /// and every parent is checked before it is opened (None: no check).
    pub reader: Option<crate::input::Reader>,
    /// Once stored pages are read (of this file or a parent), ask the kernel
    /// to drop them from the page cache (`POSIX_FADV_DONTNEED`): for a lazy
    /// restore, whose rebuilt pages live on in the page cache of the file it
    /// serves, so they are not cached twice. Disk-image pages are kept (the
    /// VM's own disk reads and other checkpoints of the same image share them).
    pub drop_read_blobs: bool,
}

/// A disk image or parent that an `allow_missing` open could not use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Missing {
    /// "disk image" or "parent checkpoint".
    pub what: &'static str,
    /// Recorded path.
    pub path: PathBuf,
    /// Why it could not be used (the whole error chain, one line).
    pub reason: String,
}

/// A disk a checkpoint's pages may come from: its record and, unless missing, the open image.
struct DiskSlot {
    record: DiskRecord,
    image: Option<Arc<DiskImage>>,
}

/// What one open (a checkpoint and all its ancestors) shares: the ancestor files
/// it may still open, and the disk images already opened and checked, so a disk
/// every link of a chain references is opened and fingerprinted once.
struct OpenWalk {
    budget: usize,
    disks: Vec<(DiskRecord, Arc<DiskImage>)>,
}

/// An ancestor checkpoint file whose blobs resolved PARENT entries point into.
pub struct Ancestor {
    path: PathBuf,
    file: std::fs::File,
    header: Header,
    mode: u32,
    head: [u8; HEADER_LEN],
    table: Box<[u8]>,
    file_len: u64,
    parent_records: Vec<ParentRecord>,
}

impl Ancestor {
    /// Path of the ancestor file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn read_blobs(&self, b: BlobIndex, out: &mut [u8], drop: bool) -> io::Result<()> {
        read_blobs(&self.file, &self.header, b, out, drop)
    }

    /// Its identity ([`Checkpoint::identity`]).
    pub fn identity(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.head)
    }

    /// Its file size in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_len
    }

    /// Permission bits of the file.
    pub fn file_mode(&self) -> u32 {
        self.mode
    }

    /// Its own parent table.
    pub fn parent_records(&self) -> &[ParentRecord] {
        &self.parent_records
    }

    /// Its page-table entry of `page` as stored (None beyond its guest memory or
    /// for an entry that does not decode).
    pub fn stored_entry(&self, page: PageIndex) -> Option<(Location, u32)> {
        if page.0 >= self.header.page_count {
            return None;
        }
        let at = page.0 as usize * ENTRY_LEN;
        format::decode_entry(&self.table[at..at + ENTRY_LEN], page.0).ok()
    }
}

/// Read blobs `b, b + 1, ...` (as many as `out` holds) of the file with
/// `header`; a file that shrank since it was opened is an error, not SIGBUS.
fn read_blobs(
    file: &std::fs::File,
    header: &Header,
    b: BlobIndex,
    out: &mut [u8],
    drop: bool,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let offset = header.blobs_offset + b.0 * PAGE_SIZE_U64;
    file.read_exact_at(out, offset)?;
    if drop {
        // Blobs are whole pages at a page-aligned offset: exactly these pages go.
        crate::input::drop_cached(file, offset, out.len() as u64);
    }
    Ok(())
}

/// An open checkpoint: header validated, page table in memory, blobs read
/// with pread, disk images and parents open, PARENT entries resolved.
pub struct Checkpoint {
    path: PathBuf,
    file: std::fs::File,
    head: [u8; HEADER_LEN],
    table: Box<[u8]>,
    state: Box<[u8]>,
    fingerprint: u64,
    file_len: u64,
    mode: u32,
    header: Header,
    disk_records: Vec<DiskRecord>,
    parent_records: Vec<ParentRecord>,
    disks: Vec<DiskSlot>,
    ancestors: Vec<Ancestor>,
    resolved: parents::Resolved,
    missing: Vec<Missing>,
    drop_read_blobs: bool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl Checkpoint {
    /// Open and validate `path`, open every disk image it references (checking
    /// each one's format, size and fingerprint) and every parent checkpoint.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Checkpoint::open`] with options.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self, OpenError> {
        let mut walk = OpenWalk {
            budget: MAX_ANCESTORS,
            disks: Vec::new(),
        };
        Self::open_at_depth(path, opts, 0, &mut walk)
    }

    fn open_at_depth(
        path: &Path,
        opts: &OpenOptions,
        depth: usize,
        walk: &mut OpenWalk,
    ) -> Result<Self, OpenError> {
        check_readable(opts, "checkpoint", path)?;
        let v = validate::validate(path)?;
        let mut ck = Checkpoint {
            path: path.to_owned(),
            file: v.file,
            head: v.head,
            table: v.table,
            state: v.state,
            fingerprint: v.fingerprint,
            file_len: v.file_len,
            mode: v.mode,
            header: v.header,
            disks: Vec::new(),
            disk_records: v.disk_records,
            parent_records: v.parent_records,
            ancestors: Vec::new(),
            resolved: parents::Resolved::default(),
            missing: Vec::new(),
            drop_read_blobs: opts.drop_read_blobs,
        };
        ck.open_disks(opts, &mut walk.disks)?;
        ck.open_parents(opts, depth, walk)?;
        log::debug!(
            "checkpoint: opened {} ({} pages, {} parents)",
            path.display(),
            ck.header.page_count,
            ck.parent_records.len()
        );
        Ok(ck)
    }

    /// Open and check every disk of the disk table; `opened` holds the disks this
    /// open already checked at their recorded paths (reused when the record is
    /// the same) and receives the ones opened here.
    fn open_disks(
        &mut self,
        opts: &OpenOptions,
        opened: &mut Vec<(DiskRecord, Arc<DiskImage>)>,
    ) -> Result<(), OpenError> {
        let disk_err = |source| OpenError::Disk {
            path: self.path.clone(),
            source,
        };
        if let Some(paths) = &opts.disk_override
            && paths.len() != self.disk_records.len()
        {
            let what = format!(
                "{} disk images given, the checkpoint references {}",
                paths.len(),
                self.disk_records.len()
            );
            return Err(disk_err(DiskError::Io {
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, what),
            }));
        }
        for (i, r) in self.disk_records.iter().enumerate() {
            let overridden = opts.disk_override.as_ref().map(|o| &o[i]);
            if overridden.is_none()
                && let Some((_, image)) = opened.iter().find(|(rec, _)| rec == r)
            {
                self.disks.push(DiskSlot {
                    record: r.clone(),
                    image: Some(image.clone()),
                });
                continue;
            }
            let p = overridden.unwrap_or(&r.path);
            // Before the image is opened: a refusal must not tell its size.
            check_readable(opts, "disk image", p)?;
            let checked = DiskImage::open(p).and_then(|image| {
                image.check(r, !opts.skip_fingerprint)?;
                Ok(Arc::new(image))
            });
            let image = match checked {
                Ok(image) => {
                    if overridden.is_none() {
                        opened.push((r.clone(), image.clone()));
                    }
                    Some(image)
                }
                Err(e) if opts.allow_missing => {
                    self.missing.push(Missing {
                        what: "disk image",
                        path: r.path.clone(),
                        reason: error_chain(&e),
                    });
                    None
                }
                Err(e) => return Err(disk_err(e)),
            };
            self.disks.push(DiskSlot {
                record: r.clone(),
                image,
            });
        }
        Ok(())
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

    /// The parent table as recorded.
    pub fn parent_records(&self) -> &[ParentRecord] {
        &self.parent_records
    }

    /// Ancestor files that resolved PARENT entries read blobs from.
    pub fn ancestors(&self) -> &[Ancestor] {
        &self.ancestors
    }

    /// The record of disk `d` (see [`PageSource::Disk`]): this checkpoint's
    /// disk table first, then disks only its ancestors reference.
    pub fn disk_record(&self, d: DiskIndex) -> Option<&DiskRecord> {
        self.disks.get(usize::from(d.0)).map(|s| &s.record)
    }

    /// Disks and parents an [`OpenOptions::allow_missing`] open could not use.
    pub fn missing(&self) -> &[Missing] {
        &self.missing
    }

    /// Number of disks pages may come from (this checkpoint's and its ancestors').
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    /// Recorded path of disk `d` (see [`PageSource::Disk`]).
    pub fn disk_path(&self, d: DiskIndex) -> Option<&Path> {
        self.disks.get(usize::from(d.0)).map(|s| &*s.record.path)
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
        self.file_len
    }

    /// Permission bits of the checkpoint file.
    pub fn file_mode(&self) -> u32 {
        self.mode
    }

    /// The permission bits every file this checkpoint's pages come from
    /// allows (the intersection over the checkpoint, its ancestors and its
    /// open disk images): what serves these pages should allow no more.
    pub fn sources_mode(&self) -> u32 {
        let disks = self
            .disks
            .iter()
            .filter_map(|s| s.image.as_ref())
            .map(|d| d.mode());
        let ancestors = self.ancestors.iter().map(|a| a.mode);
        disks.chain(ancestors).fold(self.mode, |m, x| m & x)
    }

    fn raw_entry(&self, page: u64) -> &[u8] {
        let at = page as usize * ENTRY_LEN;
        &self.table[at..at + ENTRY_LEN]
    }

    /// The page-table entry of `page` as stored (a PARENT entry unresolved), for `inspect`.
    /// Panics if `page` is out of range.
    pub fn stored_entry(&self, page: PageIndex) -> Result<(Location, u32), FormatError> {
        assert!(page.0 < self.header.page_count, "{page} out of range");
        format::decode_entry(self.raw_entry(page.0), page.0)
    }

    /// The page-table entry of `page`, checked against the disk table, the blob
    /// count and the parents. Panics if `page` is out of range.
    pub fn try_entry(&self, page: PageIndex) -> Result<PageEntry, ReadError> {
        let bad = |what: String| ReadError::BadEntry { page, what };
        let (loc, crc) = self.stored_entry(page).map_err(|e| bad(e.to_string()))?;
        let source = match loc {
            Location::Zero => PageSource::Zero,
            Location::Disk(disk, offset) => {
                self.check_disk_ref(disk, offset).map_err(bad)?;
                PageSource::Disk { disk, offset }
            }
            Location::Blob(b) if b.0 >= self.header.blob_count => {
                return Err(bad(format!(
                    "blob {} but {} blobs",
                    b.0, self.header.blob_count
                )));
            }
            Location::Blob(b) => PageSource::Blob(b),
            Location::Parent(_) => self.resolved.get(page.0).map_err(bad)?,
        };
        Ok(PageEntry { source, crc })
    }

    fn check_disk_ref(&self, disk: DiskIndex, offset: DiskOffset) -> Result<(), String> {
        let Some(r) = self.disk_records.get(usize::from(disk.0)) else {
            return Err(format!(
                "disk index {} but {} disks",
                disk.0,
                self.disk_records.len()
            ));
        };
        if offset
            .0
            .checked_add(PAGE_SIZE_U64)
            .is_none_or(|e| e > r.size)
        {
            return Err(format!("{offset} is past the end of {}", r.path.display()));
        }
        Ok(())
    }

    /// The page-table entry of `page`. Panics if `page` is out of range or the
    /// entry is invalid (use [`Checkpoint::try_entry`] for untrusted files).
    pub fn entry(&self, page: PageIndex) -> PageEntry {
        self.try_entry(page).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A 64-bit identity of this checkpoint's content: the xxh3 of its header,
    /// which carries the CRCs of the disk table, the parent table, the page
    /// table (and with it every page's CRC) and the VMM state. Files derived
    /// from a checkpoint (loading sets, child checkpoints) record it and are
    /// refused by any other checkpoint.
    pub fn identity(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.head)
    }

    /// Tell the kernel that every page will be read, in page order (an eager
    /// restore, `verify`, `flatten`): the checkpoint's and its ancestors' files
    /// get sequential readahead, its disk images the default. An open
    /// checkpoint otherwise reads with no readahead at all, right for a lazy
    /// restore's scattered faults but slow for a whole pass, where blob runs
    /// split by a chain's or a disk's interleaving become many small reads
    /// that each wait for the disk.
    pub fn advise_reading_all(&self) {
        use crate::input::{Access, advise};
        advise(&self.file, Access::Sequential);
        for a in &self.ancestors {
            advise(&a.file, Access::Sequential);
        }
        for image in self.disks.iter().filter_map(|s| s.image.as_ref()) {
            image.advise(Access::Normal);
        }
    }

    /// The opaque VMM-state section (empty if the checkpoint has none).
    pub fn vmm_state(&self) -> &[u8] {
        &self.state
    }

    /// Read blobs `b, b + 1, ...` (as many as `out` holds; in range).
    fn read_blobs(&self, b: BlobIndex, out: &mut [u8]) -> io::Result<()> {
        read_blobs(&self.file, &self.header, b, out, self.drop_read_blobs)
    }
}

/// Refuse `path` if the user the checkpoint is served for may not read it
/// (a missing file is left to the open that follows, which names it).
fn check_readable(opts: &OpenOptions, what: &'static str, path: &Path) -> Result<(), OpenError> {
    let Some(reader) = &opts.reader else {
        return Ok(());
    };
    match reader.may_read(path) {
        Ok(false) => Err(OpenError::NotReadable {
            what,
            path: path.to_owned(),
            uid: reader.uid,
        }),
        Ok(true) | Err(_) => Ok(()),
    }
}

/// An error and its causes on one line, separated by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
