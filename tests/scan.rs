//! The content scan finds page-cache pages wherever they sit at a 512-byte
//! offset: on real ext4 images with 1 KiB blocks, inside an MBR partition at
//! sector 63, and at phases only a sample of guest pages reveals. Every test
//! checks the checkpoint against the floor (distinct pages that are neither
//! zero nor anywhere on a disk, computed by brute force).

mod common;

use std::path::Path;

use ckptfs::scan::ScanOptions;
use ckptfs::synth::{self, Mix, Partition, Region};
use ckptfs::{Checkpoint, CreateOptions, PageIndex, Summary};
use common::*;

/// Phase detection even on these small disks (no full index).
const DETECT: ScanOptions = ScanOptions {
    full_index_max_bytes: 0,
    sample_pages: 4096,
    only_phases: None,
};

fn create(mem: &[u8], disk: &Path, scan: ScanOptions, out: &Path) -> Summary {
    let opts = CreateOptions {
        disks: vec![disk.to_owned()],
        scan_disks: true,
        scan,
        ..Default::default()
    };
    let s = ckptfs::create(mem, &opts, out).unwrap();
    let ck = Checkpoint::open(out).unwrap();
    let mut back = vec![0u8; mem.len()];
    ck.read_pages(PageIndex(0), &mut back).unwrap();
    assert!(back == mem, "checkpoint does not read back");
    s
}

fn phases(s: &Summary) -> String {
    s.index.as_ref().unwrap().disks[0].phases.to_string()
}

/// Within 1 % of the floor (and never below it).
fn assert_at_floor(s: &Summary, floor: u64) {
    assert!(
        s.blobs_stored >= floor,
        "{} blobs < floor {floor}",
        s.blobs_stored
    );
    assert!(
        s.blobs_stored <= floor + floor / 100,
        "{} blobs, floor {floor}",
        s.blobs_stored
    );
}

/// Guest memory: the page cache of `files`, shuffled among zero and
/// anonymous pages.
fn guest_of(files: &[Vec<u8>], seed: u64) -> Vec<u8> {
    let mut pages = page_cache_of(files);
    let mut rng = synth::Rng::new(seed);
    for i in 0..pages.len() / 2 {
        let mut p = vec![0u8; 4096];
        if i % 2 == 0 {
            rng.fill(&mut p);
        }
        pages.push(p);
    }
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.below(i as u64 + 1) as usize);
    }
    pages.concat()
}

#[test]
fn ext4_with_1k_blocks_is_found_at_four_phases_from_its_superblock() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(&dir.path().join("files"), 60, 1);
    let img = dir.path().join("ext4-1k.img");
    mkfs_ext4(&img, 24 << 20, 1024, &dir.path().join("files"));
    let mem = guest_of(&files, 2);
    let disk = std::fs::read(&img).unwrap();
    let floor = floor_pages(&mem, &[&disk]);
    let s = create(&mem, &img, DETECT, &dir.path().join("a.ckpt"));
    assert_eq!(phases(&s), "0,1024,2048,3072");
    assert!(s.index.as_ref().unwrap().disks[0].sampled.is_empty());
    assert_at_floor(&s, floor);
    // Most file pages really sit off 4 KiB alignment: an aligned-only scan
    // (format v1's) would have stored them.
    let aligned_floor = floor_pages_at(&mem, &[&disk], 4096);
    let file_pages = page_cache_of(&files).len() as u64;
    eprintln!(
        "ext4 1k: {file_pages} file pages, floor {floor}, aligned-only floor {aligned_floor}, blobs {}",
        s.blobs_stored
    );
    assert!(
        aligned_floor > floor + file_pages / 2,
        "{aligned_floor} vs {floor}"
    );
}

