//! The summary table printed at the end, and the order statistics it and
//! the live status use.

use std::fmt::Write as _;
use std::time::Duration;

use ftvmm_checkpoint::EpochMetrics;

use super::takeover::Takeover;

/// The exact nearest-rank quantile of `sorted` (0 when empty).
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `values`, sorted.
pub fn sorted(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A per-epoch figure.
type Field = fn(&EpochMetrics) -> u64;

/// The table: epochs, bytes sent, min / median / p99 / max of the per-epoch
/// figures, the disk writes replicated in all, and the takeover.
pub fn summary_table(epochs: &[EpochMetrics], t: &Takeover, epochs_text: &str) -> String {
    let sent: u64 = epochs.iter().map(|m| m.bytes_sent).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "summary: {} epochs of {epochs_text} on the primary, {:.1} MB sent to the standby",
        epochs.len(),
        sent as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "  {:<24} {:>9} {:>9} {:>9} {:>9}",
        "", "min", "median", "p99", "max"
    );
    // The epoch length's row where it varied (adaptive epochs).
    let varied = epochs
        .windows(2)
        .any(|w| w[0].interval_us != w[1].interval_us);
    let length: [(&str, Field); 1] = [("epoch length ms", |m| m.interval_us / 1000)];
    let rows: [(&str, Field); 4] = [
        ("pause µs", |m| m.pause_us),
        ("dirty pages / epoch", EpochMetrics::dirty_total),
        ("transfer µs", |m| m.transfer_us),
        ("ack latency µs", |m| m.ack_latency_us),
    ];
    for &(name, field) in length.iter().filter(|_| varied).chain(&rows) {
        let v = sorted(epochs.iter().map(field));
        let _ = writeln!(
            s,
            "  {:<24} {:>9} {:>9} {:>9} {:>9}",
            name,
            quantile(&v, 0.0),
            quantile(&v, 0.5),
            quantile(&v, 0.99),
            quantile(&v, 1.0)
        );
    }
    let total = |f: Field| epochs.iter().map(f).sum::<u64>();
    let dirty = total(EpochMetrics::dirty_bytes);
    if dirty > 0 {
        let _ = writeln!(
            s,
            "  sent: {:.1} % of dirty page bytes ({} for {} of dirty pages; {} zero and {} delta pages)",
            sent as f64 * 100.0 / dirty as f64,
            size(sent),
            size(dirty),
            total(|m| m.zero_pages),
            total(|m| m.delta_pages)
        );
    }
    let (writes, bytes) = (total(|m| m.disk_writes), total(|m| m.disk_bytes));
    let _ = writeln!(
        s,
        "  {:<24} {:>9} ({}), {} flushes, in {} of {} epochs",
        "disk writes replicated",
        writes,
        size(bytes),
        total(|m| m.disk_flushes),
        epochs.iter().filter(|m| m.disk_writes > 0).count(),
        epochs.len()
    );
    let _ = writeln!(
        s,
        "  {:<24} {:>9.1} ms to the guest running, {:.1} ms to its first heartbeat (after the SIGKILL)",
        "takeover",
        ms(t.running_after_kill),
        ms(t.first_hb_after_kill)
    );
    s
}

/// `bytes` in kB or MB.
fn size(bytes: u64) -> String {
    if bytes < 1_000_000 {
        format!("{:.1} kB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                quantile(&v, 0.0),
                quantile(&v, 0.5),
                quantile(&v, 0.99),
                quantile(&v, 1.0)
            ),
            (1, 50, 99, 100)
        );
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn table_has_every_row() {
        let epochs: Vec<EpochMetrics> = (1..=10)
            .map(|e| EpochMetrics {
                epoch: e,
                pause_us: e * 100,
                bytes_sent: 1_000_000,
                dirty_vcpu: 1000,
                delta_pages: 900,
                disk_writes: e % 2 * 5,
                disk_bytes: e % 2 * 2560,
                disk_flushes: u64::from(e == 3),
                ..Default::default()
            })
            .collect();
        let t = Takeover {
            checkpoint: 10,
            running_after_kill: Duration::from_micros(9_000),
            standby_own_ms: 2.7,
            first_hb_after_kill: Duration::from_micros(17_000),
            first_hb: 100,
            primary_gone: None,
        };
        let s = summary_table(&epochs, &t, "25 ms");
        assert!(s.starts_with("summary: 10 epochs of 25 ms on the primary, 10.0 MB sent"));
        assert!(
            s.contains("  sent: 24.4 % of dirty page bytes (10.0 MB for 41.0 MB of dirty pages; 0 zero and 9000 delta pages)"),
            "{s}"
        );
        for row in [
            "pause µs",
            "dirty pages / epoch",
            "transfer µs",
            "ack latency µs",
            "disk writes replicated",
        ] {
            assert!(s.lines().any(|l| l.trim_start().starts_with(row)), "{s}");
        }
        assert!(
            s.contains(
                "  disk writes replicated          25 (12.8 kB), 1 flushes, in 5 of 10 epochs"
            ),
            "{s}"
        );
        assert_eq!(size(2_600_000), "2.6 MB");
        assert!(s.contains("9.0 ms to the guest running, 17.0 ms to its first heartbeat"));
        assert!(
            s.contains("  pause µs                       100       500      1000      1000"),
            "{s}"
        );
        assert!(!s.contains("epoch length ms"), "fixed epochs: {s}");
        // Adaptive epochs: the lengths' row.
        let varied: Vec<EpochMetrics> = epochs
            .iter()
            .map(|m| EpochMetrics {
                interval_us: 25_000 * m.epoch.min(4),
                ..*m
            })
            .collect();
        let s = summary_table(&varied, &t, "adaptive 25 to 200 ms");
        assert!(s.starts_with("summary: 10 epochs of adaptive 25 to 200 ms on the primary"));
        assert!(
            s.contains("  epoch length ms                 25       100       100       100"),
            "{s}"
        );
    }
}
