//! The checkpoint channel of either transport, chosen by `--transport`.
//!
//! [`connect_pair_over`] (primary) and [`ChannelListener::accept_data_pair`]
//! (standby) pair a data channel with its heartbeat connection like
//! [`crate::connect_pair_with`] and [`ChannelListener::accept_pair`]; the
//! data channel is a [`DataChannel`]: TCP, or RDMA when the primary asked
//! for it (its data connection's preamble says so, and becomes the RDMA
//! channel's authenticated bootstrap, see [`crate::rdma`]). The standby
//! needs no option: it serves what the primary asks for, or refuses with a
//! reason the primary prints. Session and standby code hold a
//! `DataChannel` and never look at which transport runs.

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::CheckpointFrame;

use crate::channel::Channel;
use crate::handshake::{connect_pair_kind, ConnectionKind, Incoming, SessionId};
#[cfg(feature = "rdma")]
use crate::rdma::{RdmaChannel, RdmaConfig};
use crate::secure::{Cipher, Security};
use crate::TransportError;
use crate::{ChannelListener, FailureDetector, HeartbeatStream, TcpChannel, TcpOptions};

/// How long the standby's RDMA setup may take once a pair is matched.
pub const RDMA_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Which transport carries the checkpoints (`--transport`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    #[default]
    Tcp,
    /// RDMA over ibverbs, on this device and port.
    #[cfg(feature = "rdma")]
    Rdma(RdmaConfig),
}

impl Transport {
    /// "tcp" or "rdma".
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            #[cfg(feature = "rdma")]
            Transport::Rdma(_) => "rdma",
        }
    }
}

/// A checkpoint channel of either transport.
pub enum DataChannel {
    /// Over TCP.
    Tcp(TcpChannel),
    /// Over RDMA.
    #[cfg(feature = "rdma")]
    Rdma(Box<RdmaChannel>),
}

impl fmt::Debug for DataChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataChannel::Tcp(c) => c.fmt(f),
            #[cfg(feature = "rdma")]
            DataChannel::Rdma(c) => c.fmt(f),
        }
    }
}

/// Calls `$e` on the channel inside, whichever it is.
macro_rules! each {
    ($self:expr, $c:ident => $e:expr) => {
        match $self {
            DataChannel::Tcp($c) => $e,
            #[cfg(feature = "rdma")]
            DataChannel::Rdma($c) => $e,
        }
    };
}

impl DataChannel {
    /// The AEAD sealing the channel, or `None` for a plain one.
    pub fn cipher(&self) -> Option<Cipher> {
        each!(self, c => c.cipher())
    }

    /// The session of the handshake that paired it.
    pub fn session(&self) -> Option<SessionId> {
        each!(self, c => c.session())
    }

    /// "tcp" or "rdma".
    pub fn transport(&self) -> &'static str {
        match self {
            DataChannel::Tcp(_) => "tcp",
            #[cfg(feature = "rdma")]
            DataChannel::Rdma(_) => "rdma",
        }
    }

    /// Starts the transport's own liveness check, feeding `detector` (the
    /// one the heartbeats feed): the RDMA keepalive, every `interval`, the
    /// peer lost after `misses` intervals without the peer's counter. TCP
    /// has none beyond its heartbeat connection: a no-op.
    pub fn start_keepalive(
        &mut self,
        detector: &Arc<FailureDetector>,
        interval: Duration,
        misses: u32,
    ) -> Result<(), TransportError> {
        let _ = (detector, interval, misses);
        match self {
            DataChannel::Tcp(_) => Ok(()),
            #[cfg(feature = "rdma")]
            DataChannel::Rdma(c) => c.start_keepalive(detector.clone(), interval, misses),
        }
    }
}

