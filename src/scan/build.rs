//! Building the content index of a checkpoint's disks.
//!
//! Disks no larger than [`ScanOptions::full_index_max_bytes`] in all get every
//! phase indexed. Larger ones start with the phases their structure implies
//! (always including 4 KiB alignment); while a disk is read, sampled guest
//! pages are looked for in the other phases, and a phase where one is found is
//! indexed from then on, and the part of the disk already read is read again
//! for it. So a disk is read once when its structure tells the truth, at most
//! twice otherwise.

use std::io;
use std::ops::Range;
use std::time::Instant;

use super::index::ContentIndex;
use super::phases::{PhaseSet, Sampler, structural};
use super::{CHUNK, ScanDisk, hash_sectors, window_key};
use crate::types::{DiskIndex, DiskOffset, PAGE_SIZE_U64, SECTOR_SIZE, SECTORS_PER_PAGE};

/// Windows an index is sized for up front (128 MiB of table).
const RESERVE_ALL_WINDOWS: u64 = (128 << 20) / 23;

/// How the disks are indexed.
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions {
    /// Index all eight phases when the disks hold at most this many bytes in all.
    pub full_index_max_bytes: u64,
    /// Guest pages sampled to find phases on larger disks.
    pub sample_pages: usize,
    /// Index exactly these phases on every disk, without detection (for
    /// experiments: `PhaseSet::ALIGNED` is format v1's scan).
    pub only_phases: Option<PhaseSet>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            full_index_max_bytes: 2 << 30,
            sample_pages: 4096,
            only_phases: None,
        }
    }
}

/// How one disk was indexed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiskScan {
    /// Phases indexed in the end (byte offsets mod 4096).
    pub phases: PhaseSet,
    /// Phases implied by the partition table and file systems.
    pub structural: PhaseSet,
    /// Phases found only through sampled guest pages.
    pub sampled: PhaseSet,
    /// Whether every phase was indexed because the disks are small.
    pub full: bool,
    /// Windows added to the index from this disk.
    pub windows: u64,
    /// Bytes read a second time for phases found by sampling.
    pub reread_bytes: u64,
}

/// How the index was built.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IndexReport {
    /// Per disk, in disk-table order.
    pub disks: Vec<DiskScan>,
    /// Windows in the index.
    pub windows: u64,
    /// Memory of the index table in bytes.
    pub memory_bytes: u64,
    /// Guest pages sampled (0 when every disk was fully indexed).
    pub sampled_pages: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// Index `disks` for finding the pages of `mem` (whose `holes` are zero).
pub fn build(
    disks: &[ScanDisk<'_>],
    mem: &[u8],
    holes: &[Range<u64>],
    opts: &ScanOptions,
    progress: &dyn Fn(u64),
) -> io::Result<(ContentIndex, IndexReport)> {
    let start = Instant::now();
    let total: u64 = disks.iter().map(|d| d.size()).sum();
    let full = total <= opts.full_index_max_bytes && opts.only_phases.is_none();
    let detect = !full && opts.only_phases.is_none();
    let mut sampler = detect.then(|| Sampler::new(mem, holes, opts.sample_pages));
    let initial: Vec<PhaseSet> = disks
        .iter()
        .map(|d| match (opts.only_phases, full) {
            (Some(p), _) => p,
            (None, true) => PhaseSet::ALL,
            (None, false) => structural(d).union(PhaseSet::ALIGNED),
        })
        .collect();
    let windows: u64 = disks
        .iter()
        .zip(&initial)
        .map(|(d, p)| d.size() / PAGE_SIZE_U64 * u64::from(p.count()))
        .sum();
    // Room for every window when that is at most 128 MiB of table (no
    // rehashing on small disks); otherwise an eighth (most large disks are
    // far from full) and the table doubles as it needs to.
    let reserve = if windows <= RESERVE_ALL_WINDOWS {
        windows
    } else {
        windows / 8
    };
    let mut index = ContentIndex::with_capacity(reserve);
    let mut report = IndexReport {
        sampled_pages: sampler.as_ref().map_or(0, |s| s.len() as u64),
        ..IndexReport::default()
    };
    for (i, (d, phases)) in disks.iter().zip(initial).enumerate() {
        let before = index.len() as u64;
        let mut scan = index_disk(&mut index, DiskIndex(i as u16), d, phases, sampler.as_mut())?;
        scan.full = full;
        scan.windows = index.len() as u64 - before;
        log::info!(
            "create: indexed {} (phases {}{}) : {} windows",
            d.image().path().display(),
            scan.phases,
            if scan.sampled.is_empty() {
                String::new()
            } else {
                format!(", {} found by sampling", scan.sampled)
            },
            scan.windows
        );
        report.disks.push(scan);
        progress(d.size());
    }
    report.windows = index.len() as u64;
    report.memory_bytes = index.memory_bytes();
    report.seconds = start.elapsed().as_secs_f64();
    Ok((index, report))
}

/// Index one disk: the phases in `phases`, plus those the sampler finds.
fn index_disk(
    index: &mut ContentIndex,
    disk_no: DiskIndex,
    disk: &ScanDisk<'_>,
    phases: PhaseSet,
    mut sampler: Option<&mut Sampler<'_>>,
) -> io::Result<DiskScan> {
    disk.advise_sequential();
    let mut scan = DiskScan {
        phases,
        structural: phases,
        ..DiskScan::default()
    };
    let mut redo_end = 0;
    let (mut h, mut z) = (Vec::new(), Vec::new());
    disk.for_each_chunk(disk.size(), |base, bytes| {
        hash_sectors(bytes, &mut h, &mut z);
        insert_windows(index, disk_no, base, &h, &z, scan.phases);
        let Some(sampler) = sampler.as_deref_mut() else {
            return Ok(());
        };
        for (s, &hash) in h.iter().enumerate().take(CHUNK / SECTOR_SIZE as usize) {
            let off = base + s as u64 * SECTOR_SIZE;
            if let Some(p) = sampler.check(disk, off, hash, scan.phases) {
                scan.phases.insert(p);
                scan.sampled.insert(p);
                redo_end = base + CHUNK as u64;
            }
        }
        Ok(())
    })?;
    if !scan.sampled.is_empty() {
        // Windows of the phases found late that lie in the part read before.
        disk.for_each_chunk(redo_end, |base, bytes| {
            hash_sectors(bytes, &mut h, &mut z);
            insert_windows(index, disk_no, base, &h, &z, scan.sampled);
            Ok(())
        })?;
        scan.reread_bytes = redo_end.min(disk.size());
    }
    disk.advise_random();
    Ok(scan)
}

/// Add the non-zero windows of `phases` that start in the chunk at `base`.
fn insert_windows(
    index: &mut ContentIndex,
    disk: DiskIndex,
    base: u64,
    hashes: &[u64],
    zero: &[bool],
    phases: PhaseSet,
) {
    let starts = (CHUNK / SECTOR_SIZE as usize).min(hashes.len());
    for s in 0..starts {
        let off = base + s as u64 * SECTOR_SIZE;
        if !phases.contains(PhaseSet::of(off)) || s + SECTORS_PER_PAGE > hashes.len() {
            continue;
        }
        if zero[s..s + SECTORS_PER_PAGE].iter().all(|&z| z) {
            continue;
        }
        let key = window_key(&hashes[s..s + SECTORS_PER_PAGE]);
        index.insert(key, disk, DiskOffset(off));
    }
}
