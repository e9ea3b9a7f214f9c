//! The on-disk layout of a `*.ckpt` file.
//!
//! ```text
//!  offset 0        128                                  align 4096
//!  +--------------+-------------+-----------------------+---------------------+-------------+
//!  | header (128) | disk table  | page table            | blob section        | VMM state   |
//!  |              | (variable)  | 12 bytes x page_count | 4096 x blob_count   | (opaque)    |
//!  +--------------+-------------+-----------------------+---------------------+-------------+
//! ```
//!
//! All integers are little endian. The header carries the offset and length of
//! every section and a CRC32 of itself; the disk table and the page table carry
//! CRC32s in the header; every page carries the CRC32 of its own bytes in its
//! page-table entry, so a page rebuilt from a stale disk block or a damaged blob
//! is caught when it is read. `docs/FORMAT.md` gives every field byte by byte.
//!
//! A page-table entry is a `u64` location followed by the page's `u32` CRC32:
//!
//! ```text
//!  bits 63..62  kind: 0 = ZERO, 1 = DISK, 2 = BLOB (3 is invalid)
//!  ZERO: bits 61..0 are 0
//!  DISK: bits 61..48 disk index, bits 47..0 block number (byte offset / 4096)
//!  BLOB: bits 61..0 blob index (the page is at blob_offset + index * 4096)
//! ```
//!
//! Decoding never trusts a field: every parse returns a [`FormatError`] naming what is wrong.

use crate::types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64};

/// First eight bytes of every checkpoint.
pub const MAGIC: [u8; 8] = *b"CKPTFS\r\n";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;

/// Byte offsets of the header fields.
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
/// `u64` + `u64`: page table offset and length.
pub const TABLE_OFFSET: usize = DISKS_OFFSET + 2 * size_of::<u64>();
/// `u64` + `u64`: blob section offset and number of blobs.
pub const BLOBS_OFFSET: usize = TABLE_OFFSET + 2 * size_of::<u64>();
/// `u64` + `u64`: VMM-state section offset and length.
pub const STATE_OFFSET: usize = BLOBS_OFFSET + 2 * size_of::<u64>();
/// `u32` CRC32 of the disk table.
pub const DISKS_CRC_OFFSET: usize = STATE_OFFSET + 2 * size_of::<u64>();
/// `u32` CRC32 of the page table.
pub const TABLE_CRC_OFFSET: usize = DISKS_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of the VMM-state section.
pub const STATE_CRC_OFFSET: usize = TABLE_CRC_OFFSET + size_of::<u32>();
/// `u32` flags, all reserved (written 0, must read 0).
pub const FLAGS_OFFSET: usize = STATE_CRC_OFFSET + size_of::<u32>();
/// `u32` CRC32 of header bytes `0..HEADER_CRC_OFFSET`; reserved bytes before it are 0.
pub const HEADER_CRC_OFFSET: usize = HEADER_LEN - size_of::<u32>();
/// Length of the header.
pub const HEADER_LEN: usize = 128;

/// Length of one page-table entry.
pub const ENTRY_LEN: usize = size_of::<u64>() + size_of::<u32>();

const KIND_SHIFT: u32 = 62;
const KIND_ZERO: u64 = 0;
const KIND_DISK: u64 = 1;
const KIND_BLOB: u64 = 2;
const DISK_SHIFT: u32 = 48;
const DISK_MASK: u64 = (1 << 14) - 1;
const BLOCK_MASK: u64 = (1 << DISK_SHIFT) - 1;
const PAYLOAD_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Most disk images one checkpoint can reference.
pub const MAX_DISKS: usize = DISK_MASK as usize + 1;

/// CRC32 of a 4 KiB page of zeros.
pub fn zero_page_crc() -> u32 {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    crc32fast::hash(&ZERO)
}

