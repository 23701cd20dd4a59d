//! The [`Channel`] trait: a reliable, ordered byte stream from primary to
//! standby (and the acks back).
//!
//! # Shape, and room for RDMA
//!
//! The checkpoint crate stages a checkpoint in a list of fixed-size *slabs*
//! (DESIGN.md, "Staging memory") and frames it as a [`CheckpointFrame`]: a
//! head, the page index, the slabs' used parts and a trailer, each a slice
//! straight into the staging. [`Channel::send_checkpoint`] hands those slices
//! to the channel's one gather send, [`Channel::send_chunks`]; nothing in
//! between copies the bytes or allocates. The TCP channel passes them to
//! `sendmsg(2)` a window of [`SEND_WINDOW`] slices at a time.
//!
//! The same call fits the RDMA channel (cargo feature `rdma`,
//! `crate::rdma`; DESIGN.md `--transport rdma`): slabs are long-lived (the
//! head slab is permanent and the list only grows or halves after several
//! strikes), so the plain RDMA channel's `send_checkpoint` registers each
//! slab once (`ibv_reg_mr`; again only when the frame's staging reports a
//! changed [`ftvmm_checkpoint::SlabSet`]) and turns every chunk inside one
//! into a scatter/gather element of an RDMA WRITE, looking the registration
//! up by address; other slices (and every byte of a sealed channel, which
//! must be encrypted somewhere) go through its registered bounce ring. On
//! the receiving side [`Channel::recv_exact`] copies each record out of the
//! channel's registered receive ring into the caller's buffer, opening it
//! there when sealed, as TCP's records are.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ftvmm_checkpoint::CheckpointFrame;

use crate::TransportError;

/// How many `IoSlice`s one `sendmsg(2)` call is given at most (on the stack;
/// well under the kernel's `IOV_MAX` of 1024).
pub const SEND_WINDOW: usize = 128;

/// A reliable, ordered byte stream between primary and standby.
///
/// Implemented by [`crate::TcpChannel`], by the RDMA channel (feature
/// `rdma`) and by [`crate::DataChannel`], which is either as `--transport`
/// picks. The trait is dyn-compatible.
pub trait Channel: Send {
    /// Sends every byte of every chunk `chunks` yields, in order, and
    /// returns the total: the channel's gather send, which every other send
    /// goes through.
    ///
    /// Gathers several chunks into each system call (or RDMA work request),
    /// handles short writes and `EINTR` by advancing through them; the bytes
    /// are never copied into an intermediate buffer and the call does not
    /// allocate. Empty chunks are allowed and skipped. On error an unknown
    /// prefix of the data has been sent: the stream is no longer usable for
    /// framed messages.
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError>;

    /// Sends every byte of every slice, in order, and returns the total
    /// ([`Channel::send_chunks`] over the slices).
    fn send_vectored_all(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        let n = self.send_chunks(&mut bufs.iter().map(|b| &**b))?;
        Ok(usize::try_from(n).expect("sent no more than the slices hold"))
    }

    /// Sends all of `buf` (a one-chunk [`Channel::send_chunks`]).
    fn send_all(&mut self, buf: &[u8]) -> Result<(), TransportError> {
        self.send_chunks(&mut std::iter::once(buf)).map(|_| ())
    }

