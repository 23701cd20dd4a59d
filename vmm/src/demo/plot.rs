//! The SVG plot: per-epoch pause µs (left axis) and dirty pages (right
//! axis), with a vertical marker at the epoch the primary was killed in.

use std::fmt::Write as _;

use ftvmm_checkpoint::EpochMetrics;

use super::summary::{quantile, sorted};

const W: f64 = 960.0;
const H: f64 = 480.0;
/// Margins: left, right, top, bottom.
const L: f64 = 80.0;
const R: f64 = 90.0;
const T: f64 = 60.0;
const B: f64 = 60.0;
const PW: f64 = W - L - R;
const PH: f64 = H - T - B;
const PAUSE: &str = "#1f77b4";
const DIRTY: &str = "#ff7f0e";
const KILL: &str = "#d62728";

/// What the plot shows besides the epochs.
pub struct PlotInfo {
    /// The epoch in flight when the primary was killed.
    pub kill_epoch: u64,
    /// From the kill to the guest running on the standby.
    pub takeover_ms: f64,
    /// The epochs, in words ("25 ms", "adaptive 25 to 200 ms").
    pub epochs: String,
    /// The guest's dirty pages per round.
    pub dirty: u64,
}

/// The plot as an SVG document.
pub fn plot_svg(epochs: &[EpochMetrics], info: &PlotInfo) -> String {
    let frame = Frame::new(epochs, info.kill_epoch);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        esc(&format!(
            "ftvmm demo: per-epoch pause and dirty pages ({} epochs, dirty={} pages per round)",
            info.epochs, info.dirty
        ))
    );
    frame.axes(&mut s);
    frame.series(&mut s, epochs);
    frame.kill_marker(&mut s, info);
    legend(&mut s);
    s.push_str("</svg>\n");
    s
}

/// The scales of the plot.
struct Frame {
    /// First and last epoch on the x axis.
    x0: f64,
    x1: f64,
    xstep: f64,
    /// Pause axis: tick step and top.
    pstep: f64,
    ptop: f64,
    /// Dirty pages axis: tick step and top.
    dstep: f64,
    dtop: f64,
}

impl Frame {
    fn new(epochs: &[EpochMetrics], kill_epoch: u64) -> Frame {
        let x0 = epochs.first().map_or(0, |m| m.epoch) as f64;
        // Room after the kill, so the marker stands inside the frame.
        let span = (kill_epoch as f64 - x0).max(1.0);
        let x1 = x0 + span + (span * 0.06).max(1.0);
        let (xstep, _) = nice_axis(x1 - x0, 8.0);
        // A few outliers (the first epoch after the initial sync, a host
        // hiccup) would flatten the rest: scale to the largest pause within
        // 3 × the 95th percentile, and draw the points above at the top,
        // labelled.
        let pauses = sorted(epochs.iter().map(|m| m.pause_us));
        let p95 = quantile(&pauses, 0.95);
        let pscale = pauses
            .iter()
            .rev()
            .find(|&&p| p <= 3 * p95)
            .copied()
            .unwrap_or(p95);
        let (pstep, ptop) = nice_axis(pscale as f64, 5.0);
        let dmax = epochs.iter().map(EpochMetrics::dirty_total).max();
        let (dstep, dtop) = nice_axis(dmax.unwrap_or(0) as f64, 5.0);
        Frame {
            x0,
            x1,
            xstep,
            pstep,
            ptop,
            dstep,
            dtop,
        }
    }

    fn sx(&self, epoch: f64) -> f64 {
        L + (epoch - self.x0) / (self.x1 - self.x0) * PW
    }

    fn sy(v: f64, top: f64) -> f64 {
        T + PH - v / top * PH
    }

