//! The guest program vmm-lite runs: a freestanding x86_64 long-mode program with no
//! interrupts, no allocator and no libc. It sets up its workload's memory, then serves
//! requests from the VMM forever (see `abi.rs` for the contract).
#![no_std]
#![no_main]

#[allow(dead_code)] // shared with the VMM; not every constant is used on this side
mod abi;
mod io;
mod memfns;
mod workload;

use core::fmt::Write;

/// Boot info as the VMM writes it at [`abi::BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    magic: u64,
    mem_size: u64,
    disk_size: u64,
    workload: u64,
    seed: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(BootInfo, mem_size) as u64 == abi::BOOT_MEM_SIZE_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, disk_size) as u64 == abi::BOOT_DISK_SIZE_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, workload) as u64 == abi::BOOT_WORKLOAD_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, seed) as u64 == abi::BOOT_SEED_OFFSET);
    assert!(core::mem::size_of::<BootInfo>() as u64 == abi::BOOT_INFO_SIZE);
};

/// Entry point: the VMM starts the vCPU here in 64-bit mode with `rdi` = boot info address
/// and `rsp` = [`abi::STACK_TOP`] - 8.
///
/// # Safety
/// Only the VMM calls this, once, with a valid boot info pointer.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.start")]
pub unsafe extern "C" fn _start(info: *const BootInfo) -> ! {
    // SAFETY: the VMM wrote a BootInfo at this address before starting the vCPU.
    let info = unsafe { core::ptr::read_volatile(info) };
    if info.magic != abi::BOOT_MAGIC {
        panic!("bad boot info magic {:#x}", info.magic);
    }
    let mut state = workload::State::init(&info);
    loop {
        let word = io::next_request();
        let response = match word & abi::REQ_CODE_MASK {
            abi::REQ_WORK => state.work(),
            abi::REQ_READ => state.read(word >> abi::REQ_ARG_SHIFT),
            abi::REQ_CHECK => state.check(),
            abi::REQ_SHUTDOWN => io::halt(),
            other => panic!("unknown request code {other}"),
        };
        io::respond(response);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(io::Serial, "guest panic: {info}");
    io::halt()
}
