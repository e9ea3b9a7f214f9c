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

/// The error chain on one line, skipping a cause whose text the line already has.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn main() -> ExitCode {
    env_logger::init();
    match main_exec() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckptfs-mountd: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
