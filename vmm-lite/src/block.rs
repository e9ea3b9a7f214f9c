//! The paravirtual block device, with disk I/O tracking.
//!
//! The guest writes the guest physical address of a 32-byte request (see `abi::BLOCK_*`) to
//! [`abi::PORT_BLOCK`]; the VMM executes it synchronously during that exit: `pread` from the
//! disk image straight into guest memory, or a copy of guest memory into the write overlay,
//! then stores the status in the request.
//!
//! The disk image is opened read-only and never modified: guest writes go to an in-memory
//! copy-on-write overlay of 4 KiB blocks that is saved with the VMM state. Checkpoints refer
//! to disk blocks by offset, so an image that never changes keeps every checkpoint valid, and
//! runs are reproducible.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ckptfs::{DiskOffset, PageIndex};

use crate::abi;
use crate::memory::GuestMemory;
use crate::tracking::IoTracker;

const BLOCK: u64 = abi::PAGE_SIZE;

/// Errors from the block device (host side; bad guest requests only fail the request).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened or inspected.
    #[error("disk image {path}: cannot open")]
    Open {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The disk image is not the one the state was saved with.
    #[error(
        "disk image {path} is {actual} bytes, but the VM was checkpointed with a {expected}-byte disk"
    )]
    SizeMismatch {
        /// The image.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// Size in the saved state.
        expected: u64,
    },
    /// pread from the disk image failed.
    #[error("disk image {path}: read of {len} bytes at offset {offset} failed")]
    Read {
        /// The image.
        path: PathBuf,
        /// Disk byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// KVM_GET_DIRTY_LOG failed.
    #[error("harvesting the dirty log")]
    DirtyLog(#[source] io::Error),
    /// The overlay from a saved state is malformed.
    #[error("disk overlay in the saved state: {0}")]
    BadOverlay(String),
    /// The I/O-tracking map from a saved state is malformed.
    #[error("I/O-tracking map in the saved state: {0}")]
    BadTracking(String),
}

/// Source of the guest's dirty-page bitmap (KVM_GET_DIRTY_LOG, which also clears it).
pub trait DirtyLog {
    /// Pages written by the guest since the last call, one bit per page.
    fn harvest(&mut self) -> io::Result<Vec<u64>>;
}

/// A parsed block request.
#[derive(Clone, Copy, Debug)]
struct Request {
    op: u32,
    disk_offset: u64,
    guest_addr: u64,
    len: u64,
}

/// The block device: a read-only disk image plus the write overlay, and the tracker.
pub struct BlockDevice {
    file: File,
    path: PathBuf,
    size: u64,
    overlay: BTreeMap<DiskOffset, Vec<u8>>,
    tracker: Option<IoTracker>,
    reads: u64,
    writes: u64,
}

impl BlockDevice {
    /// Opens `path` read-only. With `track`, disk reads are tracked for checkpoint hints.
    pub fn open(path: &Path, track: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
            return Err(open_err(source));
        }
        Ok(BlockDevice {
            file,
            path: path.to_owned(),
            size: meta.len(),
            overlay: BTreeMap::new(),
            tracker: track.then(IoTracker::new),
            reads: 0,
            writes: 0,
        })
    }

    /// Checks the image is as big as the one the state was saved with.
    pub fn check_size(&self, expected: u64) -> Result<(), BlockError> {
        if self.size != expected {
            return Err(BlockError::SizeMismatch {
                path: self.path.clone(),
                actual: self.size,
                expected,
            });
        }
        Ok(())
    }

    /// Disk image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path of the disk image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The I/O tracker (None when tracking is off).
    pub fn tracker(&self) -> Option<&IoTracker> {
        self.tracker.as_ref()
    }

    /// The I/O tracker, mutable (None when tracking is off).
    pub fn tracker_mut(&mut self) -> Option<&mut IoTracker> {
        self.tracker.as_mut()
    }

    /// (read requests, write requests) served.
    pub fn counts(&self) -> (u64, u64) {
        (self.reads, self.writes)
    }

    /// Blocks the guest has written, in offset order, with their contents.
    pub fn overlay(&self) -> impl Iterator<Item = (DiskOffset, &[u8])> {
        self.overlay.iter().map(|(o, d)| (*o, d.as_slice()))
    }

    /// Restores the overlay saved with [`Self::overlay`].
    pub fn load_overlay(&mut self, blocks: &[(DiskOffset, &[u8])]) -> Result<(), BlockError> {
        for (offset, data) in blocks {
            if offset.0 % BLOCK != 0 || offset.0 + BLOCK > self.size || data.len() as u64 != BLOCK {
                return Err(BlockError::BadOverlay(format!("bad block at {offset}")));
            }
            self.overlay.insert(*offset, data.to_vec());
        }
        Ok(())
    }

    /// Executes the request at guest address `desc` and stores its status there.
    pub fn handle(
        &mut self,
        mem: &mut GuestMemory,
        desc: u64,
        dirty: &mut dyn DirtyLog,
    ) -> Result<(), BlockError> {
        let Some(req) = read_request(mem, desc) else {
            log::warn!("block: request descriptor at {desc:#x} is outside guest RAM");
            return Ok(());
        };
        let status = if !self.valid(mem, &req) {
            log::warn!("block: invalid request {req:?}");
            abi::BLOCK_STATUS_ERROR
        } else if req.op == abi::BLOCK_OP_READ {
            self.read(mem, &req, dirty)?;
            abi::BLOCK_STATUS_OK
        } else {
            self.write(mem, &req);
            abi::BLOCK_STATUS_OK
        };
        let _ = mem.write(desc + abi::BLOCK_STATUS_OFFSET, &status.to_le_bytes());
        Ok(())
    }

    fn valid(&self, mem: &GuestMemory, req: &Request) -> bool {
        let op_ok = req.op == abi::BLOCK_OP_READ || req.op == abi::BLOCK_OP_WRITE;
        let aligned = req.disk_offset.is_multiple_of(BLOCK) && req.len.is_multiple_of(BLOCK);
        let len_ok = req.len > 0 && req.len <= abi::BLOCK_MAX_LEN;
        let disk_ok = req
            .disk_offset
            .checked_add(req.len)
            .is_some_and(|end| end <= self.size);
        let mem_ok = mem.range(req.guest_addr, req.len).is_some();
        op_ok && aligned && len_ok && disk_ok && mem_ok
    }

    fn read(
        &mut self,
        mem: &mut GuestMemory,
        req: &Request,
        dirty: &mut dyn DirtyLog,
    ) -> Result<(), BlockError> {
        self.reads += 1;
        // Dirty bits so far describe the buffer's old contents: apply them before the pread
        // (which the dirty log will not show) and before recording the new mappings.
        if let Some(tracker) = self.tracker.as_mut() {
            tracker.apply_dirty_bitmap(&dirty.harvest().map_err(BlockError::DirtyLog)?);
        }
        let buf = mem.range_mut(req.guest_addr, req.len).expect("validated");
        self.file
            .read_exact_at(buf, req.disk_offset)
            .map_err(|source| BlockError::Read {
                path: self.path.clone(),
                offset: req.disk_offset,
                len: req.len,
                source,
            })?;
        let mut overlaid = Vec::new();
        for (offset, data) in self
            .overlay
            .range(DiskOffset(req.disk_offset)..DiskOffset(req.disk_offset + req.len))
        {
            let at = (offset.0 - req.disk_offset) as usize;
            buf[at..at + data.len()].copy_from_slice(data);
            overlaid.push(*offset);
        }
        if let Some(tracker) = self.tracker.as_mut() {
            record_read(tracker, req, &overlaid);
        }
        Ok(())
    }

    fn write(&mut self, mem: &GuestMemory, req: &Request) {
        self.writes += 1;
        let data = mem.range(req.guest_addr, req.len).expect("validated");
        for (i, block) in data.chunks_exact(BLOCK as usize).enumerate() {
            let offset = DiskOffset(req.disk_offset + i as u64 * BLOCK);
            self.overlay.insert(offset, block.to_vec());
            if let Some(tracker) = self.tracker.as_mut() {
                tracker.forget_block(offset);
            }
        }
    }
}

