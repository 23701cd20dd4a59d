//! Sandboxing: like Firecracker and Cloud Hypervisor, every thread of
//! `ftvmm run` and `ftvmm standby` runs under a seccomp-BPF filter
//! (rust-vmm's seccompiler) that allows only the system calls its kind of
//! thread needs ([`filters`]), installed once the thread is set up.
//!
//! The binary decides once, at start, with [`init`]: filters on (the
//! default) or off (`--no-seccomp`). Seccomp is a property of threads and
//! cannot be undone, so this is process-wide, like the logger; library
//! users that never call [`init`] (the tests that build VMs directly) get
//! no filters. Each thread then calls [`apply`] for its own kind when its
//! set-up is done: the main thread of each role, the vCPU threads, the
//! control API, the standby's acceptor, the watchers, the witness's
//! resolver, and, through [`worker_start`], the virtio workers (which the
//! devices crate starts). Threads that other crates start without a hook
//! (the transport's heartbeats, the netbuf's takeover announce) are started
//! by [`within`] from a helper thread that installed their filter first:
//! filters are inherited.
//!
//! A forbidden call traps: the SIGSYS handler writes one line naming the
//! thread and the call, and the process exits with [`EXIT_STATUS`].

mod filters;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::BpfProgram;

/// Exit status of a process that made a forbidden system call: 128 +
/// SIGSYS, as a shell reports a death by that signal.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Test hook: naming a thread kind in this environment variable makes that
/// kind of thread, right after installing its filter, make
/// [`TEST_SYSCALL`], which no list allows.
pub const TEST_ENV: &str = "FTVMM_TEST_FORBIDDEN_SYSCALL";

/// The system call of the test hook: `personality(0xffffffff)` only reads
/// the process's execution domain, so it is harmless where it is allowed
/// (`--no-seccomp`).
pub const TEST_SYSCALL: libc::c_long = libc::SYS_personality;

/// The kinds of thread, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread of `ftvmm run`: the runner loop (epochs, pairings,
    /// the control API's requests).
    Primary,
    /// The main thread of `ftvmm standby`: receives and applies
    /// checkpoints; at a takeover it builds the VM and runs it.
    Standby,
    /// A vCPU thread (`vcpuN`).
    Vcpu,
    /// A virtio device's worker (`virtio-…`): its queues and its backend.
    Device,
    /// The control API's server (`api`) and its connections (`api-conn`).
    Api,
    /// The standby's acceptor of primaries (`ft-accept`).
    Acceptor,
    /// The heartbeat sender and receiver (`ft-hb-send`, `ft-hb-recv`).
    Heartbeat,
    /// The failure watcher of a pairing (`ft-watch`).
    Watcher,
    /// The witness client's name lookups (`witness-dns`).
    Resolver,
    /// The takeover announce (`ft-announce`).
    Announce,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Primary,
        ThreadKind::Standby,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Acceptor,
        ThreadKind::Heartbeat,
        ThreadKind::Watcher,
        ThreadKind::Resolver,
        ThreadKind::Announce,
    ];

    /// The kind's name, as [`TEST_ENV`] spells it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Primary => "primary",
            ThreadKind::Standby => "standby",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Acceptor => "accept",
            ThreadKind::Heartbeat => "heartbeat",
            ThreadKind::Watcher => "watch",
            ThreadKind::Resolver => "resolver",
            ThreadKind::Announce => "announce",
        }
    }

    fn index(self) -> usize {
        ThreadKind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("ALL holds every kind")
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ThreadKind {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, SeccompError> {
        ThreadKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| SeccompError::TestKind(s.to_string()))
    }
}

