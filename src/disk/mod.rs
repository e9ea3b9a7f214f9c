//! Backing disk images: raw files and qcow2 images, read as the guest sees
//! them, and the cheap fingerprint that every open checks to catch a replaced,
//! resized or rewritten image.
//!
//! A raw image is read with pread. A qcow2 image is read through the `imago`
//! crate (by a QEMU block-layer maintainer): a guest offset goes through the
//! image's cluster mapping, so an uncompressed cluster costs one pread of the
//! qcow2 file, a compressed one is inflated, an unallocated one reads zeros or
//! comes from the backing image. Other container formats (vmdk, vhdx, vhd,
//! vdi) are refused with the `qemu-img convert` line that makes them usable.

mod qcow2;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

pub use crate::format::DiskFormat;
use crate::format::DiskRecord;
use crate::input;
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64};

/// Number of 4 KiB blocks the fingerprint samples (spread evenly, first and last included).
pub const FINGERPRINT_SAMPLES: u64 = 64;

/// Errors about a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or reading failed.
    #[error("disk image {path}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is in a container format ckptfs does not read.
    #[error(
        "disk image {path} is in {format} format, which ckptfs does not read; convert it with `qemu-img convert -O qcow2 {path} OUT.qcow2` (or -O raw)"
    )]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// Detected format name.
        format: &'static str,
    },
    /// The image is not what the checkpoint recorded.
    #[error("disk image {path} changed since the checkpoint was made: {what}")]
    Changed {
        /// The image.
        path: PathBuf,
        /// Format, size or fingerprint.
        what: String,
    },
}

/// Container magics at offset 0 that ckptfs refuses. A raw image could in
/// theory start with these bytes, but a guest's raw disk practically never does.
const UNSUPPORTED_MAGICS: &[(&[u8], &str)] = &[
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vhd"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
];

/// Name the container format of `first_bytes`, if it is one ("qcow2", "vmdk", ...).
pub fn detect_container(first_bytes: &[u8]) -> Option<&'static str> {
    if first_bytes.starts_with(qcow2::MAGIC) {
        return Some("qcow2");
    }
    UNSUPPORTED_MAGICS
        .iter()
        .find(|(magic, _)| first_bytes.starts_with(magic))
        .map(|&(_, name)| name)
}

enum Backend {
    Raw(File),
    Qcow2(qcow2::Qcow2Image),
}

/// An open disk image (raw or qcow2), read as the guest sees it.
pub struct DiskImage {
    path: PathBuf,
    size: u64,
    mode: u32,
    backend: Backend,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("size", &self.size)
            .finish()
    }
}

impl DiskImage {
    /// Open `path` read-only (a regular file, checked before reading) as a raw
    /// or qcow2 image; other container formats are refused.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let io_err = |source| DiskError::Io {
            path: path.to_owned(),
            source,
        };
        let (file, meta) = input::open_regular(path).map_err(io_err)?;
        // Pages are read from a disk image at scattered offsets (fingerprint
        // samples, page faults): no readahead around each read, set before the
        // first read so no readahead markers are left to set off more (a
        // create's sequential scan maps the image, which read-around still serves).
        input::advise(&file, input::Access::Random);
        let mut head = [0u8; 64];
        let n = input::read_up_to(&file, &mut head, 0).map_err(io_err)?;
        let (size, backend) = match detect_container(&head[..n]) {
            None => (meta.len(), Backend::Raw(file)),
            Some("qcow2") => {
                let q = qcow2::Qcow2Image::open(path, file).map_err(io_err)?;
                (q.size(), Backend::Qcow2(q))
            }
            Some(format) => {
                return Err(DiskError::Unsupported {
                    path: path.to_owned(),
                    format,
                });
            }
        };
        Ok(DiskImage {
            path: path.to_owned(),
            size,
            mode: input::mode_bits(&meta),
            backend,
        })
    }

    /// Path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Container format.
    pub fn format(&self) -> DiskFormat {
        match self.backend {
            Backend::Raw(_) => DiskFormat::Raw,
            Backend::Qcow2(_) => DiskFormat::Qcow2,
        }
    }

    /// Size of the disk as the guest sees it, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Permission bits of the image file (of the top file for qcow2).
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// The open file of a raw image (which can be mapped), `None` for qcow2.
    pub fn raw_file(&self) -> Option<&File> {
        match &self.backend {
            Backend::Raw(f) => Some(f),
            Backend::Qcow2(_) => None,
        }
    }

    /// The disk's `len` bytes at `offset` in place, when they are in a mapped
    /// file without a copy: an uncompressed cluster run of a qcow2 image (raw
    /// images are mapped whole by the caller). `None`: read them.
    pub fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        match &self.backend {
            Backend::Raw(_) => None,
            Backend::Qcow2(q) => q.mapped(offset, len),
        }
    }

    /// Fill `buf` with the disk's bytes at `offset` (all inside the disk).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset:#x} lie past the end of the {}-byte disk",
                    buf.len(),
                    self.size
                ),
            ));
        }
        match &self.backend {
            Backend::Raw(f) => f.read_exact_at(buf, offset),
            Backend::Qcow2(q) => q.read_exact_at(buf, offset),
        }
    }

    /// The fingerprint of this image: the xxh3 of its size and of
    /// [`FINGERPRINT_SAMPLES`] 4 KiB blocks of the disk spread evenly over it,
    /// and for qcow2 also of its metadata (each file's length, header and L1
    /// table, backing files included), which every allocating write changes.
    /// It catches a replaced, resized or rewritten image in about 64 reads; a
    /// single changed block elsewhere is caught by that page's CRC when read.
    pub fn fingerprint(&self) -> Result<u64, DiskError> {
        let io_err = |source| DiskError::Io {
            path: self.path.clone(),
            source,
        };
        let mut h = Xxh3::new();
        h.update(&self.size.to_le_bytes());
        let mut buf = vec![0u8; PAGE_SIZE];
        let sampled =
            fingerprint_blocks(self.size)
                .into_iter()
                .try_for_each(|block| -> io::Result<()> {
                    let off = block * PAGE_SIZE_U64;
                    let n = PAGE_SIZE_U64.min(self.size - off) as usize;
                    self.read_exact_at(&mut buf[..n], off)?;
                    h.update(&buf[..n]);
                    Ok(())
                });
        sampled.map_err(io_err)?;
        if let Backend::Qcow2(q) = &self.backend {
            q.hash_metadata(&mut h).map_err(io_err)?;
        }
        Ok(h.digest())
    }

    /// Tell the kernel how this raw image will be read (qcow2 images: no-op).
    pub fn advise(&self, access: crate::input::Access) {
        if let Backend::Raw(f) = &self.backend {
            crate::input::advise(f, access);
        }
    }

    /// The disk-table record of this image (absolute path, format, size, fingerprint).
    pub fn record(&self) -> Result<DiskRecord, DiskError> {
        let path = std::path::absolute(&self.path).map_err(|source| DiskError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(DiskRecord {
            path,
            format: self.format(),
            size: self.size,
            fingerprint: self.fingerprint()?,
        })
    }

    /// Check the image against what the checkpoint recorded; with
    /// `fingerprint` false only the format and size are compared.
    pub fn check(&self, rec: &DiskRecord, fingerprint: bool) -> Result<(), DiskError> {
        let changed = |what: String| DiskError::Changed {
            path: self.path.clone(),
            what,
        };
        if self.format() != rec.format {
            return Err(changed(format!(
                "it is {}, was {}",
                self.format().name(),
                rec.format.name()
            )));
        }
        if self.size != rec.size {
            return Err(changed(format!(
                "size is {} bytes, was {}",
                self.size, rec.size
            )));
        }
        if fingerprint && self.fingerprint()? != rec.fingerprint {
            return Err(changed("content fingerprint differs".into()));
        }
        Ok(())
    }
}

