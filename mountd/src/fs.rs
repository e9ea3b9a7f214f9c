//! The FUSE filesystem: a root directory holding `memory` (guest RAM),
//! `stats` (live JSON) and `vmm-state` (if the checkpoint has one).
//!
//! `memory` keeps the kernel page cache (FOPEN_KEEP_CACHE, no direct_io) so a VMM
//! can mmap it MAP_PRIVATE and so notify-store can fill it ahead of faults. It can
//! be opened read-write (QEMU opens mem-path O_RDWR even with share=off), but
//! every write, truncate or setattr fails with EROFS.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, warn};

use crate::cache::lock;
use crate::readpath::ReadPath;
use crate::shared::Shared;

/// Inode of `memory`.
pub const MEMORY_INO: INodeNo = INodeNo(2);
/// Inode of `stats`.
pub const STATS_INO: INodeNo = INodeNo(3);
/// Inode of `vmm-state`.
pub const VMM_STATE_INO: INodeNo = INodeNo(4);
/// Inode of `zero-ranges`.
pub const ZERO_RANGES_INO: INodeNo = INodeNo(5);

/// The largest read the daemon asks the kernel for (FUSE_MAX_PAGES x 4 KiB).
pub const MAX_READ: usize = 1 << 20;

/// Attributes of static files never change, so the kernel may cache them long.
const STATIC_TTL: Duration = Duration::from_secs(3600);

thread_local! {
    /// Per-thread reply buffer: grows to the largest read once, then is reused.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Owner, permission bits and time of the checkpoint file.
#[derive(Clone, Copy, Debug)]
pub struct Ownership {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits of the checkpoint file.
    pub mode: u16,
    /// Modification time.
    pub mtime: SystemTime,
}

impl Ownership {
    /// The checkpoint file's.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Ownership {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: (meta.mode() & 0o777) as u16,
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// `memory`: read and write bits as the checkpoint's (writes still fail).
    fn memory_mode(&self) -> u16 {
        self.mode & 0o666
    }

    /// Read-only files: the checkpoint's read bits.
    fn read_only_mode(&self) -> u16 {
        self.mode & 0o444
    }

    /// The root directory: searchable by whoever may read the checkpoint.
    fn dir_mode(&self) -> u16 {
        let r = self.mode & 0o444;
        r | (r >> 2)
    }
}

/// The mounted filesystem.
pub struct CkptFs {
    shared: Arc<Shared>,
    reads: ReadPath,
    vmm_state: Vec<u8>,
    zero_ranges: Vec<u8>,
    owner: Ownership,
    /// Stats snapshots of open `stats` handles.
    stats_open: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    next_fh: AtomicU64,
    writes_refused: AtomicU64,
}

impl CkptFs {
    /// A filesystem serving `reads` over `shared`, with `vmm_state` as the
    /// `vmm-state` file, owned as `owner`.
    pub fn new(shared: Arc<Shared>, reads: ReadPath, vmm_state: Vec<u8>, owner: Ownership) -> Self {
        let ranges = ckptfs::source::zero_ranges(&*shared.source);
        let zero_ranges = ckptfs::source::format_zero_ranges(&ranges).into_bytes();
        CkptFs {
            shared,
            reads,
            vmm_state,
            zero_ranges,
            owner,
            stats_open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            writes_refused: AtomicU64::new(0),
        }
    }

    fn attr(&self, ino: INodeNo, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.owner.mtime,
            mtime: self.owner.mtime,
            ctime: self.owner.mtime,
            crtime: self.owner.mtime,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn stats_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.shared.snapshot()).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Attributes of `ino` and how long the kernel may cache them.
    fn lookup_attr(&self, ino: INodeNo) -> Option<(FileAttr, Duration)> {
        let (ro, dir) = (self.owner.read_only_mode(), self.owner.dir_mode());
        Some(match ino {
            INodeNo::ROOT => (self.attr(ino, FileType::Directory, 0, dir), STATIC_TTL),
            MEMORY_INO => (
                self.attr(
                    ino,
                    FileType::RegularFile,
                    self.shared.guest_size(),
                    self.owner.memory_mode(),
                ),
                STATIC_TTL,
            ),
            ZERO_RANGES_INO => (
                self.attr(
                    ino,
                    FileType::RegularFile,
                    self.zero_ranges.len() as u64,
                    ro,
                ),
                STATIC_TTL,
            ),
            // The stats size changes with every snapshot: never cache it.
            STATS_INO => (
                self.attr(
                    ino,
                    FileType::RegularFile,
                    self.stats_json().len() as u64,
                    ro,
                ),
                Duration::ZERO,
            ),
            VMM_STATE_INO if !self.vmm_state.is_empty() => (
                self.attr(ino, FileType::RegularFile, self.vmm_state.len() as u64, ro),
                STATIC_TTL,
            ),
            _ => return None,
        })
    }

    fn entries(&self) -> Vec<(INodeNo, FileType, &'static str)> {
        let mut v = vec![
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (MEMORY_INO, FileType::RegularFile, "memory"),
            (STATS_INO, FileType::RegularFile, "stats"),
            (ZERO_RANGES_INO, FileType::RegularFile, "zero-ranges"),
        ];
        if !self.vmm_state.is_empty() {
            v.push((VMM_STATE_INO, FileType::RegularFile, "vmm-state"));
        }
        v
    }

    fn read_memory(&self, offset: u64, size: u32, reply: ReplyData) {
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            match self.reads.read(offset, size, &mut buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        });
    }

    /// A refused write may have left modified pages in the kernel page cache
    /// (a MAP_SHARED mapping opened before direct_io, or a kernel that allows
    /// one): drop them so readers see the checkpoint's bytes again. Runs on its
    /// own thread, after the EROFS reply: invalidating from the FUSE thread
    /// would wait for the very writeback that waits for that reply.
    fn invalidate_after_refused_write(&self, offset: u64, len: u64) {
        let shared = self.shared.clone();
        let start = offset / 4096 * 4096;
        let end = (offset + len).div_ceil(4096) * 4096;
        let spawned = std::thread::Builder::new()
            .name("ckptfs-inval".into())
            .spawn(move || shared.kernel.invalidate(start, end - start));
        if let Err(e) = spawned {
            log::error!("mountd: cannot start invalidation thread: {e}");
        }
    }

    fn refuse_write(&self, what: &str) -> Errno {
        if self.writes_refused.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!("mountd: refusing {what}: the checkpoint is read-only (EROFS)");
        }
        Errno::EROFS
    }
}

