//! The TCP implementation of [`Channel`], and its listener.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::SockRef;
use vmm_sys_util::epoll::EventSet;

use crate::channel::{write_all_chunks, Channel};
use crate::handshake::{PendingHalf, SessionId};
use crate::wait::Readiness;
use crate::TransportError;

/// Default socket buffer size asked for on checkpoint channels. The kernel
/// caps it at `net.core.wmem_max` / `net.core.rmem_max` (and reports twice
/// the granted value); [`TcpChannel::buffer_sizes`] tells what was granted.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// Most bytes one `sendmsg(2)` of a gather send offers (see `send_some`):
/// a staging slab.
pub const MAX_SEND_BYTES: usize = 1 << 20;

/// Socket settings applied to a checkpoint channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// `TCP_NODELAY` (on by default: an ack or the tail of a checkpoint must
    /// not wait for Nagle).
    pub nodelay: bool,
    /// `SO_SNDBUF` to ask for; `None` keeps the kernel's auto-tuning.
    pub send_buffer: Option<usize>,
    /// `SO_RCVBUF` to ask for; `None` keeps the kernel's auto-tuning.
    pub recv_buffer: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            nodelay: true,
            send_buffer: Some(DEFAULT_SOCKET_BUFFER),
            recv_buffer: Some(DEFAULT_SOCKET_BUFFER),
        }
    }
}

/// Counters of one channel's sends (since it was created or cloned).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStats {
    /// Bytes handed to the kernel.
    pub bytes_sent: u64,
    /// `sendmsg(2)` calls that made progress.
    pub send_calls: u64,
    /// Of those, the calls that took less than offered (partial writes).
    pub short_writes: u64,
    /// Times a send found the socket buffer full and waited for room.
    pub send_waits: u64,
}

/// A checkpoint channel over TCP.
pub struct TcpChannel {
    stream: TcpStream,
    /// Waits for room in a full socket buffer; made on the first such wait.
    out_ready: Option<Readiness>,
    peer: SocketAddr,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    session: Option<SessionId>,
    stats: ChannelStats,
}

impl std::fmt::Debug for TcpChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpChannel")
            .field("peer", &self.peer)
            .field("fd", &self.stream.as_raw_fd())
            .field("session", &self.session)
            .finish()
    }
}

/// Resolves `addr` to its socket addresses, with an error naming it.
pub(crate) fn resolve<A: ToSocketAddrs + std::fmt::Display>(
    addr: &A,
) -> Result<Vec<SocketAddr>, TransportError> {
    let list: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    if list.is_empty() {
        return Err(TransportError::NoAddress {
            addr: addr.to_string(),
        });
    }
    Ok(list)
}

/// Connects to the first address of `addrs` that answers before `deadline`.
pub(crate) fn connect_stream(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), TransportError> {
    let mut last = None;
    for &sa in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = Some(TransportError::Connect {
                addr: sa,
                source: io::Error::from(io::ErrorKind::TimedOut),
            });
            break;
        }
        match TcpStream::connect_timeout(&sa, left) {
            Ok(s) => return Ok((s, sa)),
            Err(source) => last = Some(TransportError::Connect { addr: sa, source }),
        }
    }
    Err(last.expect("resolve() never returns an empty list"))
}

