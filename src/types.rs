//! Newtypes that keep the project's address spaces apart.
//!
//! A guest page index, a byte offset in a disk image and the index of a stored
//! blob are all `u64`s underneath; mixing them up is the classic bug of this kind
//! of code, so each gets its own type (after vm-memory's `GuestAddress`).

use std::fmt;

/// Size of a guest page and of a disk block, in bytes. The format fixes it at 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// [`PAGE_SIZE`] as a `u64`, for offset arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// Size of a disk sector: DISK references name a byte offset that is a multiple of it.
pub const SECTOR_SIZE: u64 = 512;

/// Sectors in a page.
pub const SECTORS_PER_PAGE: usize = PAGE_SIZE / SECTOR_SIZE as usize;

/// Index of a guest page: guest physical address / [`PAGE_SIZE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// Guest physical byte address of the first byte of this page.
    pub fn byte_offset(self) -> u64 {
        self.0 * PAGE_SIZE_U64
    }

    /// The page that holds guest physical byte address `addr`.
    pub fn containing(addr: u64) -> Self {
        PageIndex(addr / PAGE_SIZE_U64)
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page {} (guest address {:#x})",
            self.0,
            self.byte_offset()
        )
    }
}

/// Byte offset inside a disk image (of the disk as the guest sees it, for a
/// qcow2 image its virtual disk). DISK references are [`SECTOR_SIZE`]-aligned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskOffset(pub u64);

impl fmt::Display for DiskOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk offset {:#x}", self.0)
    }
}

/// Index of a stored page in the checkpoint's blob section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobIndex(pub u64);

/// Index of a backing disk image in the checkpoint's disk table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskIndex(pub u16);

/// Index of a parent checkpoint in the checkpoint's parent table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParentIndex(pub u16);

/// Index of an ancestor checkpoint file in [`crate::Checkpoint::ancestors`]:
/// parents, their parents, ... each file once, resolved at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AncestorIndex(pub u16);
