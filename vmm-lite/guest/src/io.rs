//! Port I/O: the serial log, the block device and the request/response ports.

use core::arch::asm;

use crate::abi;

/// Writes one byte to an I/O port. No `nomem`: the VMM may read or write guest memory
/// while handling the exit, so the compiler must not move memory accesses across it.
fn out8(port: u16, value: u8) {
    // SAFETY: port I/O has no effect on this program's memory except through the VMM's
    // documented devices.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

fn out32(port: u16, value: u32) {
    // SAFETY: as in `out8`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

fn in32(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `out8`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags)) };
    value
}

/// Stops the vCPU for good (interrupts are never enabled, so `hlt` does not return
/// unless the VMM resets the vCPU).
pub fn halt() -> ! {
    loop {
        // SAFETY: hlt only stops the vCPU.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// The guest log: each byte goes to [`abi::PORT_SERIAL`].
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            out8(abi::PORT_SERIAL, b);
        }
        Ok(())
    }
}

/// The session's request seed ([`abi::BOOT_SESSION_OFFSET`]): 0 at boot, set by the VMM
/// when it restores the VM (read it when a request carries [`abi::REQ_NEW_SESSION`]).
pub fn session() -> u64 {
    let addr = (abi::BOOT_INFO_ADDR + abi::BOOT_SESSION_OFFSET) as *const u64;
    // SAFETY: the boot info block is guest RAM that this program never writes; the VMM
    // writes it only while the vCPU is stopped. Volatile: it changes behind the compiler.
    unsafe { core::ptr::read_volatile(addr) }
}

/// Blocks until the VMM hands out the next request.
pub fn next_request() -> u32 {
    in32(abi::PORT_REQUEST)
}

/// Completes the current request with `value`.
pub fn respond(value: u64) {
    let hi = (value >> 32) as u32;
    if hi != 0 {
        out32(abi::PORT_RESPONSE_HI, hi);
    }
    out32(abi::PORT_RESPONSE, value as u32);
}

/// A block request as the VMM reads it (see the `BLOCK_*_OFFSET` constants).
#[repr(C)]
struct BlockRequest {
    op: u32,
    status: u32,
    disk_offset: u64,
    guest_addr: u64,
    len: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(BlockRequest, status) as u64 == abi::BLOCK_STATUS_OFFSET);
    assert!(core::mem::offset_of!(BlockRequest, disk_offset) as u64 == abi::BLOCK_DISK_OFFSET_OFFSET);
    assert!(core::mem::offset_of!(BlockRequest, guest_addr) as u64 == abi::BLOCK_GUEST_ADDR_OFFSET);
    assert!(core::mem::offset_of!(BlockRequest, len) as u64 == abi::BLOCK_LEN_OFFSET);
    assert!(core::mem::size_of::<BlockRequest>() as u64 == abi::BLOCK_REQUEST_SIZE);
};

fn block_io(op: u32, disk_offset: u64, guest_addr: u64, len: u64) {
    let mut req = BlockRequest { op, status: u32::MAX, disk_offset, guest_addr, len };
    let addr = &raw mut req as u64;
    out32(abi::PORT_BLOCK, addr as u32);
    // SAFETY: `req` is live; the VMM wrote the status during the `out`.
    let status = unsafe { core::ptr::read_volatile(&raw const req.status) };
    if status != abi::BLOCK_STATUS_OK {
        panic!("block op {op} of {len} bytes at disk offset {disk_offset:#x} failed: {status}");
    }
}

/// Reads `len` bytes from the disk at `disk_offset` into guest memory at `guest_addr`.
pub fn disk_read(disk_offset: u64, guest_addr: u64, len: u64) {
    block_io(abi::BLOCK_OP_READ, disk_offset, guest_addr, len);
}

/// Writes `len` bytes of guest memory at `guest_addr` to the disk at `disk_offset`.
pub fn disk_write(disk_offset: u64, guest_addr: u64, len: u64) {
    block_io(abi::BLOCK_OP_WRITE, disk_offset, guest_addr, len);
}

/// A hash request as the VMM reads it (see the `HASH_*_OFFSET` constants).
#[repr(C)]
struct HashRequest {
    addr: u64,
    len: u64,
    result: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(HashRequest, len) as u64 == abi::HASH_LEN_OFFSET);
    assert!(core::mem::offset_of!(HashRequest, result) as u64 == abi::HASH_RESULT_OFFSET);
    assert!(core::mem::size_of::<HashRequest>() as u64 == abi::HASH_REQUEST_SIZE);
};

/// Hash of guest memory [addr, addr + len), computed by the VMM's hash device. The CPU this
/// guest gets here is emulated (about a million instructions per second), so a pass over all
/// of memory in guest code would take tens of seconds; the device reads the same bytes.
pub fn hash_memory(addr: u64, len: u64) -> u64 {
    let mut req = HashRequest { addr, len, result: 0 };
    out32(abi::PORT_HASH, (&raw mut req) as u64 as u32);
    // SAFETY: `req` is live; the VMM wrote the result during the `out`.
    unsafe { core::ptr::read_volatile(&raw const req.result) }
}
