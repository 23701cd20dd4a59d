//! Pairing the checkpoint channel with its heartbeat connection.
//!
//! The primary opens two TCP connections to the standby's single
//! `HOST:PORT`: first the data (checkpoint) channel, then the heartbeat
//! connection, so that a large checkpoint never delays a heartbeat. Each
//! starts with the protocol's 24-byte preamble (magic, [`WIRE_VERSION`],
//! connection kind, session id; its layout is in
//! [`ftvmm_checkpoint::protocol`], which frames and heartbeats share).
//!
//! The standby matches a data connection to the heartbeat connection with the
//! same session id. A connection with a wrong preamble (garbage, another
//! version) is dropped with a typed error and the listener goes on: a bad
//! peer cannot take the standby down.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub use ftvmm_checkpoint::protocol::ConnectionKind;
#[cfg(doc)]
use ftvmm_checkpoint::protocol::WIRE_VERSION;
use ftvmm_checkpoint::protocol::{self, PreambleError, PREAMBLE_LEN, SESSION_ID_LEN};

use crate::heartbeat::HeartbeatStream;
use crate::secure::Security;
use crate::tcp::{connect_stream, resolve, TcpChannel, TcpOptions};
use crate::{ChannelListener, TransportError};

/// How long the standby waits for one connection's preamble before dropping it.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many handshaken connections may wait for their other half.
const MAX_PENDING: usize = 8;

