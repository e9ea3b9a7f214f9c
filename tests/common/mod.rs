//! Fixtures shared by the integration tests, built on `ckptfs::synth`.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use ckptfs::synth::{self, Mix};
pub use ckptfs::synth::{Planted, expected_counts};

/// Write a disk image of `blocks` distinct random blocks and return its bytes.
pub fn make_disk(path: &Path, blocks: u64, seed: u64) -> Vec<u8> {
    let data = synth::disk_image(blocks, seed);
    std::fs::write(path, &data).unwrap();
    data
}

/// Build a memory image from a plan.
pub fn make_mem(plan: &[Planted], disk: &[u8], seed: u64) -> Vec<u8> {
    synth::memory_image(plan, disk, seed)
}

/// A generated memory image, its disk, and where its checkpoint goes.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub mem_path: PathBuf,
    pub ckpt: PathBuf,
    pub mem: Vec<u8>,
    pub plan: Vec<Planted>,
}

/// `pages` pages of the mixed kind over a disk of `disk_blocks` blocks.
pub fn fixture(pages: usize, disk_blocks: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let disk_data = make_disk(&disk, disk_blocks, seed);
    let plan = synth::plan(pages, disk_blocks, Mix::MIXED, seed);
    let mem = make_mem(&plan, &disk_data, seed);
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

/// Run a tool the tests need, failing with how to install it when it is missing.
pub fn run_tool(cmd: &mut std::process::Command, package: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "{:?}: {e}: install {package} (scripts/setup.sh does)",
            cmd.get_program()
        )
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Files of random bytes (sizes from 1 KiB to 160 KiB, some whole pages)
/// written into `dir`; returns their contents.
pub fn write_files(dir: &Path, count: usize, seed: u64) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = synth::Rng::new(seed);
    (0..count)
        .map(|i| {
            let len = match i % 3 {
                0 => (1 + rng.below(40)) as usize * 4096,
                _ => 1024 + rng.below(160 * 1024) as usize,
            };
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
            data
        })
        .collect()
}

/// An ext4 image of `size` bytes with `block_size` blocks holding the files of `dir`.
pub fn mkfs_ext4(image: &Path, size: u64, block_size: u64, dir: &Path) {
    std::fs::File::create(image).unwrap().set_len(size).unwrap();
    let mut cmd = std::process::Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-b", &block_size.to_string(), "-d"])
        .arg(dir)
        .arg(image);
    run_tool(&mut cmd, "e2fsprogs");
}

/// What a guest that read `files` holds in its page cache: each file's pages,
/// the last one zero-padded, as Linux keeps them.
pub fn page_cache_of(files: &[Vec<u8>]) -> Vec<Vec<u8>> {
    files
        .iter()
        .flat_map(|f| f.chunks(4096))
        .map(|c| {
            let mut p = c.to_vec();
            p.resize(4096, 0);
            p
        })
        .collect()
}

/// The floor of a checkpoint of `mem` over `disks`: distinct pages that are
/// neither zero nor anywhere on a disk at a 512-byte-aligned offset (computed
/// by brute force, independently of ckptfs's index).
pub fn floor_pages(mem: &[u8], disks: &[&[u8]]) -> u64 {
    floor_pages_at(mem, disks, 512)
}

/// [`floor_pages`] when only windows at multiples of `step` count as on disk.
pub fn floor_pages_at(mem: &[u8], disks: &[&[u8]], step: usize) -> u64 {
    use std::collections::HashSet;
    use xxhash_rust::xxh3::xxh3_128;
    let mut on_disk = HashSet::new();
    for d in disks {
        for at in (0..d.len().saturating_sub(4095)).step_by(step) {
            on_disk.insert(xxh3_128(&d[at..at + 4096]));
        }
    }
    let mut unique = HashSet::new();
    for p in mem.chunks_exact(4096) {
        let h = xxh3_128(p);
        if p.iter().any(|&b| b != 0) && !on_disk.contains(&h) {
            unique.insert(h);
        }
    }
    unique.len() as u64
}
