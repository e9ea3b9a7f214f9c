//! The content index: window key -> where the window is (disk, sector).
//!
//! A flat open-addressing table of 16-byte slots (key, location) with linear
//! probing, kept at most 70 % full: about 23 bytes a window, so indexing one
//! phase of a 1 GiB disk (262,144 windows) takes about 6 MiB and all eight
//! about 46 MiB. The first window seen with a key keeps it (a disk's repeated
//! blocks are indexed once). Keys are 64-bit hashes; a match is always
//! confirmed byte for byte by the caller.

use crate::types::{DiskIndex, DiskOffset, SECTOR_SIZE};

/// A slot's location when it is empty.
const EMPTY: u64 = u64::MAX;
/// Fullest the table gets before it doubles.
const MAX_LOAD: f64 = 0.7;
const DISK_SHIFT: u32 = 48;

/// Key -> (disk, sector) for the indexed windows of every disk.
#[derive(Debug, Default)]
pub struct ContentIndex {
    slots: Vec<[u64; 2]>,
    len: usize,
}

/// A window's place: disk and sector packed into one word.
fn pack(disk: DiskIndex, offset: DiskOffset) -> u64 {
    (u64::from(disk.0) << DISK_SHIFT) | (offset.0 / SECTOR_SIZE)
}

fn unpack(v: u64) -> (DiskIndex, DiskOffset) {
    (
        DiskIndex((v >> DISK_SHIFT) as u16),
        DiskOffset((v & ((1 << DISK_SHIFT) - 1)) * SECTOR_SIZE),
    )
}

impl ContentIndex {
    /// An index sized for about `windows` entries without growing.
    pub fn with_capacity(windows: u64) -> Self {
        let slots = ((windows as f64 / MAX_LOAD) as usize).max(16);
        ContentIndex {
            slots: vec![[0, EMPTY]; slots],
            len: 0,
        }
    }

    /// Windows indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the table holds.
    pub fn memory_bytes(&self) -> u64 {
        (self.slots.len() * size_of::<[u64; 2]>()) as u64
    }

    fn home(&self, key: u64) -> usize {
        // Multiply-shift maps the key onto the table without a power-of-two size.
        ((u128::from(key) * self.slots.len() as u128) >> 64) as usize
    }

    /// Index the window at (`disk`, `offset`) under `key`, unless the key is
    /// already there (the first window with given bytes wins).
    pub fn insert(&mut self, key: u64, disk: DiskIndex, offset: DiskOffset) {
        if (self.len + 1) as f64 > self.slots.len() as f64 * MAX_LOAD {
            self.grow();
        }
        let loc = pack(disk, offset);
        let n = self.slots.len();
        let mut i = self.home(key);
        loop {
            let slot = &mut self.slots[i];
            if slot[1] == EMPTY {
                *slot = [key, loc];
                self.len += 1;
                return;
            }
            if slot[0] == key {
                return;
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// Where a window with `key` is, if one is indexed.
    pub fn get(&self, key: u64) -> Option<(DiskIndex, DiskOffset)> {
        if self.slots.is_empty() {
            return None;
        }
        let n = self.slots.len();
        let mut i = self.home(key);
        loop {
            let [k, loc] = self.slots[i];
            if loc == EMPTY {
                return None;
            }
            if k == key {
                return Some(unpack(loc));
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        *self = ContentIndex {
            slots: vec![[0, EMPTY]; (old.len() * 2).max(16)],
            len: 0,
        };
        for [k, loc] in old.into_iter().filter(|s| s[1] != EMPTY) {
            let (d, o) = unpack(loc);
            self.insert(k, d, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_window_wins_and_misses_are_none() {
        let mut ix = ContentIndex::with_capacity(4);
        ix.insert(7, DiskIndex(1), DiskOffset(512));
        ix.insert(7, DiskIndex(0), DiskOffset(0));
        ix.insert(9, DiskIndex(2), DiskOffset(1 << 40));
        assert_eq!(ix.get(7), Some((DiskIndex(1), DiskOffset(512))));
        assert_eq!(ix.get(9), Some((DiskIndex(2), DiskOffset(1 << 40))));
        assert_eq!(ix.get(8), None);
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn grows_past_its_capacity_and_keeps_everything() {
        let mut ix = ContentIndex::with_capacity(0);
        for k in 0..10_000u64 {
            ix.insert(
                k.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                DiskIndex(0),
                DiskOffset(k * 512),
            );
        }
        assert_eq!(ix.len(), 10_000);
        for k in 0..10_000u64 {
            let got = ix.get(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(got, Some((DiskIndex(0), DiskOffset(k * 512))));
        }
        assert!(ix.memory_bytes() >= 10_000 * 16);
        assert_eq!(ContentIndex::default().get(1), None);
    }
}
