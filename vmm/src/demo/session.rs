//! The demo's course: start the standby and the primary, watch the
//! protected run, SIGKILL the primary, time the takeover, watch the guest on
//! the standby, stop it, check the transcript, report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvmm::transcript::{check_exactly_once, hb_line};

use super::error::DemoError;
use super::live::LiveLine;
use super::plot::{plot_svg, PlotInfo};
use super::proc::{nap, RoleProc};
use super::summary::{ms, summary_table};
use super::tail::Tail;
use super::takeover::{watch_takeover, Takeover};
use super::view::PrimaryView;
use super::DemoArgs;

/// How long the standby gets to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary gets to commit its first checkpoint (initial sync).
const FIRST_EPOCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace between SIGTERM and SIGKILL when stopping the standby.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Polling period of the status loops.
const TICK: Duration = Duration::from_millis(20);
/// Attempts at a free port (another process may take it between our probe
/// and the standby's bind).
const PORT_ATTEMPTS: usize = 3;
/// The pair's heartbeat interval (the peer is lost after 5 missed). A
/// SIGKILL closes the sockets, so the takeover does not wait for
/// heartbeats; a longer miss window only keeps a busy host (a build next to
/// the demo) from looking like a failure.
const HEARTBEAT_MS: u64 = 200;

/// One run of the demo, its files in `dir`.
pub struct Demo<'a> {
    args: &'a DemoArgs,
    exe: PathBuf,
    dir: PathBuf,
    cmdline: String,
    live: LiveLine,
}

