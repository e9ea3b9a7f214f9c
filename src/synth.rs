//! Synthetic guest images with known page kinds, for demos, tests and benchmarks.
//!
//! A [`Plan`] says, page by page, what a generated memory image holds: zeros, a
//! copy of some disk block (page cache), distinct computed data, or a repeat of
//! an earlier page. Everything is derived from a seed, so runs are repeatable.

use crate::types::PAGE_SIZE;

/// What one generated page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// All zeros.
    Zero,
    /// A copy of this disk block.
    Disk(u64),
    /// Distinct pseudo-random content.
    Random,
    /// The same bytes as an earlier `Random` page (a deduplication target).
    Repeat(usize),
}

/// A small deterministic PRNG (xorshift64*), enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (any seed, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
}

/// Fractions of each page kind in a generated plan (they need not sum to 1:
/// they are weights).
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
}

impl Mix {
    /// A desktop-like mix: 30 % zero, 40 % page cache, 20 % computed, 10 % repeats.
    pub const MIXED: Mix = Mix {
        zero: 3,
        disk: 4,
        random: 2,
        repeat: 1,
    };
}

/// Generate `disk_blocks` distinct pseudo-random 4 KiB blocks.
pub fn disk_image(disk_blocks: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; disk_blocks as usize * PAGE_SIZE];
    Rng::new(seed ^ 0xd15c).fill(&mut data);
    data
}

/// A plan of `pages` pages drawn from `mix`, disk pages pointing into a disk
/// of `disk_blocks` blocks.
pub fn plan(pages: usize, disk_blocks: u64, mix: Mix, seed: u64) -> Vec<Planted> {
    let mut rng = Rng::new(seed);
    let total = u64::from(mix.zero + mix.disk + mix.random + mix.repeat).max(1);
    let mut randoms: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(pages);
    for i in 0..pages {
        let r = (rng.next_u64() % total) as u32;
        let p = if r < mix.zero {
            Planted::Zero
        } else if r < mix.zero + mix.disk && disk_blocks > 0 {
            Planted::Disk(rng.next_u64() % disk_blocks)
        } else if r >= mix.zero + mix.disk + mix.random && !randoms.is_empty() {
            Planted::Repeat(randoms[(rng.next_u64() % randoms.len() as u64) as usize])
        } else {
            Planted::Random
        };
        if p == Planted::Random {
            randoms.push(i);
        }
        out.push(p);
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
            Planted::Disk(b) => page.copy_from_slice(&disk[b as usize * PAGE_SIZE..][..PAGE_SIZE]),
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
    fn memory_image_matches_plan() {
        let disk = disk_image(8, 2);
        let p = vec![
            Planted::Zero,
            Planted::Disk(3),
            Planted::Random,
            Planted::Repeat(2),
        ];
        let m = memory_image(&p, &disk, 3);
        assert!(m[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert_eq!(
            &m[PAGE_SIZE..2 * PAGE_SIZE],
            &disk[3 * PAGE_SIZE..4 * PAGE_SIZE]
        );
        assert_eq!(&m[2 * PAGE_SIZE..3 * PAGE_SIZE], &m[3 * PAGE_SIZE..]);
        assert!(m[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().any(|&b| b != 0));
    }
}
