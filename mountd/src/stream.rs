//! Detecting sequential readers: small sequential reads (O_DIRECT readers,
//! faults on MADV_RANDOM mappings) get no kernel readahead, so the daemon reads
//! ahead of them itself.

use std::ops::Range;

/// Streams tracked at once.
const STREAMS: usize = 8;
/// Readahead never runs further than this past a stream.
const MAX_WINDOW: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    next: u64,
    hits: u32,
    queued_until: u64,
    last_use: u64,
}

/// Recently seen sequential streams (several readers, or a VMM faulting a few
/// regions at once, interleave their requests).
#[derive(Debug, Default)]
pub struct StreamTable {
    streams: [Stream; STREAMS],
    clock: u64,
}

impl StreamTable {
    /// Note a demand read of `[start, end)`; returns a byte range to read ahead
    /// once a stream has been seen at least twice. Requests a few chunks out of
    /// order (the kernel sends async readahead from several threads) still count.
    pub fn observe(&mut self, start: u64, end: u64, chunk: u64) -> Option<Range<u64>> {
        self.clock += 1;
        let slack = 4 * chunk;
        let hit = self
            .streams
            .iter_mut()
            .find(|s| s.hits > 0 && start + slack >= s.next && start <= s.next + slack);
        let Some(s) = hit else {
            let victim = self.streams.iter_mut().min_by_key(|s| s.last_use)?;
            *victim = Stream {
                next: end,
                hits: 1,
                queued_until: end,
                last_use: self.clock,
            };
            return None;
        };
        s.hits += 1;
        s.last_use = self.clock;
        s.next = s.next.max(end);
        let window = (u64::from(s.hits) * 2 * chunk).min(MAX_WINDOW);
        let target = s.next + window;
        // Re-queue only once the stream has eaten half the window.
        if target <= s.queued_until + window / 2 {
            return None;
        }
        let from = s.queued_until.max(s.next);
        s.queued_until = target;
        Some(from..target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 * 1024;

    #[test]
    fn stream_needs_two_reads_then_reads_ahead() {
        let mut t = StreamTable::default();
        assert_eq!(t.observe(0, CHUNK, CHUNK), None);
        let ra = t
            .observe(CHUNK, 2 * CHUNK, CHUNK)
            .expect("second read starts readahead");
        assert_eq!(ra.start, 2 * CHUNK);
        assert!(ra.end > ra.start);
    }

    #[test]
    fn random_reads_do_not_read_ahead() {
        let mut t = StreamTable::default();
        for off in [100u64, 7, 300, 42, 900, 13, 555, 250, 777, 1] {
            assert_eq!(
                t.observe(off * CHUNK * 10, off * CHUNK * 10 + 4096, CHUNK),
                None
            );
        }
    }

    #[test]
    fn interleaved_streams_are_tracked_separately() {
        let mut t = StreamTable::default();
        let far = 1000 * CHUNK;
        t.observe(0, CHUNK, CHUNK);
        t.observe(far, far + CHUNK, CHUNK);
        assert!(t.observe(CHUNK, 2 * CHUNK, CHUNK).is_some());
        assert!(t.observe(far + CHUNK, far + 2 * CHUNK, CHUNK).is_some());
    }
}
