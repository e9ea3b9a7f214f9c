//! Checking a checkpoint file before anything in it is trusted: header,
//! sections over data (no holes), padding, CRCs, tables.

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::Mmap;

use super::OpenError;
use crate::format::{self, DiskRecord, FormatError, HEADER_LEN, Header, ParentRecord};
use crate::input;
use crate::types::PAGE_SIZE;

/// The file's bytes, checked: header, section holes, padding, CRCs, tables.
pub(super) struct Validated {
    pub(super) map: Mmap,
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
    let file_len = meta.len();
    let mut head = [0u8; HEADER_LEN];
    let n = input::read_up_to(&file, &mut head, 0).map_err(io_err)?;
    let header = Header::decode(&head[..n], file_len).map_err(fmt_err)?;
    check_backed(&file, &header).map_err(|e| match e {
        Ok(f) => fmt_err(f),
        Err(e) => io_err(e),
    })?;
    // SAFETY: the file is opened read-only and only read through the map;
    // every section was checked to lie inside the file. A concurrent truncation
    // by another process would SIGBUS; checkpoints are immutable once written
    // (create renames a finished file into place).
    let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    check_padding(&map, &header).map_err(fmt_err)?;
    let section = |s: format::Section| &map[s.offset as usize..s.end() as usize];
    for (name, s, crc) in [
        ("disk table", header.disks(), header.disks_crc),
        ("parent table", header.parents(), header.parents_crc),
        ("page table", header.table(), header.table_crc),
        ("VMM state", header.state(), header.state_crc),
    ] {
        if crc32fast::hash(section(s)) != crc {
            return Err(fmt_err(FormatError::SectionCrc(name)));
        }
    }
    let disk_records = format::decode_disks(section(header.disks())).map_err(fmt_err)?;
    let parent_records = format::decode_parents(section(header.parents())).map_err(fmt_err)?;
    Ok(Validated {
        map,
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
fn check_padding(map: &[u8], h: &Header) -> Result<(), FormatError> {
    if map.len() as u64 != h.file_len() {
        return Err(FormatError::BadLayout(
            "the file has bytes after its last section",
        ));
    }
    let mut prev_end = HEADER_LEN as u64;
    for (_, s) in h.sections() {
        let gap = &map[prev_end as usize..s.offset as usize];
        if gap.len() >= PAGE_SIZE || gap.iter().any(|&b| b != 0) {
            return Err(FormatError::BadLayout(
                "padding between sections is not up to a page of zeros",
            ));
        }
        prev_end = s.end();
    }
    Ok(())
}
