//! Heartbeats and failure detection.
//!
//! Heartbeats travel on their own small TCP connection (see
//! [`crate::connect_pair`]), so a large checkpoint in flight on the data
//! channel never delays one. Both sides run [`Heartbeat::start`]: a sender
//! thread writes a heartbeat frame ([`protocol::Heartbeat`], the protocol's
//! own fixed-size frame of kind `Heartbeat`) every `interval`, a receiver
//! thread reads the peer's and feeds a [`FailureDetector`], which declares
//! the peer lost ([`PeerLost`]):
//!
//! - at once when the connection breaks (EOF or an error);
//! - when no valid heartbeat arrived for `interval × k`;
//! - at once when the protocol's fencing rule ([`EpochFence::check`]) refuses
//!   a heartbeat's generation (DESIGN.md invariant I5: an old primary that
//!   comes back is fenced; its heartbeats are never taken as a sign of life,
//!   and a newer generation is a takeover notice that fences us).
//!
//! The VMM waits for the outcome cheaply: [`HeartbeatHandle::event_fd`]
//! becomes readable on failure (register it in the event loop), then
//! [`HeartbeatHandle::failure`] says why. [`HeartbeatHandle::wait_failure`]
//! blocks instead. After a failure the sender sends one last heartbeat (so a
//! fenced peer reads our generation before the end of the stream, rather
//! than a bare close it could take for "standby lost"), shuts the connection
//! down so the peer learns of the loss at once, and both threads end. A loss
//! declared from outside ([`FailureDetector::declare`]) is acted on at the
//! sender's next tick.
//!
//! Both threads ask for real-time scheduling (`SCHED_FIFO` at
//! [`HEARTBEAT_RT_PRIORITY`]) so that a host saturated by vCPUs, the
//! checkpoint stream or unrelated processes delays neither a heartbeat nor
//! its reading: silence must mean the peer, not our own run queue. Where that
//! is not permitted (no `CAP_SYS_NICE` and `RLIMIT_RTPRIO` 0) they run at
//! normal priority, with one warning per process. They sleep between
//! heartbeats, so they take a negligible share of a CPU either way.
//!
//! Liveness is judged from heartbeats only, not from progress on the data
//! channel: a checkpoint or an ack queued in socket buffers keeps arriving
//! after its sender froze, so data arriving is not a timely proof of life,
//! while a heartbeat frame is tiny and sent on its own connection.

use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::protocol::{
    self, BadHeartbeat, EpochFence, FenceError, Subject, HEARTBEAT_FRAME_LEN,
};
use socket2::SockRef;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::handshake::SessionId;
use crate::secure::{Opener, Sealer, SessionKeys, TAG_LEN};
use crate::tcp::{apply_options, TcpOptions};
use crate::wait::Readiness;
use crate::TransportError;

/// Why the peer was declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerLost {
    /// The connection ended (EOF, reset or another socket error).
    ConnectionClosed,
    /// No valid heartbeat for `interval × k`; `last_seen_ms` is how long ago
    /// the last one arrived (or the detector started, if none ever did).
    Silence {
        /// Milliseconds since the last valid heartbeat.
        last_seen_ms: u64,
    },
    /// The peer runs another generation (a fencing event, DESIGN.md I5, as
    /// [`EpochFence::check`] decides): `theirs < ours` is a stale peer that
    /// must not be trusted; `theirs > ours` means a failover happened without
    /// us: we are the stale side and must stop releasing output.
    GenerationMismatch {
        /// Our generation.
        ours: u64,
        /// The generation in the peer's heartbeat.
        theirs: u64,
    },
    /// The peer sent something that is not a heartbeat frame.
    BadMessage(BadHeartbeat),
    /// This side gave the pairing up (its checkpoint channel failed): the
    /// peer is told by the end of our heartbeats.
    GaveUp,
    /// A sealed heartbeat failed to open: altered, replayed, reordered or
    /// not from the key holder. Never acted on (not even as a fencing
    /// notice); the connection is lost.
    Forged {
        /// Which sealed heartbeat.
        record: u64,
    },
    /// The RDMA keepalive of `--transport rdma` failed: the counter the
    /// peer writes into our memory stopped changing, or writing ours into
    /// the peer's failed (see `crate::rdma`).
    Keepalive(KeepaliveLoss),
}

/// How the RDMA keepalive lost the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveLoss {
    /// The peer's counter did not change for `interval × k`.
    Silent {
        /// Milliseconds since it last changed.
        quiet_ms: u64,
    },
    /// An RDMA WRITE of our counter failed with this `ibv_wc_status`.
    WriteFailed {
        /// The completion status.
        status: u32,
    },
}

impl fmt::Display for PeerLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerLost::ConnectionClosed => write!(f, "heartbeat connection closed"),
            PeerLost::Silence { last_seen_ms } => {
                write!(f, "no heartbeat for {last_seen_ms} ms")
            }
            PeerLost::GenerationMismatch { ours, theirs } => {
                write!(
                    f,
                    "peer is at generation {theirs}, we are at {ours} (fenced)"
                )
            }
            PeerLost::BadMessage(why) => write!(f, "peer sent a bad heartbeat: {why}"),
            PeerLost::GaveUp => write!(f, "the checkpoint channel failed; pairing given up"),
            PeerLost::Forged { record } => write!(
                f,
                "heartbeat {record} failed authentication (altered, replayed or not from the key holder)"
            ),
            PeerLost::Keepalive(KeepaliveLoss::Silent { quiet_ms }) => {
                write!(f, "no RDMA keepalive from the peer for {quiet_ms} ms")
            }
            PeerLost::Keepalive(KeepaliveLoss::WriteFailed { status }) => write!(
                f,
                "RDMA keepalive write to the peer failed: {}",
                crate::rdma::wc_status_name(*status)
            ),
        }
    }
}