impl TcpChannel {
    /// Connects to `addr` (`HOST:PORT` or a `SocketAddr`) within `timeout`,
    /// with the default [`TcpOptions`].
    pub fn connect<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
        timeout: Duration,
    ) -> Result<TcpChannel, TransportError> {
        Self::connect_with(addr, timeout, &TcpOptions::default())
    }

    /// Connects to `addr` within `timeout` with the given socket options.
    pub fn connect_with<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
        timeout: Duration,
        options: &TcpOptions,
    ) -> Result<TcpChannel, TransportError> {
        let addrs = resolve(&addr)?;
        let (stream, peer) = connect_stream(&addrs, Instant::now() + timeout)?;
        TcpChannel::from_stream(stream, peer, options)
    }

    /// Wraps a connected stream, applying `options` (and turning TCP
    /// keepalive off: heartbeats detect failures, see [`crate::Heartbeat`]).
    pub fn from_stream(
        stream: TcpStream,
        peer: SocketAddr,
        options: &TcpOptions,
    ) -> Result<TcpChannel, TransportError> {
        apply_options(&stream, peer, options)?;
        Ok(TcpChannel {
            stream,
            out_ready: None,
            peer,
            read_timeout: None,
            write_timeout: None,
            session: None,
            stats: ChannelStats::default(),
        })
    }

    pub(crate) fn set_session(&mut self, session: SessionId) {
        self.session = Some(session);
    }

    /// The session id of the handshake that paired this channel with its
    /// heartbeat connection, if it came from one.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// Send counters since this handle was created.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// The socket buffer sizes the kernel granted (`SO_SNDBUF`, `SO_RCVBUF`;
    /// as the kernel reports them, i.e. including its bookkeeping share).
    pub fn buffer_sizes(&self) -> Result<(usize, usize), TransportError> {
        let socket = SockRef::from(&self.stream);
        let snd = socket
            .send_buffer_size()
            .map_err(|source| self.opt_err("SO_SNDBUF", source))?;
        let rcv = socket
            .recv_buffer_size()
            .map_err(|source| self.opt_err("SO_RCVBUF", source))?;
        Ok((snd, rcv))
    }

    /// The underlying stream (for polling its fd; do not read or write it
    /// behind the channel's back while framed traffic is in flight).
    pub fn as_tcp(&self) -> &TcpStream {
        &self.stream
    }

    fn opt_err(&self, option: &'static str, source: io::Error) -> TransportError {
        TransportError::SocketOption {
            addr: self.peer,
            option,
            source,
        }
    }

    fn recv_err(&self, source: io::Error) -> TransportError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
                addr: self.peer,
                op: "receive from",
                after: self.read_timeout.unwrap_or_default(),
            },
            _ => TransportError::Recv {
                addr: self.peer,
                source,
            },
        }
    }
}

impl Channel for TcpChannel {
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        let (stream, ready) = (&self.stream, &mut self.out_ready);
        let no_progress_limit = self.write_timeout;
        let (mut sent, mut waits) = (0usize, 0u64);
        let res = write_all_chunks(chunks, |iov| {
            let r = send_some(stream, ready, iov, no_progress_limit, &mut waits);
            if let Ok(n) = r {
                sent += n;
            }
            r
        });
        self.stats.send_waits += waits;
        match res {
            Ok(out) => {
                self.stats.bytes_sent += out.bytes;
                self.stats.send_calls += out.calls;
                self.stats.short_writes += out.short;
                Ok(out.bytes)
            }
            Err(source) => {
                self.stats.bytes_sent += sent as u64;
                Err(match source.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        TransportError::Timeout {
                            addr: self.peer,
                            op: "send to",
                            after: self.write_timeout.unwrap_or_default(),
                        }
                    }
                    _ => TransportError::Send {
                        addr: self.peer,
                        source,
                    },
                })
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.recv_err(e)),
            }
        }
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        addr: self.peer,
                        got,
                        wanted: buf.len(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.recv_err(e)),
            }
        }
        Ok(())
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let t = timeout.map(|t| t.max(Duration::from_millis(1)));
        self.stream
            .set_read_timeout(t)
            .map_err(|source| self.opt_err("SO_RCVTIMEO", source))?;
        self.read_timeout = t;
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        // Enforced by send_chunks's wait for room, not SO_SNDTIMEO.
        self.write_timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        Ok(())
    }

    fn shutdown(&self) -> Result<(), TransportError> {
        match self.stream.shutdown(Shutdown::Both) {
            // Already shut down or reset by the peer: the goal is reached.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r.map_err(|source| TransportError::Shutdown {
                addr: self.peer,
                source,
            }),
        }
    }

    fn try_clone(&self) -> Result<TcpChannel, TransportError> {
        let stream = self
            .stream
            .try_clone()
            .map_err(|source| TransportError::Clone {
                addr: self.peer,
                source,
            })?;
        Ok(TcpChannel {
            stream,
            out_ready: None,
            peer: self.peer,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            session: self.session,
            stats: ChannelStats::default(),
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

/// For decoders that read frames from any `io::Read`: [`Channel::recv`],
/// whose typed error (naming the peer) travels inside the `io::Error`, of
/// the matching kind. Sending has no `io::Write` here: frames go through
/// [`Channel::send_chunks`] and [`Channel::send_checkpoint`] (and
/// [`Channel::writer`] for encoders that want a writer).
impl Read for TcpChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf).map_err(io::Error::from)
    }
}

