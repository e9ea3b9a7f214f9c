//! The `ckptfs` command: create, inspect, verify and mount checkpoints.

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckptfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
