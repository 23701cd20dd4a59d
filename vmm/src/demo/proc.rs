//! The roles' processes: spawned in their own process group with a
//! parent-death signal, SIGKILLed and reaped on every path out; and the
//! demo's own interruption by Ctrl-C or a termination signal.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::error::DemoError;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set [`INTERRUPTED`] while this lives; the previous
/// dispositions come back on drop.
pub struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    pub fn install() -> SignalGuard {
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

/// Sleeps for `d`; an error if the demo was interrupted meanwhile (its
/// files are in `dir`).
pub fn nap(d: Duration, dir: &Path) -> Result<(), DemoError> {
    std::thread::sleep(d);
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(DemoError::Interrupted(dir.to_path_buf()));
    }
    Ok(())
}

/// A role's process; SIGKILLed and reaped on drop unless already reaped.
pub struct RoleProc {
    role: &'static str,
    child: std::process::Child,
    pub stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl RoleProc {
    pub fn spawn(
        role: &'static str,
        exe: &Path,
        dir: &Path,
        args: &[String],
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has ended (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// An error if it has ended.
    pub fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(self.died(status)),
        }
    }

    pub fn died(&self, status: ExitStatus) -> DemoError {
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
    pub fn signal_kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaped either way.
    pub fn stop(&mut self, grace: Duration) {
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
