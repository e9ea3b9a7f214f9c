//! The closed-loop request driver: hands the guest its next request when it asks (`in` on
//! the request port), timestamps each response, and decides when to pause the VM.
//!
//! A plan is "WORK (or READ) requests until a limit, then one CHECK"; the VM pauses right
//! after the CHECK response, so the checksum describes exactly the state that is saved next.
//! READ requests change nothing in the guest, so after them the CHECK still equals the one
//! taken at the checkpoint: that is how a restore proves the VM came back identical.

use std::time::{Duration, Instant};

use crate::abi;

/// Pages one DIRTY request writes at most (about a second of guest time at 1 µs an
/// instruction, so the VMM still sees the request boundaries it harvests the dirty log at).
pub const DIRTY_BATCH: u64 = 16384;

/// How many WORK requests to run before the final CHECK.
#[derive(Clone, Copy, Debug)]
pub enum WorkLimit {
    /// Exactly this many.
    Count(u64),
    /// As many as fit in this long, counted from the first request handed out.
    For(Duration),
}

/// One completed request.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Completion {
    /// Sequence number within this plan.
    pub i: u64,
    /// "work" (WORK or READ) or "check".
    pub kind: &'static str,
    /// Nanoseconds from the driver's origin to the response.
    pub t_ns: u64,
    /// Nanoseconds from handing out the request to the response.
    pub latency_ns: u64,
    /// The guest's response.
    pub response: u64,
}

/// What the machine asks the driver.
pub trait Driver {
    /// The guest wants its next request: return the code.
    fn next_request(&mut self) -> u32;
    /// The guest answered the current request; return false to pause the VM here.
    fn completed(&mut self, response: u64) -> bool;
}

/// Runs WORK requests up to a limit, then a CHECK, then pauses.
pub struct PlanDriver {
    limit: WorkLimit,
    origin: Instant,
    keep_timeline: bool,
    pure: bool,
    dirty_left: u64,
    pause_before_check: bool,
    paused_before_check: bool,
    first_request: Option<Instant>,
    last_work: Option<Instant>,
    issued: Option<(u32, Instant)>,
    work_done: u64,
    completions: Vec<Completion>,
    check: Option<u64>,
    check_latency_ns: u64,
    latencies_ns: Vec<u64>,
}

impl PlanDriver {
    /// A plan whose timestamps count from `origin`; with `keep_timeline`, every completion
    /// is kept (otherwise only latencies, for statistics).
    pub fn new(limit: WorkLimit, origin: Instant, keep_timeline: bool) -> Self {
        PlanDriver {
            limit,
            origin,
            keep_timeline,
            pure: false,
            dirty_left: 0,
            pause_before_check: false,
            paused_before_check: false,
            first_request: None,
            last_work: None,
            issued: None,
            work_done: 0,
            completions: Vec::new(),
            check: None,
            check_latency_ns: 0,
            latencies_ns: Vec::new(),
        }
    }

    /// Issue READ requests (no guest side effects) instead of WORK.
    pub fn pure(mut self, pure: bool) -> Self {
        self.pure = pure;
        self
    }

    /// Start with DIRTY requests that make the guest write `pages` heap pages (in batches
    /// of at most [`DIRTY_BATCH`]), before its WORK or READ requests. They count in a
    /// duration limit but not as work; the timeline shows them as kind "dirty".
    pub fn dirty(mut self, pages: u64) -> Self {
        self.dirty_left = pages;
        self
    }

    /// Also pause once after the last WORK (or READ) response, before the CHECK is handed
    /// out, so the caller can look at the VM as the requests left it; running the machine
    /// again then issues the CHECK. A plan without work ([`Self::plans_work`]) does not
    /// pause there.
    pub fn pause_before_check(mut self, pause: bool) -> Self {
        self.pause_before_check = pause;
        self
    }

