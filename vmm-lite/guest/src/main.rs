//! The guest program vmm-lite runs: a freestanding x86_64 long-mode program with no
//! interrupts, no allocator and no libc. It sets up its workload's memory, then serves
//! requests from the VMM forever (see `abi.rs` for the contract).
#![no_std]
#![no_main]

#[allow(dead_code)] // shared with the VMM; not every constant is used on this side
mod abi;
mod desktop;
mod io;
mod memfns;
mod workload;

use core::fmt::Write;

/// Boot info as the VMM writes it at [`abi::BOOT_INFO_ADDR`] (version 2; a version-1 VMM
/// wrote only the fields up to `seed` and left `size` zero).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    magic: u64,
    mem_size: u64,
    disk_size: u64,
    workload: u64,
    seed: u64,
    size: u64,
    /// Read from guest memory when a request flags a new session ([`io::session`]), never
    /// from this copy, which holds the boot-time value.
    #[allow(dead_code)]
    session: u64,
    desktop_cache_pct: u64,
    desktop_anon_pct: u64,
    desktop_ws_pct: u64,
    desktop_cold_permille: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(BootInfo, mem_size) as u64 == abi::BOOT_MEM_SIZE_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, disk_size) as u64 == abi::BOOT_DISK_SIZE_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, workload) as u64 == abi::BOOT_WORKLOAD_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, seed) as u64 == abi::BOOT_SEED_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, size) as u64 == abi::BOOT_SIZE_OFFSET);
    assert!(core::mem::offset_of!(BootInfo, session) as u64 == abi::BOOT_SESSION_OFFSET);
    assert!(
        core::mem::offset_of!(BootInfo, desktop_cache_pct) as u64
            == abi::BOOT_DESKTOP_CACHE_PCT_OFFSET
    );
    assert!(
        core::mem::offset_of!(BootInfo, desktop_anon_pct) as u64
            == abi::BOOT_DESKTOP_ANON_PCT_OFFSET
    );
    assert!(
        core::mem::offset_of!(BootInfo, desktop_ws_pct) as u64 == abi::BOOT_DESKTOP_WS_PCT_OFFSET
    );
    assert!(
        core::mem::offset_of!(BootInfo, desktop_cold_permille) as u64
            == abi::BOOT_DESKTOP_COLD_PERMILLE_OFFSET
    );
    assert!(core::mem::size_of::<BootInfo>() as u64 == abi::BOOT_INFO_SIZE);
};

impl BootInfo {
    /// Whether the VMM wrote the field that ends at byte `end` of the block.
    fn has(&self, end: u64) -> bool {
        self.size >= end
    }

    /// The desktop parameters: as written, or the defaults from a version-1 VMM.
    pub fn desktop(&self) -> desktop::DesktopParams {
        if self.has(abi::BOOT_DESKTOP_COLD_PERMILLE_OFFSET + 8) {
            desktop::DesktopParams {
                cache_pct: self.desktop_cache_pct,
                anon_pct: self.desktop_anon_pct,
                ws_pct: self.desktop_ws_pct,
                cold_permille: self.desktop_cold_permille,
            }
        } else {
            desktop::DesktopParams {
                cache_pct: abi::DESKTOP_DEFAULT_CACHE_PCT,
                anon_pct: abi::DESKTOP_DEFAULT_ANON_PCT,
                ws_pct: abi::DESKTOP_DEFAULT_WS_PCT,
                cold_permille: abi::DESKTOP_DEFAULT_COLD_PERMILLE,
            }
        }
    }
}

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
    // The session seed lives in this frame, not in the workload state: the CHECK never
    // depends on it, so READ requests of any session leave the CHECK unchanged.
    let mut session = workload::Session::new(0);
    loop {
        let word = io::next_request();
        if word & abi::REQ_NEW_SESSION != 0 {
            session = workload::Session::new(io::session());
        }
        let response = match word & abi::REQ_CODE_MASK {
            abi::REQ_WORK => state.work(&session),
            abi::REQ_READ => state.read(word >> abi::REQ_ARG_SHIFT, &session),
            abi::REQ_CHECK => state.check(),
            abi::REQ_DIRTY => state.dirty(u64::from(word >> abi::REQ_ARG_SHIFT)),
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