impl Channel for DataChannel {
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        each!(self, c => c.send_chunks(chunks))
    }

    fn send_checkpoint(&mut self, frame: &CheckpointFrame<'_>) -> Result<u64, TransportError> {
        each!(self, c => c.send_checkpoint(frame))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        each!(self, c => c.recv(buf))
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        each!(self, c => c.recv_exact(buf))
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        each!(self, c => c.set_read_timeout(timeout))
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        each!(self, c => c.set_write_timeout(timeout))
    }

    fn shutdown(&self) -> Result<(), TransportError> {
        each!(self, c => c.shutdown())
    }

    fn try_clone(&self) -> Result<DataChannel, TransportError> {
        Ok(match self {
            DataChannel::Tcp(c) => DataChannel::Tcp(c.try_clone()?),
            #[cfg(feature = "rdma")]
            DataChannel::Rdma(c) => DataChannel::Rdma(Box::new(c.try_clone()?)),
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        each!(self, c => c.peer_addr())
    }
}

/// For frame decoders, as [`TcpChannel`]'s.
impl Read for DataChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf).map_err(io::Error::from)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.recv_exact(buf).map_err(io::Error::from)
    }
}

/// [`crate::connect_pair_with`] over `transport`: with RDMA, the data
/// connection is the bootstrap of an RDMA channel (the device is opened
/// first, so a host without one fails before connecting).
pub fn connect_pair_over<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    timeout: Duration,
    options: &TcpOptions,
    security: &Security,
    transport: &Transport,
) -> Result<(DataChannel, HeartbeatStream), TransportError> {
    match transport {
        Transport::Tcp => {
            let (d, h, _) =
                connect_pair_kind(addr, timeout, options, security, ConnectionKind::Data)?;
            Ok((DataChannel::Tcp(d), h))
        }
        #[cfg(feature = "rdma")]
        Transport::Rdma(cfg) => {
            let provider = crate::rdma::verbs::VerbsProvider::open(cfg)?;
            connect_rdma_pair(addr, timeout, options, security, cfg, Arc::new(provider))
        }
    }
}

/// The RDMA pairing over any provider (the tests' software fabric too).
#[cfg(feature = "rdma")]
pub(crate) fn connect_rdma_pair<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    timeout: Duration,
    options: &TcpOptions,
    security: &Security,
    cfg: &RdmaConfig,
    provider: Arc<dyn crate::rdma::fabric::Provider>,
) -> Result<(DataChannel, HeartbeatStream), TransportError> {
    let (d, h, deadline) =
        connect_pair_kind(addr, timeout, options, security, ConnectionKind::RdmaData)?;
    let c = crate::rdma::setup::initiate(d, provider, cfg, deadline)?;
    Ok((DataChannel::Rdma(Box::new(c)), h))
}