/// The heartbeat connection of a pair (see [`crate::connect_pair`] and
/// [`crate::ChannelListener::accept_pair`]).
#[derive(Debug)]
pub struct HeartbeatStream {
    stream: TcpStream,
    peer: SocketAddr,
    session: Option<SessionId>,
    /// Each heartbeat is sealed (and each received one opened) with these.
    keys: Option<Box<SessionKeys>>,
}

impl HeartbeatStream {
    pub(crate) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        session: Option<SessionId>,
        keys: Option<SessionKeys>,
    ) -> Result<HeartbeatStream, TransportError> {
        // Small messages: no Nagle, default buffers, keepalive off.
        let opts = TcpOptions {
            nodelay: true,
            send_buffer: None,
            recv_buffer: None,
        };
        apply_options(&stream, peer, &opts)?;
        Ok(HeartbeatStream {
            stream,
            peer,
            session,
            keys: keys.map(Box::new),
        })
    }

    /// Whether heartbeats on it are sealed (a keyed handshake).
    pub fn is_sealed(&self) -> bool {
        self.keys.is_some()
    }

    /// Uses an already connected stream for heartbeats (no handshake).
    pub fn from_tcp(stream: TcpStream) -> Result<HeartbeatStream, TransportError> {
        let peer = stream
            .peer_addr()
            .map_err(|source| TransportError::NoPeer { source })?;
        HeartbeatStream::new(stream, peer, None, None)
    }

    /// The session of the handshake that produced it, if any.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The other end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The underlying stream.
    pub fn as_tcp(&self) -> &TcpStream {
        &self.stream
    }

    /// Gives the underlying stream back.
    pub fn into_tcp(self) -> TcpStream {
        self.stream
    }
}

/// Decides, from heartbeats and their absence, whether the peer is alive.
///
/// Fed by the receiver thread of a [`HeartbeatHandle`]; other parts of the VMM
/// may [`declare`](FailureDetector::declare) a loss too (e.g. the checkpoint
/// channel broke), so there is one place, and one eventfd, to wait on.
/// The first declared loss wins and stays.
pub struct FailureDetector {
    /// Our generation; the rule every heartbeat is judged by.
    fence: EpochFence,
    timeout: Duration,
    started: Instant,
    /// Nanoseconds after `started` of the last valid heartbeat, plus one;
    /// 0: none yet.
    last_seen: AtomicU64,
    peer_epoch: AtomicU64,
    received: AtomicU64,
    /// Longest interval between two consecutive valid heartbeats, in ns.
    longest_gap: AtomicU64,
    failure: OnceLock<PeerLost>,
    /// Highest newer generation seen in a heartbeat (0: none), and the epoch
    /// it carried: a takeover notice, recorded even when another loss was
    /// declared first.
    fenced_by: AtomicU64,
    fence_epoch: AtomicU64,
    /// The receiver has read everything it will ever read.
    rx_done: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
    event: EventFd,
}

impl fmt::Debug for FailureDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailureDetector")
            .field("generation", &self.generation())
            .field("timeout", &self.timeout)
            .field("received", &self.heartbeats_received())
            .field("longest_gap", &self.longest_gap())
            .field("failure", &self.failure())
            .finish()
    }
}

