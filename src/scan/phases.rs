//! Which of a disk's eight 512-byte phases hold page-cache data.
//!
//! Two sources, both cheap:
//! - the disk's structure: every partition start (MBR, extended partitions,
//!   GPT; the whole disk when there is no table) and the block size of the
//!   file system there (ext2/3/4, XFS): data blocks sit at `start + k * bs`;
//! - a sample of guest pages ([`Sampler`]), each looked for through one of its
//!   sectors while the disk is read anyway, confirmed byte for byte.

use std::fmt;
use std::ops::Range;

use nohash_hasher::IntMap;

use super::{ScanDisk, is_zero, sector_hash};
use crate::types::{PAGE_SIZE, PAGE_SIZE_U64, SECTOR_SIZE, SECTORS_PER_PAGE};

const SECTOR: usize = SECTOR_SIZE as usize;

/// A set of phases: bit `i` stands for windows at offsets `512 * i` mod 4096.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseSet(pub u8);

impl PhaseSet {
    /// All eight phases.
    pub const ALL: PhaseSet = PhaseSet(0xff);
    /// Only 4 KiB-aligned windows.
    pub const ALIGNED: PhaseSet = PhaseSet(1);

    /// The phase of byte offset `offset` (which should be sector aligned).
    pub fn of(offset: u64) -> u8 {
        ((offset % PAGE_SIZE_U64) / SECTOR_SIZE) as u8
    }

    /// Whether phase `p` is in the set.
    pub fn contains(self, p: u8) -> bool {
        self.0 & (1 << p) != 0
    }

    /// Add phase `p`.
    pub fn insert(&mut self, p: u8) {
        self.0 |= 1 << p;
    }

    /// Number of phases.
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }

    /// True when empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Union.
    pub fn union(self, o: PhaseSet) -> PhaseSet {
        PhaseSet(self.0 | o.0)
    }
}

impl fmt::Display for PhaseSet {
    /// Byte offsets mod 4096, e.g. "0,1024,2048,3072".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = (0..8u8)
            .filter(|&p| self.contains(p))
            .map(|p| (u64::from(p) * SECTOR_SIZE).to_string())
            .collect();
        f.write_str(&v.join(","))
    }
}

impl serde::Serialize for PhaseSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

fn read(disk: &ScanDisk<'_>, offset: u64, len: usize) -> Option<Vec<u8>> {
    if offset.checked_add(len as u64)? > disk.size() {
        return None;
    }
    let mut buf = vec![0u8; len];
    disk.image().read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Most partitions followed (extended chains and GPT entries included).
const MAX_PARTITIONS: usize = 128;

/// Byte offsets where partitions start; `[0]` without a partition table.
pub fn partition_starts(disk: &ScanDisk<'_>) -> Vec<u64> {
    let Some(mbr) = read(disk, 0, SECTOR) else {
        return vec![0];
    };
    if mbr[510..512] != [0x55, 0xaa] {
        return vec![0];
    }
    let sectors = disk.size() / SECTOR_SIZE;
    let mut starts = Vec::new();
    for (kind, lba, _) in mbr_entries(&mbr, sectors) {
        match kind {
            0xee => starts.extend(gpt_starts(disk)),
            0x05 | 0x0f | 0x85 => starts.extend(logical_starts(disk, lba, sectors)),
            _ => starts.push(lba * SECTOR_SIZE),
        }
    }
    if starts.is_empty() {
        starts.push(0);
    }
    starts.truncate(MAX_PARTITIONS);
    starts
}

/// Plausible entries of an MBR or EBR: (type, first LBA, sector count).
fn mbr_entries(sector: &[u8], disk_sectors: u64) -> Vec<(u8, u64, u64)> {
    (0..4)
        .map(|i| &sector[446 + 16 * i..446 + 16 * (i + 1)])
        .filter(|e| e[0] == 0 || e[0] == 0x80)
        .map(|e| (e[4], le32(e, 8), le32(e, 12)))
        .filter(|&(kind, lba, n)| kind != 0 && n > 0 && lba > 0 && lba + n <= disk_sectors)
        .collect()
}

fn logical_starts(disk: &ScanDisk<'_>, ext_lba: u64, sectors: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut ebr = ext_lba;
    for _ in 0..MAX_PARTITIONS {
        let Some(s) = read(disk, ebr * SECTOR_SIZE, SECTOR) else {
            break;
        };
        if s[510..512] != [0x55, 0xaa] {
            break;
        }
        let e = mbr_entries(&s, sectors);
        let mut next = None;
        for (kind, lba, _) in e {
            match kind {
                0x05 | 0x0f | 0x85 => next = Some(ext_lba + lba),
                _ => out.push((ebr + lba) * SECTOR_SIZE),
            }
        }
        match next {
            Some(n) if n > ebr => ebr = n,
            _ => break,
        }
    }
    out
}

fn gpt_starts(disk: &ScanDisk<'_>) -> Vec<u64> {
    let Some(h) = read(disk, SECTOR_SIZE, SECTOR) else {
        return Vec::new();
    };
    if &h[..8] != b"EFI PART" {
        return Vec::new();
    }
    let (table_lba, count, size) = (le64(&h, 72), le32(&h, 80) as usize, le32(&h, 84) as usize);
    if !(128..=4096).contains(&size) {
        return Vec::new();
    }
    let count = count.min(MAX_PARTITIONS);
    let Some(t) = table_lba
        .checked_mul(SECTOR_SIZE)
        .and_then(|at| read(disk, at, count * size))
    else {
        return Vec::new();
    };
    t.chunks_exact(size)
        .filter(|e| e[..16].iter().any(|&b| b != 0))
        .map(|e| le64(e, 32).saturating_mul(SECTOR_SIZE))
        .filter(|&at| at > 0 && at < disk.size())
        .collect()
}

/// Block size of the file system starting at `start`, if it is one we know.
pub fn fs_block_size(disk: &ScanDisk<'_>, start: u64) -> Option<u64> {
    // ext2/3/4: superblock at +1024, magic 0xEF53 at +56, log2(bs/1024) at +24.
    if let Some(sb) = read(disk, start + 1024, 1024)
        && sb[56..58] == [0x53, 0xef]
    {
        let log = le32(&sb, 24);
        return (log <= 6).then_some(1024 << log);
    }
    // XFS: "XFSB" at +0, block size big-endian at +4.
    if let Some(sb) = read(disk, start, 8)
        && &sb[..4] == b"XFSB"
    {
        return Some(u64::from(u32::from_be_bytes(
            sb[4..8].try_into().expect("4 bytes"),
        )));
    }
    None
}

/// Phases of the data blocks of a file system of block size `bs` at `start`.
pub fn block_phases(start: u64, bs: u64) -> PhaseSet {
    let mut set = PhaseSet::default();
    set.insert(PhaseSet::of(start));
    if bs.is_multiple_of(SECTOR_SIZE) && bs > 0 && bs < PAGE_SIZE_U64 {
        for k in 0..PAGE_SIZE_U64 / bs {
            set.insert(PhaseSet::of(start + k * bs));
        }
    }
    set
}

/// The phases the disk's partition table and file systems imply.
pub fn structural(disk: &ScanDisk<'_>) -> PhaseSet {
    partition_starts(disk)
        .into_iter()
        .map(|start| block_phases(start, fs_block_size(disk, start).unwrap_or(PAGE_SIZE_U64)))
        .fold(PhaseSet::default(), PhaseSet::union)
}

/// Sampled guest pages, each findable through one of its non-zero sectors.
pub struct Sampler<'m> {
    mem: &'m [u8],
    /// Sector hash -> (page, index of that sector in the page).
    anchors: IntMap<u64, (u64, u8)>,
    /// Failed confirmations per page (a sector common to many disk places
    /// stops being tried after [`MAX_FAILS`]).
    fails: IntMap<u64, u8>,
}

