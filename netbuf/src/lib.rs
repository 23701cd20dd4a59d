//! Network output commit for a protected VM (DESIGN "Output commit", I1):
//! the frames a guest transmits in epoch n leave the host only after the
//! standby acknowledged checkpoint n.
//!
//! One interface, [`OutputCommit`], driven by the primary's epoch loop:
//! [`OutputCommit::hold`] when protection begins, [`OutputCommit::seal`] at
//! each epoch cut (epoch n closes, n + 1 opens), [`OutputCommit::release_upto`]
//! on the standby's ack, [`OutputCommit::discard_after`] when a standby that
//! took over fenced this primary (I5), and [`OutputCommit::release_all`] when
//! the standby is gone and the guest runs on unprotected. Three backends:
//!
//! - [`Backend::Vmm`] ([`held::HeldFrames`]): the VMM owns the virtio-net
//!   transmit path. Each NIC's [`ftvmm_devices::virtio::net::FrameSink`] puts
//!   frames into the open epoch's buffer; a release writes them to that
//!   NIC's tap, in order. Memory is bounded: at half the limit the buffer
//!   asks the epoch driver for an early cut (an eventfd); a frame that would
//!   pass the limit while an older epoch awaits its ack holds the device
//!   worker (backpressure) until the ack frees memory. Nothing is dropped.
//! - [`Backend::Plug`] ([`plug::PlugBuffer`]): the kernel holds the frames,
//!   the Remus way: each tap's ingress is redirected (`mirred`) to an IFB
//!   device whose root qdisc is `sch_plug`, driven over rtnetlink
//!   (`netlink-packet-route` messages on a synchronous `netlink-sys` socket,
//!   [`netlink`]). Needs `CONFIG_NET_SCH_PLUG`.
//! - [`Backend::None`]: frames pass straight through (tests and benchmarks
//!   of memory checkpointing alone; breaks I1 for the network).
//!
//! [`announce`] builds the gratuitous ARP and RARP frames a standby sends
//! for each guest MAC after a takeover.

pub mod announce;
pub mod commit;
pub mod held;
pub mod netlink;
pub mod plug;

use std::fmt;
use std::str::FromStr;

use ftvmm_devices::virtio::net::{FrameSink, Tap};

pub use commit::{EpochBuffer, EpochQueue, Held, OutputCommit, Outputs};
pub use held::{HeldFrames, NetbufReport};
pub use plug::PlugBuffer;

/// Default bound on the memory the `vmm` backend holds.
pub const DEFAULT_LIMIT_BYTES: usize = 16 << 20;

/// Which backend holds the network output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Frames held in the VMM per epoch (default).
    #[default]
    Vmm,
    /// Frames held by the kernel's `sch_plug` qdisc on an IFB device.
    Plug,
    /// Nothing held (test only).
    None,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vmm => "vmm",
            Backend::Plug => "plug",
            Backend::None => "none",
        })
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vmm" => Ok(Backend::Vmm),
            "plug" => Ok(Backend::Plug),
            "none" => Ok(Backend::None),
            _ => Err(format!(
                "unknown netbuf backend '{s}' (expected vmm, plug or none)"
            )),
        }
    }
}

/// Settings of the network output commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetbufConfig {
    /// The backend.
    pub backend: Backend,
    /// Most bytes held at once (`vmm`: frame bytes; `plug`: the qdisc's
    /// byte limit per IFB).
    pub limit_bytes: usize,
}

impl Default for NetbufConfig {
    fn default() -> Self {
        NetbufConfig {
            backend: Backend::Vmm,
            limit_bytes: DEFAULT_LIMIT_BYTES,
        }
    }
}