impl FailureDetector {
    /// A detector for generation `generation` that declares silence after
    /// `timeout` without a valid heartbeat, counting from now.
    pub fn new(generation: u64, timeout: Duration) -> Result<FailureDetector, TransportError> {
        let event = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| TransportError::EventFd { source })?;
        Ok(FailureDetector {
            fence: EpochFence::new(generation),
            timeout,
            started: Instant::now(),
            last_seen: AtomicU64::new(0),
            peer_epoch: AtomicU64::new(0),
            received: AtomicU64::new(0),
            longest_gap: AtomicU64::new(0),
            failure: OnceLock::new(),
            fenced_by: AtomicU64::new(0),
            fence_epoch: AtomicU64::new(0),
            rx_done: AtomicBool::new(false),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            event,
        })
    }

    /// Our generation.
    pub fn generation(&self) -> u64 {
        self.fence.generation()
    }

    /// The silence that counts as a failure (`interval × k`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Why the peer was lost, once it was.
    pub fn failure(&self) -> Option<PeerLost> {
        self.failure.get().copied()
    }

    /// An eventfd that becomes readable (counter ≥ 1) when the peer is
    /// declared lost. Reading it resets it; [`FailureDetector::failure`]
    /// keeps the answer.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }

    /// Blocks until the peer is declared lost or `timeout` passes.
    pub fn wait_failure(&self, timeout: Duration) -> Option<PeerLost> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = self.failure() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self
                .cond
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Declares the peer lost. Returns false if it already was (the first
    /// reason stays).
    pub fn declare(&self, reason: PeerLost) -> bool {
        if self.failure.set(reason).is_err() {
            return false;
        }
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal the failure eventfd: {e}");
        }
        // Taking the lock orders this notify after any waiter's check.
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
        true
    }

    /// Takes in one heartbeat received at `now`. A heartbeat the fencing
    /// rule refuses is not liveness: it returns the verdict (which the caller
    /// declares), and a newer generation is recorded as a takeover notice
    /// ([`FailureDetector::fenced_by`]).
    pub fn observe(&self, msg: &protocol::Heartbeat, now: Instant) -> Result<(), PeerLost> {
        let subject = Subject::Heartbeat { epoch: msg.epoch };
        if let Err(refused) = self.fence.check(subject, msg.generation) {
            if let FenceError::Superseded { theirs, .. } = refused {
                self.fence_epoch.store(msg.epoch, Ordering::Release);
                self.fenced_by.fetch_max(theirs, Ordering::AcqRel);
            }
            return Err(PeerLost::GenerationMismatch {
                ours: self.generation(),
                theirs: msg.generation,
            });
        }
        let ns = now.saturating_duration_since(self.started).as_nanos() as u64 + 1;
        let before = self.last_seen.fetch_max(ns, Ordering::AcqRel);
        if before != 0 && ns > before {
            self.longest_gap.fetch_max(ns - before, Ordering::AcqRel);
        }
        self.peer_epoch.store(msg.epoch, Ordering::Release);
        self.received.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The newer generation (and the epoch it announced) of a takeover
    /// notice the peer sent, if one arrived — whatever loss was declared
    /// first. A primary that finds one is fenced (DESIGN I5).
    pub fn fenced_by(&self) -> Option<(u64, u64)> {
        match self.fenced_by.load(Ordering::Acquire) {
            0 => None,
            g => Some((g, self.fence_epoch.load(Ordering::Acquire))),
        }
    }

    /// Waits at most `timeout` until the receiver has read all the peer
    /// will ever send (end of stream, silence, or stop); true if it has.
    pub fn wait_receiver_done(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.rx_done.load(Ordering::Acquire) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .cond
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Records that the receiver has ended, waking [`Self::wait_receiver_done`].
    fn receiver_done(&self) {
        self.rx_done.store(true, Ordering::Release);
        // Taking the lock orders this notify after any waiter's check.
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cond.notify_all();
    }

    /// When the peer was last heard from (or the detector started).
    fn last_alive(&self) -> Instant {
        match self.last_seen.load(Ordering::Acquire) {
            0 => self.started,
            ns => self.started + Duration::from_nanos(ns - 1),
        }
    }

    /// The instant at which silence becomes a failure.
    pub fn silence_deadline(&self) -> Instant {
        self.last_alive() + self.timeout
    }

    /// `Some(Silence)` if nothing valid arrived for the timeout by `now`.
    pub fn check_silence(&self, now: Instant) -> Option<PeerLost> {
        let quiet = now.saturating_duration_since(self.last_alive());
        (quiet >= self.timeout).then_some(PeerLost::Silence {
            last_seen_ms: quiet.as_millis() as u64,
        })
    }

    /// When the last valid heartbeat arrived, if any did.
    pub fn last_seen(&self) -> Option<Instant> {
        (self.last_seen.load(Ordering::Acquire) != 0).then_some(self.last_alive())
    }

    /// The epoch in the peer's latest valid heartbeat (0 before the first).
    pub fn peer_epoch(&self) -> u64 {
        self.peer_epoch.load(Ordering::Acquire)
    }

    /// Valid heartbeats received so far.
    pub fn heartbeats_received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// The longest time between two consecutive valid heartbeats so far
    /// (zero before the second): how close the peer came to being declared
    /// silent.
    pub fn longest_gap(&self) -> Duration {
        Duration::from_nanos(self.longest_gap.load(Ordering::Acquire))
    }
}

/// The `SCHED_FIFO` priority of the heartbeat threads: above every normal
/// (`SCHED_OTHER`) thread, such as vCPUs and the checkpoint stream, and low
/// among real-time ones, below the kernel's own threads and whatever the
/// host's operator put there.
pub const HEARTBEAT_RT_PRIORITY: i32 = 10;

/// Puts the calling thread in `SCHED_FIFO` at [`HEARTBEAT_RT_PRIORITY`];
/// true if it is. Warns once per process when not permitted.
pub(crate) fn raise_to_realtime(what: &str) -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let param = libc::sched_param {
        sched_priority: HEARTBEAT_RT_PRIORITY,
    };
    // SAFETY: pthread_self() is always a valid handle for the calling
    // thread, and `param` is a live, initialised sched_param the call only
    // reads for its duration.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        return true;
    }
    if !WARNED.swap(true, Ordering::AcqRel) {
        log::warn!(
            "heartbeat {what} thread cannot use real-time priority (SCHED_FIFO {}): {}; \
             heartbeats run at normal priority and may be delayed on a saturated host",
            HEARTBEAT_RT_PRIORITY,
            io::Error::from_raw_os_error(rc)
        );
    }
    false
}

/// Starts heartbeats on a connection; see [`Heartbeat::start`].
#[derive(Debug)]
pub enum Heartbeat {}

