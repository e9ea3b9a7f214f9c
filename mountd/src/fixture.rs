//! Deterministic guest memory + disk images for tests and benchmarks.
//!
//! A generated guest looks like a booted VM after some work: runs of zero pages,
//! runs of page-cache pages copied from the disk image (so they become DISK
//! references), and unique "anonymous" pages (BLOBs).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ckptfs::{CreateOptions, DiskHint, DiskIndex, DiskOffset, PAGE_SIZE, PageIndex};

/// Fractions of the guest, in percent.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    /// Zero pages.
    pub zero_pct: u32,
    /// Pages copied from the disk image.
    pub disk_pct: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            zero_pct: 40,
            disk_pct: 35,
        }
    }
}

/// SplitMix64: a tiny deterministic generator, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
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

    /// A value in `0..n`.
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

/// A generated guest: its memory and the hints that describe its disk pages.
#[derive(Debug)]
pub struct Guest {
    /// Raw guest memory.
    pub mem: Vec<u8>,
    /// Page -> disk block hints, one per disk page.
    pub hints: Vec<DiskHint>,
}

/// Generate `guest_bytes` of memory over `disk` (a disk image's content).
pub fn generate(guest_bytes: u64, disk: &[u8], mix: Mix, seed: u64) -> Guest {
    let pages = guest_bytes / PAGE_SIZE as u64;
    let disk_blocks = (disk.len() / PAGE_SIZE) as u64;
    let mut mem = vec![0u8; guest_bytes as usize];
    let mut hints = Vec::new();
    let mut rng = Rng::new(seed);
    let mut page = 0u64;
    while page < pages {
        let run = (1 + rng.below(64)).min(pages - page);
        let kind = rng.below(100) as u32;
        let start = (page * PAGE_SIZE as u64) as usize;
        let bytes = &mut mem[start..start + run as usize * PAGE_SIZE];
        if kind < mix.zero_pct {
            // Already zero.
        } else if kind < mix.zero_pct + mix.disk_pct && disk_blocks >= run {
            let block = rng.below(disk_blocks - run + 1);
            let off = (block * PAGE_SIZE as u64) as usize;
            bytes.copy_from_slice(&disk[off..off + bytes.len()]);
            for i in 0..run {
                hints.push(DiskHint {
                    page: PageIndex(page + i),
                    disk: DiskIndex(0),
                    offset: DiskOffset((block + i) * PAGE_SIZE as u64),
                });
            }
        } else {
            rng.fill(bytes);
            // Keep a recognisable non-zero first byte so no blob page is all zero.
            for p in bytes.chunks_mut(PAGE_SIZE) {
                p[0] |= 1;
            }
        }
        page += run;
    }
    Guest { mem, hints }
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

/// Write a disk image, a guest memory dump and its checkpoint into `dir`.
pub fn write(dir: &Path, guest_bytes: u64, disk_bytes: u64, seed: u64) -> io::Result<Fixture> {
    let fx = Fixture {
        mem: dir.join("vm.mem"),
        disk: dir.join("disk.img"),
        ckpt: dir.join("vm.ckpt"),
    };
    let mut disk = vec![0u8; disk_bytes as usize];
    Rng::new(seed ^ 0xd15c).fill(&mut disk);
    fs::write(&fx.disk, &disk)?;
    let guest = generate(guest_bytes, &disk, Mix::default(), seed);
    drop(disk);
    fs::write(&fx.mem, &guest.mem)?;
    let opts = CreateOptions {
        disks: vec![fx.disk.clone()],
        hints: guest.hints,
        scan_disks: false,
        vmm_state: Some(b"vmm-state: fixture".to_vec()),
        progress: false,
    };
    ckptfs::create(&guest.mem, &opts, &fx.ckpt).map_err(io::Error::other)?;
    Ok(fx)
}
