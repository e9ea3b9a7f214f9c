//! ckptfs: space-optimized VM memory checkpoints and lazy restore.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod create;
pub mod disk;
pub mod format;
pub mod synth;
pub mod types;
pub mod verify;

pub use checkpoint::{Checkpoint, PageEntry, PageSource, ReadCounts};
pub use checkpoint::{OpenError, OpenOptions, ReadError};
pub use create::{CreateError, MemoryImage};
pub use create::{CreateOptions, DiskHint, Summary, create};
pub use types::{BlobIndex, DiskIndex, DiskOffset, PAGE_SIZE, PageIndex};
