//! `flatten`: a self-contained copy of a checkpoint that has parents.
//!
//! Every page keeps its bytes and its CRC; what changes is where they live.
//! A PARENT entry is replaced by what it resolves to ([`crate::PageSource`]):
//! ZERO stays ZERO, a disk reference is copied (the disk table keeps only the
//! disks some page still references, renumbered), and a blob of this file or
//! of any ancestor is copied into the new blob section, once per source blob
//! (so blobs no page references any more are dropped). The parent table is
//! empty and the VMM state is copied, so the result opens without any other
//! checkpoint and restores the same guest.
//!
//! Every copied blob is read through [`Checkpoint::read_pages`], which checks
//! its CRC: a damaged ancestor fails the flatten naming the page, it never
//! yields a file with wrong bytes. Disk pages are not read (the disks stay
//! needed; `ckptfs verify` reads them). The output is written like `create`'s:
//! a temporary file renamed into place when complete, with permission bits no
//! wider than those of the checkpoint and its ancestors.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::atomic_file::{self, AtomicFile, OutputError};
use crate::checkpoint::{Checkpoint, PageSource, ReadError};
use crate::format::{CheckpointWriter, DiskRecord, Location};
use crate::types::{BlobIndex, DiskIndex, PAGE_SIZE, PageIndex};

/// Pages between two progress updates (64 MiB of guest memory).
const PROGRESS_PAGES: u64 = 16384;