#[test]
fn an_mbr_partition_at_sector_63_is_found_from_the_partition_table() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(&dir.path().join("files"), 40, 3);
    let fs = dir.path().join("fs.img");
    mkfs_ext4(&fs, 16 << 20, 4096, &dir.path().join("files"));
    let fs = std::fs::read(&fs).unwrap();
    let mut disk = vec![0u8; 32256];
    disk.extend_from_slice(&fs);
    disk.resize(disk.len().next_multiple_of(4096), 0);
    synth::partition(
        &mut disk,
        &[Partition {
            start: 32256,
            len: fs.len() as u64,
            block_size: 4096,
        }],
    );
    // The partition table must not change the file system's bytes.
    assert_eq!(&disk[32256..32256 + fs.len()], &fs[..]);
    let img = dir.path().join("mbr63.img");
    std::fs::write(&img, &disk).unwrap();
    let mem = guest_of(&files, 4);
    let floor = floor_pages(&mem, &[&disk]);
    let s = create(&mem, &img, DETECT, &dir.path().join("b.ckpt"));
    assert_eq!(phases(&s), "0,3584");
    assert_at_floor(&s, floor);
    let aligned_floor = floor_pages_at(&mem, &[&disk], 4096);
    let file_pages = page_cache_of(&files).len() as u64;
    eprintln!(
        "mbr63: {file_pages} file pages, floor {floor}, aligned-only floor {aligned_floor}, blobs {}",
        s.blobs_stored
    );
    assert!(
        aligned_floor > floor + file_pages * 9 / 10,
        "{aligned_floor} vs {floor}"
    );
}

#[test]
fn a_phase_no_structure_names_is_found_by_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let disk = synth::disk_image(4096, 5);
    let img = dir.path().join("plain.img");
    std::fs::write(&img, &disk).unwrap();
    // Page cache at 1536 past 4 KiB boundaries only (say, an unknown file system).
    let region = Region {
        start: 1536,
        end: disk.len() as u64,
        align: 4096,
    };
    let plan = synth::plan_in(4096, &[region], Mix::RUNS, 6);
    let mem = synth::memory_image(&plan, &disk, 6);
    let floor = floor_pages(&mem, &[&disk]);
    let s = create(&mem, &img, DETECT, &dir.path().join("c.ckpt"));
    let scan = &s.index.as_ref().unwrap().disks[0];
    assert_eq!(scan.structural.to_string(), "0");
    assert_eq!(scan.sampled.to_string(), "1536");
    assert!(scan.reread_bytes > 0);
    assert_eq!(s.disk_pages, synth::expected_counts(&plan).1);
    assert_at_floor(&s, floor);
}

#[test]
fn a_small_disk_gets_every_phase_and_the_detected_index_is_smaller() {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = synth::disk_image(8192, 7);
    let parts = [
        Partition {
            start: 32256,
            len: 12 << 20,
            block_size: 4096,
        },
        Partition {
            start: 16 << 20,
            len: 16 << 20,
            block_size: 1024,
        },
    ];
    synth::partition(&mut disk, &parts);
    let img = dir.path().join("two.img");
    std::fs::write(&img, &disk).unwrap();
    let regions = [parts[0].region(), parts[1].region()];
    let plan = synth::plan_in(8192, &regions, Mix::RUNS, 8);
    let mem = synth::memory_image(&plan, &disk, 8);
    let floor = floor_pages(&mem, &[&disk]);
    let full = create(
        &mem,
        &img,
        ScanOptions::default(),
        &dir.path().join("f.ckpt"),
    );
    assert_eq!(phases(&full), "0,512,1024,1536,2048,2560,3072,3584");
    assert_at_floor(&full, floor);
    let detected = create(&mem, &img, DETECT, &dir.path().join("d.ckpt"));
    assert_eq!(phases(&detected), "0,1024,2048,3072,3584");
    assert_at_floor(&detected, floor);
    assert_eq!(detected.disk_pages, full.disk_pages);
    let (f, d) = (full.index.unwrap(), detected.index.unwrap());
    assert!(
        d.windows * 8 <= f.windows * 5 + 8,
        "{} vs {}",
        d.windows,
        f.windows
    );
}

#[test]
fn hints_at_sector_offsets_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = synth::disk_image(256, 9);
    let img = dir.path().join("d.img");
    std::fs::write(&img, &disk).unwrap();
    let region = Region {
        start: 512,
        end: disk.len() as u64,
        align: 512,
    };
    let plan = synth::plan_in(512, &[region], Mix::RUNS, 10);
    let mem = synth::memory_image(&plan, &disk, 10);
    let mut hints = synth::hints(&plan);
    let good = hints.len() as u64;
    // A hint that is not sector aligned is refused (the page falls back).
    if let Some(h) = hints.first_mut() {
        h.offset.0 += 1;
    }
    let opts = CreateOptions {
        disks: vec![img],
        hints,
        ..Default::default()
    };
    let s = ckptfs::create(&mem, &opts, &dir.path().join("h.ckpt")).unwrap();
    assert_eq!((s.hints_verified, s.hints_rejected), (good - 1, 1));
    assert_eq!(s.disk_pages, good - 1);
}
