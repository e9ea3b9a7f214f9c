//! Write a generated guest (raw dump, disk image, checkpoint) for benchmarks:
//! `cargo run --release -p mountd --example mkfixture -- DIR GUEST_MIB DISK_MIB [SEED]`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: mkfixture DIR GUEST_MIB DISK_MIB [SEED]");
        return ExitCode::FAILURE;
    }
    let dir = PathBuf::from(&args[0]);
    let mib = |s: &str| s.parse::<u64>().map(|v| v << 20);
    let (Ok(guest), Ok(disk)) = (mib(&args[1]), mib(&args[2])) else {
        eprintln!("mkfixture: sizes must be numbers of MiB");
        return ExitCode::FAILURE;
    };
    let seed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    match mountd::fixture::write(&dir, guest, disk, seed) {
        Ok(fx) => {
            println!(
                "{}\n{}\n{}",
                fx.mem.display(),
                fx.disk.display(),
                fx.ckpt.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mkfixture: {e}");
            ExitCode::FAILURE
        }
    }
}
