//! Synthetic guests with known page kinds, for demos, tests and benchmarks
//! (the one generator of the workspace; mountd's test fixture uses it too).
//!
//! A plan says, page by page, what a generated memory image holds: zeros, a
//! copy of 4 KiB of a disk at some byte offset (page cache), distinct computed
//! data, or a repeat of an earlier page. Pages come in runs (a file read into
//! the page cache is a run of consecutive disk bytes). Disk pages can sit at
//! any 512-byte alignment ([`Region`]), as they do under 1 KiB-block file
//! systems and sector-63 partitions. Everything derives from a seed.

use std::io;
use std::path::{Path, PathBuf};

use crate::create::{CreateOptions, DiskHint};
use crate::types::{DiskIndex, DiskOffset, PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// What one generated page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// All zeros.
    Zero,
    /// A copy of the 4096 disk bytes at this byte offset.
    Disk(u64),
    /// Distinct pseudo-random content.
    Random,
    /// The same bytes as an earlier `Random` page (a deduplication target).
    Repeat(usize),
}

/// SplitMix64: a tiny deterministic generator, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any seed, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Weights of each page kind (they need not sum to anything) and run lengths.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    /// Weight of zero pages.
    pub zero: u32,
    /// Weight of page-cache (disk) pages.
    pub disk: u32,
    /// Weight of distinct computed pages.
    pub random: u32,
    /// Weight of repeats of earlier computed pages.
    pub repeat: u32,
    /// Longest run of pages of one kind (runs are 1..=max_run pages).
    pub max_run: u64,
}

impl Mix {
    /// A desktop-like mix, page by page: 30 % zero, 40 % page cache, 20 %
    /// computed, 10 % repeats.
    pub const MIXED: Mix = Mix {
        zero: 3,
        disk: 4,
        random: 2,
        repeat: 1,
        max_run: 1,
    };

    /// A booted VM after some work, in runs of up to 64 pages: 40 % zero,
    /// 35 % page cache, 25 % computed (mountd's fixture).
    pub const RUNS: Mix = Mix {
        zero: 40,
        disk: 35,
        random: 25,
        repeat: 0,
        max_run: 64,
    };
}

/// Where page-cache bytes sit on a disk: offsets `start + k * align` inside
/// `[start, end)`. A 4 KiB-block file system in a partition at sector 63 is
/// `Region { start: 32256, end, align: 4096 }`; a 1 KiB-block one has `align: 1024`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Alignment of a run's first byte relative to `start` (a multiple of 512).
    pub align: u64,
}

impl Region {
    /// The whole disk of `len` bytes at 4 KiB alignment.
    pub fn aligned(len: u64) -> Region {
        Region {
            start: 0,
            end: len,
            align: PAGE_SIZE_U64,
        }
    }

    /// A run of `pages` pages at a random place in the region, if it fits.
    fn pick(&self, pages: u64, rng: &mut Rng) -> Option<u64> {
        let need = pages * PAGE_SIZE_U64;
        let room = self.end.checked_sub(self.start)?.checked_sub(need)?;
        Some(self.start + rng.below(room / self.align + 1) * self.align)
    }
}

/// A partition of a synthetic disk and the block size of the file system in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Byte offset of its first sector (a multiple of 512; sector 63 is 32256).
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Block size its ext4 superblock claims (1024, 2048 or 4096).
    pub block_size: u64,
}

impl Partition {
    /// Where its file data may sit: after the superblock, at its block size.
    pub fn region(&self) -> Region {
        Region {
            start: self.start + 4 * PAGE_SIZE_U64,
            end: self.start + self.len,
            align: self.block_size,
        }
    }
}

