//! The checkpoint-size floor, counted without ckptfs: how many pages of a raw
//! RAM dump are zero, equal to 4 KiB of a disk at some 512-byte-aligned offset,
//! or neither (the floor: what any checkpoint must store, counted once each).
//! Every 512-byte-aligned 4 KiB window of the (small) disks is indexed.

use std::collections::{HashMap, HashSet};

use xxhash_rust::xxh3::xxh3_64;

use super::guest::{Guest, SECTOR};

const PAGE: usize = 4096;

/// Every `step`-aligned 4 KiB window of some disks, by content hash; all-zero
/// windows are left out (zero pages are counted apart).
struct DiskIndex<'a> {
    disks: &'a [Vec<u8>],
    windows: HashMap<u64, (usize, usize)>,
}

impl<'a> DiskIndex<'a> {
    fn build(disks: &'a [Vec<u8>], step: usize) -> DiskIndex<'a> {
        let mut windows = HashMap::new();
        for (d, disk) in disks.iter().enumerate() {
            for off in (0..disk.len().saturating_sub(PAGE - 1)).step_by(step) {
                let w = &disk[off..off + PAGE];
                if !is_zero(w) {
                    windows.entry(xxh3_64(w)).or_insert((d, off));
                }
            }
        }
        DiskIndex { disks, windows }
    }

    /// The disk holding `page`'s bytes, compared byte for byte (not just hashed).
    fn find(&self, page: &[u8]) -> Option<usize> {
        let &(d, off) = self.windows.get(&xxh3_64(page))?;
        (self.disks[d][off..off + PAGE] == *page).then_some(d)
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// What a RAM dump holds, page by page.
#[derive(Debug, Default, serde::Serialize)]
pub struct Census {
    /// Pages of guest RAM.
    pub pages: u64,
    /// All-zero pages.
    pub zero: u64,
    /// Non-zero pages equal to a disk window at a 512-byte-aligned offset, per disk.
    pub on_disk_512: Vec<u64>,
    /// The same at 4 KiB-aligned offsets only (what format v1 references), per disk.
    pub on_disk_4k: Vec<u64>,
    /// The floor: distinct non-zero pages found on no disk at any 512-byte offset.
    pub floor_pages: u64,
    /// Distinct non-zero pages on no disk at a 4 KiB-aligned offset (format v1's floor).
    pub floor_pages_4k: u64,
    /// Per file system (by guest device): pages of its files, and how many of
    /// them are in guest RAM (the guest's page cache; a partial last page is
    /// zero-filled past the end of the file, as the page cache holds it).
    pub file_pages: Vec<FilePages>,
}

/// Pages of one file system's files, and how many sit in guest RAM.
#[derive(Debug, serde::Serialize)]
pub struct FilePages {
    pub dev: &'static str,
    pub total: u64,
    pub in_ram: u64,
}

impl Census {
    /// Count `ram` (a raw dump) against `guest`'s disks and files.
    pub fn of(ram: &[u8], guest: &Guest) -> Census {
        let disks: Vec<Vec<u8>> = guest
            .disks
            .iter()
            .map(|d| std::fs::read(d).unwrap())
            .collect();
        let any = DiskIndex::build(&disks, SECTOR as usize);
        let aligned = DiskIndex::build(&disks, PAGE);
        let files = FileIndex::of(guest);
        let mut c = Census {
            on_disk_512: vec![0; disks.len()],
            on_disk_4k: vec![0; disks.len()],
            ..Census::default()
        };
        let (mut floor, mut floor_4k) = (HashSet::new(), HashSet::new());
        let mut file_pages_seen = HashSet::new();
        for page in ram.chunks_exact(PAGE) {
            c.pages += 1;
            if is_zero(page) {
                c.zero += 1;
                continue;
            }
            let h = xxh3_64(page);
            match any.find(page) {
                Some(d) => c.on_disk_512[d] += 1,
                None => {
                    floor.insert(h);
                }
            }
            match aligned.find(page) {
                Some(d) => c.on_disk_4k[d] += 1,
                None => {
                    floor_4k.insert(h);
                }
            }
            if files.pages.contains_key(&h) {
                file_pages_seen.insert(h);
            }
        }
        c.floor_pages = floor.len() as u64;
        c.floor_pages_4k = floor_4k.len() as u64;
        c.file_pages = files.count(&file_pages_seen);
        c
    }

    /// Non-zero pages found on some disk at a 512-byte-aligned offset.
    pub fn on_disk_512_total(&self) -> u64 {
        self.on_disk_512.iter().sum()
    }

    /// Non-zero pages found on some disk at a 4 KiB-aligned offset.
    pub fn on_disk_4k_total(&self) -> u64 {
        self.on_disk_4k.iter().sum()
    }

    /// (pages of file data, of them in guest RAM) for the file system on `dev`.
    pub fn files_on(&self, dev: &str) -> (u64, u64) {
        let f = self.file_pages.iter().find(|f| f.dev == dev).unwrap();
        (f.total, f.in_ram)
    }
}

/// The hashes of every page of the guest's files, by file system.
struct FileIndex {
    pages: HashMap<u64, &'static str>,
    totals: Vec<(&'static str, u64)>,
}

impl FileIndex {
    fn of(guest: &Guest) -> FileIndex {
        let mut pages = HashMap::new();
        let mut totals = Vec::new();
        for p in &guest.placed {
            let dev = p.fs.mount.dev;
            let mut total = 0;
            for f in guest.files_of(p.fs) {
                for chunk in f.data.chunks(PAGE) {
                    let mut page = chunk.to_vec();
                    page.resize(PAGE, 0);
                    pages.insert(xxh3_64(&page), dev);
                    total += 1;
                }
            }
            totals.push((dev, total));
        }
        FileIndex { pages, totals }
    }

    fn count(&self, seen: &HashSet<u64>) -> Vec<FilePages> {
        self.totals
            .iter()
            .map(|&(dev, total)| FilePages {
                dev,
                total,
                in_ram: seen.iter().filter(|h| self.pages[h] == dev).count() as u64,
            })
            .collect()
    }
}
