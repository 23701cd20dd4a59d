//! Helpers shared by the integration tests: run the real `ftvmm` binary with
//! bounded timeouts and read what it printed.

#![allow(dead_code)]

pub mod cpio;
pub mod disk;
pub mod host;
pub mod netns;
pub mod pair;
pub mod relay;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// Each test binary uses its own subset of these.
#[allow(unused_imports)]
pub use ftvmm::transcript::{self, complete_lines, hb_line, heartbeats};
pub use host::*;

/// The `ftvmm` binary cargo built for these tests, with the tests' shared
/// channel key in `FTVMM_FT_KEY` (so every primary and standby they start
/// runs keyed, as in production; a test of the key rules removes it).
pub fn ftvmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvmm"));
    c.stdin(Stdio::null());
    c.env("FTVMM_FT_KEY", test_key());
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

/// DESIGN's exactly-once property of a failover transcript (the primary's
/// released output `p`, then the standby's `s`), checked by the library's
/// one checker; panics with both transcripts when it does not hold.
/// Returns (last number of the primary, first number of the standby, gap).
pub fn check_exactly_once(
    p: &str,
    s: &str,
    parse: impl Fn(&str) -> Option<u64>,
) -> (u64, u64, u64) {
    match transcript::check_exactly_once(p, s, parse) {
        Ok(c) => {
            if let Some(j) = c.garbled_junction {
                println!("takeover junction garbled by the lost in-flight epoch (reads as {j}); counted as lost");
            }
            (c.primary_last, c.standby_first, c.lost)
        }
        Err(e) => {
            panic!("exactly-once: {e}\nprimary's transcript:\n{p}\nstandby's transcript:\n{s}")
        }
    }
}
