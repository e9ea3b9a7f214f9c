//! `ckptfs-mountd`: serve a checkpoint's guest RAM as a FUSE file for lazy restore.
//!
//! The mount holds `memory` (the guest RAM, mmap-able MAP_PRIVATE by any VMM),
//! `stats` (live JSON counters) and `vmm-state`. Pages are rebuilt on demand
//! through [`ckptfs::Checkpoint::read_pages`] (zeros, disk preads, blob copies,
//! each CRC-checked) in chunks kept in an LRU ([`cache`]); a prefetcher
//! ([`prefetch`]) reads ahead of sequential streams, replays the working set
//! recorded by an earlier restore ([`workingset`]) and sweeps the rest in disk
//! order, pushing what it fetched into the kernel page cache with FUSE
//! notify-store so later faults never reach the daemon.
//!
//! ```text
//! VMM fault / read(2) ──► kernel page cache ──miss──► FUSE read ──► engine
//!                               ▲                                   │ cache hit?
//!                               │ notify-store                      ▼
//!                          prefetcher ◄── streams / working set ── Checkpoint::read_pages
//! ```
#![deny(missing_docs)]

pub mod cache;
pub mod daemon;
pub mod engine;
pub mod fixture;
pub mod fs;
pub mod options;
pub mod prefetch;
pub mod stats;
pub mod workingset;
