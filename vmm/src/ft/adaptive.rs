//! Adaptive epoch length (`--ft-adaptive`, docs/design.md "Adaptive
//! epochs"): the shortest epoch, between the operator's minimum and maximum,
//! whose estimated protection overhead stays under a budget.
//!
//! The overhead of one epoch of length T is what the guest lost of it: the
//! pause P (vCPUs stopped), plus c for each distinct page it wrote (the
//! first write after the cut write-protected it again faults; c is this
//! host's cost of that fault):
//!
//! ```text
//! overhead = (P + D × c) / T        (at most 1)
//! ```
//!
//! The [`Controller`] is fed one [`EpochSample`] per committed epoch, keeps
//! the median of that estimate over the last [`WINDOW`] epochs at the
//! current length (an isolated long pause — the host descheduled the VMM —
//! does not move it; a mean did, measured: a debug build's idle guest
//! swung between 20 and 77 ms on single 6–18 ms pauses), and picks the next
//! length. Going longer it assumes the dirty set does not grow with T (the
//! guest rewrites the same pages), so the estimate falls as 1/T: optimistic,
//! and corrected by the next decision if the dirty set did grow. Going
//! shorter the same assumption is pessimistic (fewer pages are dirty in a
//! shorter epoch, never more), so a shorter choice never overshoots the
//! budget by the model. Against oscillation: a decision only after
//! [`SETTLE`] epochs at the current length, the aim below the budget with a
//! dead band ([`AIM`], [`SHORTEN_BELOW`]), and at most ×[`MAX_UP`] or
//! ×[`MAX_DOWN`] per change. Pure arithmetic: nothing allocates.

use std::time::Duration;

/// Budget when none is given (`--ft-overhead-pct`), percent.
pub const DEFAULT_BUDGET_PCT: f64 = 10.0;
/// Maximum when none is given (`--ft-max-interval-ms`).
pub const DEFAULT_MAX: Duration = Duration::from_millis(200);
/// The write-protect fault's cost on PVM hosts, measured by
/// `examples/guest_speed.rs` part 1 (19–23 µs on the development hosts).
pub const PVM_FAULT_COST: Duration = Duration::from_micros(21);
/// The cost assumed on hardware KVM (EPT; with PML a write to a clean page
/// takes no fault at all): an upper figure, not measured here.
pub const HW_FAULT_COST: Duration = Duration::from_micros(1);

/// Epochs whose median is the estimate (all at the current length: a
/// change starts the window afresh).
pub const WINDOW: usize = 7;
/// Epochs at one length before the next decision.
pub const SETTLE: usize = 4;
/// The first epochs of a pairing are not counted: their pauses are the
/// start-up's (the staging's slabs allocated, caches cold; 5–8 ms at 0
/// dirty pages in a debug build, measured, against 0.4–0.6 ms after).
pub const WARMUP: usize = 4;
/// A change aims the estimate at this share of the budget (the margin for
/// noise).
pub const AIM: f64 = 0.8;
/// The estimate must fall below this share of the budget before the
/// length is shortened (between it and the budget nothing changes).
pub const SHORTEN_BELOW: f64 = 0.6;
/// Most a length grows in one change.
pub const MAX_UP: f64 = 2.0;
/// Most a length shrinks in one change.
pub const MAX_DOWN: f64 = 0.5;
/// Changes smaller than this share of the length are not made.
pub const MIN_CHANGE: f64 = 0.05;

/// Where the fault cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultCostSource {
    /// `--ft-fault-us`.
    Given,
    /// The default for a PVM host (`/sys/module/kvm_pvm` exists).
    PvmDefault,
    /// The default for hardware KVM.
    HardwareDefault,
}

impl FaultCostSource {
    /// For `status` and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultCostSource::Given => "given",
            FaultCostSource::PvmDefault => "pvm default",
            FaultCostSource::HardwareDefault => "hardware kvm default",
        }
    }
}

/// This host's default fault cost: [`PVM_FAULT_COST`] where the host's KVM
/// is PVM, [`HW_FAULT_COST`] otherwise.
pub fn default_fault_cost() -> (Duration, FaultCostSource) {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        (PVM_FAULT_COST, FaultCostSource::PvmDefault)
    } else {
        (HW_FAULT_COST, FaultCostSource::HardwareDefault)
    }
}

/// A bad adaptive setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdaptiveError {
    /// The maximum is below the minimum.
    #[error("--ft-max-interval-ms {max_ms} is below --ft-interval-ms {min_ms} (the minimum)")]
    MaxBelowMin {
        /// The minimum, ms.
        min_ms: u64,
        /// The maximum, ms.
        max_ms: u64,
    },
    /// The budget is not a percentage in (0, 100).
    #[error("--ft-overhead-pct {0} is out of range (more than 0, less than 100)")]
    Budget(f64),
}

