//! Measurement: failure detection at the default heartbeat settings, through
//! the real binary on loopback with the embedded test guest.
//!
//! 1. False failovers under load: a standby and a primary, paired, while
//!    four busy-loop processes (more than the host's cores) run for
//!    LOAD_SECS (60 by default). A false failover is the standby taking over
//!    from a primary that never failed; the primary declaring its standby
//!    lost is counted too. Also reported: the longest gap between two
//!    heartbeats each side received (the heartbeat module's `longest gap`
//!    log lines).
//! 2. Detection of a silent primary: RUNS times (5 by default), a fresh
//!    pair; the primary is SIGSTOPped (a frozen host: its sockets stay
//!    open, so only silence can tell) and the time is taken until the
//!    standby's report line says it took over.
//!
//! Needs /dev/kvm. Run with
//! `cargo run --release -p ftvmm --example false_failovers [-- LOAD_SECS [RUNS]]`
//! (build the binary first: `cargo build --release -p ftvmm`). Every child
//! (VMs and load) dies with this process (PR_SET_PDEATHSIG) and the load
//! ends by itself after LOAD_SECS; scratch files are removed on exit.

#[path = "../tests/common/host.rs"]
mod host;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host::*;

/// The failover tests' guest: dirties 512 pages per round, prints often.
const GUEST: &str = "dirty=512 span=2048 rounds=2 round_us=2000";
/// Busy-loop processes of the load phase.
const LOAD_PROCS: usize = 4;
/// What the VMs log: warnings, the standby's "listening", and the
/// heartbeat module's gap lines.
const LOG: &str = "warn,ftvmm::ft::standby=info,ftvmm_transport::heartbeat=info";

fn ftvmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FTVMM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/false_failovers → target/<profile>/ftvmm
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ftvmm"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not built: cargo build --release -p ftvmm",
        bin.display()
    );
    bin
}

/// Makes `cmd`'s process get SIGKILL when we die, however we die.
fn die_with_us(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Spawns `ftvmm ARGS`, stdout/stderr to `dir/NAME.stdout|stderr`.
fn spawn_vm(bin: &Path, name: &'static str, dir: &TempDir, args: &[String]) -> Proc {
    let err = dir.path(&format!("{name}.stderr"));
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("FTVMM_FT_KEY", test_key())
        .env("FTVMM_LOG", LOG)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path(&format!("{name}.stdout"))).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let child = die_with_us(&mut cmd)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    Proc {
        child,
        name,
        stderr_file: Some(err),
    }
}

/// A paired standby and primary at the default heartbeat settings.
struct Pair {
    dir: TempDir,
    standby: Proc,
    primary: Proc,
}

impl Pair {
    fn start(bin: &Path, tag: &str) -> Pair {
        let dir = TempDir::new(tag);
        let port = free_port();
        let console = |n: &str| format!("file:{}", dir.path(n).display());
        let standby = spawn_vm(
            bin,
            "standby",
            &dir,
            &[
                "standby".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--serial".into(),
                console("standby.console"),
            ],
        );
        assert!(
            wait_until(Duration::from_secs(10), || standby
                .stderr()
                .contains("listening")),
            "standby did not start: {}",
            standby.stderr()
        );
        let metrics = dir.path("metrics.jsonl");
        let primary = spawn_vm(
            bin,
            "primary",
            &dir,
            &[
                "run".into(),
                "--mem-mib".into(),
                "64".into(),
                "--cmdline".into(),
                GUEST.into(),
                "--ft-peer".into(),
                format!("127.0.0.1:{port}"),
                "--serial".into(),
                console("primary.console"),
                "--ft-metrics".into(),
                metrics.display().to_string(),
            ],
        );
        // Paired once a few checkpoints were acknowledged.
        assert!(
            wait_until(Duration::from_secs(20), || read(&metrics).lines().count()
                >= 5),
            "no checkpoints committed\nprimary: {}\nstandby: {}",
            primary.stderr(),
            standby.stderr()
        );
        Pair {
            dir,
            standby,
            primary,
        }
    }
}

/// The largest `longest gap X ms` in a VM's log, if one was logged.
fn longest_gap_ms(log: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("longest gap ")? + "longest gap ".len()..];
            rest.split(' ').next()?.parse::<f64>().ok()
        })
        .reduce(f64::max)
}

fn fmt_gap(g: Option<f64>) -> String {
    g.map(|g| format!("{g:.1} ms"))
        .unwrap_or_else(|| "not logged".into())
}

