//! A set of guest pages as a bitmap, laid out like KVM's dirty log: bit `i` of
//! word `w` is page `64 * w + i`.
//!
//! A VMM hands one to [`crate::create`] as [`crate::CreateOptions::changed`]:
//! the pages its dirty log (and its own writes) say changed since the VM was
//! restored from the parent checkpoint. The KVM bitmap's words can be merged in
//! as they are harvested ([`PageSet::insert_words`]).

use crate::types::PageIndex;

/// Bits in a word of the bitmap.
const WORD_BITS: u64 = u64::BITS as u64;

/// A set of pages of a guest of [`PageSet::pages`] pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// The empty set for a guest of `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(WORD_BITS) as usize],
            pages,
        }
    }

    /// Every page of a guest of `pages` pages.
    pub fn full(pages: u64) -> Self {
        let mut s = PageSet::new(pages);
        s.insert_range(0..pages);
        s
    }

    /// Number of guest pages the set is over (not how many it holds: see [`Self::count`]).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether `page` is in the set (false beyond the guest).
    pub fn contains(&self, page: PageIndex) -> bool {
        let Some(&w) = self.words.get((page.0 / WORD_BITS) as usize) else {
            return false;
        };
        page.0 < self.pages && w & (1 << (page.0 % WORD_BITS)) != 0
    }

    /// Adds `page` (ignored beyond the guest).
    pub fn insert(&mut self, page: PageIndex) {
        if page.0 < self.pages {
            self.words[(page.0 / WORD_BITS) as usize] |= 1 << (page.0 % WORD_BITS);
        }
    }

    /// Adds every page of `range` (clipped to the guest).
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) {
        for p in range.start..range.end.min(self.pages) {
            self.insert(PageIndex(p));
        }
    }

    /// Adds the pages of a bitmap in the same layout (KVM_GET_DIRTY_LOG's); bits
    /// beyond the guest are ignored.
    pub fn insert_words(&mut self, bitmap: &[u64]) {
        for (w, b) in self.words.iter_mut().zip(bitmap) {
            *w |= b;
        }
        self.clear_tail();
    }

    /// Adds every page of `other` (over a guest of the same size or smaller).
    pub fn union(&mut self, other: &PageSet) {
        self.insert_words(&other.words);
    }

    fn clear_tail(&mut self) {
        let used = self.pages % WORD_BITS;
        if let (Some(last), true) = (self.words.last_mut(), used != 0) {
            *last &= (1 << used) - 1;
        }
    }

    /// How many pages the set holds.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = PageIndex> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(PageIndex(w as u64 * WORD_BITS + bit))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_laid_out_like_the_kvm_dirty_log() {
        let mut s = PageSet::new(130);
        s.insert_words(&[1 << 5, 0, 0b11]);
        let pages: Vec<u64> = s.iter().map(|p| p.0).collect();
        assert_eq!(pages, vec![5, 128, 129]);
        assert!(s.contains(PageIndex(129)) && !s.contains(PageIndex(6)));
        assert_eq!(s.count(), 3);
    }

    #[test]
    fn bits_beyond_the_guest_are_dropped() {
        let mut s = PageSet::new(66);
        s.insert_words(&[0, u64::MAX, u64::MAX]);
        assert_eq!(s.count(), 2);
        s.insert(PageIndex(66));
        assert!(!s.contains(PageIndex(66)) && !s.contains(PageIndex(1000)));
        assert_eq!(PageSet::full(66).count(), 66);
    }

    #[test]
    fn union_and_ranges_add_pages() {
        let mut a = PageSet::new(200);
        a.insert_range(10..13);
        let mut b = PageSet::new(200);
        b.insert(PageIndex(199));
        a.union(&b);
        let pages: Vec<u64> = a.iter().map(|p| p.0).collect();
        assert_eq!(pages, vec![10, 11, 12, 199]);
    }
}
