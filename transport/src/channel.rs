//! The [`Channel`] trait: a reliable, ordered byte stream from primary to
//! standby (and the acks back).
//!
//! # Shape, and room for RDMA
//!
//! The checkpoint crate stages a checkpoint in a list of fixed-size *slabs*
//! (DESIGN.md, "Staging memory"). It frames a checkpoint as a list of
//! [`IoSlice`]s that point straight into those slabs and hands the whole list
//! to [`Channel::send_vectored_all`]; nothing in between copies the bytes.
//! The TCP channel passes the slices to `sendmsg(2)` a window at a time.
//!
//! The same call fits an RDMA channel (cargo feature `rdma`, not implemented
//! yet; DESIGN.md `--transport rdma`): slabs are long-lived (the head slab is
//! permanent and the list only grows or halves after several strikes), so an
//! RDMA channel registers each slab once (`ibv_reg_mr`, told through
//! [`Channel::register_buffer`]) and turns every `IoSlice` into one
//! scatter/gather element of an RDMA write, looking the memory region up by
//! address. Slices outside any registered region would go through a bounce
//! buffer. On the receiving side [`Channel::recv_exact`] lands bytes in a
//! caller-owned buffer, which for RDMA is the standby's own registered slab.
//! The TCP channel ignores registration hints.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::TransportError;

/// How many `IoSlice`s one `sendmsg(2)` call is given at most (on the stack;
/// well under the kernel's `IOV_MAX` of 1024).
pub const SEND_WINDOW: usize = 128;

/// A reliable, ordered byte stream between primary and standby.
///
/// Implemented by [`crate::TcpChannel`]; an RDMA channel would implement it
/// too (see the module documentation). The trait is dyn-compatible, so the
/// VMM can hold a `Box<dyn Channel>` chosen by `--transport`.
pub trait Channel: Send {
    /// Sends every byte of every slice, in order, and returns the total.
    ///
    /// Handles short writes and `EINTR` by advancing through the slices; the
    /// bytes are never copied into an intermediate buffer and the call does
    /// not allocate. Empty slices are allowed and skipped. On error an
    /// unknown prefix of the data has been sent: the stream is no longer
    /// usable for framed messages.
    fn send_vectored_all(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError>;

    /// Sends all of `buf` (a one-slice [`Channel::send_vectored_all`]).
    fn send_all(&mut self, buf: &[u8]) -> Result<(), TransportError> {
        self.send_vectored_all(&[IoSlice::new(buf)]).map(|_| ())
    }

    /// Receives up to `buf.len()` bytes; `Ok(0)` means the peer closed the
    /// stream (or `buf` is empty). Retries on `EINTR`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;

    /// Fills `buf` completely.
    ///
    /// EOF before the end is [`TransportError::Closed`] (with how many bytes
    /// did arrive); an expired read timeout is [`TransportError::Timeout`],
    /// after which the position in the stream is unknown.
    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError>;

    /// An [`io::Read`] view, for decoders that read frames from any reader.
    fn reader(&mut self) -> ChannelReader<'_, Self>
    where
        Self: Sized,
    {
        ChannelReader::new(self)
    }

    /// An [`io::Write`] view, for encoders that write frames to any writer.
    fn writer(&mut self) -> ChannelWriter<'_, Self>
    where
        Self: Sized,
    {
        ChannelWriter::new(self)
    }

    /// Sets (or clears, with `None`) the timeout of every receive call. A zero
    /// duration is rounded up to one millisecond (the socket API would read
    /// zero as "no timeout").
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Sets (or clears) how long a send may make no progress (the peer reads
    /// nothing) before it fails with [`TransportError::Timeout`], after
    /// sending an unknown part of the data. A large checkpoint may take
    /// longer than this in all as long as bytes keep moving.
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Shuts the stream down in both directions. Any thread blocked in a send
    /// or receive on this channel or a clone of it returns at once; the peer
    /// sees EOF.
    fn shutdown(&self) -> Result<(), TransportError>;

    /// Another handle to the same stream, so one thread can receive (acks)
    /// while another sends (checkpoints).
    fn try_clone(&self) -> Result<Self, TransportError>
    where
        Self: Sized;

    /// The address of the other end, for messages.
    fn peer_addr(&self) -> SocketAddr;

    /// Hint: `buf` (a staging slab) will be sent from or received into many
    /// times. An RDMA channel registers it with the NIC; TCP ignores it. The
    /// caller calls [`Channel::unregister_buffer`] before freeing the memory.
    fn register_buffer(&mut self, buf: &[u8]) -> Result<(), TransportError> {
        let _ = buf;
        Ok(())
    }

    /// Undoes [`Channel::register_buffer`].
    fn unregister_buffer(&mut self, buf: &[u8]) {
        let _ = buf;
    }
}

/// An [`io::Read`] over any [`Channel`] (also `dyn Channel`): reads map to
/// [`Channel::recv`], errors to an `io::Error` of the matching kind that
/// carries the [`TransportError`].
pub struct ChannelReader<'a, C: Channel + ?Sized> {
    channel: &'a mut C,
}

impl<'a, C: Channel + ?Sized> ChannelReader<'a, C> {
    /// Wraps a channel.
    pub fn new(channel: &'a mut C) -> Self {
        ChannelReader { channel }
    }
}

impl<C: Channel + ?Sized> Read for ChannelReader<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.channel.recv(buf).map_err(io::Error::from)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.channel.recv_exact(buf).map_err(io::Error::from)
    }
}

