//! Setting an RDMA channel up over its TCP bootstrap connection.
//!
//! The bootstrap connection is the data connection of
//! [`crate::connect_pair_over`] with the `RdmaData` preamble kind: the same
//! authenticated handshake as TCP ([`crate::auth`]) runs first, so every
//! setup message below travels sealed under its session keys.
//!
//! ```text
//! primary                                      standby
//!   make QPs (INIT), ring, slot; post receives
//!   Offer(params)                     -->
//!                                        open device; make QPs, ring, slot;
//!                                        post receives; QPs → RTR → RTS
//!                                 <--   Accept(params)   (or Refuse(reason))
//!   QPs → RTR → RTS
//!   Ready                             -->
//! ```
//!
//! The standby is ready to receive before it answers and sends nothing
//! before Ready, so no packet ever reaches a queue pair that is not ready
//! for it (one that would be silently dropped and retried). Afterwards the
//! sealing keys move from the bootstrap connection to the RDMA channel,
//! whose record counters continue where the setup messages left them.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::channel::{Parts, RdmaChannel, Sealing, CTL_STRIDE, SQ_DEPTH};
use super::fabric::{Access, Caps, Endpoint, Provider};
use super::mem::RegisteredBuf;
use super::msg::{
    QpEndpoint, RingAddress, SetupMsg, SetupParams, SlotAddress, MAX_RING_SLABS, MAX_SLAB_BYTES,
    MIN_SLAB_BYTES,
};
use super::{recv_setup, send_setup, RdmaConfig, RdmaError};
use crate::channel::Channel;
use crate::secure::TAG_LEN;
use crate::{TcpChannel, TransportError};

/// Send queue depth of the keepalive queue pair.
const KEEPALIVE_SQ: u32 = 8;

/// A random 24-bit packet sequence number.
fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: a valid 4-byte buffer; a failed call leaves zeros, which is
    // a valid PSN too (randomness only avoids stale packets of an earlier
    // queue pair with the same number being taken for ours).
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u32::from_le_bytes(b) & 0xff_ffff
}

/// One side's RDMA resources, before the peer's parameters are known.
struct Local {
    provider: Arc<dyn Provider>,
    data: Box<dyn Endpoint>,
    keepalive: Box<dyn Endpoint>,
    ring: RegisteredBuf,
    slabs: u16,
    slab_bytes: u32,
    ctl: RegisteredBuf,
    slot: RegisteredBuf,
    data_psn: u32,
    keepalive_psn: u32,
}

impl Local {
    /// Makes both queue pairs (in INIT), registers the ring, the control
    /// buffers and the keepalive slot, and posts every receive.
    fn new(provider: Arc<dyn Provider>, cfg: &RdmaConfig) -> io::Result<Local> {
        let (slabs, slab_bytes) = (cfg.slabs, cfg.slab_bytes);
        // At most `slabs` Data, MAX_RING_SLABS Credits (the peer's ring is
        // no larger) and one Close can be in flight towards us: a receive
        // is always posted for each, so the peer never meets RNR.
        let recvs = u32::from(slabs) + u32::from(MAX_RING_SLABS) + 2;
        let data = provider.endpoint(Caps {
            send_wr: SQ_DEPTH,
            recv_wr: recvs,
            send_sge: provider.max_sge().clamp(1, 16),
            inline: 64,
            events: true,
        })?;
        let keepalive = provider.endpoint(Caps {
            send_wr: KEEPALIVE_SQ,
            recv_wr: 1,
            send_sge: 1,
            inline: 16,
            events: false,
        })?;
        let ring = RegisteredBuf::new(
            &*provider,
            usize::from(slabs) * slab_bytes as usize,
            Access::RemoteWrite,
        )?;
        let ctl = RegisteredBuf::new(&*provider, recvs as usize * CTL_STRIDE, Access::Write)?;
        let slot = RegisteredBuf::new(&*provider, 4096, Access::RemoteWrite)?;
        for i in 0..recvs {
            let sge = ctl.sge(i as usize * CTL_STRIDE, CTL_STRIDE);
            // SAFETY: the control buffers move into the channel and live as
            // long as the queue pair may use them (see RdmaChannel::drop).
            unsafe { data.post_recv(sge, super::channel::Tag::Recv { slot: i }.encode())? };
        }
        Ok(Local {
            provider,
            data,
            keepalive,
            ring,
            slabs,
            slab_bytes,
            ctl,
            slot,
            data_psn: random_psn(),
            keepalive_psn: random_psn(),
        })
    }

    fn params(&self) -> SetupParams {
        SetupParams {
            port: self.provider.port_address(),
            data: QpEndpoint {
                qpn: self.data.qpn(),
                psn: self.data_psn,
            },
            keepalive: QpEndpoint {
                qpn: self.keepalive.qpn(),
                psn: self.keepalive_psn,
            },
            ring: RingAddress {
                addr: self.ring.addr(),
                rkey: self.ring.rkey(),
                slabs: self.slabs,
                slab_bytes: self.slab_bytes,
            },
            slot: SlotAddress {
                addr: self.slot.addr(),
                rkey: self.slot.rkey(),
            },
        }
    }

    /// Both queue pairs → RTR → RTS towards the peer's.
    fn connect(&self, peer: &SetupParams) -> io::Result<()> {
        self.data.connect(self.data_psn, &peer.port, peer.data)?;
        self.keepalive
            .connect(self.keepalive_psn, &peer.port, peer.keepalive)
    }

