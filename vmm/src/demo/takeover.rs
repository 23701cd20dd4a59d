//! Timing the takeover: from the SIGKILL of the primary to the guest
//! running on the standby, and to its first heartbeat there.

use std::path::Path;
use std::time::{Duration, Instant};

use ftvmm::transcript::hb_line;

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
    /// The standby's own measure: from its seeing the loss to the guest
    /// running.
    pub standby_own_ms: f64,
    /// From the SIGKILL to the first heartbeat on the standby's console.
    pub first_hb_after_kill: Duration,
    /// That heartbeat.
    pub first_hb: u64,
    /// When the dead primary was reaped, if seen while watching.
    pub primary_gone: Option<Duration>,
}

/// Polls the standby (1 ms) from the SIGKILL at `killed` until the guest
/// runs there and prints its first heartbeat on `console`; reaps the
/// primary meanwhile. `dir` holds the demo's files.
pub fn watch_takeover(
    standby: &mut RoleProc,
    primary: &mut RoleProc,
    console: &Path,
    killed: Instant,
    dir: &Path,
) -> Result<Takeover, DemoError> {
    let mut log = Tail::new(standby.stderr.clone());
    let mut console = Tail::new(console.to_path_buf());
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
        nap(FAST_TICK, dir)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_line_parses() {
        let l = "ftvmm: standby took over from checkpoint 207 (checkpoint channel closed); guest running 1.4 ms after the primary was lost";
        assert_eq!(parse_takeover(l), Some((207, 1.4)));
        assert_eq!(parse_takeover("ftvmm: something else"), None);
    }
}
