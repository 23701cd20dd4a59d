//! The demo's course: create the two disk images, start the standby and
//! the primary, watch the protected run, SIGKILL the primary, time the
//! takeover, watch the guest on the standby, stop it, check the transcript
//! and the disk replica, report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvmm::transcript::{check_exactly_once, hb_line, Continuity};

use super::control::{check_primary, check_standby, socket_dir, Control, Role, RoleStatus};
use super::error::DemoError;
use super::live::LiveLine;
use super::plot::{plot_svg, PlotInfo};
use super::proc::{nap, RoleProc};
use super::replica::{check_replica, create_image, highest_record, read_image, IMAGE_BYTES};
use super::speed::{speed_line, HbRate, PROTECTED_WARMUP, UNPROTECTED_WARMUP};
use super::summary::{ms, summary_table};
use super::tail::Tail;
use super::takeover::{watch_takeover, Takeover};
use super::view::PrimaryView;
use super::DemoArgs;

/// The primary's disk image, in the demo's directory.
const PRIMARY_IMG: &str = "primary.img";
/// The standby's replica of it.
const REPLICA_IMG: &str = "replica.img";
/// The pair's pre-shared key, made fresh for each demo.
const KEY_FILE: &str = "ft.key";
/// How long the standby gets to listen (its control API to answer).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary gets to commit its first checkpoint (initial sync).
const FIRST_EPOCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace between SIGTERM and SIGKILL when stopping the standby.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Polling period of the status loops.
const TICK: Duration = Duration::from_millis(20);
/// How often the protected run asks both roles whether they are still
/// paired.
const PAIR_CHECK: Duration = Duration::from_millis(250);
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
    /// Where the control sockets are: `dir`, or a short temporary one
    /// (removed on drop) when `dir`'s path is too long for them.
    sock_dir: PathBuf,
    sock_dir_is_temp: bool,
    /// Heartbeats per second released by the protected primary.
    protected_rate: Option<f64>,
    /// Heartbeats per second on the standby after the takeover.
    unprotected_rate: Option<f64>,
}

impl Drop for Demo<'_> {
    /// The roles are gone by now (reaped when `run` returned): their
    /// sockets would only be stale files among the kept ones.
    fn drop(&mut self) {
        if self.sock_dir_is_temp {
            let _ = std::fs::remove_dir_all(&self.sock_dir);
        } else {
            for name in ["primary.sock", "standby.sock"] {
                let _ = std::fs::remove_file(self.sock_dir.join(name));
            }
        }
    }
}

impl<'a> Demo<'a> {
    /// A demo that runs the roles with the executable `exe`.
    pub fn new(args: &'a DemoArgs, exe: PathBuf, dir: PathBuf) -> Result<Demo<'a>, DemoError> {
        let (sock_dir, sock_dir_is_temp) = socket_dir(&dir)?;
        Ok(Demo {
            args,
            exe,
            cmdline: format!(
                "dirty={} span={} rounds=2 round_us=2000",
                args.dirty,
                args.dirty * 4
            ),
            dir,
            live: LiveLine::new(),
            sock_dir,
            sock_dir_is_temp,
            protected_rate: None,
            unprotected_rate: None,
        })
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
            "ftvmm demo: a primary and a standby on this machine, the test guest \"{}\" with a disk of {} MiB, {} epochs",
            self.cmdline,
            IMAGE_BYTES >> 20,
            self.args.epochs_text()
        );
        println!(
            "files (disk images, consoles, metrics, logs, plot): {}",
            self.dir.display()
        );
        // The pair's own key: the channel is authenticated and sealed.
        let _ = std::fs::remove_file(self.path(KEY_FILE));
        ftvmm_transport::FtKey::write_new(&self.path(KEY_FILE))?;
        // Both start as zeros, so the check at the end knows every byte.
        create_image(&self.path(PRIMARY_IMG))?;
        create_image(&self.path(REPLICA_IMG))?;
        let (mut standby, addr) = self.start_standby()?;
        let mut primary = self.start_primary(&addr)?;
        println!(
            "standby (pid {}) listening on {addr}; primary (pid {}) protected by it",
            standby.proc.pid(),
            primary.proc.pid()
        );
        let mut view = PrimaryView::new(&self.path("metrics.jsonl"), &self.path("primary.console"));
        self.protected_run(&mut view, &mut primary, &mut standby)?;

        // The failure. Timing starts at the signal; the dead primary is
        // reaped while the takeover is watched.
        let killed = Instant::now();
        primary.proc.signal_kill();
        self.live.finish();
        let console = self.path("standby.console");
        let takeover =
            watch_takeover(&mut standby, &mut primary.proc, &console, killed, &self.dir)?;
        primary.proc.kill();
        let reaped = takeover.primary_gone.unwrap_or_else(|| killed.elapsed());
        view.poll()?;
        report_kill(&view, &primary.proc, &takeover, reaped);

        self.on_standby(&mut standby)?;
        let continuity = self.check_transcript()?;
        self.check_disk(&continuity)?;
        self.report(&view, &takeover)
    }

