//! `bench create`: checkpoint creation throughput on generated images.
//!
//! Baseline, measured in the same run: one pass over the memory image computing
//! a CRC32 per page, the least work any checkpointer that keeps per-page CRCs
//! must do. Reported: create throughput (GiB/s of guest RAM, disk indexing
//! excluded and included) and its ratio to the baseline.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use ckptfs::synth::{self, Mix};
use ckptfs::{CreateOptions, MemoryImage};

/// One measured configuration.
#[derive(Debug, serde::Serialize)]
pub struct CreateResult {
    /// "scan" or "hints".
    pub mode: &'static str,
    /// Guest RAM in MiB.
    pub guest_mib: u64,
    /// Disk image in MiB.
    pub disk_mib: u64,
    /// Seconds indexing the disk.
    pub index_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
    /// GiB/s of guest RAM, indexing excluded.
    pub classify_gib_s: f64,
    /// Baseline GiB/s (CRC32 pass over the image).
    pub baseline_gib_s: f64,
    /// classify throughput / baseline throughput.
    pub ratio_to_baseline: f64,
    /// checkpoint / guest RAM.
    pub size_ratio: f64,
}

fn gib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / secs.max(1e-9)
}

fn baseline(mem: &[u8]) -> f64 {
    let t = Instant::now();
    let mut acc = 0u32;
    for page in mem.chunks_exact(ckptfs::PAGE_SIZE) {
        acc ^= crc32fast::hash(page);
    }
    std::hint::black_box(acc);
    t.elapsed().as_secs_f64()
}

/// Generate a `guest_mib` guest over a `disk_mib` disk in `dir` and measure both create paths.
pub fn run(dir: &Path, guest_mib: u64, disk_mib: u64) -> Result<Vec<CreateResult>> {
    let disk_blocks = disk_mib * 256;
    let pages = (guest_mib * 256) as usize;
    eprintln!(
        "bench create: generating {guest_mib} MiB guest over a {disk_mib} MiB disk in {}",
        dir.display()
    );
    let disk_data = synth::disk_image(disk_blocks, 1);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, &disk_data)?;
    let plan = synth::plan(pages, disk_blocks, Mix::MIXED, 1);
    let mem_path = dir.join("mem.raw");
    std::fs::write(&mem_path, synth::memory_image(&plan, &disk_data, 1))?;
    drop(disk_data);
    let hints = synth::hints(&plan);
    let image = MemoryImage::open(&mem_path)?;
    let mem = image.bytes();
    let base = baseline(mem);
    let base_gib_s = gib_s(mem.len() as u64, base);
    let mut results = Vec::new();
    for (mode, scan, hints) in [("scan", true, Vec::new()), ("hints", false, hints)] {
        let opts = CreateOptions {
            disks: vec![disk.clone()],
            hints,
            scan_disks: scan,
            ..Default::default()
        };
        let s = ckptfs::create(mem, &opts, &dir.join("bench.ckpt"))?;
        let classify = gib_s(s.guest_bytes, s.seconds - s.index_seconds);
        results.push(CreateResult {
            mode,
            guest_mib,
            disk_mib,
            index_seconds: s.index_seconds,
            seconds: s.seconds,
            classify_gib_s: classify,
            baseline_gib_s: base_gib_s,
            ratio_to_baseline: classify / base_gib_s,
            size_ratio: s.size_ratio,
        });
    }
    Ok(results)
}
