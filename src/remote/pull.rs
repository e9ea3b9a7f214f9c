//! `ckptfs pull s3://BUCKET/PREFIX VM.ckpt`: make a local checkpoint again.
//!
//! The manifest holds the checkpoint's bytes up to its blob section and its
//! VMM state; the packs hold its blobs. A pull fetches every pack (whole, in
//! parallel), checks each against its content hash, writes the blobs where
//! the blob section puts them, and checks the xxh3-128 of the whole file
//! against the one the push recorded before renaming it into place: the
//! result is byte for byte the file that was pushed. With the disk images at
//! hand it also writes the loading set (`VM.ckpt.ls`) again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use object_store::{ObjectStoreExt, path::Path as ObjPath};
use xxhash_rust::xxh3::xxh3_128;

use super::manifest::Checked;
use super::store::Store;
use super::{RemoteError, fetch_manifest};
use crate::atomic_file::AtomicFile;
use crate::checkpoint::{Checkpoint, OpenOptions};
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64};

/// Packs downloaded at once.
pub const PARALLEL_DOWNLOADS: usize = 8;

/// Options of [`pull`].
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Disk images to use instead of the recorded paths (for the loading set).
    pub disk_override: Option<Vec<PathBuf>>,
    /// Do not write the loading set.
    pub no_loading_set: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What a pull did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PullSummary {
    /// From where.
    pub url: String,
    /// The checkpoint written.
    pub path: String,
    /// Its size.
    pub file_bytes: u64,
    /// Packs fetched.
    pub packs: u64,
    /// Bytes downloaded (manifest and packs).
    pub bytes_downloaded: u64,
    /// The loading set written, if any.
    pub loading_set: Option<String>,
    /// A pushed loading set that was not written, and why.
    pub loading_set_warning: Option<String>,
    /// Wall time.
    pub seconds: f64,
}

/// Download the checkpoint at `store`'s location into `out`.
pub fn pull(store: &Store, out: &Path, opts: &PullOptions) -> Result<PullSummary, RemoteError> {
    let t0 = Instant::now();
    let checked = fetch_manifest(store)?;
    let m = &checked.manifest;
    let mut f = AtomicFile::create(out, crate::atomic_file::mode_from_inputs([0o600]))
        .map_err(RemoteError::io(out))?;
    f.file()
        .write_all_at(&m.front, 0)
        .map_err(RemoteError::io(out))?;
    let bar = super::packs_bar(opts.progress, m.packs.len() as u64, "pulling");
    let downloaded = write_blobs(store, &checked, f.file(), out, &bar)?;
    bar.finish_and_clear();
    let h = &checked.header;
    f.file()
        .write_all_at(&m.state, h.state_offset)
        .map_err(RemoteError::io(out))?;
    f.file().set_len(m.file_len).map_err(RemoteError::io(out))?;
    // The temporary file is open write-only: read it back by its name.
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(f.temp_name());
    let written = File::open(&tmp).map_err(RemoteError::io(&tmp))?;
    if super::file_hash(&written, out, m.file_len)? != m.file_hash {
        return Err(RemoteError::Corrupt {
            object: store.object(&store.url().key(super::manifest::MANIFEST_NAME)),
            what: "the rebuilt checkpoint's hash differs from the pushed one".into(),
        });
    }
    f.commit().map_err(RemoteError::io(out))?;
    let mut summary = PullSummary {
        url: store.url().to_string(),
        path: out.display().to_string(),
        file_bytes: m.file_len,
        packs: m.packs.len() as u64,
        bytes_downloaded: downloaded,
        ..PullSummary::default()
    };
    if !opts.no_loading_set {
        write_loading_set(&checked, out, opts, &mut summary);
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Fetch every pack, check it, and write its blobs; returns bytes fetched.
fn write_blobs(
    store: &Store,
    checked: &Checked,
    file: &File,
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<u64, RemoteError> {
    let m = &checked.manifest;
    let mut by_pack: Vec<Vec<(u32, u64)>> = vec![Vec::new(); m.packs.len()];
    for (b, s) in m.blobs.iter().enumerate() {
        by_pack[s.pack as usize].push((s.index, b as u64));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(PARALLEL_DOWNLOADS);
    let inner = store.inner().clone();
    let packs = m.packs.clone();
    store.handle().spawn(async move {
        let mut results = futures::stream::iter(packs.into_iter().enumerate())
            .map(|(k, p)| {
                let inner = inner.clone();
                async move {
                    let r = inner.get_range(&ObjPath::from(p.key()), 0..p.len()).await;
                    (k, r)
                }
            })
            .buffer_unordered(PARALLEL_DOWNLOADS);
        while let Some(r) = results.next().await {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    let mut total = 0u64;
    for _ in 0..m.packs.len() {
        let (k, r) = rx.blocking_recv().expect("a result for every pack");
        let rec = m.packs[k];
        let object = store.object(&rec.key());
        let data = r.map_err(|source| RemoteError::Store {
            object: object.clone(),
            source,
        })?;
        if data.len() as u64 != rec.len() || xxh3_128(&data) != rec.hash {
            return Err(RemoteError::Corrupt {
                object,
                what: "its bytes do not match its name (content hash)".into(),
            });
        }
        for &(index, b) in &by_pack[k] {
            let page = &data[index as usize * PAGE_SIZE..][..PAGE_SIZE];
            let at = checked.header.blobs_offset + b * PAGE_SIZE_U64;
            file.write_all_at(page, at).map_err(RemoteError::io(out))?;
        }
        total += data.len() as u64;
        bar.inc(1);
    }
    Ok(total)
}

fn write_loading_set(checked: &Checked, out: &Path, opts: &PullOptions, s: &mut PullSummary) {
    let Some(ls) = &checked.manifest.loading_set else {
        return;
    };
    let mut path = out.as_os_str().to_owned();
    path.push(".ls");
    let path = PathBuf::from(path);
    let open = OpenOptions {
        disk_override: opts.disk_override.clone(),
        ..OpenOptions::default()
    };
    let written = Checkpoint::open_with(out, &open)
        .map_err(|e| crate::checkpoint::error_chain(&e))
        .and_then(|ck| {
            let mode = crate::atomic_file::derived_mode(&[out]);
            crate::loadset::write(&path, &ck, &ls.runs, ls.window_ms, mode)
                .map_err(|e| crate::checkpoint::error_chain(&e))
        });
    match written {
        Ok(_) => s.loading_set = Some(path.display().to_string()),
        Err(why) => {
            log::warn!("pull: not writing the loading set: {why}");
            s.loading_set_warning = Some(why);
        }
    }
}
