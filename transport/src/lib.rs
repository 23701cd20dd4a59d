//! Moving bytes between the ftvmm primary and its standby.
//!
//! The protocol (preamble, frame kinds, heartbeat frame, fencing rule) is
//! `ftvmm_checkpoint::protocol`; this crate moves its bytes. The `checkpoint`
//! crate frames a checkpoint as chunks pointing into its staging slabs;
//! [`Channel::send_checkpoint`] hands them to the channel's own gather send
//! ([`Channel::send_chunks`]), copying nothing. On the standby frames are
//! decoded from [`Channel::reader`] (any `std::io::Read`; [`TcpChannel`] is
//! one itself), and [`Channel::writer`] gives an `io::Write` over any
//! channel.
//!
//! - [`Channel`]: a reliable ordered byte stream; [`TcpChannel`] implements it
//!   over TCP (`TCP_NODELAY`, large socket buffers, no keepalive), and
//!   `RdmaChannel` over an RDMA reliable-connected queue pair behind the
//!   cargo feature `rdma` ([`rdma`]); [`DataChannel`] is either, as
//!   `--transport` picks ([`connect_pair_over`],
//!   [`ChannelListener::accept_data_pair`]).
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
//! use std::time::Duration;
//! use ftvmm_checkpoint::{CheckpointFrame, Staging, StagingConfig};
//! use ftvmm_transport::{connect_pair, Channel, Heartbeat};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Primary side.
//! let (mut data, hb) = connect_pair("127.0.0.1:7000", Duration::from_secs(5))?;
//! let heartbeat = Heartbeat::start(hb, Duration::from_millis(20), 5, /* generation */ 1)?;
//! let mut staging = Staging::new(StagingConfig::for_guest(64 << 20))?;
//! let mut epoch = staging.begin_epoch();
//! epoch.page_slot(0x1000)?.fill(0xaa);
//! epoch.stage_state(b"machine state")?;
//! epoch.finish();
//! data.send_checkpoint(&CheckpointFrame::new(&staging, 1, /* generation */ 1))?;
//! heartbeat.set_epoch(1);
//! if let Some(lost) = heartbeat.failure() {
//!     eprintln!("standby lost: {lost}");
//! }
//! # Ok(()) }
//! ```

mod auth;
pub mod channel;
mod data;
mod error;
pub mod handshake;
pub mod heartbeat;
pub mod rdma;
pub mod record;
pub mod secure;
mod tcp;
#[cfg(test)]
mod test_utils;
mod wait;

pub use channel::{Channel, ChannelReader, ChannelWriter, SEND_WINDOW};
pub use data::{connect_pair_over, DataChannel, Transport, RDMA_SETUP_TIMEOUT};
pub use error::{Refusal, TransportError};
pub use handshake::{connect_pair, connect_pair_with, ConnectionKind, Incoming, SessionId};
pub use heartbeat::{
    FailureDetector, Heartbeat, HeartbeatHandle, HeartbeatStream, KeepaliveLoss, PeerLost,
};
#[cfg(feature = "rdma")]
pub use rdma::RdmaChannel;
pub use rdma::{RdmaConfig, RdmaError};
pub use secure::{Cipher, FtKey, KeyError, Security};
pub use tcp::{ChannelListener, ChannelStats, TcpChannel, TcpOptions, DEFAULT_SOCKET_BUFFER};