/// What a flatten did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FlattenSummary {
    /// The checkpoint flattened.
    pub source: String,
    /// Checkpoint files it was made of (itself and its ancestors).
    pub chain_files: usize,
    /// Guest pages.
    pub pages: u64,
    /// ZERO pages.
    pub zero_pages: u64,
    /// DISK pages.
    pub disk_pages: u64,
    /// BLOB pages (including duplicates).
    pub blob_pages: u64,
    /// Blobs stored in the new file.
    pub blobs_stored: u64,
    /// Of those, blobs copied from ancestors (the rest from the checkpoint itself).
    pub blobs_from_ancestors: u64,
    /// Disk images the new file references.
    pub disks: usize,
    /// Size of the new file in bytes.
    pub checkpoint_bytes: u64,
    /// Permission bits it was given.
    pub mode: u32,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Errors from [`flatten`], one per step.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The output is the checkpoint or one of its ancestors.
    #[error("output {0} is the checkpoint or one of its parents; refusing to overwrite it")]
    OutputIsInput(PathBuf),
    /// A page could not be resolved or read (the cause names the page).
    #[error("flattening checkpoint {path}")]
    Page {
        /// The checkpoint flattened.
        path: PathBuf,
        /// The page.
        page: PageIndex,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// Writing the output file failed.
    #[error(transparent)]
    Output(#[from] crate::atomic_file::OutputError),
}

/// Write a self-contained copy of `ck` (open, parents resolved) to `out`.
/// With `progress`, a bar on stderr counts guest bytes.
pub fn flatten(
    ck: &Checkpoint,
    out: &Path,
    progress: bool,
) -> Result<FlattenSummary, FlattenError> {
    let start = Instant::now();
    refuse_inputs(ck, out)?;
    ck.advise_reading_all();
    let (disk_map, records) = used_disks(ck)?;
    let modes = std::iter::once(ck.file_mode()).chain(ck.ancestors().iter().map(|a| a.file_mode()));
    let mode = atomic_file::mode_from_inputs(modes);
    let mut file =
        AtomicFile::create(out, mode).map_err(OutputError::at(out, OutputError::temp_file))?;
    let bar = progress_bar(progress, ck.page_count());
    let mut s = FlattenSummary {
        source: ck.path().display().to_string(),
        chain_files: 1 + ck.ancestors().len(),
        pages: ck.page_count(),
        disks: records.len(),
        mode,
        ..FlattenSummary::default()
    };
    let written = copy_pages(ck, &disk_map, &records, file.file(), &mut s, &bar);
    bar.finish_and_clear();
    s.checkpoint_bytes = written?.map_err(OutputError::at(out, OutputError::write))?;
    file.sync()
        .map_err(OutputError::at(out, OutputError::fsync))?;
    file.commit()
        .map_err(OutputError::at(out, OutputError::rename))?;
    s.seconds = start.elapsed().as_secs_f64();
    log::info!(
        "flatten: {} -> {}: {} files into one, {} blobs ({} from ancestors), {} bytes in {:.2}s",
        ck.path().display(),
        out.display(),
        s.chain_files,
        s.blobs_stored,
        s.blobs_from_ancestors,
        s.checkpoint_bytes,
        s.seconds
    );
    Ok(s)
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Replacing the checkpoint or an ancestor while reading it would lose pages.
fn refuse_inputs(ck: &Checkpoint, out: &Path) -> Result<(), FlattenError> {
    let inputs = std::iter::once(ck.path()).chain(ck.ancestors().iter().map(|a| a.path()));
    for p in inputs {
        if same_file(p, out) {
            return Err(FlattenError::OutputIsInput(p.to_owned()));
        }
    }
    Ok(())
}

fn page_err(ck: &Checkpoint, page: PageIndex) -> impl FnOnce(ReadError) -> FlattenError + '_ {
    move |source| FlattenError::Page {
        path: ck.path().to_owned(),
        page,
        source,
    }
}

/// The disks some page references, renumbered in order of first use.
fn used_disks(
    ck: &Checkpoint,
) -> Result<(HashMap<DiskIndex, DiskIndex>, Vec<DiskRecord>), FlattenError> {
    let mut map = HashMap::new();
    let mut records = Vec::new();
    for p in 0..ck.page_count() {
        let page = PageIndex(p);
        let entry = ck.try_entry(page).map_err(page_err(ck, page))?;
        if let PageSource::Disk { disk, .. } = entry.source
            && !map.contains_key(&disk)
        {
            let record = ck
                .disk_record(disk)
                .expect("try_entry checked the disk index");
            map.insert(disk, DiskIndex(records.len() as u16));
            records.push(record.clone());
        }
    }
    Ok((map, records))
}

/// A blob of the checkpoint (`None`) or of one of its ancestors.
type BlobKey = (Option<u16>, u64);

/// Stream every page into `file`; the outer error is a page that cannot be
/// copied, the inner one a write that failed. Returns the file's size.
fn copy_pages(
    ck: &Checkpoint,
    disk_map: &HashMap<DiskIndex, DiskIndex>,
    records: &[DiskRecord],
    file: &mut std::fs::File,
    s: &mut FlattenSummary,
    bar: &indicatif::ProgressBar,
) -> Result<io::Result<u64>, FlattenError> {
    let mut w = match CheckpointWriter::new(file, ck.page_count(), records, &[]) {
        Ok(w) => w,
        Err(e) => return Ok(Err(e)),
    };
    let mut copied: HashMap<BlobKey, (BlobIndex, u32)> = HashMap::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..ck.page_count() {
        let page = PageIndex(p);
        let entry = ck.try_entry(page).map_err(page_err(ck, page))?;
        let key = match entry.source {
            PageSource::Zero => {
                s.zero_pages += 1;
                w.push(Location::Zero, entry.crc);
                continue;
            }
            PageSource::Disk { disk, offset } => {
                s.disk_pages += 1;
                w.push(Location::Disk(disk_map[&disk], offset), entry.crc);
                continue;
            }
            PageSource::Blob(b) => (None, b.0),
            PageSource::ParentBlob { ancestor, blob } => (Some(ancestor.0), blob.0),
        };
        s.blob_pages += 1;
        let blob = match copied.get(&key) {
            // Same source blob, same CRC: the bytes were checked when first copied.
            Some(&(b, crc)) if crc == entry.crc => b,
            _ => {
                ck.read_pages(page, &mut buf).map_err(page_err(ck, page))?;
                let b = match w.push_blob(&buf) {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                copied.entry(key).or_insert((b, entry.crc));
                s.blobs_stored += 1;
                s.blobs_from_ancestors += u64::from(key.0.is_some());
                b
            }
        };
        w.push(Location::Blob(blob), entry.crc);
        if p % PROGRESS_PAGES == PROGRESS_PAGES - 1 {
            bar.inc(PROGRESS_PAGES);
        }
    }
    Ok(w.finish(ck.vmm_state()).map(|h| h.file_len()))
}

fn progress_bar(progress: bool, pages: u64) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(pages);
    let style = indicatif::ProgressStyle::with_template(
        "flattening [{bar:40}] {pos}/{len} pages {per_sec} eta {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, PageSet};

    fn read_all(ck: &Checkpoint) -> Vec<u8> {
        let mut out = vec![0u8; ck.guest_size() as usize];
        ck.read_pages(PageIndex(0), &mut out).unwrap();
        out
    }

    #[test]
    fn a_chain_flattens_to_the_same_pages_without_parents() {
        let dir = tempfile::tempdir().unwrap();
        let disk: Vec<u8> = (0..16 * 4096).map(|i| (i / 5) as u8).collect();
        std::fs::write(dir.path().join("disk"), &disk).unwrap();
        let mut mem = vec![0u8; 8 * 4096];
        mem[4096..8192].copy_from_slice(&disk[..4096]);
        mem[2 * 4096..3 * 4096].fill(7);
        mem[3 * 4096..4 * 4096].fill(7);
        mem[4 * 4096..5 * 4096].fill(9);
        let base = dir.path().join("base.ckpt");
        let opts = CreateOptions {
            disks: vec![dir.path().join("disk")],
            scan_disks: true,
            ..Default::default()
        };
        crate::create(&mem, &opts, &base).unwrap();
        // The child changes page 4 and leaves its other pages to the parent.
        mem[4 * 4096..5 * 4096].fill(3);
        let mut changed = PageSet::new(8);
        changed.insert(PageIndex(4));
        let child = dir.path().join("child.ckpt");
        let opts = CreateOptions {
            parent: Some(base.clone()),
            changed: Some(changed),
            ..Default::default()
        };
        crate::create(&mem, &opts, &child).unwrap();
        let ck = Checkpoint::open(&child).unwrap();
        let flat = dir.path().join("flat.ckpt");
        let s = flatten(&ck, &flat, false).unwrap();
        assert_eq!((s.zero_pages, s.disk_pages, s.blob_pages), (4, 1, 3));
        // Pages 2 and 3 share one blob of the parent; page 4's is the child's.
        assert_eq!((s.blobs_stored, s.blobs_from_ancestors, s.disks), (2, 1, 1));
        let f = Checkpoint::open(&flat).unwrap();
        assert!(f.parent_records().is_empty() && f.ancestors().is_empty());
        assert_eq!(read_all(&f), mem);
        assert_eq!(f.vmm_state(), ck.vmm_state());
        // Without its parent, the flattened file still opens; the child does not.
        std::fs::remove_file(&base).unwrap();
        assert_eq!(read_all(&Checkpoint::open(&flat).unwrap()), mem);
        assert!(Checkpoint::open(&child).is_err());
    }

    #[test]
    fn the_output_may_not_be_the_checkpoint_or_a_parent() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ckpt");
        crate::create(&[1u8; 4096], &CreateOptions::default(), &base).unwrap();
        let child = dir.path().join("child.ckpt");
        let opts = CreateOptions {
            parent: Some(base.clone()),
            ..Default::default()
        };
        crate::create(&[1u8; 4096], &opts, &child).unwrap();
        let ck = Checkpoint::open(&child).unwrap();
        for out in [&base, &child] {
            let e = flatten(&ck, out, false).unwrap_err();
            assert!(matches!(e, FlattenError::OutputIsInput(_)), "{e}");
        }
    }
}