impl Heartbeat {
    /// Spawns a sender thread (one heartbeat every `interval`, carrying
    /// `generation` and the epoch set by [`HeartbeatHandle::set_epoch`]) and a
    /// receiver thread that declares the peer lost when the connection breaks
    /// or nothing valid arrives for `interval × k` (`k` is at least 1).
    pub fn start(
        stream: HeartbeatStream,
        interval: Duration,
        k: u32,
        generation: u64,
    ) -> Result<HeartbeatHandle, TransportError> {
        let interval = interval.max(Duration::from_millis(1));
        let timeout = interval.saturating_mul(k.max(1));
        let peer = stream.peer;
        let (sealer, opener) = stream.keys.map(|k| (k.tx, k.rx)).unzip();
        let detector = Arc::new(FailureDetector::new(generation, timeout)?);
        let epoch = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(StopFlag::default());
        let clone = |s: &TcpStream| {
            s.try_clone()
                .map_err(|source| TransportError::Clone { addr: peer, source })
        };
        let (tx_stream, rx_stream) = (clone(&stream.stream)?, clone(&stream.stream)?);
        // The receiver waits for data or its silence deadline in epoll.
        let rx_ready = Readiness::new(rx_stream.as_raw_fd(), EventSet::IN)
            .map_err(|source| TransportError::Wait { addr: peer, source })?;
        // The sender never blocks longer than this on a full socket buffer, so
        // it notices `stop` even if the peer stopped reading.
        let write_tick = interval.min(Duration::from_millis(100));
        tx_stream
            .set_write_timeout(Some(write_tick))
            .map_err(|source| TransportError::SocketOption {
                addr: peer,
                option: "SO_SNDTIMEO",
                source,
            })?;
        // The receiver reads only once epoll says there is data; this bounds
        // a read after a spurious wakeup, so it still notices its deadline.
        rx_stream
            .set_read_timeout(Some(write_tick))
            .map_err(|source| TransportError::SocketOption {
                addr: peer,
                option: "SO_RCVTIMEO",
                source,
            })?;

        let successor = Arc::new(AtomicU64::new(0));
        let sender = {
            let (detector, epoch, stop) = (detector.clone(), epoch.clone(), stop.clone());
            let successor = successor.clone();
            thread::Builder::new()
                .name("ft-hb-send".into())
                .spawn(move || {
                    raise_to_realtime("sender");
                    let gens = Generations {
                        ours: generation,
                        successor: &successor,
                    };
                    send_loop(
                        tx_stream, sealer, peer, interval, gens, &epoch, &detector, &stop,
                    )
                })
                .map_err(|source| TransportError::Spawn {
                    what: "sender",
                    source,
                })?
        };
        let receiver = {
            let (detector, stop) = (detector.clone(), stop.clone());
            thread::Builder::new()
                .name("ft-hb-recv".into())
                .spawn(move || {
                    raise_to_realtime("receiver");
                    recv_loop(
                        rx_stream, opener, rx_ready, peer, interval, &detector, &stop,
                    )
                })
        };
        let receiver = match receiver {
            Ok(r) => r,
            Err(source) => {
                stop.raise();
                let _ = stream.stream.shutdown(Shutdown::Both);
                let _ = sender.join();
                return Err(TransportError::Spawn {
                    what: "receiver",
                    source,
                });
            }
        };
        Ok(HeartbeatHandle {
            detector,
            epoch,
            successor,
            stop,
            stream: stream.stream,
            peer,
            threads: Some((sender, receiver)),
        })
    }
}

/// Wakes the sender: to stop, or to say goodbye after a failure.
#[derive(Default)]
struct StopFlag {
    /// (stopped, poked)
    state: Mutex<(bool, bool)>,
    cond: Condvar,
}

impl StopFlag {
    fn raise(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.cond.notify_all();
    }

    /// Wakes a sleeping sender without stopping it.
    fn poke(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cond.notify_all();
    }

