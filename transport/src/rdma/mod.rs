//! The RDMA transport (`--transport rdma`, cargo feature `rdma`): a
//! [`crate::Channel`] over an InfiniBand/RoCE reliable-connected queue
//! pair, and the MC spec's keepalive, both through libibverbs.
//!
//! - `setup`: the queue pairs are connected over a TCP *bootstrap*
//!   connection that first runs the same authenticated handshake as a TCP
//!   data channel; their parameters travel sealed ([`msg`]).
//! - [`channel`]: [`RdmaChannel`], the byte stream: RDMA WRITEs into the
//!   peer's registered receive slabs, announced and credited with SENDs
//!   ([`flow`]), sealed with the bootstrap's session keys on a keyed
//!   channel, zero-copy from the staging's slabs, registered by
//!   `send_checkpoint` when the slab cache changes ([`registry`]), on a
//!   plain one.
//! - `keepalive`: a counter each side RDMA-writes into the other's
//!   registered memory every heartbeat interval, judged into the same
//!   [`crate::FailureDetector`] the TCP heartbeats feed.
//! - [`verbs`]: the only code that calls libibverbs (RAII wrappers);
//!   everything else is written against the small traits of `fabric`,
//!   and the tests run it over an in-process software fabric.
//!
//! Without the `rdma` feature only [`msg`] and the errors are built: a
//! standby without RDMA support still reads a primary's offer and refuses
//! it with a reason the primary prints.

#[cfg(feature = "rdma")]
pub mod channel;
#[cfg(feature = "rdma")]
pub(crate) mod fabric;
#[cfg(feature = "rdma")]
pub mod flow;
#[cfg(feature = "rdma")]
pub(crate) mod keepalive;
#[cfg(feature = "rdma")]
mod mem;
pub mod msg;
#[cfg(feature = "rdma")]
pub mod registry;
#[cfg(feature = "rdma")]
pub(crate) mod setup;
#[cfg(all(test, feature = "rdma"))]
pub(crate) mod soft;
#[cfg(all(test, feature = "rdma"))]
mod tests;
#[cfg(feature = "rdma")]
pub mod verbs;

use std::net::SocketAddr;
use std::time::Instant;

#[cfg(feature = "rdma")]
pub use channel::{RdmaChannel, RdmaStats};

use crate::channel::Channel;
use crate::error::io_msg;
use crate::{TcpChannel, TransportError};
use msg::{MsgError, SetupMsg, MAX_SETUP_LEN};

/// What a standby built without the feature tells a primary that asks for
/// RDMA.
pub const NOT_BUILT: &str =
    "built without RDMA support: rebuild with `cargo build -p ftvmm --features rdma`";

/// Which device and port to use, and the receive ring's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// The device (`ibv_devices` lists them); `None`: the first one.
    pub device: Option<String>,
    /// The port (from 1).
    pub port: u8,
    /// The GID index to be addressed by; `None`: on RoCE the first
    /// IPv4-mapped RoCE v2 GID (else the first IPv4-mapped, else the
    /// first non-zero one), on InfiniBand none
    /// (LID routing).
    pub gid_index: Option<u8>,
    /// Slabs in this side's receive ring.
    pub slabs: u16,
    /// Size of each (the staging's default slab size).
    pub slab_bytes: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            device: None,
            port: 1,
            gid_index: None,
            slabs: 8,
            slab_bytes: 1 << 20,
        }
    }
}

/// The environment variables [`RdmaConfig::from_env`] reads.
pub const ENV_DEVICE: &str = "FTVMM_RDMA_DEVICE";
/// See [`ENV_DEVICE`].
pub const ENV_PORT: &str = "FTVMM_RDMA_PORT";
/// See [`ENV_DEVICE`].
pub const ENV_GID_INDEX: &str = "FTVMM_RDMA_GID_INDEX";

impl RdmaConfig {
    /// The defaults, with `FTVMM_RDMA_DEVICE`, `FTVMM_RDMA_PORT` and
    /// `FTVMM_RDMA_GID_INDEX` applied where set.
    pub fn from_env() -> Result<RdmaConfig, RdmaError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`RdmaConfig::from_env`] over any lookup.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RdmaConfig, RdmaError> {
        let mut cfg = RdmaConfig::default();
        let num = |var: &'static str, min: u8| -> Result<Option<u8>, RdmaError> {
            match get(var) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u8>() {
                    Ok(n) if n >= min => Ok(Some(n)),
                    _ => Err(RdmaError::Config(format!(
                        "{var}={v:?} is not a number from {min} to 255"
                    ))),
                },
            }
        };
        if let Some(d) = get(ENV_DEVICE).filter(|d| !d.trim().is_empty()) {
            cfg.device = Some(d.trim().to_string());
        }
        if let Some(p) = num(ENV_PORT, 1)? {
            cfg.port = p;
        }
        cfg.gid_index = num(ENV_GID_INDEX, 0)?;
        Ok(cfg)
    }
}

