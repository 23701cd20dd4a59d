//! Disk replication through the real binary (DESIGN "Disk"; I1 and I2 for
//! disk writes): every completed virtio-blk write of epoch n travels in
//! checkpoint n and reaches the standby's replica only when n is complete
//! and verified; a flush in epoch n is durable on the replica before ack n;
//! at pairing the replica is made equal to the primary's disk while the
//! guest runs. So after a takeover the replica is exactly the committed
//! disk: the primary's disk at the checkpoint the standby resumed from.
//!
//! What the tests observe:
//! - the `disk crc` report lines: the primary's at `--ft-hash-epoch N`
//!   (its disk at N's cut), the standby's at the same epoch (after applying
//!   N) and at its takeover (the replica before the guest runs on it);
//! - the replica file itself once the standby's guest powered off: the
//!   test guest writes the record `ftguest sector hb=<n>` for heartbeat n
//!   and stops after hb=`STOP` (`stop=`), so a replica that got every
//!   committed write holds every record 1..=STOP, each exactly right,
//!   whoever of primary and standby wrote it;
//! - the consoles: the primary's released output and the standby's form an
//!   exactly-once transcript; `disk_verify=on` makes the guest read each
//!   record back and print `ftguest disk error` on a mismatch.
//!
//! Every process is a [`Proc`], killed and reaped when the test ends, even
//! by a panic; every wait is bounded.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::disk::*;
use common::*;

/// Rounds per heartbeat of the test guest's workload.
const ROUNDS: u64 = 2;
/// The test guest's workload (as in failover.rs); the disk options are
/// added per test.
const GUEST: &str = "dirty=512 span=2048 rounds=2 round_us=2000";
/// The guest powers off after this heartbeat, so a standby that took over
/// ends by itself with every record written. The kills all come well
/// before it (see [`KILL_GUARD`]).
const STOP: u64 = 600;
/// A random kill comes at the latest when the primary has released this
/// heartbeat: the guest must still be far from `STOP` when the primary
/// dies, or the run would end cleanly instead of failing over.
const KILL_GUARD: u64 = STOP - 200;
/// Bytes per round the guest writes to its bulk area with `disk_bytes=`.
const BULK: u64 = 4096;
/// 16 MiB: with `disk_bytes=4096` the bulk area has 2048 slots, more than
/// the STOP × ROUNDS rounds of a run, so no round's data overwrites
/// another's and the rounds the primary wrote must all reach the replica.
const DISK: u64 = 16 << 20;
/// Generous bounds: a loaded 2-core machine runs several VMs at once.
const PAIRING: Duration = Duration::from_secs(120);
const TAKEOVER: Duration = Duration::from_secs(60);
const RUN_TO_STOP: Duration = Duration::from_secs(240);

/// The test guest's command line: `GUEST`, the record read-back, stop at
/// `STOP`, the bulk writes when `bulk`, then `extra`.
fn guest(bulk: bool, extra: &str) -> String {
    let mut g = format!("{GUEST} disk_verify=on stop={STOP}");
    if bulk {
        g.push_str(&format!(" disk_bytes={BULK}"));
    }
    if !extra.is_empty() {
        g.push(' ');
        g.push_str(extra);
    }
    g
}

/// A scratch directory with the primary's disk and the standby's replica.
struct Disks {
    dir: TempDir,
    primary: PathBuf,
    replica: PathBuf,
    bytes: u64,
}

impl Disks {
    /// Two zeroed images of `bytes` bytes: `primary.img`, `replica.img`.
    fn new(tag: &str, bytes: u64) -> Disks {
        let dir = TempDir::new(tag);
        let (primary, replica) = (dir.path("primary.img"), dir.path("replica.img"));
        make_image(&primary, bytes);
        make_image(&replica, bytes);
        Disks {
            dir,
            primary,
            replica,
            bytes,
        }
    }
}

fn disk_arg(path: &Path) -> String {
    format!("path={}", path.display())
}

