//! Timing the takeover: from the SIGKILL of the primary to the guest
//! running on the standby, and to its first heartbeat there.

use std::path::Path;
use std::time::{Duration, Instant};

use ftvmm::transcript::hb_line;

use super::control::{took_over, Role};
use super::error::DemoError;
use super::proc::{nap, RoleProc};
use super::tail::Tail;

/// How long the standby gets to take over and print a heartbeat.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Polling period while timing the takeover.
const FAST_TICK: Duration = Duration::from_millis(1);

/// What the takeover looked like.
pub struct Takeover {
    /// The checkpoint the standby resumed.
    pub checkpoint: u64,
    /// From the SIGKILL to the guest running on the standby.
    pub running_after_kill: Duration,
    /// The standby's own measure (its `status`): from its seeing the loss
    /// to the guest running, ms.
    pub standby_own_ms: f64,
    /// From the SIGKILL to the first heartbeat on the standby's console.
    pub first_hb_after_kill: Duration,
    /// That heartbeat.
    pub first_hb: u64,
    /// When the dead primary was reaped, if seen while watching.
    pub primary_gone: Option<Duration>,
}

/// Polls the standby (1 ms) from the SIGKILL at `killed` until its
/// control API says it took over and the guest printed its first heartbeat
/// on `console`; reaps the primary meanwhile. `dir` holds the demo's files.
pub fn watch_takeover(
    standby: &mut Role,
    primary: &mut RoleProc,
    console: &Path,
    killed: Instant,
    dir: &Path,
) -> Result<Takeover, DemoError> {
    let mut console = Tail::new(console.to_path_buf());
    let mut took: Option<(u64, f64, Duration)> = None;
    let mut first: Option<(u64, Duration)> = None;
    let mut primary_gone = None;
    let deadline = killed + TAKEOVER_TIMEOUT;
    loop {
        if primary_gone.is_none() && primary.exited().is_some() {
            primary_gone = Some(killed.elapsed());
        }
        if first.is_none() {
            console.poll(|l| {
                if first.is_none() {
                    first = hb_line(l).map(|n| (n, killed.elapsed()));
                }
            })?;
        }
        if took.is_none() {
            let status = standby.status()?;
            took = took_over(&status)
                .map_err(|reason| DemoError::Api {
                    role: "standby",
                    reason,
                })?
                .map(|(cp, own_ms)| (cp, own_ms, killed.elapsed()));
        }
        if let (Some((checkpoint, standby_own_ms, running)), Some((first_hb, hb_at))) =
            (took, first)
        {
            return Ok(Takeover {
                checkpoint,
                // The guest ran by the time its first heartbeat showed,
                // even if the status said so later.
                running_after_kill: running.min(hb_at),
                standby_own_ms,
                first_hb_after_kill: hb_at,
                first_hb,
                primary_gone,
            });
        }
        standby.proc.check_alive()?;
        if Instant::now() >= deadline {
            return Err(DemoError::Timeout {
                what: if took.is_none() {
                    "the standby did not take over"
                } else {
                    "the guest printed no heartbeat on the standby"
                },
                secs: TAKEOVER_TIMEOUT.as_secs(),
                log: standby.proc.stderr.clone(),
            });
        }
        nap(FAST_TICK, dir)?;
    }
}
