//! The TCP implementation of [`Channel`], and its listener.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use socket2::SockRef;
use vmm_sys_util::epoll::EventSet;

use crate::channel::{write_all_chunks, Channel};
use crate::handshake::{PendingHalf, SessionId};
use crate::record::{check_len, Records, RECORD_HEADER};
use crate::secure::{Cipher, Security, SessionKeys, TAG_LEN};
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

/// What an RDMA channel keeps of the TCP connection it was set up over.
#[cfg(feature = "rdma")]
pub(crate) struct Bootstrap {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub session: Option<SessionId>,
    pub keys: Option<(crate::secure::Sealer, crate::secure::Opener, Cipher)>,
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
    /// Sealing state when the handshake was keyed (see [`crate::record`]).
    records: Option<Box<Records>>,
    /// The cipher of `records`.
    cipher: Option<Cipher>,
    /// A key-less clone of a sealed channel: it can only shut down.
    sealed_clone: bool,
    /// Sends sealed records on a thread of its own while the next one is
    /// sealed (made on the first send longer than a record).
    pipe: Option<Box<SendPipe>>,
}

impl std::fmt::Debug for TcpChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpChannel")
            .field("peer", &self.peer)
            .field("fd", &self.stream.as_raw_fd())
            .field("session", &self.session)
            .field("cipher", &self.cipher)
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
            records: None,
            cipher: None,
            sealed_clone: false,
            pipe: None,
        })
    }

    pub(crate) fn set_session(&mut self, session: SessionId) {
        self.session = Some(session);
    }

    /// From now on every byte both ways is sealed with these keys (see
    /// [`crate::record`]).
    pub(crate) fn seal_with(&mut self, keys: SessionKeys) {
        self.cipher = Some(keys.cipher);
        self.records = Some(Box::new(Records::new(keys)));
    }

    /// The AEAD sealing this channel, or `None` for a plain
    /// (`--ft-insecure`) one.
    pub fn cipher(&self) -> Option<Cipher> {
        self.cipher
    }

    /// Sealed records sent and received so far (0, 0 when plain).
    pub fn records(&self) -> (u64, u64) {
        self.records.as_ref().map_or((0, 0), |r| r.counts())
    }

    /// Runs the handshake of [`crate::auth`] as the initiator on a channel
    /// whose `preamble` was just sent, and seals the channel if keyed.
    pub(crate) fn authenticate(
        &mut self,
        preamble: &[u8],
        security: &Security,
        deadline: Instant,
    ) -> Result<(), TransportError> {
        if let Some(keys) =
            crate::auth::initiate(&self.stream, self.peer, preamble, security, deadline)?
        {
            self.seal_with(keys);
        }
        Ok(())
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

    /// Hands the connection over to an RDMA channel it bootstrapped: the
    /// stream (kept open: its end tells that the peer is gone), and the
    /// sealing keys, whose counters go on over RDMA.
    #[cfg(feature = "rdma")]
    pub(crate) fn into_bootstrap(mut self) -> Result<Bootstrap, TransportError> {
        let keys = match self.records.take() {
            None => None,
            Some(rec) => {
                let cipher = self.cipher.expect("a sealed channel has a cipher");
                let (tx, rx) = rec.into_keys().ok_or(TransportError::Rdma(
                    crate::rdma::RdmaError::Protocol {
                        addr: self.peer,
                        what: "bytes after the setup messages on the bootstrap connection".into(),
                    },
                ))?;
                Some((tx, rx, cipher))
            }
        };
        Ok(Bootstrap {
            stream: self.stream,
            peer: self.peer,
            session: self.session,
            keys,
        })
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

impl TcpChannel {
    /// Sends the chunks as they are (the plain stream, or sealed records).
    fn send_plain(
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

    /// One `read(2)` of the raw stream (retrying `EINTR`); 0 is EOF.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.recv_err(e)),
            }
        }
    }

    /// Fills `buf` from the raw stream.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_some(&mut buf[got..])? {
                0 => {
                    return Err(TransportError::Closed {
                        addr: self.peer,
                        got,
                        wanted: buf.len(),
                    })
                }
                n => got += n,
            }
        }
        Ok(())
    }

    fn refuse_clone(&self) -> Result<(), TransportError> {
        if self.sealed_clone {
            return Err(TransportError::SealedClone { addr: self.peer });
        }
        Ok(())
    }

    fn send_sealed(
        &mut self,
        rec: &mut Records,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        let mut total = 0u64;
        let mut piped = false;
        let r = (|| {
            for chunk in chunks {
                total += chunk.len() as u64;
                let mut rest = chunk;
                while !rest.is_empty() {
                    let n = rec.push(rest);
                    rest = &rest[n..];
                    if rec.is_full() {
                        piped |= self.send_record(rec, true)?;
                    }
                }
            }
            if rec.pending() > 0 {
                // The last record follows the queued ones, or (a send of
                // one record: an ack, a message) goes out from here.
                self.send_record(rec, piped)?;
            }
            Ok(())
        })();
        if piped {
            // The send returns once every record is in the kernel, as a
            // plain one does (and reports any failure of them).
            let pipe = self.pipe.as_mut().expect("records were piped");
            let flushed = pipe.flush(&mut self.stats);
            r.and(flushed)?;
        } else {
            r?;
        }
        Ok(total)
    }

    /// Seals the record being built and sends it: handed to the sender
    /// thread when `pipeline` (returns true), else from this thread (also
    /// where the thread cannot be started).
    fn send_record(&mut self, rec: &mut Records, pipeline: bool) -> Result<bool, TransportError> {
        let len = rec.seal().len();
        if pipeline && self.pipe.is_none() {
            self.pipe = SendPipe::start(&self.stream, self.peer).map(Box::new);
        }
        match self.pipe.as_mut().filter(|_| pipeline) {
            Some(pipe) => {
                pipe.post(rec, len, self.write_timeout)?;
                Ok(true)
            }
            None => {
                self.send_plain(&mut std::iter::once(rec.sealed(len)))?;
                Ok(false)
            }
        }
    }

    /// Reads the next record's header into `rec`'s partial record; false
    /// on a clean end of stream (between records). A timeout can end it
    /// anywhere; the next call goes on from there.
    fn read_header(&mut self, rec: &mut Records) -> Result<bool, TransportError> {
        if rec.broken {
            return Err(TransportError::Closed {
                addr: self.peer,
                got: 0,
                wanted: RECORD_HEADER,
            });
        }
        loop {
            let (p, _) = rec.partial();
            if p.header_got == RECORD_HEADER {
                return Ok(true);
            }
            let got = p.header_got;
            let mut head = p.header;
            let n = self.read_some(&mut head[got..])?;
            let (p, _) = rec.partial();
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(TransportError::Closed {
                    addr: self.peer,
                    got,
                    wanted: RECORD_HEADER,
                });
            }
            p.header = head;
            p.header_got += n;
            if let Some(len) = p.len() {
                if let Err(len) = check_len(len) {
                    rec.broken = true;
                    return Err(TransportError::RecordTooLong {
                        addr: self.peer,
                        len,
                        max: crate::record::RECORD_MAX as u32,
                    });
                }
            }
        }
    }

    /// Receives the rest of the current record into `rec` and opens it;
    /// false on a clean end of stream.
    fn fill_record(&mut self, rec: &mut Records) -> Result<bool, TransportError> {
        if !self.read_header(rec)? {
            return Ok(false);
        }
        loop {
            let (p, body) = rec.partial();
            if p.body_got == body.len() {
                break;
            }
            let got = p.body_got;
            let wanted = body.len();
            let n = loop {
                match self.stream.read(&mut body[got..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.recv_err(e)),
                }
            };
            if n == 0 {
                rec.broken = true;
                return Err(TransportError::Closed {
                    addr: self.peer,
                    got,
                    wanted,
                });
            }
            p.body_got += n;
        }
        rec.open_partial().map_err(|source| {
            rec.broken = true;
            TransportError::Tampered {
                addr: self.peer,
                source,
            }
        })?;
        Ok(true)
    }

    fn recv_sealed(&mut self, rec: &mut Records, buf: &mut [u8]) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !rec.has_plaintext() && !self.fill_record(rec)? {
            return Ok(0);
        }
        Ok(rec.take(buf))
    }

    fn recv_exact_sealed(
        &mut self,
        rec: &mut Records,
        buf: &mut [u8],
    ) -> Result<(), TransportError> {
        let mut pos = rec.take(buf);
        while pos < buf.len() {
            if !self.read_header(rec)? {
                return Err(TransportError::Closed {
                    addr: self.peer,
                    got: pos,
                    wanted: buf.len(),
                });
            }
            let (p, _) = rec.partial();
            let len = p.len().expect("header complete");
            if p.body_got == 0 && len <= buf.len() - pos {
                // A whole record fits: open it where the caller wants it.
                let header = p.header;
                let mut tag = [0u8; TAG_LEN];
                let dst = &mut buf[pos..pos + len];
                if let Err(e) = self.read_full(dst).and_then(|()| self.read_full(&mut tag)) {
                    rec.broken = true;
                    return Err(e);
                }
                rec.clear_partial();
                rec.open_direct(header, &mut buf[pos..pos + len], tag)
                    .map_err(|source| {
                        rec.broken = true;
                        TransportError::Tampered {
                            addr: self.peer,
                            source,
                        }
                    })?;
                pos += len;
            } else {
                if !self.fill_record(rec)? {
                    unreachable!("the header was in");
                }
                pos += rec.take(&mut buf[pos..]);
            }
        }
        Ok(())
    }
}

