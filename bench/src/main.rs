//! ckptfs benchmarks and the demo.

mod create;
mod demo;
mod plot;
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
    /// The demo: a guest checkpointed, verified, and its numbers printed.
    Demo {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        guest_mib: u64,
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
        Command::Demo { guest_mib, dir } => {
            let (_keep, dir) = work_dir(dir)?;
            demo::run(&dir, guest_mib)?;
        }
    }
    Ok(())
}