/// Sets the value of `flag` in `args`.
fn set_arg(args: &mut [String], flag: &str, value: &str) {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    args[i + 1] = value.to_string();
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `ftvmm run` as a protected primary of the standby on `port`: console
/// `NAME.console`, metrics `NAME.metrics.jsonl`, then `extra` (its disks).
fn primary_args(
    dir: &TempDir,
    name: &str,
    port: u16,
    cmdline: &str,
    extra: &[String],
) -> Vec<String> {
    let mut a = strings(&["run", "--mem-mib", "64", "--cmdline", cmdline]);
    a.extend([
        "--ft-peer".to_string(),
        format!("127.0.0.1:{port}"),
        "--ft-interval-ms".into(),
        "20".into(),
        // Kills are seen at once through the closed connections; silence
        // must not be mistaken for death on a loaded machine.
        "--heartbeat-ms".into(),
        "200".into(),
        "--serial".into(),
        format!("file:{}", dir.path(&format!("{name}.console")).display()),
        "--ft-metrics".into(),
        dir.path(&format!("{name}.metrics.jsonl"))
            .display()
            .to_string(),
    ]);
    a.extend(extra.iter().cloned());
    a
}

/// A standby with the replica and a primary with its disk, paired.
struct DiskPair {
    disks: Disks,
    standby: Proc,
    primary: Option<Proc>,
    /// The guest writes its bulk area (`disk_bytes=`).
    bulk: bool,
    /// Data was planted on the images before the start: the record area
    /// past the records is not all zeros.
    planted: bool,
}

impl DiskPair {
    /// Starts the standby (`--disk path=replica.img`, then
    /// `standby_extra`), waits until it listens, then the primary
    /// (`--disk path=primary.img`, then `primary_extra`) running `cmdline`.
    fn start(
        disks: Disks,
        cmdline: &str,
        bulk: bool,
        primary_extra: &[&str],
        standby_extra: &[&str],
    ) -> DiskPair {
        let port = free_port();
        let replica = disk_arg(&disks.replica);
        let mut s_extra = vec!["--disk", replica.as_str()];
        s_extra.extend_from_slice(standby_extra);
        // The replica's CRC at the takeover is printed only where a test
        // asks for CRCs (it reads the whole replica before the guest runs).
        if !standby_extra.contains(&"--ft-hash-epoch") {
            s_extra.extend_from_slice(&["--ft-hash-epoch", "1000000000"]);
        }
        let standby = start_standby("standby", &disks.dir, port, &s_extra);
        let mut p_extra = vec!["--disk".to_string(), disk_arg(&disks.primary)];
        p_extra.extend(strings(primary_extra));
        let args = primary_args(&disks.dir, "primary", port, cmdline, &p_extra);
        let primary = Some(spawn("primary", &disks.dir, &args));
        DiskPair {
            disks,
            standby,
            primary,
            bulk,
            planted: false,
        }
    }

    fn file(&self, name: &str) -> String {
        read(&self.disks.dir.path(name))
    }

    fn epochs(&self) -> usize {
        self.file("primary.metrics.jsonl").lines().count()
    }

    /// Both sides' stderr, for failure messages.
    fn logs(&self) -> String {
        format!(
            "primary stderr:\n{}\nstandby stderr:\n{}\nstandby console (tail):\n{}",
            self.file("primary.stderr"),
            self.file("standby.stderr"),
            tail(&self.file("standby.console"), 15)
        )
    }

    /// Waits until checkpoint `n` was acked (the primary's metrics).
    fn wait_epochs(&self, n: usize) {
        assert!(
            wait_until(PAIRING, || self.epochs() >= n),
            "only {} epochs committed; {}",
            self.epochs(),
            self.logs()
        );
    }

    /// The last heartbeat the primary released.
    fn released_hb(&self) -> Option<u64> {
        heartbeats(&self.file("primary.console")).last().copied()
    }

    fn primary(&mut self) -> &mut Proc {
        self.primary.as_mut().expect("the primary was started")
    }

    fn kill_primary(&mut self) {
        self.primary().kill();
    }

    /// Waits for the primary to die of its `--ft-fault`.
    fn wait_primary_died(&mut self, fault: &str) {
        let status = self.primary().wait(PAIRING);
        assert!(
            status.is_some(),
            "fault {fault} did not fire; {}",
            self.logs()
        );
        assert!(
            !status.unwrap().success(),
            "the primary's guest reached stop={STOP} before fault {fault} fired; {}",
            self.logs()
        );
    }

    /// Waits for the takeover, then for the standby's guest to power off
    /// after hb=STOP (the standby exits then). Returns the checkpoint it
    /// resumed from and its exit status.
    fn wait_standby_ran_to_stop(&mut self) -> (u64, ExitStatus) {
        let took_over = wait_until(TAKEOVER, || {
            took_over_from(&self.file("standby.stderr")).is_some()
        });
        assert!(took_over, "the standby did not take over; {}", self.logs());
        let from = took_over_from(&self.file("standby.stderr")).unwrap();
        let status = self.standby.wait(RUN_TO_STOP).unwrap_or_else(|| {
            panic!(
                "the standby's guest did not power off after hb={STOP} within {RUN_TO_STOP:?}; {}",
                self.logs()
            )
        });
        (from, status)
    }

    /// The record area of the guest's disk, in sectors.
    fn record_area(&self) -> u64 {
        record_area(self.disks.bytes, self.bulk)
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Everything a check found wrong, reported together at the end so one
/// failing run says all it knows.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }

    fn check(&mut self, what: &str, r: Result<(), String>) {
        if let Err(e) = r {
            self.add(format!("{what}: {e}"));
        }
    }

    /// Panics listing every problem, with `context` (logs) after them.
    fn assert_none(self, title: &str, context: &str) {
        if self.0.is_empty() {
            return;
        }
        let list: Vec<String> = self.0.iter().map(|p| format!("  - {p}")).collect();
        panic!("{title}:\n{}\n\n{context}", list.join("\n"));
    }
}

/// What a failover must leave, once the standby's guest ran to `STOP`:
/// - the standby resumed from `resumes_from` when given;
/// - exactly-once consoles and no `ftguest disk error`;
/// - the replica holds records 1..=STOP exactly (and zeros past them
///   where nothing else writes) and, with bulk writes, every round's
///   slot exactly;
/// - the takeover's `disk crc` line names the checkpoint it resumed from;
/// - with `hash` (the run's `--ft-hash-epoch`, on both sides) equal to
///   that checkpoint: the primary's disk at that cut, the standby's after
///   applying it and the replica at the takeover have one CRC, and guest
///   memory is equal there.
fn failover_problems(
    pair: &mut DiskPair,
    resumes_from: Option<u64>,
    hash: Option<u64>,
) -> Problems {
    let (from, status) = pair.wait_standby_ran_to_stop();
    let mut p = Problems::default();
    let s_err = pair.file("standby.stderr");
    let p_err = pair.file("primary.stderr");
    if let Some(e) = resumes_from {
        if from != e {
            p.add(format!(
                "the standby resumed from checkpoint {from}, not {e} (see failover.rs for this fault point)"
            ));
        }
    }
    if !status.success() {
        p.add(format!(
            "the standby ended with {status} after its guest powered off"
        ));
    }
    let (pc, sc) = (pair.file("primary.console"), pair.file("standby.console"));
    p_check_exactly_once(&mut p, &pc, &sc, hb_line);
    for (side, console) in [("primary", &pc), ("standby", &sc)] {
        if let Some(l) = console.lines().find(|l| l.contains("ftguest disk error")) {
            p.add(format!("the guest saw a disk error on the {side}: {l}"));
        }
    }
    let replica = read_image(&pair.disks.replica);
    let after = format!(
        "the replica after the takeover from checkpoint {from} and the standby's run to hb={STOP}"
    );
    p.check(
        &after,
        check_records(&replica, pair.record_area(), STOP, !pair.planted),
    );
    if pair.bulk {
        let capacity = pair.disks.bytes / SECTOR as u64;
        let k = BULK / SECTOR as u64;
        p.check(&after, check_bulk(&replica, capacity, k, STOP * ROUNDS));
    }
    match takeover_disk_crc(&s_err) {
        None => p.add(format!(
            "the standby printed no 'disk crc at takeover from checkpoint {from}: disk0=…' line"
        )),
        Some((c, _)) if c != from => p.add(format!(
            "the standby's takeover disk crc names checkpoint {c}, but it resumed from {from}"
        )),
        Some(_) => {}
    }
    if let Some(h) = hash.filter(|h| *h == from) {
        let at = format!("epoch {h}");
        let taken = takeover_disk_crc(&s_err).map(|(_, c)| c);
        match (disk_crc(&p_err, &at), disk_crc(&s_err, &at), taken) {
            (Some(prim), Some(stby), Some(taken)) if prim == stby && stby == taken => {}
            _ => {
                let taken = takeover_disk_text(&s_err).map_or("(no line)".into(), |(c, t)| {
                    parse_disk_crcs(t).map_or_else(|| format!("{t:?}"), |v| show_crcs(&v))
                        + &format!(" (from checkpoint {c})")
                });
                p.add(format!(
                    "disk at checkpoint {h}: primary's disk at the cut {}, standby's replica after applying it {}, replica at the takeover {taken}",
                    show_disk_crc(&p_err, &at),
                    show_disk_crc(&s_err, &at),
                ));
            }
        }
        let (pm, sm) = (memory_crc(&p_err, h), memory_crc(&s_err, h));
        if pm.is_none() || pm != sm {
            p.add(format!(
                "guest memory at checkpoint {h}: primary {pm:?}, standby {sm:?}"
            ));
        }
    }
    p
}

// ---------------------------------------------------------------------
// 1. Kills: at random moments, and at each named protocol point.
// ---------------------------------------------------------------------

/// One random kill: SIGKILL of the primary `delay` after its first
/// checkpoint committed (or as soon as it released hb=KILL_GUARD).
fn random_kill_run(run: u32, delay: Duration, bulk: bool) {
    let disks = Disks::new(&format!("rk{run}"), DISK);
    let mut pair = DiskPair::start(disks, &guest(bulk, ""), bulk, &[], &[]);
    pair.wait_epochs(1);
    let committed = Instant::now();
    let guarded = wait_until(delay, || {
        pair.released_hb().is_some_and(|n| n >= KILL_GUARD)
    });
    let ended = pair.primary().exited();
    assert!(
        !ended,
        "run {run}: the primary ended before the kill; {}",
        pair.logs()
    );
    pair.kill_primary();
    let at = committed.elapsed();
    let released = pair.released_hb().unwrap_or(0);
    let problems = failover_problems(&mut pair, None, None);
    let from = took_over_from(&pair.file("standby.stderr")).unwrap_or(0);
    println!(
        "run {run}{}: SIGKILL {:.0} ms after the first commit{}, primary released up to hb={released}, \
         standby resumed from checkpoint {from}: {}",
        if bulk { " (bulk writes)" } else { "" },
        at.as_secs_f64() * 1e3,
        if guarded { " (guard: the guest was near stop)" } else { "" },
        if problems.0.is_empty() { "ok" } else { "FAILED" }
    );
    problems.assert_none(
        &format!(
            "run {run}: SIGKILL {:.0} ms after the first commit (primary released up to hb={released}, standby resumed from checkpoint {from})",
            at.as_secs_f64() * 1e3
        ),
        &pair.logs(),
    );
}

/// Ten (or `FTVMM_DISK_KILL_RUNS`) runs, each killing the primary at a
/// random moment after pairing (seed printed; `FTVMM_TEST_SEED` repeats
/// it), every other run with bulk writes: the replica ends with every
/// record, the consoles are exactly-once, the guest saw no disk error.
#[test]
fn random_kills_leave_every_committed_write_on_the_replica() {
    let mut rng = Rng::from_env("FTVMM_TEST_SEED");
    let runs: u32 = std::env::var("FTVMM_DISK_KILL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut failed = Vec::new();
    for run in 1..=runs {
        let delay = Duration::from_millis(rng.range(0..2500));
        let bulk = run % 2 == 0;
        let outcome = catch_unwind(AssertUnwindSafe(|| random_kill_run(run, delay, bulk)));
        if let Err(e) = outcome {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            // The first lines say what went wrong; the logs are above.
            let head: Vec<&str> = msg.lines().take_while(|l| !l.is_empty()).collect();
            failed.push(head.join("\n"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {runs} random kills failed:\n\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

/// Dies at `fault`; the standby must resume from `resumes` (as failover.rs
/// asserts for the point) with the replica equal to the primary's disk at
/// that cut (`--ft-hash-epoch resumes` on both sides).
fn fault_run(tag: &str, fault: &str, resumes: u64) {
    let disks = Disks::new(tag, DISK);
    let h = resumes.to_string();
    let mut pair = DiskPair::start(
        disks,
        &guest(true, ""),
        true,
        &["--ft-fault", fault, "--ft-hash-epoch", &h],
        &["--ft-hash-epoch", &h],
    );
    pair.wait_primary_died(fault);
    let problems = failover_problems(&mut pair, Some(resumes), Some(resumes));
    problems.assert_none(&format!("failover at {fault}"), &pair.logs());
}

/// Torn checkpoint 30: its writes must not reach the replica (I2); the
/// replica at the takeover is the primary's disk at checkpoint 29.
#[test]
fn kill_mid_checkpoint_leaves_the_replica_at_the_last_complete_checkpoint() {
    fault_run("d-mid", "mid-checkpoint@30", 29);
}

/// Checkpoint 30 complete, never acked: the standby resumes from it, with
/// its writes applied.
#[test]
fn kill_before_ack_leaves_the_replica_at_the_received_checkpoint() {
    fault_run("d-ack", "before-ack@30", 30);
}

/// Killed while releasing epoch 30's output: the replica holds epoch 30.
#[test]
fn kill_during_release_leaves_the_replica_at_the_acked_checkpoint() {
    fault_run("d-rel", "during-release@30", 30);
}

/// Two disks, each with its own replica: the CRC lines name both
/// (`disk0=… disk1=…`) and agree at the resumed checkpoint; the second
/// disk, which the guest never writes, had different data on each side
/// before pairing and ends byte for byte equal to the primary's.
#[test]
fn two_disks_are_each_replicated_to_their_own_replica() {
    let disks = Disks::new("d-two", DISK);
    let (p1, s1) = (
        disks.dir.path("primary1.img"),
        disks.dir.path("replica1.img"),
    );
    make_image(&p1, 1 << 20);
    make_image(&s1, 1 << 20);
    let mut rng = Rng::new(0x5eed_0002);
    for at in [0u64, 4096, 300_000, (1 << 20) - 512] {
        write_at(&p1, at, &rng.bytes(512));
    }
    write_at(&s1, 100_000, &rng.bytes(8192));
    let (pa, sa) = (disk_arg(&p1), disk_arg(&s1));
    let mut pair = DiskPair::start(
        disks,
        &guest(true, ""),
        true,
        &[
            "--disk",
            &pa,
            "--ft-fault",
            "before-ack@20",
            "--ft-hash-epoch",
            "20",
        ],
        &["--disk", &sa, "--ft-hash-epoch", "20"],
    );
    pair.wait_primary_died("before-ack@20");
    let mut problems = failover_problems(&mut pair, Some(20), Some(20));
    let taken = takeover_disk_crc(&pair.file("standby.stderr")).map(|(_, c)| c);
    if let Some(c) = taken.filter(|c| c.len() != 2) {
        problems.add(format!(
            "the takeover's disk crc line has {} disks, not 2: {}",
            c.len(),
            show_crcs(&c)
        ));
    }
    let (a, b) = (read_image(&p1), read_image(&s1));
    if a != b {
        problems.add(format!(
            "the second replica differs from the second disk in {} of {} bytes",
            a.iter().zip(&b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len()),
            a.len()
        ));
    }
    problems.assert_none("two disks", &pair.logs());
}

// ---------------------------------------------------------------------
// 2. Initial sync.
// ---------------------------------------------------------------------

/// Data on the primary's disk before it starts, and a replica that
/// differs from it in a few blocks: by the early committed epoch 3 the
/// replica equals the disk (one CRC on both sides, memory too), and after
/// a failover every planted block of the primary is on the replica and
/// none of the replica's own is left.
#[test]
fn initial_sync_makes_a_differing_replica_equal_to_the_disk() {
    let bytes = 8 << 20;
    let disks = Disks::new("d-sync", bytes);
    let mut rng = Rng::from_env("FTVMM_TEST_SEED");
    // The guest writes records from LBA 0 to STOP - 1 only (no bulk area):
    // everything from `clear` on is the planted data alone.
    let clear = STOP * SECTOR as u64;
    let mut planted: Vec<(&str, u64, usize)> = Vec::new();
    let segment = (bytes - clear) / 6;
    for i in 0..5 {
        let len = rng.range(1..64) as usize * 1000 + rng.range(0..512) as usize;
        let start = clear + i * segment;
        let at = rng.range(start..start + segment - len as u64);
        write_at(&disks.primary, at, &rng.bytes(len));
        planted.push(("primary", at, len));
    }
    // The last sector and some of the replica's own data elsewhere, one
    // block overlapping the primary's first.
    write_at(&disks.primary, bytes - 512, &rng.bytes(512));
    planted.push(("primary", bytes - 512, 512));
    for (at, len) in [
        (planted[0].1 + 100, 2000usize),
        (clear + 7 * 4096, 4096),
        (bytes - 3 * 4096, 1500),
    ] {
        write_at(&disks.replica, at, &rng.bytes(len));
        planted.push(("replica", at, len));
    }
    // And a record-looking sector where the guest will write: the guest
    // overwrites it on the primary, and so must the replication.
    write_at(&disks.replica, 0, &sector_record(9999));
    let mut pair = DiskPair::start(
        disks,
        &guest(false, ""),
        false,
        &["--ft-hash-epoch", "3"],
        &["--ft-hash-epoch", "3"],
    );
    pair.planted = true;
    pair.wait_epochs(5);
    let standby_hashed = wait_until(Duration::from_secs(10), || {
        memory_crc(&pair.file("standby.stderr"), 3).is_some()
    });
    assert!(
        standby_hashed,
        "the standby did not report epoch 3; {}",
        pair.logs()
    );
    let mut problems = Problems::default();
    let (p_err, s_err) = (pair.file("primary.stderr"), pair.file("standby.stderr"));
    match (disk_crc(&p_err, "epoch 3"), disk_crc(&s_err, "epoch 3")) {
        (Some(a), Some(b)) if a == b => {}
        _ => problems.add(format!(
            "disk crc at epoch 3: primary {}, standby {}",
            show_disk_crc(&p_err, "epoch 3"),
            show_disk_crc(&s_err, "epoch 3")
        )),
    }
    if memory_crc(&p_err, 3) != memory_crc(&s_err, 3) {
        problems.add("guest memory differs at epoch 3");
    }
    pair.kill_primary();
    let more = failover_problems(&mut pair, None, None);
    problems.0.extend(more.0);
    // The planted blocks, past everything the guest wrote.
    let (disk, replica) = (
        read_image(&pair.disks.primary),
        read_image(&pair.disks.replica),
    );
    let mut wrong = Vec::new();
    for (whose, at, len) in &planted {
        let r = *at as usize..*at as usize + len;
        if disk.get(r.clone()) != replica.get(r) {
            wrong.push(format!("{whose}'s {len} bytes at {at}"));
        }
    }
    if !wrong.is_empty() {
        problems.add(format!(
            "the replica differs from the disk where data was planted before pairing: {}",
            wrong.join(", ")
        ));
    }
    let c = clear as usize;
    if disk.get(c..) != replica.get(c..) {
        problems.add(format!(
            "the replica differs from the disk past the records in {} bytes",
            disk[c..]
                .iter()
                .zip(replica.get(c..).unwrap_or_default())
                .filter(|(a, b)| a != b)
                .count()
        ));
    }
    problems.assert_none("initial sync", &pair.logs());
}

// ---------------------------------------------------------------------
// 3. Flushes.
// ---------------------------------------------------------------------

/// `ftguest disk flushed hb=<n>` lines of a console (complete lines).
fn flushed(console: &str) -> Vec<u64> {
    complete_lines(console, |l| {
        l.strip_prefix("ftguest disk flushed hb=")?.parse().ok()
    })
}

/// The last flush the primary released must be on the replica, and the
/// failover must leave what every failover leaves.
fn check_flushed_record(pair: &mut DiskPair, mut problems: Problems) {
    let f = flushed(&pair.file("primary.console"));
    let Some(&k) = f.last() else {
        problems.add(
            "the primary released no 'ftguest disk flushed hb=<n>' line: the guest's disk_flush=on did not flush (or the test guest lacks it)",
        );
        return problems.assert_none("flush before the kill", &pair.logs());
    };
    // Record k was written once, before its flush, before the line was
    // released; the standby's guest, resumed past it, never rewrites it.
    let replica = read_image(&pair.disks.replica);
    let lba = (k - 1) % pair.record_area();
    let at = lba as usize * SECTOR;
    match replica.get(at..at + SECTOR) {
        Some(s) if s[..] == sector_record(k)[..] => {}
        s => problems.add(format!(
            "record hb={k}, flushed and released before the kill, is not on the replica (LBA {lba} holds {})",
            s.map_or("nothing".into(), describe_sector)
        )),
    }
    println!("last flush released before the kill: hb={k}");
    problems.assert_none("flush before the kill", &pair.logs());
}

/// A flush of epoch 30 acked, then the primary dies while releasing 30:
/// the flushed record is on the replica.
#[test]
fn flush_acked_before_a_kill_during_release_is_on_the_replica() {
    let disks = Disks::new("d-flush-rel", DISK);
    let mut pair = DiskPair::start(
        disks,
        &guest(true, "disk_flush=on"),
        true,
        &["--ft-fault", "during-release@30", "--ft-hash-epoch", "30"],
        &["--ft-hash-epoch", "30"],
    );
    pair.wait_primary_died("during-release@30");
    let problems = failover_problems(&mut pair, Some(30), Some(30));
    check_flushed_record(&mut pair, problems);
}

/// SIGKILL as soon as the primary released a flush line (a random one
/// from the 3rd to the 40th): that record is on the replica.
#[test]
fn flush_released_right_before_a_kill_is_on_the_replica() {
    let mut rng = Rng::from_env("FTVMM_TEST_SEED");
    let target = rng.range(3..41);
    let disks = Disks::new("d-flush-kill", DISK);
    let mut pair = DiskPair::start(disks, &guest(false, "disk_flush=on"), false, &[], &[]);
    pair.wait_epochs(1);
    let seen = wait_until(PAIRING, || {
        flushed(&pair.file("primary.console"))
            .last()
            .is_some_and(|k| *k >= target)
            || pair.released_hb().is_some_and(|n| n >= KILL_GUARD)
    });
    assert!(
        seen,
        "the primary released nothing up to hb={KILL_GUARD}; {}",
        pair.logs()
    );
    pair.kill_primary();
    println!("killed once the primary released a flush of hb>={target}");
    let problems = failover_problems(&mut pair, None, None);
    check_flushed_record(&mut pair, problems);
}

// ---------------------------------------------------------------------
// 4. A real kernel's writes through a failover.
// ---------------------------------------------------------------------

/// The tiny Linux guest's init for this test (`rdinit=/ftdisk`): writes
/// the marker from `ftdisk.marker=` to /dev/vda (O_DIRECT, fsync), prints
/// `ftdisk wrote=<marker>`, then every ~0.2 s reads the first line of
/// /dev/vda back with O_DIRECT and prints `ftdisk n=<k> read=<line>`.
/// O_DIRECT, because the page cache is guest memory: a buffered read would
/// answer from the restored checkpoint, not from the replica.
const FTDISK_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -a || echo "ftdisk: mount -a failed"
marker=
if read -r cmdline </proc/cmdline; then
    for w in $cmdline; do
        case $w in
        ftdisk.marker=*) marker=${w#ftdisk.marker=} ;;
        esac
    done
fi
echo "ftdisk ready"
echo "$marker" >/tmp/m
if busybox dd if=/tmp/m of=/dev/vda bs=4096 count=1 conv=sync,fsync oflag=direct 2>/tmp/e; then
    echo "ftdisk wrote=$marker"
else
    read -r e </tmp/e
    echo "ftdisk write failed: $e"
fi
exec 3<>/run/tick
n=0
while :; do
    n=$((n + 1))
    line=
    if busybox dd if=/dev/vda of=/tmp/r bs=4096 count=1 iflag=direct 2>/tmp/e; then
        read -r line </tmp/r
    else
        read -r e </tmp/e
        echo "ftdisk read failed: $e"
    fi
    echo "ftdisk n=$n read=$line"
    read -t 0.2 -u 3 _
done
"#;

/// `ftdisk n=<k> read=<line>` → (k, line).
fn ftdisk_read(line: &str) -> Option<(u64, String)> {
    let rest = line.strip_prefix("ftdisk n=")?;
    let (n, read) = rest.split_once(" read=")?;
    Some((n.parse().ok()?, read.to_string()))
}

#[test]
fn linux_guest_reads_back_after_failover_what_it_wrote_before() {
    let test = "linux_guest_reads_back_after_failover_what_it_wrote_before";
    let Some((vmlinux, initrd, cmdline)) = linux_guest(test) else {
        return;
    };
    let disks = Disks::new("d-linux", 1 << 20);
    let initrd = cpio::initrd_with(
        &initrd,
        &disks.dir.0,
        &[("ftdisk", 0o100_755, FTDISK_INIT.as_bytes())],
    );
    let marker = format!(
        "FTMARK-{}-{}",
        std::process::id(),
        Rng::from_env("FTVMM_TEST_SEED").range(0..1 << 32)
    );
    let port = free_port();
    let replica = disk_arg(&disks.replica);
    let standby = start_standby("standby", &disks.dir, port, &["--disk", &replica]);
    let mut args = primary_args(
        &disks.dir,
        "primary",
        port,
        &format!("{cmdline} rdinit=/ftdisk ftdisk.marker={marker}"),
        &[
            "--kernel".into(),
            vmlinux.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--disk".into(),
            disk_arg(&disks.primary),
        ],
    );
    // Linux: more memory, longer epochs (as failover_linux.rs).
    set_arg(&mut args, "--mem-mib", "128");
    set_arg(&mut args, "--ft-interval-ms", "50");
    let mut primary = spawn("primary", &disks.dir, &args);
    let file = |n: &str| read(&disks.dir.path(n));
    let reads = |n: &str| complete_lines(&file(n), ftdisk_read);
    let logs = || {
        format!(
            "primary console (tail):\n{}\nprimary stderr:\n{}\nstandby stderr:\n{}\nstandby console (tail):\n{}",
            tail(&file("primary.console"), 15),
            file("primary.stderr"),
            file("standby.stderr"),
            tail(&file("standby.console"), 15)
        )
    };
    // Committed: the line after the write was released, and two reads
    // after it, so the guest is in its loop.
    // (Linux's console ends lines with "\r\n": complete_lines strips it.)
    let wrote = || {
        complete_lines(&file("primary.console"), |l| {
            l.strip_prefix("ftdisk wrote=").map(str::to_string)
        })
        .contains(&marker)
    };
    let committed = wait_until(Duration::from_secs(300), || {
        wrote() && reads("primary.console").len() >= 2
            || file("primary.console").contains("ftdisk write failed")
    });
    assert!(
        committed && wrote(),
        "Linux did not write the marker under protection; {}",
        logs()
    );
    primary.kill();
    let resumed = wait_until(Duration::from_secs(120), || {
        reads("standby.console").len() >= 3
    });
    assert!(resumed, "the standby did not run Linux on; {}", logs());
    let mut problems = Problems::default();
    let n_of = |l: &str| ftdisk_read(l).map(|(n, _)| n);
    let (pc, sc) = (file("primary.console"), file("standby.console"));
    p_check_exactly_once(&mut problems, &pc, &sc, n_of);
    // The first read the standby printed may have run on the primary
    // before the checkpoint; every later one ran on the standby, from the
    // replica.
    let after: Vec<(u64, String)> = reads("standby.console").into_iter().skip(1).collect();
    if let Some((n, got)) = after.iter().find(|(_, r)| *r != marker) {
        problems.add(format!(
            "after the takeover the guest read {got:?} from /dev/vda (read n={n}, O_DIRECT), not the marker {marker:?} it wrote and committed before the kill"
        ));
    }
    if let Some(l) = sc
        .lines()
        .find(|l| l.starts_with("ftdisk") && l.contains("failed"))
    {
        problems.add(format!("the standby's guest: {l}"));
    }
    drop(standby);
    let img = read_image(&disks.replica);
    let want = format!("{marker}\n");
    if !img.starts_with(want.as_bytes()) {
        problems.add(format!(
            "the replica file does not start with the marker line (it starts with {})",
            describe_sector(img.get(..SECTOR).unwrap_or_default())
        ));
    }
    problems.assert_none("Linux disk write across a failover", &logs());
}

fn p_check_exactly_once(
    problems: &mut Problems,
    p: &str,
    s: &str,
    parse: impl Fn(&str) -> Option<u64>,
) {
    // A kill before the primary released a single byte of a heartbeat
    // (a random kill can come a few milliseconds after the first commit)
    // leaves nothing for the standby to continue: all its output must then
    // count on without a gap or a repeat.
    if transcript::complete_lines(p, &parse).is_empty() && !p.contains("hb=") {
        let hbs = transcript::complete_lines(s, &parse);
        let broken = hbs.windows(2).find(|w| w[1] != w[0] + 1);
        match (hbs.first(), broken) {
            (None, _) => problems.add("neither console has a heartbeat".to_string()),
            (Some(_), Some(w)) => problems.add(format!(
                "the primary released no heartbeat; the standby's go {} then {}",
                w[0], w[1]
            )),
            (Some(_), None) => {}
        }
        return;
    }
    problems.check(
        "exactly-once consoles",
        transcript::check_exactly_once(p, s, parse)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    );
}

// ---------------------------------------------------------------------
// 5. Replicas that do not fit: refused at the handshake.
// ---------------------------------------------------------------------

/// A primary the standby must refuse: its exit, stderr (default logging:
/// only what a user sees) and console.
struct Refusal {
    status: Option<ExitStatus>,
    stderr: String,
    console: String,
}

/// Runs a primary with `disk` against the standby on `port`; the guest
/// stops after 20 heartbeats should it be accepted after all.
fn try_primary(dir: &TempDir, name: &'static str, port: u16, disk: &str) -> Refusal {
    let args = primary_args(
        dir,
        name,
        port,
        &format!("{GUEST} stop=20"),
        &["--disk".into(), disk.into()],
    );
    let stderr = dir.path(&format!("{name}.stderr"));
    let child = ftvmm()
        .args(&args)
        .env_remove("FTVMM_LOG")
        .stdout(std::fs::File::create(dir.path(&format!("{name}.stdout"))).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn ftvmm");
    let mut p = Proc::new(child, name);
    let status = p.wait(PAIRING);
    Refusal {
        status,
        stderr: read(&stderr),
        console: read(&dir.path(&format!("{name}.console"))),
    }
}

/// The ways a refusal can be wrong: accepted, no fitting error line, a
/// guest started, the standby gone. Also whether the standby, having
/// refused, is there to be tried with a fitting primary (one that served
/// the primary it should have refused is not: it exits after that
/// primary's clean end, or runs its guest).
fn refusal_problems(
    r: &Refusal,
    what: &str,
    line_ok: impl Fn(&str) -> bool,
    standby: &mut Proc,
) -> (Problems, bool) {
    let mut p = Problems::default();
    let refused = match r.status {
        None => {
            p.add(format!(
                "a primary with {what} was still running after {PAIRING:?}: the standby accepted it"
            ));
            false
        }
        Some(s) if s.success() => {
            p.add(format!(
                "a primary with {what} ran its guest and exited 0: the standby accepted it instead of refusing it \
                 (so the standby was not tried with a fitting primary afterwards)"
            ));
            false
        }
        Some(_) => true,
    };
    if let Some(l) = r.stderr.lines().find(|l| line_ok(l)) {
        println!("the primary with {what} was told: {l}");
    } else {
        p.add(format!(
            "no line on the primary's stderr explains the refusal ({what}); it printed:\n{}",
            r.stderr
        ));
    }
    if r.console.contains("ftguest ready") {
        p.add(format!(
            "the refused primary started its guest (its console: {:?})",
            tail(&r.console, 3)
        ));
    }
    let running = standby.running();
    if refused && !running {
        p.add("the standby is gone: it must keep listening after refusing a primary");
    }
    (p, refused && running)
}

/// After a refusal the standby pairs with a fitting primary (`disk`): the
/// pair commits epochs, the guest runs and replica and disk agree at
/// epoch 3.
fn accepts_afterwards(dir: &TempDir, port: u16, disk: &str, standby_name: &str, p: &mut Problems) {
    let args = primary_args(
        dir,
        "good",
        port,
        GUEST,
        &[
            "--disk".into(),
            disk.into(),
            "--ft-hash-epoch".into(),
            "3".into(),
        ],
    );
    let mut good = spawn("good", dir, &args);
    let epochs = || read(&dir.path("good.metrics.jsonl")).lines().count();
    let paired = wait_until(PAIRING, || epochs() >= 5 || good.exited());
    let s_err = || read(&dir.path(&format!("{standby_name}.stderr")));
    if !paired || epochs() < 5 {
        p.add(format!(
            "the standby did not pair with a fitting primary after the refusal ({} epochs); its stderr:\n{}\nthe primary's:\n{}",
            epochs(),
            s_err(),
            read(&dir.path("good.stderr"))
        ));
        return;
    }
    let hashed = wait_until(Duration::from_secs(10), || {
        memory_crc(&s_err(), 3).is_some()
    });
    let (a, b) = (
        disk_crc(&read(&dir.path("good.stderr")), "epoch 3"),
        disk_crc(&s_err(), "epoch 3"),
    );
    if !hashed || a.is_none() || a != b {
        p.add(format!(
            "the fitting primary's pairing: disk crc at epoch 3: primary {}, standby {}",
            show_disk_crc(&read(&dir.path("good.stderr")), "epoch 3"),
            show_disk_crc(&s_err(), "epoch 3")
        ));
    }
    good.kill();
}

/// Representations of a size in bytes an error line may use.
fn size_forms(b: u64) -> Vec<String> {
    vec![
        b.to_string(),
        format!("{} sectors", b / 512),
        format!("{} KiB", b >> 10),
        format!("{}KiB", b >> 10),
        format!("{} MiB", b >> 20),
        format!("{}MiB", b >> 20),
        format!("{}M", b >> 20),
    ]
}

fn mentions_size(line: &str, b: u64) -> bool {
    size_forms(b).iter().any(|f| line.contains(f.as_str()))
}

/// A replica of half the disk's size: refused, with a line naming the
/// file and both sizes; the guest never starts; the standby waits on and
/// pairs with a primary whose disk has the replica's size.
#[test]
fn replica_of_the_wrong_size_is_refused_and_the_standby_waits_on() {
    let disks = Disks::new("d-size", DISK);
    make_image(&disks.replica, DISK / 2);
    let port = free_port();
    let mut standby = start_standby(
        "standby",
        &disks.dir,
        port,
        &["--disk", &disk_arg(&disks.replica), "--ft-hash-epoch", "3"],
    );
    let r = try_primary(&disks.dir, "bad", port, &disk_arg(&disks.primary));
    let line_ok = |l: &str| {
        l.contains("size")
            && (l.contains("replica.img") || l.contains("primary.img"))
            && mentions_size(l, DISK)
            && mentions_size(l, DISK / 2)
    };
    let (mut p, go_on) = refusal_problems(
        &r,
        &format!("a {} MiB disk for a {} MiB replica", DISK >> 20, DISK >> 21),
        line_ok,
        &mut standby,
    );
    if go_on {
        let small = disks.dir.path("small.img");
        make_image(&small, DISK / 2);
        accepts_afterwards(&disks.dir, port, &disk_arg(&small), "standby", &mut p);
    }
    p.assert_none(
        "replica of the wrong size",
        &read(&disks.dir.path("standby.stderr")),
    );
}

/// A replica in a directory that does not exist: refused naming the
/// file; once the file is there the standby pairs.
#[test]
fn missing_replica_is_refused_and_the_standby_waits_on() {
    let disks = Disks::new("d-missing", DISK);
    let absent = disks.dir.path("not-yet/replica.img");
    let port = free_port();
    let mut standby = start_standby(
        "standby",
        &disks.dir,
        port,
        &["--disk", &disk_arg(&absent), "--ft-hash-epoch", "3"],
    );
    let r = try_primary(&disks.dir, "bad", port, &disk_arg(&disks.primary));
    let (mut p, go_on) = refusal_problems(
        &r,
        "a replica that does not exist",
        |l| l.contains("replica.img"),
        &mut standby,
    );
    if go_on {
        std::fs::create_dir(disks.dir.path("not-yet")).unwrap();
        make_image(&absent, DISK);
        accepts_afterwards(
            &disks.dir,
            port,
            &disk_arg(&disks.primary),
            "standby",
            &mut p,
        );
    }
    p.assert_none("missing replica", &read(&disks.dir.path("standby.stderr")));
}

/// A directory where the replica should be: refused naming it; once a
/// file replaces it the standby pairs.
#[test]
fn directory_as_replica_is_refused_and_the_standby_waits_on() {
    let disks = Disks::new("d-dir", DISK);
    std::fs::remove_file(&disks.replica).unwrap();
    std::fs::create_dir(&disks.replica).unwrap();
    let port = free_port();
    let mut standby = start_standby(
        "standby",
        &disks.dir,
        port,
        &["--disk", &disk_arg(&disks.replica), "--ft-hash-epoch", "3"],
    );
    let r = try_primary(&disks.dir, "bad", port, &disk_arg(&disks.primary));
    let (mut p, go_on) = refusal_problems(
        &r,
        "a directory as its replica",
        |l| l.contains("replica.img"),
        &mut standby,
    );
    if go_on {
        std::fs::remove_dir(&disks.replica).unwrap();
        make_image(&disks.replica, DISK);
        accepts_afterwards(
            &disks.dir,
            port,
            &disk_arg(&disks.primary),
            "standby",
            &mut p,
        );
    }
    p.assert_none(
        "directory as replica",
        &read(&disks.dir.path("standby.stderr")),
    );
}

/// `readonly` on one side only, either way round: refused with a line
/// saying so; the standby pairs with a primary that matches it.
fn readonly_mismatch(tag: &str, primary_ro: bool) {
    let disks = Disks::new(tag, DISK);
    let ro = |p: &Path, on: bool| {
        let a = disk_arg(p);
        if on {
            format!("{a},readonly")
        } else {
            a
        }
    };
    let port = free_port();
    let mut standby = start_standby(
        "standby",
        &disks.dir,
        port,
        &[
            "--disk",
            &ro(&disks.replica, !primary_ro),
            "--ft-hash-epoch",
            "3",
        ],
    );
    let r = try_primary(&disks.dir, "bad", port, &ro(&disks.primary, primary_ro));
    let what = if primary_ro {
        "a readonly disk and a writable replica"
    } else {
        "a writable disk and a readonly replica"
    };
    let line_ok = |l: &str| {
        let l = l.to_ascii_lowercase();
        l.contains("readonly") || l.contains("read-only") || l.contains("read only")
    };
    let (mut p, go_on) = refusal_problems(&r, what, line_ok, &mut standby);
    if go_on {
        accepts_afterwards(
            &disks.dir,
            port,
            &ro(&disks.primary, !primary_ro),
            "standby",
            &mut p,
        );
    }
    p.assert_none(what, &read(&disks.dir.path("standby.stderr")));
}

#[test]
fn readonly_disk_with_a_writable_replica_is_refused() {
    readonly_mismatch("d-ro-p", true);
}

#[test]
fn writable_disk_with_a_readonly_replica_is_refused() {
    readonly_mismatch("d-ro-s", false);
}

// ---------------------------------------------------------------------
// The helpers themselves.
// ---------------------------------------------------------------------

#[test]
fn helpers_read_records_and_crc_lines() {
    let area = 16;
    let mut img = vec![0u8; 32 * SECTOR];
    for n in 1..=10u64 {
        let at = ((n - 1) % area) as usize * SECTOR;
        img[at..at + SECTOR].copy_from_slice(&sector_record(n));
    }
    assert_eq!(check_records(&img, area, 10, true), Ok(()));
    let e = check_records(&img, area, 12, true).unwrap_err();
    assert!(e.contains("lacks records 11..12"), "{e}");
    img[3 * SECTOR] = b'x';
    let e = check_records(&img, area, 10, true).unwrap_err();
    assert!(e.contains("where records 4 belong"), "{e}");
    img[3 * SECTOR..4 * SECTOR].copy_from_slice(&sector_record(4));
    img[14 * SECTOR] = 1;
    let e = check_records(&img, area, 10, true).unwrap_err();
    assert!(e.contains("LBAs 14"), "{e}");
    assert_eq!(check_records(&img, area, 10, false), Ok(()));
    // Wrapped: hb 17 overwrote hb 1 in the 16-sector area.
    img[..SECTOR].copy_from_slice(&sector_record(17));
    img[14 * SECTOR] = 0;
    let e = check_records(&img, area, 17, true).unwrap_err();
    assert!(e.contains("lacks records 11..16"), "{e}");
    assert_eq!(record_in(&sector_record(42)), Some(42));

    let err = "x\nftvmm: disk crc at epoch 3: disk0=0000abcd disk1=FFFFFFFF\n\
               ftvmm: disk crc at takeover from checkpoint 12: disk0=12345678\n\
               ftvmm: standby took over from checkpoint 12 (why); guest running\n";
    assert_eq!(
        disk_crc(err, "epoch 3"),
        Some(vec![("disk0".into(), 0xabcd), ("disk1".into(), u32::MAX)])
    );
    assert_eq!(disk_crc(err, "epoch 4"), None);
    assert_eq!(
        takeover_disk_crc(err),
        Some((12, vec![("disk0".into(), 0x1234_5678)]))
    );
    assert_eq!(took_over_from(err), Some(12));
    assert_eq!(ranges(&[1, 2, 3, 5, 7, 8]), "1..3, 5, 7..8");

    // The bulk area of 64 sectors, 2-sector slots: 16 slots from LBA 32;
    // 40 rounds wrap them twice.
    let mut img = vec![0u8; 64 * SECTOR];
    assert_eq!(bulk_layout(64, 2), (32, 16));
    for r in 1..=40u64 {
        for i in 0..2 {
            let lba = 32 + (r - 1) % 16 * 2 + i;
            let at = lba as usize * SECTOR;
            img[at..at + SECTOR].copy_from_slice(&bulk_sector(r, lba));
        }
    }
    assert_eq!(check_bulk(&img, 64, 2, 40), Ok(()));
    assert_eq!(bulk_in(&img[33 * SECTOR..34 * SECTOR]), Some((33, 33)));
    let e = check_bulk(&img, 64, 2, 41).unwrap_err();
    assert!(
        e.contains("rounds 41 (first: round 41: LBA 48 holds round 25's"),
        "{e}"
    );
    img[40 * SECTOR..41 * SECTOR].fill(0);
    let e = check_bulk(&img, 64, 2, 40).unwrap_err();
    assert!(e.contains("lacks the bulk writes of rounds 37 "), "{e}");
    assert!(
        GUEST.contains(&format!(" rounds={ROUNDS} ")),
        "ROUNDS must match GUEST"
    );

    let a = cpio::newc(&[("x", 0o100_644, b"hello")]);
    assert!(a.starts_with(b"070701"));
    assert_eq!(a.len() % 4, 0);
    assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
}