    /// Starts the standby on a port of its choosing and waits until its
    /// control API answers (it listens by then); returns it and its address.
    fn start_standby(&self) -> Result<(Role, String), DemoError> {
        let api = Control::new("standby", self.sock_dir.join("standby.sock"));
        let mut args = vec![
            "standby".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--disk".into(),
            format!("path={}", self.path(REPLICA_IMG).display()),
            "--serial".into(),
            format!("file:{}", self.path("standby.console").display()),
            "--api".into(),
            api.socket().display().to_string(),
            "--ft-key".into(),
            self.path(KEY_FILE).display().to_string(),
        ];
        if self.args.no_seccomp {
            args.push("--no-seccomp".into());
        }
        let mut proc = RoleProc::spawn("standby", &self.exe, &self.dir, &args)?;
        let status = api.wait_ready(&mut proc, LISTEN_TIMEOUT, &self.dir)?;
        let addr = status.listen.ok_or_else(|| DemoError::Api {
            role: "standby",
            reason: "its status does not say where it listens".into(),
        })?;
        Ok((Role { proc, api }, addr))
    }

    /// Starts the primary, protected by the standby at `addr`.
    fn start_primary(&self, addr: &str) -> Result<Role, DemoError> {
        let api = Control::new("primary", self.sock_dir.join("primary.sock"));
        let mut args = vec![
            "run".to_string(),
            "--cmdline".into(),
            self.cmdline.clone(),
            "--ft-peer".into(),
            addr.to_string(),
            "--ft-interval-ms".into(),
            self.args.interval_ms.to_string(),
            "--heartbeat-ms".into(),
            HEARTBEAT_MS.to_string(),
            "--disk".into(),
            format!("path={}", self.path(PRIMARY_IMG).display()),
            "--serial".into(),
            format!("file:{}", self.path("primary.console").display()),
            "--ft-metrics".into(),
            self.path("metrics.jsonl").display().to_string(),
            "--api".into(),
            api.socket().display().to_string(),
            "--ft-key".into(),
            self.path(KEY_FILE).display().to_string(),
        ];
        if self.args.adaptive {
            args.extend([
                "--ft-adaptive".to_string(),
                "--ft-max-interval-ms".into(),
                self.args
                    .max_interval_ms
                    .max(self.args.interval_ms)
                    .to_string(),
            ]);
        }
        if self.args.no_seccomp {
            args.push("--no-seccomp".into());
        }
        let proc = RoleProc::spawn("primary", &self.exe, &self.dir, &args)?;
        Ok(Role { proc, api })
    }

    /// Shows the live status until `--kill-after-secs` after the first
    /// committed checkpoint. The pair must stay paired meanwhile, and the
    /// standby must have a checkpoint to take over from at the end.
    fn protected_run(
        &mut self,
        view: &mut PrimaryView,
        primary: &mut Role,
        standby: &mut Role,
    ) -> Result<(), DemoError> {
        let started = Instant::now();
        let mut first_epoch: Option<Instant> = None;
        let mut rate_mark = (Instant::now(), 0u64);
        let mut pair_checked = Instant::now();
        let kill_after = Duration::from_secs(self.args.kill_after_secs);
        let mut hb_rate = HbRate::new(Instant::now(), PROTECTED_WARMUP);
        loop {
            view.poll()?;
            primary.proc.check_alive()?;
            standby.proc.check_alive()?;
            let Some(t0) = first_epoch else {
                if !view.epochs.is_empty() {
                    // The first status line comes a period later, with a
                    // rate measured over it.
                    first_epoch = Some(Instant::now());
                    hb_rate = HbRate::new(Instant::now(), PROTECTED_WARMUP);
                    rate_mark = (Instant::now(), view.bytes_sent());
                    self.live.start_period();
                } else if started.elapsed() > FIRST_EPOCH_TIMEOUT {
                    return Err(DemoError::Timeout {
                        what: "the primary committed no checkpoint (initial sync)",
                        secs: FIRST_EPOCH_TIMEOUT.as_secs(),
                        log: primary.proc.stderr.clone(),
                    });
                }
                self.nap(TICK)?;
                continue;
            };
            hb_rate.record(Instant::now(), view.hb_last);
            let kill_now = t0.elapsed() >= kill_after;
            if kill_now || pair_checked.elapsed() >= PAIR_CHECK {
                let committed = still_paired(primary, standby)?;
                pair_checked = Instant::now();
                if kill_now {
                    self.protected_rate = hb_rate.per_sec();
                    return match committed {
                        Some(_) => Ok(()),
                        None => Err(DemoError::NothingToRun(standby.proc.stderr.clone())),
                    };
                }
            }
            if self.live.due() {
                let sent = view.bytes_sent();
                let secs = rate_mark.0.elapsed().as_secs_f64().max(1e-3);
                let mbps = (sent - rate_mark.1) as f64 / secs / 1e6;
                rate_mark = (Instant::now(), sent);
                self.live.show(&view.status_line(t0.elapsed(), mbps));
            }
            self.nap(TICK)?;
        }
    }