    /// Whether the plan has any WORK (or READ) requests before its CHECK.
    pub fn plans_work(&self) -> bool {
        match self.limit {
            WorkLimit::Count(n) => n > 0,
            WorkLimit::For(d) => !d.is_zero(),
        }
    }

    fn work_request(&self) -> u32 {
        if self.pure {
            let arg = (self.work_done as u32) & (u32::MAX >> abi::REQ_ARG_SHIFT);
            abi::REQ_READ | arg << abi::REQ_ARG_SHIFT
        } else {
            abi::REQ_WORK
        }
    }

    fn more_work(&self, now: Instant) -> bool {
        match self.limit {
            WorkLimit::Count(n) => self.work_done < n,
            WorkLimit::For(d) => self.first_request.is_none_or(|t| now.duration_since(t) < d),
        }
    }

    /// When the guest first asked for a request (it had finished booting).
    pub fn first_request(&self) -> Option<Instant> {
        self.first_request
    }

    /// When the last WORK (or READ) response came.
    pub fn last_work(&self) -> Option<Instant> {
        self.last_work
    }

    /// The CHECK response, once the plan has run.
    pub fn check(&self) -> Option<u64> {
        self.check
    }

    /// How long the CHECK took (a full pass over guest memory), ns.
    pub fn check_latency_ns(&self) -> u64 {
        self.check_latency_ns
    }

    /// WORK requests completed.
    pub fn work_done(&self) -> u64 {
        self.work_done
    }

    /// Every completion, when kept.
    pub fn completions(&self) -> &[Completion] {
        &self.completions
    }

    /// Latency statistics of the WORK requests.
    pub fn latency_stats(&self) -> LatencyStats {
        LatencyStats::of(&self.latencies_ns)
    }

    fn nanos_since(&self, earlier: Instant, now: Instant) -> u64 {
        let _ = self;
        now.saturating_duration_since(earlier).as_nanos() as u64
    }
}

impl Driver for PlanDriver {
    fn next_request(&mut self) -> u32 {
        let now = Instant::now();
        self.first_request.get_or_insert(now);
        if self.dirty_left > 0 {
            let n = self.dirty_left.min(DIRTY_BATCH);
            self.dirty_left -= n;
            let code = abi::REQ_DIRTY | (n as u32) << abi::REQ_ARG_SHIFT;
            self.issued = Some((code, now));
            return code;
        }
        // When pausing before the CHECK, completed() alone decides when the work ends (a
        // duration could run out between its pause and this call).
        let work = if self.pause_before_check && self.plans_work() {
            !self.paused_before_check
        } else {
            self.more_work(now)
        };
        let code = if work {
            self.work_request()
        } else {
            abi::REQ_CHECK
        };
        self.issued = Some((code, now));
        code
    }