fn slice_at(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

impl Filesystem for CkptFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Ask for 1 MiB reads: max_pages is derived from max(max_write, max_readahead).
        let _ = config.set_max_write(MAX_READ as u32);
        if let Err(max) = config.set_max_readahead(MAX_READ as u32) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        debug!("mountd: kernel config {config:?}");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == INodeNo::ROOT)
            .then(|| {
                self.entries()
                    .into_iter()
                    .skip(2)
                    .find(|e| OsStr::new(e.2) == name)
            })
            .flatten();
        match found.and_then(|(ino, ..)| self.lookup_attr(ino)) {
            Some((attr, ttl)) => {
                if attr.ino == MEMORY_INO {
                    self.shared.kernel.looked_up(1);
                }
                reply.entry(&ttl, &attr, Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino == MEMORY_INO {
            self.shared.kernel.forgotten(nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lookup_attr(ino) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.lookup_attr(ino) {
            Some(_) => reply.error(self.refuse_write("setattr/truncate")),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match ino {
            // A writable open could map MAP_SHARED and dirty the page cache every
            // other reader of `memory` sees until writeback fails; with direct_io
            // the kernel refuses shared mappings of this open (MAP_PRIVATE works).
            MEMORY_INO if writable => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_DIRECT_IO,
            ),
            MEMORY_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            VMM_STATE_INO | ZERO_RANGES_INO if writable => reply.error(Errno::EROFS),
            VMM_STATE_INO if !self.vmm_state.is_empty() => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            ZERO_RANGES_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            STATS_INO => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.stats_open).insert(fh, Arc::new(self.stats_json()));
                // direct_io: reads are not limited by the (changing) size.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            INodeNo::ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino {
            MEMORY_INO => self.read_memory(offset, size, reply),
            VMM_STATE_INO => reply.data(slice_at(&self.vmm_state, offset, size)),
            ZERO_RANGES_INO => reply.data(slice_at(&self.zero_ranges, offset, size)),
            STATS_INO => {
                let snap = lock(&self.stats_open).get(&fh.0).cloned();
                let snap = snap.unwrap_or_else(|| Arc::new(self.stats_json()));
                reply.data(slice_at(&snap, offset, size));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse_write("write"));
        if ino == MEMORY_INO {
            self.invalidate_after_refused_write(offset, data.len() as u64);
        }
    }

    // The tree is fixed: every change to it is a read-only filesystem's EROFS.
    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("mknod"));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("mkdir"));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write("unlink"));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write("rmdir"));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("symlink"));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_write("rename"));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("link"));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.refuse_write("create"));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_write("fallocate"));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == STATS_INO {
            lock(&self.stats_open).remove(&fh.0);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        for (i, (ino, kind, name)) in self.entries().into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn destroy(&mut self) {
        info!("mountd: filesystem destroyed");
    }
}
