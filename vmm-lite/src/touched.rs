//! `restore --touched-out`: which guest pages a lazy restore faulted in.
//!
//! A page is "touched" when it is present in this process's page table for guest RAM
//! (`/proc/self/pagemap` bit 63, or bit 62 if it was swapped out since): KVM faults guest
//! accesses in through the same host mapping, and so do the VMM's own reads of guest RAM.
//!
//! Counted as is, that would overstate the guest's accesses in two ways:
//! - a read fault on a file mapping also maps neighbouring pages that happen to be in the
//!   page cache ("fault-around", mm/memory.c `do_fault_around`; 256 pages per fault measured
//!   here on a cached file), and a freshly written raw dump or a ckptfs mount with a warm
//!   cache has all of them there;
//! - ext4 (and other file systems with large folios) may cache a file in 2 MiB folios, and a
//!   read fault then maps the whole folio with one PMD (`do_set_pmd`): 512 pages at a time.
//!
//! So [`Touched`] turns both off for guest RAM: the kernel skips fault-around on a range
//! registered with a userfaultfd in write-protect mode (`uffd_disable_fault_around`), which
//! it registers with `UFFD_FEATURE_WP_ASYNC` (Linux 6.7: write-protect faults are resolved
//! by the kernel itself, and nothing is ever write-protected here, so nothing else changes);
//! and it never maps a PMD in a `MADV_NOHUGEPAGE` range (`vma_thp_disabled`). Each fault
//! then maps exactly the page touched. A restore measured this way takes more, smaller
//! faults than an unmeasured one: use it to measure the touched set, not the time.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::abi;
use crate::memory::GuestMemory;

/// `linux/userfaultfd.h`: the API version.
const UFFD_API: u64 = 0xaa;
/// `linux/userfaultfd.h`: write-protect faults are resolved by the kernel (Linux 6.7).
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `linux/userfaultfd.h`: register a range for write-protect tracking.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// pagemap: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: the page is swapped out (it was present before).
const PM_SWAPPED: u64 = 1 << 62;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// Errors from measuring touched pages.
#[derive(Debug, thiserror::Error)]
pub enum TouchedError {
    /// The userfaultfd registration that turns fault-around off failed.
    #[error(
        "--touched-out needs userfaultfd with UFFD_FEATURE_WP_ASYNC (Linux 6.7) to count \
         pages exactly: {step} failed"
    )]
    Userfaultfd {
        /// Which call.
        step: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// MADV_NOHUGEPAGE failed.
    #[error("--touched-out: madvise(MADV_NOHUGEPAGE) of guest RAM failed")]
    Madvise(#[source] io::Error),
    /// Reading /proc/self/pagemap failed.
    #[error("reading /proc/self/pagemap")]
    Pagemap(#[source] io::Error),
    /// Writing the output failed.
    #[error("writing touched pages to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Guest RAM registered so that faults map one page each (see the module doc); keep it
/// alive until the measurement, as closing the userfaultfd unregisters the range.
pub struct Touched {
    _uffd: OwnedFd,
}

fn uffd_err(step: &'static str) -> impl FnOnce(io::Error) -> TouchedError {
    move |source| TouchedError::Userfaultfd { step, source }
}

impl Touched {
    /// Registers all of `mem` (call after every mapping change, before the guest runs).
    pub fn start(mem: &mut GuestMemory) -> Result<Self, TouchedError> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(uffd_err("userfaultfd")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a descriptor we just opened and nothing else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one struct uffdio_api, which `api` is.
        if unsafe { libc::ioctl(fd as i32, UFFDIO_API, &raw mut api) } != 0 {
            return Err(uffd_err("UFFDIO_API")(io::Error::last_os_error()));
        }
        let mut reg = UffdioRegister {
            start: mem.host_addr() as u64,
            len: mem.size(),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one struct uffdio_register; the range is
        // our own guest RAM mapping. With WP_ASYNC no fault ever waits on this descriptor.
        if unsafe { libc::ioctl(fd as i32, UFFDIO_REGISTER, &raw mut reg) } != 0 {
            return Err(uffd_err("UFFDIO_REGISTER")(io::Error::last_os_error()));
        }
        // SAFETY: madvise only changes how the kernel backs our own mapping; MADV_NOHUGEPAGE
        // keeps guest RAM contents as they are.
        let ret = unsafe {
            libc::madvise(
                mem.host_addr().cast(),
                mem.size() as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        if ret != 0 {
            return Err(TouchedError::Madvise(io::Error::last_os_error()));
        }
        Ok(Touched { _uffd: uffd })
    }

    /// The guest pages present in `mem`'s mapping now, as sorted ranges of page indices.
    pub fn scan(&self, mem: &GuestMemory) -> Result<Vec<Range<u64>>, TouchedError> {
        present_pages(mem)
    }
}

/// Guest pages present in `mem`'s host mapping, as sorted ranges.
pub fn present_pages(mem: &GuestMemory) -> Result<Vec<Range<u64>>, TouchedError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(TouchedError::Pagemap)?;
    let first_vpage = mem.as_slice().as_ptr() as u64 / abi::PAGE_SIZE;
    let pages = mem.size() / abi::PAGE_SIZE;
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut first = 0;
    while first < pages {
        let n = CHUNK.min(pages - first);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap
            .read_exact_at(bytes, (first_vpage + first) * 8)
            .map_err(TouchedError::Pagemap)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                push_page(&mut out, first + i as u64);
            }
        }
        first += n;
    }
    Ok(out)
}

fn push_page(ranges: &mut Vec<Range<u64>>, page: u64) {
    match ranges.last_mut() {
        Some(r) if r.end == page => r.end = page + 1,
        _ => ranges.push(page..page + 1),
    }
}

/// Pages in `ranges`.
pub fn count(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// Writes `ranges` as text, one line `FIRST_PAGE PAGE_COUNT` per run (the form of a mount's
/// `zero-ranges` file, so `ckptfs::source::parse_zero_ranges` reads it too).
pub fn write(path: &Path, ranges: &[Range<u64>]) -> Result<(), TouchedError> {
    let mut text = String::with_capacity(ranges.len() * 16);
    for r in ranges {
        text.push_str(&format!("{} {}\n", r.start, r.end - r.start));
    }
    std::fs::write(path, text).map_err(|source| TouchedError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_touched_pages_of_a_cached_file_mapping_are_present() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![3u8; 4 << 20]).unwrap();
        let mut mem = GuestMemory::map_file_private(f.path(), 4 << 20).unwrap();
        let touched = Touched::start(&mut mem).unwrap();
        // The file's pages are all in the page cache: without the registration, fault-around
        // would map their neighbours too.
        assert_eq!(mem.read_u32(10 * 4096), Some(0x0303_0303));
        assert_eq!(mem.read_u32(300 * 4096 + 8), Some(0x0303_0303));
        mem.write(301 * 4096, &[1]).unwrap();
        assert_eq!(touched.scan(&mem).unwrap(), vec![10..11, 300..302]);
    }

    #[test]
    fn ranges_are_written_as_first_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        write(&path, &[1..3, 7..8]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1 2\n7 1\n");
        assert_eq!(count(&[1..3, 7..8]), 3);
        let parsed = ckptfs::source::parse_zero_ranges("1 2\n7 1\n", 8).unwrap();
        assert_eq!(parsed, vec![1..3, 7..8]);
    }
}