/// Records page -> block for each whole guest page the read filled from the disk image.
/// Pages that only partly received the read, or received overlay data, hold nothing the
/// image has: they are forgotten instead.
fn record_read(tracker: &mut IoTracker, req: &Request, overlaid: &[DiskOffset]) {
    let first = PageIndex::containing(req.guest_addr);
    let last = PageIndex::containing(req.guest_addr + req.len - 1);
    for page in first.0..=last.0 {
        tracker.forget_page(PageIndex(page));
    }
    if !req.guest_addr.is_multiple_of(BLOCK) {
        return;
    }
    for i in 0..req.len / BLOCK {
        let block = DiskOffset(req.disk_offset + i * BLOCK);
        if !overlaid.contains(&block) {
            tracker.record(PageIndex(first.0 + i), block);
        }
    }
}

fn read_request(mem: &GuestMemory, desc: u64) -> Option<Request> {
    mem.range(desc, abi::BLOCK_REQUEST_SIZE)?;
    Some(Request {
        op: mem.read_u32(desc + abi::BLOCK_OP_OFFSET)?,
        disk_offset: mem.read_u64(desc + abi::BLOCK_DISK_OFFSET_OFFSET)?,
        guest_addr: mem.read_u64(desc + abi::BLOCK_GUEST_ADDR_OFFSET)?,
        len: mem.read_u64(desc + abi::BLOCK_LEN_OFFSET)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    struct FakeDirty(RefCell<Vec<u64>>);

    impl DirtyLog for FakeDirty {
        fn harvest(&mut self) -> io::Result<Vec<u64>> {
            Ok(std::mem::replace(&mut *self.0.borrow_mut(), vec![0; 16]))
        }
    }

    fn disk(blocks: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for b in 0..blocks {
            f.write_all(&vec![b as u8 + 1; BLOCK as usize]).unwrap();
        }
        f
    }

    fn submit(
        dev: &mut BlockDevice,
        mem: &mut GuestMemory,
        req: Request,
        dirty: &mut FakeDirty,
    ) -> u32 {
        let desc = 0x8000;
        mem.write(desc, &req.op.to_le_bytes()).unwrap();
        mem.write(
            desc + abi::BLOCK_DISK_OFFSET_OFFSET,
            &req.disk_offset.to_le_bytes(),
        )
        .unwrap();
        mem.write(
            desc + abi::BLOCK_GUEST_ADDR_OFFSET,
            &req.guest_addr.to_le_bytes(),
        )
        .unwrap();
        mem.write(desc + abi::BLOCK_LEN_OFFSET, &req.len.to_le_bytes())
            .unwrap();
        dev.handle(mem, desc, dirty).unwrap();
        mem.read_u32(desc + abi::BLOCK_STATUS_OFFSET).unwrap()
    }

    fn read(disk_offset: u64, guest_addr: u64, len: u64) -> Request {
        Request {
            op: abi::BLOCK_OP_READ,
            disk_offset,
            guest_addr,
            len,
        }
    }

    #[test]
    fn read_fills_memory_and_records_pages() {
        let img = disk(8);
        let mut dev = BlockDevice::open(img.path(), true).unwrap();
        let mut mem = GuestMemory::anonymous(4 * MIB).unwrap();
        // Pages 0x20 and 0x21 were dirty before the read: that must not drop the new mappings.
        let mut dirty = FakeDirty(RefCell::new(vec![0, 0b11, 0, 0]));
        assert_eq!(
            submit(&mut dev, &mut mem, read(4096, 0x20000, 8192), &mut dirty),
            abi::BLOCK_STATUS_OK
        );
        assert_eq!(mem.range(0x20000, 1).unwrap()[0], 2);
        assert_eq!(mem.range(0x21000, 1).unwrap()[0], 3);
        let hints = dev.tracker().unwrap().hints(ckptfs::DiskIndex(0));
        let pairs: Vec<_> = hints.iter().map(|h| (h.page.0, h.offset.0)).collect();
        assert_eq!(pairs, vec![(0x20, 4096), (0x21, 8192)]);
    }

    #[test]
    fn write_goes_to_overlay_and_drops_mappings() {
        let img = disk(8);
        let mut dev = BlockDevice::open(img.path(), true).unwrap();
        let mut mem = GuestMemory::anonymous(4 * MIB).unwrap();
        let mut dirty = FakeDirty(RefCell::new(vec![0; 16]));
        submit(&mut dev, &mut mem, read(0, 0x10000, 4096), &mut dirty);
        mem.write(0x30000, &[9u8; 4096]).unwrap();
        let write = Request {
            op: abi::BLOCK_OP_WRITE,
            disk_offset: 0,
            guest_addr: 0x30000,
            len: 4096,
        };
        assert_eq!(
            submit(&mut dev, &mut mem, write, &mut dirty),
            abi::BLOCK_STATUS_OK
        );
        assert!(dev.tracker().unwrap().is_empty());
        // The image is untouched; a re-read sees the overlay and records nothing.
        assert_eq!(std::fs::read(img.path()).unwrap()[0], 1);
        submit(&mut dev, &mut mem, read(0, 0x40000, 8192), &mut dirty);
        assert_eq!(mem.range(0x40000, 1).unwrap()[0], 9);
        assert_eq!(mem.range(0x41000, 1).unwrap()[0], 2);
        let pages: Vec<_> = dev
            .tracker()
            .unwrap()
            .hints(ckptfs::DiskIndex(0))
            .iter()
            .map(|h| h.page.0)
            .collect();
        assert_eq!(pages, vec![0x41]);
    }

    #[test]
    fn bad_requests_fail_without_touching_memory() {
        let img = disk(2);
        let mut dev = BlockDevice::open(img.path(), true).unwrap();
        let mut mem = GuestMemory::anonymous(4 * MIB).unwrap();
        let mut dirty = FakeDirty(RefCell::new(vec![0; 16]));
        for req in [
            read(4096, 0x10000, 8192),
            read(100, 0x10000, 4096),
            read(0, 4 * MIB - 4096, 8192),
        ] {
            assert_eq!(
                submit(&mut dev, &mut mem, req, &mut dirty),
                abi::BLOCK_STATUS_ERROR
            );
        }
        assert!(mem.as_slice()[0x10000..0x12000].iter().all(|b| *b == 0));
    }

    #[test]
    fn missing_disk_names_the_file() {
        let err = BlockDevice::open(Path::new("/nonexistent/disk.img"), false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
    }
}
