//! `vmm-lite mkdisk`: a disk image of non-zero, pairwise distinct 4 KiB blocks (each starts
//! with its own block number, the rest is a PRNG stream), so a content scan finds exactly one
//! block for any page read from it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

const BLOCK: usize = 4096;

/// Errors from writing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum MkdiskError {
    /// The size is zero or not a multiple of 4096.
    #[error("disk size {0} is not a positive multiple of 4096")]
    BadSize(u64),
    /// Writing failed.
    #[error("writing disk image {path}")]
    Write {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Contents of block `index` of an image made with `seed`.
pub fn block_contents(seed: u64, index: u64, out: &mut [u8]) {
    let mut x = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    out[..8].copy_from_slice(&index.to_le_bytes());
    for chunk in out[8..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// Writes a `size`-byte image to `path`.
pub fn mkdisk(path: &Path, size: u64, seed: u64) -> Result<(), MkdiskError> {
    if size == 0 || !size.is_multiple_of(BLOCK as u64) {
        return Err(MkdiskError::BadSize(size));
    }
    let write_err = |source| MkdiskError::Write {
        path: path.to_owned(),
        source,
    };
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(write_err)?);
    let mut block = [0u8; BLOCK];
    for index in 0..size / BLOCK as u64 {
        block_contents(seed, index, &mut block);
        out.write_all(&block).map_err(write_err)?;
    }
    out.into_inner()
        .map_err(|e| write_err(e.into_error()))?
        .sync_all()
        .map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn blocks_are_distinct_and_never_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        mkdisk(&path, 256 * BLOCK as u64, 1).unwrap();
        let data = std::fs::read(&path).unwrap();
        let blocks: HashSet<&[u8]> = data.chunks(BLOCK).collect();
        assert_eq!(blocks.len(), 256);
        assert!(data.chunks(BLOCK).all(|b| b.iter().any(|x| *x != 0)));
    }

    #[test]
    fn unaligned_size_is_refused() {
        assert!(matches!(
            mkdisk(Path::new("/tmp/x"), 1000, 1),
            Err(MkdiskError::BadSize(1000))
        ));
    }
}
