// The contract between vmm-lite and its guest program: guest physical memory map, I/O ports,
// request codes and the layout of the structures the two exchange through guest memory.
//
// This file is compiled twice: by the guest (`mod abi;`) and by the VMM
// (`include!("../guest/src/abi.rs")` in vmm-lite/src/abi.rs), so it holds plain
// constants only.
//
// Guest physical memory map (identity mapped, 2 MiB pages):
//
// ```text
// 0x0000_0000  +------------------------+
//              | unused (zero)          |
// 0x0000_0500  | GDT (null, code, data) |
// 0x0000_1000  | PML4                   |
// 0x0000_2000  | PDPT                   |
// 0x0000_3000  | 4 page directories     |  2 MiB pages, the first 4 GiB
// 0x0000_7000  | boot info              |  written by the VMM before the first run (session
//              |                        |  seed: again at each restore)
// 0x0000_8000  | 60 page directories    |  the rest, up to 64 GiB (written only as far as
//              |                        |  RAM goes: a guest of 4 GiB or less has none)
// 0x0010_0000  | guest image            |  .text .rodata .data .bss (<= 512 KiB)
// 0x0018_0000  | stack (grows down)     |
// 0x0020_0000  | heap: the workload's   |  page cache | computed data | untouched zero
//              | memory, to end of RAM  |
//              +------------------------+
// ```

/// Size of a guest page and of a block-device block.
pub const PAGE_SIZE: u64 = 4096;
/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest physical address of the PML4.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest physical address of the first of [`PD_COUNT`] page directories.
pub const PD_ADDR: u64 = 0x3000;
/// Page directories at [`PD_ADDR`] (each maps 1 GiB with 2 MiB pages): the first 4 GiB.
pub const PD_LOW_COUNT: u64 = 4;
/// Guest physical address of the page directories past the first [`PD_LOW_COUNT`] (guests
/// over 4 GiB; the layout below 4 GiB stays what it always was).
pub const PD_HIGH_ADDR: u64 = 0x8000;
/// Page directories in all.
pub const PD_COUNT: u64 = 64;
/// Guest physical address of the boot info block.
pub const BOOT_INFO_ADDR: u64 = 0x7000;
/// Load address and entry point of the guest image.
pub const IMAGE_ADDR: u64 = 0x10_0000;
/// Largest guest image, .bss included.
pub const IMAGE_MAX: u64 = 0x8_0000;
/// Initial stack pointer + 8 (the stack grows down from here).
pub const STACK_TOP: u64 = 0x20_0000;
/// First byte of the memory the workload manages.
pub const HEAP_ADDR: u64 = 0x20_0000;
/// The local APIC's default base: KVM here turns guest accesses to this page into MMIO exits
/// even without an in-kernel irqchip, so RAM there is not usable by the guest. The desktop
/// workload keeps its segments below it; the others skip this one page in their heap (see
/// the guest's `workload::page_addr`).
pub const APIC_HOLE_ADDR: u64 = 0xfee0_0000;
/// Smallest guest RAM size.
pub const MIN_MEM: u64 = 4 << 20;
/// Largest guest RAM size (what the page tables map).
pub const MAX_MEM: u64 = PD_COUNT << 30;

/// `out dx, al`: one byte of the guest's log.
pub const PORT_SERIAL: u16 = 0x3f8;
/// `out dx, eax`: guest physical address of a block request to execute now.
pub const PORT_BLOCK: u16 = 0x510;
/// `in eax, dx`: the next request code (`REQ_*`).
pub const PORT_REQUEST: u16 = 0x520;
/// `out dx, eax`: high 32 bits of the response (optional, latched until the next response).
pub const PORT_RESPONSE_HI: u16 = 0x524;
/// `out dx, eax`: low 32 bits of the response; completes the request.
pub const PORT_RESPONSE: u16 = 0x528;

/// `out dx, eax`: guest physical address of a hash request (the hash device, see below).
pub const PORT_HASH: u16 = 0x530;

