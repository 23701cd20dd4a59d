//! `--transport rdma` through the real binary.
//!
//! The failover test runs over RDMA where `ibv_get_device_list` finds a
//! usable device (a NIC, or soft-RoCE where the kernel has `rdma_rxe`;
//! `FTVMM_RDMA_DEVICE` picks one), and otherwise prints
//! `SKIP <test>: no RDMA device (...)`; a test binary built without the
//! feature says so (`cargo test -p ftvmm --features rdma --test rdma`).
//! The start-up failure test runs everywhere.

mod common;

use std::time::{Duration, Instant};

use common::*;

const GUEST: &str = "dirty=512 span=2048 rounds=2 round_us=2000";

/// Whether `test` cannot run over RDMA here (it then prints why, as `SKIP`).
fn skip(test: &str) -> bool {
    #[cfg(not(feature = "rdma"))]
    {
        println!(
            "SKIP {test}: this test binary was built without the rdma feature \
             (cargo test -p ftvmm --features rdma --test rdma)"
        );
        true
    }
    #[cfg(feature = "rdma")]
    {
        use ftvmm_transport::{rdma::probe, RdmaConfig};
        match RdmaConfig::from_env().and_then(|c| probe(&c)) {
            Ok(device) => {
                println!("{test}: RDMA device '{device}'");
                false
            }
            Err(e) => {
                println!("SKIP {test}: no RDMA device ({e})");
                true
            }
        }
    }
}

#[test]
fn rdma_failover_is_exactly_once_and_the_guest_keeps_counting() {
    let test = "rdma_failover_is_exactly_once_and_the_guest_keeps_counting";
    if skip(test) {
        return;
    }
    let dir = TempDir::new("rdma-failover");
    let port = free_port();
    // The standby has no --transport: it serves what the primary asks for.
    let _standby = start_standby("standby", &dir, port, &[]);
    let args: Vec<String> = [
        "run",
        "--mem-mib",
        "64",
        "--cmdline",
        GUEST,
        "--ft-peer",
        &format!("127.0.0.1:{port}"),
        "--transport",
        "rdma",
        "--ft-interval-ms",
        "20",
        "--heartbeat-ms",
        "200",
        "--serial",
        &format!("file:{}", dir.path("primary.console").display()),
        "--ft-metrics",
        &dir.path("metrics.jsonl").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut primary = spawn("primary", &dir, &args);
    let file = |name: &str| read(&dir.path(name));
    assert!(
        wait_until(Duration::from_secs(60), || file("metrics.jsonl")
            .lines()
            .count()
            >= 25),
        "no epochs over RDMA; primary stderr:\n{}\nstandby stderr:\n{}",
        file("primary.stderr"),
        file("standby.stderr")
    );
    assert!(
        file("standby.stderr").contains("over rdma"),
        "the standby did not pair over RDMA:\n{}",
        file("standby.stderr")
    );
    let standby_hbs = || complete_lines(&file("standby.console"), hb_line).len();
    assert_eq!(standby_hbs(), 0, "the standby printed before the takeover");

    let killed = Instant::now();
    primary.kill();
    assert!(
        wait_until(Duration::from_secs(30), || standby_hbs() >= 20),
        "no takeover: {}",
        file("standby.stderr")
    );
    let (last_p, first_s, gap) =
        check_exactly_once(&file("primary.console"), &file("standby.console"), hb_line);
    println!(
        "RDMA takeover: 20 standby heartbeats {:.0} ms after the SIGKILL; \
         primary released up to hb={last_p}, standby went on from hb={first_s} ({gap} lost in flight)",
        killed.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn rdma_without_the_device_fails_at_start_with_one_line() {
    // A device name no host has: the same answer everywhere.
    let mut cmd = ftvmm();
    cmd.args([
        "run",
        "--transport",
        "rdma",
        "--ft-peer",
        "127.0.0.1:9",
        "--serial",
        "none",
    ])
    .env("FTVMM_RDMA_DEVICE", "ftvmm-no-such-device")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let out = wait_with_timeout(cmd.spawn().unwrap(), Duration::from_secs(30));
    assert!(!out.status.success(), "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr:\n{}", out.stderr);
    if cfg!(feature = "rdma") {
        assert!(
            lines[0].starts_with(
                "ftvmm: --transport rdma: RDMA device 'ftvmm-no-such-device' (FTVMM_RDMA_DEVICE) not found; "
            ),
            "{}",
            lines[0]
        );
    } else {
        assert_eq!(
            lines[0],
            "ftvmm: --transport rdma: built without RDMA support: rebuild with `cargo build -p ftvmm --features rdma`"
        );
    }
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}
