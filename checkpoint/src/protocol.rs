//! The protocol between a primary and its standby, in one place: the magic and the one
//! version number, the connection preamble, the frame header and every frame kind, the
//! heartbeat frame, and the fencing rule (DESIGN.md I5).
//!
//! # Why here
//!
//! This crate is the leaf of the workspace (STYLE.md). The wire format ([`crate::wire`])
//! needs the frame kinds and the version; the transport crate needs the preamble, the
//! heartbeat frame and the fencing rule for its failure detector; the VMM needs the
//! fencing rule for its hello and checkpoint checks. Only a module of the leaf crate is
//! visible to all three without a dependency cycle (the transport depends on this crate,
//! never the other way round).
//!
//! # One version
//!
//! [`WIRE_VERSION`] is the version of everything that crosses the wire: the preamble of
//! both connections, every frame header (checkpoints, control messages, heartbeats) and
//! the `Hello`/`HelloAck` bodies. A peer that speaks another version is refused at the
//! preamble, before it can send a frame.
//!
//! # Connection preamble (24 bytes, once per connection)
//!
//! ```text
//! 0..4   magic "FTVM"
//! 4..6   version u16                 (WIRE_VERSION)
//! 6      connection kind u8          1 data, 2 heartbeat, 3 RDMA data (bootstrap)
//! 7      reserved, 0
//! 8..24  session id                  chosen at random by the primary
//! ```
//!
//! # Frames (everything after the preamble, on both connections)
//!
//! ```text
//! header   16 bytes  magic "FTVM" | version u16 | kind u16 | body_len u64
//! body     body_len bytes
//! trailer   4 bytes  CRC-32 (IEEE) of header and body
//! ```
//!
//! All integers are little endian. The data connection carries `Hello`, `HelloAck`,
//! `Refuse`, `Checkpoint`, `Ack` and `Bye` frames (see [`crate::wire`] for their bodies);
//! the heartbeat connection carries [`Heartbeat`] frames only, each exactly
//! [`HEARTBEAT_FRAME_LEN`] bytes.
//!
//! # Fencing
//!
//! Every role change raises the protection generation by one. [`EpochFence`] is the one
//! place that decides whether something a peer sent under some generation (and epoch) is
//! admissible: the same generation is; an older one is a stale peer and is refused
//! ([`FenceError::Stale`]); a newer one means a takeover happened without us, and fences
//! us ([`FenceError::Superseded`]). A standby that takes over runs generation + 1
//! ([`EpochFence::take_over`]) and says so in its last heartbeat, which is how an old
//! primary that is still alive learns it is fenced.

use std::fmt;

use serde::{Deserialize, Serialize};

/// First bytes of every connection preamble and every frame.
pub const MAGIC: [u8; 4] = *b"FTVM";
/// The protocol version this build speaks: preamble, frame headers and handshake bodies.
/// Version 2: heartbeats are frames of kind `Heartbeat` (version 1 had a 32-byte
/// heartbeat format of its own). Version 3: checkpoints carry a disk section
/// (a 40-byte checkpoint header), Hello describes the disks and the sync mode,
/// and `DiskHashes` frames exist. Version 4: pages are encoded (a kind in the low bits
/// of each index entry: raw, zero or a delta against the standby's copy), and the
/// checkpoint header (48 bytes) gives the length of the delta section.
/// Version 5: each connection runs the authenticated handshake after its preamble,
/// and with a key every later byte travels in sealed records (ftvmm-transport).
/// Version 6: Hello carries the primary's epoch settings (`EpochPolicy`).
pub const WIRE_VERSION: u16 = 6;
/// Length of the common frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Length of the checksum trailer of every frame.
pub const TRAILER_LEN: usize = 4;
/// Length of the preamble proper (magic, version, kind, reserved).
pub const PREAMBLE_LEN: usize = 8;
/// Length of the session id that follows the preamble.
pub const SESSION_ID_LEN: usize = 16;
/// Length of a heartbeat body: generation, epoch, sequence number, 8 bytes each.
pub const HEARTBEAT_BODY_LEN: usize = 24;
/// Length of a complete heartbeat frame.
pub const HEARTBEAT_FRAME_LEN: usize = FRAME_HEADER_LEN + HEARTBEAT_BODY_LEN + TRAILER_LEN;

