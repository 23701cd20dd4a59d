//! Helpers shared by the integration tests: run the real `ftvmm` binary with
//! bounded timeouts and read what it printed.

#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
pub fn heartbeats(transcript: &str) -> Vec<u64> {
    transcript
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ftguest hb="))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ftvmm-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when running as root (some tests need it to drop privileges or
/// enter a mount namespace).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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
