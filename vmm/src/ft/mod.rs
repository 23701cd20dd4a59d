//! Fault tolerance: the primary's epoch driver, the standby's receiver and
//! failover, and output commit for the console.
//!
//! The primary ([`primary::run_primary`]) runs the guest and, every epoch,
//! pauses it, captures the dirty pages and the machine state into slab
//! staging, resumes it, streams the checkpoint and releases the epoch's held
//! output when the standby acknowledges it. The standby
//! ([`standby::run_standby`]) builds the same VM through the same builder,
//! applies verified checkpoints, and on the primary's loss restores the last
//! committed one and runs the guest.

pub mod console;
pub mod primary;
pub mod standby;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Heartbeat intervals of silence after which the peer is declared lost.
pub const HEARTBEAT_MISSES: u32 = 5;
/// Epoch length when none is given (a standby that took over).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(25);

/// Settings of a protected run.
#[derive(Debug, Clone)]
pub struct FtOptions {
    /// The standby's address.
    pub peer: String,
    /// Epoch length.
    pub interval: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Protection generation (fencing, I5).
    pub generation: u64,
    /// Where to write one JSON line of metrics per epoch.
    pub metrics_path: Option<PathBuf>,
    /// Fault injection for the kill-at-every-step tests.
    pub fault: Option<Fault>,
    /// Print a checksum of all guest memory at this epoch's cut (tests).
    pub hash_epoch: Option<u64>,
    /// Network output commit: backend and memory limit.
    pub netbuf: ftvmm_netbuf::NetbufConfig,
}

/// CRC-32 of all guest RAM, region by region: the memory-equality tests
/// compare the primary's at an epoch's cut with the standby's after it
/// applied that epoch.
pub fn memory_crc(mem: &crate::memory::GuestMemory) -> u32 {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = ((region.len() - off) as usize).min(buf.len());
            let addr = vm_memory::GuestAddress(region.start_addr().0 + off);
            if mem.read_slice(&mut buf[..n], addr).is_err() {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    h.finalize()
}

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

/// Errors of a protected run, on either side.
#[derive(Debug, thiserror::Error)]
pub enum FtError {
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The network output commit.
    #[error(transparent)]
    Netbuf(#[from] ftvmm_netbuf::NetbufError),
    /// The checkpoint transport.
    #[error(transparent)]
    Transport(#[from] ftvmm_transport::TransportError),
    /// The checkpoint stream.
    #[error("checkpoint stream: {0}")]
    Wire(#[from] ftvmm_checkpoint::WireError),
    /// The standby refused the primary.
    #[error("standby {peer} refused this primary: {reason}")]
    Refused {
        /// The standby's address.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The standby took over: this primary is fenced (I5) and stopped.
    #[error("fenced: standby {peer} took over from checkpoint {epoch} as generation {generation}; this primary stopped its guest and released nothing after that checkpoint")]
    Fenced {
        /// The standby.
        peer: String,
        /// The checkpoint it runs from.
        epoch: u64,
        /// Its new generation.
        generation: u64,
    },
    /// The peer sent something out of protocol.
    #[error("protocol error with {peer}: {what}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        what: String,
    },
    /// Dirty logging.
    #[error(transparent)]
    DirtyLog(#[from] crate::dirty_log::DirtyLogError),
    /// Dirty harvest.
    #[error("dirty harvest: {0}")]
    Dirty(#[from] ftvmm_checkpoint::DirtyError),
    /// Staging.
    #[error("staging: {0}")]
    Staging(#[from] ftvmm_checkpoint::StagingError),
    /// State encoding.
    #[error("machine state: {0}")]
    Codec(#[from] ftvmm_checkpoint::CodecError),
    /// Reading guest memory for a checkpoint.
    #[error("cannot read guest page {gpa:#x}: {reason}")]
    GuestMemory {
        /// The page.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// The metrics file.
    #[error("cannot write metrics file '{path}': {source}")]
    Metrics {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Listening for primaries.
    #[error("standby cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        source: ftvmm_transport::TransportError,
    },
    /// An I/O error on the channel.
    #[error("checkpoint channel: {0}")]
    Io(#[from] std::io::Error),
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
