//! [`RdmaChannel`]: the [`Channel`] byte stream over a reliable-connected
//! queue pair.
//!
//! # Data path
//!
//! Each side owns a *receive ring* of registered slabs that the peer may
//! RDMA-WRITE, and a *bounce ring* mirroring the peer's ring (same count and
//! size) that it writes from. A send cuts the stream into slab-sized
//! pieces; each slab is filled (see below), RDMA-written into the peer's
//! slab of the same index, and announced with a [`Ctl::Data`] SEND on the
//! same queue pair (RC executes a queue pair's requests in order, so the
//! data is in place when the SEND arrives). The receiver copies the slab
//! out, returns it with a [`Ctl::Credit`] SEND, and hands the bytes out
//! through `recv`/`recv_exact`, as TCP's socket buffer would. Flow control
//! is [`super::flow`]; control messages are [`super::msg`]. The standby's
//! frame decoder above reads, verifies and applies checkpoints exactly as
//! over TCP.
//!
//! - **Sealed channels** (a keyed handshake): each slab carries one record,
//!   `ciphertext | tag`, sealed in place in the bounce slab with the
//!   bootstrap connection's own session keys (so its counters simply go
//!   on), the plaintext length as associated data, like TCP's records. The
//!   receiver copies the record out of its ring *before* opening it, so a
//!   forged RDMA WRITE racing the check cannot change what was verified.
//! - **Plain channels** (`--ft-insecure`): [`Channel::send_checkpoint`]
//!   registers the staging's slabs (`ibv_reg_mr`) the first time it sees
//!   them, and again only when the slab cache changed ([`SlabSet`]: slabs
//!   added are registered, and once slabs were freed every registration is
//!   dropped and the survivors registered again, since a new slab may sit
//!   where a freed one was). The checkpoint's pages and state are then
//!   RDMA-written straight from the slabs, without a copy; its other bytes
//!   (head, index, deltas, trailer) are copied into the bounce slab, as is
//!   everything sent through [`Channel::send_chunks`]. Registrations are
//!   only looked up by the send of the checkpoint they were checked
//!   against, so a stale one is never used. Sealing needs a copy anyway
//!   (the ciphertext goes somewhere), so a sealed channel registers
//!   nothing and zero-copy applies to plain channels only.
//!
//! A send returns once every slab it wrote has completed locally (for RC:
//! acknowledged by the peer's device), so the caller may reuse its buffers,
//! and a shutdown right after it loses nothing.
//!
//! # Ends and errors
//!
//! The TCP bootstrap connection stays open: its end is how each side
//! learns at once that the other process is gone (its kernel closes the
//! socket), as over TCP. An orderly drop sends [`Ctl::Close`] first.
//! [`Channel::shutdown`] (from any clone) moves both queue pairs to the
//! error state (outstanding requests are flushed, a blocked call returns)
//! and shuts the bootstrap socket down (the peer sees the end). Clones can
//! only shut the channel down.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::fabric::{Access, Completion, Endpoint, Provider, Region, Remote, Sge, WcKind};
use super::fabric::{WC_SUCCESS, WC_WR_FLUSH_ERR};
use super::flow::{RecvRing, SendRing};
use super::keepalive::Keepalive;
use super::mem::RegisteredBuf;
use super::msg::{Ctl, RingAddress, SlotAddress, CTL_LEN};
use super::registry::{InsertError, Registry, RegistryStats};
use super::RdmaError;
use crate::channel::Channel;
use crate::handshake::SessionId;
use crate::secure::{Cipher, Opener, Sealer, TAG_LEN};
use crate::wait::{wait_events, DeadlineTimer};
use crate::{FailureDetector, TransportError};
use ftvmm_checkpoint::{CheckpointFrame, SlabSet, Staging};

/// Send queue depth of the data queue pair.
pub(crate) const SQ_DEPTH: u32 = 64;
/// Stride of the control receive buffers.
pub(crate) const CTL_STRIDE: usize = 64;
/// Most RDMA WRITEs one slab is written with (plain channels gather many
/// registered chunks; past this the slab is sent early).
const MAX_WRITES_PER_SLAB: usize = 8;
/// How long a drop waits for its Close to go out.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// What a work request was, in its 64-bit id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    /// A receive into control buffer `slot`.
    Recv { slot: u32 },
    /// The Data SEND of `slab`, retiring `retire` send requests.
    Data { slab: u16, retire: u16 },
    /// A Credit SEND.
    Credit { retire: u16 },
    /// The Close SEND.
    Close { retire: u16 },
    /// An (unsignaled) RDMA WRITE.
    Write,
}

const RECV_BIT: u64 = 1 << 63;

impl Tag {
    pub(crate) fn encode(self) -> u64 {
        match self {
            Tag::Recv { slot } => RECV_BIT | u64::from(slot),
            Tag::Data { slab, retire } => 1 << 40 | u64::from(slab) << 16 | u64::from(retire),
            Tag::Credit { retire } => 2 << 40 | u64::from(retire),
            Tag::Close { retire } => 3 << 40 | u64::from(retire),
            Tag::Write => 4 << 40,
        }
    }

