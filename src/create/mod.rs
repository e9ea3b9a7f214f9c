//! Making a checkpoint from a raw guest memory image.
//!
//! [`create`] runs named steps: check the memory, open the inputs (disks,
//! parent), index the disks, classify every page while streaming the file out,
//! fsync, rename. Every page is classified, in this order:
//! 1. all zero -> ZERO;
//! 2. with a parent, the same bytes as the parent's same page (CRC first, then
//!    byte for byte) -> PARENT;
//! 3. a caller's hint (the VMM tracked a disk read into this page) whose disk
//!    window has the same bytes -> DISK (the paper's way: no disk scan);
//! 4. with `scan_disks`, a 512-byte-aligned window of some disk with the same
//!    bytes, found through the content index ([`crate::scan`]) and confirmed
//!    byte for byte -> DISK;
//! 5. otherwise -> BLOB, stored once per distinct content (confirmed byte for
//!    byte against the first page that had it).
//!
//! With a parent and [`CreateOptions::changed`] (a VMM's dirty log), a page
//! outside that set is not read at all: it is the parent's page, so it becomes
//! a PARENT entry (ZERO where the parent's page is zero) with the CRC from the
//! parent's page table, and only the changed pages go through the steps above.
//! That makes the checkpoint of a restored VM cost time in proportion to what
//! it wrote, however much of its memory was never even fetched.
//!
//! Memory use is the page table (12 bytes a page) plus the two indexes; the
//! guest image and raw disks are read through mmap and never copied whole.
//! The output goes to an unguessable temporary file beside `out`
//! ([`crate::atomic_file`]) renamed into place only when complete, with
//! permission bits no wider than those of the least readable input.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod classify;

use classify::{Classifier, Found};

use crate::atomic_file::{self, AtomicFile, OutputError};
use crate::checkpoint::{Checkpoint, MAX_PARENT_DEPTH, OpenError};
use crate::disk::{DiskError, DiskImage};
use crate::format::{self, CheckpointWriter, DiskRecord, Location, ParentRecord};
use crate::memory::MemoryImage;
use crate::pageset::PageSet;
use crate::scan::{self, ContentIndex, IndexReport, ScanDisk, ScanOptions};
use crate::types::{DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// A page the caller knows to hold disk bytes (e.g. tracked by the VMM's disk
/// I/O). Hints are verified by content; a wrong hint just falls back to
/// scanning or a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskHint {
    /// Guest page.
    pub page: PageIndex,
    /// Index into [`CreateOptions::disks`].
    pub disk: DiskIndex,
    /// Byte offset in that disk (a multiple of 512).
    pub offset: DiskOffset,
}

/// What to build a checkpoint from.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Disk images (raw or qcow2) the guest's page cache may hold bytes of.
    pub disks: Vec<PathBuf>,
    /// Page -> disk offset hints from I/O tracking.
    pub hints: Vec<DiskHint>,
    /// Also find disk pages by indexing the disks' content (the scan path).
    /// With hints only (the paper's way), set this to false.
    pub scan_disks: bool,
    /// How the scan indexes disks.
    pub scan: ScanOptions,
    /// A checkpoint this one is made against: pages whose bytes equal the
    /// parent's same page become PARENT entries (nothing stored).
    pub parent: Option<PathBuf>,
    /// With `parent`: the only pages that may differ from the parent's same page,
    /// e.g. those a VMM's dirty log (plus its own writes into guest RAM) reports
    /// written since the VM was restored from the parent. Every other page is
    /// taken to be the parent's page and is never read: it becomes a PARENT
    /// entry (ZERO where the parent's page is zero) carrying the parent's CRC.
    /// The caller vouches for the set: a page it leaves out that did change is
    /// checkpointed with the parent's bytes. None: every page is read and
    /// compared with the parent's.
    pub changed: Option<PageSet>,
    /// Opaque VMM state stored in the checkpoint.
    pub vmm_state: Option<Vec<u8>>,
    /// Permission bits of other inputs not opened here (e.g. the VMM-state
    /// file): the checkpoint is no more readable than any of them.
    pub input_modes: Vec<u32>,
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
    /// Pages stored as PARENT references.
    pub parent_pages: u64,
    /// Pages taken from the parent without being read ([`CreateOptions::changed`]
    /// left them out); they are counted as PARENT or ZERO pages too.
    pub unchanged_pages: u64,
    /// Distinct blobs stored.
    pub blobs_stored: u64,
    /// Hints whose content matched the disk.
    pub hints_verified: u64,
    /// Hints whose content did not match (page became something else).
    pub hints_rejected: u64,
    /// Disk windows in the scan index (0 without `scan_disks`).
    pub disk_windows_indexed: u64,
    /// How the disks were indexed (phases, memory), with `scan_disks`.
    pub index: Option<IndexReport>,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Checkpoint file size in bytes.
    pub checkpoint_bytes: u64,
    /// checkpoint_bytes / guest_bytes.
    pub size_ratio: f64,
    /// Permission bits the checkpoint was given.
    pub mode: u32,
    /// Seconds spent indexing disks.
    pub index_seconds: f64,
    /// Wall-clock seconds in all.
    pub seconds: f64,
}