/// Everything that can go wrong with the RDMA transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// No device at all.
    #[error("no RDMA device found (ibv_get_device_list lists none): load the NIC's RDMA driver, or make a soft-RoCE device (`rdma link add rxe0 type rxe netdev eth0`)")]
    NoDevice,
    /// Not the one asked for.
    #[error("RDMA device '{wanted}' ({ENV_DEVICE}) not found; {}", found_list(.found))]
    DeviceNotFound {
        /// The name asked for.
        wanted: String,
        /// The devices there are.
        found: Vec<String>,
    },
    /// Listing the devices failed.
    #[error("cannot list RDMA devices: {}", io_msg(.source))]
    List {
        /// Why.
        source: std::io::Error,
    },
    /// A verb failed on a device.
    #[error("RDMA device '{device}': cannot {what}: {}", io_msg(.source))]
    Verb {
        /// The device.
        device: String,
        /// What we tried.
        what: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The port asked for does not exist.
    #[error("RDMA device '{device}' has no port {port} ({ENV_PORT}; it has {ports})")]
    NoPort {
        /// The device.
        device: String,
        /// The port asked for.
        port: u8,
        /// Its port count.
        ports: u8,
    },
    /// The port is not up.
    #[error("RDMA device '{device}' port {port} is not active (state {state})")]
    PortDown {
        /// The device.
        device: String,
        /// The port.
        port: u8,
        /// Its state.
        state: &'static str,
    },
    /// A RoCE port without a GID to be addressed by.
    #[error("RDMA device '{device}' port {port} has no usable GID (on RoCE its network interface needs an address; or set {ENV_GID_INDEX})")]
    NoGid {
        /// The device.
        device: String,
        /// The port.
        port: u8,
    },
    /// A bad setting.
    #[error("RDMA configuration: {0}")]
    Config(String),
    /// The peer cannot (or will not) use RDMA.
    #[error("{addr} cannot use RDMA: {reason}")]
    Refused {
        /// The peer.
        addr: SocketAddr,
        /// What it said.
        reason: String,
    },
    /// This build cannot serve an RDMA primary.
    #[error("primary {addr} asked for an RDMA channel, but this standby was {NOT_BUILT}")]
    NotBuilt {
        /// The primary.
        addr: SocketAddr,
    },
    /// A setup message out of turn.
    #[error("RDMA setup with {addr}: expected its {expected}, got its {got}")]
    Unexpected {
        /// The peer.
        addr: SocketAddr,
        /// What should have come.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// A malformed setup or control message.
    #[error("RDMA channel to {addr}: {source}")]
    Msg {
        /// The peer.
        addr: SocketAddr,
        /// What was wrong.
        source: MsgError,
    },
    /// The ring protocol was violated.
    #[cfg(feature = "rdma")]
    #[error("RDMA channel to {addr}: {source}")]
    Flow {
        /// The peer.
        addr: SocketAddr,
        /// How.
        source: flow::FlowError,
    },
    /// Something else the peer should not have done.
    #[error("RDMA channel to {addr}: {what}")]
    Protocol {
        /// The peer.
        addr: SocketAddr,
        /// What.
        what: String,
    },
    /// A work request failed.
    #[error("RDMA {what} to {addr} failed: {}", wc_status_name(*.status))]
    Completion {
        /// The peer.
        addr: SocketAddr,
        /// Which kind of request.
        what: &'static str,
        /// Its `ibv_wc_status`.
        status: u32,
    },
    /// A call after an earlier error broke the stream.
    #[error("the RDMA channel to {addr} failed earlier")]
    Broken {
        /// The peer.
        addr: SocketAddr,
    },
    /// A clone (which can only shut the channel down) was used otherwise.
    #[error("a clone of the RDMA channel to {addr} can only shut it down")]
    Clone {
        /// The peer.
        addr: SocketAddr,
    },
    /// A buffer registration overlapping another.
    #[cfg(feature = "rdma")]
    #[error("{0}")]
    Register(registry::RegistryError),
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        "there is no RDMA device at all".to_string()
    } else {
        format!("found: {}", found.join(", "))
    }
}

/// `ibv_wc_status_str`'s names, by status.
const STATUS_NAMES: [&str; 24] = [
    "success",
    "local length error",
    "local QP operation error",
    "local EE context operation error",
    "local protection error",
    "Work Request Flushed Error",
    "memory management operation error",
    "bad response error",
    "local access error",
    "remote invalid request error",
    "remote access error",
    "remote operation error",
    "transport retry counter exceeded",
    "RNR retry counter exceeded",
    "local RDD violation error",
    "remote invalid RD request",
    "aborted error",
    "invalid EE context number",
    "invalid EE context state",
    "fatal error",
    "response timeout error",
    "general error",
    "TM error",
    "TM software rendezvous",
];

