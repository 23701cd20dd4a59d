//! Primary → standby failover through the real binary, with the test guest:
//! exactly-once console output (I1), torn checkpoints (I2), kills at every
//! step of the protocol, memory equality at a committed epoch (I3), standby
//! death, and bad peers.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pair::{FtPair as Pair, GUEST};
use common::*;

#[test]
fn failover_is_exactly_once_and_the_guest_keeps_counting() {
    let mut pair = Pair::start("failover", &[], &[]);
    pair.wait_epochs(25);
    assert_eq!(
        pair.standby_hbs(),
        0,
        "the standby printed before the takeover"
    );
    let killed = Instant::now();
    pair.kill_primary();
    assert!(
        wait_until(Duration::from_secs(30), || pair.standby_hbs() >= 1),
        "no takeover: {}",
        pair.file("standby.stderr")
    );
    let takeover = killed.elapsed();
    pair.wait_takeover(20);
    let (last_p, first_s, gap) = check_exactly_once(
        &pair.file("primary.console"),
        &pair.file("standby.console"),
        hb_line,
    );
    println!(
        "takeover: primary SIGKILL → first heartbeat from the standby in {:.1} ms; \
         primary released up to hb={last_p}, standby went on from hb={first_s} ({gap} in the in-flight epoch)",
        takeover.as_secs_f64() * 1e3
    );
    let stderr = pair.file("standby.stderr");
    assert!(stderr.contains("took over from checkpoint"), "{stderr}");
    // The in-flight epoch is at most one epoch (20 ms) of output: a few heartbeats.
    assert!(
        gap <= 10,
        "gap of {gap} heartbeats is more than one epoch's output"
    );
    assert!(
        !pair.file("standby.console").contains("ftguest ready"),
        "the guest rebooted"
    );
}

#[test]
fn torn_checkpoint_is_discarded() {
    let mut pair = Pair::start("torn", &["--ft-fault", "mid-checkpoint@25"], &[]);
    assert!(
        pair.primary_died_by_itself(),
        "fault injection did not fire"
    );
    pair.wait_takeover(10);
    let stderr = pair.file("standby.stderr");
    assert!(
        stderr.contains("took over from checkpoint 24"),
        "the standby must resume from the last complete checkpoint (24):\n{stderr}"
    );
    check_exactly_once(
        &pair.file("primary.console"),
        &pair.file("standby.console"),
        hb_line,
    );
}

/// Dies at a protocol step; returns the pair once the primary is dead.
fn kill_at(tag: &str, fault: &str) -> Pair {
    let mut pair = Pair::start(tag, &["--ft-fault", fault], &[]);
    assert!(pair.primary_died_by_itself(), "fault {fault} did not fire");
    pair
}

fn assert_no_guest_started(pair: &mut Pair) {
    assert!(
        wait_until(Duration::from_secs(10), || pair
            .file("standby.stderr")
            .contains("nothing to run")),
        "standby stderr:\n{}",
        pair.file("standby.stderr")
    );
    assert!(
        pair.standby.running(),
        "the standby must stay up, waiting for a primary"
    );
    assert_eq!(
        pair.file("standby.console"),
        "",
        "a guest was started without a committed checkpoint"
    );
}

#[test]
fn kill_during_handshake_starts_nothing() {
    let mut pair = kill_at("k-handshake", "handshake");
    assert_no_guest_started(&mut pair);
    assert_eq!(
        pair.file("primary.console"),
        "",
        "output escaped before protection"
    );
}

#[test]
fn kill_during_initial_sync_starts_nothing() {
    let mut pair = kill_at("k-sync", "initial-sync");
    assert_no_guest_started(&mut pair);
    assert_eq!(
        pair.file("primary.console"),
        "",
        "output escaped before the first commit"
    );
}

#[test]
fn kill_mid_checkpoint() {
    // Late enough that the primary released a heartbeat before it dies (the
    // initial sync of this mostly untouched guest takes milliseconds, so
    // epoch 3 can come before the guest's first heartbeat).
    let pair = kill_at("k-mid", "mid-checkpoint@10");
    pair.wait_takeover(5);
    pair.assert_took_over_from(9);
    pair.check();
}