/// Errors from creating a checkpoint, one per step.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// No guest memory.
    #[error("memory image is empty: no guest memory to checkpoint")]
    EmptyMemory,
    /// The memory image is not whole pages.
    #[error("memory image is {0} bytes, not a multiple of 4096")]
    MemSize(u64),
    /// A disk image could not be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Too many disks for the format.
    #[error("{0} disk images given; a checkpoint holds at most {max}", max = format::MAX_DISKS)]
    TooManyDisks(usize),
    /// The VMM state is larger than the format allows.
    #[error("VMM state of {0} bytes is larger than the {max}-byte limit", max = format::MAX_STATE_LEN)]
    StateTooLarge(u64),
    /// The output would overwrite an input.
    #[error("output {0} is one of the input files; refusing to overwrite it")]
    OutputIsInput(PathBuf),
    /// The parent checkpoint could not be used.
    #[error("cannot use the parent checkpoint")]
    Parent(#[source] OpenError),
    /// One more link would make the parent's chain too long to open.
    #[error(
        "parent checkpoint {parent} ends a chain of {files} checkpoint files, the most a checkpoint may have: flatten it first (`ckptfs flatten`)"
    )]
    ParentChainTooLong {
        /// The parent.
        parent: PathBuf,
        /// Files in its chain (itself and its ancestors).
        files: usize,
    },
    /// A set of changed pages was given without a parent to take the others from.
    #[error("a set of changed pages needs a parent checkpoint to take the other pages from")]
    ChangedWithoutParent,
    /// The set of changed pages is for a guest of another size.
    #[error("the set of changed pages covers {set} pages, the memory image {pages}")]
    ChangedSize {
        /// Pages the set covers.
        set: u64,
        /// Pages of the memory image.
        pages: u64,
    },
    /// A page left out of the changed set lies beyond the parent's guest memory.
    #[error(
        "{page} is not in the set of changed pages, but the parent checkpoint {parent} has only {parent_pages} pages"
    )]
    UnchangedBeyondParent {
        /// The first such page.
        page: PageIndex,
        /// The parent.
        parent: PathBuf,
        /// Its page count.
        parent_pages: u64,
    },
    /// A page left out of the changed set has an unusable entry in the parent.
    #[error(
        "{page} is not in the set of changed pages, but parent checkpoint {parent} cannot serve it"
    )]
    ParentEntry {
        /// The page.
        page: PageIndex,
        /// The parent.
        parent: PathBuf,
        /// What is wrong with the parent's entry.
        #[source]
        source: crate::checkpoint::ReadError,
    },
    /// Reading a disk for the content scan failed.
    #[error("reading disk image {path} for the content scan")]
    Scan {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output file failed.
    #[error(transparent)]
    Output(#[from] crate::atomic_file::OutputError),
}

/// Classify every page of `mem` (a raw guest memory image, length a non-zero
/// multiple of 4096) and write the checkpoint to `out`. Memory given as bytes
/// counts as a 0600 input (guest RAM holds secrets).
pub fn create(mem: &[u8], opts: &CreateOptions, out: &Path) -> Result<Summary, CreateError> {
    let input = Input {
        mem,
        holes: &[],
        release_behind: false,
        path: None,
        mode: 0o600,
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
        holes: image.holes(),
        release_behind: true,
        path: Some(image.path()),
        mode: image.mode(),
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
    /// The file `mem` comes from, if any.
    path: Option<&'a Path>,
    /// Its permission bits.
    mode: u32,
}

/// Disks and parent, opened and checked.
struct Inputs {
    disks: Vec<DiskImage>,
    records: Vec<DiskRecord>,
    parent: Option<(Checkpoint, ParentRecord)>,
}

fn create_from(
    input: &Input<'_>,
    opts: &CreateOptions,
    out: &Path,
) -> Result<Summary, CreateError> {
    let start = Instant::now();
    check_memory(input.mem, opts)?;
    let inputs = open_inputs(input, opts, out)?;
    check_changed(input.mem, opts, &inputs)?;
    log::debug!("create: inputs open after {:.1} ms", ms(start));
    let scan_disks: Vec<ScanDisk<'_>> = inputs
        .disks
        .iter()
        .map(scan_disk)
        .collect::<Result<_, _>>()?;
    let bar = progress_bar(opts, &inputs.disks, input.mem.len() as u64);
    let index = build_index(input, opts, &scan_disks, &bar)?;
    let mode = output_mode(input, opts, &inputs);
    let mut file =
        AtomicFile::create(out, mode).map_err(OutputError::at(out, OutputError::temp_file))?;
    bar.set_message("classifying");
    let mut c = Classifier::new(input.mem, &scan_disks, index, opts, &inputs);
    let written = write_checkpoint(&mut c, input, &inputs, opts, file.file(), &bar);
    bar.finish_and_clear();
    log::debug!(
        "create: pages classified and written after {:.1} ms",
        ms(start)
    );
    let size = written.map_err(|e| match e {
        Failed::Write(source) => OutputError::write(out.to_owned(), source).into(),
        Failed::Create(e) => e,
    })?;
    file.sync()
        .map_err(OutputError::at(out, OutputError::fsync))?;
    log::debug!("create: flushed to disk after {:.1} ms", ms(start));
    file.commit()
        .map_err(OutputError::at(out, OutputError::rename))?;
    Ok(c.finish(size, mode, start))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn check_memory(mem: &[u8], opts: &CreateOptions) -> Result<(), CreateError> {
    if mem.is_empty() {
        return Err(CreateError::EmptyMemory);
    }
    if !mem.len().is_multiple_of(PAGE_SIZE) {
        return Err(CreateError::MemSize(mem.len() as u64));
    }
    if opts.disks.len() > format::MAX_DISKS {
        return Err(CreateError::TooManyDisks(opts.disks.len()));
    }
    let state = opts.vmm_state.as_deref().unwrap_or_default().len() as u64;
    if state > format::MAX_STATE_LEN {
        return Err(CreateError::StateTooLarge(state));
    }
    Ok(())
}

/// A set of changed pages needs a parent that has every page left out of it.
fn check_changed(mem: &[u8], opts: &CreateOptions, inputs: &Inputs) -> Result<(), CreateError> {
    let Some(changed) = &opts.changed else {
        return Ok(());
    };
    let Some((parent, _)) = &inputs.parent else {
        return Err(CreateError::ChangedWithoutParent);
    };
    let pages = (mem.len() / PAGE_SIZE) as u64;
    if changed.pages() != pages {
        return Err(CreateError::ChangedSize {
            set: changed.pages(),
            pages,
        });
    }
    let parent_pages = parent.page_count();
    if let Some(page) = (parent_pages..pages)
        .map(PageIndex)
        .find(|&p| !changed.contains(p))
    {
        return Err(CreateError::UnchangedBeyondParent {
            page,
            parent: parent.path().to_owned(),
            parent_pages,
        });
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Open the disks and the parent; refuse an output that is one of them, or
/// one of the parent's ancestors (replacing it would break the parent, and
/// with it the new checkpoint).
fn open_inputs(input: &Input<'_>, opts: &CreateOptions, out: &Path) -> Result<Inputs, CreateError> {
    let named = opts.disks.iter().chain(&opts.parent).map(|p| p.as_path());
    if let Some(p) = named.chain(input.path).find(|p| same_file(p, out)) {
        return Err(CreateError::OutputIsInput(p.to_owned()));
    }
    let disks: Vec<DiskImage> = opts
        .disks
        .iter()
        .map(|p| DiskImage::open(p))
        .collect::<Result<_, _>>()?;
    let records = disks
        .iter()
        .map(DiskImage::record)
        .collect::<Result<_, _>>()?;
    let parent = match &opts.parent {
        None => None,
        Some(p) => {
            let ck = Checkpoint::open(p).map_err(CreateError::Parent)?;
            let rec = ck.parent_record().map_err(|source| {
                CreateError::Parent(OpenError::Io {
                    path: p.clone(),
                    source,
                })
            })?;
            if let Some(a) = ck.ancestors().iter().find(|a| same_file(a.path(), out)) {
                return Err(CreateError::OutputIsInput(a.path().to_owned()));
            }
            // A chain of n files opens while n <= MAX_PARENT_DEPTH + 1.
            let files = 1 + ck.ancestors().len();
            if files > MAX_PARENT_DEPTH {
                return Err(CreateError::ParentChainTooLong {
                    parent: p.clone(),
                    files,
                });
            }
            Some((ck, rec))
        }
    };
    Ok(Inputs {
        disks,
        records,
        parent,
    })
}

fn scan_disk(d: &DiskImage) -> Result<ScanDisk<'_>, CreateError> {
    ScanDisk::new(d).map_err(|source| CreateError::Scan {
        path: d.path().to_owned(),
        source,
    })
}

fn build_index(
    input: &Input<'_>,
    opts: &CreateOptions,
    disks: &[ScanDisk<'_>],
    bar: &indicatif::ProgressBar,
) -> Result<Option<(ContentIndex, IndexReport)>, CreateError> {
    if !opts.scan_disks || disks.is_empty() {
        return Ok(None);
    }
    bar.set_message("indexing");
    // With a set of changed pages, sampling memory to detect phases would read
    // pages that must not be read: index the structural and aligned phases only
    // (the whole guest passed as a "hole" leaves the sampler nothing to read).
    let everything = 0..(input.mem.len() / PAGE_SIZE) as u64;
    let holes = match opts.changed {
        Some(_) => std::slice::from_ref(&everything),
        None => input.holes,
    };
    let built = scan::build::build(disks, input.mem, holes, &opts.scan, &|n| bar.inc(n));
    built.map(Some).map_err(|source| CreateError::Scan {
        // The scan reads disks in order; name them all if we cannot tell which.
        path: disks
            .iter()
            .map(|d| d.image().path().display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
            .into(),
        source,
    })
}

fn output_mode(input: &Input<'_>, opts: &CreateOptions, inputs: &Inputs) -> u32 {
    let disks = inputs.disks.iter().map(DiskImage::mode);
    let parent = inputs.parent.iter().map(|(ck, _)| ck.file_mode());
    atomic_file::mode_from_inputs(
        std::iter::once(input.mode)
            .chain(disks)
            .chain(parent)
            .chain(opts.input_modes.iter().copied()),
    )
}

fn progress_bar(opts: &CreateOptions, disks: &[DiskImage], mem: u64) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let disk_bytes: u64 = match opts.scan_disks {
        true => disks.iter().map(DiskImage::size).sum(),
        false => 0,
    };
    let bar = indicatif::ProgressBar::new(disk_bytes + mem);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>11} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Why streaming the checkpoint out stopped.
enum Failed {
    /// Writing the file failed.
    Write(io::Error),
    /// Something else, already named.
    Create(CreateError),
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Self {
        Failed::Write(e)
    }
}

/// Classify every page and stream the checkpoint into `file`; returns its size.
fn write_checkpoint(
    c: &mut Classifier<'_>,
    input: &Input<'_>,
    inputs: &Inputs,
    opts: &CreateOptions,
    file: &mut std::fs::File,
    bar: &indicatif::ProgressBar,
) -> Result<u64, Failed> {
    let pages = (input.mem.len() / PAGE_SIZE) as u64;
    let parents: Vec<ParentRecord> = inputs.parent.iter().map(|(_, r)| r.clone()).collect();
    let mut w = CheckpointWriter::new(file, pages, &inputs.records, &parents)?;
    let mut holes = input.holes.iter().peekable();
    for (i, data) in input.mem.chunks_exact(PAGE_SIZE).enumerate() {
        let page = PageIndex(i as u64);
        while holes.next_if(|h| h.end <= page.0).is_some() {}
        if holes.peek().is_some_and(|h| h.contains(&page.0)) {
            // A hole of a sparse image: zero without faulting the page in.
            c.summary.zero_pages += 1;
            w.push(Location::Zero, format::zero_page_crc());
        } else if let Some(from_parent) = c.unchanged(page) {
            // Not read: `data` is never dereferenced for such a page.
            let (loc, crc) = from_parent.map_err(Failed::Create)?;
            c.count(loc);
            w.push(loc, crc);
        } else {
            let crc = crc32fast::hash(data);
            let loc = match c.classify(page, data, crc) {
                Found::At(loc) => loc,
                Found::NewBlob(key) => {
                    let b = w.push_blob(data)?;
                    c.remember_blob(key, b, page);
                    Location::Blob(b)
                }
            };
            c.count(loc);
            w.push(loc, crc);
        }
        if i % RELEASE_PAGES == RELEASE_PAGES - 1 {
            bar.inc(RELEASE_PAGES as u64 * PAGE_SIZE_U64);
            if input.release_behind {
                release(&input.mem[(i + 1 - RELEASE_PAGES) * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            }
        }
    }
    let state = opts.vmm_state.as_deref().unwrap_or_default();
    Ok(w.finish(state)?.file_len())
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
