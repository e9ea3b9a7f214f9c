//! Disk I/O tracking, the paper's mechanism (Park et al., VEE'11): remember which guest pages
//! hold an unmodified copy of which disk block, so a checkpoint can store a reference to the
//! block instead of the page.
//!
//! - A disk read of whole, aligned pages records page -> block.
//! - A guest write to the page drops it. Guest writes are seen through KVM's dirty log
//!   (KVM_MEM_LOG_DIRTY_PAGES); the VMM's own pread into guest memory is *not* in the dirty log,
//!   but a guest write after it is. So the dirty log must be harvested (and applied) right
//!   before a read's mappings are recorded: dirty bits from before the read (an allocator
//!   clearing the buffer, say) describe the page's old contents and must not drop the new
//!   mapping.
//! - A disk write to the block drops every page mapped to it (their copy is stale).

use std::collections::{BTreeMap, HashMap};

use ckptfs::{DiskHint, DiskIndex, DiskOffset, PageIndex};

use crate::abi;

/// Page <-> disk block map for one disk.
#[derive(Debug, Default)]
pub struct IoTracker {
    page_to_block: BTreeMap<PageIndex, DiskOffset>,
    block_to_pages: HashMap<DiskOffset, Vec<PageIndex>>,
}

impl IoTracker {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages currently known to hold a disk block.
    pub fn len(&self) -> usize {
        self.page_to_block.len()
    }

    /// True when no page is known to hold a disk block.
    pub fn is_empty(&self) -> bool {
        self.page_to_block.is_empty()
    }

    /// The block `page` holds, if known.
    pub fn block_of(&self, page: PageIndex) -> Option<DiskOffset> {
        self.page_to_block.get(&page).copied()
    }

    /// Records that `page` now holds the disk block at `block` (replacing what it held).
    pub fn record(&mut self, page: PageIndex, block: DiskOffset) {
        self.forget_page(page);
        self.page_to_block.insert(page, block);
        self.block_to_pages.entry(block).or_default().push(page);
    }

    /// `page` no longer holds a known disk block (the guest wrote it, or something else was
    /// read into part of it).
    pub fn forget_page(&mut self, page: PageIndex) {
        let Some(block) = self.page_to_block.remove(&page) else {
            return;
        };
        if let Some(pages) = self.block_to_pages.get_mut(&block) {
            pages.retain(|p| *p != page);
            if pages.is_empty() {
                self.block_to_pages.remove(&block);
            }
        }
    }

    /// The disk block at `block` was overwritten: no page holds its contents any more.
    pub fn forget_block(&mut self, block: DiskOffset) {
        for page in self.block_to_pages.remove(&block).unwrap_or_default() {
            self.page_to_block.remove(&page);
        }
    }