/// Errors of the network output commit.
#[derive(Debug, thiserror::Error)]
pub enum NetbufError {
    /// The early-cut eventfd cannot be created.
    #[error("netbuf: cannot create the early-cut eventfd: {0}")]
    EventFd(std::io::Error),
    /// A second handle on a NIC's tap cannot be made.
    #[error("netbuf: cannot clone the handle of tap '{tap}': {source}")]
    TapClone {
        /// The tap.
        tap: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel has no plug qdisc.
    #[error(
        "--netbuf plug needs the kernel's sch_plug qdisc, and this kernel has none \
         (CONFIG_NET_SCH_PLUG is not set; if it is a module, `modprobe sch_plug`): \
         creating qdisc 'plug' on '{ifb}' failed: {source}; use --netbuf vmm instead"
    )]
    NoSchPlug {
        /// The IFB device the qdisc was for.
        ifb: String,
        /// What netlink said.
        source: netlink::NetlinkError,
    },
    /// The kernel has no IFB device type.
    #[error("--netbuf plug needs IFB devices (CONFIG_IFB), and creating '{ifb}' failed: {source}")]
    NoIfb {
        /// The device.
        ifb: String,
        /// What netlink said.
        source: netlink::NetlinkError,
    },
    /// Another netlink step of the plug set-up or control failed.
    #[error("--netbuf plug: {what} failed: {source}")]
    Netlink {
        /// Which step, with its device.
        what: String,
        /// What netlink said.
        source: netlink::NetlinkError,
    },
}

/// The network's output commit: an [`OutputCommit`] with a backend and
/// counters.
pub trait NetOutput: OutputCommit {
    /// The backend.
    fn backend(&self) -> Backend;
    /// Counters and the held-time histogram.
    fn report(&self) -> NetbufReport;
}

/// The `none` backend: holds nothing.
#[derive(Debug, Default)]
pub struct PassThrough;

impl OutputCommit for PassThrough {
    fn hold(&self) {}
    fn seal(&self, _epoch: u64) -> Held {
        Held::default()
    }
    fn release_upto(&self, _epoch: u64) -> Held {
        Held::default()
    }
    fn discard_after(&self, _epoch: u64) {}
    fn release_all(&self) {}
}

impl NetOutput for PassThrough {
    fn backend(&self) -> Backend {
        Backend::None
    }
    fn report(&self) -> NetbufReport {
        NetbufReport::default()
    }
}

/// A backend and the transmit sink for each NIC (see [`create`]).
pub type Created = (
    std::sync::Arc<dyn NetOutput>,
    Vec<Option<Box<dyn FrameSink>>>,
);

/// The output commit for NICs on `taps` (in NIC order), and the transmit
/// sink to install on each NIC (`None`: keep the device's own, which writes
/// to the tap at once — the `plug` and `none` backends).
pub fn create(config: &NetbufConfig, taps: &[Tap]) -> Result<Created, NetbufError> {
    match config.backend {
        Backend::Vmm => {
            let mut wires: Vec<Box<dyn held::Wire>> = Vec::with_capacity(taps.len());
            for t in taps {
                let tap = t.try_clone().map_err(|source| NetbufError::TapClone {
                    tap: t.name().to_string(),
                    source,
                })?;
                wires.push(Box::new(tap));
            }
            let buf = HeldFrames::new(wires, config.limit_bytes)?;
            let sinks = (0..taps.len())
                .map(|i| Some(Box::new(buf.sink(i)) as Box<dyn FrameSink>))
                .collect();
            Ok((buf, sinks))
        }
        Backend::Plug => {
            let names: Vec<String> = taps.iter().map(|t| t.name().to_string()).collect();
            let plug = PlugBuffer::start(&names, config.limit_bytes)?;
            Ok((
                std::sync::Arc::new(plug),
                taps.iter().map(|_| None).collect(),
            ))
        }
        Backend::None => Ok((
            std::sync::Arc::new(PassThrough),
            taps.iter().map(|_| None).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_round_trip() {
        for b in [Backend::Vmm, Backend::Plug, Backend::None] {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
        }
        assert!("fast".parse::<Backend>().is_err());
        assert_eq!(Backend::default(), Backend::Vmm);
    }
}
