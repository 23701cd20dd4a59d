//! The handshake that opens every connection after its preamble: a mutual
//! challenge-response over the pre-shared key, then per-connection session
//! keys.
//!
//! ```text
//! initiator (primary)                         responder (standby)
//!   preamble (24 B: magic, version, kind, session id)   -->
//!   offer    (36 B: mode, cipher, 0, 0, nonce_i[32])    -->
//!        <--  reply (68 B: verdict, mode, cipher, 0, nonce_r[32], proof_r[32])
//!   proof_i  (32 B)                                      -->
//!        <--  verdict (1 B)
//! ```
//! `mode` is 1 with a key, 0 with `--ft-insecure`; a mismatch is refused
//! with a code that names it ([`Refusal`]). Both sides derive, with
//! HKDF-SHA256 over the key, salt `nonce_i ‖ nonce_r` and the SHA-256 of the
//! transcript (preamble, offer, the reply's first 36 bytes), a proof key and
//! one AEAD key per direction ([`crate::secure`]). Each proves it holds the
//! key with an HMAC of the transcript under a role label; the responder
//! answers first, the initiator sends its proof and then checks the
//! responder's (so both learn of a wrong key), and the responder gives its
//! final verdict only after checking the initiator's proof. Nonces are fresh on both sides, so a recorded session
//! replayed to a standby fails the proof; a peer without the key learns
//! nothing but random nonces and HMAC outputs under keys it cannot derive.
//! Everything after the verdict is sealed ([`crate::TcpChannel`],
//! [`crate::HeartbeatStream`]); the primary's Hello, which carries the
//! guest's shape, generation and versions, is the data channel's first
//! sealed record, so it is bound to this transcript too.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::error::Refusal;
use crate::secure::{random_nonce, Cipher, Derived, Direction, Security, SessionKeys, NONCE_BYTES};
use crate::TransportError;

const OFFER_LEN: usize = 4 + NONCE_BYTES;
const REPLY_HEAD_LEN: usize = 4 + NONCE_BYTES;
const PROOF_LEN: usize = 32;
const MODE_INSECURE: u8 = 0;
const MODE_KEYED: u8 = 1;
const ACCEPTED: u8 = 0;

/// Runs the initiator's side on a connection whose `preamble` was just
/// sent. `None`: both sides are insecure and nothing will be sealed.
pub(crate) fn initiate(
    stream: &TcpStream,
    peer: SocketAddr,
    preamble: &[u8],
    security: &Security,
    deadline: Instant,
) -> Result<Option<SessionKeys>, TransportError> {
    let cipher = Cipher::preferred();
    let nonce_i = random_nonce().map_err(TransportError::Random)?;
    let mut offer = [0u8; OFFER_LEN];
    offer[0] = mode_of(security);
    offer[1] = cipher.code();
    offer[4..].copy_from_slice(&nonce_i);
    send(stream, peer, &offer)?;

    let mut reply = [0u8; REPLY_HEAD_LEN + PROOF_LEN];
    recv(
        stream,
        peer,
        &mut reply,
        deadline,
        "read the handshake reply from",
    )?;
    if reply[0] != ACCEPTED {
        return Err(TransportError::AuthRefused {
            addr: peer,
            reason: Refusal::from_code(reply[0]),
        });
    }
    let key = match (security, reply[1]) {
        (Security::Insecure, MODE_INSECURE) => return Ok(None),
        (Security::Keyed(key), MODE_KEYED) => key,
        // A well-behaved responder refuses a mismatch itself; one that
        // accepts anyway is not trusted.
        (Security::Keyed(_), _) => {
            return Err(TransportError::AuthRefused {
                addr: peer,
                reason: Refusal::Insecure,
            })
        }
        (Security::Insecure, _) => {
            return Err(TransportError::AuthRefused {
                addr: peer,
                reason: Refusal::NeedKey,
            })
        }
    };
    let cipher = Cipher::from_code(reply[2]).ok_or(TransportError::AuthRefused {
        addr: peer,
        reason: Refusal::Cipher(reply[2]),
    })?;
    let transcript = [preamble, &offer[..], &reply[..REPLY_HEAD_LEN]].concat();
    let derived = Derived::new(key, &nonce_i, &reply[4..REPLY_HEAD_LEN], &transcript);
    // Our proof goes out before we judge theirs, so that a standby with
    // another key also learns why (and logs it); it is worth nothing beyond
    // this connection's nonces.
    send(stream, peer, &derived.proof(Direction::Initiator))?;
    if !derived.verify(Direction::Responder, &reply[REPLY_HEAD_LEN..]) {
        return Err(TransportError::AuthRefused {
            addr: peer,
            reason: Refusal::ResponderWrongKey,
        });
    }
    let mut verdict = [0u8; 1];
    recv(
        stream,
        peer,
        &mut verdict,
        deadline,
        "read the handshake verdict from",
    )?;
    if verdict[0] != ACCEPTED {
        return Err(TransportError::AuthRefused {
            addr: peer,
            reason: Refusal::from_code(verdict[0]),
        });
    }
    Ok(Some(derived.session_keys(Direction::Initiator, cipher)))
}

