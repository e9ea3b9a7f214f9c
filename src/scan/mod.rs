//! Finding a guest page's bytes on a disk, at any 512-byte-aligned offset.
//!
//! Real guests keep page-cache pages wherever their file system put the data:
//! with 1 KiB ext4 blocks at 1, 2 or 3 KiB past a 4 KiB boundary, in an MBR
//! partition that starts at sector 63 at 3.5 KiB past one. So a disk has eight
//! *phases* (offset mod 4096 = 0, 512, ..., 3584), and a page may sit in any.
//!
//! - Keys: a page's key is the xxh3 of the xxh3s of its eight 512-byte
//!   sectors ([`page_key`]). The key of every 512-aligned window of a disk then
//!   costs one hash per sector plus one small hash per window, so indexing all
//!   eight phases hashes the disk once, not eight times.
//! - Index ([`index::ContentIndex`]): key -> (disk, sector) for the windows of
//!   the phases in use, 16 bytes a window in a flat open-addressing table.
//! - Phases ([`phases`]): all eight on small disks; otherwise the phases the
//!   disk's structure implies (partition starts, ext2/3/4 and XFS block
//!   sizes), plus any phase where a sample of guest pages is found while the
//!   disk is read (then the part already read is indexed again for it).
//!
//! Every match is confirmed byte for byte before a page becomes a DISK entry.

pub mod build;
pub mod index;
pub mod phases;

pub use build::{DiskScan, IndexReport, ScanOptions};
pub use index::ContentIndex;
pub use phases::PhaseSet;

use std::io;

use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::disk::DiskImage;
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64, SECTOR_SIZE, SECTORS_PER_PAGE};

const SECTOR: usize = SECTOR_SIZE as usize;

/// xxh3 of one 512-byte sector.
pub fn sector_hash(sector: &[u8]) -> u64 {
    xxh3_64(sector)
}

/// The key of a 4 KiB window from the hashes of its eight sectors.
pub fn window_key(h: &[u64]) -> u64 {
    let mut b = [0u8; 8 * SECTORS_PER_PAGE];
    for (chunk, v) in b.chunks_exact_mut(8).zip(h) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    xxh3_64(&b)
}

/// The key of a 4 KiB page (equal to the key of a disk window with the same bytes).
pub fn page_key(page: &[u8]) -> u64 {
    let mut h = [0u64; SECTORS_PER_PAGE];
    for (v, s) in h.iter_mut().zip(page.chunks_exact(SECTOR)) {
        *v = sector_hash(s);
    }
    window_key(&h)
}

/// Whether `bytes` are all zero: 64 bytes at a time (OR of eight u64 words,
/// which vectorizes), stopping at the first block that is not.
pub fn is_zero(bytes: &[u8]) -> bool {
    let blocks = bytes.chunks_exact(64);
    let tail = blocks.remainder();
    blocks.into_iter().all(|b| {
        b.chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")))
            .fold(0, |acc, w| acc | w)
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// Bytes read per step while a disk is indexed or sampled.
pub const CHUNK: usize = 1 << 20;
/// A chunk is read with this much more, so windows that start in it and end
/// in the next are seen.
const OVERLAP: usize = PAGE_SIZE - SECTOR;

/// A disk as the scan reads it: mapped when raw, through its image reader when qcow2.
pub struct ScanDisk<'a> {
    image: &'a DiskImage,
    map: Option<Mmap>,
}

impl<'a> ScanDisk<'a> {
    /// Prepare `image` for scanning (a raw image is mapped read-only).
    pub fn new(image: &'a DiskImage) -> io::Result<Self> {
        let map = match image.raw_file() {
            Some(f) if image.size() > 0 => {
                // SAFETY: the image is opened read-only and only read through the
                // map; a concurrent writer could change bytes under us, which at
                // worst misclassifies a page: every page is CRC-checked on restore.
                Some(unsafe { Mmap::map(f) }?)
            }
            _ => None,
        };
        Ok(ScanDisk { image, map })
    }

    /// The image.
    pub fn image(&self) -> &DiskImage {
        self.image
    }

    /// Size of the disk.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The 4 KiB window at `offset`, if it lies inside the disk (read into
    /// `buf` unless the disk is mapped).
    pub fn window<'b>(&'b self, offset: u64, buf: &'b mut [u8; PAGE_SIZE]) -> Option<&'b [u8]> {
        let end = offset.checked_add(PAGE_SIZE_U64)?;
        if end > self.size() {
            return None;
        }
        if let Some(m) = &self.map {
            return m.get(offset as usize..end as usize);
        }
        if let Some(w) = self.image.mapped(offset, PAGE_SIZE) {
            return Some(w);
        }
        self.image.read_exact_at(buf, offset).ok()?;
        Some(&buf[..])
    }

    /// Call `f(offset, bytes)` for consecutive chunks of `[0, end)`: each
    /// `bytes` starts at `offset` (a multiple of [`CHUNK`]) and runs up to
    /// 3.5 KiB into the next chunk (not past the disk), so every window that
    /// starts in the chunk is inside `bytes`. Raw disks are read through the map.
    pub fn for_each_chunk(
        &self,
        end: u64,
        mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let size = self.size();
        let end = end.min(size);
        let mut buf = Vec::new();
        let mut at = 0u64;
        while at < end {
            let len = (CHUNK + OVERLAP).min((size - at) as usize);
            let bytes = match &self.map {
                Some(m) => &m[at as usize..at as usize + len],
                None => {
                    buf.resize(len, 0);
                    self.image.read_exact_at(&mut buf, at)?;
                    &buf[..]
                }
            };
            f(at, bytes)?;
            at += CHUNK as u64;
        }
        Ok(())
    }

    /// Let the kernel read the mapped disk ahead (it is about to be read front to back).
    pub fn advise_sequential(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
    }

    /// The disk will now be read at random (classification looks windows up).
    pub fn advise_random(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(memmap2::Advice::Random);
        }
    }
}

/// Sector hashes of `bytes` (whole sectors only), and which sectors are all zero.
pub fn hash_sectors(bytes: &[u8], hashes: &mut Vec<u64>, zero: &mut Vec<bool>) {
    hashes.clear();
    zero.clear();
    for s in bytes.chunks_exact(SECTOR) {
        hashes.push(sector_hash(s));
        zero.push(is_zero(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_key_equals_window_key_from_sector_hashes() {
        let mut disk = vec![0u8; 3 * PAGE_SIZE];
        crate::synth::Rng::new(5).fill(&mut disk);
        let (mut h, mut z) = (Vec::new(), Vec::new());
        hash_sectors(&disk, &mut h, &mut z);
        for s in 0..h.len() - 7 {
            let page = &disk[s * SECTOR..s * SECTOR + PAGE_SIZE];
            assert_eq!(page_key(page), window_key(&h[s..s + 8]), "sector {s}");
        }
        assert_ne!(
            page_key(&disk[..PAGE_SIZE]),
            page_key(&disk[SECTOR..][..PAGE_SIZE])
        );
    }

    #[test]
    fn is_zero_sees_every_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 1, 7, 8, 2048, 4095, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b[..]), "{i}");
            assert!(!is_zero(&b[1..]) || i == 0, "{i}");
            b[i] = 0;
        }
    }
}