    pub(crate) fn decode(id: u64) -> Option<Tag> {
        if id & RECV_BIT != 0 {
            return u32::try_from(id & !RECV_BIT)
                .ok()
                .map(|slot| Tag::Recv { slot });
        }
        let retire = (id & 0xffff) as u16;
        let slab = ((id >> 16) & 0xffff) as u16;
        match id >> 40 {
            1 => Some(Tag::Data { slab, retire }),
            2 if slab == 0 => Some(Tag::Credit { retire }),
            3 if slab == 0 => Some(Tag::Close { retire }),
            4 if slab == 0 && retire == 0 => Some(Tag::Write),
            _ => None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Tag::Recv { .. } => "receive",
            Tag::Data { .. } => "data send",
            Tag::Credit { .. } => "credit send",
            Tag::Close { .. } => "close send",
            Tag::Write => "write",
        }
    }
}

/// Counters of one RDMA channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RdmaStats {
    /// Stream bytes sent.
    pub bytes_sent: u64,
    /// Stream bytes received.
    pub bytes_received: u64,
    /// Slabs written to the peer.
    pub slabs_sent: u64,
    /// RDMA WRITE requests posted.
    pub writes: u64,
    /// Bytes written straight from registered caller memory.
    pub zero_copy_bytes: u64,
    /// Bytes copied into the bounce ring first.
    pub bounce_bytes: u64,
    /// Times a send waited for a credit (the peer's ring was full).
    pub credit_waits: u64,
}

/// What every handle of a channel shares: enough to shut it down.
struct Shared {
    data: Arc<dyn Endpoint>,
    keepalive: Arc<dyn Endpoint>,
    shut: AtomicBool,
    wake: EventFd,
    tcp: TcpStream,
}

impl Shared {
    fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    fn shutdown(&self) {
        self.shut.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Err(e) = self.data.break_connection() {
            log::debug!("RDMA data queue pair to error state: {e}");
        }
        if let Err(e) = self.keepalive.break_connection() {
            log::debug!("RDMA keepalive queue pair to error state: {e}");
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// The sealing state taken over from the bootstrap connection.
pub(crate) struct Sealing {
    pub tx: Sealer,
    pub rx: Opener,
    pub cipher: Cipher,
}

/// What [`RdmaChannel::new`] is built from (see `super::setup`).
pub(crate) struct Parts {
    pub provider: Arc<dyn Provider>,
    pub data: Box<dyn Endpoint>,
    pub keepalive: Box<dyn Endpoint>,
    pub ring: RegisteredBuf,
    pub ring_slabs: u16,
    pub ring_slab_bytes: u32,
    pub ctl: RegisteredBuf,
    pub slot: RegisteredBuf,
    pub peer_ring: RingAddress,
    pub peer_slot: SlotAddress,
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    pub session: Option<SessionId>,
    pub sealing: Option<Sealing>,
}

const T_CQ: u64 = 0;
const T_TCP: u64 = 1;
const T_WAKE: u64 = 2;
const T_TIMER: u64 = 3;

/// What ended a wait.
#[derive(Debug, Default, Clone, Copy)]
struct Woken {
    cq: bool,
    tcp: bool,
    wake: bool,
}

/// Waits for completions, the bootstrap socket, a shutdown or a deadline.
struct Waiter {
    epoll: Epoll,
    timer: DeadlineTimer,
    tcp: RawFd,
    watching_tcp: bool,
}

impl Waiter {
    fn new(cq: RawFd, tcp: RawFd, wake: RawFd) -> io::Result<Waiter> {
        let epoll = Epoll::new()?;
        let timer = DeadlineTimer::new()?;
        let add = |fd, events, token| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(cq, EventSet::IN, T_CQ)?;
        add(tcp, EventSet::IN | EventSet::READ_HANG_UP, T_TCP)?;
        add(wake, EventSet::IN, T_WAKE)?;
        add(timer.fd(), EventSet::IN, T_TIMER)?;
        Ok(Waiter {
            epoll,
            timer,
            tcp,
            watching_tcp: true,
        })
    }

    /// Stops watching the bootstrap socket (it ended; it would stay ready).
    fn forget_tcp(&mut self) {
        if std::mem::take(&mut self.watching_tcp) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, self.tcp, EpollEvent::default());
        }
    }

    /// Waits until something happens or `deadline` passes (then all false).
    fn wait(&mut self, deadline: Option<Instant>) -> io::Result<Woken> {
        let timeout_ms = self.timer.arm(deadline)?;
        let mut events = [EpollEvent::default(); 4];
        let n = wait_events(&self.epoll, timeout_ms, &mut events)?;
        let mut w = Woken::default();
        for e in &events[..n] {
            match e.data() {
                T_CQ => w.cq = true,
                T_TCP => w.tcp = true,
                T_WAKE => w.wake = true,
                _ => {}
            }
        }
        Ok(w)
    }
}

/// Send queue accounting: an unsignaled request's slot is freed only when
/// a later signaled completion is polled, so the signaled one carries how
/// many it retires.
#[derive(Debug)]
struct SendQueue {
    used: u32,
    depth: u32,
    unsignaled: u32,
}

/// A slab being filled by a send.
#[derive(Debug, Clone, Copy)]
struct Fill {
    slab: u16,
    len: usize,
}

/// The owner's state (clones have none).
struct Inner {
    keepalive: Option<Keepalive>,
    provider: Arc<dyn Provider>,
    ring: RegisteredBuf,
    ring_slab_bytes: usize,
    bounce: RegisteredBuf,
    ctl: RegisteredBuf,
    slot: Arc<RegisteredBuf>,
    /// The staging slabs registered now (plain channels).
    registry: Registry<Box<dyn Region>>,
    /// The staging's slabs the registry was last brought up to date with.
    slabs: Option<SlabSet>,
    peer_ring: RingAddress,
    peer_slot: SlotAddress,
    send: SendRing,
    recv: RecvRing,
    sq: SendQueue,
    max_sge: usize,
    /// Elements of the slab being filled (plain channels).
    sges: Vec<Sge>,
    sealing: Option<Sealing>,
    /// Received bytes not handed out yet: `inb[start..end]`.
    inb: Box<[u8]>,
    start: usize,
    end: usize,
    waiter: Waiter,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// The bootstrap socket ended: the peer process is gone.
    peer_gone: bool,
    /// An error broke the stream.
    broken: bool,
    stats: RdmaStats,
}

/// A checkpoint channel over RDMA (see the module documentation).
pub struct RdmaChannel {
    inner: Option<Box<Inner>>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    session: Option<SessionId>,
    cipher: Option<Cipher>,
    device: String,
}

impl std::fmt::Debug for RdmaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaChannel")
            .field("peer", &self.peer)
            .field("device", &self.device)
            .field("qpn", &self.shared.data.qpn())
            .field("session", &self.session)
            .field("cipher", &self.cipher)
            .field("clone", &self.inner.is_none())
            .finish()
    }
}