/// Give `disk` an MBR naming `parts` (at most four) and, at 1024 bytes into
/// each, the fields of an ext4 superblock that say its block size (magic
/// 0xEF53 at +56, log2(block size / 1024) at +24); the rest stays as it was.
pub fn partition(disk: &mut [u8], parts: &[Partition]) {
    assert!(parts.len() <= 4, "an MBR has four entries");
    disk[446..512].fill(0);
    for (i, p) in parts.iter().enumerate() {
        let e = &mut disk[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = 0x83; // Linux
        e[8..12].copy_from_slice(&((p.start / 512) as u32).to_le_bytes());
        e[12..16].copy_from_slice(&((p.len / 512) as u32).to_le_bytes());
        let sb = (p.start + 1024) as usize;
        let log = (p.block_size / 1024).trailing_zeros();
        disk[sb + 24..sb + 28].copy_from_slice(&log.to_le_bytes());
        disk[sb + 56..sb + 58].copy_from_slice(&0xef53u16.to_le_bytes());
    }
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
}

/// Generate `disk_blocks` blocks of pseudo-random bytes (every 512-aligned
/// window distinct, none zero).
pub fn disk_image(disk_blocks: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; disk_blocks as usize * PAGE_SIZE];
    Rng::new(seed ^ 0xd15c).fill(&mut data);
    data
}

/// A plan of `pages` pages drawn from `mix`, disk pages 4 KiB-aligned in a
/// disk of `disk_blocks` blocks.
pub fn plan(pages: usize, disk_blocks: u64, mix: Mix, seed: u64) -> Vec<Planted> {
    plan_in(
        pages,
        &[Region::aligned(disk_blocks * PAGE_SIZE_U64)],
        mix,
        seed,
    )
}

/// A plan of `pages` pages drawn from `mix`, each disk run placed in one of
/// `regions` (chosen at random).
pub fn plan_in(pages: usize, regions: &[Region], mix: Mix, seed: u64) -> Vec<Planted> {
    let mut rng = Rng::new(seed);
    let total = u64::from(mix.zero + mix.disk + mix.random + mix.repeat).max(1);
    let mut randoms: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(pages);
    while out.len() < pages {
        let run = (1 + rng.below(mix.max_run.max(1))).min((pages - out.len()) as u64);
        let r = rng.below(total) as u32;
        let disk_at = regions
            .get(rng.below(regions.len() as u64) as usize)
            .and_then(|reg| reg.pick(run, &mut rng));
        for k in 0..run {
            let p = if r < mix.zero {
                Planted::Zero
            } else if let Some(at) = disk_at.filter(|_| r < mix.zero + mix.disk) {
                Planted::Disk(at + k * PAGE_SIZE_U64)
            } else if r >= mix.zero + mix.disk + mix.random && !randoms.is_empty() {
                Planted::Repeat(randoms[rng.below(randoms.len() as u64) as usize])
            } else {
                Planted::Random
            };
            if p == Planted::Random {
                randoms.push(out.len());
            }
            out.push(p);
        }
    }
    out
}

/// Build the memory image a plan describes.
pub fn memory_image(plan: &[Planted], disk: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ 0x3e3);
    let mut mem = vec![0u8; plan.len() * PAGE_SIZE];
    for (i, p) in plan.iter().enumerate() {
        let (head, rest) = mem.split_at_mut(i * PAGE_SIZE);
        let page = &mut rest[..PAGE_SIZE];
        match *p {
            Planted::Zero => {}
            Planted::Disk(at) => page.copy_from_slice(&disk[at as usize..][..PAGE_SIZE]),
            Planted::Random => {
                rng.fill(page);
                // A random page must never be all zero by accident.
                page[0] |= 1;
            }
            Planted::Repeat(j) => page.copy_from_slice(&head[j * PAGE_SIZE..][..PAGE_SIZE]),
        }
    }
    mem
}

/// Expected (zero pages, disk pages, blob pages, distinct blobs) for a plan.
pub fn expected_counts(plan: &[Planted]) -> (u64, u64, u64, u64) {
    let mut c = (0, 0, 0, 0);
    for p in plan {
        match p {
            Planted::Zero => c.0 += 1,
            Planted::Disk(_) => c.1 += 1,
            Planted::Random => {
                c.2 += 1;
                c.3 += 1;
            }
            Planted::Repeat(_) => c.2 += 1,
        }
    }
    c
}

