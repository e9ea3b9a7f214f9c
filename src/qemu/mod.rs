//! QEMU as a client: checkpoint a running QEMU VM and restore it lazily.
//!
//! A QEMU VM whose RAM is a `memory-backend-file` with `share=on` keeps its
//! guest RAM in that file. [`save::save`] stops the VM over QMP, saves the
//! device state with the `x-ignore-shared` migration capability (the RAM stays
//! in the file and out of the stream) and makes a checkpoint of the RAM file,
//! the VM's disks and that state. [`restore::Plan`] reads the saved stream's
//! head ([`stream`]) and gives the QEMU arguments and QMP steps that restore
//! the VM from a mount of the checkpoint: RAM `MAP_PRIVATE` from `memory`,
//! device state from `vmm-state`. [`qmp`] is the small typed QMP client both use.

pub mod pagemap;
pub mod qmp;
pub mod restore;
pub mod save;
pub mod stream;