/// The operator's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Shortest epoch, and the first (`--ft-interval-ms`).
    pub min: Duration,
    /// Longest epoch (`--ft-max-interval-ms`): bounds the output latency.
    pub max: Duration,
    /// Overhead budget, a fraction of the guest's time (0.1: 10 %).
    pub budget: f64,
    /// This host's cost of one write-protect fault.
    pub fault_cost: Duration,
    /// Where `fault_cost` came from.
    pub fault_source: FaultCostSource,
}

impl AdaptiveConfig {
    /// Checks the settings; `budget_pct` is a percentage.
    pub fn new(
        min: Duration,
        max: Duration,
        budget_pct: f64,
        fault_cost: Duration,
        fault_source: FaultCostSource,
    ) -> Result<Self, AdaptiveError> {
        if max < min {
            return Err(AdaptiveError::MaxBelowMin {
                min_ms: min.as_millis() as u64,
                max_ms: max.as_millis() as u64,
            });
        }
        if !(budget_pct > 0.0 && budget_pct < 100.0) {
            return Err(AdaptiveError::Budget(budget_pct));
        }
        Ok(AdaptiveConfig {
            min,
            max,
            budget: budget_pct / 100.0,
            fault_cost,
            fault_source,
        })
    }
}

/// What the VMM measured of one committed epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochSample {
    /// From the previous cut to this one (the guest ran, then was paused).
    pub length: Duration,
    /// The pause: every vCPU out of `KVM_RUN` until they ran again.
    pub pause: Duration,
    /// Distinct pages written in the epoch (the harvest's count).
    pub dirty_pages: u64,
}

/// Picks each epoch's length from the ones before (module docs).
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: AdaptiveConfig,
    interval: Duration,
    /// The last epochs' estimates at the current length (a ring).
    window: [f64; WINDOW],
    /// Epochs observed at the current length.
    samples: usize,
    /// Their median (a fraction).
    estimate: f64,
    /// Epochs of the warm-up still to come.
    warmup: usize,
}

