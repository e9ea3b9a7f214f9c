//! The `ckptfs` command: create, inspect, verify, flatten and mount checkpoints.

mod commands;
mod remote_cmds;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Ctrl-C during `create` or `flatten` must not leave a half-written hidden temp file.
    ckptfs::atomic_file::clean_up_on_signals();
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
