//! Recording a loading set: the first touch of every page during a restore,
//! in order, with its time since the restore's first read.
//!
//! To see single pages, a recording mount turns off the kernel's read-around
//! for the mount (bdi `read_ahead_kb` 0: a fault then reads one page) and every
//! prefetch, and pushes nothing into the page cache, so each first touch
//! reaches the daemon. Touches after the window are not recorded (they are
//! the steady state, not the restore's start).

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ckptfs::loadset::{self, LoadSetError, Run, WriteSummary};
use ckptfs::{PageIndex, PageReader};

use crate::bitmap::AtomicBitmap;
use crate::cache::lock;

/// First touches, page granular.
#[derive(Debug)]
pub struct Recorder {
    seen: AtomicBitmap,
    touches: Mutex<Vec<(u64, u32, bool)>>,
    first_read: OnceLock<Instant>,
    window: Duration,
}

impl Recorder {
    /// A recorder for a guest of `pages` pages keeping touches within `window`
    /// of the first read.
    pub fn new(pages: u64, window: Duration) -> Self {
        Recorder {
            seen: AtomicBitmap::new(pages),
            touches: Mutex::new(Vec::new()),
            first_read: OnceLock::new(),
            window,
        }
    }

    /// The kernel read pages `[first, end)`.
    pub fn note(&self, source: &dyn PageReader, first: u64, end: u64) {
        let t0 = *self.first_read.get_or_init(Instant::now);
        let elapsed = t0.elapsed();
        if elapsed > self.window {
            return;
        }
        let ms = elapsed.as_millis() as u32;
        let mut touches = lock(&self.touches);
        for p in first..end.min(self.seen.len()) {
            if !self.seen.test_and_set(p) {
                touches.push((p, ms, source.is_zero(PageIndex(p))));
            }
        }
    }

    /// Pages touched so far (within the window).
    pub fn touched(&self) -> u64 {
        lock(&self.touches).len() as u64
    }

    /// The recording window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The touches as runs, in first-touch order.
    pub fn runs(&self) -> Vec<Run> {
        loadset::runs_from_touches(&lock(&self.touches))
    }

    /// Write the loading set to `path` (atomically, with `mode`).
    pub fn save(
        &self,
        path: &Path,
        source: &dyn PageReader,
        mode: u32,
    ) -> Result<WriteSummary, LoadSetError> {
        let window_ms = u32::try_from(self.window.as_millis()).unwrap_or(u32::MAX);
        loadset::write(path, source, &self.runs(), window_ms, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckptfs::{MemReader, PAGE_SIZE};

    #[test]
    fn first_touches_in_order_merge_into_runs() {
        let mut data = vec![1u8; 16 * PAGE_SIZE];
        data[8 * PAGE_SIZE..9 * PAGE_SIZE].fill(0);
        let src = MemReader::new(data);
        let r = Recorder::new(16, Duration::from_secs(60));
        r.note(&src, 4, 6);
        r.note(&src, 5, 7); // 5 again: not a new touch
        r.note(&src, 8, 9); // a zero page
        r.note(&src, 2, 3);
        assert_eq!(r.touched(), 5);
        let shape: Vec<(u64, u32, bool)> = r
            .runs()
            .iter()
            .map(|x| (x.first_page, x.pages, x.zero))
            .collect();
        assert_eq!(shape, vec![(4, 3, false), (8, 1, true), (2, 1, false)]);
    }

    #[test]
    fn touches_after_the_window_are_not_recorded() {
        let src = MemReader::new(vec![1u8; 4 * PAGE_SIZE]);
        let r = Recorder::new(4, Duration::from_millis(30));
        r.note(&src, 0, 1);
        std::thread::sleep(Duration::from_millis(60));
        r.note(&src, 1, 2);
        assert_eq!(r.touched(), 1);
    }
}