/// Spins until `secs` have passed (a load process: `--burn SECS`).
fn burn(secs: u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut x = 0u64;
    while Instant::now() < end {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// Phase 1: returns (false failovers, standby-lost verdicts).
fn under_load(bin: &Path, secs: u64) -> (u32, u32) {
    let mut pair = Pair::start(bin, "ff-load");
    let exe = std::env::current_exe().expect("current exe");
    let mut load: Vec<Proc> = (0..LOAD_PROCS)
        .map(|_| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--burn", &secs.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            let child = die_with_us(&mut cmd).spawn().expect("spawn a load process");
            Proc::new(child, "load")
        })
        .collect();
    println!(
        "load: {LOAD_PROCS} busy-loop processes on {} cores for {secs} s",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let t0 = Instant::now();
    let mut took_over = None;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
        if took_over.is_none() && pair.standby.stderr().contains("standby took over") {
            took_over = Some(t0.elapsed());
        }
        if !pair.primary.running() || !pair.standby.running() {
            break;
        }
    }
    for p in &mut load {
        p.kill();
    }
    let (p_log, s_log) = (pair.primary.stderr(), pair.standby.stderr());
    let took_over = took_over.or_else(|| s_log.contains("standby took over").then(|| t0.elapsed()));
    let standby_lost = p_log.lines().filter(|l| l.contains("lost (")).count() as u32;
    let epochs = read(&pair.dir.path("metrics.jsonl")).lines().count();
    println!(
        "after {:.1} s under load: primary {}, standby {}, {epochs} checkpoints committed",
        t0.elapsed().as_secs_f64(),
        if pair.primary.running() {
            "running"
        } else {
            "EXITED"
        },
        if pair.standby.running() {
            "running"
        } else {
            "EXITED"
        },
    );
    match took_over {
        Some(t) => println!(
            "FALSE FAILOVER: the standby took over {:.1} s into the load",
            t.as_secs_f64()
        ),
        None => println!("false failovers: 0 (the standby never took over)"),
    }
    println!("primary declared its standby lost: {standby_lost} times");
    println!(
        "longest heartbeat gap seen by the standby: {}; by the primary: {} (interval 50 ms, lost after 250 ms)",
        fmt_gap(longest_gap_ms(&s_log)),
        fmt_gap(longest_gap_ms(&p_log))
    );
    for l in p_log.lines().chain(s_log.lines()) {
        if l.contains("WARN") && !l.contains("longest gap") {
            println!("  warning: {l}");
        }
    }
    (u32::from(took_over.is_some()), standby_lost)
}

/// Phase 2, one run: ms from SIGSTOP to the standby's takeover report, and
/// that report.
fn detection(bin: &Path, run: u32) -> Option<(f64, String)> {
    let pair = Pair::start(bin, "ff-stop");
    // Spread the stop over the heartbeat's phase.
    std::thread::sleep(Duration::from_millis(200 + 13 * u64::from(run)));
    let pid = pair.primary.child.id() as libc::pid_t;
    let t0 = Instant::now();
    // SAFETY: kill() only sends a signal; `pid` is our own live child,
    // which `pair` keeps unreaped, so the pid cannot have been reused.
    let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert_eq!(rc, 0, "SIGSTOP: {}", std::io::Error::last_os_error());
    let seen = wait_until(Duration::from_secs(5), || {
        pair.standby.stderr().contains("standby took over")
    });
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let log = pair.standby.stderr();
    if !seen {
        println!("run {run}: the standby did not take over within 5 s:\n{log}");
        return None;
    }
    let report = log
        .lines()
        .find(|l| l.contains("standby took over"))
        .unwrap_or_default()
        .to_string();
    Some((ms, report))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--burn") {
        burn(args[2].parse().expect("--burn SECS"));
        return;
    }
    let secs: u64 = args.get(1).map_or(60, |s| s.parse().expect("LOAD_SECS"));
    let runs: u32 = args.get(2).map_or(5, |s| s.parse().expect("RUNS"));
    let bin = ftvmm_bin();

    println!("== silent primary (SIGSTOP) detection, defaults, {runs} runs ==");
    let mut times = Vec::new();
    for run in 0..runs {
        if let Some((ms, report)) = detection(&bin, run) {
            println!("run {run}: standby took over {ms:.1} ms after the SIGSTOP");
            println!("    {report}");
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    if let (Some(lo), Some(hi)) = (times.first(), times.last()) {
        println!(
            "detection + takeover: {lo:.1}–{hi:.1} ms (median {:.1}) over {} runs; goal ≤ 300 ms",
            times[times.len() / 2],
            times.len()
        );
    }

    println!("== false failovers under full CPU load, defaults ==");
    let (false_failovers, standby_lost) = under_load(&bin, secs);
    let missed = runs as usize - times.len();
    let slow = times.iter().filter(|&&t| t > 300.0).count();
    println!(
        "summary: false failovers {false_failovers}, false standby losses {standby_lost}, \
         detections over 300 ms {slow}, missed detections {missed}"
    );
    if false_failovers + standby_lost != 0 || slow + missed != 0 {
        std::process::exit(1);
    }
}
