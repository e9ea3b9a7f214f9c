//! Page-table entries: a `u64` location word and the page's `u32` CRC32.
//!
//! ```text
//!  bits 63..62  kind: 0 = ZERO, 1 = DISK, 2 = BLOB, 3 = PARENT
//!  ZERO:   bits 61..0 are 0
//!  DISK:   bits 61..48 disk index, bits 47..0 sector (byte offset / 512)
//!  BLOB:   bits 61..0 blob index
//!  PARENT: bits 61..48 parent index, bits 47..0 are 0
//! ```
//!
//! 12 bytes a page: a 16 GiB guest (4 Mi pages) has a 48 MiB page table.

use super::{FormatError, get_u32, get_u64};
use crate::types::{BlobIndex, DiskIndex, DiskOffset, ParentIndex, SECTOR_SIZE};

/// Length of one page-table entry.
pub const ENTRY_LEN: usize = size_of::<u64>() + size_of::<u32>();

const KIND_SHIFT: u32 = 62;
const KIND_ZERO: u64 = 0;
const KIND_DISK: u64 = 1;
const KIND_BLOB: u64 = 2;
const KIND_PARENT: u64 = 3;
/// Disk and parent indexes sit above the 48-bit sector field.
const INDEX_SHIFT: u32 = 48;
const INDEX_MASK: u64 = (1 << (KIND_SHIFT - INDEX_SHIFT)) - 1;
const SECTOR_MASK: u64 = (1 << INDEX_SHIFT) - 1;
const PAYLOAD_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Most disk images one checkpoint can reference.
pub const MAX_DISKS: usize = INDEX_MASK as usize + 1;
/// Most parent checkpoints one checkpoint can reference.
pub const MAX_PARENTS: usize = INDEX_MASK as usize + 1;
/// One past the largest disk byte offset a DISK entry can name (128 PiB).
pub const MAX_DISK_OFFSET: u64 = (SECTOR_MASK + 1) * SECTOR_SIZE;
/// Most blobs one checkpoint can hold.
pub const MAX_BLOBS: u64 = PAYLOAD_MASK + 1;

/// Decoded location of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// All zeros.
    Zero,
    /// 4096 bytes of a disk image at a sector-aligned byte offset.
    Disk(DiskIndex, DiskOffset),
    /// A stored blob.
    Blob(BlobIndex),
    /// The same page of a parent checkpoint.
    Parent(ParentIndex),
}

impl Location {
    /// Whether this location can be encoded: indexes and offsets in range,
    /// disk offsets sector-aligned.
    pub fn is_encodable(&self) -> bool {
        match *self {
            Location::Zero => true,
            Location::Disk(d, off) => {
                usize::from(d.0) < MAX_DISKS
                    && off.0.is_multiple_of(SECTOR_SIZE)
                    && off.0 < MAX_DISK_OFFSET
            }
            Location::Blob(b) => b.0 < MAX_BLOBS,
            Location::Parent(p) => usize::from(p.0) < MAX_PARENTS,
        }
    }

    /// The entry kind's name, as `inspect` and errors show it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Location::Zero => "ZERO",
            Location::Disk(..) => "DISK",
            Location::Blob(_) => "BLOB",
            Location::Parent(_) => "PARENT",
        }
    }
}

/// Encode a page-table entry.
///
/// # Panics
/// If `loc` is not [`Location::is_encodable`]; the writer checks before it encodes.
pub fn encode_entry(loc: Location, crc: u32) -> [u8; ENTRY_LEN] {
    assert!(loc.is_encodable(), "{loc:?} does not fit the format");
    let word = match loc {
        Location::Zero => KIND_ZERO << KIND_SHIFT,
        Location::Disk(d, off) => {
            (KIND_DISK << KIND_SHIFT) | (u64::from(d.0) << INDEX_SHIFT) | (off.0 / SECTOR_SIZE)
        }
        Location::Blob(b) => (KIND_BLOB << KIND_SHIFT) | b.0,
        Location::Parent(p) => (KIND_PARENT << KIND_SHIFT) | (u64::from(p.0) << INDEX_SHIFT),
    };
    let mut e = [0u8; ENTRY_LEN];
    e[..8].copy_from_slice(&word.to_le_bytes());
    e[8..].copy_from_slice(&crc.to_le_bytes());
    e
}

