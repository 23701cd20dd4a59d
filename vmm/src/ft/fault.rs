//! Fault injection for the kill-at-every-step tests: `--ft-fault POINT[@N]`
//! makes the primary SIGKILL itself at a named point of the protocol.

use std::str::FromStr;

/// A point of the protocol where a test makes the primary die (SIGKILL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// After sending Hello, before the answer.
    Handshake,
    /// Half-way through the first frame of the initial sync.
    InitialSync,
    /// Half-way through sending checkpoint N.
    MidCheckpoint,
    /// After the last byte of checkpoint N, before its ack.
    BeforeAck,
    /// After the ack of N, half-way through releasing its output.
    DuringRelease,
}

/// A fault to inject: a point and, for per-epoch points, the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Where.
    pub point: FaultPoint,
    /// At which epoch (ignored by handshake and initial-sync).
    pub epoch: u64,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, epoch) = match s.split_once('@') {
            Some((n, e)) => (
                n,
                e.parse::<u64>()
                    .map_err(|_| format!("fault '{s}': epoch '{e}' is not a number"))?,
            ),
            None => (s, 1),
        };
        let point = match name {
            "handshake" => FaultPoint::Handshake,
            "initial-sync" => FaultPoint::InitialSync,
            "mid-checkpoint" => FaultPoint::MidCheckpoint,
            "before-ack" => FaultPoint::BeforeAck,
            "during-release" => FaultPoint::DuringRelease,
            _ => {
                return Err(format!(
                    "unknown fault '{name}' (expected handshake, initial-sync, mid-checkpoint@N, before-ack@N, during-release@N)"
                ))
            }
        };
        Ok(Fault { point, epoch })
    }
}

impl FaultPoint {
    /// The point's name, as `--ft-fault` spells it.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::Handshake => "handshake",
            FaultPoint::InitialSync => "initial-sync",
            FaultPoint::MidCheckpoint => "mid-checkpoint",
            FaultPoint::BeforeAck => "before-ack",
            FaultPoint::DuringRelease => "during-release",
        }
    }
}

impl Fault {
    /// True when this fault fires at `point` in `epoch`.
    pub fn hits(fault: Option<Fault>, point: FaultPoint, epoch: u64) -> bool {
        match fault {
            Some(f) if f.point == point => {
                matches!(point, FaultPoint::Handshake | FaultPoint::InitialSync) || f.epoch == epoch
            }
            _ => false,
        }
    }
}

/// Dies at once, as a SIGKILL from outside would make it: no destructor, no
/// flush, no goodbye to the peer.
pub fn die_now(why: &str) -> ! {
    log::warn!("fault injection: dying at {why}");
    // SAFETY: kill(2) on our own pid with SIGKILL has no memory-safety
    // preconditions; it does not return.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL returned")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs() {
        assert_eq!(
            "before-ack@7".parse::<Fault>().unwrap(),
            Fault {
                point: FaultPoint::BeforeAck,
                epoch: 7
            }
        );
        assert_eq!(
            "handshake".parse::<Fault>().unwrap().point,
            FaultPoint::Handshake
        );
        assert!("explode".parse::<Fault>().is_err());
        assert!("before-ack@x".parse::<Fault>().is_err());
        let f = Some("mid-checkpoint@3".parse::<Fault>().unwrap());
        assert!(Fault::hits(f, FaultPoint::MidCheckpoint, 3));
        assert!(!Fault::hits(f, FaultPoint::MidCheckpoint, 2));
        assert!(!Fault::hits(f, FaultPoint::BeforeAck, 3));
    }
}