    fn into_channel(
        self,
        tcp: TcpChannel,
        peer: &SetupParams,
    ) -> Result<RdmaChannel, TransportError> {
        let b = tcp.into_bootstrap()?;
        RdmaChannel::new(Parts {
            provider: self.provider,
            data: self.data,
            keepalive: self.keepalive,
            ring: self.ring,
            ring_slabs: self.slabs,
            ring_slab_bytes: self.slab_bytes,
            ctl: self.ctl,
            slot: self.slot,
            peer_ring: peer.ring,
            peer_slot: peer.slot,
            tcp: b.stream,
            peer: b.peer,
            session: b.session,
            sealing: b.keys.map(|(tx, rx, cipher)| Sealing { tx, rx, cipher }),
        })
    }
}

fn device_err(
    provider: &dyn Provider,
    what: &'static str,
) -> impl FnOnce(io::Error) -> TransportError {
    let device = provider.name().to_string();
    move |source| {
        TransportError::Rdma(RdmaError::Verb {
            device,
            what,
            source,
        })
    }
}

/// Checks a ring geometry of ours before offering it.
fn check_config(cfg: &RdmaConfig) -> Result<(), RdmaError> {
    let ok = (1..=MAX_RING_SLABS).contains(&cfg.slabs)
        && (MIN_SLAB_BYTES..=MAX_SLAB_BYTES).contains(&cfg.slab_bytes)
        && cfg.slab_bytes as usize > TAG_LEN;
    if ok {
        Ok(())
    } else {
        Err(RdmaError::Config(format!(
            "receive ring of {} slabs of {} bytes (1 to {MAX_RING_SLABS} slabs of {MIN_SLAB_BYTES} to {MAX_SLAB_BYTES} bytes)",
            cfg.slabs, cfg.slab_bytes
        )))
    }
}

/// The primary's side: offers, connects on the standby's answer, says
/// Ready.
pub(crate) fn initiate(
    mut tcp: TcpChannel,
    provider: Arc<dyn Provider>,
    cfg: &RdmaConfig,
    deadline: Instant,
) -> Result<RdmaChannel, TransportError> {
    let addr = tcp.peer_addr();
    check_config(cfg)?;
    let local = Local::new(provider.clone(), cfg)
        .map_err(device_err(&*provider, "set up queue pairs and memory"))?;
    send_setup(&mut tcp, &SetupMsg::Offer(local.params()))?;
    let peer = match recv_setup(&mut tcp, deadline)? {
        SetupMsg::Accept(p) => p,
        SetupMsg::Refuse(reason) => {
            return Err(TransportError::Rdma(RdmaError::Refused { addr, reason }))
        }
        other => {
            return Err(TransportError::Rdma(RdmaError::Unexpected {
                addr,
                expected: "accept",
                got: other.name(),
            }))
        }
    };
    local
        .connect(&peer)
        .map_err(device_err(&*provider, "connect the queue pairs"))?;
    send_setup(&mut tcp, &SetupMsg::Ready)?;
    log::info!(
        "RDMA channel to {addr} on '{}': data QP {} → {}, ring {}×{} KiB, peer ring {}×{} KiB",
        provider.name(),
        local.data.qpn(),
        peer.data.qpn,
        cfg.slabs,
        cfg.slab_bytes >> 10,
        peer.ring.slabs,
        peer.ring.slab_bytes >> 10
    );
    local.into_channel(tcp, &peer)
}

/// The standby's side: reads the offer, opens its device (refusing with
/// the reason if it cannot), connects, accepts, waits for Ready.
pub(crate) fn respond(
    mut tcp: TcpChannel,
    open: impl FnOnce() -> Result<Arc<dyn Provider>, RdmaError>,
    cfg: &RdmaConfig,
    deadline: Instant,
) -> Result<RdmaChannel, TransportError> {
    let addr = tcp.peer_addr();
    let offer = match recv_setup(&mut tcp, deadline)? {
        SetupMsg::Offer(p) => p,
        other => {
            return Err(TransportError::Rdma(RdmaError::Unexpected {
                addr,
                expected: "offer",
                got: other.name(),
            }))
        }
    };
    let refuse = |tcp: &mut TcpChannel, e: TransportError| {
        let _ = send_setup(tcp, &SetupMsg::Refuse(format!("standby: {e}")));
        let _ = tcp.shutdown();
        e
    };
    let provider = match check_config(cfg).and_then(|()| open()) {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut tcp, TransportError::Rdma(e))),
    };
    let local = match Local::new(provider.clone(), cfg).and_then(|l| l.connect(&offer).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            let e = device_err(&*provider, "set up and connect queue pairs")(e);
            return Err(refuse(&mut tcp, e));
        }
    };
    send_setup(&mut tcp, &SetupMsg::Accept(local.params()))?;
    match recv_setup(&mut tcp, deadline)? {
        SetupMsg::Ready => {}
        other => {
            return Err(TransportError::Rdma(RdmaError::Unexpected {
                addr,
                expected: "ready",
                got: other.name(),
            }))
        }
    }
    log::info!(
        "RDMA channel from {addr} on '{}': data QP {} → {}",
        provider.name(),
        local.data.qpn(),
        offer.data.qpn
    );
    local.into_channel(tcp, &offer)
}
