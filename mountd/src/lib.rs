//! `ckptfs-mountd`: serve a checkpoint's guest RAM as a FUSE file for lazy restore.
//!
//! The mount holds `memory` (the guest RAM, mmap-able MAP_PRIVATE by any VMM),
//! `stats` (live JSON counters), `zero-ranges` and `vmm-state`. A FUSE read is
//! served with exactly the pages it asks for, rebuilt through the library's
//! [`ckptfs::PageReader`] (zeros, disk preads, blob copies, each CRC-checked)
//! ([`readpath`]). Before the VM runs, the [`loader`] pushes the checkpoint's
//! loading set (the pages an earlier restore touched first, stored contiguously)
//! into the kernel page cache with FUSE notify-store; the [`scheduler`] then
//! reads ahead of sequential streams and sweeps the rest in disk order, always
//! after demand reads. A recording mount ([`record`]) writes the loading set.
//!
//! ```text
//! VMM fault / read(2) ──► kernel page cache ──miss──► FUSE read ──► readpath ──► PageReader
//!                               ▲                                      │
//!                               │ notify-store                         └──► recorder (first touches)
//!                  loader (loading set), scheduler (readahead, background sweep)
//! ```
#![deny(missing_docs)]

pub mod bitmap;
pub mod cache;
pub mod daemon;
pub mod fixture;
pub mod fs;
pub mod kernel;
pub mod loader;
pub mod options;
pub mod readpath;
pub mod record;
pub mod remote;
pub mod scheduler;
pub mod shared;
pub mod stats;
pub mod stream;

/// An error and its sources on one line ("a: b: c").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
