//! The loading-set file (`VM.ckpt.ls`): the pages a restore touched first,
//! their bytes stored contiguously in first-touch order, so that a later mount
//! reads them in one sequential pass and pushes them into the page cache before
//! the VM runs (REAP, ASPLOS'21; FaaSnap's loading set, EuroSys'22).
//!
//! ```text
//!  0    +--------------------+
//!       | header (128)       |  magic, version, checkpoint identity, guest size,
//!       |                    |  counts, data offset, window, CRCs of runs and data
//!  128  +--------------------+
//!       | runs (20 x R)      |  first page, page count, first-touch ms, flags
//!       +--------------------+  (zero runs carry no bytes)
//!       | padding to 4096    |
//!  data +--------------------+
//!       | pages (4096 x D)   |  the data runs' bytes, in run order
//!       +--------------------+
//! ```
//!
//! A loading set names the checkpoint it was recorded from (its
//! [`PageReader::identity`]); any other checkpoint refuses it. Its header,
//! run table and data carry CRC32s, and every page is also checked against
//! the checkpoint's own CRC of that page before it is used, so a stale,
//! foreign or damaged loading set can never produce wrong bytes: the mount
//! warns and goes on without it.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::atomic_file::AtomicFile;
use crate::checkpoint::ReadError;
use crate::format::{get_u32, get_u64};
use crate::input;
use crate::source::PageReader;
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// First eight bytes of a loading-set file.
pub const MAGIC: [u8; 8] = *b"CKPTLS\0\x01";
/// Version this code writes and reads.
pub const VERSION: u32 = 1;
/// `u32` version.
pub const VERSION_OFFSET: usize = MAGIC.len();
/// `u32` flags, reserved (0).
pub const FLAGS_OFFSET: usize = VERSION_OFFSET + size_of::<u32>();
/// `u64` identity of the checkpoint the set was recorded from.
pub const IDENTITY_OFFSET: usize = FLAGS_OFFSET + size_of::<u32>();
/// `u64` guest memory size in bytes.
pub const GUEST_SIZE_OFFSET: usize = IDENTITY_OFFSET + size_of::<u64>();
/// `u64` number of runs.
pub const RUN_COUNT_OFFSET: usize = GUEST_SIZE_OFFSET + size_of::<u64>();
/// `u64` number of stored pages.
pub const DATA_PAGES_OFFSET: usize = RUN_COUNT_OFFSET + size_of::<u64>();
/// `u64` byte offset of the data section (4096-aligned).
pub const DATA_OFFSET_OFFSET: usize = DATA_PAGES_OFFSET + size_of::<u64>();
/// `u32` recording window in milliseconds.
pub const WINDOW_OFFSET: usize = DATA_OFFSET_OFFSET + size_of::<u64>();
/// `u32` CRC32 of the run table.
pub const RUNS_CRC_OFFSET: usize = WINDOW_OFFSET + size_of::<u32>();
/// `u32` CRC32 of the data section.
pub const DATA_CRC_OFFSET: usize = RUNS_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of header bytes `0..HEADER_CRC_OFFSET` (reserved bytes are 0).
pub const HEADER_CRC_OFFSET: usize = HEADER_LEN - size_of::<u32>();
/// Length of the header.
pub const HEADER_LEN: usize = 128;
/// Length of one run entry: `u64` first page, `u32` pages, `u32` ms, `u32` flags.
pub const RUN_LEN: usize = size_of::<u64>() + 3 * size_of::<u32>();
/// Run flag: the run's pages are zero pages; the file stores no bytes for them.
pub const RUN_ZERO: u32 = 1;

/// One run of pages first touched one after the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First guest page.
    pub first_page: u64,
    /// Number of pages (at least 1).
    pub pages: u32,
    /// Milliseconds from the restore's first read to the run's first touch.
    pub t_ms: u32,
    /// The pages are zero pages (no bytes stored).
    pub zero: bool,
}

