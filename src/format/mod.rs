//! The on-disk layout of a `*.ckpt` file (format version 2).
//!
//! ```text
//!  offset 0        256                                                align 4096
//!  +--------------+------------+--------------+------------------+-------------------+-----------+
//!  | header (256) | disk table | parent table | page table       | blob section      | VMM state |
//!  |              | (variable) | (variable)   | 12 B x page_count| 4096 x blob_count | (opaque)  |
//!  +--------------+------------+--------------+------------------+-------------------+-----------+
//! ```
//!
//! All integers are little endian. The header carries the offset and length of
//! every section and a CRC32 of itself; the disk table, the parent table, the
//! page table and the VMM state carry CRC32s in the header; every page carries
//! the CRC32 of its own bytes in its page-table entry, so a page rebuilt from a
//! stale disk block, a changed parent or a damaged blob is caught when it is
//! read. `docs/FORMAT.md` gives every field byte by byte.
//!
//! A page-table entry ([`entry`]) is a `u64` location and the page's `u32` CRC32:
//!
//! ```text
//!  bits 63..62  kind: 0 = ZERO, 1 = DISK, 2 = BLOB, 3 = PARENT
//!  ZERO:   bits 61..0 are 0
//!  DISK:   bits 61..48 disk index, bits 47..0 sector (byte offset / 512)
//!  BLOB:   bits 61..0 blob index (the page is at blob_offset + index * 4096)
//!  PARENT: bits 61..48 parent index, bits 47..0 are 0 (the same page of that parent)
//! ```
//!
//! Everything that decides where a byte goes lives here: [`layout::Layout`]
//! places the sections and [`layout::CheckpointWriter`] streams a checkpoint
//! out; `create` only decides what each page is. Decoding never trusts a
//! field: every parse returns a [`FormatError`] naming what is wrong.

pub mod entry;
pub mod layout;
pub mod tables;

pub use entry::{
    ENTRY_LEN, Location, MAX_BLOBS, MAX_DISK_OFFSET, MAX_DISKS, MAX_PARENTS, decode_entry,
    encode_entry,
};
pub use layout::{CheckpointWriter, Layout};
pub use tables::{
    DiskFormat, DiskRecord, ParentRecord, decode_disks, decode_parents, encode_disks,
    encode_parents,
};

use crate::types::{PAGE_SIZE, PAGE_SIZE_U64};

/// First eight bytes of every checkpoint.
pub const MAGIC: [u8; 8] = *b"CKPTFS\r\n";
/// Format version this code writes and reads.
pub const VERSION: u32 = 2;

/// `[u8; 8]` magic.
pub const MAGIC_OFFSET: usize = 0;
/// `u32` format version.
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + MAGIC.len();
/// `u32` page size (always 4096).
pub const PAGE_SIZE_OFFSET: usize = VERSION_OFFSET + size_of::<u32>();
/// `u64` guest memory size in bytes.
pub const GUEST_SIZE_OFFSET: usize = PAGE_SIZE_OFFSET + size_of::<u32>();
/// `u64` number of guest pages (guest size / page size).
pub const PAGE_COUNT_OFFSET: usize = GUEST_SIZE_OFFSET + size_of::<u64>();
/// `u64` + `u64`: disk table offset and length.
pub const DISKS_OFFSET: usize = PAGE_COUNT_OFFSET + size_of::<u64>();
/// `u64` + `u64`: parent table offset and length.
pub const PARENTS_OFFSET: usize = DISKS_OFFSET + 2 * size_of::<u64>();
/// `u64` + `u64`: page table offset and length.
pub const TABLE_OFFSET: usize = PARENTS_OFFSET + 2 * size_of::<u64>();
/// `u64` + `u64`: blob section offset and number of blobs.
pub const BLOBS_OFFSET: usize = TABLE_OFFSET + 2 * size_of::<u64>();
/// `u64` + `u64`: VMM-state section offset and length.
pub const STATE_OFFSET: usize = BLOBS_OFFSET + 2 * size_of::<u64>();
/// `u32` CRC32 of the disk table.
pub const DISKS_CRC_OFFSET: usize = STATE_OFFSET + 2 * size_of::<u64>();
/// `u32` CRC32 of the parent table.
pub const PARENTS_CRC_OFFSET: usize = DISKS_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of the page table.
pub const TABLE_CRC_OFFSET: usize = PARENTS_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of the VMM-state section.
pub const STATE_CRC_OFFSET: usize = TABLE_CRC_OFFSET + size_of::<u32>();
/// `u32` flags, all reserved (written 0, must read 0).
pub const FLAGS_OFFSET: usize = STATE_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of header bytes `0..HEADER_CRC_OFFSET`; reserved bytes before it are 0.
pub const HEADER_CRC_OFFSET: usize = HEADER_LEN - size_of::<u32>();
/// Length of the header.
pub const HEADER_LEN: usize = 256;
/// Bytes a reader needs to tell a checkpoint and its version (magic + version).
pub const IDENT_LEN: usize = VERSION_OFFSET + size_of::<u32>();

