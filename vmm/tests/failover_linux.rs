//! A real kernel survives a failover: the tiny Linux guest on two vCPUs,
//! printing a numbered line every ~100 ms from its init on CPU 0 and another
//! every ~0.5 s from a loop pinned to CPU 1, is failed over like the test
//! guest; both transcripts are at-most-once and in order, it keeps running
//! (its uptime goes on; it did not reboot) and it has both CPUs online
//! before and after the takeover, the second one still running user code.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn parse_n(line: &str) -> Option<u64> {
    line.strip_prefix("ftlinux n=")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// `ftlinux cpu=1 k=<k> cpus=<online>`: (k, CPUs online).
fn parse_cpu1(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("ftlinux cpu=1 k=")?;
    let (k, cpus) = rest.split_once(" cpus=")?;
    Some((k.parse().ok()?, cpus.trim().parse().ok()?))
}

fn parse_up(line: &str) -> Option<f64> {
    line.strip_prefix("ftlinux n=")?
        .split(" up=")
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

#[test]
fn tiny_linux_survives_failover() {
    let Some((vmlinux, initrd, cmdline)) = linux_guest("tiny_linux_survives_failover") else {
        return;
    };
    let dir = TempDir::new("linuxfo");
    let port = free_port();
    let _standby = start_standby("standby", &dir, port, &[]);
    let started = Instant::now();
    let mut primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--kernel".into(),
            vmlinux.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            format!("{cmdline} ftlinux.mode=count"),
            "--mem-mib".into(),
            "128".into(),
            "--vcpus".into(),
            "2".into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            "50".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--ft-metrics".into(),
            dir.path("metrics.jsonl").display().to_string(),
        ],
    );
    let counted = |f: &str| complete_lines(&read(&dir.path(f)), parse_n).len();
    let on_cpu1 = |f: &str| complete_lines(&read(&dir.path(f)), parse_cpu1);
    assert!(
        wait_until(Duration::from_secs(240), || counted("primary.console")
            >= 10
            && on_cpu1("primary.console").len() >= 3),
        "Linux did not reach its counting loop under protection:\n{}\n{}",
        read(&dir.path("primary.console")),
        read(&dir.path("primary.stderr"))
    );
    let boot = started.elapsed();
    let epochs = read(&dir.path("metrics.jsonl")).lines().count();
    assert!(epochs >= 20, "only {epochs} epochs");
    primary.kill();
    assert!(
        wait_until(Duration::from_secs(60), || counted("standby.console") >= 10
            && on_cpu1("standby.console").len() >= 3),
        "standby did not continue Linux:\n{}\n{}",
        read(&dir.path("standby.stderr")),
        read(&dir.path("standby.console"))
    );
    let p = read(&dir.path("primary.console"));
    let s = read(&dir.path("standby.console"));
    let (last_p, first_s, gap) = check_exactly_once(&p, &s, parse_n);
    // CPU 1's loop went on too, exactly once, and both CPUs stayed online.
    let k_of = |l: &str| parse_cpu1(l).map(|(k, _)| k);
    let (last_k, first_k, _) = check_exactly_once(&p, &s, k_of);
    assert!(
        p.contains("ftlinux ready cpus=2"),
        "the guest did not bring up 2 CPUs:\n{p}"
    );
    for (side, text) in [("primary", &p), ("standby", &s)] {
        let online: Vec<u64> = complete_lines(text, parse_cpu1)
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert!(
            online.iter().all(|&c| c == 2),
            "the {side} saw CPUs online {online:?}, not 2"
        );
    }
    // Its uptime continues: no reboot, and no second ready marker.
    let up_p = complete_lines(&p, parse_up);
    let up_s = complete_lines(&s, parse_up);
    assert!(
        up_s[0] > *up_p.last().unwrap(),
        "uptime went back: {up_p:?} then {up_s:?}"
    );
    assert!(
        !s.contains("ftlinux ready") && !s.contains("Linux version"),
        "the guest rebooted:\n{s}"
    );
    println!(
        "tiny Linux (2 vCPUs) under protection: counting after {boot:.1?} ({epochs} epochs); primary released n={last_p}, \
         standby went on from n={first_s} ({gap} lost with the in-flight epoch); CPU 1's loop k={last_k} → k={first_k}; \
         2 CPUs online on both sides; uptime {:.2} → {:.2}",
        up_p.last().unwrap(),
        up_s[0]
    );
}
