//! Epoch accounting (DESIGN.md "Observability").
//!
//! [`EpochMetrics`] is one epoch's record (serde-serializable, for JSON lines and the
//! control API). [`Summary`] keeps a running summary — count, min, median, p99, max,
//! mean — of the interesting fields in fixed-size log-linear histograms: recording an
//! epoch never allocates, memory does not grow with the run's length, and quantiles are
//! exact below 32 and within 1.6 % above (min and max are always exact).

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyCounts;

/// One epoch's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// The epoch.
    pub epoch: u64,
    /// Time the guest was paused for the checkpoint, µs.
    pub pause_us: u64,
    /// Dirty pages only KVM's log reported (vCPU writes).
    pub dirty_vcpu: u64,
    /// Dirty pages only the VMM's bitmap reported (device writes).
    pub dirty_vmm: u64,
    /// Dirty pages both reported.
    pub dirty_both: u64,
    /// Payload bytes staged (pages and state).
    pub bytes_staged: u64,
    /// Bytes sent on the wire (the whole frame: encoded pages, state, disk
    /// records). Against the dirty pages' own bytes ([`EpochMetrics::dirty_bytes`]) it
    /// shows what the page encoding saved.
    pub bytes_sent: u64,
    /// Time to send the checkpoint, µs.
    pub transfer_us: u64,
    /// From resume to the standby's ack, µs.
    pub ack_latency_us: u64,
    /// Output packets held for this epoch.
    pub held_packets: u64,
    /// Output bytes held for this epoch.
    pub held_bytes: u64,
    /// Slabs the checkpoint occupied.
    pub slabs: u64,
    /// Disk writes the checkpoint carried (replicated).
    #[serde(default)]
    pub disk_writes: u64,
    /// Bytes of those writes.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Guest flushes among them (the replica was made durable before the ack).
    #[serde(default)]
    pub disk_flushes: u64,
    /// Time to encode the pages after the resume (zero test, deltas), µs.
    #[serde(default)]
    pub encode_us: u64,
    /// Dirty pages sent as a zero flag.
    #[serde(default)]
    pub zero_pages: u64,
    /// Dirty pages sent as a delta against the standby's copy.
    #[serde(default)]
    pub delta_pages: u64,
    /// The epoch's length as chosen (the interval it ran under), µs: fixed,
    /// or picked by the adaptive mode.
    #[serde(default)]
    pub interval_us: u64,
    /// Adaptive mode: the guest's protection overhead as estimated after
    /// this epoch (the controller's mean), parts per million of its time;
    /// 0 in fixed mode.
    #[serde(default)]
    pub overhead_ppm: u64,
}

impl EpochMetrics {
    /// All dirty pages.
    pub fn dirty_total(&self) -> u64 {
        self.dirty_vcpu + self.dirty_vmm + self.dirty_both
    }

    /// The dirty pages' own bytes (4096 each): what sending them raw would take.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_total() * crate::slab::PAGE_SIZE as u64
    }

    /// Fills the dirty fields from a harvest's counts.
    pub fn set_dirty(&mut self, c: DirtyCounts) {
        self.dirty_vcpu = c.vcpu_only;
        self.dirty_vmm = c.vmm_only;
        self.dirty_both = c.both;
    }
}

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS; // 32 sub-buckets per power of two
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * SUB;

/// A fixed-size log-linear histogram of `u64` values (15 KiB, allocated once).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // ≥ SUB_BITS
    let sub = (v >> (e - SUB_BITS)) as usize - SUB;
    SUB + (e - SUB_BITS) as usize * SUB + sub
}