impl RdmaChannel {
    /// Builds the channel from connected queue pairs and the bootstrap
    /// connection (its receives are already posted, see `super::setup`).
    pub(crate) fn new(p: Parts) -> Result<RdmaChannel, TransportError> {
        let peer = p.peer;
        let verb = |what: &'static str| {
            let device = p.provider.name().to_string();
            move |source| {
                TransportError::Rdma(RdmaError::Verb {
                    device,
                    what,
                    source,
                })
            }
        };
        let bounce_len = usize::from(p.peer_ring.slabs) * p.peer_ring.slab_bytes as usize;
        let bounce = RegisteredBuf::new(&*p.provider, bounce_len, Access::Read)
            .map_err(verb("register the send ring"))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| TransportError::EventFd { source })?;
        let cq_fd = p
            .data
            .event_fd()
            .expect("the data queue pair has a completion channel");
        let waiter = Waiter::new(cq_fd, p.tcp.as_raw_fd(), wake.as_raw_fd())
            .map_err(|source| TransportError::Wait { addr: peer, source })?;
        let device = p.provider.name().to_string();
        let max_sge = p.provider.max_sge().clamp(1, 16) as usize;
        let cipher = p.sealing.as_ref().map(|s| s.cipher);
        let shared = Arc::new(Shared {
            data: Arc::from(p.data),
            keepalive: Arc::from(p.keepalive),
            shut: AtomicBool::new(false),
            wake,
            tcp: p.tcp,
        });
        let inner = Inner {
            keepalive: None,
            provider: p.provider,
            ring_slab_bytes: p.ring_slab_bytes as usize,
            inb: vec![0u8; p.ring_slab_bytes as usize].into_boxed_slice(),
            ring: p.ring,
            bounce,
            ctl: p.ctl,
            slot: Arc::new(p.slot),
            registry: Registry::default(),
            slabs: None,
            send: SendRing::new(p.peer_ring.slabs),
            recv: RecvRing::new(p.ring_slabs, p.ring_slab_bytes),
            peer_ring: p.peer_ring,
            peer_slot: p.peer_slot,
            sq: SendQueue {
                used: 0,
                depth: SQ_DEPTH,
                unsignaled: 0,
            },
            max_sge,
            sges: Vec::with_capacity(max_sge * MAX_WRITES_PER_SLAB),
            sealing: p.sealing,
            start: 0,
            end: 0,
            waiter,
            read_timeout: None,
            write_timeout: None,
            peer_gone: false,
            broken: false,
            stats: RdmaStats::default(),
        };
        Ok(RdmaChannel {
            inner: Some(Box::new(inner)),
            shared,
            peer,
            session: p.session,
            cipher,
            device,
        })
    }

    /// The AEAD sealing the stream, or `None` for a plain one.
    pub fn cipher(&self) -> Option<Cipher> {
        self.cipher
    }

    /// The session of the handshake that paired it.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The RDMA device it runs on.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Counters (zero on a clone).
    pub fn stats(&self) -> RdmaStats {
        self.inner.as_ref().map(|i| i.stats).unwrap_or_default()
    }

    /// The data queue pair's number.
    pub fn qpn(&self) -> u32 {
        self.shared.data.qpn()
    }

    /// Stops this side's keepalive, as if the process froze (tests).
    #[cfg(test)]
    pub(crate) fn pause_keepalive(&mut self) {
        if let Some(mut ka) = self.inner.as_deref_mut().and_then(|i| i.keepalive.take()) {
            ka.stop();
        }
    }

    /// Flips a byte of slab `slab` of this side's receive ring, as a forged
    /// RDMA WRITE would (tests).
    #[cfg(test)]
    pub(crate) fn corrupt_ring(&mut self, slab: u16, at: usize) {
        let inner = self.inner.as_deref_mut().expect("owner");
        let off = usize::from(slab) * inner.ring_slab_bytes + at;
        let mut b = [0u8; 1];
        inner.ring.copy_out(off, &mut b);
        b[0] ^= 0x40;
        inner.ring.copy_in(off, &b);
    }

    /// Staging slabs registered now.
    pub fn registered_buffers(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.registry.len())
    }

    /// Registration counters of the staging slabs.
    pub fn registry_stats(&self) -> RegistryStats {
        self.inner
            .as_ref()
            .map_or_else(RegistryStats::default, |i| i.registry.stats())
    }

    /// Starts the keepalive: our counter into the peer's slot every
    /// `interval`, the peer lost after `misses` intervals without its own
    /// (see `rdma::keepalive`); losses go to `detector`.
    pub fn start_keepalive(
        &mut self,
        detector: Arc<FailureDetector>,
        interval: Duration,
        misses: u32,
    ) -> Result<(), TransportError> {
        let peer = self.peer;
        let ep = self.shared.keepalive.clone();
        let inner = self.owner()?;
        if inner.keepalive.is_some() {
            return Ok(());
        }
        let ka = Keepalive::start(
            ep,
            inner.slot.clone(),
            Remote {
                addr: inner.peer_slot.addr,
                rkey: inner.peer_slot.rkey,
            },
            detector,
            interval,
            misses,
            peer.to_string(),
        )
        .map_err(|source| TransportError::Spawn {
            what: "RDMA keepalive",
            source,
        })?;
        inner.keepalive = Some(ka);
        Ok(())
    }

    fn owner(&mut self) -> Result<&mut Inner, TransportError> {
        let peer = self.peer;
        self.inner
            .as_deref_mut()
            .ok_or(TransportError::Rdma(RdmaError::Clone { addr: peer }))
    }

    /// Runs `f` on the owner's state with the shared handles.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Inner, &Shared, SocketAddr) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let peer = self.peer;
        let shared = self.shared.clone();
        let inner = self.owner()?;
        f(inner, &shared, peer)
    }
}

