//! Backing disk images: opening them, refusing non-raw formats, and the cheap
//! fingerprint that a mount checks to catch a replaced or resized image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    /// The image is in a container format, not raw.
    #[error(
        "disk image {path} is in {format} format, not raw; convert it with `qemu-img convert -O raw {path} OUT.img`"
    )]
    NotRaw {
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
        /// Size or fingerprint.
        what: String,
    },
}

/// Known container-format magics at offset 0. A raw image could in theory
/// start with these bytes, but a guest's raw disk practically never does.
const CONTAINER_MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vhd"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"),
];

/// Name the container format of `first_bytes`, if it is one.
pub fn detect_container(first_bytes: &[u8]) -> Option<&'static str> {
    CONTAINER_MAGICS
        .iter()
        .find(|(magic, _)| first_bytes.starts_with(magic))
        .map(|&(_, name)| name)
}

/// An open, raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    /// Path as opened.
    pub path: PathBuf,
    /// Open file (read-only).
    pub file: File,
    /// Size in bytes.
    pub size: u64,
}

impl DiskImage {
    /// Open `path` read-only and check it is a raw image.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let io_err = |source| DiskError::Io {
            path: path.to_owned(),
            source,
        };
        let (file, size) = open_regular(path).map_err(io_err)?;
        let mut head = [0u8; 64];
        let n = read_up_to(&file, &mut head, 0).map_err(io_err)?;
        if let Some(format) = detect_container(&head[..n]) {
            return Err(DiskError::NotRaw {
                path: path.to_owned(),
                format,
            });
        }
        Ok(DiskImage {
            path: path.to_owned(),
            file,
            size,
        })
    }

    /// Number of whole 4 KiB blocks.
    pub fn blocks(&self) -> u64 {
        self.size / PAGE_SIZE_U64
    }

    /// Compute the fingerprint of this image (see [`fingerprint`]).
    pub fn fingerprint(&self) -> Result<u64, DiskError> {
        fingerprint(&self.file, self.size).map_err(|source| DiskError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Check the image against what the checkpoint recorded.
    pub fn check(&self, size: u64, fp: u64) -> Result<(), DiskError> {
        let changed = |what: String| DiskError::Changed {
            path: self.path.clone(),
            what,
        };
        if self.size != size {
            return Err(changed(format!("size is {} bytes, was {size}", self.size)));
        }
        if self.fingerprint()? != fp {
            return Err(changed("content fingerprint differs".into()));
        }
        Ok(())
    }
}

/// Open `path` read-only and return it with its size; anything but a regular
/// file (a directory, a device) is refused.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta.len()))
}

fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A content fingerprint cheap enough to take at every mount: the size and the
/// xxh3 of [`FINGERPRINT_SAMPLES`] 4 KiB blocks spread evenly over the image
/// (64 preads). It catches a replaced or resized image; a single changed block
/// elsewhere is caught by that page's CRC when it is read.
pub fn fingerprint(file: &File, size: u64) -> io::Result<u64> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&size.to_le_bytes());
    let blocks = size.div_ceil(PAGE_SIZE_U64);
    let mut buf = vec![0u8; PAGE_SIZE];
    let samples = FINGERPRINT_SAMPLES.min(blocks);
    for i in 0..samples {
        let block = if samples <= 1 {
            0
        } else {
            i * (blocks - 1) / (samples - 1)
        };
        let n = read_up_to(file, &mut buf, block * PAGE_SIZE_U64)?;
        hasher.update(&buf[..n]);
    }
    Ok(hasher.digest())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_is_refused_with_conversion_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        let mut data = b"QFI\xfb\0\0\0\x03".to_vec();
        data.resize(8192, 0);
        std::fs::write(&p, data).unwrap();
        let err = DiskImage::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("qcow2") && err.contains("qemu-img convert -O raw"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_sees_resize_and_sampled_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let d = DiskImage::open(&p).unwrap();
        let fp = d.fingerprint().unwrap();
        d.check(1 << 20, fp).unwrap();
        assert!(d.check((1 << 20) + 1, fp).is_err());
        // Change the last block, which is always sampled.
        d.file.sync_all().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_at(&[8u8], (1 << 20) - 1).unwrap();
        let err = d.check(1 << 20, fp).unwrap_err().to_string();
        assert!(err.contains("fingerprint"), "{err}");
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
