//! Packing stored pages into objects: where each pack begins and ends.
//!
//! Stored pages go into packs of 1-4 MiB in the order a restore wants them
//! (the loading set's pages first, then the rest by blob index, which is
//! guest-address order). A pack ends after a page whose content hash has its
//! low 8 bits zero, once the pack holds at least 1 MiB, or at 4 MiB, or where
//! the loading set ends: boundaries depend on the pages around them, not on
//! where a run of pages starts, so two checkpoints that share a run of pages
//! make the same packs for most of it (content-defined chunking, as Nydus and
//! AWS Lambda's container loading do), and the content-addressed pack names
//! upload them once.

use std::ops::Range;

/// Fewest pages in a pack (1 MiB), except at the loading set's end and the last.
pub const MIN_PACK_PAGES: usize = 256;
/// Most pages in a pack (4 MiB).
pub const MAX_PACK_PAGES: usize = 1024;
/// A pack may end after a page whose hash has these bits zero (1 in 256 pages).
const CUT_MASK: u64 = 0xff;

/// Cut a sequence of pages (given by their content hashes) into packs; a pack
/// always ends at `boundary` (the loading set's end). Returns index ranges.
pub fn cut(hashes: &[u64], boundary: usize) -> Vec<Range<usize>> {
    let mut packs = Vec::new();
    let mut start = 0;
    for (i, h) in hashes.iter().enumerate() {
        let len = i + 1 - start;
        let content_cut = len >= MIN_PACK_PAGES && h & CUT_MASK == 0;
        if content_cut || len == MAX_PACK_PAGES || i + 1 == boundary || i + 1 == hashes.len() {
            packs.push(start..i + 1);
            start = i + 1;
        }
    }
    packs
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_64;

    fn hashes(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64)
            .map(|i| xxh3_64(&(seed + i).to_le_bytes()))
            .collect()
    }

    #[test]
    fn packs_are_between_one_and_four_mib_and_end_at_the_boundary() {
        let h = hashes(0, 20_000);
        let packs = cut(&h, 700);
        assert_eq!(packs[0].start, 0);
        assert!(packs.iter().any(|p| p.end == 700));
        assert_eq!(packs.last().unwrap().end, h.len());
        for w in packs.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        let inner = &packs[..packs.len() - 1];
        for p in inner.iter().filter(|p| p.end != 700) {
            assert!(
                (MIN_PACK_PAGES..=MAX_PACK_PAGES).contains(&p.len()),
                "{p:?}"
            );
        }
        let avg = h.len() / packs.len();
        assert!((400..=700).contains(&avg), "average pack {avg} pages");
    }

    #[test]
    fn a_shifted_sequence_cuts_alike_after_a_pack_or_two() {
        let h = hashes(7, 20_000);
        let a = cut(&h, 0);
        // The same pages with 100 others in front: later packs are the same.
        let mut shifted = hashes(1_000_000, 100);
        shifted.extend_from_slice(&h);
        let b = cut(&shifted, 0);
        let a_ends: std::collections::HashSet<usize> = a.iter().map(|p| p.end).collect();
        let same = b
            .iter()
            .filter(|p| p.end > 100 && a_ends.contains(&(p.end - 100)))
            .count();
        assert!(same + 2 >= a.len(), "{same} of {} packs realigned", a.len());
    }
}