impl Inner {
    fn deadline(t: Option<Duration>) -> Option<Instant> {
        t.map(|t| Instant::now() + t)
    }

    fn post_recv(&self, sh: &Shared, slot: u32) -> io::Result<()> {
        let sge = self.ctl.sge(slot as usize * CTL_STRIDE, CTL_STRIDE);
        // SAFETY: the control buffers live as long as the channel, are
        // only read after their receive completes (then re-posted), and the
        // queue pair is moved to the error state before they are freed.
        unsafe { sh.data.post_recv(sge, Tag::Recv { slot }.encode()) }
    }

    fn fail(&mut self, sh: &Shared, e: TransportError) -> TransportError {
        if !self.broken {
            self.broken = true;
            // No request of ours may touch caller memory after we return.
            let _ = sh.data.break_connection();
        }
        e
    }

    /// Handles every completion available now; true if there was any.
    fn drain(&mut self, sh: &Shared, peer: SocketAddr) -> Result<bool, TransportError> {
        let mut wcs = [Completion {
            wr_id: 0,
            status: 0,
            kind: WcKind::Send,
            byte_len: 0,
        }; 16];
        let mut any = false;
        loop {
            let n = sh
                .data
                .poll(&mut wcs)
                .map_err(|source| self.verb_err("poll", source))?;
            if n == 0 {
                return Ok(any);
            }
            any = true;
            for c in &wcs[..n] {
                self.handle(sh, peer, *c)?;
            }
        }
    }

    fn verb_err(&self, what: &'static str, source: io::Error) -> TransportError {
        TransportError::Rdma(RdmaError::Verb {
            device: self.provider.name().to_string(),
            what,
            source,
        })
    }

