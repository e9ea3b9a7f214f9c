//! `bench demo`: the README's main job on a built-in default.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ckptfs::synth::{self, Mix};
use ckptfs::{Checkpoint, CreateOptions, MemoryImage};

/// Generate a synthetic guest, checkpoint it, and verify the checkpoint rebuilds it.
pub fn run(dir: &Path, guest_mib: u64) -> Result<()> {
    let disk_blocks = guest_mib * 128;
    eprintln!(
        "demo: generating a {guest_mib} MiB guest and a {} MiB disk in {}",
        disk_blocks / 256,
        dir.display()
    );
    let disk_data = synth::disk_image(disk_blocks, 42);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, &disk_data)?;
    let plan = synth::plan((guest_mib * 256) as usize, disk_blocks, Mix::MIXED, 42);
    let mem_path = dir.join("mem.raw");
    std::fs::write(&mem_path, synth::memory_image(&plan, &disk_data, 42))?;
    let image = MemoryImage::open(&mem_path)?;
    let ckpt = dir.join("vm.ckpt");
    let opts = CreateOptions {
        disks: vec![disk],
        scan_disks: true,
        progress: true,
        ..Default::default()
    };
    let s = ckptfs::create(image.bytes(), &opts, &ckpt)?;
    let ck = Checkpoint::open(&ckpt).context("reopening the demo checkpoint")?;
    let t = Instant::now();
    let report = ckptfs::verify::verify(&ck, Some(image.bytes()), |_| {});
    ensure!(
        report.ok(),
        "demo checkpoint does not rebuild the guest: {:?}",
        report.first_bad
    );
    println!("{}", serde_json::to_string_pretty(&s)?);
    println!(
        "demo: {guest_mib} MiB guest -> {:.1} MiB checkpoint ({:.1}% of RAM); created in {:.2}s, verified in {:.2}s",
        s.checkpoint_bytes as f64 / 1048576.0,
        100.0 * s.size_ratio,
        s.seconds,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