/// Frame kinds (the header's `kind` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// `Hello`: the primary opens a session.
    Hello = 1,
    /// `HelloAck`: the standby accepts it.
    HelloAck = 2,
    /// `Refuse`: the standby refuses it, or ends the session.
    Refuse = 3,
    /// A checkpoint.
    Checkpoint = 4,
    /// `Ack`: the standby applied a checkpoint.
    Ack = 5,
    /// [`Heartbeat`], on the heartbeat connection.
    Heartbeat = 6,
    /// `Bye` (empty body): orderly end of the session.
    Bye = 7,
    /// `DiskHashes`: block hashes of the standby's replicas.
    DiskHashes = 8,
}

impl FrameKind {
    /// The kind with wire value `v`, if there is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloAck,
            3 => FrameKind::Refuse,
            4 => FrameKind::Checkpoint,
            5 => FrameKind::Ack,
            6 => FrameKind::Heartbeat,
            7 => FrameKind::Bye,
            8 => FrameKind::DiskHashes,
            _ => return None,
        })
    }

    /// The kind's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "Hello",
            FrameKind::HelloAck => "HelloAck",
            FrameKind::Refuse => "Refuse",
            FrameKind::Checkpoint => "Checkpoint",
            FrameKind::Ack => "Ack",
            FrameKind::Heartbeat => "Heartbeat",
            FrameKind::DiskHashes => "DiskHashes",
            FrameKind::Bye => "Bye",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a frame header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header does not start with [`MAGIC`].
    #[error("bad frame magic {got:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// Bytes found.
        got: [u8; 4],
    },
    /// The peer speaks another version.
    #[error("unsupported wire version {got} (this build speaks version {WIRE_VERSION})")]
    Version {
        /// Version found.
        got: u16,
    },
    /// No frame kind has this value.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
}

/// The common header of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: FrameKind,
    /// Body length in bytes (trailer excluded).
    pub body_len: u64,
}

impl FrameHeader {
    /// The wire form, with this build's magic and version.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        h[8..16].copy_from_slice(&self.body_len.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, a known kind. The body length is the
    /// reader's to check against its limits.
    pub fn decode(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, HeaderError> {
        let [m0, m1, m2, m3, v0, v1, k0, k1, l @ ..] = *h;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(HeaderError::BadMagic {
                got: [m0, m1, m2, m3],
            });
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != WIRE_VERSION {
            return Err(HeaderError::Version { got: version });
        }
        let raw = u16::from_le_bytes([k0, k1]);
        let kind = FrameKind::from_u16(raw).ok_or(HeaderError::UnknownKind(raw))?;
        Ok(FrameHeader {
            kind,
            body_len: u64::from_le_bytes(l),
        })
    }
}

/// What a connection carries (the preamble's kind byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectionKind {
    /// The checkpoint stream (and acks back).
    Data = 1,
    /// Heartbeats, both ways.
    Heartbeat = 2,
    /// The bootstrap connection of an RDMA checkpoint channel: after the
    /// handshake it carries the RDMA setup, then stays open to tell either
    /// side that the other is gone (`--transport rdma`).
    RdmaData = 3,
}

impl ConnectionKind {
    /// The kind's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ConnectionKind::Data => "data",
            ConnectionKind::Heartbeat => "heartbeat",
            ConnectionKind::RdmaData => "RDMA data",
        }
    }
}

/// Why a connection preamble was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// The first 4 bytes are not [`MAGIC`].
    #[error("expected magic \"FTVM\", got {got:02x?}")]
    BadMagic {
        /// Bytes found.
        got: [u8; 4],
    },
    /// The peer speaks another version.
    #[error("protocol version {got}, this build speaks {WIRE_VERSION}")]
    Version {
        /// Version found.
        got: u16,
    },
    /// The kind byte names no connection kind.
    #[error("unknown connection kind {got}")]
    UnknownKind {
        /// Kind byte found.
        got: u8,
    },
    /// The reserved byte is not zero.
    #[error("reserved byte is {got:#04x}, not zero")]
    Reserved {
        /// Byte found.
        got: u8,
    },
}

