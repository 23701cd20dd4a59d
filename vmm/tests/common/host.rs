//! Helpers that need neither the test harness's `ftvmm` binary nor a
//! network: scratch directories, bounded polling, free ports, child
//! processes that cannot outlive a failing test. Also included (with
//! `netns.rs`) by `examples/netbuf_latency.rs` through `netbuf_topology`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// True when running as root (some tests need it to drop privileges,
/// enter a mount namespace or make network namespaces).
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

/// A TCP port on 127.0.0.1 that was free a moment ago (a network namespace
/// has its own loopback, so there this only makes a clash unlikely).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The file's contents, or "" if absent.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    /// Its stderr file, when [`Proc::spawn`] made one.
    pub stderr_file: Option<PathBuf>,
}

impl Proc {
    /// Takes charge of `child`.
    pub fn new(child: Child, name: &'static str) -> Proc {
        Proc {
            child,
            name,
            stderr_file: None,
        }
    }

    /// Spawns `cmd` (an ftvmm command line) with `FTVMM_LOG=info`, no stdin,
    /// and stdout/stderr to `dir/NAME.stdout|stderr`.
    pub fn spawn(mut cmd: Command, name: &'static str, dir: &Path) -> Proc {
        let stderr = dir.join(format!("{name}.stderr"));
        let out = std::fs::File::create(dir.join(format!("{name}.stdout"))).unwrap();
        let err = std::fs::File::create(&stderr).unwrap();
        let child = cmd
            .env("FTVMM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        Proc {
            child,
            name,
            stderr_file: Some(stderr),
        }
    }

    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        !self.running()
    }

    /// Its stderr file so far ("" without one).
    pub fn stderr(&self) -> String {
        self.stderr_file.as_deref().map(read).unwrap_or_default()
    }

    /// Waits for exit at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The channel key of this test (or benchmark) process: made once, mode
/// 0600, in a directory of the system temp dir named after the process
/// (left behind when the process ends; removed by the next test process).
pub fn test_key() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        remove_dead_processes_keys();
        let dir = std::env::temp_dir().join(format!("ftvmm-test-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("key directory");
        let path = dir.join("ft.key");
        ftvmm_transport::FtKey::write_new(&path).expect("test key");
        path
    })
}

/// Removes the key directories of test processes that are gone, so that
/// what [`test_key`] leaves behind stays bounded by the processes alive.
fn remove_dead_processes_keys() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ftvmm-test-key-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The release `ftvmm` the benchmarks (examples) run: `$FTVMM_BIN`, or
/// `target/release/ftvmm`, built now so it is never stale.
pub fn release_ftvmm() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "ftvmm", "--bin", "ftvmm"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build --release -p ftvmm failed");
    // target/release/examples/NAME → target/release/ftvmm
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ftvmm"))
        .expect("target dir");
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

// ------------------------------------------------- benchmarks' interruption

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// For the benchmarks (examples): SIGINT/SIGTERM set a flag that every wait
/// checks ([`check_interrupt`]); the run then unwinds, and the drops kill
/// the children and remove the scratch directory.
pub fn catch_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Unwinds (a panic) once [`catch_signals`]' flag is set.
pub fn check_interrupt() {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        panic!("interrupted: cleaning up");
    }
}

/// Sleeps `d`, checking for an interrupt every 10 ms.
pub fn interruptible_sleep(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupt();
        std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
    }
}

/// Polls `cond` every `every` for at most `timeout`, checking for an
/// interrupt meanwhile; whether it held.
pub fn interruptible_wait(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        interruptible_sleep(every);
    }
}
