//! Generated memory and disk images with known page kinds, shared by the tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const PAGE: usize = 4096;

/// What a generated memory image holds, page by page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    Zero,
    /// Copy of this disk block.
    Disk(u64),
    /// Distinct random content.
    Random,
    /// Same bytes as an earlier Random page (dedup target).
    Repeat(usize),
}

/// A small deterministic PRNG (xorshift64*), enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
}

/// Write a disk image of `blocks` distinct random blocks.
pub fn make_disk(path: &Path, blocks: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; blocks as usize * PAGE];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Build a memory image from a plan.
pub fn make_mem(plan: &[Planted], disk: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut mem = vec![0u8; plan.len() * PAGE];
    for (i, p) in plan.iter().enumerate() {
        let (head, page) = mem.split_at_mut(i * PAGE);
        let page = &mut page[..PAGE];
        match *p {
            Planted::Zero => {}
            Planted::Disk(b) => page.copy_from_slice(&disk[b as usize * PAGE..][..PAGE]),
            Planted::Random => {
                rng.fill(page);
                // Make sure no random page is accidentally all zero.
                page[0] |= 1;
            }
            Planted::Repeat(j) => page.copy_from_slice(&head[j * PAGE..][..PAGE]),
        }
    }
    mem
}

/// A standard mixed fixture: `pages` pages, a disk of `disk_blocks` blocks.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub mem_path: PathBuf,
    pub ckpt: PathBuf,
    pub mem: Vec<u8>,
    pub plan: Vec<Planted>,
}

pub fn mixed_plan(pages: usize, disk_blocks: u64, seed: u64) -> Vec<Planted> {
    let mut rng = Rng(seed | 1);
    let mut plan = Vec::with_capacity(pages);
    let mut randoms = Vec::new();
    for i in 0..pages {
        let p = match rng.next() % 10 {
            0..=2 => Planted::Zero,
            3..=6 => Planted::Disk(rng.next() % disk_blocks),
            7 | 8 => Planted::Random,
            _ if !randoms.is_empty() => {
                Planted::Repeat(randoms[(rng.next() % randoms.len() as u64) as usize])
            }
            _ => Planted::Random,
        };
        if p == Planted::Random {
            randoms.push(i);
        }
        plan.push(p);
    }
    plan
}

pub fn fixture(pages: usize, disk_blocks: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let disk_data = make_disk(&disk, disk_blocks, seed ^ 0xd15c);
    let plan = mixed_plan(pages, disk_blocks, seed);
    let mem = make_mem(&plan, &disk_data, seed ^ 0x3e3);
    let mem_path = dir.path().join("mem.raw");
    std::fs::write(&mem_path, &mem).unwrap();
    let ckpt = dir.path().join("vm.ckpt");
    Fixture {
        dir,
        disk,
        mem_path,
        ckpt,
        mem,
        plan,
    }
}

/// Expected (zero, disk, blob pages, distinct blobs) for a plan.
pub fn expected_counts(plan: &[Planted]) -> (u64, u64, u64, u64) {
    let mut c = (0, 0, 0, 0);
    for p in plan {
        match p {
            Planted::Zero => c.0 += 1,
            Planted::Disk(_) => c.1 += 1,
            Planted::Random => {
                c.2 += 1;
                c.3 += 1
            }
            Planted::Repeat(_) => c.2 += 1,
        }
    }
    c
}
