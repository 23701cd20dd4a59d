//! Guest speed: how fast the guest works protected against unprotected, in
//! the demo run itself. Both rates come from the guest's heartbeat counter
//! as its consoles show it: protected, on the primary (its released
//! output) before the kill; unprotected, on the standby after the takeover
//! (the same guest and command line, with no standby of its own and dirty
//! tracking off). Each is the least-squares slope of heartbeat over time,
//! after a warm-up, so output released in bursts (one per epoch) reads as
//! its mean rate.

use std::time::{Duration, Instant};

/// Skipped at the start of the protected run (its first epochs follow the
/// initial sync).
pub const PROTECTED_WARMUP: Duration = Duration::from_millis(500);
/// Skipped at the start of the run on the standby (the guest's first touch
/// of each page in a freshly restored VM costs a fault there).
pub const UNPROTECTED_WARMUP: Duration = Duration::from_millis(300);
/// The shortest window a rate is given for.
const MIN_WINDOW: Duration = Duration::from_millis(300);

/// Heartbeats over time, from `start + warmup` on.
pub struct HbRate {
    from: Instant,
    /// (seconds since `from`, heartbeat).
    samples: Vec<(f64, f64)>,
}

impl HbRate {
    /// A rate whose samples count from `start + warmup`.
    pub fn new(start: Instant, warmup: Duration) -> HbRate {
        HbRate {
            from: start + warmup,
            samples: Vec::new(),
        }
    }

    /// The guest's last heartbeat `hb` as seen at `now`.
    pub fn record(&mut self, now: Instant, hb: Option<u64>) {
        if let (Some(hb), Some(t)) = (hb, now.checked_duration_since(self.from)) {
            self.samples.push((t.as_secs_f64(), hb as f64));
        }
    }

    /// Heartbeats per second, once the samples span at least
    /// [`MIN_WINDOW`].
    pub fn per_sec(&self) -> Option<f64> {
        let s = &self.samples;
        let span = s.last()?.0 - s.first()?.0;
        if span < MIN_WINDOW.as_secs_f64() {
            return None;
        }
        let n = s.len() as f64;
        let mt = s.iter().map(|p| p.0).sum::<f64>() / n;
        let mh = s.iter().map(|p| p.1).sum::<f64>() / n;
        let cov: f64 = s.iter().map(|p| (p.0 - mt) * (p.1 - mh)).sum();
        let var: f64 = s.iter().map(|p| (p.0 - mt) * (p.0 - mt)).sum();
        (var > 0.0).then(|| cov / var)
    }
}

/// The summary's guest speed line.
pub fn speed_line(protected: Option<f64>, unprotected: Option<f64>) -> String {
    match (protected, unprotected) {
        (Some(p), Some(u)) if u > 0.0 => format!(
            "guest speed: {:.0} % of unprotected ({p:.1} heartbeats/s protected on the primary, \
             {u:.1}/s unprotected on the standby after the takeover)",
            p / u * 100.0
        ),
        (_, None) => "guest speed: not measured (the guest ran too briefly on the standby: \
                      see --keep-running-secs)"
            .to_string(),
        _ => "guest speed: not measured (too few heartbeats before the kill)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_the_slope_after_the_warmup() {
        let t0 = Instant::now();
        let mut r = HbRate::new(t0, Duration::from_millis(100));
        // Before the warm-up ends: ignored (a different rate).
        r.record(t0 + Duration::from_millis(50), Some(1000));
        assert_eq!(r.per_sec(), None);
        // 40 heartbeats/s, released in bursts every 100 ms.
        for ms in (100..=1100).step_by(20) {
            let released = (ms / 100 * 100) as f64 * 0.04;
            r.record(t0 + Duration::from_millis(ms), Some(released as u64));
        }
        let rate = r.per_sec().unwrap();
        assert!((rate - 40.0).abs() < 4.0, "{rate}");
        r.record(t0 + Duration::from_millis(1200), None);
    }

    #[test]
    fn line_says_percent_of_unprotected() {
        assert_eq!(
            speed_line(Some(31.0), Some(155.0)),
            "guest speed: 20 % of unprotected (31.0 heartbeats/s protected on the primary, \
             155.0/s unprotected on the standby after the takeover)"
        );
        assert!(speed_line(Some(31.0), None).starts_with("guest speed: not measured"));
        assert!(speed_line(None, Some(1.0)).starts_with("guest speed: not measured"));
    }
}