/// The 24 bytes that open a connection of `kind` in `session`.
pub fn encode_preamble(
    kind: ConnectionKind,
    session: &[u8; SESSION_ID_LEN],
) -> [u8; PREAMBLE_LEN + SESSION_ID_LEN] {
    let mut b = [0u8; PREAMBLE_LEN + SESSION_ID_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    b[6] = kind as u8;
    b[7] = 0;
    b[PREAMBLE_LEN..].copy_from_slice(session);
    b
}

/// Checks the first [`PREAMBLE_LEN`] bytes of a connection.
pub fn decode_preamble(b: &[u8; PREAMBLE_LEN]) -> Result<ConnectionKind, PreambleError> {
    let [m0, m1, m2, m3, v0, v1, kind, reserved] = *b;
    if [m0, m1, m2, m3] != MAGIC {
        return Err(PreambleError::BadMagic {
            got: [m0, m1, m2, m3],
        });
    }
    let version = u16::from_le_bytes([v0, v1]);
    if version != WIRE_VERSION {
        return Err(PreambleError::Version { got: version });
    }
    let kind = match kind {
        1 => ConnectionKind::Data,
        2 => ConnectionKind::Heartbeat,
        3 => ConnectionKind::RdmaData,
        got => return Err(PreambleError::UnknownKind { got }),
    };
    if reserved != 0 {
        return Err(PreambleError::Reserved { got: reserved });
    }
    Ok(kind)
}

/// Liveness, either way, on the heartbeat connection: a fixed-size frame of kind
/// [`FrameKind::Heartbeat`]. A heartbeat of a newer generation is a takeover notice.
///
/// Its body is the three integers in this order, which is also what
/// [`crate::wire::encode_message`] makes of it: [`Heartbeat::encode_frame`] and the
/// frame reader agree byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's generation; a newer one than the receiver's fences the receiver.
    pub generation: u64,
    /// The epoch the sender advertises (its latest checkpoint sent, or applied).
    pub epoch: u64,
    /// Counts the sender's heartbeats from 0.
    pub seq: u64,
}

/// Why bytes on the heartbeat connection are not a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHeartbeat {
    /// Not a frame header of this protocol.
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// A frame of another kind.
    #[error("{kind} frame on the heartbeat connection")]
    Kind {
        /// The kind found.
        kind: FrameKind,
    },
    /// A heartbeat frame whose body is not [`HEARTBEAT_BODY_LEN`] bytes.
    #[error("heartbeat body of {body_len} bytes, expected {HEARTBEAT_BODY_LEN}")]
    BodyLength {
        /// Body length found.
        body_len: u64,
    },
    /// The trailer does not match.
    #[error(
        "heartbeat checksum mismatch: computed {computed:#010x}, trailer says {expected:#010x}"
    )]
    Checksum {
        /// CRC over what arrived.
        computed: u32,
        /// CRC in the trailer.
        expected: u32,
    },
}