impl<'a> Demo<'a> {
    /// A demo that runs the roles with the executable `exe`.
    pub fn new(args: &'a DemoArgs, exe: PathBuf, dir: PathBuf) -> Demo<'a> {
        Demo {
            args,
            exe,
            cmdline: format!(
                "dirty={} span={} rounds=2 round_us=2000",
                args.dirty,
                args.dirty * 4
            ),
            dir,
            live: LiveLine::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn nap(&self, d: Duration) -> Result<(), DemoError> {
        nap(d, &self.dir)
    }

    /// Runs it all; prints as it goes.
    pub fn run(&mut self) -> Result<(), DemoError> {
        println!(
            "ftvmm demo: a primary and a standby on this machine, the test guest \"{}\", {} ms epochs",
            self.cmdline, self.args.interval_ms
        );
        println!(
            "files (consoles, metrics, logs, plot): {}",
            self.dir.display()
        );
        let (mut standby, port) = self.start_standby()?;
        let mut primary = self.start_primary(port)?;
        println!(
            "standby (pid {}) listening on 127.0.0.1:{port}; primary (pid {}) protected by it",
            standby.pid(),
            primary.pid()
        );
        let mut view = PrimaryView::new(&self.path("metrics.jsonl"), &self.path("primary.console"));
        self.protected_run(&mut view, &mut primary, &mut standby)?;

        // The failure. Timing starts at the signal; the dead primary is
        // reaped while the takeover is watched.
        let killed = Instant::now();
        primary.signal_kill();
        self.live.finish();
        let console = self.path("standby.console");
        let takeover = watch_takeover(&mut standby, &mut primary, &console, killed, &self.dir)?;
        primary.kill();
        let reaped = takeover.primary_gone.unwrap_or_else(|| killed.elapsed());
        view.poll()?;
        report_kill(&view, &primary, &takeover, reaped);

        self.on_standby(&mut standby)?;
        self.check_transcript()?;
        self.report(&view, &takeover)
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

    /// Starts the primary, protected by the standby on `port`.
    fn start_primary(&self, port: u16) -> Result<RoleProc, DemoError> {
        let args = vec![
            "run".to_string(),
            "--cmdline".into(),
            self.cmdline.clone(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            self.args.interval_ms.to_string(),
            "--heartbeat-ms".into(),
            HEARTBEAT_MS.to_string(),
            "--serial".into(),
            format!("file:{}", self.path("primary.console").display()),
            "--ft-metrics".into(),
            self.path("metrics.jsonl").display().to_string(),
        ];
        RoleProc::spawn("primary", &self.exe, &self.dir, &args, None)
    }

    /// Shows the live status until `--kill-after-secs` after the first
    /// committed checkpoint; the pair must stay paired meanwhile.
    fn protected_run(
        &mut self,
        view: &mut PrimaryView,
        primary: &mut RoleProc,
        standby: &mut RoleProc,
    ) -> Result<(), DemoError> {
        let mut p_log = Tail::new(primary.stderr.clone());
        let mut s_log = Tail::new(standby.stderr.clone());
        let started = Instant::now();
        let mut first_epoch: Option<Instant> = None;
        let mut rate_mark = (Instant::now(), 0u64);
        let kill_after = Duration::from_secs(self.args.kill_after_secs);
        loop {
            view.poll()?;
            primary.check_alive()?;
            standby.check_alive()?;
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
            match first_epoch {
                None if view.epochs.is_empty() => {
                    if started.elapsed() > FIRST_EPOCH_TIMEOUT {
                        return Err(DemoError::Timeout {
                            what: "the primary committed no checkpoint (initial sync)",
                            secs: FIRST_EPOCH_TIMEOUT.as_secs(),
                            log: primary.stderr.clone(),
                        });
                    }
                }
                None => {
                    // The first status line comes a period later, with a
                    // rate measured over it.
                    first_epoch = Some(Instant::now());
                    rate_mark = (Instant::now(), view.bytes_sent());
                    self.live.start_period();
                }
                Some(t0) if t0.elapsed() >= kill_after => return Ok(()),
                Some(t0) => {
                    if self.live.due() {
                        let sent = view.bytes_sent();
                        let secs = rate_mark.0.elapsed().as_secs_f64().max(1e-3);
                        let mbps = (sent - rate_mark.1) as f64 / secs / 1e6;
                        rate_mark = (Instant::now(), sent);
                        self.live.show(&view.status_line(t0.elapsed(), mbps));
                    }
                }
            }
            self.nap(TICK)?;
        }
    }

    /// Lets the guest run on the standby for `--keep-running-secs`, then
    /// stops the standby.
    fn on_standby(&mut self, standby: &mut RoleProc) -> Result<(), DemoError> {
        let mut console = Tail::new(self.path("standby.console"));
        let (mut count, mut last) = (0u64, 0u64);
        let since = Instant::now();
        let keep = Duration::from_secs(self.args.keep_running_secs);
        loop {
            console.poll(|l| {
                if let Some(n) = hb_line(l) {
                    (count, last) = (count + 1, n);
                }
            })?;
            standby.check_alive()?;
            if since.elapsed() >= keep {
                break;
            }
            if self.live.due() {
                self.live.show(&format!(
                    "[standby {:4.1}s] guest running unprotected on the standby | hb={last} ({count} since the takeover)",
                    since.elapsed().as_secs_f64(),
                ));
            }
            self.nap(TICK)?;
        }
        standby.stop(STOP_GRACE);
        self.live.finish();
        println!(
            "stopped the standby (pid {}) after {:.1} s on its own",
            standby.pid(),
            since.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The exactly-once check of the two consoles.
    fn check_transcript(&self) -> Result<(), DemoError> {
        let (p, s) = (self.path("primary.console"), self.path("standby.console"));
        let c = check_exactly_once(&read(&p)?, &read(&s)?, hb_line).map_err(|e| {
            DemoError::ExactlyOnce(format!(
                "{e} (transcripts: {} and {})",
                p.display(),
                s.display()
            ))
        })?;
        println!(
            "exactly-once: OK (primary released hb {}..={}, standby continued from hb {}, {} lost with the in-flight epoch; standby reached hb {})",
            c.primary_first, c.primary_last, c.standby_first, c.lost, c.standby_last
        );
        Ok(())
    }

    /// The summary table and the plot.
    fn report(&self, view: &PrimaryView, takeover: &Takeover) -> Result<(), DemoError> {
        println!();
        print!(
            "{}",
            summary_table(&view.epochs, takeover, self.args.interval_ms)
        );
        let plot = self.path("epochs.svg");
        let info = PlotInfo {
            kill_epoch: view.last_epoch() + 1,
            takeover_ms: ms(takeover.running_after_kill),
            interval_ms: self.args.interval_ms,
            dirty: self.args.dirty,
        };
        std::fs::write(&plot, plot_svg(&view.epochs, &info)).map_err(|source| DemoError::File {
            what: "write",
            path: plot.clone(),
            source,
        })?;
        println!();
        println!("plot: {}", plot.display());
        println!("files kept in {}", self.dir.display());
        Ok(())
    }
}

/// What the kill and the takeover looked like.
fn report_kill(view: &PrimaryView, primary: &RoleProc, t: &Takeover, reaped: Duration) {
    println!(
        "SIGKILL primary (pid {}) after epoch {}: {} checkpoints committed, hb {}..={} released",
        primary.pid(),
        view.last_epoch(),
        view.epochs.len(),
        view.hb_first.unwrap_or(0),
        view.hb_last.unwrap_or(0),
    );
    println!(
        "takeover: the standby resumed checkpoint {}; guest running again {:.1} ms after the SIGKILL \
         (the standby's own measure: {:.1} ms after it saw the loss; the dead primary was reaped after {:.1} ms); \
         first new heartbeat hb={} {:.1} ms after the SIGKILL",
        t.checkpoint,
        ms(t.running_after_kill),
        t.standby_own_ms,
        ms(reaped),
        t.first_hb,
        ms(t.first_hb_after_kill)
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Port(e.to_string()))
}

/// A whole file, as text.
fn read(path: &Path) -> Result<String, DemoError> {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|source| DemoError::File {
            what: "read",
            path: path.to_path_buf(),
            source,
        })
}
