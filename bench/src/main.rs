//! ckptfs benchmarks and the demo.

mod big;
mod clones;
mod create;
mod demo;
mod fleet;
mod fuzz;
mod incremental;
mod matrix;
mod plot;
mod procmem;
mod qemu;
mod remote;
mod report;
mod restore;
mod storm;
mod tier;
mod ttr;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// ckptfs benchmarks.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Checkpoint creation throughput on a generated image.
    Create {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        guest_mib: u64,
        /// Disk image in MiB.
        #[arg(long, default_value_t = 512)]
        disk_mib: u64,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Time-to-responsiveness of every restore method (see bench/RESULTS.md).
    Restore {
        /// 512 MiB guests, local storage, 3 repetitions (a few minutes); the
        /// full run is 1 and 4 GiB at local and 200 MB/s, 5 repetitions.
        #[arg(long)]
        quick: bool,
        /// Workloads, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "desktop,mixed")]
        workloads: Vec<String>,
        /// Guest sizes in MiB, comma separated (overrides --quick's choice).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Repetitions per cell [default: 5; 3 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds each restored VM serves requests.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// Storage tiers: "local" and/or read limits in MB/s (blkio cgroup), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "local,200")]
        storage_mbps: Vec<String>,
        /// Methods, comma separated (default: all).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Loading-set recording window in seconds (default: 2 x --duration).
        #[arg(long)]
        window: Option<f64>,
        /// Extra `vmm-lite run` arguments (e.g. "--desktop-ws-pct=12"), repeatable.
        #[arg(long, allow_hyphen_values = true)]
        run_arg: Vec<String>,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where tables (restore.md), plots and raw results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Mutation fuzzing of the checkpoint and loading-set parsers, page reads,
    /// the daemon's options and the zero-ranges text (see bench/src/fuzz).
    Fuzz {
        /// Seconds to run.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Stop after this many cases.
        #[arg(long)]
        iterations: Option<u64>,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where failing inputs are saved.
        #[arg(long, default_value = "fuzz-failures")]
        failures: PathBuf,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Restore a real Linux guest (1 GiB, QEMU TCG) four ways: eager, lazy raw,
    /// ckptfs with and without a loading set (see bench/src/qemu.rs).
    Qemu {
        /// One repetition (a few minutes) instead of 5.
        #[arg(long)]
        quick: bool,
        /// Repetitions per method and tier [default: 5; 1 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Storage tiers: "local" and/or read limits in MB/s (blkio cgroup), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "local,200")]
        storage_mbps: Vec<String>,
        /// Methods, comma separated (default: eager,lazy-raw,ckptfs,ckptfs-ls,ckptfs-ls-demand,warm).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where qemu.md, qemu.jsonl and qemu.png go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// TTR of a restore from an S3 store (SeaweedFS on loopback, latency
    /// injected by a proxy) vs a local checkpoint vs download-then-restore.
    Remote {
        /// 256 MiB desktop guest, latencies 0,5,20 ms, 2 repetitions.
        #[arg(long)]
        quick: bool,
        /// Workload.
        #[arg(long, default_value = "desktop")]
        workload: String,
        /// Guest MiB [default: 512; 256 with --quick].
        #[arg(long)]
        guest_mib: Option<u64>,
        /// Per-request latencies in ms, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "0,5,20")]
        latency_ms: Vec<u64>,
        /// Repetitions [default: 3; 2 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds each restored VM serves requests.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where remote.md and remote.jsonl go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Incremental checkpoints of restored VMs: save time and size against full saves, and
    /// restores from a chain of three against its flattened twin (see bench/RESULTS.md).
    Incremental {
        /// A 256 MiB guest, 2 repetitions, 1/5/20 % written (a few minutes); the full run is
        /// 1 and 4 GiB, 5 repetitions.
        #[arg(long)]
        quick: bool,
        /// Guest sizes in MiB, comma separated (overrides --quick's choice).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<u64>,
        /// Guest workload.
        #[arg(long, default_value = "desktop")]
        workload: String,
        /// Shares of RAM the guest writes before a save, percent, comma separated
        /// [default: 1,5,20; 1,5,20,50 at 1 GiB and less].
        #[arg(long, value_delimiter = ',')]
        dirty_pcts: Vec<f64>,
        /// Repetitions per cell [default: 5; 2 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds of work (the writes first) between restore and save.
        #[arg(long, default_value_t = 2.0)]
        work_seconds: f64,
        /// Seconds each measured restore of the chain serves requests.
        #[arg(long, default_value_t = 3.0)]
        ttr_seconds: f64,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where incremental.md and incremental.json go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Host memory of N VMs restored at once from one checkpoint (one mount) against N
    /// eager-raw and N lazy-raw restores; and two mounts sharing a disk image's page cache.
    Clones {
        /// 256 MiB guest, N = 1,2,4,8, 1 repetition (a few minutes); the full run is a
        /// 512 MiB guest, 5 repetitions.
        #[arg(long)]
        quick: bool,
        /// Guest MiB [default: 512; 256 with --quick].
        #[arg(long)]
        guest_mib: Option<u64>,
        /// Numbers of clones, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        counts: Vec<usize>,
        /// Methods, comma separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "ckptfs,lazy-raw,eager-raw"
        )]
        methods: Vec<String>,
        /// Share of RAM each clone writes, percent.
        #[arg(long, default_value_t = 5.0)]
        dirty_pct: f64,
        /// Repetitions [default: 5; 1 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds each clone serves requests.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Guest workload.
        #[arg(long, default_value = "desktop")]
        workload: String,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where clones.md, clones.png and clones.jsonl go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only redraw clones.md and clones.png from this clones.jsonl (the plan's
        /// options must match the run's).
        #[arg(long)]
        from_jsonl: Option<PathBuf>,
    },
    /// One large guest (16 GiB) through the whole pipeline: boot and checkpoint, create
    /// from its raw dump, verify, mount, restore cold with its CHECK; wall times and peak
    /// RSS of every step (create, daemon, VMM), page-table size; a 1 GiB guest is run the
    /// same way first, for the per-GiB slope.
    Big {
        /// 1 and 6 GiB (a few minutes; 6 GiB crosses 4 GiB and the APIC page); the full
        /// run is 1 and 16 GiB.
        #[arg(long)]
        quick: bool,
        /// Guest sizes in GiB, comma separated [default: 1,16; 1,6 with --quick].
        #[arg(long, value_delimiter = ',')]
        sizes: Option<Vec<u64>>,
        /// Guest workload.
        #[arg(long, default_value = "mixed")]
        workload: String,
        /// The daemon's --cache-mb.
        #[arg(long, default_value_t = 256)]
        cache_mb: u64,
        /// Seconds each restored VM serves requests before its CHECK.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Work directory (default: a temporary one under /var/tmp; needs about 1.6 x the
        /// largest guest free).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where big.md, big.jsonl and big.png go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only redraw big.md and big.png from this big.jsonl.
        #[arg(long)]
        from_jsonl: Option<PathBuf>,
    },
    /// A login storm: VMs, each from its own checkpoint, restored at the same moment from
    /// storage capped at --storage-mbps; time until the last one is responsive.
    Storm {
        /// 4 x 256 MiB, 2 repetitions (a few minutes); the full run is 8 x 1 GiB, 5 repetitions.
        #[arg(long)]
        quick: bool,
        /// VMs [default: 8; 4 with --quick].
        #[arg(long)]
        vms: Option<usize>,
        /// Guest MiB each [default: 1024; 256 with --quick].
        #[arg(long)]
        guest_mib: Option<u64>,
        /// Read limit of the storage, MB/s (blkio cgroup around every process; 0: uncapped, reads only counted).
        #[arg(long, default_value_t = 200)]
        storage_mbps: u64,
        /// Methods, comma separated (labels as in `bench restore`).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "eager-raw,lazy-raw,ckptfs-ls,ckptfs-ls-zero,ckptfs-ls-pall,warm"
        )]
        methods: Vec<String>,
        /// Repetitions [default: 5; 2 with --quick].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds each VM serves requests (from its first request) [default: 8; 4 with --quick].
        #[arg(long)]
        duration: Option<f64>,
        /// TTR window, ms: 100 ms windows of one VM among several sharing a CPU are too
        /// noisy (a warm storm's own TTR reached seconds).
        #[arg(long, default_value_t = 500)]
        window_ms: u64,
        /// Guest workload.
        #[arg(long, default_value = "desktop")]
        workload: String,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where storm.md, storm.jsonl and storm.png go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only rescore an earlier run's storm.jsonl (times rebuilt from its counts per
        /// 100 ms) and rewrite storm.md and storm.png.
        #[arg(long)]
        from_jsonl: Option<PathBuf>,
    },
    /// The demo: a VM checkpointed, mounted and restored, with its numbers printed.
    Demo {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        guest_mib: u64,
        /// Seconds each restored VM serves requests.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        /// Guest workload: desktop, mixed, pagecache or anon.
        #[arg(long, default_value = "desktop")]
        workload: String,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
        /// Work directory (default: a temporary one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn work_dir(dir: Option<PathBuf>) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ckptfs-bench")
                .tempdir_in("/var/tmp")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    })
}

fn parse_tiers(v: &[String]) -> Result<Vec<tier::Tier>> {
    v.iter()
        .map(|t| match t.as_str() {
            "local" => Ok(tier::Tier::Local),
            n => n
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .map(tier::Tier::Mbps)
                .ok_or_else(|| {
                    anyhow::anyhow!("--storage-mbps: {t:?} is neither \"local\" nor MB/s")
                }),
        })
        .collect()
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Create {
            guest_mib,
            disk_mib,
            dir,
        } => {
            let (_keep, dir) = work_dir(dir)?;
            for r in create::run(&dir, guest_mib, disk_mib)? {
                println!("{}", serde_json::to_string(&r)?);
            }
        }
        Command::Restore {
            quick,
            workloads,
            sizes,
            reps,
            duration,
            storage_mbps,
            methods,
            window,
            run_arg,
            dir,
            out,
        } => {
            let sizes = match (sizes.is_empty(), quick) {
                (false, _) => sizes,
                (true, true) => vec![512],
                (true, false) => vec![1024, 4096],
            };
            let tiers = if quick && storage_mbps == ["local", "200"] {
                vec![tier::Tier::Local]
            } else {
                parse_tiers(&storage_mbps)?
            };
            let methods = if methods.is_empty() {
                restore::Method::all()
            } else {
                methods
                    .iter()
                    .map(|m| restore::Method::parse(m))
                    .collect::<Result<_>>()?
            };
            let (_keep, dir) = work_dir(dir)?;
            matrix::run(
                &matrix::Matrix {
                    workloads,
                    sizes,
                    tiers,
                    methods,
                    reps: reps.unwrap_or(if quick { 3 } else { 5 }),
                    duration,
                    window: window.unwrap_or(2.0 * duration),
                    run_args: run_arg,
                },
                &dir,
                &out,
            )?;
        }
        Command::Fuzz {
            seconds,
            iterations,
            seed,
            failures,
            dir,
        } => {
            let (_keep, dir) = work_dir(dir)?;
            let summary = fuzz::run(&fuzz::Options {
                seconds,
                iterations,
                seed,
                dir,
                failures_dir: failures,
            })?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            anyhow::ensure!(
                summary.panics == 0 && summary.wrong_bytes == 0,
                "fuzzing found {} panics and {} wrong-bytes cases: {:?}",
                summary.panics,
                summary.wrong_bytes,
                summary.failures
            );
        }
        Command::Qemu {
            quick,
            reps,
            storage_mbps,
            methods,
            dir,
            out,
        } => {
            let methods = if methods.is_empty() {
                qemu::Method::ALL.to_vec()
            } else {
                methods
                    .iter()
                    .map(|m| qemu::Method::parse(m))
                    .collect::<Result<_>>()?
            };
            let cfg = qemu::Config {
                reps: reps.unwrap_or(if quick { 1 } else { 5 }),
                tiers: parse_tiers(&storage_mbps)?,
                methods,
            };
            let (_keep, dir) = work_dir(dir)?;
            qemu::run(&cfg, &dir, &out)?;
        }
        Command::Remote {
            quick,
            workload,
            guest_mib,
            latency_ms,
            reps,
            duration,
            dir,
            out,
        } => {
            let (_keep, dir) = work_dir(dir)?;
            let r = remote::Remote {
                workload,
                mib: guest_mib.unwrap_or(if quick { 256 } else { 512 }),
                latencies: latency_ms,
                reps: reps.unwrap_or(if quick { 2 } else { 3 }),
                duration,
            };
            remote::run(&r, &dir, &out)?;
        }
        Command::Incremental {
            quick,
            sizes,
            workload,
            dirty_pcts,
            reps,
            work_seconds,
            ttr_seconds,
            dir,
            out,
        } => {
            let sizes = match (sizes.is_empty(), quick) {
                (false, _) => sizes,
                (true, true) => vec![256],
                (true, false) => vec![1024, 4096],
            };
            let dirty_pcts = match (dirty_pcts.is_empty(), sizes.iter().all(|&s| s <= 1024)) {
                (false, _) => dirty_pcts,
                (true, true) if !quick => vec![1.0, 5.0, 20.0, 50.0],
                (true, _) => vec![1.0, 5.0, 20.0],
            };
            let plan = incremental::Plan {
                sizes,
                workload,
                dirty_pcts,
                reps: reps.unwrap_or(if quick { 2 } else { 5 }),
                work_seconds,
                ttr_seconds,
                chain_pct: 5.0,
            };
            let (_keep, dir) = work_dir(dir)?;
            incremental::run(&plan, &dir, &out)?;
        }
        Command::Clones {
            quick,
            guest_mib,
            counts,
            methods,
            dirty_pct,
            reps,
            duration,
            workload,
            dir,
            out,
            from_jsonl,
        } => {
            let plan = clones::Plan {
                mib: guest_mib.unwrap_or(if quick { 256 } else { 512 }),
                workload,
                counts,
                methods,
                reps: reps.unwrap_or(if quick { 1 } else { 5 }),
                dirty_pct,
                duration,
            };
            if let Some(jsonl) = from_jsonl {
                return clones::render(&plan, &jsonl, &out);
            }
            let (_keep, dir) = work_dir(dir)?;
            clones::run(&plan, &dir, &out)?;
        }
        Command::Big {
            quick,
            sizes,
            workload,
            cache_mb,
            duration,
            dir,
            out,
            from_jsonl,
        } => {
            let plan = big::Plan {
                sizes_gib: sizes.unwrap_or_else(|| big::default_sizes(quick)),
                workload,
                cache_mb,
                duration,
            };
            if let Some(jsonl) = from_jsonl {
                return big::render(&plan, &jsonl, &out);
            }
            let (_keep, dir) = work_dir(dir)?;
            big::run(&plan, &dir, &out)?;
        }
        Command::Storm {
            quick,
            vms,
            guest_mib,
            storage_mbps,
            methods,
            reps,
            duration,
            window_ms,
            workload,
            dir,
            out,
            from_jsonl,
        } => {
            let methods = methods
                .iter()
                .map(|m| restore::Method::parse(m))
                .collect::<Result<_>>()?;
            let plan = storm::Plan {
                vms: vms.unwrap_or(if quick { 4 } else { 8 }),
                mib: guest_mib.unwrap_or(if quick { 256 } else { 1024 }),
                workload,
                mbps: storage_mbps,
                methods,
                reps: reps.unwrap_or(if quick { 2 } else { 5 }),
                duration: duration.unwrap_or(if quick { 4.0 } else { 8.0 }),
                window_ms,
            };
            if let Some(jsonl) = from_jsonl {
                return storm::render(&plan, &jsonl, &out);
            }
            let (_keep, dir) = work_dir(dir)?;
            storm::run(&plan, &dir, &out)?;
        }
        Command::Demo {
            guest_mib,
            duration,
            workload,
            json,
            dir,
        } => {
            let (_keep, dir) = work_dir(dir)?;
            demo::run(&dir, &workload, guest_mib, duration, json)?;
        }
    }
    Ok(())
}