/// Identifies one primary's pair of connections.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    /// A fresh random id (`getrandom(2)`; falls back to time and pid mixing
    /// if the kernel call fails, which only has to make collisions unlikely).
    pub fn random() -> SessionId {
        let mut b = [0u8; SESSION_ID_LEN];
        // SAFETY: `b` is a live, writable buffer of exactly `b.len()` bytes.
        let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if r != b.len() as isize {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let mut x =
                (t as u64) ^ (u64::from(std::process::id()) << 32) ^ (&b as *const _ as u64);
            for chunk in b.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
        }
        SessionId(b)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// The 24 bytes that open a connection of `kind` in `session`.
pub fn encode_preamble(
    kind: ConnectionKind,
    session: SessionId,
) -> [u8; PREAMBLE_LEN + SESSION_ID_LEN] {
    protocol::encode_preamble(kind, &session.0)
}

/// Checks the 8-byte preamble of a connection from `addr` (the protocol's
/// rules; the error names the peer).
pub fn decode_preamble(
    addr: SocketAddr,
    b: [u8; PREAMBLE_LEN],
) -> Result<ConnectionKind, TransportError> {
    protocol::decode_preamble(&b).map_err(|reason| match reason {
        PreambleError::Version { got } => TransportError::UnsupportedVersion {
            addr,
            version: got,
            supported: protocol::WIRE_VERSION,
        },
        reason => TransportError::BadPreamble {
            addr,
            bytes: b,
            reason,
        },
    })
}

/// One handshaken incoming connection, see [`ChannelListener::accept_tagged`].
#[derive(Debug)]
pub enum Incoming {
    /// A checkpoint channel.
    Data(TcpChannel),
    /// The bootstrap connection of an RDMA checkpoint channel (handshaken;
    /// the RDMA setup has not run yet).
    RdmaData(TcpChannel),
    /// A heartbeat connection.
    Heartbeat(HeartbeatStream),
}

impl Incoming {
    /// A data half (TCP or RDMA bootstrap) rather than a heartbeat one.
    fn is_data(&self) -> bool {
        !matches!(self, Incoming::Heartbeat(_))
    }

    /// The session it belongs to.
    pub fn session(&self) -> SessionId {
        match self {
            Incoming::Data(c) | Incoming::RdmaData(c) => {
                c.session().expect("handshaken channels carry a session")
            }
            Incoming::Heartbeat(h) => h.session().expect("handshaken streams carry a session"),
        }
    }
}

/// Logs the connections a listener turns away: one line each, but at most
/// [`RejectLog::PER_SECOND`] a second; the rest are counted and summarised
/// in one line, so a flood of bad peers cannot fill the log.
#[derive(Debug, Default)]
pub(crate) struct RejectLog {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RejectLog {
    const PER_SECOND: u32 = 5;

    pub(crate) fn note(&mut self, e: &TransportError) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            if self.suppressed > 0 {
                log::warn!(
                    "{} more connections were turned away (not logged one by one)",
                    self.suppressed
                );
            }
            self.window = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::PER_SECOND {
            self.in_window += 1;
            log::warn!("{e}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// A handshaken connection waiting in the listener for its other half.
pub(crate) struct PendingHalf {
    incoming: Incoming,
}

/// Connects the pair to the standby at `addr` (data first, then heartbeat,
/// both to the same address) within `timeout` in all, with the default
/// [`TcpOptions`] and no authentication (a standby that listens with
/// [`Security::Insecure`]).
pub fn connect_pair<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    timeout: Duration,
) -> Result<(TcpChannel, HeartbeatStream), TransportError> {
    connect_pair_with(addr, timeout, &TcpOptions::default(), &Security::Insecure)
}

/// [`connect_pair`] with explicit socket options for the data channel and
/// the handshake of [`crate::auth`] on both connections: with a key, both
/// come back sealed under their own session keys.
pub fn connect_pair_with<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    timeout: Duration,
    options: &TcpOptions,
    security: &Security,
) -> Result<(TcpChannel, HeartbeatStream), TransportError> {
    connect_pair_kind(addr, timeout, options, security, ConnectionKind::Data)
        .map(|(data, hb, _)| (data, hb))
}

/// [`connect_pair_with`] whose data connection opens with `kind` (the
/// RDMA bootstrap's, see [`crate::connect_pair_over`]); also returns the
/// deadline the rest of the pairing must keep.
pub(crate) fn connect_pair_kind<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    timeout: Duration,
    options: &TcpOptions,
    security: &Security,
    kind: ConnectionKind,
) -> Result<(TcpChannel, HeartbeatStream, Instant), TransportError> {
    let deadline = Instant::now() + timeout;
    let addrs = resolve(&addr)?;
    let session = SessionId::random();

    let (data, peer) = connect_stream(&addrs, deadline)?;
    let mut data = TcpChannel::from_stream(data, peer, options)?;
    data.set_session(session);
    let preamble = send_preamble(data.as_tcp(), peer, kind, session)?;
    data.authenticate(&preamble, security, deadline)?;

    // Same address as the data channel, so both reach the same standby.
    let (hb, _) = connect_stream(&[peer], deadline)?;
    let preamble = send_preamble(&hb, peer, ConnectionKind::Heartbeat, session)?;
    let keys = crate::auth::initiate(&hb, peer, &preamble, security, deadline)?;
    let hb = HeartbeatStream::new(hb, peer, Some(session), keys)?;
    log::debug!(
        "connected {} and heartbeat channels to {peer}, session {session}, {}",
        kind.name(),
        match data.cipher() {
            Some(c) => c.name(),
            None => "not sealed",
        }
    );
    Ok((data, hb, deadline))
}

/// Sends the preamble and returns its bytes (the start of the handshake's
/// transcript).
fn send_preamble(
    mut stream: &TcpStream,
    addr: SocketAddr,
    kind: ConnectionKind,
    session: SessionId,
) -> Result<[u8; PREAMBLE_LEN + SESSION_ID_LEN], TransportError> {
    let bytes = encode_preamble(kind, session);
    // 24 bytes into an empty socket buffer: cannot block.
    stream
        .write_all(&bytes)
        .map_err(|source| TransportError::Send { addr, source })?;
    Ok(bytes)
}

/// Reads and checks the preamble and session id within `timeout`; also
/// returns the bytes (the start of the handshake's transcript).
fn read_preamble(
    mut stream: &TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<
    (
        ConnectionKind,
        SessionId,
        [u8; PREAMBLE_LEN + SESSION_ID_LEN],
    ),
    TransportError,
> {
    let opt_err = |source| TransportError::SocketOption {
        addr,
        option: "SO_RCVTIMEO",
        source,
    };
    let deadline = Instant::now() + timeout;
    let mut b = [0u8; PREAMBLE_LEN + SESSION_ID_LEN];
    let mut got = 0;
    while got < b.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout {
                addr,
                op: "read the preamble from",
                after: timeout,
            });
        }
        stream.set_read_timeout(Some(left)).map_err(opt_err)?;
        match stream.read(&mut b[got..]) {
            Ok(0) => {
                return Err(TransportError::Closed {
                    addr,
                    got,
                    wanted: b.len(),
                });
            }
            Ok(n) => {
                got += n;
                // Reject garbage as soon as its first 8 bytes are in.
                if got >= PREAMBLE_LEN && got - n < PREAMBLE_LEN {
                    decode_preamble(addr, b[..PREAMBLE_LEN].try_into().expect("8 bytes"))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(source) => return Err(TransportError::Recv { addr, source }),
        }
    }
    stream.set_read_timeout(None).map_err(opt_err)?;
    let kind = decode_preamble(addr, b[..PREAMBLE_LEN].try_into().expect("8 bytes"))?;
    let session = SessionId(b[PREAMBLE_LEN..].try_into().expect("16 bytes"));
    Ok((kind, session, b))
}

impl ChannelListener {
    /// Accepts one connection and reads its preamble, within `timeout`.
    ///
    /// A connection with a bad preamble is closed and its error returned
    /// ([`TransportError::BadPreamble`], [`TransportError::UnsupportedVersion`],
    /// or `Closed`/`Timeout` for a peer that sent too little); the listener is
    /// unaffected. [`TransportError::is_per_connection`] tells those errors
    /// apart from a failing listener.
    pub fn accept_tagged(&mut self, timeout: Duration) -> Result<Incoming, TransportError> {
        let deadline = Instant::now() + timeout;
        self.accept_tagged_until(deadline, timeout, "connection")
    }

    fn accept_tagged_until(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Incoming, TransportError> {
        let (stream, peer) = self.accept_stream(Some((deadline, timeout)), what)?;
        // The preamble and the key exchange share one budget: a peer that
        // dawdles holds the listener at most this long.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(PREAMBLE_TIMEOUT)
            .max(Duration::from_millis(1));
        let handshake_deadline = Instant::now() + budget;
        let security = &self.security;
        let tagged = read_preamble(&stream, peer, budget).and_then(|(kind, session, preamble)| {
            let keys =
                crate::auth::respond(&stream, peer, &preamble, security, handshake_deadline)?;
            match kind {
                ConnectionKind::Data | ConnectionKind::RdmaData => {
                    let mut c = TcpChannel::from_stream(stream, peer, &self.options)?;
                    c.set_session(session);
                    if let Some(keys) = keys {
                        c.seal_with(keys);
                    }
                    Ok(if kind == ConnectionKind::Data {
                        Incoming::Data(c)
                    } else {
                        Incoming::RdmaData(c)
                    })
                }
                ConnectionKind::Heartbeat => Ok(Incoming::Heartbeat(HeartbeatStream::new(
                    stream,
                    peer,
                    Some(session),
                    keys,
                )?)),
            }
        });
        if tagged.is_err() {
            // The stream was dropped (closed) on the error path.
            self.rejected += 1;
        }
        tagged
    }

    /// Accepts connections until a data channel and a heartbeat connection
    /// with the same session id have both arrived, within `timeout`.
    ///
    /// Connections with a bad preamble are dropped and logged (see
    /// [`ChannelListener::rejected`]); listening goes on. A half whose other
    /// half has not arrived yet waits in the listener, also across calls (at
    /// most a few; the oldest is dropped first), so interleaved pairs from
    /// two primaries are matched correctly. Preambles are read one connection
    /// at a time: a peer that connects and sends nothing delays pairing by at
    /// most [`PREAMBLE_TIMEOUT`] before it is dropped.
    pub fn accept_pair(
        &mut self,
        timeout: Duration,
    ) -> Result<(TcpChannel, HeartbeatStream), TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.accept_halves(deadline, timeout)? {
                (Incoming::Data(d), h) => return Ok((d, h)),
                (Incoming::RdmaData(d), _) => {
                    // This caller wants TCP channels only: say so, go on.
                    let e = crate::rdma::refuse_unbuilt(d, Instant::now() + PREAMBLE_TIMEOUT);
                    self.reject_log.note(&e);
                }
                (Incoming::Heartbeat(_), _) => unreachable!("the first half is the data half"),
            }
        }
    }

    /// Accepts connections until a data half (TCP or RDMA bootstrap) and a
    /// heartbeat half of the same session have both arrived; returns them
    /// in that order.
    pub(crate) fn accept_halves(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(Incoming, HeartbeatStream), TransportError> {
        loop {
            let incoming =
                match self.accept_tagged_until(deadline, timeout, "data + heartbeat pair") {
                    Ok(i) => i,
                    Err(e) if e.is_per_connection() => {
                        self.reject_log.note(&e);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            let session = incoming.session();
            let partner = self.pending.iter().position(|p| {
                p.incoming.session() == session && p.incoming.is_data() != incoming.is_data()
            });
            match partner {
                Some(i) => {
                    let other = self.pending.remove(i).incoming;
                    let (data, hb) = if incoming.is_data() {
                        (incoming, other)
                    } else {
                        (other, incoming)
                    };
                    let Incoming::Heartbeat(hb) = hb else {
                        unreachable!("partner has the other kind")
                    };
                    log::debug!(
                        "paired {} and heartbeat from {}, session {session}",
                        if matches!(data, Incoming::RdmaData(_)) {
                            "RDMA bootstrap"
                        } else {
                            "data"
                        },
                        hb.peer_addr()
                    );
                    return Ok((data, hb));
                }
                None => {
                    // A repeated half of the same kind replaces the old one.
                    self.pending.retain(|p| {
                        p.incoming.session() != session
                            || p.incoming.is_data() != incoming.is_data()
                    });
                    if self.pending.len() >= MAX_PENDING {
                        let old = self.pending.remove(0);
                        log::warn!(
                            "dropping unpaired connection of session {}",
                            old.incoming.session()
                        );
                    }
                    self.pending.push(PendingHalf { incoming });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Channel;
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    fn raw_connect(l: &ChannelListener, bytes: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect_timeout(&l.local_addr(), T).unwrap();
        s.write_all(bytes).unwrap();
        s
    }

    #[test]
    fn preamble_round_trip() {
        let s = SessionId::random();
        let b = encode_preamble(ConnectionKind::Heartbeat, s);
        let addr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            decode_preamble(addr, b[..8].try_into().unwrap()).unwrap(),
            ConnectionKind::Heartbeat
        );
        assert_eq!(&b[8..], &s.0);
        assert_ne!(SessionId::random(), SessionId::random());
    }

    #[test]
    fn pair_connects_and_both_halves_carry_bytes() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        let primary = thread::spawn(move || connect_pair(addr, T).unwrap());
        let (mut data, hb) = l.accept_pair(T).unwrap();
        let (mut p_data, p_hb) = primary.join().unwrap();
        assert_eq!(data.session(), p_data.session());
        assert_eq!(hb.session(), p_data.session());
        p_data.send_all(b"checkpoint").unwrap();
        let mut buf = [0u8; 10];
        data.recv_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"checkpoint");
        p_hb.as_tcp().write_all(b"hb").unwrap();
        let mut two = [0u8; 2];
        hb.as_tcp().read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hb");
    }

    #[test]
    fn garbage_preamble_is_refused_and_listener_keeps_accepting() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let _g = raw_connect(&l, b"GET / HTTP/1.1\r\n\r\n");
        match l.accept_tagged(T) {
            Err(TransportError::BadPreamble { bytes, .. }) => assert_eq!(&bytes, b"GET / HT"),
            other => panic!("expected BadPreamble, got {other:?}"),
        }
        assert_eq!(l.rejected(), 1);
        // The garbage peer's connection was closed by the standby.
        let mut g = _g;
        g.set_read_timeout(Some(T)).unwrap();
        assert_eq!(g.read(&mut [0u8; 1]).unwrap_or(0), 0);

        let addr = l.local_addr();
        let primary = thread::spawn(move || connect_pair(addr, T).unwrap());
        let (data, _hb) = l.accept_pair(T).unwrap();
        let (p_data, _p_hb) = primary.join().unwrap();
        assert_eq!(data.session(), p_data.session());
    }

    #[test]
    fn accept_pair_survives_bad_peers_in_between() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let mut wrong_version = encode_preamble(ConnectionKind::Data, SessionId::random());
        wrong_version[4] = 9;
        let mut bad_kind = encode_preamble(ConnectionKind::Data, SessionId::random());
        bad_kind[6] = 7;
        let _a = raw_connect(&l, &[0xff; 24]);
        let _b = raw_connect(&l, &wrong_version);
        let _c = raw_connect(&l, &bad_kind);
        drop(raw_connect(&l, b"FTV")); // closes mid-preamble
        let addr = l.local_addr();
        let primary = thread::spawn(move || connect_pair(addr, T).unwrap());
        let (data, hb) = l.accept_pair(T).unwrap();
        let (p_data, _p_hb) = primary.join().unwrap();
        assert_eq!(data.session(), p_data.session());
        assert_eq!(hb.session(), p_data.session());
        assert_eq!(l.rejected(), 4);
    }

    #[test]
    fn wrong_version_is_a_typed_error() {
        // A build of version 1 (its own heartbeat format) is refused at the door.
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let mut b = encode_preamble(ConnectionKind::Data, SessionId::random());
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        let _s = raw_connect(&l, &b);
        let err = l.accept_tagged(T).unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::UnsupportedVersion {
                    version: 1,
                    supported,
                    ..
                } if supported == protocol::WIRE_VERSION
            ),
            "{err}"
        );
        assert!(err.is_per_connection());
        assert!(
            err.to_string().contains(&format!(
                "protocol version 1, this build speaks {}",
                protocol::WIRE_VERSION
            )),
            "{err}"
        );
    }

    #[test]
    fn interleaved_pairs_are_matched_by_session() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let (sa, sb) = (SessionId::random(), SessionId::random());
        // data A, data B, heartbeat B, heartbeat A.
        // Each half as an insecure primary sends it: preamble, then offer.
        let half = |kind, s| [&encode_preamble(kind, s)[..], &crate::auth::INSECURE_OFFER].concat();
        let _da = raw_connect(&l, &half(ConnectionKind::Data, sa));
        let _db = raw_connect(&l, &half(ConnectionKind::Data, sb));
        let _hb = raw_connect(&l, &half(ConnectionKind::Heartbeat, sb));
        let _ha = raw_connect(&l, &half(ConnectionKind::Heartbeat, sa));
        let (d1, h1) = l.accept_pair(T).unwrap();
        assert_eq!((d1.session(), h1.session()), (Some(sb), Some(sb)));
        let (d2, h2) = l.accept_pair(T).unwrap();
        assert_eq!((d2.session(), h2.session()), (Some(sa), Some(sa)));
    }

    #[test]
    fn silent_peer_is_dropped_after_the_preamble_timeout_budget() {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        let _silent = raw_connect(&l, b"");
        let t0 = Instant::now();
        let err = l.accept_pair(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, TransportError::AcceptTimeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(l.rejected(), 1);
    }
}