    fn is_raised(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Sleeps until `until`, a stop or a poke; true if stopped.
    fn wait_until(&self, until: Instant) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.0 {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if g.1 || left.is_zero() {
                g.1 = false;
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Sends a heartbeat every `interval` until stopped. Once the peer has been
/// declared lost it sends one last heartbeat, so a fenced peer reads our
/// generation before the end of the stream, then shuts the connection down
/// (the peer learns of the loss at once) and ends.
/// Our generation, and the one our farewell announces if set.
struct Generations<'a> {
    ours: u64,
    successor: &'a AtomicU64,
}

#[allow(clippy::too_many_arguments)]
fn send_loop(
    stream: TcpStream,
    mut sealer: Option<Sealer>,
    peer: SocketAddr,
    interval: Duration,
    gens: Generations<'_>,
    epoch: &AtomicU64,
    detector: &FailureDetector,
    stop: &StopFlag,
) {
    let socket = SockRef::from(&stream);
    let mut next = Instant::now();
    for seq in 0u64.. {
        if stop.is_raised() {
            return;
        }
        let farewell = detector.failure().is_some();
        let successor = gens.successor.load(Ordering::Acquire);
        let generation = if farewell && successor != 0 {
            successor
        } else {
            gens.ours
        };
        let frame = protocol::Heartbeat {
            generation,
            epoch: epoch.load(Ordering::Acquire),
            seq,
        }
        .encode_frame();
        let mut sealed = [0u8; HEARTBEAT_FRAME_LEN + TAG_LEN];
        sealed[..HEARTBEAT_FRAME_LEN].copy_from_slice(&frame);
        let msg = match sealer.as_mut() {
            Some(sealer) => {
                let tag = sealer.seal(&[], &mut sealed[..HEARTBEAT_FRAME_LEN]);
                sealed[HEARTBEAT_FRAME_LEN..].copy_from_slice(&tag);
                &sealed[..]
            }
            None => &sealed[..HEARTBEAT_FRAME_LEN],
        };
        let mut sent = 0;
        while sent < msg.len() {
            // MSG_NOSIGNAL: a peer that went away is EPIPE, not SIGPIPE.
            match socket.send_with_flags(&msg[sent..], libc::MSG_NOSIGNAL) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full buffer (SO_SNDTIMEO expired): the receiver side judges
                // liveness; we keep trying (a half-sent heartbeat must be
                // finished) until stopped or the peer is lost.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stop.is_raised() {
                        return;
                    }
                    if detector.failure().is_some() {
                        break;
                    }
                }
                Err(e) => {
                    if !stop.is_raised() && detector.declare(PeerLost::ConnectionClosed) {
                        log::warn!("heartbeat to {peer} failed: {e}; peer lost");
                    }
                    break;
                }
            }
        }
        if farewell {
            // Only our direction: the receiver still reads what the peer
            // sent before it went, which may be its takeover notice.
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        if detector.failure().is_some() {
            // Lost while this heartbeat went out: say goodbye now.
            continue;
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now; // we fell behind (a stall): do not burst
        }
        if stop.wait_until(next) {
            return;
        }
    }
}

/// Marks the receiver done however it ends.
struct RxDone<'a>(&'a FailureDetector);

impl Drop for RxDone<'_> {
    fn drop(&mut self) {
        self.0.receiver_done();
    }
}

/// Logs each new longest gap between heartbeats (a handful over a run: the
/// records of a random sequence); a warning once it reaches half the
/// timeout, a near miss.
struct GapLog<'a> {
    peer: SocketAddr,
    interval: Duration,
    detector: &'a FailureDetector,
    logged: Duration,
}

impl GapLog<'_> {
    fn heard(&mut self) {
        let gap = self.detector.longest_gap();
        if gap <= self.logged {
            return;
        }
        self.logged = gap;
        let (gap_ms, timeout) = (gap.as_secs_f64() * 1e3, self.detector.timeout());
        if gap * 2 >= timeout {
            log::warn!(
                "heartbeat from {}: longest gap {gap_ms:.1} ms (interval {} ms, lost after {} ms)",
                self.peer,
                self.interval.as_millis(),
                timeout.as_millis()
            );
        } else {
            log::info!(
                "heartbeat from {}: longest gap {gap_ms:.1} ms (interval {} ms, lost after {} ms)",
                self.peer,
                self.interval.as_millis(),
                timeout.as_millis()
            );
        }
    }
}

impl Drop for GapLog<'_> {
    fn drop(&mut self) {
        log::info!(
            "heartbeats from {}: {} received, longest gap {:.1} ms",
            self.peer,
            self.detector.heartbeats_received(),
            self.detector.longest_gap().as_secs_f64() * 1e3
        );
    }
}

fn recv_loop(
    mut stream: TcpStream,
    mut opener: Option<Opener>,
    mut ready: Readiness,
    peer: SocketAddr,
    interval: Duration,
    detector: &FailureDetector,
    stop: &StopFlag,
) {
    let _done = RxDone(detector);
    let mut gaps = GapLog {
        peer,
        interval,
        detector,
        logged: Duration::ZERO,
    };
    // A sealed heartbeat is the frame's ciphertext and its tag.
    let frame_len = HEARTBEAT_FRAME_LEN + if opener.is_some() { TAG_LEN } else { 0 };
    let mut buf = [0u8; HEARTBEAT_FRAME_LEN + TAG_LEN];
    let mut got = 0;
    let verdict = loop {
        if stop.is_raised() {
            return;
        }
        let now = Instant::now();
        let deadline = match detector.check_silence(now) {
            // Past the deadline. Our own stall (descheduled, stopped, a
            // debugger) looks just like the peer's silence: judge only after
            // reading what already arrived, which may be a fencing notice.
            Some(silence) => match ready.wait_until(Some(now)) {
                Ok(true) => now,
                _ => break silence,
            },
            None => detector.silence_deadline(),
        };
        // Wait for data or the silence deadline (a timerfd: precise).
        match ready.wait_until(Some(deadline)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::warn!("cannot wait on the heartbeat connection to {peer}: {e}");
                break PeerLost::ConnectionClosed;
            }
        }
        // Readable, so this returns at once (SO_RCVTIMEO bounds a spurious
        // wakeup; the sender's clone never reads).
        match stream.read(&mut buf[got..frame_len]) {
            Ok(0) => break PeerLost::ConnectionClosed,
            Ok(n) => {
                got += n;
                if got == frame_len {
                    got = 0;
                    if let Some(opener) = opener.as_mut() {
                        let (frame, tag) = buf.split_at_mut(HEARTBEAT_FRAME_LEN);
                        let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("TAG_LEN bytes");
                        if let Err(bad) = opener.open(&[], frame, tag) {
                            break PeerLost::Forged {
                                record: bad.counter,
                            };
                        }
                    }
                    let frame: &[u8; HEARTBEAT_FRAME_LEN] = (&buf[..HEARTBEAT_FRAME_LEN])
                        .try_into()
                        .expect("frame length");
                    match protocol::Heartbeat::decode_frame(frame) {
                        Ok(msg) => {
                            if let Err(fenced) = detector.observe(&msg, Instant::now()) {
                                break fenced;
                            }
                            gaps.heard();
                        }
                        Err(bad) => break PeerLost::BadMessage(bad),
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("heartbeat from {peer}: {e}");
                break PeerLost::ConnectionClosed;
            }
        }
    };
    // A stop shuts the socket down, which reads as EOF: not a failure.
    if stop.is_raised() {
        return;
    }
    if detector.declare(verdict) {
        log::warn!("peer {peer} lost: {verdict}");
    }
    // The sender says goodbye and shuts the connection down.
    stop.poke();
}

/// Running heartbeats; stopping (or dropping) it joins both threads and shuts
/// the connection down, in bounded time (no wait on the peer).
pub struct HeartbeatHandle {
    detector: Arc<FailureDetector>,
    epoch: Arc<AtomicU64>,
    /// Generation the farewell heartbeat announces (0: our own).
    successor: Arc<AtomicU64>,
    stop: Arc<StopFlag>,
    stream: TcpStream,
    peer: SocketAddr,
    threads: Option<(JoinHandle<()>, JoinHandle<()>)>,
}

impl fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatHandle")
            .field("peer", &self.peer)
            .field("epoch", &self.epoch())
            .field("detector", &self.detector)
            .finish()
    }
}