/// The sender thread of a sealed channel: while it hands record k to the
/// kernel, the caller seals record k + 1, so sealing and the kernel's copy
/// overlap on a host with a spare core. Two record buffers: the caller
/// swaps a sealed record for a free buffer (no copy) and posts it; the
/// thread sends posted records in order. The caller posts record k only
/// after the thread took record k − 1, i.e. finished k − 2, whose buffer
/// the swap hands back: nothing is overwritten before it was sent. Nothing
/// allocates after the start.
struct SendPipe {
    shared: Arc<PipeShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PipeShared {
    bufs: [Mutex<Box<[u8]>>; 2],
    state: Mutex<PipeState>,
    cond: Condvar,
}

#[derive(Default)]
struct PipeState {
    /// A posted record: (buffer, length), not yet taken by the thread.
    job: Option<(usize, usize, Option<Duration>)>,
    /// The thread is sending a record.
    busy: bool,
    /// Records posted so far (selects the buffer).
    posted: u64,
    /// The first failure; later records are dropped.
    error: Option<TransportError>,
    /// Counters of the thread's sends, collected by `flush`.
    stats: ChannelStats,
    stop: bool,
}

impl SendPipe {
    /// Starts the thread on a clone of `stream`; `None` if it cannot be
    /// (the caller then sends from its own thread).
    fn start(stream: &TcpStream, peer: SocketAddr) -> Option<SendPipe> {
        let stream = stream.try_clone().ok()?;
        let shared = Arc::new(PipeShared {
            bufs: [
                Mutex::new(Records::new_buffer()),
                Mutex::new(Records::new_buffer()),
            ],
            state: Mutex::new(PipeState::default()),
            cond: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ft-send".into())
            .spawn(move || pipe_loop(&s, &stream, peer))
            .ok()?;
        Some(SendPipe {
            shared,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the sealed record (`len` bytes) in `rec`'s buffer to the
    /// thread, once it took the previous one.
    fn post(
        &mut self,
        rec: &mut Records,
        len: usize,
        limit: Option<Duration>,
    ) -> Result<(), TransportError> {
        let mut st = self.lock();
        while st.job.is_some() && st.error.is_none() {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        let slot = (st.posted % 2) as usize;
        rec.swap_out(
            &mut self.shared.bufs[slot]
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        st.job = Some((slot, len, limit));
        st.posted += 1;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Waits until every posted record is in the kernel; adds the thread's
    /// counters to `stats`.
    fn flush(&mut self, stats: &mut ChannelStats) -> Result<(), TransportError> {
        let mut st = self.lock();
        while (st.job.is_some() || st.busy) && st.error.is_none() {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let s = std::mem::take(&mut st.stats);
        stats.bytes_sent += s.bytes_sent;
        stats.send_calls += s.send_calls;
        stats.short_writes += s.short_writes;
        stats.send_waits += s.send_waits;
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for SendPipe {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pipe_loop(shared: &PipeShared, stream: &TcpStream, peer: SocketAddr) {
    let mut ready = None;
    loop {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (slot, len, limit) = loop {
            if st.stop {
                return;
            }
            if let Some(job) = st.job.take() {
                break job;
            }
            st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        let failed = st.error.is_some();
        st.busy = true;
        drop(st);
        shared.cond.notify_all();
        let mut out = ChannelStats::default();
        let r = if failed {
            Ok(())
        } else {
            let buf = shared.bufs[slot].lock().unwrap_or_else(|e| e.into_inner());
            let mut waits = 0;
            let res = write_all_chunks(&mut std::iter::once(&buf[..len]), |iov| {
                send_some(stream, &mut ready, iov, limit, &mut waits)
            });
            out.send_waits = waits;
            match res {
                Ok(o) => {
                    out.bytes_sent = o.bytes;
                    out.send_calls = o.calls;
                    out.short_writes = o.short;
                    Ok(())
                }
                Err(source) => Err(send_error(peer, limit, source)),
            }
        };
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.busy = false;
        st.stats.bytes_sent += out.bytes_sent;
        st.stats.send_calls += out.send_calls;
        st.stats.short_writes += out.short_writes;
        st.stats.send_waits += out.send_waits;
        if let Err(e) = r {
            st.error.get_or_insert(e);
        }
        drop(st);
        shared.cond.notify_all();
    }
}

/// A failed send as the channel reports it.
fn send_error(peer: SocketAddr, limit: Option<Duration>, source: io::Error) -> TransportError {
    match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
            addr: peer,
            op: "send to",
            after: limit.unwrap_or_default(),
        },
        _ => TransportError::Send { addr: peer, source },
    }
}

impl Channel for TcpChannel {
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        self.refuse_clone()?;
        let Some(mut rec) = self.records.take() else {
            return self.send_plain(chunks);
        };
        let r = self.send_sealed(&mut rec, chunks);
        self.records = Some(rec);
        r
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.refuse_clone()?;
        let Some(mut rec) = self.records.take() else {
            return self.read_some(buf);
        };
        let r = self.recv_sealed(&mut rec, buf);
        self.records = Some(rec);
        r
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.refuse_clone()?;
        let Some(mut rec) = self.records.take() else {
            return self.read_full(buf);
        };
        let r = self.recv_exact_sealed(&mut rec, buf);
        self.records = Some(rec);
        r
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
            records: None,
            cipher: self.cipher,
            sealed_clone: self.records.is_some() || self.sealed_clone,
            pipe: None,
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

    /// [`Channel::recv_exact`]: on a sealed channel, whole records are
    /// opened straight in `buf`.
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.recv_exact(buf).map_err(io::Error::from)
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
    /// What the handshake demands of a connecting primary.
    pub(crate) security: Security,
    /// Rate-limited log of turned-away connections.
    pub(crate) reject_log: crate::handshake::RejectLog,
    /// The RDMA device and ring shape primaries asking for RDMA are served
    /// with; `None`: a device opened per primary as the environment says
    /// (tests set a software one).
    #[cfg(feature = "rdma")]
    pub(crate) rdma_override: Option<(
        std::sync::Arc<dyn crate::rdma::fabric::Provider>,
        crate::rdma::RdmaConfig,
    )>,
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
            security: Security::Insecure,
            reject_log: Default::default(),
            #[cfg(feature = "rdma")]
            rdma_override: None,
        })
    }

    /// What the handshake demands of connecting primaries from now on
    /// (a new listener accepts unauthenticated ones: [`Security::Insecure`]).
    pub fn set_security(&mut self, security: Security) {
        self.security = security;
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
