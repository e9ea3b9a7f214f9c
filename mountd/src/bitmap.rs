//! A fixed-size set of bits that threads set concurrently: one bit per page
//! (which pages the kernel holds, which were first touched) or per chunk.

use std::sync::atomic::{AtomicU64, Ordering};

/// `len` bits, each set and tested atomically.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBitmap {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        let words = len.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Set bit `i`; returns whether it was already set.
    pub fn test_and_set(&self, i: u64) -> bool {
        let mask = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// Clear bit `i`; returns whether it was set.
    pub fn test_and_clear(&self, i: u64) -> bool {
        let mask = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }

    /// Set bits `[start, end)` (clipped to the bitmap).
    pub fn set_range(&self, start: u64, end: u64) {
        for i in start..end.min(self.len) {
            self.test_and_set(i);
        }
    }

    /// Whether every bit of `[start, end)` is set.
    pub fn all_set(&self, start: u64, end: u64) -> bool {
        (start..end.min(self.len)).all(|i| self.get(i))
    }

    /// The maximal runs of clear bits inside `[start, end)`.
    pub fn clear_runs(&self, start: u64, end: u64) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for i in start..end.min(self.len) {
            if self.get(i) {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => out.push(i..i + 1),
            }
        }
        out
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_counts_and_clears() {
        let bits = AtomicBitmap::new(130);
        assert!(!bits.test_and_set(129));
        assert!(bits.test_and_set(129));
        assert!(!bits.test_and_set(0));
        assert_eq!(bits.count(), 2);
        assert!(bits.test_and_clear(0));
        assert!(!bits.get(0));
        assert_eq!(bits.count(), 1);
    }

    #[test]
    fn ranges_and_clear_runs() {
        let bits = AtomicBitmap::new(20);
        bits.set_range(2, 5);
        bits.set_range(8, 9);
        bits.set_range(18, 40); // clipped
        assert!(bits.all_set(2, 5));
        assert!(!bits.all_set(2, 6));
        assert_eq!(bits.clear_runs(0, 20), vec![0..2, 5..8, 9..18]);
        assert_eq!(bits.count(), 6);
    }
}
