//! vmm-lite: a minimal KVM VMM (x86_64) that runs its own guest program, checkpoints it the
//! paper's way (tracking disk I/O, so pages that hold disk blocks become references) through
//! the ckptfs library, and restores it while timing every request.
//!
//! Pipeline: [`run::run`] boots the guest, warms it up, pauses it after a CHECK request,
//! saves the vCPU and device state ([`state`]) and writes the checkpoint with
//! `ckptfs::create` (hints from [`tracking`]); [`restore::restore`] maps a memory file
//! (`MAP_PRIVATE`: a ckptfs FUSE mount's `memory` file or a raw dump), or copies it eagerly,
//! resumes the vCPU and drives requests ([`driver`]).
//!
//! The guest ([`guest`], source in vmm-lite/guest) sees this machine (see [`abi`]):
//! - RAM at guest physical 0, identity mapped with 2 MiB pages up to 4 GiB; boot info at
//!   0x7000, image at 0x10_0000, stack below 0x20_0000, workload memory ("heap") above.
//! - ports: 0x3f8 log byte; 0x510 block request address; 0x520 `in` next request;
//!   0x524 response high half; 0x528 response low half (completes the request); 0x530 hash
//!   request address.

#![deny(missing_docs)]

pub mod abi;
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
pub mod state;
pub mod tracking;
pub mod vcpu;