/// An [`io::Write`] over any [`Channel`] (also `dyn Channel`): every write
/// sends all it is given through [`Channel::send_vectored_all`].
pub struct ChannelWriter<'a, C: Channel + ?Sized> {
    channel: &'a mut C,
}

impl<'a, C: Channel + ?Sized> ChannelWriter<'a, C> {
    /// Wraps a channel.
    pub fn new(channel: &'a mut C) -> Self {
        ChannelWriter { channel }
    }
}

impl<C: Channel + ?Sized> Write for ChannelWriter<'_, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.channel
            .send_all(buf)
            .map(|_| buf.len())
            .map_err(io::Error::from)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.channel
            .send_vectored_all(bufs)
            .map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one vectored send did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendOutcome {
    /// Bytes written.
    pub bytes: usize,
    /// Calls to `write`.
    pub calls: u64,
    /// Calls that wrote less than they were offered.
    pub short: u64,
}

/// Writes all of `bufs` through `write` (one `writev`/`sendmsg`-like call at
/// a time), advancing through the slices after short writes and retrying on
/// `EINTR`. Uses a fixed window of [`SEND_WINDOW`] slices on the stack: no
/// allocation, no copy of the data.
pub(crate) fn write_all_vectored<F>(bufs: &[IoSlice<'_>], mut write: F) -> io::Result<SendOutcome>
where
    F: FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
{
    let mut window = [IoSlice::new(&[]); SEND_WINDOW];
    let mut in_window = 0usize; // window[..in_window] is pending
    let mut next = 0usize; // next slice of `bufs` to move into the window
    let mut out = SendOutcome::default();
    loop {
        // Top the window up with the next non-empty slices.
        while in_window < SEND_WINDOW && next < bufs.len() {
            if !bufs[next].is_empty() {
                window[in_window] = bufs[next];
                in_window += 1;
            }
            next += 1;
        }
        if in_window == 0 {
            return Ok(out);
        }
        let offered: usize = window[..in_window].iter().map(|s| s.len()).sum();
        match write(&window[..in_window]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket accepted 0 bytes",
                ))
            }
            Ok(n) => {
                out.bytes += n;
                out.calls += 1;
                if n < offered {
                    out.short += 1;
                }
                let mut rest: &mut [IoSlice<'_>] = &mut window[..in_window];
                IoSlice::advance_slices(&mut rest, n);
                let left = rest.len();
                window.copy_within(in_window - left..in_window, 0);
                in_window = left;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{pattern, XorShift};

    #[test]
    fn short_writes_and_eintr_deliver_every_byte_in_order() {
        // 1000 slices of 0..3000 bytes (some empty), more than one window.
        let mut r = XorShift::new(7);
        let bufs: Vec<Vec<u8>> = (0..1000)
            .map(|i| pattern((r.next() % 3000) as usize * usize::from(i % 11 != 0), i))
            .collect();
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let expected: Vec<u8> = bufs.concat();

        let mut sink = Vec::new();
        let mut calls = 0u32;
        let mut max_offered = 0usize;
        let out = write_all_vectored(&slices, |iov| {
            calls += 1;
            max_offered = max_offered.max(iov.len());
            assert!(iov.iter().all(|s| !s.is_empty()), "empty slice offered");
            if calls % 5 == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINTR));
            }
            // Accept a random amount, possibly ending mid-slice.
            let offered: usize = iov.iter().map(|s| s.len()).sum();
            let mut take = 1 + (r.next() as usize % offered.min(20_000));
            let n = take;
            for s in iov {
                let k = take.min(s.len());
                sink.extend_from_slice(&s[..k]);
                take -= k;
                if take == 0 {
                    break;
                }
            }
            Ok(n)
        })
        .unwrap();
        assert_eq!(out.bytes, expected.len());
        assert!(out.short > 10, "the mock should have forced short writes");
        assert!(max_offered <= SEND_WINDOW);
        assert_eq!(sink, expected);
    }

    #[test]
    fn write_zero_is_an_error() {
        let data = [1u8; 10];
        let err = write_all_vectored(&[IoSlice::new(&data)], |_| Ok(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn nothing_to_send_makes_no_call() {
        let out = write_all_vectored(&[IoSlice::new(&[]), IoSlice::new(&[])], |_| {
            panic!("no call expected")
        })
        .unwrap();
        assert_eq!(out, SendOutcome::default());
    }
}
