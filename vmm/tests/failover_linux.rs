//! A real kernel survives a failover: the tiny Linux guest, printing a
//! numbered line every ~100 ms from its init, is failed over like the test
//! guest; its transcript is at-most-once and in order, and it keeps running
//! (its uptime goes on; it did not reboot).

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
    assert!(
        wait_until(Duration::from_secs(240), || counted("primary.console")
            >= 10),
        "Linux did not reach its counting loop under protection:\n{}\n{}",
        read(&dir.path("primary.console")),
        read(&dir.path("primary.stderr"))
    );
    let boot = started.elapsed();
    let epochs = read(&dir.path("metrics.jsonl")).lines().count();
    assert!(epochs >= 20, "only {epochs} epochs");
    primary.kill();
    assert!(
        wait_until(Duration::from_secs(60), || counted("standby.console") >= 10),
        "standby did not continue Linux:\n{}\n{}",
        read(&dir.path("standby.stderr")),
        read(&dir.path("standby.console"))
    );
    let p = read(&dir.path("primary.console"));
    let s = read(&dir.path("standby.console"));
    let (last_p, first_s, gap) = check_exactly_once(&p, &s, parse_n);
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
        "tiny Linux under protection: counting after {boot:.1?} ({epochs} epochs); primary released n={last_p}, \
         standby went on from n={first_s} ({gap} lost with the in-flight epoch); uptime {:.2} → {:.2}",
        up_p.last().unwrap(),
        up_s[0]
    );
}