/// The I/O-tracking hints a VMM would give for a plan's disk pages (on disk 0).
pub fn hints(plan: &[Planted]) -> Vec<DiskHint> {
    plan.iter()
        .enumerate()
        .filter_map(|(i, p)| match *p {
            Planted::Disk(at) => Some(DiskHint {
                page: PageIndex(i as u64),
                disk: DiskIndex(0),
                offset: DiskOffset(at),
            }),
            _ => None,
        })
        .collect()
}

/// Paths of a fixture written to a directory.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// Raw guest memory dump.
    pub mem: PathBuf,
    /// Backing disk image.
    pub disk: PathBuf,
    /// The checkpoint.
    pub ckpt: PathBuf,
}

/// Write a disk image, a guest memory dump ([`Mix::RUNS`]) and its checkpoint
/// (made from I/O-tracking hints, with a small VMM state) into `dir`.
pub fn write_fixture(
    dir: &Path,
    guest_bytes: u64,
    disk_bytes: u64,
    seed: u64,
) -> io::Result<Fixture> {
    let fx = Fixture {
        mem: dir.join("vm.mem"),
        disk: dir.join("disk.img"),
        ckpt: dir.join("vm.ckpt"),
    };
    let disk = disk_image(disk_bytes / PAGE_SIZE_U64, seed);
    std::fs::write(&fx.disk, &disk)?;
    let plan = plan(
        (guest_bytes / PAGE_SIZE_U64) as usize,
        disk_bytes / PAGE_SIZE_U64,
        Mix::RUNS,
        seed,
    );
    let mem = memory_image(&plan, &disk, seed);
    drop(disk);
    std::fs::write(&fx.mem, &mem)?;
    let opts = CreateOptions {
        disks: vec![fx.disk.clone()],
        hints: hints(&plan),
        vmm_state: Some(b"vmm-state: fixture".to_vec()),
        ..CreateOptions::default()
    };
    crate::create(&mem, &opts, &fx.ckpt).map_err(io::Error::other)?;
    Ok(fx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_the_mix_and_is_repeatable() {
        let a = plan(10_000, 100, Mix::MIXED, 1);
        assert_eq!(a, plan(10_000, 100, Mix::MIXED, 1));
        let (zero, disk, blob, _) = expected_counts(&a);
        assert!((2500..3500).contains(&zero), "{zero}");
        assert!((3500..4500).contains(&disk), "{disk}");
        assert!((2500..3500).contains(&blob), "{blob}");
    }

    #[test]
    fn runs_are_consecutive_disk_bytes_at_the_region_alignment() {
        let reg = Region {
            start: 32256,
            end: 1 << 20,
            align: 1024,
        };
        let p = plan_in(4000, &[reg], Mix::RUNS, 3);
        let disk: Vec<u64> = p
            .iter()
            .filter_map(|x| match x {
                Planted::Disk(at) => Some(*at),
                _ => None,
            })
            .collect();
        assert!(disk.len() > 500);
        for at in &disk {
            assert_eq!((at - 32256) % 1024, 0);
            assert!(at + 4096 <= 1 << 20);
        }
        assert!(p.windows(2).any(|w| matches!(w,
            [Planted::Disk(a), Planted::Disk(b)] if *b == a + 4096)));
    }

    #[test]
    fn memory_image_matches_plan() {
        let disk = disk_image(8, 2);
        let p = vec![
            Planted::Zero,
            Planted::Disk(3 * 4096 + 512),
            Planted::Random,
            Planted::Repeat(2),
        ];
        let m = memory_image(&p, &disk, 3);
        assert!(m[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert_eq!(
            &m[PAGE_SIZE..2 * PAGE_SIZE],
            &disk[3 * 4096 + 512..][..4096]
        );
        assert_eq!(&m[2 * PAGE_SIZE..3 * PAGE_SIZE], &m[3 * PAGE_SIZE..]);
        assert!(m[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().any(|&b| b != 0));
        assert_eq!(hints(&p)[0].offset, DiskOffset(3 * 4096 + 512));
    }
}
