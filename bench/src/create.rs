//! `bench create`: checkpoint creation throughput and size on generated images.
//!
//! Two workloads over the same kind of guest (`synth`'s mixed kind, in runs):
//! - `aligned`: page-cache pages at 4 KiB-aligned disk offsets;
//! - `misaligned`: the disk has an MBR with a 4 KiB-block partition at sector
//!   63 and a 1 KiB-block partition, and page-cache pages sit where those file
//!   systems put data (offsets 3584, and 0/1024/2048/3072, mod 4096).
//!
//! Modes: `scan` (the default index: every phase on disks up to 2 GiB),
//! `scan-detected` (phase detection forced: only the phases the partition
//! table, the file systems and a sample of pages show), `scan-aligned` (only
//! 4 KiB-aligned windows, what format v1 could reference) and `hints` (I/O
//! tracking, no scan). Baseline, measured in the same run: one pass over the
//! memory image computing a CRC32 per page, the least work any checkpointer
//! that keeps per-page CRCs must do. The floor is the number of distinct pages
//! that are neither zero nor on the disk (the plan's distinct computed pages).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use ckptfs::scan::{PhaseSet, ScanOptions};
use ckptfs::synth::{self, Mix, Partition, Planted, Region};
use ckptfs::{CreateOptions, MemoryImage};

/// One measured configuration.
#[derive(Debug, serde::Serialize)]
pub struct CreateResult {
    /// "aligned" or "misaligned".
    pub workload: &'static str,
    /// "scan", "scan-detected", "scan-aligned", "hints", "qcow2-scan" or "qcow2-hints".
    pub mode: &'static str,
    /// Guest RAM in MiB.
    pub guest_mib: u64,
    /// Disk image in MiB.
    pub disk_mib: u64,
    /// Phases indexed (byte offsets mod 4096).
    pub phases: String,
    /// Seconds indexing the disk.
    pub index_seconds: f64,
    /// Index memory in MiB per GiB of disk.
    pub index_mib_per_disk_gib: f64,
    /// Index build seconds per GiB of disk.
    pub index_seconds_per_disk_gib: f64,
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
    /// Blobs stored.
    pub blobs: u64,
    /// Distinct pages neither zero nor on the disk.
    pub floor_blobs: u64,
    /// (blobs - floor) / floor, in percent.
    pub over_floor_pct: f64,
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

/// The generated images of one workload.
struct Workload {
    name: &'static str,
    plan: Vec<Planted>,
}

/// Generate the disk (written to `disk`) and the plan of a workload.
fn generate(name: &'static str, disk: &Path, pages: usize, disk_mib: u64) -> Result<Workload> {
    let disk_bytes = disk_mib << 20;
    let mut data = synth::disk_image(disk_bytes / 4096, 1);
    let mix = Mix {
        max_run: 16,
        ..Mix::MIXED
    };
    let regions = if name == "aligned" {
        vec![Region::aligned(disk_bytes)]
    } else {
        let half = disk_bytes / 2;
        let parts = [
            Partition {
                start: 32256,
                len: half - 32256,
                block_size: 4096,
            },
            Partition {
                start: half,
                len: half,
                block_size: 1024,
            },
        ];
        synth::partition(&mut data, &parts);
        parts.iter().map(Partition::region).collect()
    };
    std::fs::write(disk, &data)?;
    let plan = synth::plan_in(pages, &regions, mix, 1);
    Ok(Workload { name, plan })
}

/// Generate a `guest_mib` guest over a `disk_mib` disk in `dir` for each
/// workload and measure every create mode.
pub fn run(dir: &Path, guest_mib: u64, disk_mib: u64) -> Result<Vec<CreateResult>> {
    let pages = (guest_mib * 256) as usize;
    let disk = dir.join("disk.img");
    let mut results = Vec::new();
    for name in ["aligned", "misaligned"] {
        eprintln!(
            "bench create: {name}: generating {guest_mib} MiB guest over a {disk_mib} MiB disk in {}",
            dir.display()
        );
        let w = generate(name, &disk, pages, disk_mib)?;
        let mem_path = dir.join("mem.raw");
        let disk_data = std::fs::read(&disk)?;
        std::fs::write(&mem_path, synth::memory_image(&w.plan, &disk_data, 1))?;
        drop(disk_data);
        let image = MemoryImage::open(&mem_path)?;
        // Best of two passes: the first one may still compete with the
        // writeback of the image just generated.
        let secs = baseline(image.bytes()).min(baseline(image.bytes()));
        let base = gib_s(image.bytes().len() as u64, secs);
        for mode in ["scan", "scan-detected", "scan-aligned", "hints"] {
            let r = measure(&w, mode, &image, &disk, dir, base, disk_mib)?;
            eprintln!("{}", serde_json::to_string(&r)?);
            results.push(r);
        }
        if name == "misaligned" {
            let qcow2 = dir.join("disk.qcow2");
            qemu_img_convert(&disk, &qcow2)?;
            for mode in ["qcow2-scan", "qcow2-hints"] {
                let r = measure(&w, mode, &image, &qcow2, dir, base, disk_mib)?;
                eprintln!("{}", serde_json::to_string(&r)?);
                results.push(r);
            }
        }
    }
    Ok(results)
}

fn qemu_img_convert(raw: &Path, qcow2: &Path) -> Result<()> {
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .status()
        .map_err(|e| anyhow::anyhow!("qemu-img: {e} (install qemu-utils: scripts/setup.sh)"))?;
    anyhow::ensure!(st.success(), "qemu-img convert failed");
    Ok(())
}

fn measure(
    w: &Workload,
    mode: &'static str,
    image: &MemoryImage,
    disk: &Path,
    dir: &Path,
    base_gib_s: f64,
    disk_mib: u64,
) -> Result<CreateResult> {
    let scan = match mode {
        "scan-detected" => ScanOptions {
            full_index_max_bytes: 0,
            ..ScanOptions::default()
        },
        "scan-aligned" => ScanOptions {
            only_phases: Some(PhaseSet::ALIGNED),
            ..ScanOptions::default()
        },
        _ => ScanOptions::default(),
    };
    let opts = CreateOptions {
        disks: vec![disk.to_owned()],
        hints: if mode.ends_with("hints") {
            synth::hints(&w.plan)
        } else {
            Vec::new()
        },
        scan_disks: !mode.ends_with("hints"),
        scan,
        ..Default::default()
    };
    let s = ckptfs::create(image.bytes(), &opts, &dir.join("bench.ckpt"))?;
    let classify = gib_s(s.guest_bytes, s.seconds - s.index_seconds);
    let floor = synth::expected_counts(&w.plan).3;
    let disk_gib = disk_mib as f64 / 1024.0;
    let ix = s.index.as_ref();
    Ok(CreateResult {
        workload: w.name,
        mode,
        guest_mib: s.guest_bytes >> 20,
        disk_mib,
        phases: ix.map_or("-".into(), |i| i.disks[0].phases.to_string()),
        index_seconds: s.index_seconds,
        index_mib_per_disk_gib: ix.map_or(0.0, |i| i.memory_bytes as f64 / 1048576.0) / disk_gib,
        index_seconds_per_disk_gib: s.index_seconds / disk_gib,
        seconds: s.seconds,
        classify_gib_s: classify,
        baseline_gib_s: base_gib_s,
        ratio_to_baseline: classify / base_gib_s,
        size_ratio: s.size_ratio,
        blobs: s.blobs_stored,
        floor_blobs: floor,
        over_floor_pct: 100.0 * (s.blobs_stored as f64 - floor as f64) / floor.max(1) as f64,
    })
}
