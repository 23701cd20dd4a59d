//! A guest running on several vCPUs, protected and failed over: the test
//! guest starts its APs (INIT-SIPI-SIPI), every vCPU runs rounds on its own
//! part of the working set and appends to a shared log under a lock, and the
//! BSP checks the log against the vCPUs' own pages after every heartbeat. A
//! checkpoint that is not one consistent cut across the vCPUs (or a restore
//! that mixes epochs) shows up as `ftguest consistency error`.

mod common;

use std::time::Duration;

use common::*;

/// Rounds of 2 ms, 1 024 pages dirtied per round in all, shared by the vCPUs.
const GUEST: &str = "dirty=1024 span=4096 rounds=2 round_us=2000";

struct Pair {
    dir: TempDir,
    port: u16,
    standby: Proc,
    primary: Proc,
}

impl Pair {
    fn start(tag: &str, vcpus: u8, primary_extra: &[&str], standby_extra: &[&str]) -> Pair {
        let dir = TempDir::new(tag);
        let port = free_port();
        let standby = spawn(
            "standby",
            &dir,
            &standby_args(port, &dir.path("standby.console"), standby_extra),
        );
        assert!(
            listening(&dir, "standby"),
            "standby did not start: {}",
            read(&dir.path("standby.stderr"))
        );
        let mut args = vec![
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--vcpus".into(),
            vcpus.to_string(),
            "--cmdline".into(),
            GUEST.into(),
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
        ];
        args.extend(primary_extra.iter().map(|s| s.to_string()));
        let primary = spawn("primary", &dir, &args);
        Pair {
            dir,
            port,
            standby,
            primary,
        }
    }

    fn file(&self, name: &str) -> String {
        read(&self.dir.path(name))
    }

    fn epochs(&self) -> usize {
        self.file("metrics.jsonl").lines().count()
    }

    fn wait_epochs(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(90), || self.epochs() >= n),
            "only {} epochs; primary stderr:\n{}\nstandby stderr:\n{}",
            self.epochs(),
            self.file("primary.stderr"),
            self.file("standby.stderr")
        );
    }

    fn standby_hbs(&self) -> usize {
        complete_lines(&self.file("standby.console"), hb_line).len()
    }

    /// Waits until the standby took over and printed `n` heartbeats.
    fn wait_takeover(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(60), || self.standby_hbs() >= n),
            "standby did not take over (port {}); its stderr:\n{}\nconsole:\n{}",
            self.port,
            self.file("standby.stderr"),
            self.file("standby.console")
        );
    }

    fn memory_crc(&self, side: &str, epoch: u64) -> Option<String> {
        let prefix = format!("ftvmm: memory crc at epoch {epoch}: ");
        self.file(&format!("{side}.stderr"))
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    fn assert_memory_equal(&self, epoch: u64) {
        assert!(
            wait_until(Duration::from_secs(20), || self
                .memory_crc("standby", epoch)
                .is_some()),
            "the standby printed no memory crc for epoch {epoch}:\n{}",
            self.file("standby.stderr")
        );
        let p = self
            .memory_crc("primary", epoch)
            .expect("primary printed no memory crc");
        assert_eq!(
            Some(p),
            self.memory_crc("standby", epoch),
            "guest memory differs between primary and standby at epoch {epoch}"
        );
    }

    /// Exactly-once heartbeats, no consistency error on either side, no
    /// reboot, and every vCPU's round count growing on the standby.
    fn check(&self, vcpus: usize) {
        let (p, s) = (self.file("primary.console"), self.file("standby.console"));
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
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.primary.kill();
        self.standby.kill();
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
    let mut pair = Pair::start(
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
    pair.primary.kill();
    pair.wait_takeover(30);
    pair.check(4);
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
        let mut pair = Pair::start(&tag, 2, &["--ft-fault", fault], &[]);
        assert!(
            pair.primary.wait(Duration::from_secs(60)).is_some(),
            "fault {fault} did not fire:\n{}",
            pair.file("primary.stderr")
        );
        pair.wait_takeover(30);
        let stderr = pair.file("standby.stderr");
        assert!(
            stderr.contains(&format!("took over from checkpoint {epoch} ")),
            "{fault}: the standby must resume from checkpoint {epoch}:\n{stderr}"
        );
        pair.check(2);
    }
}

/// Killed before the first commit (handshake, initial sync): nothing runs on
/// the standby, with two vCPUs as with one.
#[test]
fn two_vcpus_killed_before_the_first_commit_start_nothing() {
    for fault in ["handshake", "initial-sync"] {
        let mut pair = Pair::start(&format!("smp2-{fault}"), 2, &["--ft-fault", fault], &[]);
        assert!(
            pair.primary.wait(Duration::from_secs(60)).is_some(),
            "fault {fault} did not fire"
        );
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
    let mut pair = Pair::start(
        "smp2-ring",
        2,
        &["--dirty-track", "ring", "--ft-hash-epoch", "20"],
        &["--ft-hash-epoch", "20"],
    );
    pair.wait_epochs(30);
    pair.assert_memory_equal(20);
    pair.primary.kill();
    pair.wait_takeover(30);
    pair.check(2);
}
