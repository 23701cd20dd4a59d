//! Sealed records: how a keyed [`crate::TcpChannel`] carries its byte
//! stream.
//!
//! Every send is cut into records of at most [`RECORD_MAX`] bytes:
//!
//! ```text
//! len: u32 LE | ciphertext: len bytes | tag: 16 bytes
//! ```
//!
//! sealed with the direction's AEAD key under the next counter, the length
//! authenticated as associated data. A record never spans two sends, so an
//! ack or a control message goes out at once. The receiver opens record n
//! with counter n: a record altered, replayed, reordered or dropped fails to
//! open, and the stream is over ([`crate::TransportError::Tampered`]). A
//! stream cut inside a record is a truncation the frame layer above already
//! treats as a torn frame.
//!
//! The send buffer and the receive buffer are made once per channel: the
//! hot path copies each chunk once into the send buffer (the AEAD works in
//! place), and large reads (`recv_exact` of a checkpoint's pages) are opened
//! straight in the caller's buffer.

use crate::secure::{Opener, Rejected, Sealer, SessionKeys, TAG_LEN};

/// The most plaintext one record carries.
pub const RECORD_MAX: usize = 256 * 1024;
/// Length of a record's header.
pub const RECORD_HEADER: usize = 4;

/// One channel's sealing state.
pub(crate) struct Records {
    tx: Sealer,
    rx: Opener,
    /// `header | payload | tag` of the record being built.
    out: Box<[u8]>,
    /// Bytes of payload in `out`.
    fill: usize,
    /// The received record: `payload | tag`, opened in place.
    inb: Box<[u8]>,
    /// Opened plaintext not yet handed out: `inb[start..end]`.
    start: usize,
    end: usize,
    /// A record being received into `inb`.
    partial: Partial,
    /// An error broke the stream inside a record: nothing more is read.
    pub broken: bool,
}

/// Progress through a record arriving in pieces (a read timeout may end a
/// read anywhere).
#[derive(Default, Clone, Copy)]
pub(crate) struct Partial {
    pub header: [u8; RECORD_HEADER],
    pub header_got: usize,
    /// Payload + tag bytes received.
    pub body_got: usize,
}

impl Partial {
    /// The announced payload length, once the header is complete.
    pub fn len(&self) -> Option<usize> {
        (self.header_got == RECORD_HEADER).then(|| u32::from_le_bytes(self.header) as usize)
    }
}

impl Records {
    pub fn new(keys: SessionKeys) -> Records {
        Records {
            tx: keys.tx,
            rx: keys.rx,
            out: Records::new_buffer(),
            fill: 0,
            inb: vec![0u8; RECORD_MAX + TAG_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            partial: Partial::default(),
            broken: false,
        }
    }

    /// Copies as much of `data` into the record being built as fits;
    /// returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(RECORD_MAX - self.fill);
        self.out[RECORD_HEADER + self.fill..RECORD_HEADER + self.fill + n]
            .copy_from_slice(&data[..n]);
        self.fill += n;
        n
    }

    /// The record is full.
    pub fn is_full(&self) -> bool {
        self.fill == RECORD_MAX
    }

    /// Payload waiting to be sealed.
    pub fn pending(&self) -> usize {
        self.fill
    }

    /// Seals the record being built and returns its wire bytes; the next
    /// push starts a new record.
    pub fn seal(&mut self) -> &[u8] {
        let len = self.fill;
        self.fill = 0;
        let (header, rest) = self.out.split_at_mut(RECORD_HEADER);
        header.copy_from_slice(&(len as u32).to_le_bytes());
        let tag = self.tx.seal(header, &mut rest[..len]);
        rest[len..len + TAG_LEN].copy_from_slice(&tag);
        &self.out[..RECORD_HEADER + len + TAG_LEN]
    }

    /// The sealed record's wire bytes (`len` as [`Records::seal`] returned).
    pub fn sealed(&self, len: usize) -> &[u8] {
        &self.out[..len]
    }

    /// Exchanges the record buffer (holding a sealed record) for `other`, a
    /// buffer of the same size that is free: a pipelined send hands the
    /// sealed record to its sender thread without copying it.
    pub fn swap_out(&mut self, other: &mut Box<[u8]>) {
        debug_assert_eq!(other.len(), self.out.len());
        std::mem::swap(&mut self.out, other);
    }

    /// A free buffer of the size records are built in.
    pub fn new_buffer() -> Box<[u8]> {
        vec![0u8; RECORD_HEADER + RECORD_MAX + TAG_LEN].into_boxed_slice()
    }

