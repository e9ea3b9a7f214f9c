//! ckptfs: space-optimized VM memory checkpoints and lazy restore.
//!
//! The pipeline is create -> mount -> restore:
//!
//! 1. [`create()`] classifies every page of a raw guest memory image as ZERO, DISK
//!    (4 KiB of one of the VM's disk images, raw or qcow2, at any 512-byte
//!    offset, found by a content scan ([`scan`]) or from a VMM's I/O-tracking
//!    [`DiskHint`]s), PARENT (the same bytes as the page of an earlier
//!    checkpoint) or BLOB (stored once per distinct content), and writes a
//!    `*.ckpt` file ([`format`] documents its layout, `docs/FORMAT.md` byte by
//!    byte).
//! 2. `ckptfs-mountd` (the `mountd` crate) opens it with [`Checkpoint::open`]
//!    (which checks every disk and parent and resolves PARENT entries) and
//!    serves the guest RAM as a FUSE file through the [`PageReader`] trait,
//!    rebuilding pages with [`Checkpoint::read_pages`] as a VMM faults on them.
//! 3. A VMM (vmm-lite, QEMU, ...) maps that file `MAP_PRIVATE` as guest memory
//!    and resumes at once.
//! 4. Checkpointing the restored VM again, the VMM passes the pages its dirty
//!    log says the guest wrote as [`CreateOptions::changed`]: every other page
//!    becomes a PARENT reference to the checkpoint it was restored from without
//!    being read (an incremental checkpoint). Chains of them open in one pass;
//!    [`flatten::flatten`] makes one self-contained file of a chain.
//!
//! ```
//! use ckptfs::{Checkpoint, CreateOptions, PageIndex};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // A 4-block disk and a 3-page guest: one page cached from the disk bytes
//! // at 9 KiB (as a 1 KiB-block file system puts them), one zero page, one
//! // page of computed data.
//! let disk: Vec<u8> = (0..4 * 4096).map(|i| (i / 7) as u8).collect();
//! std::fs::write(dir.path().join("disk.img"), &disk)?;
//! let mut mem = vec![0u8; 3 * 4096];
//! mem[..4096].copy_from_slice(&disk[9 * 1024..9 * 1024 + 4096]);
//! mem[2 * 4096..].fill(0xab);
//!
//! let opts = CreateOptions {
//!     disks: vec![dir.path().join("disk.img")],
//!     scan_disks: true,
//!     ..Default::default()
//! };
//! let summary = ckptfs::create(&mem, &opts, &dir.path().join("vm.ckpt"))?;
//! assert_eq!((summary.disk_pages, summary.zero_pages, summary.blob_pages), (1, 1, 1));
//!
//! let ck = Checkpoint::open(&dir.path().join("vm.ckpt"))?;
//! let mut restored = vec![0u8; 3 * 4096];
//! ck.read_pages(PageIndex(0), &mut restored)?;
//! assert_eq!(restored, mem);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod atomic_file;
pub mod checkpoint;
pub mod create;
pub mod disk;
pub mod flatten;
pub mod format;
pub mod input;
pub mod loadset;
pub mod memory;
pub mod pageset;
pub mod qemu;
pub mod remote;
pub mod scan;
pub mod source;
pub mod synth;
pub mod types;
pub mod verify;

pub use checkpoint::{
    Checkpoint, OpenError, OpenOptions, PageEntry, PageSource, ReadCounts, ReadError,
};
pub use create::{CreateError, CreateOptions, DiskHint, Summary, create};
pub use memory::MemoryImage;
pub use pageset::PageSet;
pub use source::{MemReader, PageReader};
pub use types::{
    AncestorIndex, BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PageIndex, ParentIndex, SECTOR_SIZE,
};