    fn completed(&mut self, response: u64) -> bool {
        let now = Instant::now();
        let Some((code, issued)) = self.issued.take() else {
            log::warn!("driver: response {response:#x} without a request");
            return true;
        };
        let latency_ns = self.nanos_since(issued, now);
        let i = self.work_done + u64::from(self.check.is_some());
        let kind = match code & abi::REQ_CODE_MASK {
            abi::REQ_CHECK => "check",
            abi::REQ_DIRTY => "dirty",
            _ => "work",
        };
        if self.keep_timeline {
            let t_ns = self.nanos_since(self.origin, now);
            self.completions.push(Completion {
                i,
                kind,
                t_ns,
                latency_ns,
                response,
            });
        }
        if code == abi::REQ_CHECK {
            self.check = Some(response);
            self.check_latency_ns = latency_ns;
            return false;
        }
        if kind == "dirty" {
            return true;
        }
        self.latencies_ns.push(latency_ns);
        self.work_done += 1;
        self.last_work = Some(now);
        if self.pause_before_check && !self.paused_before_check && !self.more_work(now) {
            self.paused_before_check = true;
            return false;
        }
        true
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LatencyStats {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencyStats {
    fn of(latencies_ns: &[u64]) -> Self {
        if latencies_ns.is_empty() {
            return Self::default();
        }
        let mut sorted = latencies_ns.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        let sum: u64 = sorted.iter().sum();
        LatencyStats {
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: at(1.0),
            mean_us: sum as f64 / sorted.len() as f64 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_plan_runs_work_then_check_then_pauses() {
        let mut d = PlanDriver::new(WorkLimit::Count(2), Instant::now(), true);
        for _ in 0..2 {
            assert_eq!(d.next_request(), abi::REQ_WORK);
            assert!(d.completed(1));
        }
        assert_eq!(d.next_request(), abi::REQ_CHECK);
        assert!(!d.completed(0xabc));
        assert_eq!(d.check(), Some(0xabc));
        let kinds: Vec<_> = d.completions().iter().map(|c| (c.i, c.kind)).collect();
        assert_eq!(kinds, vec![(0, "work"), (1, "work"), (2, "check")]);
    }

    #[test]
    fn pure_plan_issues_numbered_reads() {
        let mut d = PlanDriver::new(WorkLimit::Count(2), Instant::now(), false).pure(true);
        assert_eq!(d.next_request(), abi::REQ_READ);
        assert!(d.completed(1));
        assert_eq!(d.next_request(), abi::REQ_READ | 1 << abi::REQ_ARG_SHIFT);
        assert!(d.completed(1));
        assert_eq!(d.next_request(), abi::REQ_CHECK);
    }

    #[test]
    fn plan_can_pause_before_its_check() {
        let mut d = PlanDriver::new(WorkLimit::Count(2), Instant::now(), false)
            .pure(true)
            .pause_before_check(true);
        assert!(d.plans_work());
        d.next_request();
        assert!(d.completed(1));
        d.next_request();
        assert!(!d.completed(1), "pauses after the last READ");
        assert_eq!(d.check(), None);
        assert_eq!(d.next_request(), abi::REQ_CHECK);
        assert!(!d.completed(7));
        assert_eq!(d.check(), Some(7));
        assert!(!PlanDriver::new(WorkLimit::Count(0), Instant::now(), false).plans_work());
    }

    #[test]
    fn dirty_requests_come_first_in_batches_and_are_not_work() {
        let mut d =
            PlanDriver::new(WorkLimit::Count(1), Instant::now(), true).dirty(DIRTY_BATCH + 5);
        let arg = |code: u32| code >> abi::REQ_ARG_SHIFT;
        let first = d.next_request();
        assert_eq!(
            (first & abi::REQ_CODE_MASK, arg(first)),
            (abi::REQ_DIRTY, 16384)
        );
        assert!(d.completed(16384));
        assert_eq!(d.next_request(), abi::REQ_DIRTY | 5 << abi::REQ_ARG_SHIFT);
        assert!(d.completed(16389));
        assert_eq!(d.next_request(), abi::REQ_WORK);
        assert!(d.completed(1));
        assert_eq!(d.next_request(), abi::REQ_CHECK);
        assert!(!d.completed(9));
        assert_eq!(d.work_done(), 1);
        let kinds: Vec<_> = d.completions().iter().map(|c| c.kind).collect();
        assert_eq!(kinds, vec!["dirty", "dirty", "work", "check"]);
    }

    #[test]
    fn zero_requests_means_check_only() {
        let mut d = PlanDriver::new(WorkLimit::Count(0), Instant::now(), false);
        assert_eq!(d.next_request(), abi::REQ_CHECK);
        assert!(!d.completed(5));
        assert!(d.completions().is_empty());
    }

    #[test]
    fn latency_percentiles() {
        let s = LatencyStats::of(&(1..=100).map(|x| x * 1000).collect::<Vec<_>>());
        assert_eq!(s.max_us, 100.0);
        assert!((s.p50_us - 50.0).abs() <= 1.0);
        assert_eq!(s.p99_us, 99.0);
    }
}