/// What is wrong with a checkpoint's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// File too short for a header.
    #[error("file is {len} bytes, shorter than the {HEADER_LEN}-byte header (truncated?)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Magic does not match.
    #[error("not a ckptfs checkpoint (bad magic)")]
    BadMagic,
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
    /// A section lies outside the file or overlaps another.
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
    /// A section's layout is inconsistent.
    #[error("{0}")]
    BadLayout(&'static str),
    /// A section's CRC mismatch.
    #[error("{0} checksum mismatch (corrupted)")]
    SectionCrc(&'static str),
    /// Disk table could not be parsed.
    #[error("disk table is malformed: {0}")]
    BadDiskTable(&'static str),
    /// A page-table entry is invalid.
    #[error("page-table entry of page {page} is invalid: {what}")]
    BadEntry {
        /// Page index.
        page: u64,
        /// What is wrong.
        what: &'static str,
    },
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
    /// Serialize, computing the header CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[MAGIC_OFFSET..MAGIC_OFFSET + MAGIC.len()].copy_from_slice(&MAGIC);
        put_u32(&mut b, VERSION_OFFSET, VERSION);
        put_u32(&mut b, PAGE_SIZE_OFFSET, PAGE_SIZE as u32);
        put_u64(&mut b, GUEST_SIZE_OFFSET, self.guest_size);
        put_u64(&mut b, PAGE_COUNT_OFFSET, self.page_count);
        put_u64(&mut b, DISKS_OFFSET, self.disks_offset);
        put_u64(&mut b, DISKS_OFFSET + 8, self.disks_len);
        put_u64(&mut b, TABLE_OFFSET, self.table_offset);
        put_u64(&mut b, TABLE_OFFSET + 8, self.table_len);
        put_u64(&mut b, BLOBS_OFFSET, self.blobs_offset);
        put_u64(&mut b, BLOBS_OFFSET + 8, self.blob_count);
        put_u64(&mut b, STATE_OFFSET, self.state_offset);
        put_u64(&mut b, STATE_OFFSET + 8, self.state_len);
        put_u32(&mut b, DISKS_CRC_OFFSET, self.disks_crc);
        put_u32(&mut b, TABLE_CRC_OFFSET, self.table_crc);
        put_u32(&mut b, STATE_CRC_OFFSET, self.state_crc);
        put_u32(&mut b, FLAGS_OFFSET, 0);
        let crc = crc32fast::hash(&b[..HEADER_CRC_OFFSET]);
        put_u32(&mut b, HEADER_CRC_OFFSET, crc);
        b
    }

    /// Parse and validate a header from the start of a file of `file_len` bytes.
    ///
    /// Checks, in order: length, magic, version, header CRC, page size, then that
    /// every section lies inside the file in the documented order.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Header, FormatError> {
        if b.len() < HEADER_LEN || file_len < HEADER_LEN as u64 {
            return Err(FormatError::TooShort { len: file_len });
        }
        if b[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get_u32(b, VERSION_OFFSET);
        if version != VERSION {
            return Err(FormatError::BadVersion(version));
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
        let h = Header {
            guest_size: get_u64(b, GUEST_SIZE_OFFSET),
            page_count: get_u64(b, PAGE_COUNT_OFFSET),
            disks_offset: get_u64(b, DISKS_OFFSET),
            disks_len: get_u64(b, DISKS_OFFSET + 8),
            table_offset: get_u64(b, TABLE_OFFSET),
            table_len: get_u64(b, TABLE_OFFSET + 8),
            blobs_offset: get_u64(b, BLOBS_OFFSET),
            blob_count: get_u64(b, BLOBS_OFFSET + 8),
            state_offset: get_u64(b, STATE_OFFSET),
            state_len: get_u64(b, STATE_OFFSET + 8),
            disks_crc: get_u32(b, DISKS_CRC_OFFSET),
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
        let blobs_len = self.blob_count.saturating_mul(PAGE_SIZE_U64);
        let sections = [
            ("disk table", self.disks_offset, self.disks_len),
            ("page table", self.table_offset, self.table_len),
            ("blob", self.blobs_offset, blobs_len),
            ("VMM state", self.state_offset, self.state_len),
        ];
        let mut prev_end = HEADER_LEN as u64;
        for (section, offset, len) in sections {
            let end = offset.checked_add(len).filter(|&e| e <= file_len);
            let Some(end) = end else {
                return Err(FormatError::SectionOutOfBounds {
                    section,
                    offset,
                    len,
                    file_len,
                });
            };
            if offset < prev_end {
                return Err(FormatError::BadLayout(
                    "sections overlap or are out of order",
                ));
            }
            prev_end = end;
        }
        Ok(())
    }
}

/// Decoded location of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// All zeros.
    Zero,
    /// A disk block.
    Disk(DiskIndex, DiskOffset),
    /// A stored blob.
    Blob(BlobIndex),
}

/// Encode a page-table entry.
///
/// # Panics
/// If a disk index or offset does not fit the format; `create` never builds such one.
pub fn encode_entry(loc: Location, crc: u32) -> [u8; ENTRY_LEN] {
    let word = match loc {
        Location::Zero => KIND_ZERO << KIND_SHIFT,
        Location::Disk(d, off) => {
            assert!(u64::from(d.0) <= DISK_MASK && off.0 % PAGE_SIZE_U64 == 0);
            let block = off.0 / PAGE_SIZE_U64;
            assert!(block <= BLOCK_MASK);
            (KIND_DISK << KIND_SHIFT) | (u64::from(d.0) << DISK_SHIFT) | block
        }
        Location::Blob(b) => {
            assert!(b.0 <= PAYLOAD_MASK);
            (KIND_BLOB << KIND_SHIFT) | b.0
        }
    };
    let mut e = [0u8; ENTRY_LEN];
    e[..8].copy_from_slice(&word.to_le_bytes());
    e[8..].copy_from_slice(&crc.to_le_bytes());
    e
}

/// Decode a page-table entry (for `page`, named in errors).
pub fn decode_entry(e: &[u8], page: u64) -> Result<(Location, u32), FormatError> {
    let word = get_u64(e, 0);
    let crc = get_u32(e, 8);
    let payload = word & PAYLOAD_MASK;
    let loc = match word >> KIND_SHIFT {
        KIND_ZERO if payload == 0 => Location::Zero,
        KIND_ZERO => {
            return Err(FormatError::BadEntry {
                page,
                what: "ZERO entry with a payload",
            });
        }
        KIND_DISK => Location::Disk(
            DiskIndex(((payload >> DISK_SHIFT) & DISK_MASK) as u16),
            DiskOffset((payload & BLOCK_MASK) * PAGE_SIZE_U64),
        ),
        KIND_BLOB => Location::Blob(BlobIndex(payload)),
        _ => {
            return Err(FormatError::BadEntry {
                page,
                what: "unknown kind 3",
            });
        }
    };
    Ok((loc, crc))
}

/// One backing disk image as recorded in the disk table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRecord {
    /// Absolute path of the image at checkpoint time.
    pub path: std::path::PathBuf,
    /// Image size in bytes.
    pub size: u64,
    /// Sampled content fingerprint (see [`crate::disk::fingerprint`]).
    pub fingerprint: u64,
}

/// Serialize the disk table: `u32` count, then per disk `u32` path length, path
/// bytes, `u64` size, `u64` fingerprint.
pub fn encode_disks(disks: &[DiskRecord]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    out.extend_from_slice(&(disks.len() as u32).to_le_bytes());
    for d in disks {
        let p = d.path.as_os_str().as_bytes();
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(&d.size.to_le_bytes());
        out.extend_from_slice(&d.fingerprint.to_le_bytes());
    }
    out
}

/// Parse the disk table.
pub fn decode_disks(b: &[u8]) -> Result<Vec<DiskRecord>, FormatError> {
    use std::os::unix::ffi::OsStrExt;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], FormatError> {
        let s = b.get(
            *at..at
                .checked_add(n)
                .ok_or(FormatError::BadDiskTable("length overflow"))?,
        );
        *at += n;
        s.ok_or(FormatError::BadDiskTable(
            "entry runs past the end of the table",
        ))
    };
    let mut at = 0;
    let count = get_u32(take(&mut at, 4)?, 0) as usize;
    if count > MAX_DISKS {
        return Err(FormatError::BadDiskTable("too many disks"));
    }
    let mut disks = Vec::with_capacity(count);
    for _ in 0..count {
        let plen = get_u32(take(&mut at, 4)?, 0) as usize;
        let path = std::ffi::OsStr::from_bytes(take(&mut at, plen)?).into();
        let size = get_u64(take(&mut at, 8)?, 0);
        let fingerprint = get_u64(take(&mut at, 8)?, 0);
        disks.push(DiskRecord {
            path,
            size,
            fingerprint,
        });
    }
    if at != b.len() {
        return Err(FormatError::BadDiskTable(
            "trailing bytes after the last entry",
        ));
    }
    Ok(disks)
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
            disks_offset: 128,
            disks_len: 4,
            table_offset: 132,
            table_len: 24,
            blobs_offset: 4096,
            blob_count: 1,
            state_offset: 8192,
            state_len: 3,
            disks_crc: 0x1111_1111,
            table_crc: 0x2222_2222,
            state_crc: 0x3333_3333,
        }
    }

    #[test]
    fn header_golden_bytes() {
        let b = sample_header().encode();
        // magic
        assert_eq!(&b[0..8], b"CKPTFS\r\n");
        // version 1, page size 4096
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0, 0x10, 0, 0]);
        // guest size 8192, page count 2
        assert_eq!(&b[16..24], &[0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..32], &[2, 0, 0, 0, 0, 0, 0, 0]);
        // disk table at 128, 4 bytes
        assert_eq!(&b[32..40], &[128, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[40..48], &[4, 0, 0, 0, 0, 0, 0, 0]);
        // page table at 132, 24 bytes
        assert_eq!(&b[48..56], &[132, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[56..64], &[24, 0, 0, 0, 0, 0, 0, 0]);
        // blobs at 4096, 1 blob
        assert_eq!(&b[64..72], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[72..80], &[1, 0, 0, 0, 0, 0, 0, 0]);
        // state at 8192, 3 bytes
        assert_eq!(&b[80..88], &[0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[88..96], &[3, 0, 0, 0, 0, 0, 0, 0]);
        // disk, table, state CRCs; flags
        assert_eq!(&b[96..100], &[0x11; 4]);
        assert_eq!(&b[100..104], &[0x22; 4]);
        assert_eq!(&b[104..108], &[0x33; 4]);
        assert_eq!(&b[108..112], &[0; 4]);
        // reserved
        assert_eq!(&b[112..124], &[0; 12]);
        // header CRC over bytes 0..124
        assert_eq!(get_u32(&b, 124), crc32fast::hash(&b[..124]));
    }

    #[test]
    fn header_round_trips() {
        let h = sample_header();
        assert_eq!(Header::decode(&h.encode(), 8195), Ok(h));
    }

    #[test]
    fn header_checks_run_in_order() {
        let h = sample_header();
        let good = h.encode();
        assert_eq!(
            Header::decode(&good[..10], 10),
            Err(FormatError::TooShort { len: 10 })
        );
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Header::decode(&b, 8195), Err(FormatError::BadMagic));
        let mut b = good;
        b[8] = 9;
        assert_eq!(Header::decode(&b, 8195), Err(FormatError::BadVersion(9)));
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
    fn entries_round_trip() {
        let cases = [
            Location::Zero,
            Location::Disk(DiskIndex(3), DiskOffset(0x1234_5000)),
            Location::Disk(DiskIndex(16383), DiskOffset(BLOCK_MASK * 4096)),
            Location::Blob(BlobIndex(77)),
        ];
        for loc in cases {
            let e = encode_entry(loc, 0xdead_beef);
            assert_eq!(decode_entry(&e, 0), Ok((loc, 0xdead_beef)));
        }
    }

    #[test]
    fn invalid_entry_kinds_are_rejected() {
        let mut e = [0u8; ENTRY_LEN];
        e[7] = 0xc0;
        assert!(matches!(
            decode_entry(&e, 5),
            Err(FormatError::BadEntry { page: 5, .. })
        ));
        e[7] = 0;
        e[0] = 1;
        assert!(decode_entry(&e, 5).is_err());
    }

    #[test]
    fn disk_table_round_trips_and_rejects_truncation() {
        let disks = vec![
            DiskRecord {
                path: "/a/b.img".into(),
                size: 1 << 30,
                fingerprint: 42,
            },
            DiskRecord {
                path: "/c.raw".into(),
                size: 4096,
                fingerprint: 7,
            },
        ];
        let b = encode_disks(&disks);
        assert_eq!(decode_disks(&b), Ok(disks));
        assert!(decode_disks(&b[..b.len() - 1]).is_err());
        assert!(decode_disks(&[]).is_err());
    }
}
