//! The one error type of this crate.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ftvmm_checkpoint::protocol::PreambleError;

/// Everything that can go wrong while moving bytes between primary and standby.
///
/// Every message names what failed and with which address, e.g.
/// `cannot connect to 127.0.0.1:7000: connection refused`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// `HOST:PORT` did not resolve to any socket address.
    #[error("cannot resolve '{addr}': {}", io_msg(.source))]
    Resolve {
        /// The address as given.
        addr: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// `HOST:PORT` resolved, but to no socket address at all.
    #[error("'{addr}' resolved to no address")]
    NoAddress {
        /// The address as given.
        addr: String,
    },
    /// A stream handed to us has no peer (it is not connected).
    #[error("cannot use a stream without a peer as a heartbeat connection: {}", io_msg(.source))]
    NoPeer {
        /// `getpeername(2)`'s error.
        source: io::Error,
    },
    /// `connect(2)` failed (or timed out) for the address.
    #[error("cannot connect to {addr}: {}", io_msg(.source))]
    Connect {
        /// The address we tried.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// `bind(2)`/`listen(2)` failed.
    #[error("cannot listen on {addr}: {}", io_msg(.source))]
    Bind {
        /// The address as given.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// `accept(2)` (or the epoll wait in front of it) failed.
    #[error("cannot accept a connection on {addr}: {}", io_msg(.source))]
    Accept {
        /// The listening address.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// Nothing (or no matching pair) arrived on the listener in time.
    #[error("no {what} arrived on {addr} within {} ms", .after.as_millis())]
    AcceptTimeout {
        /// The listening address.
        addr: SocketAddr,
        /// What we were waiting for ("connection", "data + heartbeat pair").
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// A socket option could not be set or read.
    #[error("cannot set {option} on the connection to {addr}: {}", io_msg(.source))]
    SocketOption {
        /// The peer (or local, for listeners) address.
        addr: SocketAddr,
        /// The option, e.g. `SO_SNDBUF`.
        option: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// Writing to the peer failed.
    #[error("cannot send to {addr}: {}", io_msg(.source))]
    Send {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// A checkpoint frame could not be sent in full: the stream now ends in
    /// a torn frame, which the standby discards (I2).
    #[error("checkpoint {epoch} of generation {generation} ({len} bytes) not sent: {source}")]
    SendCheckpoint {
        /// The checkpoint's epoch.
        epoch: u64,
        /// Its generation.
        generation: u64,
        /// The frame's length.
        len: u64,
        /// What failed (a send error or timeout, naming the peer).
        source: Box<TransportError>,
    },
    /// Reading from the peer failed.
    #[error("cannot receive from {addr}: {}", io_msg(.source))]
    Recv {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("connection to {addr} closed by the peer after {got} of {wanted} bytes")]
    Closed {
        /// The peer.
        addr: SocketAddr,
        /// Bytes of the current message received before EOF.
        got: usize,
        /// Bytes the message needed.
        wanted: usize,
    },
    /// A read (or write) timeout set on the connection expired.
    #[error("timed out after {} ms waiting to {op} {addr}", .after.as_millis())]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// "receive from", "send to", ...
        op: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// `shutdown(2)` failed.
    #[error("cannot shut down the connection to {addr}: {}", io_msg(.source))]
    Shutdown {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// `dup(2)` of the socket failed.
    #[error("cannot clone the connection to {addr}: {}", io_msg(.source))]
    Clone {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// The first 8 bytes of a connection were not an ftvmm preamble.
    #[error("rejected the connection from {addr}: bad preamble {bytes:02x?} ({reason})")]
    BadPreamble {
        /// The peer.
        addr: SocketAddr,
        /// The bytes it sent.
        bytes: [u8; 8],
        /// What was wrong with them.
        reason: PreambleError,
    },
    /// The preamble was ours but from an incompatible protocol version.
    #[error("rejected the connection from {addr}: protocol version {version}, this build speaks {supported}")]
    UnsupportedVersion {
        /// The peer.
        addr: SocketAddr,
        /// The version it announced.
        version: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// A heartbeat thread could not be spawned.
    #[error("cannot start the heartbeat {what} thread: {}", io_msg(.source))]
    Spawn {
        /// "sender" or "receiver".
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// The epoll set or timerfd a connection is waited on could not be made.
    #[error("cannot set up waiting on the connection to {addr} (epoll, timerfd): {}", io_msg(.source))]
    Wait {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
    },
    /// The failure eventfd could not be created.
    #[error("cannot create the failure-detector eventfd: {}", io_msg(.source))]
    EventFd {
        /// Why it failed.
        source: io::Error,
    },
    /// The peer refused our handshake (a key on one side only, or ours is
    /// not the one it holds).
    #[error("{addr} refused the connection: {reason}")]
    AuthRefused {
        /// The peer.
        addr: SocketAddr,
        /// What it said.
        reason: Refusal,
    },
    /// The peer failed the handshake (see [`Refusal`]); it was told so and
    /// the connection closed.
    #[error("rejected the connection from {addr}: {reason}")]
    AuthFailed {
        /// The peer.
        addr: SocketAddr,
        /// What was wrong.
        reason: Refusal,
    },
    /// A sealed record did not open: the stream was altered, replayed,
    /// reordered or truncated, or is not from the key holder. The connection
    /// is dropped.
    #[error("rejected a sealed record from {addr}: {source}")]
    Tampered {
        /// The peer.
        addr: SocketAddr,
        /// Which record.
        source: crate::secure::Rejected,
    },
    /// A sealed record announced a length beyond the limit.
    #[error("rejected a sealed record from {addr}: length {len} (at most {max})")]
    RecordTooLong {
        /// The peer.
        addr: SocketAddr,
        /// The length it announced.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A clone of a sealed channel was used to send or receive (clones hold
    /// no keys: they can only shut the channel down).
    #[error("a clone of the sealed channel to {addr} can only shut it down")]
    SealedClone {
        /// The peer.
        addr: SocketAddr,
    },
    /// The handshake's random nonce could not be drawn.
    #[error("cannot draw a handshake nonce: {0}")]
    Random(crate::secure::KeyError),
    /// The RDMA transport (`--transport rdma`): a device, its setup with
    /// the peer, or the running channel.
    #[error(transparent)]
    Rdma(#[from] crate::rdma::RdmaError),
}

/// Why one side of a handshake turned the other away. Sent as one byte, so
/// the refused side can say exactly why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The accepting side holds a key; the connecting one runs `--ft-insecure`.
    NeedKey,
    /// The accepting side runs `--ft-insecure`; the connecting one holds a key.
    Insecure,
    /// The connecting side's proof failed: it does not hold the key the
    /// accepting side holds.
    WrongKey,
    /// The accepting side's proof failed: it does not hold the connecting
    /// side's key.
    ResponderWrongKey,
    /// A cipher this side does not know.
    Cipher(u8),
    /// A refusal code this build does not know.
    Unknown(u8),
}

impl Refusal {
    /// Its code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Refusal::NeedKey => 1,
            Refusal::Insecure => 2,
            Refusal::WrongKey => 3,
            Refusal::ResponderWrongKey => 4,
            Refusal::Cipher(_) => 5,
            Refusal::Unknown(c) => c,
        }
    }

    /// The refusal with this code (never 0, which means "accepted").
    pub fn from_code(code: u8) -> Refusal {
        match code {
            1 => Refusal::NeedKey,
            2 => Refusal::Insecure,
            3 => Refusal::WrongKey,
            4 => Refusal::ResponderWrongKey,
            5 => Refusal::Cipher(0),
            c => Refusal::Unknown(c),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NeedKey => f.write_str(
                "the standby requires a key (--ft-key) but the primary runs with --ft-insecure",
            ),
            Refusal::Insecure => f.write_str(
                "the standby runs with --ft-insecure but the primary has a key (--ft-key): \
                 both sides must use the same setting",
            ),
            Refusal::WrongKey => f.write_str(
                "authentication failed: the primary does not hold the standby's key (--ft-key differs)",
            ),
            Refusal::ResponderWrongKey => f.write_str(
                "authentication failed: the standby does not hold the primary's key (--ft-key differs)",
            ),
            Refusal::Cipher(0) => f.write_str("the peer offered a cipher this build does not know"),
            Refusal::Cipher(c) => write!(f, "unknown cipher code {c}"),
            Refusal::Unknown(c) => write!(f, "refused with code {c}"),
        }
    }
}

impl TransportError {
    /// True if this error concerns one incoming connection only (a bad or slow
    /// peer); a listener that gets it keeps listening.
    pub fn is_per_connection(&self) -> bool {
        matches!(
            self,
            TransportError::BadPreamble { .. }
                | TransportError::UnsupportedVersion { .. }
                | TransportError::Closed { .. }
                | TransportError::Recv { .. }
                | TransportError::Timeout { .. }
                | TransportError::SocketOption { .. }
                | TransportError::AuthFailed { .. }
                | TransportError::Tampered { .. }
                | TransportError::RecordTooLong { .. }
                | TransportError::Send { .. }
                // A standby's RDMA setup concerns one primary: another may
                // come (over TCP, or once the device is back).
                | TransportError::Rdma(_)
        )
    }

    /// The `std::io::ErrorKind` that best describes this error.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            TransportError::Resolve { source, .. }
            | TransportError::NoPeer { source }
            | TransportError::Connect { source, .. }
            | TransportError::Bind { source, .. }
            | TransportError::Accept { source, .. }
            | TransportError::SocketOption { source, .. }
            | TransportError::Send { source, .. }
            | TransportError::Recv { source, .. }
            | TransportError::Shutdown { source, .. }
            | TransportError::Clone { source, .. }
            | TransportError::Spawn { source, .. }
            | TransportError::Wait { source, .. }
            | TransportError::EventFd { source } => source.kind(),
            TransportError::SendCheckpoint { source, .. } => source.io_kind(),
            TransportError::NoAddress { .. } => io::ErrorKind::NotFound,
            TransportError::Closed { .. } => io::ErrorKind::UnexpectedEof,
            TransportError::Timeout { .. } | TransportError::AcceptTimeout { .. } => {
                io::ErrorKind::TimedOut
            }
            TransportError::BadPreamble { .. }
            | TransportError::UnsupportedVersion { .. }
            | TransportError::Tampered { .. }
            | TransportError::RecordTooLong { .. } => io::ErrorKind::InvalidData,
            TransportError::AuthRefused { .. } | TransportError::AuthFailed { .. } => {
                io::ErrorKind::PermissionDenied
            }
            TransportError::SealedClone { .. } => io::ErrorKind::Unsupported,
            TransportError::Random(_) => io::ErrorKind::Other,
            TransportError::Rdma(e) => e.io_kind(),
        }
    }
}

impl From<TransportError> for io::Error {
    /// Lets a decoder reading through [`crate::ChannelReader`] see a normal
    /// `io::Error` whose kind matches (`UnexpectedEof`, `TimedOut`, ...).
    fn from(e: TransportError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}

/// Formats an `io::Error` the way our messages want it: "connection refused",
/// not "Connection refused (os error 111)".
pub(crate) fn io_msg(e: &io::Error) -> String {
    let mut s = e.to_string();
    if e.raw_os_error().is_some() {
        if let Some(i) = s.rfind(" (os error ") {
            s.truncate(i);
        }
    }
    let mut chars = s.chars();
    match chars.next() {
        // Lower-case only a capitalised word ("Connection"), not an acronym.
        Some(c)
            if c.is_ascii_uppercase() && chars.next().is_some_and(|n| n.is_ascii_lowercase()) =>
        {
            s[..1].to_ascii_lowercase() + &s[1..]
        }
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_message_names_address_and_cause() {
        let e = TransportError::Connect {
            addr: "127.0.0.1:7000".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to 127.0.0.1:7000: connection refused"
        );
        assert_eq!(e.io_kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn non_os_errors_are_kept() {
        let e = io::Error::other("EOF in preamble");
        assert_eq!(io_msg(&e), "EOF in preamble");
    }

    #[test]
    fn into_io_error_keeps_kind() {
        let e = TransportError::Closed {
            addr: "127.0.0.1:1".parse().unwrap(),
            got: 3,
            wanted: 8,
        };
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::UnexpectedEof);
        assert!(io.to_string().contains("after 3 of 8 bytes"));
    }
}
