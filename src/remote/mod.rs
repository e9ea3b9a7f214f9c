//! Checkpoints on an S3-compatible object store: push on one host, lazy
//! restore on any other.
//!
//! The destination host already has the VM's disk images, so only the pages
//! that are not on a disk travel ([`push`] uploads them); a mount there
//! serves guest memory through [`RemoteCheckpoint`], a [`crate::PageReader`]
//! that rebuilds ZERO and DISK pages locally (disk fingerprints checked as
//! for a local checkpoint) and stored pages from ranged GETs, never one page
//! at a time:
//!
//! ```text
//!  s3://BUCKET/PREFIX/ckptfs-manifest    header, disk table, page table, VMM state,
//!                                         pack table, blob map, loading-set runs (written last)
//!  s3://BUCKET/ckptfs-packs/<xxh3-128>    1-4 MiB of stored pages, named by content:
//!                                         the loading set's pages first and contiguous,
//!                                         then the rest; shared by every checkpoint
//! ```
//!
//! Pack boundaries are chosen by page content (a cut after a page whose hash
//! ends in 8 zero bits, between 1 and 4 MiB), so two checkpoints of one VM
//! cut their common runs of pages alike and upload them once. [`manifest`]
//! documents the manifest byte by byte.
//!
//! Endpoint and credentials come from the standard AWS variables (see
//! [`Store::from_env`]).

pub mod cache;
pub mod fetch;
pub mod manifest;
pub mod pack;
pub mod pull;
pub mod push;
pub mod reader;
pub mod store;
pub mod url;
pub mod verify;

#[cfg(test)]
mod tests;

pub use pull::{PullOptions, PullSummary, pull};
pub use push::{PushOptions, PushSummary, push};
pub use reader::{DEFAULT_RETRY, RemoteCheckpoint, RemoteOptions};
pub use store::Store;
pub use url::{S3Url, is_remote};

use std::path::PathBuf;

/// What went wrong with a remote checkpoint. Each names the object or file.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The location is not an s3:// URL.
    #[error(transparent)]
    Url(#[from] url::UrlError),
    /// The S3 client could not be configured.
    #[error("configuring the S3 client for {url}")]
    Config {
        /// The location.
        url: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// No credentials in the environment.
    #[error(
        "no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS), or AWS_SKIP_SIGNATURE=true for a public bucket"
    )]
    NoCredentials {
        /// The location.
        url: String,
    },
    /// The async runtime could not start.
    #[error("starting the object-store runtime")]
    Runtime {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request about an object failed.
    #[error("object {object}")]
    Store {
        /// The object.
        object: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// No checkpoint was (completely) pushed there.
    #[error(
        "no checkpoint at {url}: object {object} does not exist (a push that did not finish writes none)"
    )]
    NoManifest {
        /// The location.
        url: String,
        /// The manifest object.
        object: String,
    },
    /// A request took too long.
    #[error("object {object}: the store did not answer in time")]
    Timeout {
        /// The object.
        object: String,
    },
    /// An object is larger than it may be.
    #[error("object {object} is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// The object.
        object: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A body came back shorter or longer than asked for.
    #[error("object {object}: got {got} bytes of a {want}-byte range (truncated body?)")]
    Short {
        /// The object.
        object: String,
        /// Bytes asked for.
        want: u64,
        /// Bytes received.
        got: u64,
    },
    /// An object's bytes are not what its name or the manifest says.
    #[error("object {object}: {what}")]
    Corrupt {
        /// The object.
        object: String,
        /// What is wrong.
        what: String,
    },
    /// The local checkpoint could not be opened.
    #[error(transparent)]
    Open(#[from] crate::OpenError),
    /// A disk image the checkpoint needs is missing or changed.
    #[error("{object} needs a backing disk image")]
    Disk {
        /// The manifest.
        object: String,
        /// Cause.
        #[source]
        source: crate::disk::DiskError,
    },
    /// Reading or writing a local file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The local checkpoint cannot be pushed as it is.
    #[error("checkpoint {path}: {what}")]
    Unpushable {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        what: String,
    },
}

impl RemoteError {
    /// A store error about `object`, with a missing manifest made plain.
    pub(crate) fn from_store(object: String, source: object_store::Error) -> Self {
        RemoteError::Store { object, source }
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| RemoteError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Fetch and check the manifest of the checkpoint at `store`'s location.
pub fn fetch_manifest(store: &Store) -> Result<manifest::Checked, RemoteError> {
    let key = store.url().key(manifest::MANIFEST_NAME);
    let object = store.object(&key);
    let bytes = match store.get_all(&key, manifest::MAX_MANIFEST_LEN) {
        Err(RemoteError::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => {
            return Err(RemoteError::NoManifest {
                url: store.url().to_string(),
                object,
            });
        }
        r => r?,
    };
    manifest::Manifest::decode(&bytes).map_err(|what| RemoteError::Corrupt { object, what })
}

/// xxh3-128 of the first `len` bytes of `file` (the manifest's whole-file
/// hash: what `push` records and `pull` checks).
fn file_hash(file: &std::fs::File, path: &std::path::Path, len: u64) -> Result<u128, RemoteError> {
    use std::os::unix::fs::FileExt;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(RemoteError::io(path))?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.digest128())
}

/// A progress bar over `len` packs labelled `what` (hidden unless `on`).
fn packs_bar(on: bool, len: u64, what: &'static str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} packs ({eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}