    /// Sends a checkpoint frame straight from its staging slabs: its chunks
    /// (head, page index, each slab's used part, trailer) go to
    /// [`Channel::send_chunks`], with no copy and no allocation. Returns the
    /// frame's length. The error names the checkpoint, its size and the
    /// peer.
    fn send_checkpoint(&mut self, frame: &CheckpointFrame<'_>) -> Result<u64, TransportError> {
        self.send_chunks(&mut frame.chunks())
            .map_err(|source| TransportError::SendCheckpoint {
                epoch: frame.epoch(),
                generation: frame.generation(),
                len: frame.len(),
                source: Box::new(source),
            })
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

/// What one gather send did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendOutcome {
    /// Bytes written.
    pub bytes: u64,
    /// Calls to `write`.
    pub calls: u64,
    /// Calls that wrote less than they were offered.
    pub short: u64,
}

/// Writes every chunk of `chunks` through `write` (one `sendmsg`-like call
/// at a time, given up to [`SEND_WINDOW`] slices), topping the window up
/// from the iterator after every call, advancing through the slices after
/// short writes and retrying on `EINTR`. The window lives on the stack: no
/// allocation, no copy of the data. This is the one gather loop of the
/// crate.
pub(crate) fn write_all_chunks<'a, F>(
    chunks: &mut dyn Iterator<Item = &'a [u8]>,
    mut write: F,
) -> io::Result<SendOutcome>
where
    F: FnMut(&[IoSlice<'a>]) -> io::Result<usize>,
{
    let mut window = [IoSlice::new(&[]); SEND_WINDOW];
    let mut in_window = 0usize; // window[..in_window] is pending
    let mut more = true; // `chunks` may yield more
    let mut out = SendOutcome::default();
    loop {
        // Top the window up with the next non-empty chunks.
        while more && in_window < SEND_WINDOW {
            match chunks.next() {
                Some([]) => {}
                Some(c) => {
                    window[in_window] = IoSlice::new(c);
                    in_window += 1;
                }
                None => more = false,
            }
        }
        if in_window == 0 {
            return Ok(out);
        }
        let offered: usize = window[..in_window].iter().map(|s| s.len()).sum();
        match write(&window[..in_window]) {
            // The caller's socket took nothing of a non-empty offer.
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.bytes += n as u64;
                out.calls += 1;
                if n < offered {
                    out.short += 1;
                }
                let mut rest: &mut [IoSlice<'a>] = &mut window[..in_window];
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
    use crate::test_utils::{
        pattern, receiver_limits, staged_checkpoint, Dribble, LoopbackChannel, XorShift,
    };
    use ftvmm_checkpoint::{Frame, FrameReader, Staging};

    #[test]
    fn short_writes_and_eintr_deliver_every_byte_in_order() {
        // 1000 slices of 0..3000 bytes (some empty), more than one window.
        let mut r = XorShift::new(7);
        let bufs: Vec<Vec<u8>> = (0..1000)
            .map(|i| pattern((r.next() % 3000) as usize * usize::from(i % 11 != 0), i))
            .collect();
        let expected: Vec<u8> = bufs.concat();

        let mut d = Dribble::new(7);
        let out = write_all_chunks(&mut bufs.iter().map(|b| &b[..]), |iov| d.write(iov)).unwrap();
        assert_eq!(out.bytes, expected.len() as u64);
        assert!(out.short > 10, "the mock should have forced short writes");
        assert!(d.interrupted > 0, "the mock should have returned EINTR");
        assert!(d.max_offered <= SEND_WINDOW);
        assert_eq!(d.sink, expected);
    }

    #[test]
    fn write_zero_is_an_error() {
        let data = [1u8; 10];
        let err = write_all_chunks(&mut std::iter::once(&data[..]), |_| Ok(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn nothing_to_send_makes_no_call() {
        let empty: [&[u8]; 2] = [&[], &[]];
        let out = write_all_chunks(&mut empty.into_iter(), |_| panic!("no call expected")).unwrap();
        assert_eq!(out, SendOutcome::default());
    }

    #[test]
    fn a_checkpoint_goes_through_the_channel_with_short_writes_and_eintr_uncopied() {
        // 300 one-page slabs: the frame has more chunks than one send window.
        let st = staged_checkpoint(300, 5000);
        let frame = CheckpointFrame::new(&st, 7, 2);
        assert!(frame.chunks().count() > SEND_WINDOW);
        let mut d = Dribble::new(11);
        // Every slice offered must point into the frame's own chunks: the
        // staging's slabs and index, or the frame's head and trailer.
        d.allowed = frame
            .chunks()
            .map(|c| c.as_ptr() as usize..c.as_ptr() as usize + c.len())
            .collect();
        let mut ch = LoopbackChannel::new(d);

        let sent = ch.send_checkpoint(&frame).unwrap();
        assert_eq!(sent, frame.len());
        let mut expected = Vec::new();
        frame.copy_into(&mut expected);
        assert_eq!(ch.dribble.sink, expected);
        assert!(ch.dribble.interrupted > 0 && ch.dribble.max_offered <= SEND_WINDOW);
        assert!(
            ch.dribble.calls > frame.len() / 20_000,
            "short writes: {} calls",
            ch.dribble.calls
        );

        // The standby's decoder, reading the same channel, gets the checkpoint.
        let limits = receiver_limits(300);
        let mut rx = Staging::new(limits.staging_config()).unwrap();
        let Frame::Checkpoint(cp) = FrameReader::new(limits)
            .read_frame(&mut ch.reader(), &mut rx)
            .unwrap()
        else {
            panic!("expected a checkpoint");
        };
        assert_eq!((cp.epoch(), cp.generation(), cp.page_count()), (7, 2, 300));
        assert!(cp.pages().eq(st.pages()));
        let mut state = Vec::new();
        cp.copy_state_into(&mut state);
        assert_eq!(state, pattern(5000, 1 << 32));
    }

    #[test]
    fn a_failed_checkpoint_send_names_the_checkpoint_its_size_and_the_peer() {
        let st = staged_checkpoint(4, 100);
        let frame = CheckpointFrame::new(&st, 9, 3);
        let mut d = Dribble::new(5);
        d.fail_after = Some(5000);
        let mut ch = LoopbackChannel::new(d);
        let err = ch.send_checkpoint(&frame).unwrap_err();
        assert!(
            matches!(
                &err,
                TransportError::SendCheckpoint { epoch: 9, generation: 3, len, source }
                    if *len == frame.len()
                        && matches!(**source, TransportError::Send { .. })
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint 9 of generation 3 ({} bytes) not sent: cannot send to 127.0.0.1:9: broken pipe",
                frame.len()
            )
        );
        assert_eq!(err.io_kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(ch.dribble.sink.len(), 5000, "a torn prefix went out");
    }

    #[test]
    fn provided_sends_go_through_send_chunks() {
        let mut ch = LoopbackChannel::new(Dribble::new(3));
        let (a, b) = (pattern(3000, 1), pattern(70_000, 2));
        ch.send_all(b"head").unwrap();
        let n = ch
            .send_vectored_all(&[IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)])
            .unwrap();
        assert_eq!(n, a.len() + b.len());
        ch.writer().write_all(b"tail").unwrap();
        assert_eq!(ch.dribble.sink, [&b"head"[..], &a, &b, b"tail"].concat());
    }
}