/// Runs the responder's side on a connection whose `preamble` was just
/// read and checked. A peer that fails is told why (one byte) and gets
/// [`TransportError::AuthFailed`]; nothing else of ours reaches it.
pub(crate) fn respond(
    stream: &TcpStream,
    peer: SocketAddr,
    preamble: &[u8],
    security: &Security,
    deadline: Instant,
) -> Result<Option<SessionKeys>, TransportError> {
    let mut offer = [0u8; OFFER_LEN];
    recv(
        stream,
        peer,
        &mut offer,
        deadline,
        "read the handshake offer from",
    )?;
    let refuse = |reason: Refusal| {
        let mut r = [0u8; REPLY_HEAD_LEN + PROOF_LEN];
        r[0] = reason.code();
        // Best effort: the peer may be gone already.
        let _ = send(stream, peer, &r);
        Err(TransportError::AuthFailed { addr: peer, reason })
    };
    let key = match (security, offer[0]) {
        (Security::Insecure, MODE_INSECURE) => {
            let mut r = [0u8; REPLY_HEAD_LEN + PROOF_LEN];
            r[1] = MODE_INSECURE;
            send(stream, peer, &r)?;
            return Ok(None);
        }
        (Security::Insecure, _) => return refuse(Refusal::Insecure),
        (Security::Keyed(_), MODE_INSECURE) => return refuse(Refusal::NeedKey),
        (Security::Keyed(key), _) => key,
    };
    let Some(cipher) = Cipher::from_code(offer[1]) else {
        return refuse(Refusal::Cipher(offer[1]));
    };
    let nonce_r = random_nonce().map_err(TransportError::Random)?;
    let mut reply = [0u8; REPLY_HEAD_LEN + PROOF_LEN];
    reply[0] = ACCEPTED;
    reply[1] = MODE_KEYED;
    reply[2] = cipher.code();
    reply[4..REPLY_HEAD_LEN].copy_from_slice(&nonce_r);
    let transcript = [preamble, &offer[..], &reply[..REPLY_HEAD_LEN]].concat();
    let derived = Derived::new(key, &offer[4..], &nonce_r, &transcript);
    reply[REPLY_HEAD_LEN..].copy_from_slice(&derived.proof(Direction::Responder));
    send(stream, peer, &reply)?;

    let mut proof = [0u8; PROOF_LEN];
    recv(
        stream,
        peer,
        &mut proof,
        deadline,
        "read the handshake proof from",
    )?;
    if !derived.verify(Direction::Initiator, &proof) {
        let _ = send(stream, peer, &[Refusal::WrongKey.code()]);
        return Err(TransportError::AuthFailed {
            addr: peer,
            reason: Refusal::WrongKey,
        });
    }
    send(stream, peer, &[ACCEPTED])?;
    Ok(Some(derived.session_keys(Direction::Responder, cipher)))
}

fn mode_of(security: &Security) -> u8 {
    match security {
        Security::Keyed(_) => MODE_KEYED,
        Security::Insecure => MODE_INSECURE,
    }
}

