//! vmm-lite: a minimal KVM VMM (x86_64) that runs its own guest program, checkpoints it the
//! paper's way (tracking disk I/O, so pages that hold disk blocks become references) through
//! the ckptfs library, and restores it while timing every request.
//!
//! Pipeline: [`run::run`] boots the guest, warms it up, pauses it after a CHECK request,
//! saves the vCPU and device state ([`state`]) and writes the checkpoint with
//! `ckptfs::create` (hints from [`tracking`]); [`restore::restore`] maps a memory file
//! (`MAP_PRIVATE`: a ckptfs FUSE mount's `memory` file or a raw dump), or copies it eagerly,
//! resumes the vCPU and drives requests ([`driver`]); with `-o` it then checkpoints the
//! restored VM, incrementally against the checkpoint it came from ([`save`]).
//!
//! The guest ([`guest`], source in vmm-lite/guest) sees this machine (see [`abi`]):
//! - RAM at guest physical 0, identity mapped with 2 MiB pages (up to 64 GiB); boot info at
//!   0x7000, image at 0x10_0000, stack below 0x20_0000, workload memory ("heap") above.
//! - ports: 0x3f8 log byte; 0x510 block request address; 0x520 `in` next request;
//!   0x524 response high half; 0x528 response low half (completes the request); 0x530 hash
//!   request address.

//!
//! ```no_run
//! use std::time::Instant;
//! use vmm_lite::{block::BlockDevice, driver::{PlanDriver, WorkLimit}, guest, machine::Machine};
//! use vmm_lite::{memory::GuestMemory, state};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Boot a 16 MiB guest on disk.img (tracking its disk reads) and serve 100 requests + CHECK.
//! let block = BlockDevice::open("disk.img".as_ref(), true)?;
//! let params = guest::BootParams {
//!     workload: guest::Workload::Mixed,
//!     disk_size: block.size(),
//!     seed: 1,
//!     desktop: guest::DesktopParams::default(),
//! };
//! let mut vm = Machine::boot(GuestMemory::anonymous(16 << 20)?, block, &params)?;
//! let mut driver = PlanDriver::new(WorkLimit::Count(100), Instant::now(), false);
//! vm.run(&mut driver)?;
//! // Paused right after the CHECK: save, then resume a copy over a private map of the dump.
//! vm.harvest_dirty_log()?;
//! let saved = state::encode(&vm.save()?);
//! std::fs::write("mem.raw", vm.memory().as_slice())?;
//! let saved = state::decode(&saved)?;
//! let mem = GuestMemory::map_file_private("mem.raw".as_ref(), saved.devices.mem_size)?;
//! let mut copy = Machine::restore(mem, BlockDevice::open("disk.img".as_ref(), false)?, &saved, 0)?;
//! let mut check = PlanDriver::new(WorkLimit::Count(0), Instant::now(), false);
//! copy.run(&mut check)?;
//! assert_eq!(check.check(), driver.check());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod abi;
pub mod binding;
pub mod block;
pub mod cli;
pub mod driver;
pub mod guest;
pub mod hashdev;
pub mod machine;
pub mod memory;
pub mod mkdisk;
pub mod restore;
pub mod run;
pub mod save;
pub mod state;
pub mod touched;
pub mod tracking;
pub mod vcpu;
pub mod zeroranges;