/// The validated header of a loading-set file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Identity of the checkpoint the set belongs to.
    pub identity: u64,
    /// Guest memory size in bytes.
    pub guest_size: u64,
    /// Number of runs.
    pub run_count: u64,
    /// Number of stored pages.
    pub data_pages: u64,
    /// Offset of the data section.
    pub data_offset: u64,
    /// Recording window, ms.
    pub window_ms: u32,
    /// CRC32 of the run table.
    pub runs_crc: u32,
    /// CRC32 of the data section.
    pub data_crc: u32,
}

/// Why a loading set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadSetError {
    /// Reading or writing the file failed.
    #[error("loading set {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file's bytes are not a valid loading set.
    #[error("loading set {path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Recorded from another checkpoint (or the checkpoint was re-created).
    #[error(
        "loading set {path} belongs to another checkpoint (identity {found:#018x}, this checkpoint is {want:#018x})"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Identity in the file.
        found: u64,
        /// Identity of the checkpoint.
        want: u64,
    },
    /// A page's bytes do not match the checkpoint's CRC of that page.
    #[error("loading set {path}: bytes of page {page} do not match the checkpoint's CRC")]
    PageMismatch {
        /// The file.
        path: PathBuf,
        /// The page.
        page: u64,
    },
    /// Rebuilding a page from the checkpoint (to record it) failed.
    #[error("loading set {path}: reading the pages to store")]
    Source {
        /// The file being written.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ReadError,
    },
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Header {
    /// Serialize, computing the header CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..MAGIC.len()].copy_from_slice(&MAGIC);
        put_u32(&mut b, VERSION_OFFSET, VERSION);
        put_u32(&mut b, FLAGS_OFFSET, 0);
        put_u64(&mut b, IDENTITY_OFFSET, self.identity);
        put_u64(&mut b, GUEST_SIZE_OFFSET, self.guest_size);
        put_u64(&mut b, RUN_COUNT_OFFSET, self.run_count);
        put_u64(&mut b, DATA_PAGES_OFFSET, self.data_pages);
        put_u64(&mut b, DATA_OFFSET_OFFSET, self.data_offset);
        put_u32(&mut b, WINDOW_OFFSET, self.window_ms);
        put_u32(&mut b, RUNS_CRC_OFFSET, self.runs_crc);
        put_u32(&mut b, DATA_CRC_OFFSET, self.data_crc);
        let crc = crc32fast::hash(&b[..HEADER_CRC_OFFSET]);
        put_u32(&mut b, HEADER_CRC_OFFSET, crc);
        b
    }

    /// Parse and validate a header for a file of `file_len` bytes: magic,
    /// version, CRC, flags, then that the runs and the data fit the file exactly.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Header, String> {
        if b.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
            return Err(format!("{file_len} bytes, shorter than its header"));
        }
        if b[..MAGIC.len()] != MAGIC {
            return Err("not a loading-set file (bad magic)".into());
        }
        let version = get_u32(b, VERSION_OFFSET);
        if version != VERSION {
            return Err(format!(
                "version {version} is not supported (this build reads {VERSION})"
            ));
        }
        if crc32fast::hash(&b[..HEADER_CRC_OFFSET]) != get_u32(b, HEADER_CRC_OFFSET) {
            return Err("header checksum mismatch".into());
        }
        if get_u32(b, FLAGS_OFFSET) != 0 {
            return Err("unknown flags set".into());
        }
        let h = Header {
            identity: get_u64(b, IDENTITY_OFFSET),
            guest_size: get_u64(b, GUEST_SIZE_OFFSET),
            run_count: get_u64(b, RUN_COUNT_OFFSET),
            data_pages: get_u64(b, DATA_PAGES_OFFSET),
            data_offset: get_u64(b, DATA_OFFSET_OFFSET),
            window_ms: get_u32(b, WINDOW_OFFSET),
            runs_crc: get_u32(b, RUNS_CRC_OFFSET),
            data_crc: get_u32(b, DATA_CRC_OFFSET),
        };
        let runs_end = h
            .run_count
            .checked_mul(RUN_LEN as u64)
            .and_then(|l| l.checked_add(HEADER_LEN as u64));
        let data_end = h
            .data_pages
            .checked_mul(PAGE_SIZE_U64)
            .and_then(|l| l.checked_add(h.data_offset));
        match (runs_end, data_end) {
            (Some(r), Some(d))
                if h.data_offset.is_multiple_of(PAGE_SIZE_U64)
                    && r <= h.data_offset
                    && d == file_len => {}
            _ => return Err("run table and data do not fit the file (truncated?)".into()),
        }
        Ok(h)
    }
}

