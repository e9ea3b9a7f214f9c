//! `verify` and `inspect`: rebuild every page and check it, or summarize a checkpoint.

use crate::checkpoint::{Checkpoint, Missing, error_chain};
use crate::format::{DiskFormat, Location, ParentRecord};
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64, PageIndex};

/// Pages per read while verifying (1 MiB).
const CHUNK_PAGES: u64 = 256;
/// Bad pages listed in a report at most.
pub const MAX_LISTED: usize = 16;

/// One page that failed verification.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BadPage {
    /// Page index.
    pub page: u64,
    /// What is wrong.
    pub problem: String,
}

/// Result of [`verify`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Pages checked.
    pub pages: u64,
    /// Pages that failed (CRC, source read, invalid entry, or differing from the dump).
    pub bad_pages: u64,
    /// The first [`MAX_LISTED`] bad pages.
    pub first_bad: Vec<BadPage>,
    /// Whether the rebuilt memory was compared with an original dump.
    pub compared_with_dump: bool,
    /// Checkpoint files the pages were rebuilt from (itself and its ancestors).
    pub chain_files: usize,
}

impl VerifyReport {
    /// True when every page checked out.
    pub fn ok(&self) -> bool {
        self.bad_pages == 0
    }

    fn record(&mut self, page: u64, problem: String) {
        log::debug!("verify: page {page}: {problem}");
        self.bad_pages += 1;
        if self.first_bad.len() < MAX_LISTED {
            self.first_bad.push(BadPage { page, problem });
        }
    }
}

/// Rebuild every page of `ck`, check its CRC, and, given `dump` (the original
/// raw memory), compare byte for byte. `progress` is called with pages done.
pub fn verify(ck: &Checkpoint, dump: Option<&[u8]>, mut progress: impl FnMut(u64)) -> VerifyReport {
    let pages = ck.page_count();
    let mut report = VerifyReport {
        pages,
        compared_with_dump: dump.is_some(),
        chain_files: 1 + ck.ancestors().len(),
        ..Default::default()
    };
    if let Some(d) = dump
        && d.len() as u64 != ck.guest_size()
    {
        report.record(
            0,
            format!(
                "dump is {} bytes, checkpoint guest memory is {}",
                d.len(),
                ck.guest_size()
            ),
        );
        return report;
    }
    ck.advise_reading_all();
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let n = CHUNK_PAGES.min(pages - first);
        let out = &mut buf[..n as usize * PAGE_SIZE];
        if ck.read_pages(PageIndex(first), out).is_err() {
            // Find every bad page of the chunk, one page at a time.
            for p in first..first + n {
                let page_buf = &mut out[(p - first) as usize * PAGE_SIZE..][..PAGE_SIZE];
                if let Err(e) = ck.read_pages(PageIndex(p), page_buf) {
                    report.record(p, error_chain(&e));
                    page_buf.fill(0);
                }
            }
        }
        if let Some(d) = dump {
            compare(
                &mut report,
                first,
                out,
                &d[(first * PAGE_SIZE_U64) as usize..][..out.len()],
            );
        }
        first += n;
        progress(first);
    }
    report
}

fn compare(report: &mut VerifyReport, first: u64, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let listed: Vec<u64> = report.first_bad.iter().map(|b| b.page).collect();
    for (k, (g, w)) in got
        .chunks_exact(PAGE_SIZE)
        .zip(want.chunks_exact(PAGE_SIZE))
        .enumerate()
    {
        let page = first + k as u64;
        if g != w && !listed.contains(&page) {
            report.record(page, "rebuilt bytes differ from the memory dump".into());
        }
    }
}

/// A disk image as `inspect` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DiskInfo {
    /// Recorded path.
    pub path: String,
    /// Container format.
    pub format: DiskFormat,
    /// Size in bytes (of the disk as the guest sees it).
    pub size: u64,
    /// Pages of this checkpoint whose entry references this disk.
    pub pages: u64,
    /// Why the image cannot be used, if it cannot (missing, changed, ...).
    pub missing: Option<String>,
}

/// A parent checkpoint as `inspect` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ParentInfo {
    /// Recorded path.
    pub path: String,
    /// Its file size in bytes.
    pub size: u64,
    /// Its identity, hex.
    pub identity: String,
    /// Pages of this checkpoint whose entry is PARENT of this parent.
    pub pages: u64,
    /// Why the parent cannot be used, if it cannot.
    pub missing: Option<String>,
}