/// Block numbers the fingerprint samples, for an image of `size` bytes.
pub fn fingerprint_blocks(size: u64) -> Vec<u64> {
    let blocks = size.div_ceil(PAGE_SIZE_U64);
    let samples = FINGERPRINT_SAMPLES.min(blocks);
    (0..samples)
        .map(|i| {
            if samples <= 1 {
                0
            } else {
                i * (blocks - 1) / (samples - 1)
            }
        })
        .collect()
}

/// A fingerprint of bytes held in memory: their length and the 64 sampled
/// 4 KiB blocks, as [`DiskImage::fingerprint`] samples a disk.
pub fn bytes_fingerprint(bytes: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(bytes.len() as u64).to_le_bytes());
    for block in fingerprint_blocks(bytes.len() as u64) {
        let at = (block * PAGE_SIZE_U64) as usize;
        h.update(&bytes[at..bytes.len().min(at + PAGE_SIZE)]);
    }
    h.digest()
}

/// [`bytes_fingerprint`] of the first `len` bytes of `file`, read with pread
/// (without readahead around the samples).
pub fn file_fingerprint(file: &std::fs::File, len: u64) -> std::io::Result<u64> {
    let mut h = Xxh3::new();
    h.update(&len.to_le_bytes());
    let mut buf = vec![0u8; PAGE_SIZE];
    let sampled =
        fingerprint_blocks(len)
            .into_iter()
            .try_for_each(|block| -> std::io::Result<()> {
                let at = block * PAGE_SIZE_U64;
                let n = PAGE_SIZE_U64.min(len - at) as usize;
                std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..n], at)?;
                h.update(&buf[..n]);
                Ok(())
            });
    sampled?;
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmdk_is_refused_with_conversion_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vmdk");
        let mut data = b"KDMV\x01\0\0\0".to_vec();
        data.resize(8192, 0);
        std::fs::write(&p, data).unwrap();
        let err = DiskImage::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("vmdk format") && err.contains("qemu-img convert -O qcow2"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_sees_resize_and_sampled_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let d = DiskImage::open(&p).unwrap();
        let rec = d.record().unwrap();
        assert_eq!(rec.format, DiskFormat::Raw);
        d.check(&rec, true).unwrap();
        let bigger = DiskRecord {
            size: rec.size + 1,
            ..rec.clone()
        };
        assert!(d.check(&bigger, false).is_err());
        // Change the last block, which is always sampled.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_at(&[8u8], (1 << 20) - 1).unwrap();
        let err = d.check(&rec, true).unwrap_err().to_string();
        assert!(err.contains("fingerprint"), "{err}");
        d.check(&rec, false).unwrap();
    }

    #[test]
    fn reads_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let d = DiskImage::open(&p).unwrap();
        let mut buf = [0u8; 4096];
        d.read_exact_at(&mut buf, 4096).unwrap();
        assert!(d.read_exact_at(&mut buf, 4097).is_err());
        assert!(d.read_exact_at(&mut buf, u64::MAX - 10).is_err());
    }

    #[test]
    fn fingerprint_blocks_cover_first_and_last() {
        let b = fingerprint_blocks(1 << 30);
        assert_eq!(b.len(), 64);
        assert_eq!(b[0], 0);
        assert_eq!(*b.last().unwrap(), (1 << 30) / 4096 - 1);
        assert_eq!(fingerprint_blocks(4096), vec![0]);
        assert!(fingerprint_blocks(0).is_empty());
    }
}