    /// Lets the guest run on the standby for `--keep-running-secs`, then
    /// stops the standby.
    fn on_standby(&mut self, standby: &mut Role) -> Result<(), DemoError> {
        let mut console = Tail::new(self.path("standby.console"));
        let (mut count, mut last) = (0u64, 0u64);
        let since = Instant::now();
        let keep = Duration::from_secs(self.args.keep_running_secs);
        let mut hb_rate = HbRate::new(since, UNPROTECTED_WARMUP);
        loop {
            console.poll(|l| {
                if let Some(n) = hb_line(l) {
                    (count, last) = (count + 1, n);
                }
            })?;
            hb_rate.record(Instant::now(), (count > 0).then_some(last));
            standby.proc.check_alive()?;
            if since.elapsed() >= keep {
                break;
            }
            if self.live.due() {
                let status = standby.status()?;
                self.live.show(&format!(
                    "[standby {:4.1}s] guest running {} on the standby | hb={last} ({count} since the takeover)",
                    since.elapsed().as_secs_f64(),
                    protection(&status),
                ));
            }
            self.nap(TICK)?;
        }
        self.unprotected_rate = hb_rate.per_sec();
        standby.proc.stop(STOP_GRACE);
        self.live.finish();
        println!(
            "stopped the standby (pid {}) after {:.1} s on its own",
            standby.proc.pid(),
            since.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The exactly-once check of the two consoles.
    fn check_transcript(&self) -> Result<Continuity, DemoError> {
        let (p, s) = (self.path("primary.console"), self.path("standby.console"));
        let c = check_exactly_once(&read(&p)?, &read(&s)?, hb_line).map_err(|source| {
            DemoError::ExactlyOnce {
                source,
                primary: p.clone(),
                standby: s.clone(),
            }
        })?;
        println!(
            "exactly-once: OK (primary released hb {}..={}, standby continued from hb {}, {} lost with the in-flight epoch; standby reached hb {})",
            c.primary_first, c.primary_last, c.standby_first, c.lost, c.standby_last
        );
        Ok(c)
    }

    /// The check of the replica against the heartbeats the standby printed
    /// (`c`, from the whole console, read after the standby stopped).
    fn check_disk(&self, c: &Continuity) -> Result<(), DemoError> {
        let replica = self.path(REPLICA_IMG);
        let ok = check_replica(&read_image(&replica)?, c.standby_last)
            .map_err(|source| DemoError::DiskReplica { source, replica })?;
        let primary_wrote = highest_record(&read_image(&self.path(PRIMARY_IMG))?);
        let unwritten = if ok.last_record < ok.last_hb {
            format!(
                ", hb={}'s not yet written when the standby stopped",
                ok.last_hb
            )
        } else {
            String::new()
        };
        println!(
            "disk replica: OK (records hb 1..={}, all at their sectors{unwritten}; primary wrote 1..={primary_wrote} before the kill)",
            ok.last_record
        );
        Ok(())
    }

    /// The summary table and the plot.
    fn report(&self, view: &PrimaryView, takeover: &Takeover) -> Result<(), DemoError> {
        println!();
        print!(
            "{}",
            summary_table(&view.epochs, takeover, &self.args.epochs_text())
        );
        println!("{}", speed_line(self.protected_rate, self.unprotected_rate));
        let plot = self.path("epochs.svg");
        let info = PlotInfo {
            kill_epoch: view.last_epoch() + 1,
            takeover_ms: ms(takeover.running_after_kill),
            epochs: self.args.epochs_text(),
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

/// Asks both roles whether they are still paired (the primary first: a
/// standby that is gone or stuck shows there as a lost standby); returns the
/// standby's last committed checkpoint.
fn still_paired(primary: &mut Role, standby: &mut Role) -> Result<Option<u64>, DemoError> {
    let p = primary.status()?;
    check_primary(&p).map_err(|state| unpaired("primary", state, &primary.proc))?;
    let s = standby.status()?;
    check_standby(&s).map_err(|state| unpaired("standby", state, &standby.proc))
}

fn unpaired(role: &'static str, state: String, proc: &RoleProc) -> DemoError {
    DemoError::Unpaired {
        role,
        state,
        log: proc.stderr.clone(),
    }
}

/// How the standby runs the guest, in words.
fn protection(status: &RoleStatus) -> &'static str {
    match status.protected {
        Some(false) => "unprotected",
        Some(true) => "protected by a new standby",
        None => "(protection unknown)",
    }
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
