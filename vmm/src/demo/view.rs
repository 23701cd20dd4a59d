//! What the demo sees of the primary's run in the files it writes: its
//! per-epoch metrics (`--ft-metrics`, one JSON line per committed epoch) and
//! its released console output (`--serial file:`).

use std::path::Path;
use std::time::Duration;

use ftvmm::transcript::hb_line;
use ftvmm_checkpoint::EpochMetrics;

use super::error::DemoError;
use super::summary::{quantile, sorted};
use super::tail::Tail;

/// The primary's epochs and released heartbeats so far.
pub struct PrimaryView {
    metrics: Tail,
    console: Tail,
    /// Every epoch recorded, in order.
    pub epochs: Vec<EpochMetrics>,
    /// First heartbeat released.
    pub hb_first: Option<u64>,
    /// Last heartbeat released.
    pub hb_last: Option<u64>,
    /// Heartbeats released.
    pub hb_count: u64,
}

impl PrimaryView {
    /// Follows the metrics file `metrics` and the console file `console`.
    pub fn new(metrics: &Path, console: &Path) -> PrimaryView {
        PrimaryView {
            metrics: Tail::new(metrics.to_path_buf()),
            console: Tail::new(console.to_path_buf()),
            epochs: Vec::new(),
            hb_first: None,
            hb_last: None,
            hb_count: 0,
        }
    }

    /// Reads what was appended since the last poll.
    pub fn poll(&mut self) -> Result<(), DemoError> {
        let mut bad = None;
        let epochs = &mut self.epochs;
        self.metrics.poll(|line| {
            if line.trim().is_empty() {
                return;
            }
            match serde_json::from_str::<EpochMetrics>(line) {
                Ok(m) => epochs.push(m),
                Err(_) => bad = bad.take().or_else(|| Some(line.to_string())),
            }
        })?;
        if let Some(line) = bad {
            return Err(DemoError::Metrics {
                path: self.metrics.path.clone(),
                line,
            });
        }
        let (first, last, count) = (&mut self.hb_first, &mut self.hb_last, &mut self.hb_count);
        self.console.poll(|line| {
            if let Some(n) = hb_line(line) {
                first.get_or_insert(n);
                *last = Some(n);
                *count += 1;
            }
        })
    }

    /// Bytes streamed to the standby so far.
    pub fn bytes_sent(&self) -> u64 {
        self.epochs.iter().map(|m| m.bytes_sent).sum()
    }

    /// Disk writes replicated to the standby so far.
    pub fn disk_writes(&self) -> u64 {
        self.epochs.iter().map(|m| m.disk_writes).sum()
    }

    /// The last epoch recorded (0 before the first).
    pub fn last_epoch(&self) -> u64 {
        self.epochs.last().map_or(0, |m| m.epoch)
    }

    /// The live status line of the protected run, `t` into it, with the
    /// stream's rate `mbps` over the last period and the disk writes
    /// replicated so far.
    pub fn status_line(&self, t: Duration, mbps: f64) -> String {
        let Some(last) = self.epochs.last() else {
            return String::new();
        };
        let pauses = sorted(self.epochs.iter().map(|m| m.pause_us));
        format!(
            "[{:4.1}s] epoch {:>5} | pause {:>5} µs (median {:>5}) | dirty {:>5} pages | {:>6.1} MB/s | held {:>4} B | disk {:>6} writes | hb released {:>5}",
            t.as_secs_f64(),
            last.epoch,
            last.pause_us,
            quantile(&pauses, 0.5),
            last.dirty_total(),
            mbps,
            last.held_bytes,
            self.disk_writes(),
            self.hb_count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_metrics_and_console() {
        let dir = std::env::temp_dir().join(format!("ftvmm-demo-view-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (m, c) = (dir.join("metrics.jsonl"), dir.join("console"));
        let mut v = PrimaryView::new(&m, &c);
        v.poll().unwrap();
        assert!(v.epochs.is_empty() && v.status_line(Duration::ZERO, 0.0).is_empty());
        let e = |n: u64| EpochMetrics {
            epoch: n,
            pause_us: 100 * n,
            dirty_vcpu: 7,
            bytes_sent: 1000,
            held_bytes: 15,
            disk_writes: 4,
            disk_bytes: 2048,
            ..Default::default()
        };
        let lines: String = [e(1), e(2), e(3)]
            .iter()
            .map(|m| serde_json::to_string(m).unwrap() + "\n")
            .collect();
        std::fs::write(&m, lines).unwrap();
        std::fs::write(&c, "ftguest ready\nftguest hb=1\nftguest hb=2\nftguest hb=").unwrap();
        v.poll().unwrap();
        assert_eq!(
            (v.last_epoch(), v.bytes_sent(), v.disk_writes()),
            (3, 3000, 12)
        );
        assert_eq!((v.hb_first, v.hb_last, v.hb_count), (Some(1), Some(2), 2));
        let line = v.status_line(Duration::from_secs(1), 12.5);
        assert!(
            line.starts_with("[ 1.0s] epoch     3 | pause   300 µs (median   200)"),
            "{line}"
        );
        assert!(
            line.contains("|   12.5 MB/s | held   15 B | disk     12 writes | hb released     2"),
            "{line}"
        );
        // Garbage in the metrics file is an error naming the line.
        std::fs::write(&m, "not json\n").unwrap();
        let mut v = PrimaryView::new(&m, &c);
        assert!(matches!(v.poll(), Err(DemoError::Metrics { line, .. }) if line == "not json"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