/// One `sendmsg(2)` that makes progress: sends what fits in the socket buffer
/// (possibly a short write) and, when nothing fits, waits (epoll, see
/// [`Readiness`], made on the first wait and kept in `ready`) for room, at
/// most `no_progress_limit` (then `TimedOut`). Non-blocking sends keep the
/// write timeout a "no progress for this long" limit, however large the
/// whole send, without touching the socket's shared `O_NONBLOCK` flag.
/// `MSG_NOSIGNAL`: a peer that went away gives `EPIPE`, never a `SIGPIPE`
/// that would kill the VMM.
///
/// One call offers at most [`MAX_SEND_BYTES`] (and at least one slice): a
/// `sendmsg` of a whole checkpoint (tens of MiB in one call) streams
/// markedly slower on loopback, probably because the call holds the
/// socket's lock while it copies, so the acks coming back wait in its
/// backlog and the stream goes in bursts. Measured by the `ft` benchmark on
/// an idle development host (39 MiB checkpoints on loopback): 2.2–2.9 GB/s
/// in one call, 3.0–3.4 GB/s a slab (1 MiB) per call, against 3.4–4.2 GB/s
/// for raw TCP from a buffer as large.
fn send_some(
    stream: &TcpStream,
    ready: &mut Option<Readiness>,
    iov: &[IoSlice<'_>],
    no_progress_limit: Option<Duration>,
    waits: &mut u64,
) -> io::Result<usize> {
    let socket = SockRef::from(stream);
    let mut take = 1;
    let mut bytes = iov.first().map_or(0, |s| s.len());
    while take < iov.len() && bytes + iov[take].len() <= MAX_SEND_BYTES {
        bytes += iov[take].len();
        take += 1;
    }
    let iov = &iov[..take.min(iov.len())];
    loop {
        match socket.send_vectored_with_flags(iov, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *waits += 1;
                let deadline = no_progress_limit.map(|t| Instant::now() + t);
                let ready = match ready {
                    Some(r) => r,
                    None => ready.insert(Readiness::new(stream.as_raw_fd(), EventSet::OUT)?),
                };
                if !ready.wait_until(deadline)? {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            r => return r,
        }
    }
}

/// Applies `options` to a connected stream and turns keepalive off
/// (heartbeats detect a dead peer, see [`crate::Heartbeat`]).
pub(crate) fn apply_options(
    stream: &TcpStream,
    peer: SocketAddr,
    options: &TcpOptions,
) -> Result<(), TransportError> {
    let err = |option: &'static str| {
        move |source| TransportError::SocketOption {
            addr: peer,
            option,
            source,
        }
    };
    let socket = SockRef::from(stream);
    socket
        .set_tcp_nodelay(options.nodelay)
        .map_err(err("TCP_NODELAY"))?;
    socket.set_keepalive(false).map_err(err("SO_KEEPALIVE"))?;
    if let Some(n) = options.send_buffer {
        socket.set_send_buffer_size(n).map_err(err("SO_SNDBUF"))?;
    }
    if let Some(n) = options.recv_buffer {
        socket.set_recv_buffer_size(n).map_err(err("SO_RCVBUF"))?;
    }
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "connection to {peer}: SO_SNDBUF {:?}, SO_RCVBUF {:?} (asked {options:?})",
            socket.send_buffer_size(),
            socket.recv_buffer_size()
        );
    }
    Ok(())
}

/// The standby's listening socket.
///
/// [`ChannelListener::accept`] takes plain checkpoint channels;
/// [`ChannelListener::accept_pair`] runs the pairing handshake of
/// [`crate::connect_pair`].
pub struct ChannelListener {
    pub(crate) listener: TcpListener,
    pub(crate) local: SocketAddr,
    pub(crate) options: TcpOptions,
    /// Handshaken connections still waiting for their other half.
    pub(crate) pending: Vec<PendingHalf>,
    pub(crate) rejected: u64,
}

impl std::fmt::Debug for ChannelListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelListener")
            .field("local", &self.local)
            .field("pending", &self.pending.len())
            .field("rejected", &self.rejected)
            .finish()
    }
}

