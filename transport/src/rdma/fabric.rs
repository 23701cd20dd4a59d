//! What the RDMA channel needs of a device, as two small traits.
//!
//! [`Provider`] is an opened device port with its protection domain:
//! it registers memory and makes [`Endpoint`]s. An [`Endpoint`] is one
//! reliable-connected queue pair with its completion queue. The channel
//! ([`super::channel`]), its setup ([`super::setup`]) and the keepalive
//! ([`super::keepalive`]) are written against these traits only; the real
//! implementation is [`super::verbs`] (libibverbs through rdma-sys), and the
//! tests run the same code over an in-process software fabric
//! (`super::soft`), which checks keys, ranges, queue depths and receive
//! buffers the way a device would.

use std::io;
use std::os::fd::RawFd;

use super::msg::{PortAddress, QpEndpoint};

/// One scatter/gather element: local memory covered by a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the registration covering it.
    pub lkey: u32,
}

/// Remote memory: an address in the peer's registration `rkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// Remote address.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// What a completion completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcKind {
    /// A SEND of ours.
    Send,
    /// An RDMA WRITE of ours.
    Write,
    /// A SEND of the peer, into one of our posted receives.
    Recv,
    /// Anything else (not used by the channel).
    Other(u32),
}

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// `ibv_wc_status` (0: success).
    pub status: u32,
    /// Its kind (valid on success only).
    pub kind: WcKind,
    /// Bytes received (receives only).
    pub byte_len: u32,
}

/// `IBV_WC_SUCCESS`.
pub const WC_SUCCESS: u32 = 0;
/// `IBV_WC_WR_FLUSH_ERR`: the queue pair went to the error state (our
/// shutdown, or an earlier error) and flushed this request.
pub const WC_WR_FLUSH_ERR: u32 = 5;

/// What a registration allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device reads it (sources of sends and writes).
    Read,
    /// The device also writes it (receive buffers).
    Write,
    /// The peer writes it with RDMA WRITEs (receive ring, keepalive slot).
    RemoteWrite,
}

/// A memory registration; dropping it deregisters.
pub trait Region: Send + Sync {
    /// Key for local scatter/gather elements.
    fn lkey(&self) -> u32;
    /// Key the peer names this memory by.
    fn rkey(&self) -> u32;
}

/// Sizes of one endpoint's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Send queue depth (work requests posted and not yet retired).
    pub send_wr: u32,
    /// Receive queue depth.
    pub recv_wr: u32,
    /// Scatter/gather elements per send work request.
    pub send_sge: u32,
    /// Bytes of inline data per send work request.
    pub inline: u32,
    /// A completion channel: [`Endpoint::event_fd`] becomes pollable.
    pub events: bool,
}

/// An opened device port and its protection domain.
pub trait Provider: Send + Sync {
    /// The device's name (e.g. `mlx5_0`, `rxe0`).
    fn name(&self) -> &str;

    /// How the peer reaches this port.
    fn port_address(&self) -> PortAddress;

    /// Most scatter/gather elements one send work request may carry.
    fn max_sge(&self) -> u32;

    /// Registers `len` bytes at `addr` for `access`.
    ///
    /// # Safety
    /// The memory must stay allocated (and mapped) until the returned
    /// registration is dropped; with [`Access::RemoteWrite`] the peer may
    /// write it at any time, so Rust code must access it through raw
    /// pointers or atomics only.
    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> io::Result<Box<dyn Region>>;

    /// A new reliable-connected queue pair (in INIT, ready for receives to
    /// be posted) with its own completion queue.
    fn endpoint(&self, caps: Caps) -> io::Result<Box<dyn Endpoint>>;
}

/// One reliable-connected queue pair and its completion queue.
///
/// Thread safety follows libibverbs (every verb may be called from any
/// thread); the channel still posts and polls from one thread, and other
/// threads only call [`Endpoint::break_connection`].
pub trait Endpoint: Send + Sync {
    /// The queue pair number.
    fn qpn(&self) -> u32;

    /// Moves the queue pair INIT → RTR → RTS towards `peer_qp` at `peer`,
    /// our send queue starting at `local_psn`.
    fn connect(&self, local_psn: u32, peer: &PortAddress, peer_qp: QpEndpoint) -> io::Result<()>;

    /// Posts one RDMA WRITE of the elements, in order, to `remote`
    /// (`signaled`: it produces a completion).
    ///
    /// # Safety
    /// The memory of every element must stay valid and unchanged until the
    /// completion of this request, or of a later signaled one, is polled.
    unsafe fn post_write(
        &self,
        sges: &[Sge],
        remote: Remote,
        wr_id: u64,
        signaled: bool,
    ) -> io::Result<()>;

    /// Posts a signaled RDMA WRITE of `data` (copied at once: inline).
    fn post_write_inline(&self, data: &[u8], remote: Remote, wr_id: u64) -> io::Result<()>;

    /// Posts a signaled SEND of `data` (copied at once: inline).
    fn post_send_inline(&self, data: &[u8], wr_id: u64) -> io::Result<()>;

    /// Posts a receive into `sge`.
    ///
    /// # Safety
    /// The memory must stay valid until the receive completes (or is
    /// flushed), and Rust code must not access it meanwhile.
    unsafe fn post_recv(&self, sge: Sge, wr_id: u64) -> io::Result<()>;

    /// Takes up to `out.len()` completions.
    fn poll(&self, out: &mut [Completion]) -> io::Result<usize>;

    /// Asks for an event on [`Endpoint::event_fd`] at the next completion.
    fn arm(&self) -> io::Result<()>;

    /// A descriptor that becomes readable once an armed completion queue
    /// gets a completion (with [`Caps::events`]).
    fn event_fd(&self) -> Option<RawFd>;

    /// Consumes the events that made [`Endpoint::event_fd`] readable
    /// (never blocks).
    fn take_events(&self) -> io::Result<()>;

    /// Moves the queue pair to the error state: outstanding and later work
    /// requests complete with [`WC_WR_FLUSH_ERR`].
    fn break_connection(&self) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::wc_status_name as status_name;

    #[test]
    fn status_names_follow_libibverbs() {
        assert_eq!(status_name(WC_SUCCESS), "success");
        assert_eq!(status_name(WC_WR_FLUSH_ERR), "Work Request Flushed Error");
        assert_eq!(status_name(12), "transport retry counter exceeded");
        assert_eq!(status_name(99), "unknown completion status");
    }
}
