//! A guest running on several vCPUs, protected and failed over: the test
//! guest starts its APs (INIT-SIPI-SIPI), every vCPU runs rounds on its own
//! part of the working set and appends to a shared log under a lock, and the
//! BSP checks the log against the vCPUs' own pages after every heartbeat. A
//! checkpoint that is not one consistent cut across the vCPUs (or a restore
//! that mixes epochs) shows up as `ftguest consistency error`.

mod common;

use std::time::Duration;

use common::pair::FtPair;
use common::*;

/// Rounds of 2 ms, 1 024 pages dirtied per round in all, shared by the vCPUs.
const GUEST: &str = "dirty=1024 span=4096 rounds=2 round_us=2000";

/// A protected pair whose guest runs on `vcpus` vCPUs.
fn start(tag: &str, vcpus: u8, primary_extra: &[&str], standby_extra: &[&str]) -> FtPair {
    let n = vcpus.to_string();
    let mut extra = vec!["--vcpus", n.as_str()];
    extra.extend_from_slice(primary_extra);
    FtPair::start_with_guest(tag, GUEST, &extra, standby_extra)
}

/// Exactly-once heartbeats, no consistency error on either side, no
/// reboot, and every vCPU's round count growing on the standby.
fn check(pair: &FtPair, vcpus: usize) {
    let (p, s) = (pair.file("primary.console"), pair.file("standby.console"));
    check_exactly_once(&p, &s, hb_line);
    for (side, text) in [("primary", &p), ("standby", &s)] {
        assert!(
            !text.contains("consistency error"),
            "{side} console:\n{text}"
        );
    }
    assert!(
        p.contains(&format!("ftguest ready cpus={vcpus}\n")),
        "not all {vcpus} vCPUs started:\n{p}"
    );
    assert!(!s.contains("ftguest ready"), "the guest rebooted:\n{s}");
    let progress = cpu_rounds(&s);
    assert!(
        progress.len() >= 2,
        "the standby printed fewer than two progress lines:\n{s}"
    );
    let (first, last) = (&progress[0], &progress[progress.len() - 1]);
    assert_eq!(first.len(), vcpus, "{s}");
    for c in 0..vcpus {
        assert!(
            last[c] > first[c],
            "vCPU {c} made no progress after the takeover: {first:?} then {last:?}"
        );
    }
}

/// The round counts of every complete `ftguest cpus rounds=a,b,... seq=n`
/// line.
fn cpu_rounds(console: &str) -> Vec<Vec<u64>> {
    complete_lines(console, |l| {
        let rest = l.strip_prefix("ftguest cpus rounds=")?;
        let list = rest.split(' ').next()?;
        list.split(',').map(|n| n.parse().ok()).collect()
    })
}

/// Four vCPUs: all run, the standby's memory equals the primary's at a
/// committed epoch, and a failover is exactly once with the shared state
/// still consistent.
#[test]
fn four_vcpus_fail_over_as_one_consistent_cut() {
    let mut pair = start(
        "smp4",
        4,
        &["--ft-hash-epoch", "20"],
        &["--ft-hash-epoch", "20"],
    );
    pair.wait_epochs(30);
    pair.assert_memory_equal(20);
    let before = cpu_rounds(&pair.file("primary.console"));
    assert!(
        before
            .last()
            .is_some_and(|r| r.len() == 4 && r.iter().all(|&n| n > 0)),
        "not every vCPU ran before the failover: {before:?}\n{}",
        pair.file("primary.console")
    );
    pair.kill_primary();
    pair.wait_takeover(30);
    check(&pair, 4);
}

/// Two vCPUs, the primary killed at each step of the protocol after the
/// first commit: the standby resumes the guest exactly once and consistent.
#[test]
fn two_vcpus_survive_a_kill_at_each_fault_point() {
    // Late enough that the primary released heartbeats before it dies,
    // even on a loaded host (the APs' start-up adds ≈ 10 ms per AP).
    for (fault, epoch) in [
        ("mid-checkpoint@30", 29),
        ("before-ack@30", 30),
        ("during-release@35", 35),
    ] {
        let tag = format!("smp2-{}", fault.split('@').next().unwrap_or(fault));
        let mut pair = start(&tag, 2, &["--ft-fault", fault], &[]);
        assert!(
            pair.primary_died_by_itself(),
            "fault {fault} did not fire:\n{}",
            pair.file("primary.stderr")
        );
        pair.wait_takeover(30);
        let stderr = pair.file("standby.stderr");
        assert!(
            stderr.contains(&format!("took over from checkpoint {epoch} ")),
            "{fault}: the standby must resume from checkpoint {epoch}:\n{stderr}"
        );
        check(&pair, 2);
    }
}

/// Killed before the first commit (handshake, initial sync): nothing runs on
/// the standby, with two vCPUs as with one.
#[test]
fn two_vcpus_killed_before_the_first_commit_start_nothing() {
    for fault in ["handshake", "initial-sync"] {
        let mut pair = start(&format!("smp2-{fault}"), 2, &["--ft-fault", fault], &[]);
        assert!(pair.primary_died_by_itself(), "fault {fault} did not fire");
        assert!(
            wait_until(Duration::from_secs(10), || pair
                .file("standby.stderr")
                .contains("nothing to run")),
            "{fault}: standby stderr:\n{}",
            pair.file("standby.stderr")
        );
        assert_eq!(pair.file("standby.console"), "", "{fault}");
        assert_eq!(pair.file("primary.console"), "", "{fault}");
    }
}

/// The guest's check is not vacuous: one torn update (`crash=log`: a
/// vCPU's sequence number bumped without its log entry) is reported at the
/// next heartbeat.
#[test]
fn the_guest_check_reports_a_torn_update() {
    let out = run(
        &[
            "run",
            "--vcpus",
            "2",
            "--mem-mib",
            "64",
            "--cmdline",
            "dirty=64 stop=3 crash=log",
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("ftguest consistency error at=1 entries="),
        "{}",
        out.stdout
    );
}

/// The dirty ring backend (one ring per vCPU, every vCPU dirtying pages):
/// memory equal at a committed epoch, and a consistent failover.
#[test]
fn dirty_rings_of_two_vcpus_are_complete() {
    let mut pair = start(
        "smp2-ring",
        2,
        &["--dirty-track", "ring", "--ft-hash-epoch", "20"],
        &["--ft-hash-epoch", "20"],
    );
    pair.wait_epochs(30);
    pair.assert_memory_equal(20);
    pair.kill_primary();
    pair.wait_takeover(30);
    check(&pair, 2);
}