    /// The sealing keys, for a channel that goes on over another path (the
    /// RDMA channel after its TCP bootstrap): their counters continue.
    /// `None` if anything received is still unread (it would be lost) or
    /// the stream broke.
    #[cfg(feature = "rdma")]
    pub fn into_keys(self) -> Option<(Sealer, Opener)> {
        let idle = !self.broken
            && self.fill == 0
            && self.start == self.end
            && self.partial.header_got == 0
            && self.partial.body_got == 0;
        idle.then_some((self.tx, self.rx))
    }

    /// Hands out opened plaintext; returns how much was copied.
    pub fn take(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.inb[self.start..self.start + n]);
        self.start += n;
        n
    }

    /// Opened plaintext is waiting.
    pub fn has_plaintext(&self) -> bool {
        self.start < self.end
    }

    /// The partial record's state, and the buffer its body goes into
    /// (payload + tag, sized once the header is in).
    pub fn partial(&mut self) -> (&mut Partial, &mut [u8]) {
        let body = match self.partial.len() {
            Some(len) => &mut self.inb[..len + TAG_LEN],
            None => &mut self.inb[..0],
        };
        (&mut self.partial, body)
    }

    /// Forgets the partial record (its body went elsewhere).
    pub fn clear_partial(&mut self) {
        self.partial = Partial::default();
    }

    /// Opens the fully received record in `inb`; its plaintext becomes
    /// available to [`Records::take`].
    pub fn open_partial(&mut self) -> Result<(), Rejected> {
        let len = self.partial.len().expect("a complete record");
        let header = self.partial.header;
        self.partial = Partial::default();
        let (payload, tag) = self.inb[..len + TAG_LEN].split_at_mut(len);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("TAG_LEN bytes");
        self.rx.open(&header, payload, tag)?;
        self.start = 0;
        self.end = len;
        Ok(())
    }

    /// Opens a record received straight into the caller's buffer.
    pub fn open_direct(
        &mut self,
        header: [u8; RECORD_HEADER],
        payload: &mut [u8],
        tag: [u8; TAG_LEN],
    ) -> Result<(), Rejected> {
        self.rx.open(&header, payload, tag)
    }

    /// Records sealed and opened so far (sent, received).
    pub fn counts(&self) -> (u64, u64) {
        (self.tx.count(), self.rx.count())
    }
}

