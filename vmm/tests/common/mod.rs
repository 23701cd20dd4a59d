//! Helpers shared by the integration tests: run the real `ftvmm` binary with
//! bounded timeouts and read what it printed.

#![allow(dead_code)]

pub mod host;
pub mod netns;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use host::*;

/// The `ftvmm` binary cargo built for these tests.
pub fn ftvmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
    c.stdin(Stdio::null());
    c
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Waits for `child` at most `timeout`; kills it and panics past that.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_thread.join().unwrap();
            let stderr = err_thread.join().unwrap();
            panic!("ftvmm did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

/// Runs `ftvmm` with `args`, capturing output, within `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Output {
    let child = ftvmm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvmm");
    wait_with_timeout(child, timeout)
}

/// The heartbeat numbers in a console transcript, in order.
///
/// Only complete lines count: a guest stopped or paused in the middle of a
/// line leaves a prefix ("ftguest hb=1" of "ftguest hb=18") that is not a
/// heartbeat.
pub fn heartbeats(transcript: &str) -> Vec<u64> {
    complete_lines(transcript, hb_line)
}

/// The tiny Linux guest built by resources/linux/build.sh: (vmlinux,
/// initramfs, cmdline). None (after printing a SKIP line) when it is not
/// built; a panic instead when FTVMM_REQUIRE_LINUX=1 (scripts/test.sh builds
/// it, so there a missing guest is a failure, not a skip).
pub fn linux_guest(test: &str) -> Option<(PathBuf, PathBuf, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/linux");
    let dir = std::env::var_os("FTVMM_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("out"));
    let vmlinux = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio");
    if !vmlinux.exists() || !initrd.exists() {
        if std::env::var("FTVMM_REQUIRE_LINUX").as_deref() == Ok("1") {
            panic!(
                "{test}: the tiny Linux guest is not built in {}",
                dir.display()
            );
        }
        println!("SKIP {test}: tiny Linux guest not built (run resources/linux/build.sh)");
        return None;
    }
    let cmdline = std::fs::read_to_string(root.join("cmdline"))
        .expect("resources/linux/cmdline")
        .trim()
        .to_string();
    Some((vmlinux, initrd, cmdline))
}

/// Spawns `ftvmm ARGS` with stdout/stderr to files in `dir`.
pub fn spawn(name: &'static str, dir: &TempDir, args: &[String]) -> Proc {
    let mut cmd = ftvmm();
    cmd.args(args);
    Proc::spawn(cmd, name, &dir.0)
}

/// The arguments of `ftvmm standby` listening on 127.0.0.1:`port`, its
/// console in `console`, then `extra`.
pub fn standby_args(port: u16, console: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "standby".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--serial".into(),
        format!("file:{}", console.display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Whether the standby `name` (stderr in `dir/NAME.stderr`) says it is
/// listening within 10 s.
pub fn listening(dir: &TempDir, name: &str) -> bool {
    wait_until(Duration::from_secs(10), || {
        read(&dir.path(&format!("{name}.stderr"))).contains("listening")
    })
}

/// Spawns standby `name` on `port` (console in `dir/NAME.console`, then
/// `extra`) and asserts that it is listening within 10 s.
pub fn start_standby(name: &'static str, dir: &TempDir, port: u16, extra: &[&str]) -> Proc {
    let console = dir.path(&format!("{name}.console"));
    let p = spawn(name, dir, &standby_args(port, &console, extra));
    assert!(listening(dir, name));
    p
}

/// Parses the complete lines (those ending in '\n') of `text` with `parse`.
pub fn complete_lines<T>(text: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| parse(l.trim_end_matches('\n')))
        .collect()
}

fn parse_hb(line: &str) -> Option<u64> {
    line.strip_prefix("ftguest hb=")?.parse().ok()
}

/// Checks DESIGN's exactly-once property of a failover transcript: the
/// primary's released output `p` followed by the standby's output `s` shows
/// every number at most once and in order, consecutive within each process,
/// with a gap only at the takeover (the epoch that was in flight), and the
/// standby goes on counting. Returns (last number of the primary, first
/// number of the standby, gap).
pub fn check_exactly_once(
    p: &str,
    s: &str,
    parse: impl Fn(&str) -> Option<u64> + Copy,
) -> (u64, u64, u64) {
    // The line the primary was in the middle of when it died may be
    // finished by the standby's first bytes (same epoch boundary), or be
    // lost with the in-flight epoch; it is judged as one junction line.
    let p_tail = p.rsplit_once('\n').map(|(_, t)| t).unwrap_or(p);
    let (s_head, s_rest) = if p_tail.is_empty() {
        ("", s)
    } else {
        match s.split_once('\n') {
            Some((h, r)) => (h, r),
            None => (s, ""),
        }
    };
    let p_nums = complete_lines(p, parse);
    let junction = parse(&format!("{p_tail}{s_head}"));
    let s_nums = complete_lines(s_rest, parse);
    assert!(!p_nums.is_empty(), "primary released nothing:\n{p}");
    assert_eq!(
        p_nums,
        (p_nums[0]..p_nums[0] + p_nums.len() as u64).collect::<Vec<_>>(),
        "primary's output is not consecutive"
    );
    assert!(
        !s_nums.is_empty(),
        "the standby printed nothing after the takeover:\n{s}"
    );
    assert_eq!(
        s_nums,
        (s_nums[0]..s_nums[0] + s_nums.len() as u64).collect::<Vec<_>>(),
        "standby's output is not consecutive"
    );
    let last_p = *p_nums.last().unwrap();
    // A junction line that the standby finished correctly reads as the
    // number just before its next line. Anything else there is the primary's
    // half-released line glued to the standby's output after a lost
    // in-flight epoch: a garbled line at the takeover, not a repeated one.
    let first_s = match junction {
        Some(j) if j + 1 == s_nums[0] && j > last_p => j,
        Some(j) => {
            println!("takeover junction garbled by the lost in-flight epoch (reads as {j}); counted as lost");
            s_nums[0]
        }
        None => s_nums[0],
    };
    assert!(
        first_s > last_p,
        "output repeated across the takeover: primary ended at {last_p}, standby restarted at {first_s}"
    );
    (last_p, first_s, first_s - last_p - 1)
}

/// Heartbeat number of a test-guest console line.
pub fn hb_line(line: &str) -> Option<u64> {
    parse_hb(line)
}
