//! `ftvmm demo`: a primary and a standby on this machine, a failover, a
//! summary (DESIGN "Processes and command line", "Observability").
//!
//! The demo runs the real roles as separate processes (this executable's
//! `standby` and `run` subcommands) on loopback, with the embedded test guest
//! dirtying pages. It follows the run from the files the roles write — the
//! primary's per-epoch metrics (JSON lines) and both consoles — and shows a
//! live status line. After a few seconds it SIGKILLs the primary, times the
//! standby's takeover, lets the guest run on the standby, then checks that the
//! console transcript (the primary's released output followed by the
//! standby's) shows every heartbeat exactly once, prints a summary table and
//! writes an SVG plot of per-epoch pause time and dirty pages.
//!
//! Everything lands in one directory (a fresh temporary one by default) that
//! is kept for inspection. The children run in their own process group (a
//! terminal's Ctrl-C reaches only the demo, which then stops them) with a
//! parent-death signal, and a guard kills them on every path out.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::EpochMetrics;

use ftvmm::transcript::{check_exactly_once, hb_line};

/// `ftvmm demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// SIGKILL the primary this many seconds after its first checkpoint.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub kill_after_secs: u64,
    /// Epoch length in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub interval_ms: u64,
    /// Pages the test guest dirties per round.
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub dirty: u64,
    /// Let the guest run on the standby this many seconds after the takeover.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub keep_running_secs: u64,
    /// Directory for the consoles, metrics, logs and plot (default: a fresh
    /// temporary directory).
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// KVM is not usable.
    #[error("the demo needs KVM: {0}")]
    Kvm(#[from] ftvmm::vm::VmError),
    /// The output directory.
    #[error("cannot create the demo directory '{path}': {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The executable to run the roles with.
    #[error("cannot find the ftvmm executable to run the primary and the standby: {0}")]
    Exe(std::io::Error),
    /// A file the demo writes or reads.
    #[error("cannot {what} '{path}': {source}")]
    File {
        /// "create", "read", "write".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Starting a role.
    #[error("cannot start the {role}: {source}")]
    Spawn {
        /// "primary" or "standby".
        role: &'static str,
        /// What failed.
        source: std::io::Error,
    },
    /// No loopback port could be had.
    #[error("cannot find a free TCP port on 127.0.0.1: {0}")]
    Port(String),
    /// A role ended when it should have been running.
    #[error("the {role} exited early ({status}): {last} (log: {log})")]
    DiedEarly {
        /// "primary" or "standby".
        role: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The last line of its stderr.
        last: String,
        /// Its stderr file.
        log: PathBuf,
    },
    /// Something did not happen in time.
    #[error("{what} within {secs} s (log: {log})")]
    Timeout {
        /// What did not happen, as a sentence start.
        what: &'static str,
        /// The bound.
        secs: u64,
        /// The log to look at.
        log: PathBuf,
    },
    /// A metrics line that is not an epoch record.
    #[error("bad metrics line in '{path}': {line}")]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The line.
        line: String,
    },
    /// The pair came apart before the kill.
    #[error("the primary and the standby came apart before the demo killed the primary; the {role} said: {line}")]
    Unpaired {
        /// Who said so.
        role: &'static str,
        /// Its log line.
        line: String,
    },
    /// The primary died before its first checkpoint committed.
    #[error("the standby had no committed checkpoint to take over from (log: {})", .0.display())]
    NothingToRun(PathBuf),
    /// The transcript check failed.
    #[error("exactly-once: FAIL: {0}")]
    ExactlyOnce(String),
    /// Ctrl-C or a termination signal.
    #[error("interrupted; the primary and the standby were stopped (files in {0})")]
    Interrupted(PathBuf),
}

