//! `ftvmm demo`: a primary and a standby on this machine, a failover, a
//! summary (DESIGN "Processes and command line", "Observability").
//!
//! The demo runs the real roles as separate processes (this executable's
//! `standby` and `run` subcommands) on loopback, with the embedded test guest
//! dirtying pages and writing a sector record per heartbeat to its disk (an
//! 8 MiB image for the primary, its replica for the standby, both created
//! zeroed). It is a client of the roles, like `ftvmm ctl`: it learns
//! their state from their control APIs (the standby is ready when its API
//! answers `status`, and has taken over when its role says so), the run's
//! figures from the primary's per-epoch metrics file, and the guest's output
//! from the two console files. It never reads log text to learn what a role
//! does (only to quote the error line of a role that exited early), and
//! leaves `FTVMM_LOG` to the user. It shows a live status line; after a few seconds
//! it SIGKILLs the primary, times the standby's takeover, lets the guest run
//! on the standby, then checks with [`ftvmm::transcript`] that the console
//! transcript (the primary's released output followed by the standby's)
//! shows every heartbeat exactly once, checks that the standby's replica
//! holds every record the guest wrote up to its last heartbeat, each at its
//! sector, and nothing else, prints a summary table and writes an SVG plot
//! of per-epoch pause time and dirty pages.
//!
//! It lives in the binary rather than in the VMM library: nothing in the
//! VMM uses it, and its job is to print to the terminal.
//!
//! Everything lands in one directory (a fresh temporary one by default) that
//! is kept for inspection. The children run in their own process group (a
//! terminal's Ctrl-C reaches only the demo, which then stops them) with a
//! parent-death signal, and a guard kills them on every path out.

mod control;
mod error;
mod live;
mod plot;
mod proc;
mod replica;
mod session;
mod speed;
mod summary;
mod tail;
mod takeover;
mod view;

use std::io::IsTerminal;
use std::path::PathBuf;

pub use error::DemoError;
use proc::SignalGuard;
use session::Demo;

/// `ftvmm demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// SIGKILL the primary this many seconds after its first checkpoint.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub kill_after_secs: u64,
    /// Epoch length in milliseconds (with --adaptive: the shortest).
    #[arg(long, value_name = "N", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub interval_ms: u64,
    /// Adaptive epochs (the primary's --ft-adaptive, default budget): from
    /// --interval-ms up to --max-interval-ms.
    #[arg(long)]
    pub adaptive: bool,
    /// With --adaptive: the longest epoch in milliseconds.
    #[arg(long, value_name = "M", default_value_t = 200, requires = "adaptive", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub max_interval_ms: u64,
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
    /// Run the primary and the standby without seccomp filters (debugging).
    #[arg(long)]
    pub no_seccomp: bool,
}

impl DemoArgs {
    /// The epochs, in words: "25 ms" or "adaptive 25 to 200 ms".
    pub fn epochs_text(&self) -> String {
        if self.adaptive {
            format!(
                "adaptive {} to {} ms",
                self.interval_ms,
                self.max_interval_ms.max(self.interval_ms)
            )
        } else {
            format!("{} ms", self.interval_ms)
        }
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
        None => fresh_dir("ftvmm-demo")?,
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

/// A fresh directory `PREFIX-PID-N` under the system temp dir.
fn fresh_dir(prefix: &str) -> Result<PathBuf, DemoError> {
    let base = std::env::temp_dir();
    let mut last = None;
    for n in 0..100 {
        let p = base.join(format!("{prefix}-{}-{n}", std::process::id()));
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