impl HeartbeatHandle {
    /// Sets the epoch our next heartbeats advertise (lock-free).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The epoch we advertise.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The epoch the peer advertises (its latest valid heartbeat).
    pub fn peer_epoch(&self) -> u64 {
        self.detector.peer_epoch()
    }

    /// Why the peer was lost, once it was.
    pub fn failure(&self) -> Option<PeerLost> {
        self.detector.failure()
    }

    /// Readable once the peer is lost; see [`FailureDetector::event_fd`].
    pub fn event_fd(&self) -> &EventFd {
        self.detector.event_fd()
    }

    /// Blocks until the peer is lost or `timeout` passes.
    pub fn wait_failure(&self, timeout: Duration) -> Option<PeerLost> {
        self.detector.wait_failure(timeout)
    }

    /// The detector, to share with code that may declare a loss itself.
    pub fn detector(&self) -> &Arc<FailureDetector> {
        &self.detector
    }

    /// The other end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Stops both threads, shuts the connection down and joins them.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    /// Sets the generation that this side's farewell heartbeat (sent once
    /// the peer is declared lost) announces instead of its own. A standby
    /// sets it to generation + 1 once it holds a committed checkpoint: from
    /// then on, losing the primary means taking over, and the farewell is
    /// the fencing notice an old primary that is still alive reads before
    /// the end of the stream (DESIGN I5).
    pub fn set_successor_generation(&self, generation: u64) {
        self.successor.store(generation, Ordering::Release);
    }

    /// Ends heartbeating with the fencing notice: the farewell carries
    /// `new_generation` (see [`HeartbeatHandle::set_successor_generation`]);
    /// returns once it was sent (or the connection was already gone) and both
    /// threads are joined.
    pub fn announce_takeover(mut self, new_generation: u64) {
        self.set_successor_generation(new_generation);
        if self.detector.declare(PeerLost::ConnectionClosed) {
            log::debug!(
                "heartbeat to {}: taking over as generation {new_generation}",
                self.peer
            );
        }
        self.stop.poke();
        if let Some((sender, receiver)) = self.threads.take() {
            // The sender says goodbye with the new generation and ends.
            if sender.join().is_err() {
                log::error!("heartbeat sender thread for {} panicked", self.peer);
            }
            self.stop.raise();
            let _ = self.stream.shutdown(Shutdown::Both);
            if receiver.join().is_err() {
                log::error!("heartbeat receiver thread for {} panicked", self.peer);
            }
        }
    }