impl Heartbeat {
    /// The complete frame: header, body, trailer.
    pub fn encode_frame(&self) -> [u8; HEARTBEAT_FRAME_LEN] {
        let mut b = [0u8; HEARTBEAT_FRAME_LEN];
        let header = FrameHeader {
            kind: FrameKind::Heartbeat,
            body_len: HEARTBEAT_BODY_LEN as u64,
        };
        b[..FRAME_HEADER_LEN].copy_from_slice(&header.encode());
        let body = &mut b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + HEARTBEAT_BODY_LEN];
        body[0..8].copy_from_slice(&self.generation.to_le_bytes());
        body[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        body[16..24].copy_from_slice(&self.seq.to_le_bytes());
        let end = HEARTBEAT_FRAME_LEN - TRAILER_LEN;
        let crc = crc32fast::hash(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and verifies a complete heartbeat frame.
    pub fn decode_frame(b: &[u8; HEARTBEAT_FRAME_LEN]) -> Result<Heartbeat, BadHeartbeat> {
        let (head, rest) = b.split_at(FRAME_HEADER_LEN);
        let head: &[u8; FRAME_HEADER_LEN] = head.try_into().expect("16 bytes");
        let header = FrameHeader::decode(head)?;
        if header.kind != FrameKind::Heartbeat {
            return Err(BadHeartbeat::Kind { kind: header.kind });
        }
        if header.body_len != HEARTBEAT_BODY_LEN as u64 {
            return Err(BadHeartbeat::BodyLength {
                body_len: header.body_len,
            });
        }
        let (body, trailer) = rest.split_at(HEARTBEAT_BODY_LEN);
        let computed = crc32fast::hash(&b[..HEARTBEAT_FRAME_LEN - TRAILER_LEN]);
        let expected = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
        if computed != expected {
            return Err(BadHeartbeat::Checksum { computed, expected });
        }
        let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        Ok(Heartbeat {
            generation: word(0),
            epoch: word(8),
            seq: word(16),
        })
    }
}

/// What a fencing decision was about, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A primary's `Hello`.
    Hello,
    /// A frame of the initial sync (before epoch 1).
    InitialSync,
    /// Checkpoint `epoch`.
    Checkpoint {
        /// Its epoch.
        epoch: u64,
    },
    /// The ack of checkpoint `epoch`.
    Ack {
        /// The epoch acknowledged.
        epoch: u64,
    },
    /// A heartbeat advertising `epoch`.
    Heartbeat {
        /// The epoch it advertised.
        epoch: u64,
    },
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Hello => f.write_str("Hello"),
            Subject::InitialSync => f.write_str("initial-sync frame"),
            Subject::Checkpoint { epoch } => write!(f, "checkpoint {epoch}"),
            Subject::Ack { epoch } => write!(f, "ack of checkpoint {epoch}"),
            Subject::Heartbeat { epoch } => write!(f, "heartbeat at epoch {epoch}"),
        }
    }
}

/// Why something was fenced off (DESIGN.md I5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// It comes from an older generation: a stale peer (an old primary that came back).
    #[error("{subject} refused: generation {theirs} is older than generation {ours} in force (a stale peer is fenced)")]
    Stale {
        /// What was refused.
        subject: Subject,
        /// Its generation.
        theirs: u64,
        /// The generation in force here.
        ours: u64,
    },
    /// It comes from a newer generation: a takeover happened, and this side is the stale
    /// one (a primary reading its standby's takeover notice).
    #[error("{subject} carries generation {theirs}, newer than generation {ours}: a takeover fenced generation {ours}")]
    Superseded {
        /// What announced it.
        subject: Subject,
        /// The newer generation.
        theirs: u64,
        /// The generation in force here.
        ours: u64,
    },
    /// A checkpoint that is not newer than the last one applied.
    #[error("checkpoint {epoch} refused: checkpoint {last} is already applied")]
    NotNewer {
        /// The checkpoint's epoch.
        epoch: u64,
        /// The last epoch applied.
        last: u64,
    },
}

/// The generation in force on one side and the last epoch applied under it: the one
/// place that decides what a peer's generation and epoch may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochFence {
    generation: u64,
    last_applied: Option<u64>,
}

impl EpochFence {
    /// A fence for `generation` with nothing applied yet.
    pub fn new(generation: u64) -> Self {
        EpochFence {
            generation,
            last_applied: None,
        }
    }

    /// The generation in force.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The last epoch applied.
    pub fn last_applied(&self) -> Option<u64> {
        self.last_applied
    }