impl ChannelListener {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one, see
    /// [`ChannelListener::local_addr`]) with the default [`TcpOptions`].
    pub fn bind<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
    ) -> Result<ChannelListener, TransportError> {
        Self::bind_with(addr, TcpOptions::default())
    }

    /// Listens on `addr`; accepted checkpoint channels get `options`.
    pub fn bind_with<A: ToSocketAddrs + std::fmt::Display>(
        addr: A,
        options: TcpOptions,
    ) -> Result<ChannelListener, TransportError> {
        let bind_err = |source| TransportError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(&addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        // Non-blocking, so that accept can honour a timeout (see Readiness).
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ChannelListener {
            listener,
            local,
            options,
            pending: Vec::new(),
            rejected: 0,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections dropped so far because their preamble was wrong, or
    /// because they sent it too slowly.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Accepts one plain checkpoint channel (no preamble), waiting forever.
    pub fn accept(&self) -> Result<TcpChannel, TransportError> {
        let (stream, peer) = self.accept_stream(None, "connection")?;
        TcpChannel::from_stream(stream, peer, &self.options)
    }

    /// Accepts one plain checkpoint channel (no preamble) within `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<TcpChannel, TransportError> {
        let (stream, peer) =
            self.accept_stream(Some((Instant::now() + timeout, timeout)), "connection")?;
        TcpChannel::from_stream(stream, peer, &self.options)
    }

    /// Accepts one TCP connection (blocking, with `SOCK_CLOEXEC`) before the
    /// deadline. `what` names what we wait for in the timeout error.
    pub(crate) fn accept_stream(
        &self,
        deadline: Option<(Instant, Duration)>,
        what: &'static str,
    ) -> Result<(TcpStream, SocketAddr), TransportError> {
        let accept_err = |source| TransportError::Accept {
            addr: self.local,
            source,
        };
        let mut ready =
            Readiness::new(self.listener.as_raw_fd(), EventSet::IN).map_err(accept_err)?;
        loop {
            if !ready
                .wait_until(deadline.map(|d| d.0))
                .map_err(accept_err)?
            {
                let after = deadline.map(|d| d.1).unwrap_or_default();
                return Err(TransportError::AcceptTimeout {
                    addr: self.local,
                    what,
                    after,
                });
            }
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    // accept4() does not pass O_NONBLOCK on; make sure.
                    stream.set_nonblocking(false).map_err(accept_err)?;
                    return Ok((stream, peer));
                }
                // Raced with the peer giving up, or a spurious wakeup.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(accept_err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{pattern, XorShift};
    use std::io::Write;
    use std::thread;

    fn pair_with(send: TcpOptions, recv: TcpOptions) -> (TcpChannel, TcpChannel) {
        let l = ChannelListener::bind_with("127.0.0.1:0", recv).unwrap();
        let a = TcpChannel::connect_with(l.local_addr(), Duration::from_secs(5), &send).unwrap();
        let b = l.accept_timeout(Duration::from_secs(5)).unwrap();
        (a, b)
    }

    fn pair() -> (TcpChannel, TcpChannel) {
        pair_with(TcpOptions::default(), TcpOptions::default())
    }

    #[test]
    fn many_slices_with_partial_writes_arrive_byte_identical() {
        // Small buffers on both ends and a slow reader force sendmsg() to
        // take only part of what it is offered, again and again.
        let small = TcpOptions {
            nodelay: true,
            send_buffer: Some(32 << 10),
            recv_buffer: Some(32 << 10),
        };
        let (mut tx, mut rx) = pair_with(small, small);

        let mut r = XorShift::new(42);
        // 1000 slices from 0 to ~9 KiB (some empty, some odd-sized), ~4.4 MiB.
        let bufs: Vec<Vec<u8>> = (0..1000u64)
            .map(|i| {
                let len = if i % 97 == 0 {
                    0
                } else {
                    (r.next() % 9000) as usize + 1
                };
                pattern(len, i)
            })
            .collect();
        let expected = bufs.concat();
        let total = expected.len();

        let reader = thread::spawn(move || {
            rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut got = Vec::with_capacity(total);
            let mut chunk = [0u8; 1500];
            let mut reads = 0u32;
            while got.len() < total {
                let n = rx.recv(&mut chunk).unwrap();
                assert!(n > 0, "EOF after {} of {total} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
                reads += 1;
                if reads % 64 == 0 {
                    // Pacing only (keeps the sender's buffer full), not synchronisation.
                    thread::yield_now();
                }
            }
            got
        });

        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        tx.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let sent = tx.send_vectored_all(&slices).unwrap();
        assert_eq!(sent, total);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), total);
        assert!(
            got == expected,
            "received bytes differ from the slices sent"
        );
        let st = tx.stats();
        assert_eq!(st.bytes_sent, total as u64);
        assert!(
            st.short_writes > 0 && st.send_waits > 0,
            "expected partial writes, stats {st:?}"
        );
    }

    #[test]
    fn a_checkpoint_crosses_a_small_socket_buffer_and_decodes_on_the_other_side() {
        use crate::test_utils::{receiver_limits, staged_checkpoint};
        use ftvmm_checkpoint::{CheckpointFrame, Frame, FrameReader, Staging};

        let small = TcpOptions {
            nodelay: true,
            send_buffer: Some(32 << 10),
            recv_buffer: Some(32 << 10),
        };
        let (mut tx, mut rx) = pair_with(small, small);
        // ~1.2 MiB in 300 one-page slabs: many windows, many partial sends.
        let st = staged_checkpoint(300, 70_000);
        let limits = receiver_limits(300);
        let standby = thread::spawn(move || {
            rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut rst = Staging::new(limits.staging_config()).unwrap();
            let mut reader = FrameReader::new(limits);
            let mut got = Vec::new();
            for _ in 0..2 {
                match reader.read_frame(&mut rx.reader(), &mut rst).unwrap() {
                    Frame::Checkpoint(cp) => {
                        let mut state = Vec::new();
                        cp.copy_state_into(&mut state);
                        let pages: Vec<(u64, Vec<u8>)> =
                            cp.pages().map(|(g, p)| (g, p.to_vec())).collect();
                        got.push((cp.epoch(), pages, state));
                    }
                    Frame::Message(m) => panic!("unexpected {m:?}"),
                }
            }
            got
        });
        tx.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut total = 0;
        for epoch in [1, 2] {
            let frame = CheckpointFrame::new(&st, epoch, 1);
            assert_eq!(tx.send_checkpoint(&frame).unwrap(), frame.len());
            total += frame.len();
        }
        let got = standby.join().unwrap();
        let pages: Vec<(u64, Vec<u8>)> = st.pages().map(|(g, p)| (g, p.to_vec())).collect();
        let mut state = Vec::new();
        st.copy_state_into(&mut state);
        for (i, (epoch, p, s)) in got.into_iter().enumerate() {
            assert_eq!(epoch, i as u64 + 1);
            assert!(p == pages, "checkpoint {epoch}: pages differ");
            assert!(s == state, "checkpoint {epoch}: state differs");
        }
        let stats = tx.stats();
        assert_eq!(stats.bytes_sent, total);
        assert!(
            stats.short_writes > 0 && stats.send_waits > 0,
            "expected partial sends, stats {stats:?}"
        );
    }

    #[test]
    fn a_peer_that_reads_nothing_times_the_send_out() {
        let (mut a, _b) = pair();
        a.set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let big = vec![0u8; 64 << 20]; // far more than both socket buffers
        let t0 = Instant::now();
        let err = a.send_all(&big).unwrap_err();
        assert!(
            matches!(err, TransportError::Timeout { op: "send to", .. }),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let st = a.stats();
        assert!(
            st.bytes_sent > 0 && st.bytes_sent < big.len() as u64,
            "{st:?}"
        );
    }

    #[test]
    fn recv_exact_reports_eof_with_progress() {
        let (mut a, mut b) = pair();
        a.send_all(b"abc").unwrap();
        a.shutdown().unwrap();
        let mut buf = [0u8; 8];
        match b.recv_exact(&mut buf) {
            Err(TransportError::Closed {
                got: 3, wanted: 8, ..
            }) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn read_timeout_is_a_typed_error() {
        let (_a, mut b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let t0 = Instant::now();
        let err = b.recv_exact(&mut [0u8; 4]).unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Timeout {
                    op: "receive from",
                    ..
                }
            ),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(err
            .to_string()
            .starts_with("timed out after 50 ms waiting to receive from 127.0.0.1:"));
    }

    #[test]
    fn connect_refused_names_the_address() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        }; // closed again: nobody listens there now
        let err = TcpChannel::connect(addr, Duration::from_secs(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot connect to {addr}: connection refused")
        );
    }

    #[test]
    fn reader_serves_a_decoder_and_split_halves_work() {
        let (mut a, mut b) = pair();
        // Writer half and reader half of the same channel, on two threads.
        let mut b_tx = b.try_clone().unwrap();
        let echo = thread::spawn(move || {
            let mut len = [0u8; 4];
            b.reader().read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            b.reader().read_exact(&mut body).unwrap();
            b_tx.send_all(&body).unwrap();
        });
        let body = pattern(100_000, 3);
        a.send_vectored_all(&[
            IoSlice::new(&(body.len() as u32).to_le_bytes()),
            IoSlice::new(&body),
        ])
        .unwrap();
        let mut back = vec![0u8; body.len()];
        a.recv_exact(&mut back).unwrap();
        echo.join().unwrap();
        assert_eq!(back, body);
        // A read past the end through the Read view is UnexpectedEof.
        let err = a.reader().read_exact(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn shutdown_from_a_clone_unblocks_a_reader() {
        let (_a, mut b) = pair();
        let b2 = b.try_clone().unwrap();
        let t = thread::spawn(move || b.recv(&mut [0u8; 16]));
        // The reader may or may not be blocked yet; either way it must end.
        b2.shutdown().unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn socket_options_are_applied() {
        let (a, _b) = pair();
        let socket = SockRef::from(a.as_tcp());
        assert!(socket.tcp_nodelay().unwrap());
        assert!(!socket.keepalive().unwrap());
        let (snd, rcv) = a.buffer_sizes().unwrap();
        // The kernel caps at wmem_max/rmem_max (and doubles); at least more
        // than its small defaults.
        assert!(
            snd >= 200 * 1024 && rcv >= 200 * 1024,
            "snd {snd} rcv {rcv}"
        );
    }

    #[test]
    fn a_name_without_addresses_is_a_typed_error() {
        // A name that resolves, to nothing.
        struct Nowhere;
        impl std::fmt::Display for Nowhere {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("nowhere:1")
            }
        }
        impl ToSocketAddrs for Nowhere {
            type Iter = std::option::IntoIter<SocketAddr>;
            fn to_socket_addrs(&self) -> io::Result<Self::Iter> {
                Ok(None.into_iter())
            }
        }
        let err = resolve(&Nowhere).unwrap_err();
        assert!(matches!(&err, TransportError::NoAddress { addr } if addr == "nowhere:1"));
        assert_eq!(err.to_string(), "'nowhere:1' resolved to no address");
    }

    #[test]
    fn accept_timeout_expires() {
        let l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let err = l.accept_timeout(Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, TransportError::AcceptTimeout { .. }), "{err}");
    }

    #[test]
    fn io_write_views_feed_an_encoder() {
        let (mut a, b) = pair();
        let mut b: Box<dyn Channel> = Box::new(b);
        let chunks = [pattern(5000, 1), Vec::new(), pattern(70_000, 2)];
        // As an encoder that wants an io::Write would: write_vectored + loop.
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        let mut w = a.writer();
        while !rest.is_empty() {
            let n = w.write_vectored(rest).unwrap();
            IoSlice::advance_slices(&mut rest, n);
        }
        w.write_all(b"tail").unwrap();
        let mut got = vec![0u8; 75_004];
        crate::ChannelReader::new(&mut *b)
            .read_exact(&mut got)
            .unwrap();
        assert_eq!(got, [chunks.concat(), b"tail".to_vec()].concat());
        // And back through the generic writer of a dyn channel.
        crate::ChannelWriter::new(&mut *b)
            .write_all(b"ack")
            .unwrap();
        let mut ack = [0u8; 3];
        a.read_exact(&mut ack).unwrap();
        assert_eq!(&ack, b"ack");
    }

    #[test]
    fn dyn_channel_is_usable() {
        let (a, b) = pair();
        let mut a: Box<dyn Channel> = Box::new(a);
        let mut b: Box<dyn Channel> = Box::new(b);
        a.send_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        crate::ChannelReader::new(&mut *b)
            .read_exact(&mut buf)
            .unwrap();
        assert_eq!(&buf, b"hello");
    }
}