/// Page-table entries of one file, by kind, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoredKinds {
    /// ZERO entries.
    pub zero: u64,
    /// DISK entries.
    pub disk: u64,
    /// BLOB entries.
    pub blob: u64,
    /// PARENT entries.
    pub parent: u64,
}

/// One checkpoint file of a chain (the checkpoint itself, or an ancestor) as
/// `inspect` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChainLink {
    /// Path of the file.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its identity, hex.
    pub identity: String,
    /// Its page-table entries by kind.
    pub stored: StoredKinds,
    /// Blobs its blob section holds.
    pub blobs_stored: u64,
    /// Links (indices into [`Inspection::chain`]) of its parents, in its parent
    /// table's order (None: a parent that could not be opened).
    pub parents: Vec<Option<usize>>,
    /// Pages of the inspected checkpoint whose bytes this file gives: following
    /// PARENT entries from the checkpoint, the walk ends at this file's entry.
    pub holds: u64,
}

/// What `inspect` shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Inspection {
    /// Checkpoint path.
    pub path: String,
    /// Format version.
    pub version: u32,
    /// Guest memory size in bytes.
    pub guest_bytes: u64,
    /// Guest pages.
    pub pages: u64,
    /// ZERO entries.
    pub zero_pages: u64,
    /// DISK entries.
    pub disk_pages: u64,
    /// BLOB entries (including duplicates).
    pub blob_pages: u64,
    /// PARENT entries.
    pub parent_pages: u64,
    /// Distinct blobs stored.
    pub blobs_stored: u64,
    /// VMM-state bytes.
    pub vmm_state_bytes: u64,
    /// Checkpoint file size.
    pub checkpoint_bytes: u64,
    /// checkpoint_bytes / guest_bytes.
    pub size_ratio: f64,
    /// Backing disks (this checkpoint's disk table).
    pub disks: Vec<DiskInfo>,
    /// Parent checkpoints (its parent table).
    pub parents: Vec<ParentInfo>,
    /// Invalid page-table entries (should be 0).
    pub invalid_entries: u64,
    /// The checkpoint and its ancestors, the checkpoint first (one link for a
    /// checkpoint without parents).
    pub chain: Vec<ChainLink>,
    /// Pages whose walk down the chain ends at a parent that could not be opened.
    pub unresolved_pages: u64,
}

impl Inspection {
    /// Whether every disk and parent is usable and every entry valid.
    pub fn ok(&self) -> bool {
        self.invalid_entries == 0
            && self.disks.iter().all(|d| d.missing.is_none())
            && self.parents.iter().all(|p| p.missing.is_none())
    }
}

fn missing_reason(missing: &[Missing], what: &str, path: &std::path::Path) -> Option<String> {
    missing
        .iter()
        .find(|m| m.what == what && m.path == path)
        .map(|m| m.reason.clone())
}