#[test]
fn kill_after_last_byte_before_ack() {
    let pair = kill_at("k-ack", "before-ack@12");
    pair.wait_takeover(5);
    // The standby has checkpoint 12 complete: it resumes from it, and the
    // primary never released epoch 12's output.
    pair.assert_took_over_from(12);
    pair.check();
}

#[test]
fn kill_during_output_release() {
    let pair = kill_at("k-release", "during-release@15");
    pair.wait_takeover(5);
    pair.assert_took_over_from(15);
    pair.check();
}

#[test]
fn standby_memory_equals_primary_memory_at_a_committed_epoch() {
    let mut pair = Pair::start(
        "memeq",
        &["--ft-hash-epoch", "20"],
        &["--ft-hash-epoch", "20"],
    );
    pair.wait_epochs(22);
    pair.assert_memory_equal(20);
    pair.kill_primary();
}

#[test]
fn standby_death_releases_output_and_the_primary_runs_on() {
    let dir = TempDir::new("sbdeath");
    let port = free_port();
    let mut standby = start_standby("standby", &dir, port, &[]);
    let pair_args = |dir: &TempDir| {
        vec![
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            format!("{GUEST} stop=600"),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            "20".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--ft-metrics".into(),
            dir.path("metrics.jsonl").display().to_string(),
        ]
    };
    let mut primary = spawn("primary", &dir, &pair_args(&dir));
    assert!(wait_until(Duration::from_secs(60), || read(
        &dir.path("metrics.jsonl")
    )
    .lines()
    .count()
        >= 10));
    standby.kill();
    let status = primary
        .wait(Duration::from_secs(60))
        .expect("primary did not finish");
    let stderr = read(&dir.path("primary.stderr"));
    assert!(status.success(), "primary failed: {stderr}");
    assert!(stderr.contains("lost"), "{stderr}");
    // Nothing held was dropped: every heartbeat up to the last, in order.
    let console = read(&dir.path("primary.console"));
    assert_eq!(
        complete_lines(&console, hb_line),
        (1..=600).collect::<Vec<_>>()
    );
    assert!(console.contains("ftguest done"));
}

#[test]
fn guest_poweroff_under_protection_ends_both_sides_cleanly() {
    let dir = TempDir::new("bye");
    let port = free_port();
    let mut standby = start_standby("standby", &dir, port, &[]);
    let mut primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            format!("{GUEST} stop=40"),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
        ],
    );
    let p = primary
        .wait(Duration::from_secs(60))
        .expect("primary did not finish");
    assert!(p.success(), "{}", read(&dir.path("primary.stderr")));
    let s = standby
        .wait(Duration::from_secs(10))
        .expect("standby did not finish");
    assert!(s.success(), "{}", read(&dir.path("standby.stderr")));
    let console = read(&dir.path("primary.console"));
    assert_eq!(
        complete_lines(&console, hb_line),
        (1..=40).collect::<Vec<_>>()
    );
    assert_eq!(
        read(&dir.path("standby.console")),
        "",
        "the standby must not run the guest after a clean end"
    );
}

/// A primary that stalls (SIGSTOP) looks dead to its standby, which takes
/// over. When the old primary wakes up it must not release anything the
/// standby did not commit: it reads the takeover notice, stops its guest and
/// exits with an error (I5, no split brain).
#[test]
fn a_stalled_primary_is_fenced_after_the_takeover() {
    let mut pair = Pair::start("fenced", &["--heartbeat-ms", "20"], &[]);
    pair.wait_epochs(20);
    let pid = pair.primary.as_ref().unwrap().child.id() as libc::pid_t;
    // SAFETY: signalling our own child, which is alive (reaped only on drop).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    pair.wait_takeover(10);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let status = pair
        .primary
        .as_mut()
        .unwrap()
        .wait(Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "the fenced primary did not stop:\n{}\nstandby:\n{}",
                pair.file("primary.stderr"),
                pair.file("standby.stderr")
            )
        });
    let stderr = pair.file("primary.stderr");
    assert!(!status.success(), "a fenced primary must fail: {stderr}");
    assert!(stderr.contains("fenced"), "{stderr}");
    // Let the standby print a little more, then the property must hold.
    let n = pair.standby_hbs();
    pair.wait_takeover(n + 5);
    check_exactly_once(
        &pair.file("primary.console"),
        &pair.file("standby.console"),
        hb_line,
    );
}

