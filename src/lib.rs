//! ckptfs: space-optimized VM memory checkpoints and lazy restore.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod create;
pub mod types;

pub use checkpoint::{Checkpoint, PageEntry, PageSource, ReadCounts};
pub use create::{create, CreateOptions, DiskHint, Summary};
pub use types::{BlobIndex, DiskIndex, DiskOffset, PageIndex, PAGE_SIZE};
