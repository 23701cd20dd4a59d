//! Seccomp through the real binary: every thread of a primary and of a
//! standby (before and after a takeover) runs under a filter; a forbidden
//! system call on any kind of thread ends the process with one clear line
//! naming the thread and the call; `--no-seccomp` lets the same call run.
//!
//! The forbidden call comes from the test hook `FTVMM_TEST_FORBIDDEN_SYSCALL
//! =KIND`: right after a thread of that kind installed its filter, it calls
//! personality(2) (number 135 on x86_64), which no list allows.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use common::*;

const HOOK: &str = "FTVMM_TEST_FORBIDDEN_SYSCALL";
/// personality(2) on x86_64.
const CALL: u32 = 135;
/// 128 + SIGSYS.
const SECCOMP_EXIT: i32 = 159;
const GUEST: &str = "dirty=64 span=256 rounds=2 round_us=2000";
const T: Duration = Duration::from_secs(60);

/// The line a forbidden call on thread `thread` prints.
fn death_line(thread: &str) -> String {
    format!(
        "ftvmm: seccomp: thread '{thread}' made forbidden system call {CALL}; exiting (run with --no-seccomp to debug)"
    )
}

/// `ftvmm ARGS` as process `name` in `dir`, with the test hook set to
/// `kind` when given.
fn spawn_with(name: &'static str, dir: &TempDir, args: &[String], kind: Option<&str>) -> Proc {
    let mut cmd = ftvmm();
    cmd.args(args);
    if let Some(k) = kind {
        cmd.env(HOOK, k);
    }
    Proc::spawn(cmd, name, &dir.0)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A primary's arguments: the test guest with a disk and an API, protected
/// by 127.0.0.1:`port` when given.
fn primary_args(dir: &TempDir, port: Option<u16>, extra: &[&str]) -> Vec<String> {
    let disk = dir.path("primary.img");
    if !disk.exists() {
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    }
    let mut a = strings(&[
        "run",
        "--mem-mib",
        "64",
        "--cmdline",
        GUEST,
        "--ft-interval-ms",
        "20",
        "--heartbeat-ms",
        "200",
    ]);
    a.extend([
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--serial".into(),
        format!("file:{}", dir.path("primary.console").display()),
        "--api".into(),
        dir.path("primary.sock").display().to_string(),
    ]);
    if let Some(p) = port {
        a.extend(["--ft-peer".to_string(), format!("127.0.0.1:{p}")]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A standby's arguments on `port`, with a replica and an API.
fn standby_args_with_disk(dir: &TempDir, port: u16) -> Vec<String> {
    let replica = dir.path("replica.img");
    std::fs::write(&replica, vec![0u8; 1 << 20]).unwrap();
    standby_args(
        port,
        &dir.path("standby.console"),
        &[
            "--disk",
            &format!("path={}", replica.display()),
            "--api",
            &dir.path("standby.sock").display().to_string(),
        ],
    )
}

fn hbs(dir: &TempDir, console: &str) -> usize {
    complete_lines(&read(&dir.path(console)), hb_line).len()
}

/// Waits for `p` to exit and checks it died of the forbidden call on
/// `thread`, with exactly that one line about it.
fn assert_died_on(p: &mut Proc, thread: &str, what: &str) {
    let status: ExitStatus = p
        .wait(T)
        .unwrap_or_else(|| panic!("{what}: still running; stderr:\n{}", p.stderr()));
    let stderr = p.stderr();
    assert_eq!(
        status.code(),
        Some(SECCOMP_EXIT),
        "{what}: exit {status:?}; stderr:\n{stderr}"
    );
    let line = death_line(thread);
    let seccomp_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ftvmm: seccomp:"))
        .collect();
    assert_eq!(seccomp_lines, [line.as_str()], "{what}: stderr:\n{stderr}");
}

/// Each thread of process `pid`: its name and its seccomp mode and filter
/// count (/proc/PID/task/TID/status; mode 2 is "filter").
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let status = read(&t.path().join("status"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        let (Some(mode), Some(filters)) = (field("Seccomp:"), field("Seccomp_filters:")) else {
            continue;
        };
        let name = read(&t.path().join("comm")).trim().to_string();
        out.push((name, mode, filters));
    }
    out
}

/// Every thread of `pid` is in seccomp filter mode; its threads by name.
fn assert_all_filtered(pid: u32, what: &str) -> BTreeMap<String, u32> {
    let ts = threads(pid);
    assert!(!ts.is_empty(), "{what}: no threads in /proc/{pid}/task");
    let mut names = BTreeMap::new();
    for (name, mode, filters) in &ts {
        assert!(
            *mode == 2 && *filters >= 1,
            "{what}: thread '{name}' runs without a seccomp filter (Seccomp: {mode}, filters: {filters}); all: {ts:?}"
        );
        names.insert(name.clone(), *filters);
    }
    names
}

fn has(names: &BTreeMap<String, u32>, prefix: &str) -> bool {
    names.keys().any(|n| n.starts_with(prefix))
}

#[test]
fn every_thread_of_a_pair_runs_under_a_filter_before_and_after_a_takeover() {
    let dir = TempDir::new("seccomp-all");
    let port = free_port();
    let mut standby = spawn_with("standby", &dir, &standby_args_with_disk(&dir, port), None);
    assert!(listening(&dir, "standby"), "{}", standby.stderr());
    let mut primary = spawn_with("primary", &dir, &primary_args(&dir, Some(port), &[]), None);
    assert!(
        wait_until(T, || hbs(&dir, "primary.console") >= 10),
        "primary did not run: {}",
        primary.stderr()
    );
    // Ask both APIs something, so their connection threads exist too.
    let ctl = |sock: &Path| {
        run(
            &["ctl", "--api", &sock.display().to_string(), "status"],
            Duration::from_secs(10),
        )
    };
    assert!(ctl(&dir.path("primary.sock")).status.success());
    let p = assert_all_filtered(primary.child.id(), "primary");
    for t in [
        "vcpu0",
        "virtio-",
        "api",
        "ft-hb-send",
        "ft-hb-recv",
        "ft-watch",
    ] {
        assert!(has(&p, t), "primary: no '{t}' thread among {p:?}");
    }
    // Filters stack: a vCPU runs under the primary's and its own.
    assert!(p["vcpu0"] >= 2, "{p:?}");
    let s = assert_all_filtered(standby.child.id(), "standby");
    for t in ["api", "ft-accept", "ft-hb-send", "ft-hb-recv", "ft-watch"] {
        assert!(has(&s, t), "standby: no '{t}' thread among {s:?}");
    }

    primary.kill();
    assert!(
        wait_until(T, || hbs(&dir, "standby.console") >= 5),
        "standby did not take over: {}",
        standby.stderr()
    );
    assert!(ctl(&dir.path("standby.sock")).status.success());
    // The takeover built the VM under the standby's filter.
    let s = assert_all_filtered(standby.child.id(), "standby after the takeover");
    for t in ["vcpu0", "virtio-"] {
        assert!(has(&s, t), "standby: no '{t}' thread among {s:?}");
    }
    assert!(s["vcpu0"] >= 2, "{s:?}");
    assert!(standby.running(), "{}", standby.stderr());
}

#[test]
fn no_seccomp_runs_every_thread_unfiltered() {
    let dir = TempDir::new("seccomp-off");
    let primary = spawn_with(
        "primary",
        &dir,
        &primary_args(&dir, None, &["--no-seccomp"]),
        None,
    );
    assert!(
        wait_until(T, || hbs(&dir, "primary.console") >= 3),
        "primary did not run: {}",
        primary.stderr()
    );
    let ts = threads(primary.child.id());
    assert!(ts.iter().any(|(n, _, _)| n == "vcpu0"), "{ts:?}");
    assert!(ts.iter().all(|(_, mode, _)| *mode == 0), "{ts:?}");
}

#[test]
fn a_forbidden_call_on_a_vm_s_threads_ends_the_process_with_one_line() {
    // (kind, the thread that makes the call)
    for (kind, thread) in [
        ("primary", "main"),
        ("vcpu", "vcpu0"),
        ("device", "virtio-virtiobl"),
        ("api", "api"),
    ] {
        let dir = TempDir::new("seccomp-vm");
        let mut p = spawn_with("primary", &dir, &primary_args(&dir, None, &[]), Some(kind));
        assert_died_on(&mut p, thread, kind);
    }
}

#[test]
fn a_forbidden_call_on_a_pair_s_threads_ends_the_process_with_one_line() {
    // The standby's own threads, when it starts.
    for (kind, thread) in [("standby", "main"), ("accept", "ft-accept")] {
        let dir = TempDir::new("seccomp-standby");
        let mut s = spawn_with(
            "standby",
            &dir,
            &standby_args_with_disk(&dir, free_port()),
            Some(kind),
        );
        assert_died_on(&mut s, thread, kind);
    }
    // The primary's pairing threads.
    for (kind, thread) in [("heartbeat", "heartbeat-start"), ("watch", "ft-watch")] {
        let dir = TempDir::new("seccomp-pairing");
        let port = free_port();
        let _standby = spawn_with("standby", &dir, &standby_args_with_disk(&dir, port), None);
        assert!(listening(&dir, "standby"));
        let mut p = spawn_with(
            "primary",
            &dir,
            &primary_args(&dir, Some(port), &[]),
            Some(kind),
        );
        assert_died_on(&mut p, thread, kind);
    }
    // The witness client's name lookup (a name, not an address).
    let dir = TempDir::new("seccomp-resolver");
    let mut p = spawn_with(
        "primary",
        &dir,
        &primary_args(
            &dir,
            Some(free_port()),
            &["--witness", "http://localhost:9"],
        ),
        Some("resolver"),
    );
    assert_died_on(&mut p, "witness-dns", "resolver");
    // The takeover's announce, on the standby.
    let dir = TempDir::new("seccomp-takeover");
    let port = free_port();
    let mut standby = spawn_with(
        "standby",
        &dir,
        &standby_args_with_disk(&dir, port),
        Some("announce"),
    );
    assert!(listening(&dir, "standby"));
    let mut primary = spawn_with("primary", &dir, &primary_args(&dir, Some(port), &[]), None);
    assert!(
        wait_until(T, || hbs(&dir, "primary.console") >= 10),
        "primary did not run: {}",
        primary.stderr()
    );
    primary.kill();
    assert_died_on(&mut standby, "announce-start", "announce");
}

#[test]
fn without_seccomp_the_same_call_runs_and_the_guest_ends_normally() {
    let dir = TempDir::new("seccomp-hook-off");
    let mut args = primary_args(&dir, None, &["--no-seccomp"]);
    let at = args.iter().position(|a| a == GUEST).unwrap();
    args[at] = "stop=3".into();
    let mut p = spawn_with("primary", &dir, &args, Some("vcpu"));
    let status = p.wait(T).expect("the guest did not power off");
    let stderr = p.stderr();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "ftvmm: seccomp test: thread 'vcpu0' (vcpu) made system call {CALL}: allowed (filters off)"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("forbidden"), "{stderr}");
    assert_eq!(hbs(&dir, "primary.console"), 3);
}

#[test]
fn an_unknown_hook_kind_is_refused_with_one_line() {
    let mut cmd = ftvmm();
    cmd.env(HOOK, "gpu")
        .args(["run", "--cmdline", "stop=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = wait_with_timeout(cmd.spawn().unwrap(), T);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr.trim(),
        format!("ftvmm: {HOOK}='gpu' names no thread kind (expected primary, standby, vcpu, device, api, accept, heartbeat, watch, resolver or announce)")
    );
}

#[test]
fn a_pair_whose_guest_powers_off_ends_cleanly_under_its_filters() {
    // The ends of both roles (the goodbye, the summaries, the API sockets
    // removed) run under the filters too.
    let dir = TempDir::new("seccomp-end");
    let port = free_port();
    let mut standby = spawn_with("standby", &dir, &standby_args_with_disk(&dir, port), None);
    assert!(listening(&dir, "standby"), "{}", standby.stderr());
    let mut args = primary_args(&dir, Some(port), &[]);
    let at = args.iter().position(|a| a == GUEST).unwrap();
    args[at] = format!("{GUEST} stop=20");
    let mut primary = spawn_with("primary", &dir, &args, None);
    for (p, what) in [(&mut primary, "primary"), (&mut standby, "standby")] {
        let status = p
            .wait(T)
            .unwrap_or_else(|| panic!("{what} did not end; stderr:\n{}", p.stderr()));
        assert!(
            status.success(),
            "{what}: exit {status:?}; stderr:\n{}",
            p.stderr()
        );
        assert!(
            !p.stderr().contains("ftvmm: seccomp:"),
            "{what}: {}",
            p.stderr()
        );
    }
    assert_eq!(hbs(&dir, "primary.console"), 20);
    assert!(!dir.path("primary.sock").exists());
    assert!(!dir.path("standby.sock").exists());
}