/// Offset of the data section for `runs` runs.
pub fn data_offset(runs: u64) -> u64 {
    (HEADER_LEN as u64 + runs * RUN_LEN as u64).next_multiple_of(PAGE_SIZE_U64)
}

/// Serialize the run table.
pub fn encode_runs(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_LEN);
    for r in runs {
        out.extend_from_slice(&r.first_page.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
        out.extend_from_slice(&r.t_ms.to_le_bytes());
        out.extend_from_slice(&(if r.zero { RUN_ZERO } else { 0 }).to_le_bytes());
    }
    out
}

/// Parse a run table for a guest of `page_count` pages; the data runs must
/// hold `data_pages` pages in all.
pub fn decode_runs(b: &[u8], page_count: u64, data_pages: u64) -> Result<Vec<Run>, String> {
    if !b.len().is_multiple_of(RUN_LEN) {
        return Err("run table length is not a whole number of runs".into());
    }
    let mut runs = Vec::with_capacity(b.len() / RUN_LEN);
    let mut stored = 0u64;
    for (i, e) in b.chunks_exact(RUN_LEN).enumerate() {
        let flags = get_u32(e, 16);
        let run = Run {
            first_page: get_u64(e, 0),
            pages: get_u32(e, 8),
            t_ms: get_u32(e, 12),
            zero: flags & RUN_ZERO != 0,
        };
        let end = run.first_page.checked_add(u64::from(run.pages));
        if run.pages == 0 || end.is_none_or(|e| e > page_count) || flags & !RUN_ZERO != 0 {
            return Err(format!(
                "run {i} is empty, outside guest memory or has unknown flags"
            ));
        }
        if !run.zero {
            stored += u64::from(run.pages);
        }
        runs.push(run);
    }
    if stored != data_pages {
        return Err(format!(
            "runs hold {stored} pages, the header says {data_pages}"
        ));
    }
    Ok(runs)
}

/// What [`write`] stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteSummary {
    /// Runs in the index.
    pub runs: u64,
    /// Pages with bytes stored.
    pub data_pages: u64,
    /// Zero pages listed without bytes.
    pub zero_pages: u64,
    /// File size in bytes.
    pub file_bytes: u64,
}

/// Write a loading set of `runs` (in first-touch order) from `source` to `path`
/// (atomically, mode `mode`). Data runs' bytes are rebuilt (CRC-checked) from
/// `source`; zero runs are listed without bytes.
pub fn write(
    path: &Path,
    source: &dyn PageReader,
    runs: &[Run],
    window_ms: u32,
    mode: u32,
) -> Result<WriteSummary, LoadSetError> {
    let io_err = |source| LoadSetError::Io {
        path: path.to_owned(),
        source,
    };
    let table = encode_runs(runs);
    let data_offset = data_offset(runs.len() as u64);
    let mut f = AtomicFile::create(path, mode).map_err(io_err)?;
    let mut crc = crc32fast::Hasher::new();
    let mut summary = WriteSummary {
        runs: runs.len() as u64,
        ..WriteSummary::default()
    };
    let mut buf = Vec::new();
    let mut at = data_offset;
    for r in runs {
        if r.zero {
            summary.zero_pages += u64::from(r.pages);
            continue;
        }
        buf.resize(r.pages as usize * PAGE_SIZE, 0);
        source
            .read_pages(PageIndex(r.first_page), &mut buf)
            .map_err(|source| LoadSetError::Source {
                path: path.to_owned(),
                source,
            })?;
        f.file().write_all_at(&buf, at).map_err(io_err)?;
        crc.update(&buf);
        at += buf.len() as u64;
        summary.data_pages += u64::from(r.pages);
    }
    let header = Header {
        identity: source.identity(),
        guest_size: source.guest_size(),
        run_count: runs.len() as u64,
        data_pages: summary.data_pages,
        data_offset,
        window_ms,
        runs_crc: crc32fast::hash(&table),
        data_crc: crc.finalize(),
    };
    let file = f.file();
    file.write_all_at(&header.encode(), 0).map_err(io_err)?;
    file.write_all_at(&table, HEADER_LEN as u64)
        .map_err(io_err)?;
    file.set_len(at).map_err(io_err)?;
    file.flush().map_err(io_err)?;
    f.commit().map_err(io_err)?;
    summary.file_bytes = at;
    Ok(summary)
}