/// The smallest value and the width of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let shift = ((i - SUB) / SUB) as u32;
    let sub = ((i - SUB) % SUB) as u64;
    ((SUB as u64 + sub) << shift, 1u64 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at quantile `q` (0.0..=1.0): the smallest recorded value with at least
    /// `q` of the values at or below it, up to the bucket's resolution (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        // The extremes are known exactly.
        if rank == 1 {
            return self.min;
        }
        if rank >= self.count {
            return self.max;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                let mid = low.saturating_add((width - 1) / 2);
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// The summary of this field.
    pub fn summarize(&self) -> FieldSummary {
        FieldSummary {
            count: self.count,
            min: self.min(),
            median: self.quantile(0.5),
            p99: self.quantile(0.99),
            max: self.max,
            mean: self.mean(),
        }
    }
}

/// Summary of one field over the epochs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldSummary {
    /// Epochs recorded.
    pub count: u64,
    /// Minimum.
    pub min: u64,
    /// Median.
    pub median: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// A running summary of epochs. Recording allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pause_us: Histogram,
    transfer_us: Histogram,
    ack_latency_us: Histogram,
    dirty_pages: Histogram,
    bytes_sent: Histogram,
    interval_us: Histogram,
    last_epoch: u64,
    total_dirty: DirtyCounts,
    total_bytes_sent: u64,
    total_zero_pages: u64,
    total_delta_pages: u64,
    total_disk_writes: u64,
    total_disk_bytes: u64,
    total_disk_flushes: u64,
}

/// A snapshot of a [`Summary`] (serde-serializable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryReport {
    /// Epochs recorded.
    pub epochs: u64,
    /// The last epoch recorded.
    pub last_epoch: u64,
    /// Pause, µs.
    pub pause_us: FieldSummary,
    /// Transfer time, µs.
    pub transfer_us: FieldSummary,
    /// Ack latency, µs.
    pub ack_latency_us: FieldSummary,
    /// Dirty pages per epoch.
    pub dirty_pages: FieldSummary,
    /// Bytes sent per epoch.
    pub bytes_sent: FieldSummary,
    /// Epoch length as chosen, µs.
    #[serde(default)]
    pub interval_us: FieldSummary,
    /// Dirty pages over the run reported by KVM only.
    pub total_dirty_vcpu: u64,
    /// Dirty pages over the run reported by the VMM bitmap only.
    pub total_dirty_vmm: u64,
    /// Dirty pages over the run reported by both.
    pub total_dirty_both: u64,
    /// Bytes sent over the run.
    pub total_bytes_sent: u64,
    /// Dirty pages sent as a zero flag over the run.
    #[serde(default)]
    pub total_zero_pages: u64,
    /// Dirty pages sent as a delta over the run.
    #[serde(default)]
    pub total_delta_pages: u64,
    /// Disk writes replicated over the run.
    #[serde(default)]
    pub total_disk_writes: u64,
    /// Bytes of disk writes replicated over the run.
    #[serde(default)]
    pub total_disk_bytes: u64,
    /// Guest flushes replicated over the run.
    #[serde(default)]
    pub total_disk_flushes: u64,
}

impl SummaryReport {
    /// Bytes sent over the run as a percentage of the dirty pages' own bytes
    /// (`None` before any page was dirty).
    pub fn sent_percent(&self) -> Option<f64> {
        let dirty = (self.total_dirty_vcpu + self.total_dirty_vmm + self.total_dirty_both)
            * crate::slab::PAGE_SIZE as u64;
        (dirty > 0).then(|| self.total_bytes_sent as f64 * 100.0 / dirty as f64)
    }
}

impl Summary {
    /// An empty summary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts one epoch.
    pub fn record(&mut self, m: &EpochMetrics) {
        self.pause_us.record(m.pause_us);
        self.transfer_us.record(m.transfer_us);
        self.ack_latency_us.record(m.ack_latency_us);
        self.dirty_pages.record(m.dirty_total());
        self.bytes_sent.record(m.bytes_sent);
        self.interval_us.record(m.interval_us);
        self.last_epoch = m.epoch;
        self.total_dirty.add(DirtyCounts {
            vcpu_only: m.dirty_vcpu,
            vmm_only: m.dirty_vmm,
            both: m.dirty_both,
        });
        self.total_bytes_sent += m.bytes_sent;
        self.total_zero_pages += m.zero_pages;
        self.total_delta_pages += m.delta_pages;
        self.total_disk_writes += m.disk_writes;
        self.total_disk_bytes += m.disk_bytes;
        self.total_disk_flushes += m.disk_flushes;
    }