/// Confirmations tried in vain before a sample is dropped.
const MAX_FAILS: u8 = 16;

impl<'m> Sampler<'m> {
    /// Up to `max` pages of `mem` spread evenly, skipping holes and zero pages.
    pub fn new(mem: &'m [u8], holes: &[Range<u64>], max: usize) -> Self {
        let pages = (mem.len() / PAGE_SIZE) as u64;
        let stride = (pages / max.max(1) as u64).max(1);
        let mut anchors = IntMap::default();
        for page in (0..pages).step_by(stride as usize) {
            if holes.iter().any(|h| h.contains(&page)) {
                continue;
            }
            let bytes = &mem[page as usize * PAGE_SIZE..][..PAGE_SIZE];
            let anchor = bytes
                .chunks_exact(SECTOR)
                .position(|s| !is_zero(s))
                .map(|k| (sector_hash(&bytes[k * SECTOR..][..SECTOR]), k as u8));
            if let Some((h, k)) = anchor {
                anchors.entry(h).or_insert((page, k));
            }
        }
        Sampler {
            mem,
            anchors,
            fails: IntMap::default(),
        }
    }

    /// Pages sampled.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// True when no page could be sampled.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The disk sector at `offset` hashes to `hash`: if a sampled page holds
    /// that sector and its window lies in a phase not in `active`, confirm the
    /// whole page against the disk and return that phase.
    pub fn check(
        &mut self,
        disk: &ScanDisk<'_>,
        offset: u64,
        hash: u64,
        active: PhaseSet,
    ) -> Option<u8> {
        let &(page, k) = self.anchors.get(&hash)?;
        let start = offset.checked_sub(u64::from(k) * SECTOR_SIZE)?;
        let phase = PhaseSet::of(start);
        if active.contains(phase) || self.fails.get(&page).is_some_and(|&n| n >= MAX_FAILS) {
            return None;
        }
        let mut buf = [0u8; PAGE_SIZE];
        let want = &self.mem[page as usize * PAGE_SIZE..][..PAGE_SIZE];
        if disk.window(start, &mut buf) == Some(want) {
            return Some(phase);
        }
        *self.fails.entry(page).or_default() += 1;
        None
    }
}

const _: () = assert!(SECTORS_PER_PAGE == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_sets_print_as_offsets() {
        assert_eq!(
            PhaseSet::ALL.to_string(),
            "0,512,1024,1536,2048,2560,3072,3584"
        );
        assert_eq!(block_phases(0, 1024).to_string(), "0,1024,2048,3072");
        assert_eq!(block_phases(63 * 512, 4096).to_string(), "3584");
        assert_eq!(block_phases(2048 * 512, 4096), PhaseSet::ALIGNED);
        assert_eq!(block_phases(63 * 512, 2048).to_string(), "1536,3584");
        assert_eq!(PhaseSet::of(32256), 7);
    }
}