/// Request: one unit of work over the working set; the response is a checksum of what it read.
pub const REQ_WORK: u32 = 1;
/// Request: checksum of the guest's whole state (heap + workload state); changes nothing.
pub const REQ_CHECK: u32 = 2;
/// Request: halt.
pub const REQ_SHUTDOWN: u32 = 3;
/// Request: like WORK but pure: reads pages chosen from the request's argument and the
/// workload state, and changes nothing (so a later CHECK still equals the previous one).
pub const REQ_READ: u32 = 4;
/// Request: write `argument` more heap pages (one word each), continuing a fixed walk
/// that visits every heap page below the APIC page once before it repeats; the response
/// is how many pages DIRTY requests have written in all. A restored VM that must dirty a
/// chosen share of its memory (incremental checkpoints) does it with these.
pub const REQ_DIRTY: u32 = 5;
/// A request word is `code | argument << REQ_ARG_SHIFT` (code in the low 8 bits).
pub const REQ_ARG_SHIFT: u32 = 8;
/// Flag in the code byte of a request word: the VMM has put a new session seed in the boot
/// info ([`BOOT_SESSION_OFFSET`]). It sets it on the first request after a restore; the
/// guest then reads the seed once and keeps it, instead of loading it at every request.
pub const REQ_NEW_SESSION: u32 = 0x80;
/// Mask of the code in a request word.
pub const REQ_CODE_MASK: u32 = REQ_NEW_SESSION - 1;

/// Boot info magic, "VMMLBOOT" little endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VMMLBOOT");
/// Boot info: `u64` magic.
pub const BOOT_MAGIC_OFFSET: u64 = 0;
/// Boot info: `u64` guest RAM size in bytes.
pub const BOOT_MEM_SIZE_OFFSET: u64 = BOOT_MAGIC_OFFSET + 8;
/// Boot info: `u64` disk size in bytes.
pub const BOOT_DISK_SIZE_OFFSET: u64 = BOOT_MEM_SIZE_OFFSET + 8;
/// Boot info: `u64` workload (`WORKLOAD_*`).
pub const BOOT_WORKLOAD_OFFSET: u64 = BOOT_DISK_SIZE_OFFSET + 8;
/// Boot info: `u64` seed of the guest's PRNG.
pub const BOOT_SEED_OFFSET: u64 = BOOT_WORKLOAD_OFFSET + 8;
/// Size of the first boot info layout (version 1: magic .. seed). A VMM of that version
/// wrote nothing after it, so the guest reads the fields below only when
/// [`BOOT_SIZE_OFFSET`] says they were written.
pub const BOOT_INFO_V1_SIZE: u64 = BOOT_SEED_OFFSET + 8;
/// Boot info: `u64` bytes of boot info the VMM wrote (0 = a version-1 VMM: 40 bytes).
pub const BOOT_SIZE_OFFSET: u64 = BOOT_INFO_V1_SIZE;
/// Boot info: `u64` request seed of the current session: 0 at boot, rewritten by the VMM
/// when it restores the VM (then it flags the next request with [`REQ_NEW_SESSION`]). The
/// guest mixes it into the pages READ requests (and desktop WORK requests) pick, so two
/// restores of one checkpoint with different seeds touch different pages. Not part of the
/// CHECK.
pub const BOOT_SESSION_OFFSET: u64 = BOOT_SIZE_OFFSET + 8;
/// Boot info: `u64` desktop workload: page cache, percent of the heap.
pub const BOOT_DESKTOP_CACHE_PCT_OFFSET: u64 = BOOT_SESSION_OFFSET + 8;
/// Boot info: `u64` desktop workload: computed data, percent of the heap.
pub const BOOT_DESKTOP_ANON_PCT_OFFSET: u64 = BOOT_DESKTOP_CACHE_PCT_OFFSET + 8;
/// Boot info: `u64` desktop workload: working set, percent of the heap.
pub const BOOT_DESKTOP_WS_PCT_OFFSET: u64 = BOOT_DESKTOP_ANON_PCT_OFFSET + 8;
/// Boot info: `u64` desktop workload: accesses outside the working set, per mille.
pub const BOOT_DESKTOP_COLD_PERMILLE_OFFSET: u64 = BOOT_DESKTOP_WS_PCT_OFFSET + 8;
/// Size of the boot info block (version 2).
pub const BOOT_INFO_SIZE: u64 = BOOT_DESKTOP_COLD_PERMILLE_OFFSET + 8;

