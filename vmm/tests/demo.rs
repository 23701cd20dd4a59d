//! `ftvmm demo` through the real binary: a failover on this machine that
//! ends with exit 0, an exactly-once transcript, a verified disk replica, a
//! summary table with the guest's speed, a well-formed SVG plot, and no
//! process left behind.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn demo_fails_over_checks_exactly_once_and_plots() {
    let dir = TempDir::new("demo");
    let out = run(
        &[
            "demo",
            "--kill-after-secs",
            "2",
            "--keep-running-secs",
            "1",
            "--dir",
            dir.0.to_str().unwrap(),
        ],
        Duration::from_secs(180),
    );
    let all = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({:?})\n{all}",
        out.status
    );

    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{all}"))
            .to_string()
    };
    // The live status: at least one line with the epoch and the streamed rate.
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("epoch") && l.contains("MB/s")),
        "{all}"
    );
    assert!(line("SIGKILL primary").contains("checkpoints committed"));
    assert!(line("takeover:").contains("guest running again"), "{all}");
    let ok = line("exactly-once: OK (primary released hb 1..=");
    assert!(ok.contains("standby continued from hb"), "{ok}");
    // The standby's heartbeats are on its replica: records from hb 1 on,
    // up to the last one it printed (whose record a stop may have beaten).
    let standby_last: u64 = number_after(&ok, "standby reached hb ");
    let disk = line("disk replica: OK (records hb 1..=");
    let replica_last: u64 = number_after(&disk, "records hb 1..=");
    assert!(
        replica_last == standby_last || replica_last + 1 == standby_last,
        "{disk}\n{ok}"
    );
    assert!(disk.contains("all at their sectors"), "{disk}");
    assert!(number_after(&disk, "primary wrote 1..=") > 0, "{disk}");
    for img in ["primary.img", "replica.img"] {
        let len = std::fs::metadata(dir.path(img)).map(|m| m.len());
        assert_eq!(len.ok(), Some(8 << 20), "{img}");
    }
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("epoch") && l.contains("| disk ") && l.contains(" writes |")),
        "no disk writes in the status line\n{all}"
    );

    // The summary table.
    let summary = line("summary: ");
    assert!(
        summary.contains("epochs") && summary.contains("MB sent"),
        "{summary}"
    );
    // The bytes on the wire against the dirty pages' own: the guest writes
    // one word per page, so the deltas leave a few per cent at most.
    let sent = line("  sent: ");
    let pct: f64 = sent
        .trim_start_matches("  sent: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{sent}"));
    assert!(pct < 25.0, "{sent}");
    assert!(sent.contains("% of dirty page bytes"), "{sent}");
    for row in [
        "pause µs",
        "dirty pages / epoch",
        "ack latency µs",
        "disk writes replicated",
        "takeover",
    ] {
        assert!(
            out.stdout.lines().any(|l| l.trim_start().starts_with(row)),
            "no {row:?} row\n{all}"
        );
    }

    // The guest's speed, protected against unprotected, measured in the run.
    let speed = line("guest speed: ");
    assert!(
        speed.contains("% of unprotected") && speed.contains("heartbeats/s protected"),
        "{speed}"
    );
    let percent = number_after(&speed, "guest speed: ");
    assert!(percent > 0 && percent < 1000, "{speed}");

    // The plot, in the directory, and well-formed enough.
    let plot = line("plot: ");
    let plot = plot.trim_start_matches("plot: ");
    assert_eq!(std::path::Path::new(plot), dir.path("epochs.svg"));
    let svg = std::fs::read_to_string(plot).expect("the plot exists");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains(r#"<polyline id="pause-us""#),
        "no pause series"
    );
    assert!(
        svg.contains(r#"<polyline id="dirty-pages""#),
        "no dirty series"
    );
    assert!(svg.contains(r#"id="kill""#), "no kill marker");
    assert_eq!(svg.matches('<').count(), svg.matches('>').count());

    // Both roles are gone: the demo reaped them.
    let pids: Vec<i32> = out
        .stdout
        .split("(pid ")
        .skip(1)
        .filter_map(|s| s.split(')').next()?.parse().ok())
        .collect();
    assert!(pids.len() >= 2, "{all}");
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "process {pid} outlived the demo");
    }
}

/// The number that follows `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> u64 {
    let rest = line
        .split_once(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {line:?}"))
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line:?}"))
}

#[test]
fn demo_refuses_bad_options_with_one_line() {
    let out = run(&["demo", "--kill-after-secs", "0"], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("--kill-after-secs"), "{}", out.stderr);
}