/// An opened, validated loading set (its data not read yet).
#[derive(Debug)]
pub struct LoadingSet {
    path: PathBuf,
    file: File,
    header: Header,
    runs: Vec<Run>,
}

/// A piece of a [`Block`]: `pages` pages of guest memory from `first_page`,
/// at byte `at` of the block's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// First guest page.
    pub first_page: u64,
    /// Pages.
    pub pages: u32,
    /// Byte offset in [`Block::data`].
    pub at: usize,
}

/// Consecutive stored pages read in one go.
#[derive(Debug, Default)]
pub struct Block {
    /// The bytes.
    pub data: Vec<u8>,
    /// Where each run (or part of a run) lies in `data`.
    pub pieces: Vec<Piece>,
}

impl LoadingSet {
    /// Open `path` and validate it against `source` (the checkpoint it must
    /// belong to): header, identity, guest size, run table. Reads no data.
    pub fn open(path: &Path, source: &dyn PageReader) -> Result<Self, LoadSetError> {
        let io_err = |e| LoadSetError::Io {
            path: path.to_owned(),
            source: e,
        };
        let bad = |what: String| LoadSetError::Format {
            path: path.to_owned(),
            what,
        };
        let (file, meta) = crate::input::open_regular(path).map_err(io_err)?;
        let len = meta.len();
        {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise only advises the kernel about an open descriptor.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
        let mut hb = [0u8; HEADER_LEN];
        let n = input::read_up_to(&file, &mut hb, 0).map_err(io_err)?;
        let header = Header::decode(&hb[..n], len).map_err(bad)?;
        if header.identity != source.identity() {
            return Err(LoadSetError::Foreign {
                path: path.to_owned(),
                found: header.identity,
                want: source.identity(),
            });
        }
        if header.guest_size != source.guest_size() {
            return Err(bad(format!(
                "recorded for a {}-byte guest, the checkpoint has {}",
                header.guest_size,
                source.guest_size()
            )));
        }
        if header.run_count > source.page_count() {
            return Err(bad("more runs than guest pages".into()));
        }
        let mut table = vec![0u8; header.run_count as usize * RUN_LEN];
        file.read_exact_at(&mut table, HEADER_LEN as u64)
            .map_err(io_err)?;
        if crc32fast::hash(&table) != header.runs_crc {
            return Err(bad("run table checksum mismatch".into()));
        }
        let runs = decode_runs(&table, source.page_count(), header.data_pages).map_err(bad)?;
        Ok(LoadingSet {
            path: path.to_owned(),
            file,
            header,
            runs,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The runs, in first-touch order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Bytes of stored pages.
    pub fn data_bytes(&self) -> u64 {
        self.header.data_pages * PAGE_SIZE_U64
    }

    /// A reader of the data section in blocks of about `block_bytes`
    /// (whole pages), in file order, checking the data CRC at the end.
    pub fn blocks(&self, block_bytes: usize) -> BlockReader<'_> {
        BlockReader {
            set: self,
            block_pages: (block_bytes / PAGE_SIZE).max(1) as u64,
            run: 0,
            run_done: 0,
            at: self.header.data_offset,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// Check `data` (pages from `first`) against `source`'s CRCs; the first
    /// mismatching page is an error.
    pub fn verify(
        &self,
        source: &dyn PageReader,
        first: u64,
        data: &[u8],
    ) -> Result<(), LoadSetError> {
        for (k, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let p = first + k as u64;
            let ok = source
                .entry(PageIndex(p))
                .is_ok_and(|e| e.crc == crc32fast::hash(page));
            if !ok {
                return Err(LoadSetError::PageMismatch {
                    path: self.path.clone(),
                    page: p,
                });
            }
        }
        Ok(())
    }
}

/// Sequential reader of a loading set's data (see [`LoadingSet::blocks`]).
#[derive(Debug)]
pub struct BlockReader<'a> {
    set: &'a LoadingSet,
    block_pages: u64,
    run: usize,
    run_done: u32,
    at: u64,
    crc: crc32fast::Hasher,
}

impl BlockReader<'_> {
    /// The next block, or None at the end of the data (after checking its CRC).
    pub fn next_block(&mut self) -> Result<Option<Block>, LoadSetError> {
        let set = self.set;
        let mut block = Block::default();
        let mut pages = 0u64;
        while pages < self.block_pages && self.run < set.runs.len() {
            let r = set.runs[self.run];
            if r.zero {
                self.run += 1;
                continue;
            }
            let left = r.pages - self.run_done;
            let take = (self.block_pages - pages).min(u64::from(left)) as u32;
            block.pieces.push(Piece {
                first_page: r.first_page + u64::from(self.run_done),
                pages: take,
                at: pages as usize * PAGE_SIZE,
            });
            pages += u64::from(take);
            self.run_done += take;
            if self.run_done == r.pages {
                self.run += 1;
                self.run_done = 0;
            }
        }
        if pages == 0 {
            if self.crc.clone().finalize() != set.header.data_crc {
                return Err(LoadSetError::Format {
                    path: set.path.clone(),
                    what: "data checksum mismatch".into(),
                });
            }
            return Ok(None);
        }
        block.data = vec![0u8; pages as usize * PAGE_SIZE];
        set.file
            .read_exact_at(&mut block.data, self.at)
            .map_err(|source| LoadSetError::Io {
                path: set.path.clone(),
                source,
            })?;
        self.crc.update(&block.data);
        // Read once: drop it from the page cache, so a loading set does not
        // occupy memory twice (its own cache and `memory`'s).
        input::drop_cached(&set.file, self.at, block.data.len() as u64);
        self.at += block.data.len() as u64;
        Ok(Some(block))
    }
}

/// Merge first touches (page, ms since the first read, zero?) in touch order
/// into runs: a page continues the previous run when it is the next page and
/// of the same kind.
pub fn runs_from_touches(touches: &[(u64, u32, bool)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(page, t_ms, zero) in touches {
        if let Some(r) = runs.last_mut()
            && r.zero == zero
            && r.first_page + u64::from(r.pages) == page
            && r.pages < u32::MAX
        {
            r.pages += 1;
            continue;
        }
        runs.push(Run {
            first_page: page,
            pages: 1,
            t_ms,
            zero,
        });
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemReader;

    fn guest() -> MemReader {
        let mut data = vec![0u8; 16 * PAGE_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            if !(i / PAGE_SIZE).is_multiple_of(4) {
                *b = (i * 7 / 3) as u8;
            }
        }
        MemReader::new(data)
    }

    fn sample_runs() -> Vec<Run> {
        runs_from_touches(&[
            (5, 0, false),
            (6, 0, false),
            (7, 1, false),
            (0, 2, true),
            (2, 3, false),
            (9, 9, false),
        ])
    }

    #[test]
    fn touches_merge_into_runs_of_one_kind() {
        let runs = sample_runs();
        let shape: Vec<(u64, u32, bool)> = runs
            .iter()
            .map(|r| (r.first_page, r.pages, r.zero))
            .collect();
        assert_eq!(
            shape,
            vec![(5, 3, false), (0, 1, true), (2, 1, false), (9, 1, false)]
        );
        assert_eq!(runs[3].t_ms, 9);
    }

    #[test]
    fn golden_header_bytes() {
        let h = Header {
            identity: 0x1122_3344_5566_7788,
            guest_size: 1 << 20,
            run_count: 2,
            data_pages: 3,
            data_offset: 4096,
            window_ms: 5000,
            runs_crc: 0xaabb_ccdd,
            data_crc: 0x0102_0304,
        };
        let b = h.encode();
        let mut want = Vec::new();
        want.extend_from_slice(b"CKPTLS\0\x01"); // magic
        want.extend_from_slice(&[1, 0, 0, 0]); // version 1
        want.extend_from_slice(&[0, 0, 0, 0]); // flags
        want.extend_from_slice(&[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]); // identity
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]); // guest size 1 MiB
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]); // 2 runs
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // 3 data pages
        want.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // data at 4096
        want.extend_from_slice(&[0x88, 0x13, 0, 0]); // window 5000 ms
        want.extend_from_slice(&[0xdd, 0xcc, 0xbb, 0xaa]); // runs CRC
        want.extend_from_slice(&[4, 3, 2, 1]); // data CRC
        want.resize(HEADER_CRC_OFFSET, 0); // reserved
        let crc = crc32fast::hash(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(b.to_vec(), want);
        assert_eq!(Header::decode(&b, 4096 + 3 * 4096).unwrap(), h);
    }

    #[test]
    fn write_then_read_back_every_page() {
        let g = guest();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ckpt.ls");
        let runs = sample_runs();
        let s = write(&path, &g, &runs, 5000, 0o600).unwrap();
        assert_eq!((s.runs, s.data_pages, s.zero_pages), (4, 5, 1));
        assert_eq!(s.file_bytes, 4096 + 5 * 4096);
        let set = LoadingSet::open(&path, &g).unwrap();
        assert_eq!(set.runs(), &runs[..]);
        assert_eq!(set.header().window_ms, 5000);
        // Blocks of two pages split the 3-page run.
        let mut reader = set.blocks(2 * PAGE_SIZE);
        let mut got = Vec::new();
        while let Some(b) = reader.next_block().unwrap() {
            for p in &b.pieces {
                let bytes = &b.data[p.at..p.at + p.pages as usize * PAGE_SIZE];
                set.verify(&g, p.first_page, bytes).unwrap();
                assert_eq!(
                    bytes,
                    &g.data[p.first_page as usize * PAGE_SIZE..][..bytes.len()]
                );
                got.extend((0..p.pages).map(|k| p.first_page + u64::from(k)));
            }
        }
        assert_eq!(got, vec![5, 6, 7, 2, 9]);
    }

    #[test]
    fn foreign_or_damaged_sets_are_refused() {
        let g = guest();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.ckpt.ls");
        write(&path, &g, &sample_runs(), 5000, 0o600).unwrap();
        let mut other = guest();
        other.data[1] ^= 1;
        assert!(matches!(
            LoadingSet::open(&path, &other),
            Err(LoadSetError::Foreign { .. })
        ));
        let good = std::fs::read(&path).unwrap();
        // A flipped data byte: the set opens, the page fails against the checkpoint CRC.
        let mut bad = good.clone();
        bad[4096 + 10] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let set = LoadingSet::open(&path, &g).unwrap();
        let b = set.blocks(1 << 20).next_block().unwrap().unwrap();
        let err = set.verify(&g, 5, &b.data[..PAGE_SIZE]).unwrap_err();
        assert!(
            matches!(err, LoadSetError::PageMismatch { page: 5, .. }),
            "{err}"
        );
        // A flipped run-table byte, a truncated file, a flipped header byte.
        for (at, len) in [
            (HEADER_LEN + 1, good.len()),
            (0, good.len() - 1),
            (20, good.len()),
        ] {
            let mut bad = good[..len].to_vec();
            if at > 0 {
                bad[at] ^= 1;
            }
            std::fs::write(&path, &bad).unwrap();
            let err = LoadingSet::open(&path, &g).unwrap_err();
            assert!(matches!(err, LoadSetError::Format { .. }), "{err}");
        }
    }

    #[test]
    fn runs_outside_memory_or_miscounted_are_refused() {
        let runs = encode_runs(&[Run {
            first_page: 15,
            pages: 2,
            t_ms: 0,
            zero: false,
        }]);
        assert!(decode_runs(&runs, 16, 2).is_err());
        assert!(decode_runs(&runs, 17, 2).is_ok());
        assert!(decode_runs(&runs, 17, 3).is_err());
        assert!(decode_runs(&runs[..5], 17, 2).is_err());
    }
}