/// Workload: page cache of the disk.
pub const WORKLOAD_PAGECACHE: u64 = 1;
/// Workload: computed (anonymous) data.
pub const WORKLOAD_ANON: u64 = 2;
/// Workload: a third page cache, a third computed data, a third untouched.
pub const WORKLOAD_MIXED: u64 = 3;
/// Workload: a virtual desktop: page cache, computed data and free memory interleaved in
/// 2 MiB segments; requests touch a working set of file-page runs and scattered heap pages,
/// plus a few cold pages.
pub const WORKLOAD_DESKTOP: u64 = 4;

/// Desktop default: page cache, percent of the heap (bounded by the disk size).
pub const DESKTOP_DEFAULT_CACHE_PCT: u64 = 45;
/// Desktop default: computed data, percent of the heap.
pub const DESKTOP_DEFAULT_ANON_PCT: u64 = 20;
/// Desktop default: working set, percent of the heap.
pub const DESKTOP_DEFAULT_WS_PCT: u64 = 12;
/// Desktop default: accesses to pages outside the working set, per mille.
pub const DESKTOP_DEFAULT_COLD_PERMILLE: u64 = 15;
/// Desktop: pages per segment of the heap layout (2 MiB).
pub const DESKTOP_SEGMENT_PAGES: u64 = 512;

/// Block request: `u32` operation (`BLOCK_OP_*`).
pub const BLOCK_OP_OFFSET: u64 = 0;
/// Block request: `u32` status (`BLOCK_STATUS_*`), written by the VMM.
pub const BLOCK_STATUS_OFFSET: u64 = BLOCK_OP_OFFSET + 4;
/// Block request: `u64` byte offset in the disk (a multiple of [`PAGE_SIZE`]).
pub const BLOCK_DISK_OFFSET_OFFSET: u64 = BLOCK_STATUS_OFFSET + 4;
/// Block request: `u64` guest physical address of the buffer.
pub const BLOCK_GUEST_ADDR_OFFSET: u64 = BLOCK_DISK_OFFSET_OFFSET + 8;
/// Block request: `u64` length in bytes (a multiple of [`PAGE_SIZE`]).
pub const BLOCK_LEN_OFFSET: u64 = BLOCK_GUEST_ADDR_OFFSET + 8;
/// Size of a block request.
pub const BLOCK_REQUEST_SIZE: u64 = BLOCK_LEN_OFFSET + 8;
/// Largest single block transfer.
pub const BLOCK_MAX_LEN: u64 = 16 << 20;

/// Read disk blocks into guest memory.
pub const BLOCK_OP_READ: u32 = 1;
/// Write guest memory to disk blocks.
pub const BLOCK_OP_WRITE: u32 = 2;
/// Status: done.
pub const BLOCK_STATUS_OK: u32 = 0;
/// Status: bad request (range, alignment, operation) or host I/O error.
pub const BLOCK_STATUS_ERROR: u32 = 1;

/// Hash request: `u64` guest physical address of the first byte (page aligned).
pub const HASH_ADDR_OFFSET: u64 = 0;
/// Hash request: `u64` length in bytes (a multiple of [`PAGE_SIZE`]).
pub const HASH_LEN_OFFSET: u64 = HASH_ADDR_OFFSET + 8;
/// Hash request: `u64` result, written by the VMM (0 if the range is not RAM).
pub const HASH_RESULT_OFFSET: u64 = HASH_LEN_OFFSET + 8;
/// Size of a hash request.
pub const HASH_REQUEST_SIZE: u64 = HASH_RESULT_OFFSET + 8;
