//! Per-epoch metrics of a running VM: one JSON line per epoch in the
//! metrics file (`--ft-metrics`), the run's summary, and the last epoch for
//! `ctl stats`.

use std::fs::File;
use std::io::{BufWriter, Write};

use ftvmm_checkpoint::{EpochMetrics, Summary};
use ftvmm_netbuf::NetOutput;

use super::{FtError, FtOptions};

/// Per-epoch metrics sink: JSON lines and the run's summary.
pub struct MetricsLog {
    file: Option<BufWriter<File>>,
    /// Every epoch so far.
    pub summary: Summary,
    /// The last committed epoch.
    pub last: Option<EpochMetrics>,
}

impl MetricsLog {
    /// A sink writing to `ft.metrics_path`, if given.
    pub fn new(ft: &FtOptions) -> Result<Self, FtError> {
        let file = match &ft.metrics_path {
            Some(p) => Some(BufWriter::new(File::create(p).map_err(|source| {
                FtError::Metrics {
                    path: p.display().to_string(),
                    source,
                }
            })?)),
            None => None,
        };
        Ok(MetricsLog {
            file,
            summary: Summary::new(),
            last: None,
        })
    }

    /// Records one committed epoch.
    pub fn record(&mut self, m: &EpochMetrics) {
        self.summary.record(m);
        self.last = Some(*m);
        if let Some(f) = &mut self.file {
            if serde_json::to_writer(&mut *f, m).is_ok() {
                let _ = f.write_all(b"\n");
                let _ = f.flush();
            }
        }
    }

    /// The run's summary line, for the VM's `side` ("primary", …).
    pub fn log_summary(&self, side: &str) {
        if self.summary.count() == 0 {
            return;
        }
        let r = self.summary.report();
        let sent = r
            .sent_percent()
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}"));
        log::info!(
            target: crate::REPORT,
            "{side}: {} epochs of {} ms (median; {} to {}); pause µs median {} p99 {} max {}; dirty pages median {} max {}; \
             transfer µs median {}; ack latency µs median {} p99 {}; {} MiB sent \
             (sent: {sent} % of dirty page bytes; {} zero and {} delta pages); \
             disk: {} writes, {} MiB, {} flushes replicated",
            r.epochs,
            ms(r.interval_us.median),
            ms(r.interval_us.min),
            ms(r.interval_us.max),
            r.pause_us.median,
            r.pause_us.p99,
            r.pause_us.max,
            r.dirty_pages.median,
            r.dirty_pages.max,
            r.transfer_us.median,
            r.ack_latency_us.median,
            r.ack_latency_us.p99,
            r.total_bytes_sent >> 20,
            r.total_zero_pages,
            r.total_delta_pages,
            r.total_disk_writes,
            r.total_disk_bytes >> 20,
            r.total_disk_flushes
        );
    }
}

/// µs as ms, one decimal.
fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1e3)
}

/// The netbuf's line of the run summary, with the held-time histogram.
pub fn log_netbuf_summary(netbuf: &dyn NetOutput) {
    let r = netbuf.report();
    if r.frames_held == 0 {
        return;
    }
    log::info!(
        target: crate::REPORT,
        "netbuf {}: {} frames ({} KiB) held, {} released, {} discarded; held µs median {} p99 {} max {}; \
         {} early cuts, {} backpressure waits, {} over limit, peak {} of {} KiB",
        netbuf.backend(),
        r.frames_held,
        r.bytes_held >> 10,
        r.frames_released,
        r.frames_discarded,
        r.held_us.median,
        r.held_us.p99,
        r.held_us.max,
        r.early_cuts,
        r.backpressure_waits,
        r.over_limit,
        r.peak_bytes >> 10,
        r.limit_bytes >> 10,
    );
}