    fn handle(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        c: Completion,
    ) -> Result<(), TransportError> {
        let protocol =
            |what: String| TransportError::Rdma(RdmaError::Protocol { addr: peer, what });
        let Some(tag) = Tag::decode(c.wr_id) else {
            return Err(protocol(format!(
                "completion with unknown id {:#x}",
                c.wr_id
            )));
        };
        if c.status != WC_SUCCESS {
            if sh.is_shut() || (c.status == WC_WR_FLUSH_ERR && self.broken) {
                return Ok(()); // flushed by our own shutdown or earlier error
            }
            self.broken = true;
            return Err(TransportError::Rdma(RdmaError::Completion {
                addr: peer,
                what: tag.what(),
                status: c.status,
            }));
        }
        match tag {
            Tag::Recv { slot } => {
                if c.kind != WcKind::Recv || c.byte_len as usize != CTL_LEN {
                    return Err(protocol(format!("control message of {} bytes", c.byte_len)));
                }
                let mut b = [0u8; CTL_LEN];
                self.ctl.copy_out(slot as usize * CTL_STRIDE, &mut b);
                self.post_recv(sh, slot)
                    .map_err(|source| self.verb_err("post a receive", source))?;
                let flow = |source| TransportError::Rdma(RdmaError::Flow { addr: peer, source });
                match Ctl::decode(&b)
                    .map_err(|source| TransportError::Rdma(RdmaError::Msg { addr: peer, source }))?
                {
                    Ctl::Data { slab, len } => {
                        if self.sealing.is_some() && len as usize <= TAG_LEN {
                            return Err(protocol(format!("sealed record of {len} bytes")));
                        }
                        self.recv.data(slab, len).map_err(flow)?;
                    }
                    Ctl::Credit { slab } => self.send.credit(slab).map_err(flow)?,
                    Ctl::Close => self.recv.close(),
                }
            }
            Tag::Data { slab, retire } => {
                self.sq.used = self.sq.used.saturating_sub(u32::from(retire));
                self.send.completed(slab).map_err(|source| {
                    TransportError::Rdma(RdmaError::Flow { addr: peer, source })
                })?;
            }
            Tag::Credit { retire } | Tag::Close { retire } => {
                self.sq.used = self.sq.used.saturating_sub(u32::from(retire));
            }
            Tag::Write => log::debug!("unexpected completion of an unsignaled RDMA write"),
        }
        Ok(())
    }