/// How long the standby gets to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary gets to commit its first checkpoint (initial sync).
const FIRST_EPOCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the standby gets to take over and print a heartbeat.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace between SIGTERM and SIGKILL when stopping the standby.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Polling period of the status loop.
const TICK: Duration = Duration::from_millis(20);
/// Polling period while timing the takeover.
const FAST_TICK: Duration = Duration::from_millis(1);
/// Attempts at a free port (another process may take it between our probe
/// and the standby's bind).
const PORT_ATTEMPTS: usize = 3;
/// The pair's heartbeat interval (the peer is lost after 5 missed).
const HEARTBEAT_MS: u64 = 200;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set [`INTERRUPTED`] while this lives; the previous
/// dispositions come back on drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> SignalGuard {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
            // value; the handler only stores to an atomic, which is
            // async-signal-safe; `prev` is a valid out-pointer.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut act.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &act, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        SignalGuard { old }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores a disposition sigaction(2) returned.
            unsafe {
                libc::sigaction(*sig, prev, std::ptr::null_mut());
            }
        }
    }
}

/// A role's process; SIGKILLed and reaped on drop unless already reaped.
struct RoleProc {
    role: &'static str,
    child: std::process::Child,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl RoleProc {
    fn spawn(
        role: &'static str,
        exe: &Path,
        dir: &Path,
        args: &[String],
        log_level: Option<&str>,
    ) -> Result<RoleProc, DemoError> {
        let stderr = dir.join(format!("{role}.stderr"));
        let create = |path: PathBuf| {
            File::create(&path).map_err(|source| DemoError::File {
                what: "create",
                path,
                source,
            })
        };
        let out = create(dir.join(format!("{role}.stdout")))?;
        let err = create(stderr.clone())?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a terminal's Ctrl-C goes to the demo
            // alone, which stops the roles in order.
            .process_group(0);
        if let Some(level) = log_level {
            cmd.env("FTVMM_LOG", level);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and calls
        // only prctl(2), getppid(2) and _exit(2), which are async-signal-safe.
        // `parent` is a plain integer copied in.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the demo, even if it is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| DemoError::Spawn { role, source })?;
        Ok(RoleProc {
            role,
            child,
            stderr,
            status: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has ended (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// An error if it has ended.
    fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(self.died(status)),
        }
    }

    fn died(&self, status: ExitStatus) -> DemoError {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(nothing on stderr)")
            .trim()
            .to_string();
        DemoError::DiedEarly {
            role: self.role,
            status,
            last,
            log: self.stderr.clone(),
        }
    }

    /// SIGKILL without waiting.
    fn signal_kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaped either way.
    fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own unreaped child's pid: it cannot have
            // been reused, since we have not waited for it.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
    }
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Follows a file that another process appends to: remembers the offset and
/// yields only complete new lines.
struct Tail {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    buf: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            file: None,
            partial: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Calls `f` with each complete line appended since the last poll.
    fn poll(&mut self, mut f: impl FnMut(&str)) -> Result<(), DemoError> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(source) => {
                    return Err(DemoError::File {
                        what: "read",
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        self.buf.clear();
        file.read_to_end(&mut self.buf)
            .map_err(|source| DemoError::File {
                what: "read",
                path: self.path.clone(),
                source,
            })?;
        if self.buf.is_empty() {
            return Ok(());
        }
        self.partial.extend_from_slice(&self.buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        for line in self.partial[..end].split(|&b| b == b'\n') {
            f(&String::from_utf8_lossy(line));
        }
        self.partial.drain(..=end);
        Ok(())
    }
}

/// The exact nearest-rank quantile of `sorted` (0 when empty).
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    v
}

/// The standby's "took over" line: (checkpoint, ms from loss to running).
fn parse_takeover(line: &str) -> Option<(u64, f64)> {
    let rest = line.split("standby took over from checkpoint ").nth(1)?;
    let epoch = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let ms = rest
        .split("guest running ")
        .nth(1)?
        .split(" ms")
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some((epoch, ms))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Port(e.to_string()))
}

fn nap(d: Duration, dir: &Path) -> Result<(), DemoError> {
    std::thread::sleep(d);
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(DemoError::Interrupted(dir.to_path_buf()));
    }
    Ok(())
}

/// A fresh directory under the system temp dir.
fn fresh_dir() -> Result<PathBuf, DemoError> {
    let base = std::env::temp_dir();
    let mut last = None;
    for n in 0..100 {
        let p = base.join(format!("ftvmm-demo-{}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(source) => return Err(DemoError::Dir { path: p, source }),
        }
    }
    Err(DemoError::Dir {
        path: base,
        source: last.unwrap_or_else(|| std::io::Error::other("no fresh name")),
    })
}

/// The live status line: rewritten in place on a terminal, one line per
/// second otherwise.
struct Status {
    tty: bool,
    every: Duration,
    last: Option<Instant>,
    open: bool,
}

impl Status {
    fn new() -> Status {
        let tty = std::io::stdout().is_terminal();
        Status {
            tty,
            every: if tty {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(1)
            },
            last: None,
            open: false,
        }
    }

    fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.every)
    }

    fn show(&mut self, line: &str) {
        self.last = Some(Instant::now());
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r{line}\x1b[K");
            self.open = true;
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// Ends the in-place line so that ordinary output can follow.
    fn finish(&mut self) {
        if self.open {
            println!();
            self.open = false;
        }
        self.last = None;
    }
}

/// What the demo saw of the primary.
#[derive(Default)]
struct PrimaryView {
    epochs: Vec<EpochMetrics>,
    hb_first: Option<u64>,
    hb_last: Option<u64>,
    hb_count: u64,
}

impl PrimaryView {
    fn poll(&mut self, metrics: &mut Tail, console: &mut Tail) -> Result<(), DemoError> {
        let mut bad = None;
        metrics.poll(|line| {
            if line.trim().is_empty() {
                return;
            }
            match serde_json::from_str::<EpochMetrics>(line) {
                Ok(m) => self.epochs.push(m),
                Err(_) => bad = bad.take().or_else(|| Some(line.to_string())),
            }
        })?;
        if let Some(line) = bad {
            return Err(DemoError::Metrics {
                path: metrics.path.clone(),
                line,
            });
        }
        console.poll(|line| {
            if let Some(n) = hb_line(line) {
                self.hb_first.get_or_insert(n);
                self.hb_last = Some(n);
                self.hb_count += 1;
            }
        })
    }

    fn bytes_sent(&self) -> u64 {
        self.epochs.iter().map(|m| m.bytes_sent).sum()
    }
}

/// Runs the demo; prints as it goes.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    // Fail early, with KVM's own message, rather than in a child.
    drop(ftvmm::vm::open_kvm()?);
    let exe = std::env::current_exe().map_err(DemoError::Exe)?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| DemoError::Dir {
                path: d.clone(),
                source,
            })?;
            d.clone()
        }
        None => fresh_dir()?,
    };
    let _signals = SignalGuard::install();
    let result = Demo::new(args, exe, dir.clone()).and_then(|mut d| d.run());
    if result.is_err() {
        // The roles are stopped by now (their guards dropped). End a status
        // line left open, and say where the evidence is.
        if std::io::stdout().is_terminal() {
            println!();
        }
        println!("files kept in {}", dir.display());
    }
    result
}

struct Demo<'a> {
    args: &'a DemoArgs,
    exe: PathBuf,
    dir: PathBuf,
    cmdline: String,
    status: Status,
}