/// Checks an announced record length.
pub(crate) fn check_len(len: usize) -> Result<usize, u32> {
    if len == 0 || len > RECORD_MAX {
        Err(len as u32)
    } else {
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    use crate::handshake::connect_pair_with;
    use crate::secure::{FtKey, Security};
    use crate::test_utils::{pattern, tcp_pair};
    use crate::{
        Channel, ChannelListener, Heartbeat, PeerLost, TcpChannel, TcpOptions, TransportError,
    };

    const T: Duration = Duration::from_secs(5);

    fn key(b: u8) -> Security {
        Security::keyed(FtKey::from_bytes(&[b; 32]).unwrap())
    }

    /// A keyed listener and a keyed primary's pair connected to it.
    fn keyed_pair(
        k: u8,
    ) -> (
        (TcpChannel, crate::HeartbeatStream),
        (TcpChannel, crate::HeartbeatStream),
    ) {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(key(k));
        let addr = l.local_addr();
        let p = thread::spawn(move || {
            connect_pair_with(addr, T, &TcpOptions::default(), &key(k)).unwrap()
        });
        let s = l.accept_pair(T).unwrap();
        (p.join().unwrap(), s)
    }

    #[test]
    fn sealed_stream_round_trips_large_and_small_sends() {
        let ((mut p, p_hb), (mut s, s_hb)) = keyed_pair(1);
        assert!(p.cipher().is_some() && s.cipher() == p.cipher());
        assert!(p_hb.is_sealed() && s_hb.is_sealed());
        let big = pattern(3 * super::RECORD_MAX + 1234, 9);
        let sender = thread::spawn(move || {
            let chunks: Vec<&[u8]> = vec![b"head", &big[..5000], &big[5000..], b"", b"tail"];
            let n = p.send_chunks(&mut chunks.into_iter()).unwrap();
            assert_eq!(n, 8 + big.len() as u64);
            let mut ack = [0u8; 3];
            p.recv_exact(&mut ack).unwrap();
            assert_eq!(&ack, b"ack");
            (p, big)
        });
        // Mixed reads: small recv, a large recv_exact (opened in place),
        // then the rest.
        let mut head = [0u8; 4];
        s.recv_exact(&mut head).unwrap();
        assert_eq!(&head, b"head");
        let mut body = vec![0u8; 3 * super::RECORD_MAX + 1234];
        s.recv_exact(&mut body).unwrap();
        let mut tail = [0u8; 4];
        s.recv_exact(&mut tail).unwrap();
        assert_eq!(&tail, b"tail");
        s.send_all(b"ack").unwrap();
        let (p, big) = sender.join().unwrap();
        assert_eq!(body, big);
        // Records counted both ways; the wire carries only ciphertext.
        assert!(p.records().0 >= 4 && s.records().1 == p.records().0);
        // A clone holds no keys: it can only shut down.
        let mut c = s.try_clone().unwrap();
        assert!(matches!(
            c.send_all(b"x"),
            Err(TransportError::SealedClone { .. })
        ));
        c.shutdown().unwrap();
    }

    /// Sealed records as a keyed sender puts them on the wire, caught raw.
    fn captured(k: &mut TcpChannel, raw: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
        k.send_all(payload).unwrap();
        let mut wire = vec![0u8; super::RECORD_HEADER + payload.len() + crate::secure::TAG_LEN];
        raw.read_exact(&mut wire).unwrap();
        wire
    }

    /// Two channels with the session keys of one handshake, each talking to
    /// a raw socket, so a test can tamper with the bytes in between.
    fn keyed_ends() -> ((TcpChannel, TcpStream), (TcpChannel, TcpStream)) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let k = key(3);
        let t = thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            crate::auth::initiate(&s, addr, b"p", &k, Instant::now() + T)
                .unwrap()
                .unwrap()
        });
        let (s, peer) = l.accept().unwrap();
        let r_keys = crate::auth::respond(&s, peer, b"p", &key(3), Instant::now() + T)
            .unwrap()
            .unwrap();
        let i_keys = t.join().unwrap();
        let (a, a_raw) = tcp_pair();
        let (b, b_raw) = tcp_pair();
        let opts = TcpOptions::default();
        let mut a = TcpChannel::from_stream(a, a_raw.local_addr().unwrap(), &opts).unwrap();
        let mut b = TcpChannel::from_stream(b, b_raw.local_addr().unwrap(), &opts).unwrap();
        a.seal_with(i_keys);
        b.seal_with(r_keys);
        ((a, a_raw), (b, b_raw))
    }

    #[test]
    fn altered_replayed_reordered_and_truncated_records_are_rejected() {
        // (description, transform of two captured records)
        type Mangle = fn(Vec<u8>, Vec<u8>) -> Vec<u8>;
        let cases: [(&str, Mangle); 5] = [
            ("flipped ciphertext byte", |mut a, b| {
                a[40] ^= 0x01;
                [a, b].concat()
            }),
            ("flipped length", |mut a, b| {
                a[0] ^= 0x01;
                [a, b].concat()
            }),
            ("flipped tag", |mut a, b| {
                let n = a.len();
                a[n - 1] ^= 0x80;
                [a, b].concat()
            }),
            ("replayed record", |a, _b| [a.clone(), a].concat()),
            ("reordered records", |a, b| [b, a].concat()),
        ];
        for (what, mangle) in cases {
            let ((mut a, mut a_raw), (mut b, mut b_raw)) = keyed_ends();
            let r0 = captured(&mut a, &mut a_raw, &[0x11; 100]);
            let r1 = captured(&mut a, &mut a_raw, &[0x22; 100]);
            // The genuine first record opens, in order.
            let mut first_ok = [0u8; 100];
            b_raw.write_all(&r0).unwrap();
            b.recv_exact(&mut first_ok).unwrap();
            assert_eq!(first_ok, [0x11; 100]);
            // Now what comes next is tampered with.
            let ((mut a2, mut a2_raw), (mut b2, mut b2_raw)) = keyed_ends();
            let s0 = captured(&mut a2, &mut a2_raw, &[0x11; 100]);
            let s1 = captured(&mut a2, &mut a2_raw, &[0x22; 100]);
            b2_raw.write_all(&mangle(s0, s1)).unwrap();
            let mut got = [0u8; 200];
            let err = b2.recv_exact(&mut got).unwrap_err();
            assert!(
                matches!(
                    err,
                    TransportError::Tampered { .. } | TransportError::RecordTooLong { .. }
                ),
                "{what}: {err}"
            );
            // Broken for good: nothing more is read.
            assert!(b2.recv(&mut got).is_err(), "{what}");
            drop((r1, a, b));
        }
        // Truncated inside a record: an error, never a short success.
        let ((mut a, mut a_raw), (mut b, b_raw)) = keyed_ends();
        let r0 = captured(&mut a, &mut a_raw, &[0x33; 100]);
        let mut b_raw = b_raw;
        b_raw.write_all(&r0[..50]).unwrap();
        drop(b_raw);
        let mut got = [0u8; 100];
        assert!(matches!(
            b.recv_exact(&mut got),
            Err(TransportError::Closed { .. })
        ));
    }

    #[test]
    fn a_recorded_session_replayed_to_the_listener_is_refused() {
        // Record what a keyed primary sends through a relay, then replay it
        // byte for byte: the listener's fresh nonce makes the old proof
        // worthless.
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(key(5));
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let (relay_addr, target) = (relay.local_addr().unwrap(), l.local_addr());
        let recorder = thread::spawn(move || {
            let relays: Vec<_> = (0..2)
                .map(|_| {
                    let (mut from_p, _) = relay.accept().unwrap();
                    thread::spawn(move || {
                        let mut to_s = TcpStream::connect(target).unwrap();
                        let mut back = to_s.try_clone().unwrap();
                        let mut p_back = from_p.try_clone().unwrap();
                        let pump = thread::spawn(move || {
                            let _ = std::io::copy(&mut back, &mut p_back);
                        });
                        let mut seen = Vec::new();
                        from_p
                            .set_read_timeout(Some(Duration::from_millis(1500)))
                            .unwrap();
                        let mut buf = [0u8; 4096];
                        loop {
                            match from_p.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    seen.extend_from_slice(&buf[..n]);
                                    to_s.write_all(&buf[..n]).unwrap();
                                }
                            }
                        }
                        let _ = to_s.shutdown(std::net::Shutdown::Both);
                        let _ = pump.join();
                        seen
                    })
                })
                .collect();
            relays
                .into_iter()
                .map(|r| r.join().unwrap())
                .collect::<Vec<_>>()
        });
        // The primary keeps its connections until the standby has read.
        let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
        let p = thread::spawn(move || {
            let (mut d, _hb) =
                connect_pair_with(relay_addr, T, &TcpOptions::default(), &key(5)).unwrap();
            d.send_all(b"secret hello").unwrap();
            let _ = read_rx.recv_timeout(T);
        });
        let (mut d, _hb) = l.accept_pair(T).unwrap();
        let mut hello = [0u8; 12];
        d.recv_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"secret hello");
        read_tx.send(()).unwrap();
        p.join().unwrap();
        let recorded = recorder.join().unwrap();
        assert!(
            !recorded[0].windows(12).any(|w| w == b"secret hello"),
            "sealed on the wire"
        );

        let before = l.rejected();
        for bytes in &recorded {
            let mut s = TcpStream::connect(l.local_addr()).unwrap();
            s.write_all(bytes).unwrap();
            match l.accept_tagged(T) {
                Err(TransportError::AuthFailed { reason, .. }) => {
                    assert_eq!(reason, crate::Refusal::WrongKey)
                }
                other => panic!("replay was not refused: {other:?}"),
            }
        }
        assert_eq!(l.rejected(), before + 2);
    }

    #[test]
    fn a_forged_heartbeat_loses_the_peer_and_is_never_acted_on() {
        let ((_p, p_hb), (_s, s_hb)) = keyed_pair(7);
        let a = Heartbeat::start(p_hb, Duration::from_millis(20), 50, 1).unwrap();
        // A fencing notice (generation 9) sealed by nobody: the standby's
        // receiver must not take it as a takeover notice.
        let raw = s_hb.into_tcp();
        let mut forged = ftvmm_checkpoint::protocol::Heartbeat {
            generation: 9,
            epoch: 1,
            seq: 0,
        }
        .encode_frame()
        .to_vec();
        forged.extend_from_slice(&[0u8; crate::secure::TAG_LEN]);
        (&raw).write_all(&forged).unwrap();
        let lost = a.wait_failure(T).expect("the primary's detector fires");
        assert!(matches!(lost, PeerLost::Forged { record: 0 }), "{lost}");
        assert_eq!(a.detector().fenced_by(), None);
        let _ = tcp_pair;
    }
}
