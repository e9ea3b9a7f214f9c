//! Builds the guest program (vmm-lite/guest, a standalone `#![no_std]` crate) with a nested
//! `cargo build` into its own target directory under OUT_DIR, then flattens it with
//! `objcopy -O binary` into `$OUT_DIR/guest.bin`, which src/guest.rs `include_bytes!`s.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest is built for the host target: no extra rustup target is needed.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Must match `IMAGE_ADDR` in guest/src/abi.rs and the address in guest/link.ld.
const IMAGE_ADDR: u64 = 0x10_0000;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("guest");
    for path in ["Cargo.toml", "link.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    let elf = build_guest(&guest_dir, &out_dir.join("guest-target"));
    check_entry(&elf);
    check_no_fpu_instructions(&elf);
    let bin = out_dir.join("guest.bin");
    run(Command::new("objcopy")
        .arg("-O")
        .arg("binary")
        .arg(&elf)
        .arg(&bin));
}

fn build_guest(guest_dir: &Path, target_dir: &Path) -> PathBuf {
    let linker_script = guest_dir.join("link.ld");
    let flags = [
        "-C".to_string(),
        "relocation-model=static".to_string(),
        // KVM here (nested, AMD) cannot run x87/SSE instructions in the guest: every one ends
        // in an emulation failure (KVM_INTERNAL_ERROR_EMULATION), even with CR4.OSFXSR set and
        // CR0.EM clear. The guest does integer work only, so compile it without SSE; rustc
        // warns that this changes the float ABI, which this program never uses.
        "-C".to_string(),
        "target-feature=-sse,-sse2".to_string(),
        "-C".to_string(),
        "link-arg=-nostartfiles".to_string(),
        "-C".to_string(),
        "link-arg=-nostdlib".to_string(),
        "-C".to_string(),
        "link-arg=-static".to_string(),
        "-C".to_string(),
        format!("link-arg=-Wl,-T{}", linker_script.display()),
    ];
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(target_dir)
        // The outer build's flags (and clippy's wrapper) are for the host program, not this one.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    run(&mut cmd);
    target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("vmm-lite-guest")
}

/// The VMM starts the vCPU at IMAGE_ADDR, so `_start` must be the first byte of the image.
fn check_entry(elf: &Path) {
    let bytes = std::fs::read(elf).unwrap_or_else(|e| panic!("reading {}: {e}", elf.display()));
    let entry = bytes
        .get(24..32)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or_else(|| panic!("{} is not an ELF64 file", elf.display()));
    assert_eq!(
        entry, IMAGE_ADDR,
        "guest entry point must be the load address"
    );
}

/// Fails the build if the compiler emitted any x87/MMX/SSE instruction (see `build_guest`).
fn check_no_fpu_instructions(elf: &Path) {
    let out = Command::new("objdump")
        .arg("-d")
        .arg("--no-show-raw-insn")
        .arg(elf)
        .output()
        .unwrap_or_else(|e| panic!("running objdump: {e}"));
    assert!(out.status.success(), "objdump -d {} failed", elf.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("%xmm") || l.contains("%mm") || l.contains("%st") || l.contains("\tf")
        })
        .filter(|l| !l.contains("\tfs") && !l.contains("\tfwait"))
        .take(5)
        .collect();
    assert!(bad.is_empty(), "guest uses FPU/SSE instructions: {bad:?}");
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}