    fn stop_inner(&mut self) {
        let Some((sender, receiver)) = self.threads.take() else {
            return;
        };
        self.stop.raise();
        // Wakes a receiver blocked in read() and a sender blocked in send().
        let _ = self.stream.shutdown(Shutdown::Both);
        for (name, t) in [("sender", sender), ("receiver", receiver)] {
            if t.join().is_err() {
                log::error!("heartbeat {name} thread for {} panicked", self.peer);
            }
        }
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::tcp_pair;
    use ftvmm_checkpoint::protocol::HeaderError;
    use std::io::{Read, Write};

    const HB: Duration = Duration::from_millis(20);

    fn poll_readable_now(fd: &EventFd) -> bool {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        epoll.wait(0, &mut [EpollEvent::default()]).unwrap() == 1
    }

    fn start(s: TcpStream, interval: Duration, k: u32, generation: u64) -> HeartbeatHandle {
        Heartbeat::start(
            HeartbeatStream::from_tcp(s).unwrap(),
            interval,
            k,
            generation,
        )
        .unwrap()
    }

    /// Waits (bounded) until `f` holds.
    fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn detector_logic_without_threads() {
        let d = FailureDetector::new(5, Duration::from_millis(100)).unwrap();
        let t0 = Instant::now();
        assert_eq!(d.check_silence(t0), None);
        d.observe(
            &protocol::Heartbeat {
                generation: 5,
                epoch: 1,
                seq: 0,
            },
            t0 + Duration::from_millis(80),
        )
        .unwrap();
        assert_eq!(d.check_silence(t0 + Duration::from_millis(150)), None);
        assert_eq!(d.longest_gap(), Duration::ZERO, "one heartbeat has no gap");
        let hb = |seq| protocol::Heartbeat {
            generation: 5,
            epoch: 1,
            seq,
        };
        d.observe(&hb(1), t0 + Duration::from_millis(110)).unwrap();
        d.observe(&hb(2), t0 + Duration::from_millis(130)).unwrap();
        assert_eq!(d.longest_gap(), Duration::from_millis(30));
        d.observe(&hb(3), t0 + Duration::from_millis(80)).unwrap();
        assert_eq!(
            d.longest_gap(),
            Duration::from_millis(30),
            "late, not a gap"
        );
        // The last valid heartbeat is now 50 ms later than before.
        let t0 = t0 + Duration::from_millis(50);
        match d.check_silence(t0 + Duration::from_millis(200)) {
            Some(PeerLost::Silence { last_seen_ms }) => {
                assert!((100..=125).contains(&last_seen_ms))
            }
            other => panic!("{other:?}"),
        }
        // Older generation: fencing, and not liveness.
        let before = d.last_seen();
        assert_eq!(
            d.observe(
                &protocol::Heartbeat {
                    generation: 4,
                    epoch: 7,
                    seq: 1
                },
                t0 + Duration::from_millis(190)
            ),
            Err(PeerLost::GenerationMismatch { ours: 5, theirs: 4 })
        );
        assert_eq!(d.last_seen(), before);
        assert_eq!(d.peer_epoch(), 1);
        // First declared reason wins; the eventfd fires once.
        assert!(!poll_readable_now(d.event_fd()));
        assert!(d.declare(PeerLost::ConnectionClosed));
        assert!(!d.declare(PeerLost::Silence { last_seen_ms: 1 }));
        assert_eq!(d.failure(), Some(PeerLost::ConnectionClosed));
        assert!(poll_readable_now(d.event_fd()));
        assert_eq!(
            d.wait_failure(Duration::ZERO),
            Some(PeerLost::ConnectionClosed)
        );
    }

    #[test]
    fn heartbeat_threads_are_real_time_where_permitted() {
        let t = thread::spawn(|| {
            let raised = raise_to_realtime("test");
            // SAFETY: sched_getscheduler(0) only queries the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            (raised, policy)
        });
        let (raised, policy) = t.join().unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(raised, "root may use SCHED_FIFO");
        }
        let want = if raised {
            libc::SCHED_FIFO
        } else {
            libc::SCHED_OTHER
        };
        assert_eq!(policy, want);
    }

    #[test]
    fn healthy_peers_exchange_epochs_and_stay_alive() {
        let (a, b) = tcp_pair();
        let ha = start(a, HB, 5, 1);
        let hb = start(b, HB, 5, 1);
        ha.set_epoch(41);
        hb.set_epoch(7);
        eventually("epochs to cross", Duration::from_secs(5), || {
            ha.peer_epoch() == 7 && hb.peer_epoch() == 41
        });
        // Many intervals × k later, still no failure.
        assert_eq!(ha.wait_failure(HB * 5 * 4), None);
        assert_eq!(hb.failure(), None);
        assert!(ha.detector().heartbeats_received() >= 10);
        assert!(!poll_readable_now(ha.event_fd()));
    }

    #[test]
    fn silence_is_detected_within_interval_times_k() {
        // The peer sends one heartbeat, then nothing, but keeps the socket open.
        let (a, mut b) = tcp_pair();
        let (interval, k) = (Duration::from_millis(30), 4);
        let timeout = interval * k;
        let h = start(a, interval, k, 9);
        b.write_all(
            &protocol::Heartbeat {
                generation: 9,
                epoch: 3,
                seq: 0,
            }
            .encode_frame(),
        )
        .unwrap();
        eventually("the one heartbeat", Duration::from_secs(5), || {
            h.detector().heartbeats_received() == 1
        });
        let heard = h.detector().last_seen().unwrap();
        let lost = h
            .wait_failure(Duration::from_secs(5))
            .expect("silence must be detected");
        let after = heard.elapsed();
        match lost {
            PeerLost::Silence { last_seen_ms } => {
                assert!(last_seen_ms >= timeout.as_millis() as u64, "{last_seen_ms}")
            }
            other => panic!("expected Silence, got {other:?}"),
        }
        assert!(
            after >= timeout,
            "declared after {after:?}, before {timeout:?}"
        );
        assert!(
            after < timeout + Duration::from_millis(500),
            "declared late: {after:?}"
        );
        assert!(poll_readable_now(h.event_fd()));
        assert_eq!(h.peer_epoch(), 3);
        // We shut the connection down, so the silent peer learns it at once.
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = Vec::new();
        let _ = b.read_to_end(&mut sink);
        assert_eq!(sink.len() % HEARTBEAT_FRAME_LEN, 0);
    }