impl Controller {
    /// Starts at the minimum.
    pub fn new(cfg: AdaptiveConfig) -> Self {
        Controller {
            cfg,
            interval: cfg.min,
            window: [0.0; WINDOW],
            samples: 0,
            estimate: 0.0,
            warmup: WARMUP,
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    /// The length the next epoch gets.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The overhead estimate at the current length: the median of the last
    /// epochs' (a fraction; 0 before the first epoch at it).
    pub fn estimate(&self) -> f64 {
        self.estimate
    }

    /// One epoch's overhead estimate (a fraction, at most 1).
    pub fn overhead(&self, s: &EpochSample) -> f64 {
        let length = s.length.as_secs_f64();
        if length <= 0.0 {
            return 0.0;
        }
        let lost = s.pause.as_secs_f64() + s.dirty_pages as f64 * self.cfg.fault_cost.as_secs_f64();
        (lost / length).min(1.0)
    }

    /// Accounts one committed epoch and returns the next epoch's length.
    pub fn observe(&mut self, s: &EpochSample) -> Duration {
        if s.length.is_zero() {
            return self.interval;
        }
        if self.warmup > 0 {
            self.warmup -= 1;
            return self.interval;
        }
        self.window[self.samples % WINDOW] = self.overhead(s);
        self.samples = self.samples.saturating_add(1);
        let mut w = self.window;
        let w = &mut w[..self.samples.min(WINDOW)];
        w.sort_unstable_by(f64::total_cmp);
        let mid = w.len() / 2;
        self.estimate = if w.len() % 2 == 1 {
            w[mid]
        } else {
            (w[mid - 1] + w[mid]) / 2.0
        };
        if self.samples < SETTLE {
            return self.interval;
        }
        let budget = self.cfg.budget;
        let t = self.interval.as_secs_f64();
        let next = if self.estimate > budget {
            // Longer, by the model (overhead ∝ 1/T) to the aim.
            (t * self.estimate / (budget * AIM)).min(t * MAX_UP)
        } else if self.estimate < budget * SHORTEN_BELOW {
            (t * self.estimate / (budget * AIM)).max(t * MAX_DOWN)
        } else {
            t
        };
        // Whole milliseconds, within the operator's bounds.
        let next =
            Duration::from_millis((next * 1e3).round() as u64).clamp(self.cfg.min, self.cfg.max);
        let change = (next.as_secs_f64() - t).abs() / t;
        if next != self.interval
            && (change >= MIN_CHANGE || next == self.cfg.min || next == self.cfg.max)
        {
            self.interval = next;
            self.samples = 0;
        }
        self.interval
    }

    /// Forgets the estimate (a new pairing, the guest resumed): the next
    /// epochs settle afresh at the current length.
    pub fn reset(&mut self) {
        self.samples = 0;
        self.estimate = 0.0;
        self.warmup = WARMUP;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(min_ms: u64, max_ms: u64, budget_pct: f64) -> AdaptiveConfig {
        AdaptiveConfig::new(
            MS * min_ms as u32,
            MS * max_ms as u32,
            budget_pct,
            PVM_FAULT_COST,
            FaultCostSource::Given,
        )
        .unwrap()
    }

    /// A synthetic guest: a fixed pause, and a working set of `span` pages
    /// rewritten at `rate` distinct new pages per ms until all are dirty.
    #[derive(Clone, Copy)]
    struct Guest {
        pause_us: u64,
        rate: f64,
        span: u64,
    }

    impl Guest {
        fn epoch(&self, length: Duration) -> EpochSample {
            let d = (self.rate * length.as_secs_f64() * 1e3).min(self.span as f64);
            EpochSample {
                length,
                pause: Duration::from_micros(self.pause_us),
                dirty_pages: d as u64,
            }
        }
    }

    /// Runs `n` epochs (the clock is the sum of their lengths); returns the
    /// lengths chosen.
    fn run(c: &mut Controller, g: Guest, n: usize) -> Vec<Duration> {
        c.warmup = 0;
        (0..n)
            .map(|_| {
                let len = c.interval();
                c.observe(&g.epoch(len))
            })
            .collect()
    }

    /// Direction changes in a run of lengths.
    fn reversals(v: &[Duration]) -> usize {
        let steps: Vec<i8> = v
            .windows(2)
            .filter(|w| w[0] != w[1])
            .map(|w| if w[1] > w[0] { 1 } else { -1 })
            .collect();
        steps.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn bad_settings_are_refused() {
        let e = AdaptiveConfig::new(MS * 50, MS * 25, 10.0, MS, FaultCostSource::Given);
        assert_eq!(
            e.unwrap_err(),
            AdaptiveError::MaxBelowMin {
                min_ms: 50,
                max_ms: 25
            }
        );
        for b in [0.0, -1.0, 100.0, f64::NAN] {
            let e = AdaptiveConfig::new(MS * 25, MS * 100, b, MS, FaultCostSource::Given);
            assert!(matches!(e, Err(AdaptiveError::Budget(_))), "{b}");
        }
    }

    #[test]
    fn the_estimate_is_pause_plus_faults_over_the_length() {
        let c = Controller::new(cfg(25, 200, 10.0));
        let s = EpochSample {
            length: MS * 100,
            pause: MS,
            dirty_pages: 1000,
        };
        // (1 ms + 1000 × 21 µs) / 100 ms.
        assert!((c.overhead(&s) - 0.22).abs() < 1e-9);
        let all = EpochSample {
            dirty_pages: 100_000,
            ..s
        };
        assert_eq!(c.overhead(&all), 1.0);
    }

    #[test]
    fn an_idle_guest_stays_at_the_minimum() {
        let mut c = Controller::new(cfg(25, 200, 10.0));
        let idle = Guest {
            pause_us: 250,
            rate: 0.1,
            span: 3,
        };
        let v = run(&mut c, idle, 200);
        assert!(v.iter().all(|&t| t == MS * 25), "{v:?}");
        assert!(c.estimate() < 0.02);
    }

    #[test]
    fn converges_to_the_shortest_length_in_budget() {
        // 500 pages rewritten: 10.5 ms of faults + 0.5 ms pause per epoch,
        // whatever its length: 11 % at 100 ms, so the budget of 10 % needs
        // 110 ms; the aim (80 %) gives ≈ 137 ms.
        let mut c = Controller::new(cfg(25, 400, 10.0));
        let g = Guest {
            pause_us: 500,
            rate: 1e6,
            span: 500,
        };
        let v = run(&mut c, g, 100);
        let last = *v.last().unwrap();
        assert!(last >= MS * 110 && last <= MS * 140, "{v:?}");
        // Converged: the last 50 epochs at one length.
        assert!(v[50..].iter().all(|&t| t == last), "{v:?}");
        // Never backwards on the way.
        assert_eq!(reversals(&v), 0, "{v:?}");
        // It meets the budget there.
        assert!(c.overhead(&g.epoch(last)) <= 0.1);
    }

    #[test]
    fn a_workload_over_budget_everywhere_goes_to_the_maximum_and_stays() {
        // Writes a new page every 21 µs: all of every epoch is faults.
        let mut c = Controller::new(cfg(25, 100, 10.0));
        let g = Guest {
            pause_us: 1000,
            rate: 48.0,
            span: u64::MAX,
        };
        let v = run(&mut c, g, 100);
        assert_eq!(*v.last().unwrap(), MS * 100);
        assert!(v.iter().all(|&t| t >= MS * 25 && t <= MS * 100));
        assert_eq!(reversals(&v), 0, "{v:?}");
    }

    #[test]
    fn steps_are_bounded() {
        let mut c = Controller::new(cfg(10, 10_000, 5.0));
        let g = Guest {
            pause_us: 1000,
            rate: 1e6,
            span: 4000,
        };
        let v = run(&mut c, g, 200);
        let mut prev = MS * 10;
        for &t in &v {
            let r = t.as_secs_f64() / prev.as_secs_f64();
            assert!(
                (MAX_DOWN - 1e-9..=MAX_UP + 1e-3).contains(&r),
                "{prev:?} -> {t:?}"
            );
            prev = t;
        }
    }

    #[test]
    fn no_oscillation_on_a_noisy_steady_workload() {
        // ±30 % noise on the dirty count, deterministic.
        let mut c = Controller::new(cfg(25, 400, 10.0));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut v = Vec::new();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = 0.7 + 0.6 * (x % 1000) as f64 / 1000.0;
            let len = c.interval();
            let d = (600.0 * noise) as u64;
            v.push(c.observe(&EpochSample {
                length: len,
                pause: Duration::from_micros(600),
                dirty_pages: d,
            }));
        }
        // After the approach, at most a couple of changes in 250 epochs.
        let tail = &v[50..];
        let changes = tail.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 2, "{changes} changes: {tail:?}");
        assert!(reversals(tail) == 0, "{tail:?}");
    }

    #[test]
    fn isolated_long_pauses_do_not_move_the_length() {
        // Every fifth epoch of an idle guest paused 8 ms (40 % of 20 ms),
        // and the warm-up's four.
        let mut c = Controller::new(cfg(20, 80, 10.0));
        for _ in 0..WARMUP {
            c.observe(&EpochSample {
                length: MS * 20,
                pause: MS * 8,
                dirty_pages: 0,
            });
        }
        let v: Vec<Duration> = (0..200)
            .map(|i| {
                let len = c.interval();
                c.observe(&EpochSample {
                    length: len,
                    pause: Duration::from_micros(if i % 5 == 4 { 8000 } else { 300 }),
                    dirty_pages: 3,
                })
            })
            .collect();
        assert!(v.iter().all(|&t| t == MS * 20), "{v:?}");
    }

    #[test]
    fn reacts_to_a_workload_change_and_back() {
        let mut c = Controller::new(cfg(25, 200, 10.0));
        let idle = Guest {
            pause_us: 250,
            rate: 0.1,
            span: 3,
        };
        let busy = Guest {
            pause_us: 800,
            rate: 250.0,
            span: 2048,
        };
        run(&mut c, idle, 20);
        assert_eq!(c.interval(), MS * 25);
        // Busy: longer within a few epochs, up to the maximum (2048 pages
        // are 43 ms of faults: over 10 % of 200 ms).
        let v = run(&mut c, busy, 30);
        assert!(v[..SETTLE].iter().any(|&t| t > MS * 25), "{v:?}");
        assert_eq!(*v.last().unwrap(), MS * 200, "{v:?}");
        // Idle again: back to the minimum.
        let v = run(&mut c, idle, 30);
        assert_eq!(*v.last().unwrap(), MS * 25, "{v:?}");
        assert_eq!(reversals(&v), 0, "{v:?}");
    }

    #[test]
    fn respects_min_and_max_whatever_it_is_fed() {
        let mut c = Controller::new(cfg(20, 60, 10.0));
        let samples = [
            (0, 0, 0),
            (1, 100_000, 1_000_000),
            (60, 0, 0),
            (1000, 60_000, 10),
            (20, 0, u64::MAX),
        ];
        for i in 0..500 {
            let (ms, pause_us, d) = samples[i % samples.len()];
            let t = c.observe(&EpochSample {
                length: MS * ms,
                pause: Duration::from_micros(pause_us),
                dirty_pages: d,
            });
            assert!(t >= MS * 20 && t <= MS * 60, "{t:?}");
        }
    }
}