/// What the takeover looked like.
struct Takeover {
    checkpoint: u64,
    running_after_kill: Duration,
    standby_own_ms: f64,
    first_hb_after_kill: Duration,
    first_hb: u64,
    /// When the dead primary was reaped, if seen while watching.
    primary_gone: Option<Duration>,
}

impl<'a> Demo<'a> {
    fn new(args: &'a DemoArgs, exe: PathBuf, dir: PathBuf) -> Result<Demo<'a>, DemoError> {
        Ok(Demo {
            args,
            exe,
            cmdline: format!(
                "dirty={} span={} rounds=2 round_us=2000",
                args.dirty,
                args.dirty * 4
            ),
            dir,
            status: Status::new(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn nap(&self, d: Duration) -> Result<(), DemoError> {
        nap(d, &self.dir)
    }

    /// Starts the standby and waits until it listens; retries on port trouble.
    fn start_standby(&self) -> Result<(RoleProc, u16), DemoError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let args = vec![
                "standby".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--serial".into(),
                format!("file:{}", self.path("standby.console").display()),
            ];
            let mut standby =
                RoleProc::spawn("standby", &self.exe, &self.dir, &args, Some("info"))?;
            let mut log = Tail::new(standby.stderr.clone());
            let deadline = Instant::now() + LISTEN_TIMEOUT;
            let mut listening = false;
            while !listening {
                log.poll(|l| listening |= l.contains("standby listening on"))?;
                if listening {
                    break;
                }
                if let Some(status) = standby.exited() {
                    let err = standby.died(status);
                    let port_trouble = std::fs::read_to_string(&standby.stderr)
                        .unwrap_or_default()
                        .contains("cannot listen on");
                    if port_trouble && attempt < PORT_ATTEMPTS {
                        break;
                    }
                    return Err(err);
                }
                if Instant::now() >= deadline {
                    return Err(DemoError::Timeout {
                        what: "the standby did not start listening",
                        secs: LISTEN_TIMEOUT.as_secs(),
                        log: standby.stderr.clone(),
                    });
                }
                self.nap(Duration::from_millis(5))?;
            }
            if listening {
                return Ok((standby, port));
            }
        }
    }

    fn run(&mut self) -> Result<(), DemoError> {
        let args = self.args;
        println!(
            "ftvmm demo: a primary and a standby on this machine, the test guest \"{}\", {} ms epochs",
            self.cmdline, args.interval_ms
        );
        println!(
            "files (consoles, metrics, logs, plot): {}",
            self.dir.display()
        );
        let (mut standby, port) = self.start_standby()?;
        let primary_args = vec![
            "run".to_string(),
            "--cmdline".into(),
            self.cmdline.clone(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            args.interval_ms.to_string(),
            // A SIGKILL closes the sockets, so the takeover does not wait
            // for heartbeats; a longer miss window only keeps a busy host
            // (a build next to the demo) from looking like a failure.
            "--heartbeat-ms".into(),
            HEARTBEAT_MS.to_string(),
            "--serial".into(),
            format!("file:{}", self.path("primary.console").display()),
            "--ft-metrics".into(),
            self.path("metrics.jsonl").display().to_string(),
        ];
        let mut primary = RoleProc::spawn("primary", &self.exe, &self.dir, &primary_args, None)?;
        println!(
            "standby (pid {}) listening on 127.0.0.1:{port}; primary (pid {}) protected by it",
            standby.pid(),
            primary.pid()
        );

        // Protected run.
        let mut view = PrimaryView::default();
        let mut metrics = Tail::new(self.path("metrics.jsonl"));
        let mut p_console = Tail::new(self.path("primary.console"));
        let mut p_log = Tail::new(primary.stderr.clone());
        let mut s_log = Tail::new(standby.stderr.clone());
        let started = Instant::now();
        let mut first_epoch: Option<Instant> = None;
        let mut rate_mark = (Instant::now(), 0u64);
        let kill_after = Duration::from_secs(args.kill_after_secs);
        loop {
            view.poll(&mut metrics, &mut p_console)?;
            primary.check_alive()?;
            standby.check_alive()?;
            // The pair must stay paired until the kill.
            let mut broken = None;
            p_log.poll(|l| {
                if l.contains("running unprotected") {
                    broken.get_or_insert_with(|| ("primary", l.trim().to_string()));
                }
            })?;
            s_log.poll(|l| {
                if l.contains("nothing to run") || l.contains("took over") {
                    broken.get_or_insert_with(|| ("standby", l.trim().to_string()));
                }
            })?;
            if let Some((role, line)) = broken {
                return Err(DemoError::Unpaired { role, line });
            }
            if first_epoch.is_none() {
                if view.epochs.is_empty() {
                    if started.elapsed() > FIRST_EPOCH_TIMEOUT {
                        return Err(DemoError::Timeout {
                            what: "the primary committed no checkpoint (initial sync)",
                            secs: FIRST_EPOCH_TIMEOUT.as_secs(),
                            log: primary.stderr.clone(),
                        });
                    }
                } else {
                    // The first status line comes a period later, with a
                    // rate measured over it.
                    first_epoch = Some(Instant::now());
                    rate_mark = (Instant::now(), view.bytes_sent());
                    self.status.last = Some(Instant::now());
                }
            }
            if let Some(t0) = first_epoch {
                if t0.elapsed() >= kill_after {
                    break;
                }
                if self.status.due() {
                    let sent = view.bytes_sent();
                    let secs = rate_mark.0.elapsed().as_secs_f64().max(1e-3);
                    let mbps = (sent - rate_mark.1) as f64 / secs / 1e6;
                    rate_mark = (Instant::now(), sent);
                    let line = self.status_line(&view, t0.elapsed(), mbps);
                    self.status.show(&line);
                }
            }
            self.nap(TICK)?;
        }

        // The failure. Timing starts at the signal; the dead primary is
        // reaped while the takeover is watched.
        let killed = Instant::now();
        primary.signal_kill();
        self.status.finish();
        let takeover = self.watch_takeover(&mut standby, &mut primary, killed)?;
        primary.kill();
        let reaped = takeover.primary_gone.unwrap_or_else(|| killed.elapsed());
        view.poll(&mut metrics, &mut p_console)?;
        let last_epoch = view.epochs.last().map_or(0, |m| m.epoch);
        println!(
            "SIGKILL primary (pid {}) after epoch {last_epoch}: {} checkpoints committed, hb {}..={} released",
            primary.pid(),
            view.epochs.len(),
            view.hb_first.unwrap_or(0),
            view.hb_last.unwrap_or(0),
        );
        println!(
            "takeover: the standby resumed checkpoint {}; guest running again {:.1} ms after the SIGKILL \
             (the standby's own measure: {:.1} ms after it saw the loss; the dead primary was reaped after {:.1} ms); \
             first new heartbeat hb={} {:.1} ms after the SIGKILL",
            takeover.checkpoint,
            ms(takeover.running_after_kill),
            takeover.standby_own_ms,
            ms(reaped),
            takeover.first_hb,
            ms(takeover.first_hb_after_kill)
        );

        // The guest on the standby.
        let mut s_console = Tail::new(self.path("standby.console"));
        let mut s_hbs = (0u64, 0u64);
        let on_standby = Instant::now();
        let keep = Duration::from_secs(args.keep_running_secs);
        loop {
            s_console.poll(|l| {
                if let Some(n) = hb_line(l) {
                    s_hbs = (s_hbs.0 + 1, n);
                }
            })?;
            standby.check_alive()?;
            if on_standby.elapsed() >= keep {
                break;
            }
            if self.status.due() {
                let line = format!(
                    "[standby {:4.1}s] guest running unprotected on the standby | hb={} ({} since the takeover)",
                    on_standby.elapsed().as_secs_f64(),
                    s_hbs.1,
                    s_hbs.0
                );
                self.status.show(&line);
            }
            self.nap(TICK)?;
        }
        standby.stop(STOP_GRACE);
        self.status.finish();
        println!(
            "stopped the standby (pid {}) after {:.1} s on its own",
            standby.pid(),
            on_standby.elapsed().as_secs_f64()
        );

        // The transcript.
        let read = |name: &str| -> Result<String, DemoError> {
            let path = self.path(name);
            std::fs::read(&path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(|source| DemoError::File {
                    what: "read",
                    path,
                    source,
                })
        };
        let c = check_exactly_once(
            &read("primary.console")?,
            &read("standby.console")?,
            hb_line,
        )
        .map_err(|e| {
            DemoError::ExactlyOnce(format!(
                "{e} (transcripts: {} and {})",
                self.path("primary.console").display(),
                self.path("standby.console").display()
            ))
        })?;
        println!(
            "exactly-once: OK (primary released hb {}..={}, standby continued from hb {}, {} lost with the in-flight epoch; standby reached hb {})",
            c.primary_first, c.primary_last, c.standby_first, c.lost, c.standby_last
        );

        println!();
        print!(
            "{}",
            summary_table(&view.epochs, &takeover, args.interval_ms)
        );
        let plot = self.path("epochs.svg");
        let svg = plot_svg(
            &view.epochs,
            last_epoch + 1,
            ms(takeover.running_after_kill),
            args,
        );
        std::fs::write(&plot, svg).map_err(|source| DemoError::File {
            what: "write",
            path: plot.clone(),
            source,
        })?;
        println!();
        println!("plot: {}", plot.display());
        println!("files kept in {}", self.dir.display());
        Ok(())
    }

    fn status_line(&self, v: &PrimaryView, t: Duration, mbps: f64) -> String {
        let Some(last) = v.epochs.last() else {
            return String::new();
        };
        let pauses = sorted(v.epochs.iter().map(|m| m.pause_us));
        format!(
            "[{:4.1}s] epoch {:>5} | pause {:>5} µs (median {:>5}) | dirty {:>5} pages | {:>6.1} MB/s | held {:>4} B | hb released {:>5}",
            t.as_secs_f64(),
            last.epoch,
            last.pause_us,
            quantile(&pauses, 0.5),
            last.dirty_total(),
            mbps,
            last.held_bytes,
            v.hb_count
        )
    }

    /// Polls the standby's stderr and console (1 ms) until the guest runs
    /// there and prints its first heartbeat.
    fn watch_takeover(
        &self,
        standby: &mut RoleProc,
        primary: &mut RoleProc,
        killed: Instant,
    ) -> Result<Takeover, DemoError> {
        let mut log = Tail::new(standby.stderr.clone());
        let mut console = Tail::new(self.path("standby.console"));
        let mut took: Option<(u64, f64, Duration)> = None;
        let mut first: Option<(u64, Duration)> = None;
        let mut nothing = false;
        let mut primary_gone = None;
        let deadline = killed + TAKEOVER_TIMEOUT;
        loop {
            if primary_gone.is_none() && primary.exited().is_some() {
                primary_gone = Some(killed.elapsed());
            }
            if took.is_none() {
                log.poll(|l| {
                    if let Some((cp, own)) = parse_takeover(l) {
                        took = Some((cp, own, killed.elapsed()));
                    }
                    nothing |= l.contains("nothing to run");
                })?;
            }
            if first.is_none() {
                console.poll(|l| {
                    if first.is_none() {
                        if let Some(n) = hb_line(l) {
                            first = Some((n, killed.elapsed()));
                        }
                    }
                })?;
            }
            if let (Some((checkpoint, standby_own_ms, running)), Some((first_hb, hb_at))) =
                (took, first)
            {
                return Ok(Takeover {
                    checkpoint,
                    // The guest ran by the time its first heartbeat showed,
                    // even if the stderr line was seen later.
                    running_after_kill: running.min(hb_at),
                    standby_own_ms,
                    first_hb_after_kill: hb_at,
                    first_hb,
                    primary_gone,
                });
            }
            if nothing {
                return Err(DemoError::NothingToRun(standby.stderr.clone()));
            }
            standby.check_alive()?;
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: if took.is_none() {
                        "the standby did not take over"
                    } else {
                        "the guest printed no heartbeat on the standby"
                    },
                    secs: TAKEOVER_TIMEOUT.as_secs(),
                    log: standby.stderr.clone(),
                });
            }
            self.nap(FAST_TICK)?;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The summary table printed at the end.
fn summary_table(epochs: &[EpochMetrics], t: &Takeover, interval_ms: u64) -> String {
    let pause = sorted(epochs.iter().map(|m| m.pause_us));
    let dirty = sorted(epochs.iter().map(EpochMetrics::dirty_total));
    let ack = sorted(epochs.iter().map(|m| m.ack_latency_us));
    let transfer = sorted(epochs.iter().map(|m| m.transfer_us));
    let sent: u64 = epochs.iter().map(|m| m.bytes_sent).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "summary: {} epochs of {interval_ms} ms on the primary, {:.1} MB sent to the standby",
        epochs.len(),
        sent as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "  {:<24} {:>9} {:>9} {:>9} {:>9}",
        "", "min", "median", "p99", "max"
    );
    for (name, v) in [
        ("pause µs", &pause),
        ("dirty pages / epoch", &dirty),
        ("transfer µs", &transfer),
        ("ack latency µs", &ack),
    ] {
        let _ = writeln!(
            s,
            "  {:<24} {:>9} {:>9} {:>9} {:>9}",
            name,
            quantile(v, 0.0),
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(v, 1.0)
        );
    }
    let _ = writeln!(
        s,
        "  {:<24} {:>9.1} ms to the guest running, {:.1} ms to its first heartbeat (after the SIGKILL)",
        "takeover",
        ms(t.running_after_kill),
        ms(t.first_hb_after_kill)
    );
    s
}

/// Ticks for an axis from 0 to at least `max`, about `ticks` of them, on
/// whole numbers: (step, top).
fn nice_axis(max: f64, ticks: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let step = if step < 1.0 { 1.0 } else { step };
    (step, (max / step).ceil().max(1.0) * step)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of per-epoch pause µs (left axis) and dirty pages (right
/// axis), with a vertical marker at the epoch the primary was killed in.
fn plot_svg(epochs: &[EpochMetrics], kill_epoch: u64, takeover_ms: f64, args: &DemoArgs) -> String {
    const W: f64 = 960.0;
    const H: f64 = 480.0;
    const L: f64 = 80.0;
    const R: f64 = 90.0;
    const T: f64 = 60.0;
    const B: f64 = 60.0;
    const PAUSE: &str = "#1f77b4";
    const DIRTY: &str = "#ff7f0e";
    const KILL: &str = "#d62728";
    let pw = W - L - R;
    let ph = H - T - B;
    let x0 = epochs.first().map_or(0, |m| m.epoch) as f64;
    // Room after the kill, so the marker stands inside the frame.
    let span = (kill_epoch as f64 - x0).max(1.0);
    let x1 = x0 + span + (span * 0.06).max(1.0);
    let (xstep, _) = nice_axis(x1 - x0, 8.0);
    // A few outliers (the first epoch after the initial sync, a host
    // hiccup) would flatten the rest: scale to the largest pause within 3 ×
    // the 95th percentile, and draw the points above at the top, labelled.
    let pauses = sorted(epochs.iter().map(|m| m.pause_us));
    let p95 = quantile(&pauses, 0.95);
    let pscale = pauses
        .iter()
        .rev()
        .find(|&&p| p <= 3 * p95)
        .copied()
        .unwrap_or(p95);
    let (pstep, ptop) = nice_axis(pscale as f64, 5.0);
    let (dstep, dtop) = nice_axis(
        epochs
            .iter()
            .map(EpochMetrics::dirty_total)
            .max()
            .unwrap_or(0) as f64,
        5.0,
    );
    let sx = |e: f64| L + (e - x0) / (x1 - x0) * pw;
    let sy = |v: f64, top: f64| T + ph - v / top * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        esc(&format!(
            "ftvmm demo: per-epoch pause and dirty pages ({} ms epochs, dirty={} pages per round)",
            args.interval_ms, args.dirty
        ))
    );
    // Grid and ticks: x (epochs).
    let mut e = (x0 / xstep).ceil() * xstep;
    while e <= x1 + 1e-9 {
        let x = sx(e);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#eee"/><line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph,
            T + ph + 5.0,
            T + ph + 20.0,
            e as u64
        );
        e += xstep;
    }
    // Left axis (pause µs), with the horizontal grid.
    let mut v = 0.0;
    while v <= ptop + 1e-9 {
        let y = sy(v, ptop);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><line x1="{}" y1="{y:.1}" x2="{L}" y2="{y:.1}" stroke="black"/><text x="{}" y="{:.1}" text-anchor="end" fill="{PAUSE}">{}</text>"##,
            L + pw,
            L - 5.0,
            L - 8.0,
            y + 4.0,
            v as u64
        );
        v += pstep;
    }
    // Right axis (dirty pages).
    let mut v = 0.0;
    while v <= dtop + 1e-9 {
        let y = sy(v, dtop);
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="black"/><text x="{}" y="{:.1}" fill="{DIRTY}">{}</text>"#,
            L + pw,
            L + pw + 5.0,
            L + pw + 8.0,
            y + 4.0,
            v as u64
        );
        v += dstep;
    }
    // Frame and axis titles.
    let _ = writeln!(
        s,
        r#"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#,
        L + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{}) rotate(-90)" text-anchor="middle" fill="{PAUSE}">pause (µs)</text>"#,
        T + ph / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle" fill="{DIRTY}">dirty pages</text>"#,
        W - 20.0,
        T + ph / 2.0
    );
    // The two series.
    let series = |f: &dyn Fn(&EpochMetrics) -> u64, top: f64| {
        let mut pts = String::new();
        for m in epochs {
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                sx(m.epoch as f64),
                sy((f(m) as f64).min(top), top)
            );
        }
        pts.trim_end().to_string()
    };
    let _ = writeln!(
        s,
        r#"<polyline id="dirty-pages" fill="none" stroke="{DIRTY}" stroke-width="1.5" points="{}"/>"#,
        series(&EpochMetrics::dirty_total, dtop)
    );
    let _ = writeln!(
        s,
        r#"<polyline id="pause-us" fill="none" stroke="{PAUSE}" stroke-width="1.5" points="{}"/>"#,
        series(&|m| m.pause_us, ptop)
    );
    for m in epochs.iter().filter(|m| m.pause_us as f64 > ptop) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" fill="{PAUSE}" font-size="10">↑ {} µs</text>"#,
            sx(m.epoch as f64) + 3.0,
            T + 24.0,
            m.pause_us
        );
    }
    // The kill.
    let kx = sx(kill_epoch as f64);
    let _ = writeln!(
        s,
        r#"<line id="kill" x1="{kx:.1}" y1="{T}" x2="{kx:.1}" y2="{}" stroke="{KILL}" stroke-width="2" stroke-dasharray="6,4"/><text x="{:.1}" y="{}" text-anchor="end" fill="{KILL}">SIGKILL primary (in-flight epoch {kill_epoch}) → guest running on the standby {takeover_ms:.1} ms later</text>"#,
        T + ph,
        kx - 4.0,
        T + 14.0
    );
    // Legend.
    let (lx, ly) = (L + 10.0, T - 22.0);
    let _ = writeln!(
        s,
        r#"<g id="legend"><line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{PAUSE}" stroke-width="3"/><text x="{}" y="{}">pause µs (left axis)</text><line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{DIRTY}" stroke-width="3"/><text x="{}" y="{}">dirty pages (right axis)</text><line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{KILL}" stroke-width="2" stroke-dasharray="6,4"/><text x="{}" y="{}">primary killed</text></g>"#,
        lx + 24.0,
        lx + 30.0,
        ly + 4.0,
        lx + 170.0,
        lx + 194.0,
        lx + 200.0,
        ly + 4.0,
        lx + 360.0,
        lx + 384.0,
        lx + 390.0,
        ly + 4.0,
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_line_parses() {
        let l = "ftvmm: standby took over from checkpoint 207 (checkpoint channel closed); guest running 1.4 ms after the primary was lost";
        assert_eq!(parse_takeover(l), Some((207, 1.4)));
        assert_eq!(parse_takeover("ftvmm: something else"), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                quantile(&v, 0.0),
                quantile(&v, 0.5),
                quantile(&v, 0.99),
                quantile(&v, 1.0)
            ),
            (1, 50, 99, 100)
        );
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn tail_yields_complete_lines_once() {
        let dir = std::env::temp_dir().join(format!("ftvmm-demo-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut t = Tail::new(path.clone());
        let mut got = Vec::new();
        t.poll(|l| got.push(l.to_string())).unwrap();
        let mut f = File::create(&path).unwrap();
        f.write_all(b"a\nb").unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        f.write_all(b"c\nd\n").unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        t.poll(|l| got.push(l.to_string())).unwrap();
        assert_eq!(got, ["a", "bc", "d"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nice_axes_cover_the_data() {
        for max in [0.0, 1.0, 7.0, 512.0, 1030.0, 98_765.0] {
            let (step, top) = nice_axis(max, 5.0);
            assert!(
                top >= max && step >= 1.0 && top / step <= 10.0,
                "{max}: {step} {top}"
            );
        }
    }

    #[test]
    fn plot_has_both_series_and_the_kill() {
        let epochs: Vec<EpochMetrics> = (1..=50)
            .map(|e| EpochMetrics {
                epoch: e,
                pause_us: 300 + e * 3,
                dirty_vcpu: 1000 + e,
                ..Default::default()
            })
            .collect();
        let args = DemoArgs {
            kill_after_secs: 5,
            interval_ms: 25,
            dirty: 512,
            keep_running_secs: 3,
            dir: None,
        };
        let svg = plot_svg(&epochs, 51, 3.5, &args);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(r#"id="kill""#));
        assert!(!svg.contains('↑'), "nothing to clip");
        // An outlier is clipped to the scale of the rest, and labelled.
        let mut spiky = epochs.clone();
        spiky[0].pause_us = 100_000;
        let svg = plot_svg(&spiky, 51, 3.5, &args);
        assert!(svg.contains("↑ 100000 µs"), "{svg}");
        // Only one epoch still draws.
        let one = plot_svg(&epochs[..1], 2, 3.5, &args);
        assert!(!one.contains("NaN") && !one.contains("inf"));
    }
}