/// The same properties with the dirty ring as the tracking backend
/// (`--dirty-track ring`): memory equal at a committed epoch (I3), and an
/// exactly-once failover.
#[test]
fn dirty_ring_backend_is_complete_and_fails_over_exactly_once() {
    let mut pair = Pair::start(
        "ring",
        &["--dirty-track", "ring", "--ft-hash-epoch", "15"],
        &["--ft-hash-epoch", "15"],
    );
    pair.wait_epochs(25);
    pair.assert_memory_equal(15);
    pair.kill_primary();
    pair.wait_takeover(10);
    pair.check();
}

/// Sector records `ftguest sector hb=<n>` found in a disk image.
fn disk_records(path: &std::path::Path) -> Vec<u64> {
    let img = std::fs::read(path).unwrap_or_default();
    img.chunks(512)
        .filter_map(|s| {
            let text = std::str::from_utf8(&s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())])
                .ok()?;
            text.trim_end()
                .strip_prefix("ftguest sector hb=")?
                .parse()
                .ok()
        })
        .collect()
}

/// A 4 MiB disk image for each side and their `--disk` specs.
fn disk_pair(dir: &TempDir) -> (PathBuf, PathBuf, String, String) {
    let (p_img, s_img) = (dir.path("primary.img"), dir.path("standby.img"));
    for img in [&p_img, &s_img] {
        std::fs::File::create(img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
    }
    let p_disk = format!("path={}", p_img.display());
    let s_disk = format!("path={}", s_img.display());
    (p_img, s_img, p_disk, s_disk)
}

/// A VM whose disk is in use fails over: the restored guest's virtio-blk
/// device goes on serving it (on the standby's own replica: disk replication
/// is not built yet), with no error in the guest.
#[test]
fn disk_keeps_working_after_failover() {
    let dir = TempDir::new("diskfo");
    let (p_img, s_img, p_disk, s_disk) = disk_pair(&dir);
    let mut pair = Pair::start("diskfo", &["--disk", &p_disk], &["--disk", &s_disk]);
    pair.wait_epochs(20);
    pair.kill_primary();
    pair.wait_takeover(30);
    let (last_p, first_s, _) = check_exactly_once(
        &pair.file("primary.console"),
        &pair.file("standby.console"),
        hb_line,
    );
    let on_primary = disk_records(&p_img);
    let on_standby = disk_records(&s_img);
    assert!(
        on_primary.contains(&1) && on_primary.contains(&last_p),
        "{on_primary:?}"
    );
    // The standby's guest writes a record per heartbeat after the takeover.
    for n in first_s + 1..first_s + 20 {
        assert!(
            on_standby.contains(&n),
            "sector for hb={n} missing on the standby: {on_standby:?}"
        );
    }
    let console = pair.file("standby.console");
    assert!(!console.contains("disk error"), "{console}");
}

/// I3 for the VMM's own writes, end to end: the guest reads its disk back
/// every heartbeat (`disk_verify=on`), so virtio-blk writes guest memory
/// (data buffers, status bytes, used rings) all the time; those pages are
/// written by the VMM, not by a vCPU, and KVM's dirty log never sees them.
/// The standby's memory still equals the primary's at a committed epoch.
#[test]
fn pages_written_by_the_vmm_reach_the_standby() {
    let dir = TempDir::new("vmmwrites");
    let (_, _, p_disk, s_disk) = disk_pair(&dir);
    let guest = format!("{GUEST} disk_verify=on");
    let mut pair = Pair::start_with_guest(
        "vmmwrites",
        &guest,
        &["--disk", &p_disk, "--ft-hash-epoch", "20"],
        &["--disk", &s_disk, "--ft-hash-epoch", "20"],
    );
    pair.wait_epochs(22);
    pair.assert_memory_equal(20);
    // The VMM did write guest memory in those epochs.
    let metrics = pair.file("metrics.jsonl");
    let vmm_pages: u64 = metrics
        .lines()
        .take(20)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|m| m["dirty_vmm"].as_u64().unwrap_or(0) + m["dirty_both"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        vmm_pages > 0,
        "no page written by the VMM in 20 epochs: the test proves nothing"
    );
    assert!(!pair.file("primary.console").contains("disk error"));
    pair.kill_primary();
}
