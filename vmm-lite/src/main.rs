//! `vmm-lite`: run the guest and checkpoint it, restore it and time requests, make disks.
//! See vmm-lite/README.md for the guest memory map, the ports, the request protocol and the
//! state format.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm_lite::cli::{Cli, execute};

fn main() -> ExitCode {
    let origin = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match execute(Cli::parse(), origin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-lite: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
