//! A raw guest memory dump opened for `create` or `verify`: mapped read-only,
//! its holes found without reading them.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::input;
use crate::types::PAGE_SIZE_U64;

/// A raw guest memory image, mapped read-only.
pub struct MemoryImage {
    path: PathBuf,
    map: Mmap,
    holes: Vec<Range<u64>>,
    mode: u32,
}

impl std::fmt::Debug for MemoryImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryImage")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

/// Errors from opening a memory image.
#[derive(Debug, thiserror::Error)]
pub enum MemoryImageError {
    /// Open, stat or mmap failed (or the file is not a regular file).
    #[error("memory image {path}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("memory image {path} is empty (0 bytes): no guest memory to checkpoint")]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// Not whole pages.
    #[error(
        "memory image {path} is {size} bytes, not a multiple of 4096 (is it a raw memory dump?)"
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

impl MemoryImage {
    /// Open and map `path` (a regular file, checked before reading), checking
    /// it holds whole 4 KiB pages and at least one.
    pub fn open(path: &Path) -> Result<Self, MemoryImageError> {
        let io_err = |source| MemoryImageError::Io {
            path: path.to_owned(),
            source,
        };
        let (file, meta) = input::open_regular(path).map_err(io_err)?;
        let len = meta.len();
        if len == 0 {
            return Err(MemoryImageError::Empty {
                path: path.to_owned(),
            });
        }
        if len % PAGE_SIZE_U64 != 0 {
            return Err(MemoryImageError::Size {
                path: path.to_owned(),
                size: len,
            });
        }
        // SAFETY: read-only map of a file we only read; a concurrent truncation
        // by another process would SIGBUS, as with any mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        // One front-to-back pass: let the kernel read ahead and drop behind.
        let _ = map.advise(memmap2::Advice::Sequential);
        let holes = find_holes(&file, len).map_err(io_err)?;
        Ok(MemoryImage {
            path: path.to_owned(),
            map,
            holes,
            mode: input::mode_bits(&meta),
        })
    }

    /// Path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Page ranges that are holes of the (sparse) file, sorted.
    pub fn holes(&self) -> &[Range<u64>] {
        &self.holes
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Permission bits of the file (a checkpoint made from it is no more readable).
    pub fn mode(&self) -> u32 {
        self.mode
    }
}

/// Whole pages inside holes of `file` (SEEK_DATA/SEEK_HOLE), as sorted page ranges.
fn find_holes(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    match seek_holes(file, len) {
        // A filesystem without SEEK_DATA: treat the whole file as data.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        r => r,
    }
}

fn seek_holes(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid open descriptor; it only moves the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            // ENXIO: no data (or hole) at or after `off`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut holes = Vec::new();
    let mut at = 0;
    while at < len {
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(len).min(len);
        // Only whole pages of the hole count; a partial page is read normally.
        let (first, end) = (at.div_ceil(PAGE_SIZE_U64), data / PAGE_SIZE_U64);
        if end > first {
            holes.push(first..end);
        }
        if data >= len {
            break;
        }
        at = seek(data, libc::SEEK_HOLE)?.unwrap_or(len);
    }
    Ok(holes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_odd_dumps_are_refused_with_one_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        std::fs::write(&p, b"").unwrap();
        let e = MemoryImage::open(&p).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "memory image {} is empty (0 bytes): no guest memory to checkpoint",
                p.display()
            )
        );
        std::fs::write(&p, [1u8; 4097]).unwrap();
        let e = MemoryImage::open(&p).unwrap_err().to_string();
        assert!(e.contains("not a multiple of 4096"), "{e}");
    }
}