    /// Makes progress: handles completions, or waits for any, for the
    /// bootstrap socket, a shutdown or `deadline` (then `Timeout`).
    fn block(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        deadline: Option<Instant>,
        op: &'static str,
        after: Option<Duration>,
    ) -> Result<(), TransportError> {
        if self.drain(sh, peer)? || sh.is_shut() {
            return Ok(());
        }
        sh.data
            .arm()
            .map_err(|source| self.verb_err("request a completion event", source))?;
        // A completion between the last poll and the request has no event.
        if self.drain(sh, peer)? {
            return Ok(());
        }
        let woken = self
            .waiter
            .wait(deadline)
            .map_err(|source| TransportError::Wait { addr: peer, source })?;
        if woken.cq {
            sh.data
                .take_events()
                .map_err(|source| self.verb_err("take completion events", source))?;
        }
        if woken.tcp {
            self.check_tcp(sh, peer);
        }
        if !(woken.cq || woken.tcp || woken.wake) {
            return Err(TransportError::Timeout {
                addr: peer,
                op,
                after: after.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// The bootstrap socket is readable: its end means the peer is gone.
    fn check_tcp(&mut self, sh: &Shared, peer: SocketAddr) {
        let mut b = [0u8; 16];
        // SAFETY: a valid socket and buffer; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                sh.tcp.as_raw_fd(),
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let gone = match n {
            0 => true,
            n if n > 0 => {
                log::warn!("RDMA channel to {peer}: unexpected bytes on the bootstrap connection");
                true
            }
            _ => io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock,
        };
        if gone {
            log::debug!("RDMA channel to {peer}: the bootstrap connection ended");
            self.peer_gone = true;
            self.waiter.forget_tcp();
        }
    }

    fn closed_for_send(&self, sh: &Shared, peer: SocketAddr) -> Option<TransportError> {
        if self.broken {
            return Some(TransportError::Rdma(RdmaError::Broken { addr: peer }));
        }
        (sh.is_shut() || self.peer_gone).then(|| TransportError::Send {
            addr: peer,
            source: io::ErrorKind::BrokenPipe.into(),
        })
    }

    /// Posts one signaled SEND of a control message.
    fn post_ctl(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        msg: Ctl,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        self.reserve(sh, peer, 1, deadline)?;
        let retire = (self.sq.unsignaled + 1) as u16;
        let tag = match msg {
            Ctl::Data { slab, .. } => Tag::Data { slab, retire },
            Ctl::Credit { .. } => Tag::Credit { retire },
            Ctl::Close => Tag::Close { retire },
        };
        sh.data
            .post_send_inline(&msg.encode(), tag.encode())
            .map_err(|source| self.verb_err("post a send", source))?;
        self.sq.used += 1;
        self.sq.unsignaled = 0;
        Ok(())
    }

    /// Waits until `n` more send requests fit in the send queue.
    fn reserve(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        n: u32,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        while self.sq.used + n > self.sq.depth {
            if let Some(e) = self.closed_for_send(sh, peer) {
                return Err(e);
            }
            let after = self.write_timeout;
            self.block(sh, peer, deadline, "send to", after)?;
        }
        Ok(())
    }

    /// Capacity of one slab for stream bytes.
    fn slab_capacity(&self) -> usize {
        let sb = self.peer_ring.slab_bytes as usize;
        if self.sealing.is_some() {
            sb - TAG_LEN
        } else {
            sb
        }
    }

    /// Waits for a slab of the peer's ring to write.
    fn begin_slab(&mut self, sh: &Shared, peer: SocketAddr) -> Result<Fill, TransportError> {
        let deadline = Self::deadline(self.write_timeout);
        let mut waited = false;
        loop {
            if let Some(e) = self.closed_for_send(sh, peer) {
                return Err(e);
            }
            if let Some(slab) = self.send.writable() {
                return Ok(Fill { slab, len: 0 });
            }
            if !std::mem::replace(&mut waited, true) {
                self.stats.credit_waits += 1;
            }
            let after = self.write_timeout;
            self.block(sh, peer, deadline, "send to", after)?;
        }
    }

    /// Adds `piece` to the slab being filled; with `zero_copy`, straight
    /// from a registered slab if it lies in one.
    fn add(&mut self, f: &mut Fill, piece: &[u8], zero_copy: bool) {
        let off = usize::from(f.slab) * self.peer_ring.slab_bytes as usize + f.len;
        f.len += piece.len();
        if zero_copy {
            let addr = piece.as_ptr() as usize;
            if let Some((region, _)) = self.registry.find(addr, piece.len()) {
                let sge = Sge {
                    addr: addr as u64,
                    len: piece.len() as u32,
                    lkey: region.lkey(),
                };
                self.push_sge(sge);
                self.stats.zero_copy_bytes += piece.len() as u64;
                return;
            }
        }
        self.bounce.copy_in(off, piece);
        self.stats.bounce_bytes += piece.len() as u64;
        if self.sealing.is_none() {
            let sge = self.bounce.sge(off, piece.len());
            self.push_sge(sge);
        }
    }

    fn push_sge(&mut self, sge: Sge) {
        if let Some(last) = self.sges.last_mut() {
            if last.lkey == sge.lkey && last.addr + u64::from(last.len) == sge.addr {
                last.len += sge.len;
                return;
            }
        }
        self.sges.push(sge);
    }

    /// The slab must be sent before another element is added.
    fn sges_full(&self) -> bool {
        self.sges.len() >= self.max_sge * MAX_WRITES_PER_SLAB
    }

    /// Writes the filled slab to the peer and announces it.
    fn flush(&mut self, sh: &Shared, peer: SocketAddr, f: Fill) -> Result<(), TransportError> {
        let sb = self.peer_ring.slab_bytes as usize;
        let off = usize::from(f.slab) * sb;
        let wire_len = if let Some(s) = self.sealing.as_mut() {
            // SAFETY: this bounce slab's previous WRITE completed (the send
            // ring only offers it then), no request reads it until the one
            // posted below, and nothing else touches it.
            let tag = unsafe {
                self.bounce.with_slice_mut(off, f.len, |plain| {
                    s.tx.seal(&(f.len as u32).to_le_bytes(), plain)
                })
            };
            self.bounce.copy_in(off + f.len, &tag);
            self.sges.clear();
            self.sges.push(self.bounce.sge(off, f.len + TAG_LEN));
            f.len + TAG_LEN
        } else {
            f.len
        };
        let writes = self.sges.len().div_ceil(self.max_sge) as u32;
        self.reserve(sh, peer, writes + 1, Self::deadline(self.write_timeout))?;
        let slab = self.send.posted();
        debug_assert_eq!(slab, f.slab);
        let mut remote = self.peer_ring.addr + off as u64;
        for group in self.sges.chunks(self.max_sge) {
            // SAFETY: every element lies in the bounce ring (alive as long
            // as the channel) or in a staging slab registered by
            // sync_slabs for this very checkpoint, which send_checkpoint
            // keeps borrowed until this request completes (it waits for the slab's completion before
            // returning, and breaks the queue pair on any error first).
            unsafe {
                sh.data.post_write(
                    group,
                    Remote {
                        addr: remote,
                        rkey: self.peer_ring.rkey,
                    },
                    Tag::Write.encode(),
                    false,
                )
            }
            .map_err(|source| self.verb_err("post an RDMA write", source))?;
            self.sq.used += 1;
            self.sq.unsignaled += 1;
            self.stats.writes += 1;
            remote += group.iter().map(|s| u64::from(s.len)).sum::<u64>();
        }
        self.sges.clear();
        self.post_ctl(
            sh,
            peer,
            Ctl::Data {
                slab,
                len: wire_len as u32,
            },
            None,
        )?;
        self.stats.slabs_sent += 1;
        Ok(())
    }

    /// Sends `chunks`; `zero_copy`: the registry was just brought up to
    /// date with the memory they lie in ([`Inner::sync_slabs`]), so they may
    /// be written from it.
    fn send_chunks(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        chunks: &mut dyn Iterator<Item = &[u8]>,
        zero_copy: bool,
    ) -> Result<u64, TransportError> {
        let cap = self.slab_capacity();
        let mut total = 0u64;
        let mut fill: Option<Fill> = None;
        for chunk in chunks {
            total += chunk.len() as u64;
            let mut rest = chunk;
            while !rest.is_empty() {
                let mut f = match fill.take() {
                    Some(f) => f,
                    None => self.begin_slab(sh, peer)?,
                };
                let n = (cap - f.len).min(rest.len());
                self.add(&mut f, &rest[..n], zero_copy);
                rest = &rest[n..];
                if f.len == cap || self.sges_full() {
                    self.flush(sh, peer, f)?;
                } else {
                    fill = Some(f);
                }
            }
        }
        if let Some(f) = fill {
            self.flush(sh, peer, f)?;
        }
        // Every slab completed: the caller may reuse its buffers.
        let deadline = Self::deadline(self.write_timeout);
        while !self.send.idle() {
            if let Some(e) = self.closed_for_send(sh, peer) {
                return Err(e);
            }
            let after = self.write_timeout;
            self.block(sh, peer, deadline, "send to", after)?;
        }
        self.stats.bytes_sent += total;
        Ok(total)
    }

    /// Takes the oldest filled slab out of the ring: copied into `dst`
    /// (its plaintext length), credited, then opened if sealed. Returns
    /// the number of stream bytes.
    fn take_record(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        dst: Option<&mut [u8]>,
    ) -> Result<usize, TransportError> {
        let (slab, len) = self.recv.front().expect("a filled slab");
        let len = len as usize;
        let off = usize::from(slab) * self.ring_slab_bytes;
        let plain_len = if self.sealing.is_some() {
            len - TAG_LEN
        } else {
            len
        };
        let mut tag = [0u8; TAG_LEN];
        let to_inb = dst.is_none();
        let dst: &mut [u8] = match dst {
            Some(d) => &mut d[..plain_len],
            None => &mut self.inb[..plain_len],
        };
        // Copy first, then give the slab back, then verify the copy.
        self.ring.copy_out(off, dst);
        if self.sealing.is_some() {
            self.ring.copy_out(off + plain_len, &mut tag);
        }
        self.recv.pop();
        if let Some(s) = self.sealing.as_mut() {
            s.rx.open(&(plain_len as u32).to_le_bytes(), dst, tag)
                .map_err(|source| TransportError::Tampered { addr: peer, source })?;
        }
        if to_inb {
            self.start = 0;
            self.end = plain_len;
        }
        self.stats.bytes_received += plain_len as u64;
        self.post_ctl(sh, peer, Ctl::Credit { slab }, None)?;
        Ok(plain_len)
    }

    /// Hands out buffered bytes; returns how many.
    fn take_buffered(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.inb[self.start..self.start + n]);
        self.start += n;
        n
    }

    /// Waits for the next slab; false at the end of the stream.
    fn wait_data(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        deadline: Option<Instant>,
    ) -> Result<bool, TransportError> {
        loop {
            if self.broken {
                return Err(TransportError::Rdma(RdmaError::Broken { addr: peer }));
            }
            // Shut down here: the end of the stream, as over TCP.
            if sh.is_shut() {
                return Ok(false);
            }
            if self.recv.front().is_some() {
                return Ok(true);
            }
            if self.recv.at_end() {
                return Ok(false);
            }
            if self.peer_gone {
                // What arrived before the end still counts.
                if !self.drain(sh, peer)? {
                    return Ok(false);
                }
                continue;
            }
            let after = self.read_timeout;
            self.block(sh, peer, deadline, "receive from", after)?;
        }
    }

    fn recv(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        buf: &mut [u8],
    ) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.start == self.end {
            let deadline = Self::deadline(self.read_timeout);
            if !self.wait_data(sh, peer, deadline)? {
                return Ok(0);
            }
            self.take_record(sh, peer, None)
                .map_err(|e| self.fail(sh, e))?;
        }
        Ok(self.take_buffered(buf))
    }

    fn recv_exact(
        &mut self,
        sh: &Shared,
        peer: SocketAddr,
        buf: &mut [u8],
    ) -> Result<(), TransportError> {
        let mut pos = self.take_buffered(buf);
        let deadline = Self::deadline(self.read_timeout);
        while pos < buf.len() {
            if !self.wait_data(sh, peer, deadline)? {
                return Err(TransportError::Closed {
                    addr: peer,
                    got: pos,
                    wanted: buf.len(),
                });
            }
            let (_, len) = self.recv.front().expect("waited for it");
            let plain = len as usize - if self.sealing.is_some() { TAG_LEN } else { 0 };
            let r = if plain <= buf.len() - pos {
                // A whole record fits: straight into the caller's buffer.
                self.take_record(sh, peer, Some(&mut buf[pos..]))
            } else {
                self.take_record(sh, peer, None)
                    .map(|_| self.take_buffered(&mut buf[pos..]))
            };
            pos += r.map_err(|e| self.fail(sh, e))?;
        }
        Ok(())
    }

    /// Brings the registry up to date with `staging`'s slabs (plain
    /// channels only): slabs added since the last checkpoint are
    /// registered; once slabs were freed, every registration is dropped
    /// first. A failed registration (e.g. `RLIMIT_MEMLOCK`) is logged once
    /// for this set of slabs, which then goes through the bounce ring.
    fn sync_slabs(&mut self, staging: &Staging) {
        let set = staging.slab_set();
        if self.slabs == Some(set) {
            return;
        }
        if !self.slabs.is_some_and(|old| set.extends(&old)) {
            self.registry.clear();
        }
        self.slabs = Some(set);
        let provider = self.provider.clone();
        for buf in staging.slab_buffers() {
            let (addr, len) = (buf.as_ptr() as usize, buf.len());
            let r = self.registry.insert_with(addr, len, || {
                // SAFETY: the slab stays allocated while its SlabSet holds
                // (a staging frees slabs only under a new lineage), and
                // this registration is only used by a send of a checkpoint
                // of that same set (sync_slabs runs first, and drops every
                // registration once the lineage changed), so the device
                // never reads memory that was freed through it. It only
                // reads (Access::Read).
                unsafe { provider.register(addr as *mut u8, len, Access::Read) }
            });
            if let Err(e) = r {
                let why = match e {
                    InsertError::Register(e) => e.to_string(),
                    InsertError::Overlap(e) => e.to_string(),
                };
                log::warn!(
                    "cannot register a {len}-byte staging slab with the RDMA device ({why}): \
                     checkpoints are copied through the bounce ring until the slab cache changes"
                );
                self.registry.clear();
                return;
            }
        }
    }
}

impl Channel for RdmaChannel {
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        self.with(|inner, sh, peer| {
            if let Some(e) = inner.closed_for_send(sh, peer) {
                return Err(e);
            }
            inner
                .send_chunks(sh, peer, chunks, false)
                .map_err(|e| inner.fail(sh, e))
        })
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.with(|inner, sh, peer| inner.recv(sh, peer, buf))
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.with(|inner, sh, peer| inner.recv_exact(sh, peer, buf))
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.owner()?.read_timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.owner()?.write_timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        Ok(())
    }

    fn shutdown(&self) -> Result<(), TransportError> {
        self.shared.shutdown();
        Ok(())
    }

    fn try_clone(&self) -> Result<RdmaChannel, TransportError> {
        Ok(RdmaChannel {
            inner: None,
            shared: self.shared.clone(),
            peer: self.peer,
            session: self.session,
            cipher: self.cipher,
            device: self.device.clone(),
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn send_checkpoint(&mut self, frame: &CheckpointFrame<'_>) -> Result<u64, TransportError> {
        let sent = self.with(|inner, sh, peer| {
            if let Some(e) = inner.closed_for_send(sh, peer) {
                return Err(e);
            }
            let zero_copy = inner.sealing.is_none();
            if zero_copy {
                inner.sync_slabs(frame.staging());
            }
            inner
                .send_chunks(sh, peer, &mut frame.chunks(), zero_copy)
                .map_err(|e| inner.fail(sh, e))
        });
        sent.map_err(|source| TransportError::SendCheckpoint {
            epoch: frame.epoch(),
            generation: frame.generation(),
            len: frame.len(),
            source: Box::new(source),
        })
    }
}

impl Read for RdmaChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf).map_err(io::Error::from)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.recv_exact(buf).map_err(io::Error::from)
    }
}

impl Drop for RdmaChannel {
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else {
            return; // a clone
        };
        if let Some(mut ka) = inner.keepalive.take() {
            ka.stop();
        }
        let sh = &*self.shared;
        if !sh.is_shut() && !inner.broken && !inner.peer_gone {
            // An orderly end: the peer reads everything, then the end.
            let deadline = Some(Instant::now() + CLOSE_WAIT);
            let closed = inner
                .post_ctl(sh, self.peer, Ctl::Close, deadline)
                .and_then(|()| {
                    while inner.sq.used > 0 && !sh.is_shut() {
                        inner.block(sh, self.peer, deadline, "close", Some(CLOSE_WAIT))?;
                    }
                    Ok(())
                });
            if let Err(e) = closed {
                log::debug!("RDMA channel to {}: close: {e}", self.peer);
            }
        }
        // Queue pairs to the error state before the memory they use is
        // deregistered and unmapped (when `inner` drops, next).
        sh.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_request_ids_round_trip() {
        for tag in [
            Tag::Recv { slot: 0 },
            Tag::Recv { slot: u32::MAX },
            Tag::Data {
                slab: 63,
                retire: 9,
            },
            Tag::Credit { retire: 64 },
            Tag::Close { retire: 1 },
            Tag::Write,
        ] {
            assert_eq!(Tag::decode(tag.encode()), Some(tag), "{tag:?}");
        }
        assert_eq!(Tag::decode(5 << 40), None);
        assert_eq!(Tag::decode(2 << 40 | 1 << 16), None);
    }
}
