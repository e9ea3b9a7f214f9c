//! Time-to-responsiveness, as in the paper (after Zhang et al., VEE'11).
//!
//! TTR(w, u) is the earliest time T after which every window of length w
//! completes at least u times the requests per window of the same VM when its
//! memory is fully resident (the warm rate, measured in the same run). Windows
//! slide in steps of [`STEP_NS`] over `[0, end)`, `end` being the last
//! completion; a window that does not fit before `end` is not judged.

/// Window length: 100 ms.
pub const WINDOW_NS: u64 = 100_000_000;
/// Target utilization: 80 % of the warm rate.
pub const UTILIZATION: f64 = 0.8;
/// Slide step of the windows: 1 ms.
pub const STEP_NS: u64 = 1_000_000;

/// Requests completed in each window of `w` starting at multiples of `w`
/// (what the plots show). `times` must be sorted.
pub fn per_window(times: &[u64], w: u64) -> Vec<u64> {
    let Some(&last) = times.last() else {
        return Vec::new();
    };
    let mut counts = vec![0u64; (last / w + 1) as usize];
    for &t in times {
        counts[(t / w) as usize] += 1;
    }
    counts
}

/// Requests per window of `w` at steady state: the median of the full
/// windows of a warm run, skipping the first one (resume and warm-up).
pub fn warm_rate(times: &[u64], w: u64) -> f64 {
    let mut counts = per_window(times, w);
    counts.pop(); // the last window is partial
    if counts.len() > 2 {
        counts.remove(0);
    }
    if counts.is_empty() {
        return 0.0;
    }
    counts.sort_unstable();
    counts[counts.len() / 2] as f64
}

/// The warm rate of a run that first loads memory and only then serves (an
/// eager restore): [`warm_rate`] of its windows from its first completion on,
/// so the idle load phase (half of a 4 GiB eager run) does not pull the median
/// to zero.
pub fn resident_rate(times: &[u64], w: u64) -> f64 {
    let Some(&first) = times.first() else {
        return 0.0;
    };
    let served: Vec<u64> = times.iter().map(|&t| t - first).collect();
    warm_rate(&served, w)
}

/// TTR in nanoseconds for sorted completion `times` (ns since restore started),
/// given the warm `rate` (requests per window `w`). None if the run never
/// became responsive before its end.
pub fn ttr(times: &[u64], rate: f64, w: u64, u: f64) -> Option<u64> {
    let &end = times.last()?;
    if end < w {
        return None;
    }
    let need = (u * rate).ceil() as usize;
    // Slide [t, t + w) over [0, end) with two pointers; remember the last
    // window that falls short. TTR is just after it.
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut last_bad: Option<u64> = None;
    let mut t = 0;
    while t + w <= end {
        while lo < times.len() && times[lo] < t {
            lo += 1;
        }
        while hi < times.len() && times[hi] < t + w {
            hi += 1;
        }
        if hi - lo < need {
            last_bad = Some(t);
        }
        t += STEP_NS;
    }
    match last_bad {
        None => Some(0),
        Some(b) if b + STEP_NS + w > end => None,
        Some(b) => Some(b + STEP_NS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eager_runs_load_phase_does_not_count_in_its_rate() {
        let w = 100_000_000;
        // 6 s loading, then a request every ms for 3 s: 100 per window.
        let times = steady(6_000_000_000, 9_000_000_000, 1_000_000);
        assert_eq!(
            warm_rate(&times, w),
            0.0,
            "the plain median sees the idle phase"
        );
        assert_eq!(resident_rate(&times, w), 100.0);
        assert_eq!(resident_rate(&[], w), 0.0);
    }

    /// One request every `gap` ns in [from, to).
    fn steady(from: u64, to: u64, gap: u64) -> Vec<u64> {
        (0..)
            .map(|i| from + i * gap)
            .take_while(|&t| t < to)
            .collect()
    }

    #[test]
    fn always_fast_run_is_responsive_at_once() {
        let t = steady(0, 2_000_000_000, 1_000_000); // 100 per window
        assert_eq!(warm_rate(&t, WINDOW_NS), 100.0);
        assert_eq!(ttr(&t, 100.0, WINDOW_NS, UTILIZATION), Some(0));
    }

    #[test]
    fn slow_start_ends_where_the_rate_recovers() {
        // 10 per window for 1 s, then 100 per window for 2 s.
        let mut t = steady(0, 1_000_000_000, 10_000_000);
        t.extend(steady(1_000_000_000, 3_000_000_000, 1_000_000));
        let r = ttr(&t, 100.0, WINDOW_NS, UTILIZATION).unwrap();
        // Windows starting a little before 1 s already hold >= 80 fast requests.
        assert!((970_000_000..=1_000_000_000).contains(&r), "{r}");
    }

    #[test]
    fn a_late_stall_pushes_ttr_past_it() {
        let mut t = steady(0, 1_000_000_000, 1_000_000);
        // 300 ms stall, then fast again.
        t.extend(steady(1_300_000_000, 3_000_000_000, 1_000_000));
        let r = ttr(&t, 100.0, WINDOW_NS, UTILIZATION).unwrap();
        assert!((1_270_000_000..=1_300_000_000).contains(&r), "{r}");
    }

    #[test]
    fn never_responsive_is_none() {
        let t = steady(0, 2_000_000_000, 10_000_000);
        assert_eq!(ttr(&t, 100.0, WINDOW_NS, UTILIZATION), None);
        assert_eq!(ttr(&[], 100.0, WINDOW_NS, UTILIZATION), None);
    }

    #[test]
    fn per_window_counts_every_request() {
        let t = steady(0, 250_000_000, 1_000_000);
        assert_eq!(per_window(&t, WINDOW_NS), vec![100, 100, 50]);
    }
}