/// The name of an `ibv_wc_status`, as `ibv_wc_status_str` spells it.
pub fn wc_status_name(status: u32) -> &'static str {
    STATUS_NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("unknown completion status")
}

impl RdmaError {
    /// The `std::io::ErrorKind` that best describes it.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            RdmaError::NoDevice | RdmaError::DeviceNotFound { .. } | RdmaError::NoPort { .. } => {
                K::NotFound
            }
            RdmaError::List { source } | RdmaError::Verb { source, .. } => source.kind(),
            RdmaError::Refused { .. } | RdmaError::NotBuilt { .. } => K::ConnectionRefused,
            RdmaError::Completion { .. } | RdmaError::Broken { .. } => K::ConnectionReset,
            RdmaError::Clone { .. } => K::Unsupported,
            RdmaError::PortDown { .. } | RdmaError::NoGid { .. } => K::NetworkDown,
            RdmaError::Config(_) => K::InvalidInput,
            _ => K::InvalidData,
        }
    }
}

/// Checks at start that RDMA can run here: opens the device `cfg` names
/// (or the first), checks its port; returns the device's name. The error
/// is one line naming what is missing.
#[cfg(feature = "rdma")]
pub fn probe(cfg: &RdmaConfig) -> Result<String, RdmaError> {
    use fabric::Provider;
    verbs::VerbsProvider::open(cfg).map(|p| p.name().to_string())
}

/// Sends one setup message on the bootstrap channel (`len: u32 LE | body`).
pub(crate) fn send_setup(tcp: &mut TcpChannel, msg: &SetupMsg) -> Result<(), TransportError> {
    let body = msg.encode();
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&body);
    tcp.send_all(&b)
}

/// Receives one setup message before `deadline`.
pub(crate) fn recv_setup(
    tcp: &mut TcpChannel,
    deadline: Instant,
) -> Result<SetupMsg, TransportError> {
    let addr = tcp.peer_addr();
    let left = deadline.saturating_duration_since(Instant::now());
    tcp.set_read_timeout(Some(left))?;
    let mut len = [0u8; 4];
    tcp.recv_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_SETUP_LEN {
        return Err(TransportError::Rdma(RdmaError::Protocol {
            addr,
            what: format!("setup message of {len} bytes (at most {MAX_SETUP_LEN})"),
        }));
    }
    let mut body = vec![0u8; len];
    tcp.recv_exact(&mut body)?;
    tcp.set_read_timeout(None)?;
    SetupMsg::decode(&body).map_err(|source| TransportError::Rdma(RdmaError::Msg { addr, source }))
}

/// A standby built without the feature: reads the offer and refuses it,
/// saying why; the error is for the standby's log.
pub(crate) fn refuse_unbuilt(mut tcp: TcpChannel, deadline: Instant) -> TransportError {
    let addr = tcp.peer_addr();
    if let Err(e) = recv_setup(&mut tcp, deadline) {
        return e;
    }
    let _ = send_setup(
        &mut tcp,
        &SetupMsg::Refuse(format!("the standby was {NOT_BUILT}")),
    );
    let _ = tcp.shutdown();
    TransportError::Rdma(RdmaError::NotBuilt { addr })
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn config_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            RdmaConfig::from_lookup(env(&[])).unwrap(),
            RdmaConfig::default()
        );
        let c = RdmaConfig::from_lookup(env(&[
            (ENV_DEVICE, " rxe0 "),
            (ENV_PORT, "2"),
            (ENV_GID_INDEX, "1"),
        ]))
        .unwrap();
        assert_eq!(
            (c.device.as_deref(), c.port, c.gid_index),
            (Some("rxe0"), 2, Some(1))
        );
        for bad in [(ENV_PORT, "0"), (ENV_PORT, "x"), (ENV_GID_INDEX, "256")] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([bad]));
            let e = RdmaConfig::from_lookup(env(pairs)).unwrap_err();
            assert!(e.to_string().contains(bad.0), "{e}");
        }
    }

    #[test]
    fn missing_devices_are_named_in_one_line() {
        let e = RdmaError::DeviceNotFound {
            wanted: "mlx5_1".into(),
            found: vec!["mlx5_0".into(), "rxe0".into()],
        };
        assert_eq!(
            e.to_string(),
            "RDMA device 'mlx5_1' (FTVMM_RDMA_DEVICE) not found; found: mlx5_0, rxe0"
        );
        let e = RdmaError::DeviceNotFound {
            wanted: "mlx5_1".into(),
            found: vec![],
        };
        assert!(e.to_string().ends_with("there is no RDMA device at all"));
        assert!(RdmaError::NoDevice
            .to_string()
            .starts_with("no RDMA device found"));
        assert_eq!(wc_status_name(12), "transport retry counter exceeded");
        assert_eq!(wc_status_name(1000), "unknown completion status");
    }
}
