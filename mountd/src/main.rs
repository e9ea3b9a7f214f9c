//! `ckptfs-mountd VM.ckpt MOUNTPOINT`: see `--help` and the crate docs.

use std::process::ExitCode;

use clap::Parser;
use mountd::{daemon, options::Cli};

fn main_exec() -> anyhow::Result<()> {
    let mut settings = Cli::parse().settings()?;
    settings.make_absolute()?;
    let ready = if settings.foreground {
        None
    } else {
        Some(daemon::detach()?)
    };
    daemon::serve(&settings, ready)
}

fn main() -> ExitCode {
    env_logger::init();
    match main_exec() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every error names its step once and chains its cause: one line.
            eprintln!("ckptfs-mountd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
