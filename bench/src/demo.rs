//! `bench demo`: the README's main job on a built-in default.
//!
//! Builds a small demo disk, runs the guest (mixed by default) in vmm-lite, checkpoints it,
//! verifies the checkpoint against the raw dump, mounts it, restores it lazily
//! (ckptfs) and eagerly (raw and space-optimized), checks every restored VM's
//! state against the checkpointed one, and prints a short table.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ckptfs::{Checkpoint, MemoryImage};

use crate::restore::{self, Measured, Method, Tools};

/// Run the demo with a `mib` MiB guest in `dir`.
pub fn run(dir: &Path, workload: &str, mib: u64, duration: f64, json: bool) -> Result<()> {
    let started = Instant::now();
    let tools = Tools::find()?;
    let vm = restore::prepare(&tools, dir, workload, mib, &[])?;
    let ck = Checkpoint::open(&vm.dir.join("vm.ckpt")).context("opening the demo checkpoint")?;
    let raw = MemoryImage::open(&vm.dir.join("mem.raw"))?;
    let report = ckptfs::verify::verify(&ck, Some(raw.bytes()), |_| {});
    ensure!(
        report.ok(),
        "the checkpoint does not rebuild the guest: {:?}",
        report.first_bad
    );
    let ins = ckptfs::verify::inspect(&ck);
    drop((ck, raw));
    eprintln!("demo: checkpoint verified; recording the loading set (another request seed)");
    let mut loadset = restore::record_loading_set(&tools, &vm, 2.0 * duration)?;
    (loadset.measured_touched, loadset.coverage) = restore::coverage(&tools, &vm, 1, duration)?;
    let methods = [
        Method::EagerRaw,
        Method::EagerOptimized,
        Method::LazyRaw,
        Method::CKPTFS,
        Method::CKPTFS_LS,
        Method::CKPTFS_LS_ZERO,
        Method::Warm,
    ];
    let group = crate::tier::Throttle::start(&vm.dir, None)?;
    let mut runs: Vec<Measured> = Vec::new();
    for method in methods {
        eprintln!("demo: restoring with {}", method.label());
        let trial = restore::Trial {
            method,
            rep: 0,
            seed: 1,
            duration_s: duration,
            tier: "local",
            group: &group,
        };
        runs.push(restore::restore(&tools, &vm, &trial)?);
    }
    restore::score(&mut runs);
    let all_ok = runs.iter().all(|m| m.check_ok);
    if json {
        let out = serde_json::json!({
            "checkpoint": ins,
            "loading_set": loadset,
            "restores": runs,
            "state_identical": all_ok
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&ins, &loadset, &runs, workload, mib);
    }
    eprintln!("demo: done in {:.0} s", started.elapsed().as_secs_f64());
    ensure!(
        all_ok,
        "a restored VM's state differs from the checkpointed one"
    );
    Ok(())
}

fn print_table(
    ins: &ckptfs::verify::Inspection,
    loadset: &restore::LoadingSetInfo,
    runs: &[Measured],
    workload: &str,
    mib: u64,
) {
    let pct = |n: u64| 100.0 * n as f64 / ins.pages.max(1) as f64;
    println!();
    println!("{workload} guest, {mib} MiB RAM, checkpointed by vmm-lite with I/O tracking:");
    println!(
        "  pages: {:.1}% zero, {:.1}% disk references, {:.1}% stored ({} distinct)",
        pct(ins.zero_pages),
        pct(ins.disk_pages),
        pct(ins.blob_pages),
        ins.blobs_stored
    );
    println!(
        "  checkpoint {:.1} MiB = {:.1}% of guest RAM ({:.1} MiB saved); verified page by page against the raw dump",
        ins.checkpoint_bytes as f64 / 1048576.0,
        100.0 * ins.size_ratio,
        (ins.guest_bytes.saturating_sub(ins.checkpoint_bytes)) as f64 / 1048576.0
    );
    println!(
        "  loading set: {} pages ({:.1} MiB stored) first touched by a recorded restore with another request seed;",
        loadset.pages,
        loadset.data_bytes as f64 / 1048576.0
    );
    println!(
        "  it holds {:.1} % of the {} pages the measured restores touch",
        100.0 * loadset.coverage,
        loadset.measured_touched
    );
    println!();
    println!(
        "{:<18} {:>9} {:>12} {:>16} {:>15} {:>13}",
        "restore method",
        "TTR ms",
        "work lag ms",
        "first reply ms",
        "all resident ms",
        "state check"
    );
    for m in runs {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
        println!(
            "{:<18} {:>9} {:>12} {:>16.0} {:>15} {:>13}",
            m.method,
            m.ttr_ms.map_or("never".to_string(), |x| format!("{x:.0}")),
            ms(m.lag_ms),
            m.first_response_ms,
            ms(m.resident_ms),
            if m.check_ok { "identical" } else { "MISMATCH" }
        );
    }
    println!();
    println!(
        "TTR: time until every 100 ms window completes >= 80% of the warm VM's requests per window;"
    );
    println!(
        "work lag: requests the warm VM completed in the run minus this one's, in ms of warm work."
    );
}