    /// Epochs recorded.
    pub fn count(&self) -> u64 {
        self.pause_us.count()
    }

    /// The pause-time histogram.
    pub fn pause_us(&self) -> &Histogram {
        &self.pause_us
    }

    /// A snapshot.
    pub fn report(&self) -> SummaryReport {
        SummaryReport {
            epochs: self.count(),
            last_epoch: self.last_epoch,
            pause_us: self.pause_us.summarize(),
            transfer_us: self.transfer_us.summarize(),
            ack_latency_us: self.ack_latency_us.summarize(),
            dirty_pages: self.dirty_pages.summarize(),
            bytes_sent: self.bytes_sent.summarize(),
            interval_us: self.interval_us.summarize(),
            total_dirty_vcpu: self.total_dirty.vcpu_only,
            total_dirty_vmm: self.total_dirty.vmm_only,
            total_dirty_both: self.total_dirty.both,
            total_bytes_sent: self.total_bytes_sent,
            total_zero_pages: self.total_zero_pages,
            total_delta_pages: self.total_delta_pages,
            total_disk_writes: self.total_disk_writes,
            total_disk_bytes: self.total_disk_bytes,
            total_disk_flushes: self.total_disk_flushes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut expect_low = 0u64;
        for i in 0..BUCKETS {
            let (low, width) = bucket_range(i);
            assert_eq!(low, expect_low, "bucket {i}");
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(low + (width - 1)), i);
            expect_low = low.wrapping_add(width);
        }
        assert_eq!(expect_low, 0, "the last bucket ends at u64::MAX");
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn exact_for_small_values() {
        let mut h = Histogram::new();
        for v in 1..=31 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 16);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 31);
        assert_eq!(h.quantile(0.0), 1);
        assert_eq!(h.quantile(1.0), 31);
        assert!((h.mean() - 16.0).abs() < 1e-9);
    }

    #[test]
    fn quantiles_within_resolution() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 10);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        let empty = Histogram::new();
        assert_eq!(
            (empty.min(), empty.quantile(0.5), empty.mean()),
            (0, 0, 0.0)
        );
    }

    #[test]
    fn summary_report_serializes() {
        let mut s = Summary::new();
        for e in 0..100 {
            s.record(&EpochMetrics {
                epoch: e,
                pause_us: 100 + e,
                dirty_vcpu: 10,
                dirty_vmm: 2,
                dirty_both: 1,
                bytes_sent: 1000,
                ..Default::default()
            });
        }
        let r = s.report();
        assert_eq!(r.epochs, 100);
        assert_eq!(r.last_epoch, 99);
        assert_eq!(r.pause_us.min, 100);
        assert_eq!(r.pause_us.max, 199);
        assert!(
            (r.pause_us.median as i64 - 149).abs() <= 2,
            "{}",
            r.pause_us.median
        );
        assert_eq!(r.dirty_pages.median, 13);
        assert_eq!(
            (r.total_dirty_vcpu, r.total_dirty_vmm, r.total_dirty_both),
            (1000, 200, 100)
        );
        assert_eq!(r.total_bytes_sent, 100_000);
        // 100 epochs × 13 dirty pages × 4096 bytes, of which 100 000 bytes sent.
        let pct = r.sent_percent().unwrap();
        assert!(
            (pct - 100_000.0 * 100.0 / (1300.0 * 4096.0)).abs() < 1e-9,
            "{pct}"
        );
        assert_eq!(SummaryReport::default().sent_percent(), None);
        let line = serde_json::to_string(&EpochMetrics {
            epoch: 3,
            ..Default::default()
        })
        .unwrap();
        assert!(line.starts_with("{\"epoch\":3,\"pause_us\":0"), "{line}");
        assert!(serde_json::to_string(&r).unwrap().contains("\"p99\""));
    }
}
