//! Guest RAM: one mapping owned by [`GuestMemory`], unmapped when it is dropped.
//!
//! Three kinds, matching the ways a VM starts:
//! - fresh anonymous memory (boot, and the eager restore baselines),
//! - a `MAP_PRIVATE` mapping of a memory file (lazy restore: the kernel pages the file in on
//!   demand, a ckptfs FUSE mount's `memory` file included; guest writes stay in this process's
//!   copy-on-write pages, the file is only read).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ckptfs::PageSet;
use memmap2::{MmapMut, MmapOptions};

use crate::abi;

/// Errors from setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not a multiple of 2 MiB or outside the supported range.
    #[error(
        "guest RAM size {0} bytes is not supported (a multiple of 2 MiB, {min} MiB to {max} MiB)",
        min = abi::MIN_MEM >> 20,
        max = abi::MAX_MEM >> 20
    )]
    BadSize(u64),
    /// Mapping anonymous memory failed.
    #[error("allocating {size} bytes of guest RAM")]
    Anonymous {
        /// Bytes asked for.
        size: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// The memory file could not be opened or inspected.
    #[error("memory file {path}: cannot open")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The memory file is shorter than guest RAM: mapping it would SIGBUS later.
    #[error("memory file {path} is {actual} bytes, shorter than guest RAM ({expected} bytes)")]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// Guest RAM size.
        expected: u64,
    },
    /// mmap of the memory file failed.
    #[error("memory file {path}: cannot map")]
    Map {
        /// The file.
        path: PathBuf,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// Reading the memory file (eager copy) failed.
    #[error("memory file {path}: read failed at byte {offset}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Makes a SIGBUS (a page of a file-backed guest RAM mapping that cannot be read any more,
/// e.g. because the ckptfs FUSE daemon serving it died) end the process with one clear line
/// instead of a core dump. Faults taken inside KVM_RUN do not signal: KVM returns EFAULT.
pub fn report_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"vmm-lite: error: guest RAM could not be read (SIGBUS): the memory \
file shrank or the FUSE daemon serving it stopped\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(libc::STDERR_FILENO, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installs a handler that only calls async-signal-safe functions; a zeroed
    // sigaction with sa_sigaction set is a valid argument.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// Guest RAM at guest physical address 0, `size` bytes long.
pub struct GuestMemory {
    map: MmapMut,
    /// Pages this VMM wrote through [`Self::range_mut`], [`Self::write`] or
    /// [`Self::as_mut_slice`] since [`Self::track_writes`] (None: not tracked).
    /// KVM's dirty log does not see them (a `pread` into guest RAM, a device
    /// writing a result), so an incremental checkpoint needs both.
    written: Option<PageSet>,
}

/// Checks that `size` is a RAM size the page tables and the workloads support.
pub fn check_size(size: u64) -> Result<(), MemoryError> {
    let two_mib = 2 << 20;
    if !(abi::MIN_MEM..=abi::MAX_MEM).contains(&size) || !size.is_multiple_of(two_mib) {
        return Err(MemoryError::BadSize(size));
    }
    Ok(())
}

impl GuestMemory {
    /// Fresh zeroed anonymous memory.
    pub fn anonymous(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let map = MmapOptions::new()
            .len(size as usize)
            .map_anon()
            .map_err(|source| MemoryError::Anonymous { size, source })?;
        Ok(GuestMemory { map, written: None })
    }

    /// Opens `path` and checks that it holds at least `size` bytes.
    fn open_file(path: &Path, size: u64) -> Result<File, MemoryError> {
        let open_err = |source| MemoryError::Open {
            path: path.to_owned(),
            source,
        };
        // A directory, FIFO or device is refused by its type before any read
        // (a FIFO would block, a directory has a size that means nothing).
        let (file, meta) = ckptfs::input::open_regular(path).map_err(open_err)?;
        let actual = meta.len();
        if actual < size {
            return Err(MemoryError::TooShort {
                path: path.to_owned(),
                actual,
                expected: size,
            });
        }
        Ok(file)
    }

    /// `MAP_PRIVATE` mapping of the first `size` bytes of `path` (read + write): pages come
    /// from the file on first access, guest writes stay private to this process.
    pub fn map_file_private(path: &Path, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let file = Self::open_file(path, size)?;
        // SAFETY: MAP_PRIVATE: our writes never reach the file. If another process truncates
        // the file, accesses past the new end raise SIGBUS, as with any file-backed guest RAM;
        // the size was checked just above, which is all a VMM can do.
        let map =
            unsafe { MmapOptions::new().len(size as usize).map_copy(&file) }.map_err(|source| {
                MemoryError::Map {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok(GuestMemory { map, written: None })
    }

    /// Replaces guest pages `pages` with fresh anonymous zero pages (`MAP_FIXED` over this
    /// mapping): the guest then never faults them in through the memory file. The caller
    /// knows those pages are zero in the file (the checkpoint's zero ranges); if they are
    /// not, the guest sees zeros anyway.
    pub fn map_anonymous_over(&mut self, pages: Range<u64>) -> io::Result<()> {
        let page = abi::PAGE_SIZE;
        let (start, end) = (pages.start * page, pages.end.saturating_mul(page));
        if pages.is_empty() || end > self.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("pages {pages:?} are not inside guest RAM"),
            ));
        }
        let addr = self.host_addr().wrapping_add(start as usize);
        // SAFETY: [addr, addr + len) lies inside this mapping, which `self` owns and which no
        // reference points into while we hold `&mut self`; MAP_FIXED replaces exactly those
        // pages with anonymous memory of the same protection, and `Drop` unmaps the whole
        // range, replaced parts included.
        let ret = unsafe {
            libc::mmap(
                addr.cast(),
                (end - start) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Anonymous memory filled with the first `size` bytes of `path` (eager restore).
    pub fn copy_file(path: &Path, size: u64) -> Result<Self, MemoryError> {
        let file = Self::open_file(path, size)?;
        let mut mem = Self::anonymous(size)?;
        const CHUNK: usize = 8 << 20;
        for (i, chunk) in mem.map.chunks_mut(CHUNK).enumerate() {
            let offset = (i * CHUNK) as u64;
            file.read_exact_at(chunk, offset)
                .map_err(|source| MemoryError::Read {
                    path: path.to_owned(),
                    offset,
                    source,
                })?;
        }
        Ok(mem)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Host address of guest physical address 0, for KVM_SET_USER_MEMORY_REGION.
    pub fn host_addr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// All of guest RAM. Only meaningful while the vCPU is not running (this VMM runs the
    /// vCPU on the calling thread, so outside `Vcpu::run` it is stopped).
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// All of guest RAM, writable (same caveat as [`Self::as_slice`]). Counts every page
    /// as written when writes are tracked.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if let Some(w) = &mut self.written {
            w.insert_range(0..w.pages());
        }
        &mut self.map
    }

    /// From now on, remember which pages this VMM writes (see [`Self::written`]).
    /// Writes through [`Self::host_addr`] are not seen: that is KVM's, whose own dirty log
    /// covers them.
    pub fn track_writes(&mut self) {
        self.written = Some(PageSet::new(self.size() / abi::PAGE_SIZE));
    }

    /// Pages this VMM wrote since [`Self::track_writes`] (None if not tracked).
    pub fn written(&self) -> Option<&PageSet> {
        self.written.as_ref()
    }

    /// `len` bytes at guest physical address `addr`, or None when the range is not RAM.
    pub fn range(&self, addr: u64, len: u64) -> Option<&[u8]> {
        let end = addr.checked_add(len)?;
        self.map
            .get(usize::try_from(addr).ok()?..usize::try_from(end).ok()?)
    }

    /// Writable `len` bytes at guest physical address `addr`, or None when not RAM.
    /// Counts the pages it covers as written when writes are tracked.
    pub fn range_mut(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let end = addr.checked_add(len)?;
        let bytes = self
            .map
            .get_mut(usize::try_from(addr).ok()?..usize::try_from(end).ok()?)?;
        if let (Some(w), false) = (&mut self.written, len == 0) {
            w.insert_range(addr / abi::PAGE_SIZE..(end - 1) / abi::PAGE_SIZE + 1);
        }
        Some(bytes)
    }

    /// Reads a little-endian u64 at `addr` (None when not RAM).
    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.range(addr, 8)?.try_into().ok()?))
    }

    /// Reads a little-endian u32 at `addr` (None when not RAM).
    pub fn read_u32(&self, addr: u64) -> Option<u32> {
        Some(u32::from_le_bytes(self.range(addr, 4)?.try_into().ok()?))
    }

    /// Writes `bytes` at `addr` (None when not RAM).
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Option<()> {
        self.range_mut(addr, bytes.len() as u64)?
            .copy_from_slice(bytes);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    #[test]
    fn short_memory_file_is_refused_with_sizes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![1u8; MIB as usize]).unwrap();
        let err = GuestMemory::map_file_private(f.path(), 4 * MIB)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("shorter than guest RAM"), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn private_file_mapping_reads_file_and_keeps_writes_private() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 4 * MIB as usize]).unwrap();
        let mut mem = GuestMemory::map_file_private(f.path(), 4 * MIB).unwrap();
        assert_eq!(mem.read_u32(4096), Some(0x0707_0707));
        mem.write(4096, &[0, 0, 0, 0]).unwrap();
        assert_eq!(mem.read_u32(4096), Some(0));
        assert_eq!(std::fs::read(f.path()).unwrap()[4096], 7);
    }

    #[test]
    fn pages_mapped_anonymous_read_zero_and_the_rest_still_reads_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 4 * MIB as usize]).unwrap();
        let mut mem = GuestMemory::map_file_private(f.path(), 4 * MIB).unwrap();
        mem.map_anonymous_over(2..5).unwrap();
        assert_eq!(mem.read_u32(4096), Some(0x0707_0707));
        assert_eq!(mem.read_u32(2 * 4096), Some(0));
        assert_eq!(mem.read_u32(5 * 4096 - 4), Some(0));
        assert_eq!(mem.read_u32(5 * 4096), Some(0x0707_0707));
        mem.write(3 * 4096, &[1]).unwrap();
        assert_eq!(mem.as_slice()[3 * 4096], 1);
        assert!(mem.map_anonymous_over(1000..1025).is_err());
        assert!(mem.map_anonymous_over(3..3).is_err());
    }

    #[test]
    fn eager_copy_equals_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let mem = GuestMemory::copy_file(f.path(), 4 * MIB).unwrap();
        assert_eq!(mem.as_slice(), &data[..]);
    }

    #[test]
    fn writes_by_the_vmm_are_tracked_once_asked() {
        let mut mem = GuestMemory::anonymous(4 * MIB).unwrap();
        mem.write(0, &[1]).unwrap();
        assert!(mem.written().is_none());
        mem.track_writes();
        mem.write(4096 * 3 + 4090, &[1; 8]).unwrap();
        mem.range_mut(4096 * 9, 4096).unwrap();
        let _ = mem.range(4096 * 20, 4096);
        let pages: Vec<u64> = mem.written().unwrap().iter().map(|p| p.0).collect();
        assert_eq!(pages, vec![3, 4, 9]);
        mem.as_mut_slice();
        assert_eq!(mem.written().unwrap().count(), 1024);
    }

    #[test]
    fn odd_sizes_are_refused() {
        assert!(GuestMemory::anonymous(3 * MIB).is_err());
        assert!(GuestMemory::anonymous(abi::MAX_MEM + 2 * MIB).is_err());
        assert!(GuestMemory::anonymous(4 * MIB).is_ok());
    }

    #[test]
    fn ranges_outside_ram_are_none() {
        let mem = GuestMemory::anonymous(4 * MIB).unwrap();
        assert!(mem.range(4 * MIB - 4, 8).is_none());
        assert!(mem.range(u64::MAX, 2).is_none());
        assert_eq!(mem.read_u64(4 * MIB - 8), Some(0));
    }
}
