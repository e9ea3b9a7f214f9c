//! Checking a checkpoint file before anything in it is trusted: header,
//! sections over data (no holes), padding, CRCs, tables.
//!
//! Everything but the blobs is read into memory here (the tables are 12
//! bytes a guest page, the VMM state is bounded), and blobs are read later
//! with pread: nothing is mapped, so a checkpoint truncated or rewritten
//! while it is served makes reads fail (EIO), never SIGBUS the reader.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::OpenError;
use crate::format::{self, DiskRecord, FormatError, HEADER_LEN, Header, ParentRecord};
use crate::input;
use crate::types::PAGE_SIZE;

/// The file, checked: header, section holes, padding, CRCs, tables.
pub(super) struct Validated {
    pub(super) file: File,
    /// The header's bytes.
    pub(super) head: [u8; HEADER_LEN],
    /// The page table.
    pub(super) table: Box<[u8]>,
    /// The VMM-state section.
    pub(super) state: Box<[u8]>,
    /// Sampled fingerprint of the whole file.
    pub(super) fingerprint: u64,
    pub(super) file_len: u64,
    pub(super) mode: u32,
    pub(super) header: Header,
    pub(super) disk_records: Vec<DiskRecord>,
    pub(super) parent_records: Vec<ParentRecord>,
}

pub(super) fn validate(path: &Path) -> Result<Validated, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let fmt_err = |source| OpenError::Format {
        path: path.to_owned(),
        source,
    };
    let (file, meta) = input::open_regular(path).map_err(io_err)?;
    // Tables are read whole, then blobs one run at a time at scattered
    // offsets: no readahead. Set before the first read: pages a readahead
    // leaves marked would set off ever larger async readahead as scattered
    // reads hit them (measured: 64 sampled 4 KiB reads pulled 104 MB).
    input::advise(&file, input::Access::Random);
    let file_len = meta.len();
    let mut head = [0u8; HEADER_LEN];
    let n = input::read_up_to(&file, &mut head, 0).map_err(io_err)?;
    let header = Header::decode(&head[..n], file_len).map_err(fmt_err)?;
    check_backed(&file, &header).map_err(|e| match e {
        Ok(f) => fmt_err(f),
        Err(e) => io_err(e),
    })?;
    check_padding(&file, &header).map_err(|e| match e {
        Ok(f) => fmt_err(f),
        Err(e) => io_err(e),
    })?;
    let read = |s: format::Section| -> io::Result<Box<[u8]>> {
        let mut b = vec![0u8; s.len as usize].into_boxed_slice();
        file.read_exact_at(&mut b, s.offset)?;
        Ok(b)
    };
    let disks = read(header.disks()).map_err(io_err)?;
    let parents = read(header.parents()).map_err(io_err)?;
    let table = read(header.table()).map_err(io_err)?;
    let state = read(header.state()).map_err(io_err)?;
    for (name, bytes, crc) in [
        ("disk table", &disks, header.disks_crc),
        ("parent table", &parents, header.parents_crc),
        ("page table", &table, header.table_crc),
        ("VMM state", &state, header.state_crc),
    ] {
        if crc32fast::hash(bytes) != crc {
            return Err(fmt_err(FormatError::SectionCrc(name)));
        }
    }
    let disk_records = format::decode_disks(&disks).map_err(fmt_err)?;
    let parent_records = format::decode_parents(&parents).map_err(fmt_err)?;
    let fingerprint = crate::disk::file_fingerprint(&file, file_len).map_err(io_err)?;
    Ok(Validated {
        file,
        head,
        table,
        state,
        fingerprint,
        file_len,
        mode: input::mode_bits(&meta),
        header,
        disk_records,
        parent_records,
    })
}

/// Every section but the VMM state must be backed by data: a sparse file that
/// claims gigabytes of tables or blobs it does not hold is refused before any
/// work is done on them (create never leaves a hole there; the state may
/// legitimately hold zero blocks that some file systems store as holes, and
/// is bounded by [`format::MAX_STATE_LEN`] instead).
fn check_backed(file: &File, h: &Header) -> Result<(), Result<FormatError, io::Error>> {
    for (section, s) in h.sections().into_iter().take(4) {
        if let Some(hole) = input::first_hole(file, s.offset, s.end()).map_err(Err)? {
            return Err(Ok(FormatError::SectionHole {
                section,
                offset: s.offset,
                len: s.len,
                hole,
            }));
        }
    }
    Ok(())
}

/// Bytes between sections are zero padding shorter than a page, and nothing
/// follows the last section, so every byte of the file is covered by a check.
fn check_padding(file: &File, h: &Header) -> Result<(), Result<FormatError, io::Error>> {
    let len = file.metadata().map_err(Err)?.len();
    if len != h.file_len() {
        return Err(Ok(FormatError::BadLayout(
            "the file has bytes after its last section",
        )));
    }
    let mut prev_end = HEADER_LEN as u64;
    let mut gap = vec![0u8; PAGE_SIZE];
    for (_, s) in h.sections() {
        let n = s.offset - prev_end;
        if n >= PAGE_SIZE as u64 {
            return Err(Ok(FormatError::BadLayout(
                "padding between sections is not up to a page of zeros",
            )));
        }
        let gap = &mut gap[..n as usize];
        file.read_exact_at(gap, prev_end).map_err(Err)?;
        if gap.iter().any(|&b| b != 0) {
            return Err(Ok(FormatError::BadLayout(
                "padding between sections is not up to a page of zeros",
            )));
        }
        prev_end = s.end();
    }
    Ok(())
}