    /// Grid, ticks, frame and axis titles.
    fn axes(&self, s: &mut String) {
        let mut e = (self.x0 / self.xstep).ceil() * self.xstep;
        while e <= self.x1 + 1e-9 {
            let x = self.sx(e);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#eee"/><line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                T + PH,
                T + PH,
                T + PH + 5.0,
                T + PH + 20.0,
                e as u64
            );
            e += self.xstep;
        }
        // Left axis (pause µs), with the horizontal grid.
        let mut v = 0.0;
        while v <= self.ptop + 1e-9 {
            let y = Self::sy(v, self.ptop);
            let _ = writeln!(
                s,
                r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><line x1="{}" y1="{y:.1}" x2="{L}" y2="{y:.1}" stroke="black"/><text x="{}" y="{:.1}" text-anchor="end" fill="{PAUSE}">{}</text>"##,
                L + PW,
                L - 5.0,
                L - 8.0,
                y + 4.0,
                v as u64
            );
            v += self.pstep;
        }
        // Right axis (dirty pages).
        let mut v = 0.0;
        while v <= self.dtop + 1e-9 {
            let y = Self::sy(v, self.dtop);
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="black"/><text x="{}" y="{:.1}" fill="{DIRTY}">{}</text>"#,
                L + PW,
                L + PW + 5.0,
                L + PW + 8.0,
                y + 4.0,
                v as u64
            );
            v += self.dstep;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{L}" y="{T}" width="{PW}" height="{PH}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#,
            L + PW / 2.0,
            H - 15.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle" fill="{PAUSE}">pause (µs)</text>"#,
            T + PH / 2.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle" fill="{DIRTY}">dirty pages</text>"#,
            W - 20.0,
            T + PH / 2.0
        );
    }

    /// The two polylines, and labels for the pauses above the scale.
    fn series(&self, s: &mut String, epochs: &[EpochMetrics]) {
        let points = |f: &dyn Fn(&EpochMetrics) -> u64, top: f64| {
            let mut pts = String::new();
            for m in epochs {
                let y = Self::sy((f(m) as f64).min(top), top);
                let _ = write!(pts, "{:.1},{y:.1} ", self.sx(m.epoch as f64));
            }
            pts.trim_end().to_string()
        };
        let _ = writeln!(
            s,
            r#"<polyline id="dirty-pages" fill="none" stroke="{DIRTY}" stroke-width="1.5" points="{}"/>"#,
            points(&EpochMetrics::dirty_total, self.dtop)
        );
        let _ = writeln!(
            s,
            r#"<polyline id="pause-us" fill="none" stroke="{PAUSE}" stroke-width="1.5" points="{}"/>"#,
            points(&|m| m.pause_us, self.ptop)
        );
        for m in epochs.iter().filter(|m| m.pause_us as f64 > self.ptop) {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" fill="{PAUSE}" font-size="10">↑ {} µs</text>"#,
                self.sx(m.epoch as f64) + 3.0,
                T + 24.0,
                m.pause_us
            );
        }
    }

    fn kill_marker(&self, s: &mut String, info: &PlotInfo) {
        let kx = self.sx(info.kill_epoch as f64);
        let _ = writeln!(
            s,
            r#"<line id="kill" x1="{kx:.1}" y1="{T}" x2="{kx:.1}" y2="{}" stroke="{KILL}" stroke-width="2" stroke-dasharray="6,4"/><text x="{:.1}" y="{}" text-anchor="end" fill="{KILL}">SIGKILL primary (in-flight epoch {}) → guest running on the standby {:.1} ms later</text>"#,
            T + PH,
            kx - 4.0,
            T + 14.0,
            info.kill_epoch,
            info.takeover_ms
        );
    }
}

fn legend(s: &mut String) {
    let (lx, ly) = (L + 10.0, T - 22.0);
    let _ = writeln!(
        s,
        r#"<g id="legend"><line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{PAUSE}" stroke-width="3"/><text x="{}" y="{}">pause µs (left axis)</text><line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{DIRTY}" stroke-width="3"/><text x="{}" y="{}">dirty pages (right axis)</text><line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{KILL}" stroke-width="2" stroke-dasharray="6,4"/><text x="{}" y="{}">primary killed</text></g>"#,
        lx + 24.0,
        lx + 30.0,
        ly + 4.0,
        lx + 170.0,
        lx + 194.0,
        lx + 200.0,
        ly + 4.0,
        lx + 360.0,
        lx + 384.0,
        lx + 390.0,
        ly + 4.0,
    );
}

/// Ticks for an axis from 0 to at least `max`, about `ticks` of them, on
/// whole numbers: (step, top).
fn nice_axis(max: f64, ticks: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let step = if step < 1.0 { 1.0 } else { step };
    (step, (max / step).ceil().max(1.0) * step)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes_cover_the_data() {
        for max in [0.0, 1.0, 7.0, 512.0, 1030.0, 98_765.0] {
            let (step, top) = nice_axis(max, 5.0);
            assert!(
                top >= max && step >= 1.0 && top / step <= 10.0,
                "{max}: {step} {top}"
            );
        }
    }

    #[test]
    fn plot_has_both_series_and_the_kill() {
        let epochs: Vec<EpochMetrics> = (1..=50)
            .map(|e| EpochMetrics {
                epoch: e,
                pause_us: 300 + e * 3,
                dirty_vcpu: 1000 + e,
                ..Default::default()
            })
            .collect();
        let info = PlotInfo {
            kill_epoch: 51,
            takeover_ms: 3.5,
            epochs: "25 ms".into(),
            dirty: 512,
        };
        let svg = plot_svg(&epochs, &info);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(r#"id="kill""#));
        assert!(svg.contains("in-flight epoch 51"));
        assert!(!svg.contains('↑'), "nothing to clip");
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
        // An outlier is clipped to the scale of the rest, and labelled.
        let mut spiky = epochs.clone();
        spiky[0].pause_us = 100_000;
        let svg = plot_svg(&spiky, &info);
        assert!(svg.contains("↑ 100000 µs"), "{svg}");
        // Only one epoch still draws.
        let one = plot_svg(
            &epochs[..1],
            &PlotInfo {
                kill_epoch: 2,
                ..info
            },
        );
        assert!(!one.contains("NaN") && !one.contains("inf"));
    }
}