/// Largest VMM-state section accepted (written or read): device and vCPU state
/// is kilobytes to a few MiB (QEMU's VGA memory is the large case at 16 MiB),
/// so a bigger claim is a damaged or hostile file, refused before any work.
pub const MAX_STATE_LEN: u64 = 256 << 20;

/// CRC32 of a 4 KiB page of zeros.
pub fn zero_page_crc() -> u32 {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    crc32fast::hash(&ZERO)
}

/// What is wrong with a checkpoint's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// File too short for the header.
    #[error("file is {len} bytes, shorter than the {need}-byte header (truncated?)")]
    TooShort {
        /// File length.
        len: u64,
        /// Bytes needed.
        need: usize,
    },
    /// Magic does not match.
    #[error("not a ckptfs checkpoint (bad magic)")]
    BadMagic,
    /// A checkpoint of format version 1, which this build no longer reads.
    #[error(
        "format version 1 is no longer supported (this build reads version {VERSION}); re-create it from the memory dump with `ckptfs create`"
    )]
    OldVersion,
    /// Unsupported version.
    #[error("format version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u32),
    /// Header CRC mismatch.
    #[error("header checksum mismatch (corrupted header)")]
    HeaderCrc,
    /// Page size other than 4096.
    #[error("page size {0} is not supported (only 4096)")]
    BadPageSize(u32),
    /// Guest size and page count disagree.
    #[error("guest size {guest_size} does not match {page_count} pages")]
    BadGuestSize {
        /// Guest size field.
        guest_size: u64,
        /// Page count field.
        page_count: u64,
    },
    /// A section lies outside the file.
    #[error(
        "{section} section ({offset:#x} + {len:#x}) lies outside the {file_len}-byte file (truncated?)"
    )]
    SectionOutOfBounds {
        /// Which section.
        section: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// A section claims bytes the file does not hold (a hole of a sparse file).
    #[error(
        "{section} section ({offset:#x} + {len:#x}) is not backed by data: the file has a hole at {hole:#x}"
    )]
    SectionHole {
        /// Which section.
        section: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Where the hole starts.
        hole: u64,
    },
    /// The VMM-state section is larger than any VMM writes.
    #[error("VMM-state section of {0} bytes is larger than the {MAX_STATE_LEN}-byte limit")]
    StateTooLarge(u64),
    /// A section's layout is inconsistent.
    #[error("{0}")]
    BadLayout(&'static str),
    /// A section's CRC mismatch.
    #[error("{0} checksum mismatch (corrupted)")]
    SectionCrc(&'static str),
    /// Disk table could not be parsed.
    #[error("disk table is malformed: {0}")]
    BadDiskTable(&'static str),
    /// Parent table could not be parsed.
    #[error("parent table is malformed: {0}")]
    BadParentTable(&'static str),
    /// A page-table entry is invalid.
    #[error("page-table entry of page {page} is invalid: {what}")]
    BadEntry {
        /// Page index.
        page: u64,
        /// What is wrong.
        what: &'static str,
    },
}

/// A section of the file: where it starts and how many bytes it spans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Section {
    /// Offset of its first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Section {
    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Header fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Guest memory size in bytes.
    pub guest_size: u64,
    /// Number of guest pages.
    pub page_count: u64,
    /// Disk table offset.
    pub disks_offset: u64,
    /// Disk table length.
    pub disks_len: u64,
    /// Parent table offset.
    pub parents_offset: u64,
    /// Parent table length.
    pub parents_len: u64,
    /// Page table offset.
    pub table_offset: u64,
    /// Page table length.
    pub table_len: u64,
    /// Blob section offset (4096-aligned).
    pub blobs_offset: u64,
    /// Number of blobs.
    pub blob_count: u64,
    /// VMM-state offset.
    pub state_offset: u64,
    /// VMM-state length.
    pub state_len: u64,
    /// CRC32 of the disk table.
    pub disks_crc: u32,
    /// CRC32 of the parent table.
    pub parents_crc: u32,
    /// CRC32 of the page table.
    pub table_crc: u32,
    /// CRC32 of the VMM state.
    pub state_crc: u32,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads a little-endian `u32` at `at`; `buf` must be long enough.
pub fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a little-endian `u64` at `at`; `buf` must be long enough.
pub fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// The disk table.
    pub fn disks(&self) -> Section {
        Section {
            offset: self.disks_offset,
            len: self.disks_len,
        }
    }

    /// The parent table.
    pub fn parents(&self) -> Section {
        Section {
            offset: self.parents_offset,
            len: self.parents_len,
        }
    }

    /// The page table.
    pub fn table(&self) -> Section {
        Section {
            offset: self.table_offset,
            len: self.table_len,
        }
    }

    /// The blob section (its length saturates on absurd counts; decode refuses those).
    pub fn blobs(&self) -> Section {
        Section {
            offset: self.blobs_offset,
            len: self.blob_count.saturating_mul(PAGE_SIZE_U64),
        }
    }

    /// The VMM-state section.
    pub fn state(&self) -> Section {
        Section {
            offset: self.state_offset,
            len: self.state_len,
        }
    }

    /// Every section, named, in file order.
    pub fn sections(&self) -> [(&'static str, Section); 5] {
        [
            ("disk table", self.disks()),
            ("parent table", self.parents()),
            ("page table", self.table()),
            ("blob", self.blobs()),
            ("VMM state", self.state()),
        ]
    }

    /// One past the last byte of the last section: the length of the file.
    pub fn file_len(&self) -> u64 {
        self.state().end()
    }

    /// Serialize, computing the header CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()].copy_from_slice(&MAGIC);
        put_u32(&mut b, VERSION_OFFSET, VERSION);
        put_u32(&mut b, PAGE_SIZE_OFFSET, PAGE_SIZE as u32);
        put_u64(&mut b, GUEST_SIZE_OFFSET, self.guest_size);
        put_u64(&mut b, PAGE_COUNT_OFFSET, self.page_count);
        let pairs = [
            (DISKS_OFFSET, self.disks_offset, self.disks_len),
            (PARENTS_OFFSET, self.parents_offset, self.parents_len),
            (TABLE_OFFSET, self.table_offset, self.table_len),
            (BLOBS_OFFSET, self.blobs_offset, self.blob_count),
            (STATE_OFFSET, self.state_offset, self.state_len),
        ];
        for (at, a, n) in pairs {
            put_u64(&mut b, at, a);
            put_u64(&mut b, at + size_of::<u64>(), n);
        }
        put_u32(&mut b, DISKS_CRC_OFFSET, self.disks_crc);
        put_u32(&mut b, PARENTS_CRC_OFFSET, self.parents_crc);
        put_u32(&mut b, TABLE_CRC_OFFSET, self.table_crc);
        put_u32(&mut b, STATE_CRC_OFFSET, self.state_crc);
        put_u32(&mut b, FLAGS_OFFSET, 0);
        let crc = crc32fast::hash(&b[..HEADER_CRC_OFFSET]);
        put_u32(&mut b, HEADER_CRC_OFFSET, crc);
        b
    }

    /// Parse and validate a header from the start of a file of `file_len` bytes.
    ///
    /// Checks, in order: length for magic and version, magic, version, length
    /// for the header, header CRC, page size, flags, then that every section
    /// lies inside the file in the documented order and the state is not
    /// larger than [`MAX_STATE_LEN`].
    pub fn decode(b: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let too_short = |need| FormatError::TooShort {
            len: file_len,
            need,
        };
        if b.len() < IDENT_LEN || file_len < IDENT_LEN as u64 {
            return Err(too_short(HEADER_LEN));
        }
        if b[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        match get_u32(b, VERSION_OFFSET) {
            VERSION => {}
            1 => return Err(FormatError::OldVersion),
            v => return Err(FormatError::BadVersion(v)),
        }
        if b.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
            return Err(too_short(HEADER_LEN));
        }
        if crc32fast::hash(&b[..HEADER_CRC_OFFSET]) != get_u32(b, HEADER_CRC_OFFSET) {
            return Err(FormatError::HeaderCrc);
        }
        let page_size = get_u32(b, PAGE_SIZE_OFFSET);
        if page_size as usize != PAGE_SIZE {
            return Err(FormatError::BadPageSize(page_size));
        }
        if get_u32(b, FLAGS_OFFSET) != 0 {
            return Err(FormatError::BadLayout("unknown flags set in header"));
        }
        let pair = |at: usize| (get_u64(b, at), get_u64(b, at + size_of::<u64>()));
        let (disks_offset, disks_len) = pair(DISKS_OFFSET);
        let (parents_offset, parents_len) = pair(PARENTS_OFFSET);
        let (table_offset, table_len) = pair(TABLE_OFFSET);
        let (blobs_offset, blob_count) = pair(BLOBS_OFFSET);
        let (state_offset, state_len) = pair(STATE_OFFSET);
        let h = Header {
            guest_size: get_u64(b, GUEST_SIZE_OFFSET),
            page_count: get_u64(b, PAGE_COUNT_OFFSET),
            disks_offset,
            disks_len,
            parents_offset,
            parents_len,
            table_offset,
            table_len,
            blobs_offset,
            blob_count,
            state_offset,
            state_len,
            disks_crc: get_u32(b, DISKS_CRC_OFFSET),
            parents_crc: get_u32(b, PARENTS_CRC_OFFSET),
            table_crc: get_u32(b, TABLE_CRC_OFFSET),
            state_crc: get_u32(b, STATE_CRC_OFFSET),
        };
        h.validate_layout(file_len)?;
        Ok(h)
    }

    fn validate_layout(&self, file_len: u64) -> Result<(), FormatError> {
        if self.page_count.checked_mul(PAGE_SIZE_U64) != Some(self.guest_size) {
            return Err(FormatError::BadGuestSize {
                guest_size: self.guest_size,
                page_count: self.page_count,
            });
        }
        if self.page_count.checked_mul(ENTRY_LEN as u64) != Some(self.table_len) {
            return Err(FormatError::BadLayout(
                "page table length does not match the page count",
            ));
        }
        if !self.blobs_offset.is_multiple_of(PAGE_SIZE_U64) {
            return Err(FormatError::BadLayout("blob section is not 4096-aligned"));
        }
        let mut prev_end = HEADER_LEN as u64;
        for (section, s) in self.sections() {
            let inside = s
                .offset
                .checked_add(s.len)
                .filter(|&e| e <= file_len && s.len < u64::MAX / 2);
            let Some(end) = inside else {
                return Err(FormatError::SectionOutOfBounds {
                    section,
                    offset: s.offset,
                    len: s.len,
                    file_len,
                });
            };
            if s.offset < prev_end {
                return Err(FormatError::BadLayout(
                    "sections overlap or are out of order",
                ));
            }
            prev_end = end;
        }
        if self.state_len > MAX_STATE_LEN {
            return Err(FormatError::StateTooLarge(self.state_len));
        }
        Ok(())
    }
}

/// Round `n` up to a multiple of the page size.
pub fn page_align(n: u64) -> u64 {
    n.div_ceil(PAGE_SIZE_U64) * PAGE_SIZE_U64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> Header {
        Header {
            guest_size: 2 * 4096,
            page_count: 2,
            disks_offset: 256,
            disks_len: 4,
            parents_offset: 260,
            parents_len: 4,
            table_offset: 264,
            table_len: 24,
            blobs_offset: 4096,
            blob_count: 1,
            state_offset: 8192,
            state_len: 3,
            disks_crc: 0x1111_1111,
            parents_crc: 0x4444_4444,
            table_crc: 0x2222_2222,
            state_crc: 0x3333_3333,
        }
    }

    fn le(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }

    #[test]
    fn header_golden_bytes() {
        let b = sample_header().encode();
        // magic
        assert_eq!(&b[0..8], b"CKPTFS\r\n");
        // version 2, page size 4096
        assert_eq!(&b[8..12], &[2, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0, 0x10, 0, 0]);
        // guest size 8192, page count 2
        assert_eq!(&b[16..24], &[0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..32], &[2, 0, 0, 0, 0, 0, 0, 0]);
        // disk table at 256, 4 bytes
        assert_eq!(&b[32..40], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[40..48], &le(4));
        // parent table at 260, 4 bytes
        assert_eq!(&b[48..56], &[4, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[56..64], &le(4));
        // page table at 264, 24 bytes
        assert_eq!(&b[64..72], &[8, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[72..80], &le(24));
        // blobs at 4096, 1 blob
        assert_eq!(&b[80..88], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[88..96], &le(1));
        // state at 8192, 3 bytes
        assert_eq!(&b[96..104], &[0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[104..112], &le(3));
        // disk, parent, page table, state CRCs; flags
        assert_eq!(&b[112..116], &[0x11; 4]);
        assert_eq!(&b[116..120], &[0x44; 4]);
        assert_eq!(&b[120..124], &[0x22; 4]);
        assert_eq!(&b[124..128], &[0x33; 4]);
        assert_eq!(&b[128..132], &[0; 4]);
        // reserved
        assert_eq!(&b[132..252], &[0; 120][..]);
        // header CRC over bytes 0..252
        assert_eq!(get_u32(&b, 252), crc32fast::hash(&b[..252]));
    }

    #[test]
    fn header_round_trips() {
        let h = sample_header();
        assert_eq!(Header::decode(&h.encode(), 8195), Ok(h));
        assert_eq!(h.file_len(), 8195);
    }

    #[test]
    fn header_checks_run_in_order() {
        let h = sample_header();
        let good = h.encode();
        assert_eq!(
            Header::decode(&good[..10], 10),
            Err(FormatError::TooShort {
                len: 10,
                need: HEADER_LEN
            })
        );
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Header::decode(&b, 8195), Err(FormatError::BadMagic));
        let mut b = good;
        b[8] = 9;
        assert_eq!(Header::decode(&b, 8195), Err(FormatError::BadVersion(9)));
        // A version-1 file is named as such even when shorter than a v2 header.
        let mut b = good;
        b[8] = 1;
        assert_eq!(Header::decode(&b[..128], 128), Err(FormatError::OldVersion));
        assert_eq!(
            Header::decode(&good[..200], 200),
            Err(FormatError::TooShort {
                len: 200,
                need: HEADER_LEN
            })
        );
        let mut b = good;
        b[20] ^= 1;
        assert_eq!(Header::decode(&b, 8195), Err(FormatError::HeaderCrc));
        assert!(matches!(
            Header::decode(&good, 8194),
            Err(FormatError::SectionOutOfBounds {
                section: "VMM state",
                ..
            })
        ));
    }

    #[test]
    fn absurd_sections_are_refused_before_any_work() {
        let mut h = sample_header();
        h.state_len = MAX_STATE_LEN + 1;
        let len = h.state_offset + h.state_len;
        assert_eq!(
            Header::decode(&h.encode(), len),
            Err(FormatError::StateTooLarge(MAX_STATE_LEN + 1))
        );
        let mut h = sample_header();
        h.blob_count = u64::MAX / 4096 + 1;
        assert!(matches!(
            Header::decode(&h.encode(), u64::MAX),
            Err(FormatError::SectionOutOfBounds {
                section: "blob",
                ..
            })
        ));
        let mut h = sample_header();
        h.page_count = 1 << 28;
        h.guest_size = (1 << 28) * 4096;
        h.table_len = (1 << 28) * 12;
        assert!(matches!(
            Header::decode(&h.encode(), 8195),
            Err(FormatError::SectionOutOfBounds { .. })
        ));
    }

    #[test]
    fn overlapping_sections_are_refused() {
        let mut h = sample_header();
        h.parents_offset = 258;
        assert_eq!(
            Header::decode(&h.encode(), 8195),
            Err(FormatError::BadLayout(
                "sections overlap or are out of order"
            ))
        );
    }
}