impl ChannelListener {
    /// [`ChannelListener::accept_pair`] for either transport: a primary
    /// that asks for RDMA gets it set up here (this side's device from
    /// [`crate::rdma::RdmaConfig::from_env`]), or refused with the reason
    /// (no device; a build without the `rdma` feature), which the primary
    /// prints; the refusal is returned as a per-connection error and the
    /// listener goes on.
    pub fn accept_data_pair(
        &mut self,
        timeout: Duration,
    ) -> Result<(DataChannel, HeartbeatStream), TransportError> {
        let deadline = Instant::now() + timeout;
        match self.accept_halves(deadline, timeout)? {
            (Incoming::Data(d), h) => Ok((DataChannel::Tcp(d), h)),
            (Incoming::RdmaData(d), h) => {
                let setup_deadline = Instant::now() + RDMA_SETUP_TIMEOUT;
                #[cfg(feature = "rdma")]
                {
                    let (cfg, provider) = match self.rdma_override.clone() {
                        Some((p, cfg)) => (Ok(cfg), Some(p)),
                        None => (RdmaConfig::from_env(), None),
                    };
                    // A bad environment is refused like a missing device.
                    let cfg_used = cfg.as_ref().cloned().unwrap_or_default();
                    let open = move || -> Result<Arc<dyn crate::rdma::fabric::Provider>, crate::rdma::RdmaError> {
                        let cfg = cfg?;
                        match provider {
                            Some(p) => Ok(p),
                            None => Ok(Arc::new(crate::rdma::verbs::VerbsProvider::open(&cfg)?)),
                        }
                    };
                    let cfg = cfg_used;
                    let c = crate::rdma::setup::respond(d, open, &cfg, setup_deadline)?;
                    Ok((DataChannel::Rdma(Box::new(c)), h))
                }
                #[cfg(not(feature = "rdma"))]
                {
                    drop(h);
                    Err(crate::rdma::refuse_unbuilt(d, setup_deadline))
                }
            }
            (Incoming::Heartbeat(_), _) => unreachable!("the first half is the data half"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::msg::{
        PortAddress, QpEndpoint, RingAddress, SetupMsg, SetupParams, SlotAddress,
    };
    use crate::rdma::{recv_setup, send_setup, NOT_BUILT};
    use crate::secure::FtKey;
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    fn key() -> Security {
        Security::keyed(FtKey::from_bytes(&[3; 32]).unwrap())
    }

    /// A primary asking for RDMA, by hand: its offer, then the answer.
    fn ask_for_rdma(addr: SocketAddr) -> thread::JoinHandle<SetupMsg> {
        thread::spawn(move || {
            let (mut d, _hb, deadline) = connect_pair_kind(
                addr,
                T,
                &TcpOptions::default(),
                &key(),
                ConnectionKind::RdmaData,
            )
            .unwrap();
            let offer = SetupParams {
                port: PortAddress {
                    lid: 1,
                    gid: [0; 16],
                    global: false,
                    mtu: 3,
                },
                data: QpEndpoint { qpn: 1, psn: 2 },
                keepalive: QpEndpoint { qpn: 3, psn: 4 },
                ring: RingAddress {
                    addr: 4096,
                    rkey: 5,
                    slabs: 8,
                    slab_bytes: 1 << 20,
                },
                slot: SlotAddress {
                    addr: 8192,
                    rkey: 6,
                },
            };
            send_setup(&mut d, &SetupMsg::Offer(offer)).unwrap();
            recv_setup(&mut d, deadline).unwrap()
        })
    }

    #[test]
    fn a_tcp_only_accept_refuses_an_rdma_primary_with_the_reason() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(key());
        let primary = ask_for_rdma(l.local_addr());
        let err = l.accept_pair(Duration::from_millis(1500)).unwrap_err();
        assert!(matches!(err, TransportError::AcceptTimeout { .. }), "{err}");
        match primary.join().unwrap() {
            SetupMsg::Refuse(r) => assert!(r.contains(NOT_BUILT), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[cfg(not(feature = "rdma"))]
    #[test]
    fn a_standby_built_without_rdma_refuses_and_says_how_to_build_it() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(key());
        let primary = ask_for_rdma(l.local_addr());
        let err = l.accept_data_pair(T).unwrap_err();
        assert!(err.is_per_connection());
        assert!(
            err.to_string().ends_with(
                "this standby was built without RDMA support: rebuild with `cargo build -p ftvmm --features rdma`"
            ),
            "{err}"
        );
        match primary.join().unwrap() {
            SetupMsg::Refuse(r) => assert_eq!(r, format!("the standby was {NOT_BUILT}")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp_pairs_still_come_out_of_accept_data_pair() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(key());
        let addr = l.local_addr();
        let primary = thread::spawn(move || {
            connect_pair_over(addr, T, &TcpOptions::default(), &key(), &Transport::Tcp).unwrap()
        });
        let (mut s, _hb) = l.accept_data_pair(T).unwrap();
        let (mut p, _phb) = primary.join().unwrap();
        assert_eq!((p.transport(), s.transport()), ("tcp", "tcp"));
        assert!(p.cipher().is_some());
        p.send_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        let det = Arc::new(FailureDetector::new(1, T).unwrap());
        s.start_keepalive(&det, T, 5).unwrap(); // TCP: nothing to start
    }
}
