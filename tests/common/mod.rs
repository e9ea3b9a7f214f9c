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