    /// Applies a KVM dirty bitmap (bit i of word w = page 64 w + i written by the guest).
    /// Returns how many dirty pages it saw.
    pub fn apply_dirty_bitmap(&mut self, bitmap: &[u64]) -> u64 {
        let mut dirty = 0;
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                dirty += 1;
                if !self.page_to_block.is_empty() {
                    self.forget_page(PageIndex(w as u64 * 64 + bit));
                }
            }
        }
        dirty
    }

    /// The map as runs `[first page, its disk offset, pages]` of consecutive pages holding
    /// consecutive blocks, sorted by page: what the VMM state saves (a page cache filled by
    /// large reads is a few runs, not a pair a page).
    pub fn runs(&self) -> Vec<[u64; 3]> {
        let mut runs: Vec<[u64; 3]> = Vec::new();
        for (&page, &block) in &self.page_to_block {
            match runs.last_mut() {
                Some([first, offset, n])
                    if *first + *n == page.0 && *offset + *n * abi::PAGE_SIZE == block.0 =>
                {
                    *n += 1
                }
                _ => runs.push([page.0, block.0, 1]),
            }
        }
        runs
    }

    /// Records the runs [`Self::runs`] saved, after checking that each lies inside guest
    /// RAM of `ram_pages` pages and a disk of `disk_size` bytes, at a block boundary.
    pub fn load_runs(
        &mut self,
        runs: &[[u64; 3]],
        ram_pages: u64,
        disk_size: u64,
    ) -> Result<(), String> {
        for &[page, offset, n] in runs {
            let fits = page.checked_add(n).is_some_and(|end| end <= ram_pages)
                && n.checked_mul(abi::PAGE_SIZE)
                    .and_then(|len| offset.checked_add(len))
                    .is_some_and(|end| end <= disk_size);
            if !fits || !offset.is_multiple_of(abi::PAGE_SIZE) {
                return Err(format!(
                    "run of {n} pages from page {page} at disk offset {offset} lies outside \
                     guest RAM or the disk"
                ));
            }
            for i in 0..n {
                self.record(PageIndex(page + i), DiskOffset(offset + i * abi::PAGE_SIZE));
            }
        }
        Ok(())
    }

    /// Checkpoint hints for `disk`, sorted by page.
    pub fn hints(&self, disk: DiskIndex) -> Vec<DiskHint> {
        self.page_to_block
            .iter()
            .map(|(&page, &offset)| DiskHint { page, disk, offset })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint_pairs(t: &IoTracker) -> Vec<(u64, u64)> {
        t.hints(DiskIndex(0))
            .iter()
            .map(|h| (h.page.0, h.offset.0))
            .collect()
    }

    #[test]
    fn read_then_guest_write_drops_the_page() {
        let mut t = IoTracker::new();
        t.record(PageIndex(5), DiskOffset(8192));
        t.record(PageIndex(6), DiskOffset(12288));
        t.apply_dirty_bitmap(&[1 << 5]);
        assert_eq!(hint_pairs(&t), vec![(6, 12288)]);
    }

    #[test]
    fn dirty_bits_harvested_before_the_read_do_not_drop_it() {
        let mut t = IoTracker::new();
        // The guest cleared page 70 (dirty), then the VMM harvested and read into it.
        assert_eq!(t.apply_dirty_bitmap(&[0, 1 << 6]), 1);
        t.record(PageIndex(70), DiskOffset(0));
        assert_eq!(t.apply_dirty_bitmap(&[0, 0]), 0);
        assert_eq!(hint_pairs(&t), vec![(70, 0)]);
    }

    #[test]
    fn disk_write_drops_every_page_holding_the_block() {
        let mut t = IoTracker::new();
        t.record(PageIndex(1), DiskOffset(4096));
        t.record(PageIndex(2), DiskOffset(4096));
        t.record(PageIndex(3), DiskOffset(0));
        t.forget_block(DiskOffset(4096));
        assert_eq!(hint_pairs(&t), vec![(3, 0)]);
        assert!(!t.block_to_pages.contains_key(&DiskOffset(4096)));
    }

    #[test]
    fn runs_save_and_load_the_same_map() {
        let mut t = IoTracker::new();
        for (page, block) in [(10, 0), (11, 4096), (12, 8192), (13, 0), (20, 40960)] {
            t.record(PageIndex(page), DiskOffset(block));
        }
        let runs = t.runs();
        assert_eq!(runs, vec![[10, 0, 3], [13, 0, 1], [20, 40960, 1]]);
        let mut back = IoTracker::new();
        back.load_runs(&runs, 64, 1 << 20).unwrap();
        assert_eq!(hint_pairs(&back), hint_pairs(&t));
        // A disk write still finds every page holding the block.
        back.forget_block(DiskOffset(0));
        assert_eq!(hint_pairs(&back), vec![(11, 4096), (12, 8192), (20, 40960)]);
        for bad in [[60, 0, 5], [0, 1 << 20, 1], [0, 100, 1], [u64::MAX, 0, 2]] {
            assert!(
                IoTracker::new().load_runs(&[bad], 64, 1 << 20).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rereading_a_page_replaces_its_block() {
        let mut t = IoTracker::new();
        t.record(PageIndex(1), DiskOffset(4096));
        t.record(PageIndex(1), DiskOffset(8192));
        t.forget_block(DiskOffset(4096));
        assert_eq!(hint_pairs(&t), vec![(1, 8192)]);
        assert_eq!(t.block_of(PageIndex(1)), Some(DiskOffset(8192)));
    }
}