/// Summarize `ck` by walking its page table (entries as stored: a PARENT entry
/// counts as PARENT). Open it with [`crate::OpenOptions::allow_missing`] to
/// see a checkpoint whose disks or parents are missing.
pub fn inspect(ck: &Checkpoint) -> Inspection {
    let mut disks: Vec<DiskInfo> = ck
        .disk_records()
        .iter()
        .map(|r| DiskInfo {
            path: r.path.display().to_string(),
            format: r.format,
            size: r.size,
            pages: 0,
            missing: missing_reason(ck.missing(), "disk image", &r.path),
        })
        .collect();
    let mut parents: Vec<ParentInfo> = ck
        .parent_records()
        .iter()
        .map(|r| ParentInfo {
            path: r.path.display().to_string(),
            size: r.size,
            identity: format!("{:016x}", r.identity),
            pages: 0,
            missing: missing_reason(ck.missing(), "parent checkpoint", &r.path),
        })
        .collect();
    let mut ins = Inspection {
        path: ck.path().display().to_string(),
        version: crate::format::VERSION,
        guest_bytes: ck.guest_size(),
        pages: ck.page_count(),
        blobs_stored: ck.header().blob_count,
        vmm_state_bytes: ck.vmm_state().len() as u64,
        checkpoint_bytes: ck.file_size(),
        ..Default::default()
    };
    for p in 0..ck.page_count() {
        let stored = ck.stored_entry(PageIndex(p)).map(|(loc, _)| loc);
        // A PARENT entry of a missing parent cannot resolve, but is not invalid.
        let parent_missing = matches!(stored, Ok(Location::Parent(i))
            if parents.get(usize::from(i.0)).is_some_and(|p| p.missing.is_some()));
        if !parent_missing && ck.try_entry(PageIndex(p)).is_err() {
            ins.invalid_entries += 1;
            continue;
        }
        match stored {
            Ok(Location::Zero) => ins.zero_pages += 1,
            Ok(Location::Disk(d, _)) => {
                ins.disk_pages += 1;
                disks[usize::from(d.0)].pages += 1;
            }
            Ok(Location::Blob(_)) => ins.blob_pages += 1,
            Ok(Location::Parent(i)) => {
                ins.parent_pages += 1;
                parents[usize::from(i.0)].pages += 1;
            }
            Err(_) => ins.invalid_entries += 1,
        }
    }
    ins.disks = disks;
    ins.parents = parents;
    ins.size_ratio = ins.checkpoint_bytes as f64 / ins.guest_bytes.max(1) as f64;
    let own = StoredKinds {
        zero: ins.zero_pages,
        disk: ins.disk_pages,
        blob: ins.blob_pages,
        parent: ins.parent_pages,
    };
    (ins.chain, ins.unresolved_pages) = chain(ck, own);
    ins
}

/// A file of the chain: the checkpoint (`None`) or an ancestor.
fn link_entry(ck: &Checkpoint, link: usize, page: PageIndex) -> Option<Location> {
    match link {
        0 => ck.stored_entry(page).ok().map(|(loc, _)| loc),
        a => ck.ancestors()[a - 1].stored_entry(page).map(|(loc, _)| loc),
    }
}

/// The chain's links, and how many pages of `ck` each one holds (walking the
/// PARENT entries page by page: `inspect` only, reads never do this).
fn chain(ck: &Checkpoint, own: StoredKinds) -> (Vec<ChainLink>, u64) {
    let ancestors = ck.ancestors();
    let find = |r: &ParentRecord| {
        ancestors
            .iter()
            .position(|a| a.path() == r.path && a.identity() == r.identity)
            .map(|a| a + 1)
    };
    let mut links = vec![ChainLink {
        path: ck.path().display().to_string(),
        size: ck.file_size(),
        identity: format!("{:016x}", ck.identity()),
        stored: own,
        blobs_stored: ck.header().blob_count,
        parents: ck.parent_records().iter().map(find).collect(),
        holds: 0,
    }];
    for (i, a) in ancestors.iter().enumerate() {
        let mut stored = StoredKinds::default();
        for p in 0..a.header().page_count {
            match link_entry(ck, i + 1, PageIndex(p)) {
                Some(Location::Zero) => stored.zero += 1,
                Some(Location::Disk(..)) => stored.disk += 1,
                Some(Location::Blob(_)) => stored.blob += 1,
                Some(Location::Parent(_)) => stored.parent += 1,
                None => {}
            }
        }
        links.push(ChainLink {
            path: a.path().display().to_string(),
            size: a.file_size(),
            identity: format!("{:016x}", a.identity()),
            stored,
            blobs_stored: a.header().blob_count,
            parents: a.parent_records().iter().map(find).collect(),
            holds: 0,
        });
    }
    let mut unresolved = 0;
    for p in 0..ck.page_count() {
        match holder(ck, &links, PageIndex(p)) {
            Some(link) => links[link].holds += 1,
            None => unresolved += 1,
        }
    }
    (links, unresolved)
}

/// The link whose entry gives `page`'s bytes, or None if the walk ends at a
/// parent that is missing or an invalid entry.
fn holder(ck: &Checkpoint, links: &[ChainLink], page: PageIndex) -> Option<usize> {
    let mut link = 0;
    for _ in 0..=crate::checkpoint::MAX_PARENT_DEPTH {
        match link_entry(ck, link, page)? {
            Location::Parent(i) => link = (*links[link].parents.get(usize::from(i.0))?)?,
            _ => return Some(link),
        }
    }
    None
}