/// Decode a page-table entry (`e` is [`ENTRY_LEN`] bytes; `page` is named in errors).
pub fn decode_entry(e: &[u8], page: u64) -> Result<(Location, u32), FormatError> {
    let word = get_u64(e, 0);
    let crc = get_u32(e, 8);
    let payload = word & PAYLOAD_MASK;
    let index = (payload >> INDEX_SHIFT) as u16;
    let bad = |what| FormatError::BadEntry { page, what };
    let loc = match word >> KIND_SHIFT {
        KIND_ZERO if payload == 0 => Location::Zero,
        KIND_ZERO => return Err(bad("ZERO entry with a payload")),
        KIND_DISK => Location::Disk(
            DiskIndex(index),
            DiskOffset((payload & SECTOR_MASK) * SECTOR_SIZE),
        ),
        KIND_BLOB => Location::Blob(BlobIndex(payload)),
        _ if payload & SECTOR_MASK != 0 => return Err(bad("PARENT entry with a page offset")),
        _ => Location::Parent(ParentIndex(index)),
    };
    Ok((loc, crc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entry_golden_bytes() {
        // DISK, disk 3, byte offset 0x1234_5600 (sector 0x91a2b), CRC 0xdeadbeef.
        let e = encode_entry(
            Location::Disk(DiskIndex(3), DiskOffset(0x1234_5600)),
            0xdead_beef,
        );
        assert_eq!(
            e,
            [
                0x2b, 0x1a, 0x09, 0x00, 0x00, 0x00, // sector 0x91a2b (bits 47..0)
                0x03, // disk index 3 (bits 55..48)
                0x40, // kind 1 = DISK (bits 63..62), disk index bits 61..56 = 0
                0xef, 0xbe, 0xad, 0xde, // CRC32
            ]
        );
        // PARENT 1: kind 3, parent index in bits 61..48, no offset.
        let e = encode_entry(Location::Parent(ParentIndex(1)), 7);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0x01, 0xc0, 7, 0, 0, 0]);
        // BLOB 5 and ZERO.
        let e = encode_entry(Location::Blob(BlobIndex(5)), 0);
        assert_eq!(e, [5, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0]);
        assert_eq!(
            encode_entry(Location::Zero, 1),
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
        );
    }

    #[test]
    fn edge_entries_round_trip() {
        let cases = [
            Location::Zero,
            Location::Disk(DiskIndex(0), DiskOffset(512)),
            Location::Disk(DiskIndex(16383), DiskOffset(MAX_DISK_OFFSET - 512)),
            Location::Blob(BlobIndex(MAX_BLOBS - 1)),
            Location::Parent(ParentIndex(16383)),
        ];
        for loc in cases {
            let e = encode_entry(loc, 0xdead_beef);
            assert_eq!(decode_entry(&e, 0), Ok((loc, 0xdead_beef)));
        }
    }

    #[test]
    fn unencodable_locations_are_named() {
        assert!(!Location::Disk(DiskIndex(0), DiskOffset(100)).is_encodable());
        assert!(!Location::Disk(DiskIndex(0), DiskOffset(MAX_DISK_OFFSET)).is_encodable());
        assert!(!Location::Blob(BlobIndex(MAX_BLOBS)).is_encodable());
    }

    #[test]
    fn invalid_entries_are_rejected() {
        let mut e = [0u8; ENTRY_LEN];
        e[0] = 1; // ZERO with a payload
        assert!(matches!(
            decode_entry(&e, 5),
            Err(FormatError::BadEntry { page: 5, .. })
        ));
        let mut e = encode_entry(Location::Parent(ParentIndex(2)), 0);
        e[0] = 1; // PARENT with an offset
        assert!(decode_entry(&e, 5).is_err());
    }

    fn location() -> impl Strategy<Value = Location> {
        prop_oneof![
            Just(Location::Zero),
            (0u16..16384, 0u64..(MAX_DISK_OFFSET / SECTOR_SIZE))
                .prop_map(|(d, s)| Location::Disk(DiskIndex(d), DiskOffset(s * SECTOR_SIZE))),
            (0u64..MAX_BLOBS).prop_map(|b| Location::Blob(BlobIndex(b))),
            (0u16..16384).prop_map(|p| Location::Parent(ParentIndex(p))),
        ]
    }

    proptest! {
        #[test]
        fn any_location_round_trips(loc in location(), crc in any::<u32>()) {
            prop_assert_eq!(decode_entry(&encode_entry(loc, crc), 9), Ok((loc, crc)));
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in any::<[u8; ENTRY_LEN]>()) {
            if let Ok((loc, crc)) = decode_entry(&bytes, 0) {
                prop_assert!(loc.is_encodable());
                prop_assert_eq!(encode_entry(loc, crc), bytes);
            }
        }
    }
}