/// Errors setting up or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel has no seccomp filtering.
    #[error(
        "this kernel cannot filter system calls (prctl PR_GET_SECCOMP: {0}); run with --no-seccomp"
    )]
    Unsupported(std::io::Error),
    /// A list did not compile into a BPF program.
    #[error("cannot build the seccomp filter of {kind} threads: {source}")]
    Build {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's error.
        source: seccompiler::BackendError,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler of the seccomp filters: {0}")]
    Handler(vmm_sys_util::errno::Error),
    /// [`init`] was called twice.
    #[error("seccomp is already set up for this process")]
    AlreadySetUp,
    /// [`TEST_ENV`] names no kind.
    #[error("{TEST_ENV}='{0}' names no thread kind (expected primary, standby, vcpu, device, api, accept, heartbeat, watch, resolver or announce)")]
    TestKind(String),
    /// Installing a filter on a thread failed.
    #[error("cannot install the seccomp filter of thread '{thread}' ({kind}): {source}")]
    Install {
        /// The thread's name.
        thread: String,
        /// Its kind.
        kind: ThreadKind,
        /// seccompiler's error.
        source: seccompiler::Error,
    },
    /// The helper thread of [`within`] could not be started.
    #[error("cannot start a thread under the {kind} seccomp filter: {source}")]
    Spawn {
        /// The filter's kind.
        kind: ThreadKind,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What [`init`] decided.
struct Policy {
    /// The compiled filters, by [`ThreadKind::index`]; `None` when off.
    filters: Option<Vec<BpfProgram>>,
    /// The kind whose threads make [`TEST_SYSCALL`] (the test hook).
    test: Option<ThreadKind>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Decides, once per process, whether threads get filters: with `enabled`,
/// compiles every kind's filter and installs the SIGSYS handler; either
/// way reads the test hook ([`TEST_ENV`]).
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    let test = match std::env::var(TEST_ENV) {
        Ok(v) if !v.is_empty() => Some(v.parse::<ThreadKind>()?),
        _ => None,
    };
    let filters = if enabled {
        // SAFETY: PR_GET_SECCOMP takes no pointer; it only reports the
        // calling thread's mode, or fails without CONFIG_SECCOMP.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
            return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
        }
        let pid = std::process::id();
        let progs = ThreadKind::ALL
            .into_iter()
            .map(|kind| {
                filters::list(kind, pid)
                    .compile()
                    .map_err(|source| SeccompError::Build { kind, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(SeccompError::Handler)?;
        Some(progs)
    } else {
        None
    };
    POLICY
        .set(Policy { filters, test })
        .map_err(|_| SeccompError::AlreadySetUp)
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Installs `kind`'s filter on the calling thread, when filters are on;
/// from here on it, and every thread it starts, can make only the calls
/// that list allows.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    if let Some(filters) = &policy.filters {
        seccompiler::apply_filter(&filters[kind.index()]).map_err(|source| {
            SeccompError::Install {
                thread: thread_name(),
                kind,
                source,
            }
        })?;
    }
    if policy.test == Some(kind) {
        forbidden_call(kind, policy.filters.is_some());
    }
    Ok(())
}

/// [`apply`], for threads that have nobody to report to: a filter that
/// cannot be installed ends the process (with one line), rather than
/// leaving the thread unfiltered.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("ftvmm: {e}; exiting");
        std::process::exit(1);
    }
}

/// The test hook: the call no list allows. With filters on it does not
/// return (SIGSYS); without, it is reported.
fn forbidden_call(kind: ThreadKind, filtered: bool) {
    // SAFETY: personality(0xffffffff) takes no pointer and changes
    // nothing: it returns the current execution domain.
    let r = unsafe { libc::syscall(TEST_SYSCALL, 0xffff_ffff_u64) };
    log::info!(
        target: crate::REPORT,
        "seccomp test: thread '{}' ({kind}) made system call {TEST_SYSCALL}: {} ({})",
        thread_name(),
        if r >= 0 { "allowed" } else { "failed" },
        if filtered { "filters on" } else { "filters off" }
    );
}

/// Runs `f` on a helper thread that installed `kind`'s filter first, so
/// that the threads `f` starts inherit it (for threads started by crates
/// that take no hook). Where [`init`] was never called (a library user),
/// runs `f` here.
pub fn within<R: Send>(kind: ThreadKind, f: impl FnOnce() -> R + Send) -> Result<R, SeccompError> {
    if POLICY.get().is_none() {
        return Ok(f());
    }
    std::thread::scope(|s| {
        let helper = std::thread::Builder::new()
            .name(format!("{kind}-start"))
            .spawn_scoped(s, || apply(kind).map(|()| f()))
            .map_err(|source| SeccompError::Spawn { kind, source })?;
        match helper.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The hook a virtio worker runs first ([`apply`] for `kind`), for
/// `ftvmm_devices`' [`WorkerStart`](ftvmm_devices::virtio::mmio::WorkerStart).
pub fn worker_start(kind: ThreadKind) -> ftvmm_devices::virtio::mmio::WorkerStart {
    Box::new(move || apply(kind).map_err(Into::into))
}

/// The kernel's `siginfo_t` of a SIGSYS (its `_sigsys` member), as laid
/// out on 64-bit Linux: signo, errno, code, padding, then the call's
/// address, number and audit architecture.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// A fixed buffer a signal handler can format into (no allocation).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS handler: one line on stderr naming the thread and the call,
/// then `_exit`. Async-signal-safe: it formats into a stack buffer and
/// makes only calls every list allows (gettid, getpid, prctl
/// PR_GET_NAME, write, exit_group).
extern "C" fn on_sigsys(num: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO
    // handler, and for SIGSYS its layout is SigsysInfo's (the prefix
    // fields are common to every signal, so they are read first).
    let info = unsafe { &*(info as *const SigsysInfo) };
    if num != libc::SIGSYS || info.signo != libc::SIGSYS || info.code != SYS_SECCOMP {
        return;
    }
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    line.push(b"ftvmm: seccomp: thread '");
    // SAFETY: gettid and getpid take no arguments and cannot fail.
    let main = unsafe { libc::syscall(libc::SYS_gettid) == libc::c_long::from(libc::getpid()) };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the
    // 16-byte buffer it is given.
    let named = !main && unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) } == 0;
    if main {
        line.push(b"main");
    } else if named {
        let n = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        line.push(&name[..n]);
    } else {
        line.push(b"?");
    }
    line.push(b"' made forbidden system call ");
    line.push_num(i64::from(info.syscall));
    line.push(b"; exiting (run with --no-seccomp to debug)\n");
    // SAFETY: write(2) of an initialised stack buffer and _exit(2) are
    // async-signal-safe; the process ends here.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_by_name() {
        for kind in ThreadKind::ALL {
            assert_eq!(kind.name().parse::<ThreadKind>().unwrap(), kind);
        }
        let e = "cpu".parse::<ThreadKind>().unwrap_err();
        assert!(e.to_string().contains("'cpu' names no thread kind"), "{e}");
    }

    #[test]
    fn a_line_formats_numbers_and_stops_at_its_end() {
        let mut l = Line {
            buf: [0; 192],
            len: 0,
        };
        l.push(b"call ");
        l.push_num(135);
        l.push(b" ");
        l.push_num(0);
        l.push(b" ");
        l.push_num(-12);
        assert_eq!(&l.buf[..l.len], b"call 135 0 -12");
        l.push(&[b'x'; 400]);
        assert_eq!(l.len, 192);
    }
}
