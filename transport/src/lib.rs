//! Moving bytes between the ftvmm primary and its standby.
//!
//! This crate knows nothing of the checkpoint format: the `checkpoint` crate
//! frames a checkpoint as a list of [`std::io::IoSlice`]s pointing into its
//! staging slabs and gives them to [`Channel::send_vectored_all`]; on the
//! standby it decodes frames from [`Channel::reader`] (any `std::io::Read`).
//! [`TcpChannel`] is also an `io::Read` and `io::Write` itself, and
//! [`Channel::writer`] gives an `io::Write` over any channel.
//!
//! - [`Channel`]: a reliable ordered byte stream; [`TcpChannel`] implements it
//!   over TCP (`TCP_NODELAY`, large socket buffers, no keepalive), and an RDMA
//!   channel can later do so behind the cargo feature `rdma` (see the
//!   [`channel`] module for how the trait fits registered slabs).
//! - [`Heartbeat`] / [`HeartbeatHandle`] / [`FailureDetector`]: the
//!   protocol's heartbeat frames (`ftvmm_checkpoint::protocol::Heartbeat`)
//!   both ways on a separate connection; the peer is lost on connection loss
//!   (at once), on `interval × k` of silence, or on a heartbeat that the
//!   protocol's fencing rule refuses (DESIGN.md I5). The VMM waits on an
//!   eventfd.
//! - [`connect_pair`] / [`ChannelListener::accept_pair`]: the primary opens
//!   the data and heartbeat connections to one `HOST:PORT`; the protocol's
//!   preamble with a session id lets the standby pair them and refuse
//!   anything else.
//! - [`TransportError`]: the one error type.
//!
//! ```no_run
//! use std::io::IoSlice;
//! use std::time::Duration;
//! use ftvmm_transport::{connect_pair, Channel, Heartbeat};
//!
//! # fn main() -> Result<(), ftvmm_transport::TransportError> {
//! // Primary side.
//! let (mut data, hb) = connect_pair("127.0.0.1:7000", Duration::from_secs(5))?;
//! let heartbeat = Heartbeat::start(hb, Duration::from_millis(20), 5, /* generation */ 1)?;
//! let (header, page) = ([0u8; 16], [0u8; 4096]);
//! data.send_vectored_all(&[IoSlice::new(&header), IoSlice::new(&page)])?;
//! heartbeat.set_epoch(1);
//! if let Some(lost) = heartbeat.failure() {
//!     eprintln!("standby lost: {lost}");
//! }
//! # Ok(()) }
//! ```

pub mod channel;
mod error;
pub mod handshake;
pub mod heartbeat;
mod tcp;
#[cfg(test)]
mod test_utils;

pub use channel::{Channel, ChannelReader, ChannelWriter, SEND_WINDOW};
pub use error::TransportError;
pub use handshake::{connect_pair, connect_pair_with, ConnectionKind, Incoming, SessionId};
pub use heartbeat::{FailureDetector, Heartbeat, HeartbeatHandle, HeartbeatStream, PeerLost};
pub use tcp::{ChannelListener, ChannelStats, TcpChannel, TcpOptions, DEFAULT_SOCKET_BUFFER};