    #[test]
    fn connection_close_is_immediate() {
        let (a, b) = tcp_pair();
        // A long timeout, so only the close itself can explain a quick verdict.
        let h = start(a, Duration::from_millis(500), 20, 1);
        let t0 = Instant::now();
        drop(b);
        assert_eq!(
            h.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::ConnectionClosed)
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn peer_stopping_its_heartbeats_is_seen_as_closed() {
        let (a, b) = tcp_pair();
        let ha = start(a, Duration::from_millis(500), 20, 1);
        let hb = start(b, Duration::from_millis(500), 20, 1);
        let t0 = Instant::now();
        hb.stop();
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t0.elapsed()
        );
        assert_eq!(
            ha.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::ConnectionClosed)
        );
    }

    #[test]
    fn older_generation_heartbeats_are_fencing_not_liveness() {
        let (a, mut b) = tcp_pair();
        let h = start(a, HB, 5, 5);
        // The stale peer (generation 4) keeps sending.
        for seq in 0..3 {
            let _ = b.write_all(
                &protocol::Heartbeat {
                    generation: 4,
                    epoch: 100,
                    seq,
                }
                .encode_frame(),
            );
        }
        assert_eq!(
            h.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::GenerationMismatch { ours: 5, theirs: 4 })
        );
        assert_eq!(h.detector().heartbeats_received(), 0);
        assert_eq!(h.detector().last_seen(), None);
        assert_eq!(h.peer_epoch(), 0, "a fenced peer's epoch must not be taken");
    }

    #[test]
    fn newer_generation_fences_us() {
        let (a, mut b) = tcp_pair();
        let old_primary = start(a, HB, 5, 2);
        b.write_all(
            &protocol::Heartbeat {
                generation: 3,
                epoch: 50,
                seq: 0,
            }
            .encode_frame(),
        )
        .unwrap();
        assert_eq!(
            old_primary.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::GenerationMismatch { ours: 2, theirs: 3 })
        );
        assert_eq!(old_primary.detector().heartbeats_received(), 0);
    }

    #[test]
    fn both_sides_of_a_generation_split_see_the_mismatch_not_a_close() {
        // Whichever side reads the other's heartbeat first, the other side
        // still reads a heartbeat before the end of the stream: a stale
        // primary must learn it is fenced, not merely "standby lost".
        for _ in 0..20 {
            let (a, b) = tcp_pair();
            let old_primary = start(a, HB, 5, 2);
            let new_primary = start(b, HB, 5, 3);
            assert_eq!(
                old_primary.wait_failure(Duration::from_secs(5)),
                Some(PeerLost::GenerationMismatch { ours: 2, theirs: 3 })
            );
            assert_eq!(
                new_primary.wait_failure(Duration::from_secs(5)),
                Some(PeerLost::GenerationMismatch { ours: 3, theirs: 2 })
            );
        }
    }

    #[test]
    fn garbage_on_the_heartbeat_connection_is_a_bad_message() {
        let (a, mut b) = tcp_pair();
        let h = start(a, HB, 5, 1);
        b.write_all(&[0xAB; HEARTBEAT_FRAME_LEN]).unwrap();
        assert_eq!(
            h.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::BadMessage(BadHeartbeat::Header(
                HeaderError::BadMagic { got: [0xAB; 4] }
            )))
        );
    }

    #[test]
    fn another_frame_kind_on_the_heartbeat_connection_is_a_bad_message() {
        let (a, mut b) = tcp_pair();
        let h = start(a, HB, 5, 1);
        // A well-formed Ack frame (36 bytes), then padding to a heartbeat's size.
        let mut ack = Vec::new();
        ftvmm_checkpoint::wire::encode_message(
            &ftvmm_checkpoint::Message::Ack(ftvmm_checkpoint::wire::Ack {
                epoch: 3,
                generation: 1,
            }),
            &mut ack,
        )
        .unwrap();
        ack.resize(HEARTBEAT_FRAME_LEN, 0);
        b.write_all(&ack).unwrap();
        assert_eq!(
            h.wait_failure(Duration::from_secs(5)),
            Some(PeerLost::BadMessage(BadHeartbeat::Kind {
                kind: ftvmm_checkpoint::protocol::FrameKind::Ack
            }))
        );
        assert_eq!(h.detector().heartbeats_received(), 0);
    }

    #[test]
    fn stop_is_bounded_even_with_a_long_interval() {
        let (a, _b) = tcp_pair();
        let h = start(a, Duration::from_secs(30), 3, 1);
        let t0 = Instant::now();
        drop(h);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn a_data_channel_failure_can_be_declared_on_the_same_detector() {
        let (a, _b) = tcp_pair();
        let h = start(a, Duration::from_secs(1), 10, 1);
        let d = h.detector().clone();
        let waiter = thread::spawn(move || d.wait_failure(Duration::from_secs(5)));
        h.detector().declare(PeerLost::ConnectionClosed);
        assert_eq!(waiter.join().unwrap(), Some(PeerLost::ConnectionClosed));
        assert!(poll_readable_now(h.event_fd()));
    }
}