    /// The rule: `subject`, sent under `generation`, is admissible only in the generation
    /// in force. Older is [`FenceError::Stale`]; newer is [`FenceError::Superseded`].
    pub fn check(&self, subject: Subject, generation: u64) -> Result<(), FenceError> {
        match generation.cmp(&self.generation) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Less => Err(FenceError::Stale {
                subject,
                theirs: generation,
                ours: self.generation,
            }),
            std::cmp::Ordering::Greater => Err(FenceError::Superseded {
                subject,
                theirs: generation,
                ours: self.generation,
            }),
        }
    }

    /// Whether a primary of `generation` may pair with a standby whose fence stands at
    /// the highest generation it has served: a stale one may not; the same or a newer one
    /// (a primary after a role change) may.
    pub fn admit_hello(&self, generation: u64) -> Result<(), FenceError> {
        match self.check(Subject::Hello, generation) {
            Err(FenceError::Superseded { .. }) => Ok(()),
            other => other,
        }
    }

    /// Whether checkpoint `epoch` of `generation` may be applied: it must be of the
    /// generation in force and newer than the last one applied.
    pub fn admit(&self, generation: u64, epoch: u64) -> Result<(), FenceError> {
        self.check(Subject::Checkpoint { epoch }, generation)?;
        match self.last_applied {
            Some(last) if epoch <= last => Err(FenceError::NotNewer { epoch, last }),
            _ => Ok(()),
        }
    }

    /// Records that `epoch` was applied (after [`Self::admit`] accepted it).
    pub fn commit(&mut self, epoch: u64) {
        self.last_applied = Some(epoch);
    }

    /// The generation a takeover from this one starts: its heartbeats are the notice
    /// that fences the old primary.
    pub fn successor(&self) -> u64 {
        self.generation + 1
    }

    /// Takes over: starts generation + 1, which the old primary's checkpoints and acks
    /// can never match. Returns the new generation.
    pub fn take_over(&mut self) -> u64 {
        self.generation = self.successor();
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_round_trip_and_rejections() {
        for v in 1..=8u16 {
            let kind = FrameKind::from_u16(v).unwrap();
            assert_eq!(kind as u16, v);
            let h = FrameHeader {
                kind,
                body_len: 0x0102_0304_0506_0708,
            };
            assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }
        assert_eq!(FrameKind::from_u16(0), None);
        assert_eq!(FrameKind::from_u16(9), None);
        let good = FrameHeader {
            kind: FrameKind::Bye,
            body_len: 0,
        }
        .encode();
        let mut b = good;
        b[1] = b'X';
        assert_eq!(
            FrameHeader::decode(&b),
            Err(HeaderError::BadMagic { got: *b"FXVM" })
        );
        let mut b = good;
        b[4] = 99;
        let e = FrameHeader::decode(&b).unwrap_err();
        assert_eq!(e, HeaderError::Version { got: 99 });
        assert_eq!(
            e.to_string(),
            format!("unsupported wire version 99 (this build speaks version {WIRE_VERSION})")
        );
        let mut b = good;
        b[6] = 99;
        assert_eq!(FrameHeader::decode(&b), Err(HeaderError::UnknownKind(99)));
    }

    #[test]
    fn preamble_and_frames_share_magic_and_version() {
        let session = [7u8; SESSION_ID_LEN];
        let p = encode_preamble(ConnectionKind::Heartbeat, &session);
        let h = FrameHeader {
            kind: FrameKind::Hello,
            body_len: 1,
        }
        .encode();
        assert_eq!(p[..6], h[..6], "magic and version agree");
        assert_eq!(
            decode_preamble(p[..PREAMBLE_LEN].try_into().unwrap()),
            Ok(ConnectionKind::Heartbeat)
        );
        assert_eq!(&p[PREAMBLE_LEN..], &session);
        let head = |f: fn(&mut [u8; PREAMBLE_LEN])| {
            let mut b: [u8; PREAMBLE_LEN] = p[..PREAMBLE_LEN].try_into().unwrap();
            f(&mut b);
            decode_preamble(&b)
        };
        assert_eq!(
            head(|b| b[0] = b'G'),
            Err(PreambleError::BadMagic { got: *b"GTVM" })
        );
        assert_eq!(head(|b| b[4] = 9), Err(PreambleError::Version { got: 9 }));
        assert_eq!(head(|b| b[6] = 3), Ok(ConnectionKind::RdmaData));
        assert_eq!(
            head(|b| b[6] = 4),
            Err(PreambleError::UnknownKind { got: 4 })
        );
        assert_eq!(head(|b| b[7] = 1), Err(PreambleError::Reserved { got: 1 }));
    }

    #[test]
    fn heartbeat_frame_round_trip_and_rejections() {
        let hb = Heartbeat {
            generation: 3,
            epoch: 99,
            seq: u64::MAX,
        };
        let f = hb.encode_frame();
        assert_eq!(f.len(), 44);
        assert_eq!(Heartbeat::decode_frame(&f), Ok(hb));

        let mut b = f;
        b[0] = 0xAB;
        assert!(matches!(
            Heartbeat::decode_frame(&b),
            Err(BadHeartbeat::Header(HeaderError::BadMagic { .. }))
        ));
        let mut b = f;
        b[6] = FrameKind::Ack as u8;
        assert_eq!(
            Heartbeat::decode_frame(&b),
            Err(BadHeartbeat::Kind {
                kind: FrameKind::Ack
            })
        );
        let mut b = f;
        b[8] = 25;
        assert_eq!(
            Heartbeat::decode_frame(&b),
            Err(BadHeartbeat::BodyLength { body_len: 25 })
        );
        // Any flipped bit of the body or trailer is caught.
        for i in FRAME_HEADER_LEN..HEARTBEAT_FRAME_LEN {
            let mut b = f;
            b[i] ^= 0x20;
            assert!(
                matches!(
                    Heartbeat::decode_frame(&b),
                    Err(BadHeartbeat::Checksum { .. })
                ),
                "byte {i}"
            );
        }
    }

    #[test]
    fn the_fencing_rule() {
        let f = EpochFence::new(5);
        let sub = Subject::Ack { epoch: 1 };
        assert_eq!(f.check(sub, 5), Ok(()));
        assert_eq!(
            f.check(sub, 4),
            Err(FenceError::Stale {
                subject: sub,
                theirs: 4,
                ours: 5
            })
        );
        assert_eq!(
            f.check(sub, 6),
            Err(FenceError::Superseded {
                subject: sub,
                theirs: 6,
                ours: 5
            })
        );
        assert!(matches!(
            f.check(sub, u64::MAX),
            Err(FenceError::Superseded { .. })
        ));
        assert!(matches!(f.check(sub, 0), Err(FenceError::Stale { .. })));

        // Pairing: stale refused, same or newer admitted.
        assert_eq!(f.admit_hello(5), Ok(()));
        assert_eq!(f.admit_hello(6), Ok(()));
        let e = f.admit_hello(3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Hello refused: generation 3 is older than generation 5 in force (a stale peer is fenced)"
        );
    }

    #[test]
    fn fence_refuses_old_generations_and_stale_epochs() {
        let mut fence = EpochFence::new(1);
        assert!(fence.admit(1, 0).is_ok());
        fence.commit(0);
        fence.commit(5);
        assert_eq!(
            fence.admit(1, 5),
            Err(FenceError::NotNewer { epoch: 5, last: 5 })
        );
        assert_eq!(
            fence.admit(1, 4),
            Err(FenceError::NotNewer { epoch: 4, last: 5 })
        );
        assert!(fence.admit(1, 6).is_ok());
        assert!(matches!(
            fence.admit(2, 6),
            Err(FenceError::Superseded { .. })
        ));
        assert_eq!(fence.successor(), 2);
        assert_eq!(fence.take_over(), 2);
        let e = fence.admit(1, 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "checkpoint 100 refused: generation 1 is older than generation 2 in force (a stale peer is fenced)"
        );
    }

    #[test]
    fn a_takeover_notice_fences_the_old_primary_and_not_the_new_one() {
        // The standby of generation 7 takes over: generation 8.
        let mut standby = EpochFence::new(7);
        let old_primary = EpochFence::new(7);
        let notice = Heartbeat {
            generation: standby.take_over(),
            epoch: 41,
            seq: 0,
        };
        let e = old_primary
            .check(
                Subject::Heartbeat {
                    epoch: notice.epoch,
                },
                notice.generation,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "heartbeat at epoch 41 carries generation 8, newer than generation 7: a takeover fenced generation 7"
        );
        // The old primary's own heartbeats and checkpoints are stale to the new one.
        assert!(matches!(
            standby.check(Subject::Heartbeat { epoch: 42 }, 7),
            Err(FenceError::Stale { .. })
        ));
        assert!(matches!(
            standby.admit(7, 42),
            Err(FenceError::Stale { .. })
        ));
        // And the old primary can never pair with it again.
        assert!(standby.admit_hello(7).is_err());
    }
}
