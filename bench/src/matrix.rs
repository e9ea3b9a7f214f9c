//! The restore matrix: every workload x size x repetition x method.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::report;
use crate::restore::{self, Measured, Method, Tools};

/// What to run.
pub struct Matrix {
    /// Workload names.
    pub workloads: Vec<String>,
    /// Guest sizes, MiB.
    pub sizes: Vec<u64>,
    /// Repetitions per cell.
    pub reps: usize,
    /// Seconds each restore serves requests.
    pub duration: f64,
}

/// Run the matrix in `dir`, writing tables, plots and raw results to `out`.
pub fn run(m: &Matrix, dir: &Path, out: &Path) -> Result<()> {
    let tools = Tools::find()?;
    std::fs::create_dir_all(out)?;
    let methods = Method::all();
    let labels: Vec<String> = methods.iter().map(|m| m.label()).collect();
    let cells = m.workloads.len() * m.sizes.len();
    let per_run = m.duration + 1.5;
    eprintln!(
        "bench restore: {cells} cells x {} methods x {} reps; expect about {:.0} minutes",
        methods.len(),
        m.reps,
        (cells * methods.len() * m.reps) as f64 * per_run / 60.0 + cells as f64 * 0.3
    );
    let started = Instant::now();
    let mut md = String::from("## Restore: time-to-responsiveness\n\n");
    let mut all = Vec::new();
    for &mib in &m.sizes {
        for workload in &m.workloads {
            let vm = restore::prepare(&tools, dir, workload, mib)?;
            restore::record_loading_set(&tools, &vm, m.duration)?;
            let mut runs: Vec<Measured> = Vec::new();
            for rep in 0..m.reps {
                for &method in &methods {
                    eprintln!("bench: {workload} {mib} MiB rep {rep}: {}", method.label());
                    runs.push(restore::restore(&tools, &vm, method, rep, m.duration)?);
                }
            }
            restore::score(&mut runs);
            let refs: Vec<&Measured> = runs.iter().collect();
            let table = report::table(&vm, &refs, &labels);
            eprintln!("{table}");
            md.push_str(&table);
            let png = out.join(format!("restore-{workload}-{mib}.png"));
            report::plot(&png, &vm, &refs, &labels)?;
            md.push_str(&format!(
                "![{workload} {mib} MiB]({})\n\n",
                png.file_name().unwrap().to_string_lossy()
            ));
            std::fs::remove_dir_all(&vm.dir).ok();
            all.extend(runs);
        }
    }
    let json: Vec<String> = all
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    std::fs::write(out.join("restore.jsonl"), json.join("\n") + "\n")?;
    std::fs::write(out.join("restore.md"), &md)?;
    eprintln!(
        "bench restore: done in {:.0} s; tables in {}",
        started.elapsed().as_secs_f64(),
        out.join("restore.md").display()
    );
    Ok(())
}