fn send(mut stream: &TcpStream, peer: SocketAddr, bytes: &[u8]) -> Result<(), TransportError> {
    // A few dozen bytes into a fresh connection's empty send buffer: cannot
    // block for long. MSG_NOSIGNAL is not needed: Rust ignores SIGPIPE.
    stream
        .write_all(bytes)
        .map_err(|source| TransportError::Send { addr: peer, source })
}

/// Fills `buf` from `stream` before `deadline`.
pub(crate) fn recv(
    mut stream: &TcpStream,
    peer: SocketAddr,
    buf: &mut [u8],
    deadline: Instant,
    op: &'static str,
) -> Result<(), TransportError> {
    let started = Instant::now();
    let opt_err = |source| TransportError::SocketOption {
        addr: peer,
        option: "SO_RCVTIMEO",
        source,
    };
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout {
                addr: peer,
                op,
                after: started.elapsed(),
            });
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(opt_err)?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(TransportError::Closed {
                    addr: peer,
                    got,
                    wanted: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(source) => return Err(TransportError::Recv { addr: peer, source }),
        }
    }
    stream.set_read_timeout(None).map_err(opt_err)
}

/// The offer of an insecure initiator (tests that speak the protocol by
/// hand).
#[cfg(test)]
pub(crate) const INSECURE_OFFER: [u8; OFFER_LEN] = [0; OFFER_LEN];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secure::FtKey;
    use std::net::TcpListener;

    fn run(
        a: Security,
        b: Security,
    ) -> (
        Result<Option<SessionKeys>, TransportError>,
        Result<Option<SessionKeys>, TransportError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            initiate(
                &s,
                addr,
                b"pre",
                &a,
                Instant::now() + Duration::from_secs(5),
            )
        });
        let (s, peer) = l.accept().unwrap();
        let r = respond(
            &s,
            peer,
            b"pre",
            &b,
            Instant::now() + Duration::from_secs(5),
        );
        drop(s);
        (t.join().unwrap(), r)
    }

    fn key(b: u8) -> Security {
        Security::keyed(FtKey::from_bytes(&[b; 32]).unwrap())
    }

    #[test]
    fn same_key_derives_matching_keys() {
        let (i, r) = run(key(1), key(1));
        let (mut i, mut r) = (i.unwrap().unwrap(), r.unwrap().unwrap());
        let mut m = *b"hello";
        let tag = i.tx.seal(b"", &mut m);
        r.rx.open(b"", &mut m, tag).unwrap();
        assert_eq!(&m, b"hello");
        let mut m = *b"ack";
        let tag = r.tx.seal(b"", &mut m);
        i.rx.open(b"", &mut m, tag).unwrap();
        assert_eq!(&m, b"ack");
    }

    #[test]
    fn insecure_both_sides_is_plain() {
        let (i, r) = run(Security::Insecure, Security::Insecure);
        assert!(i.unwrap().is_none());
        assert!(r.unwrap().is_none());
    }

    #[test]
    fn mismatches_are_refused_with_their_reason() {
        let cases = [
            (
                key(1),
                key(2),
                Refusal::ResponderWrongKey,
                Some(Refusal::WrongKey),
            ),
            (
                Security::Insecure,
                key(2),
                Refusal::NeedKey,
                Some(Refusal::NeedKey),
            ),
            (
                key(1),
                Security::Insecure,
                Refusal::Insecure,
                Some(Refusal::Insecure),
            ),
        ];
        for (a, b, initiator_sees, responder_sees) in cases {
            let (i, r) = run(a, b);
            match i {
                Err(TransportError::AuthRefused { reason, .. }) => {
                    assert_eq!(reason, initiator_sees)
                }
                other => panic!("initiator: {other:?}"),
            }
            match (r, responder_sees) {
                (Err(TransportError::AuthFailed { reason, .. }), Some(want)) => {
                    assert_eq!(reason, want)
                }
                (other, _) => panic!("responder: {other:?}"),
            }
        }
    }
}
