//! The kernel page cache of `memory`, as the daemon sees it: pushing pages into
//! it (FUSE_NOTIFY_STORE) and dropping them (FUSE_NOTIFY_INVAL_INODE).
//!
//! The kernel accepts a store only for an inode it currently holds (looked up
//! and not forgotten); fuser reports ENOENT from the kernel as success, so the
//! daemon counts lookups and forgets itself and never stores without one.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use fuser::INodeNo;

/// Where pages can be pushed so the kernel serves them without asking.
pub trait KernelCache: Send + Sync {
    /// Store `data` at byte `offset` of `memory` in the kernel page cache.
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Drop `[offset, offset + len)` of `memory` from the kernel page cache.
    fn invalidate(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// The page cache of `memory`: the sink, once the FUSE session exists, and
/// whether the kernel holds the inode.
#[derive(Default)]
pub struct Kernel {
    sink: OnceLock<Box<dyn KernelCache>>,
    lookups: AtomicU64,
    /// Stores the kernel refused.
    pub store_errors: AtomicU64,
    /// Stores are allowed (`--notify-store`, and not recording).
    enabled: bool,
}

impl Kernel {
    /// A kernel cache that may be pushed to when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Kernel {
            enabled,
            ..Kernel::default()
        }
    }

    /// Install the sink (once the FUSE session exists).
    pub fn set_sink(&self, k: Box<dyn KernelCache>) {
        let _ = self.sink.set(k);
    }

    /// The kernel looked `memory` up `n` more times.
    pub fn looked_up(&self, n: u64) {
        self.lookups.fetch_add(n, Ordering::AcqRel);
    }

    /// The kernel forgot `n` lookups of `memory`.
    pub fn forgotten(&self, n: u64) {
        let _ = self
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Whether the kernel holds the `memory` inode right now.
    pub fn holds_inode(&self) -> bool {
        self.lookups.load(Ordering::Acquire) > 0
    }

    /// Whether pushed pages can reach the kernel at all (enabled, sink set).
    pub fn can_store(&self) -> bool {
        self.enabled && self.sink.get().is_some()
    }

    /// Push `data` at byte `offset`; false if stores are off, the inode is not
    /// held, or the kernel refused.
    pub fn store(&self, offset: u64, data: &[u8]) -> bool {
        if !self.enabled || !self.holds_inode() {
            return false;
        }
        let Some(k) = self.sink.get() else {
            return false;
        };
        match k.store(offset, data) {
            Ok(()) => true,
            Err(e) => {
                if self.store_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!("mountd: notify-store at {offset:#x} failed: {e}");
                }
                false
            }
        }
    }

    /// Drop a range from the kernel page cache (best effort).
    pub fn invalidate(&self, offset: u64, len: u64) {
        if let Some(k) = self.sink.get()
            && let Err(e) = k.invalidate(offset, len)
        {
            log::debug!("mountd: invalidating {offset:#x}+{len:#x} failed: {e}");
        }
    }
}

/// Notify-store into the page cache of inode `ino` through a FUSE session.
pub struct NotifierCache {
    /// The session's notifier.
    pub notifier: fuser::Notifier,
    /// The inode (`memory`).
    pub ino: INodeNo,
}

impl KernelCache for NotifierCache {
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.notifier.store(self.ino, offset, data)
    }

    fn invalidate(&self, offset: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(io::Error::other)?;
        let len = i64::try_from(len).map_err(io::Error::other)?;
        self.notifier.inval_inode(self.ino, off, len)
    }
}
