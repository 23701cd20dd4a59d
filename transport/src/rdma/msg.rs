//! The RDMA channel's two encodings, both pure (no verbs calls):
//!
//! - **Setup messages**, exchanged over the sealed TCP bootstrap
//!   connection right after the handshake of `crate::auth`: the
//!   primary's [`SetupMsg::Offer`], the standby's [`SetupMsg::Accept`] (or
//!   [`SetupMsg::Refuse`] with a reason the primary prints), and the
//!   primary's [`SetupMsg::Ready`]. Each is framed as `len: u32 LE | body`
//!   on the bootstrap channel; the body starts with `kind: u8, version: u8`.
//! - **Control messages**, the RDMA SENDs of the running channel
//!   ([`Ctl`]): 8 bytes each, `kind: u8 | 0: u8 | slab: u16 LE | len: u32 LE`.
//!
//! Offer and Accept carry the same [`SetupParams`] (68 bytes after kind and
//! version), all little-endian:
//!
//! ```text
//! lid u16 | flags u8 (bit 0: use the GID, a GRH) | mtu u8 (ibv_mtu 1..=5) | gid [16]
//! data QP:      qpn u32 | psn u32
//! keepalive QP: qpn u32 | psn u32
//! receive ring: addr u64 | rkey u32 | slabs u16 | 0 u16 | slab_bytes u32
//! keepalive slot: addr u64 | rkey u32
//! ```
//!
//! Both encodings are decoded as untrusted input: every field is checked
//! against the limits below, and trailing bytes are an error.

// Without the `rdma` feature only the setup refusal is used (a standby
// built without RDMA tells the primary so); the rest serves the channel.
#![cfg_attr(not(feature = "rdma"), allow(dead_code))]

/// Version of the setup messages.
pub const SETUP_VERSION: u8 = 1;
/// Longest setup message body accepted.
pub const MAX_SETUP_LEN: usize = 1024;
/// Longest refusal reason (bytes of UTF-8); longer ones are cut.
pub const MAX_REASON_LEN: usize = 512;
/// Most slabs a receive ring may have.
pub const MAX_RING_SLABS: u16 = 64;
/// Smallest receive slab.
pub const MIN_SLAB_BYTES: u32 = 4096;
/// Largest receive slab.
pub const MAX_SLAB_BYTES: u32 = 16 << 20;
/// Length of a control message.
pub const CTL_LEN: usize = 8;

const KIND_OFFER: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_READY: u8 = 4;
const PARAMS_LEN: usize = 68;

const CTL_DATA: u8 = 1;
const CTL_CREDIT: u8 = 2;
const CTL_CLOSE: u8 = 3;

/// How to reach one port: what `ibv_modify_qp` to RTR needs of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortAddress {
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID the peer addresses us by (RoCE, or routed InfiniBand).
    pub gid: [u8; 16],
    /// Address with the GID (a global route header): always on RoCE.
    pub global: bool,
    /// The port's active MTU as an `ibv_mtu` value (1: 256 … 5: 4096).
    pub mtu: u8,
}

/// One queue pair's number and first packet sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number of its send queue (24 bits).
    pub psn: u32,
}

/// The registered receive ring the peer RDMA-writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddress {
    /// Address of slab 0 (slab `i` is at `addr + i * slab_bytes`).
    pub addr: u64,
    /// Remote key of the registration that covers the whole ring.
    pub rkey: u32,
    /// Number of slabs.
    pub slabs: u16,
    /// Size of each slab.
    pub slab_bytes: u32,
}

/// The registered 8-byte word the peer writes its keepalive counter into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAddress {
    /// Address of the word.
    pub addr: u64,
    /// Remote key of its registration.
    pub rkey: u32,
}

/// Everything one side tells the other to connect its two queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupParams {
    /// The port both queue pairs use.
    pub port: PortAddress,
    /// The data queue pair (checkpoints, acks, credits).
    pub data: QpEndpoint,
    /// The keepalive queue pair (counter writes only).
    pub keepalive: QpEndpoint,
    /// Where the peer writes its stream.
    pub ring: RingAddress,
    /// Where the peer writes its keepalive counter.
    pub slot: SlotAddress,
}

/// A setup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupMsg {
    /// Primary → standby: its queue pairs and receive ring.
    Offer(SetupParams),
    /// Standby → primary: its own, with its queue pairs already ready to
    /// receive (RTR).
    Accept(SetupParams),
    /// Standby → primary: RDMA cannot be used here, and why.
    Refuse(String),
    /// Primary → standby: the primary's queue pairs are ready to send and
    /// receive; the standby may send.
    Ready,
}

/// A control message of the running channel (one RDMA SEND).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    /// The sender has RDMA-written `len` bytes of the stream into the
    /// receiver's slab `slab` (in ring order).
    Data {
        /// The slab written.
        slab: u16,
        /// Bytes in it.
        len: u32,
    },
    /// The receiver has taken slab `slab` out: the sender may write it again.
    Credit {
        /// The slab freed.
        slab: u16,
    },
    /// Orderly end of the stream: nothing follows.
    Close,
}

/// Why a setup or control message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    /// The message ended early.
    #[error("{what} is truncated ({got} of {need} bytes)")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Bytes after the end of the message.
    #[error("{what} has {extra} trailing bytes")]
    Trailing {
        /// Which message.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// An unknown message kind.
    #[error("unknown {what} kind {kind}")]
    Kind {
        /// Setup or control message.
        what: &'static str,
        /// The kind byte.
        kind: u8,
    },
    /// Another setup version.
    #[error("RDMA setup version {got}, this build speaks {SETUP_VERSION}")]
    Version {
        /// The version received.
        got: u8,
    },
    /// A field out of range.
    #[error("bad {field} {value} in {what}")]
    Field {
        /// Which message.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A refusal whose reason is not UTF-8.
    #[error("RDMA setup refusal is not UTF-8")]
    Reason,
}

/// Little-endian reader over a message body.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Cursor { b, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgError> {
        if self.b.len() - self.pos < n {
            return Err(MsgError::Truncated {
                what: self.what,
                got: self.b.len(),
                need: self.pos + n,
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, MsgError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MsgError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, MsgError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, MsgError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn end(&self) -> Result<(), MsgError> {
        match self.b.len() - self.pos {
            0 => Ok(()),
            extra => Err(MsgError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }

    fn bad(&self, field: &'static str, value: u64) -> MsgError {
        MsgError::Field {
            what: self.what,
            field,
            value,
        }
    }
}

const MAX_24: u32 = (1 << 24) - 1;

impl SetupParams {
    fn encode(&self, out: &mut Vec<u8>) {
        let p = &self.port;
        out.extend_from_slice(&p.lid.to_le_bytes());
        out.push(u8::from(p.global));
        out.push(p.mtu);
        out.extend_from_slice(&p.gid);
        for qp in [self.data, self.keepalive] {
            out.extend_from_slice(&qp.qpn.to_le_bytes());
            out.extend_from_slice(&qp.psn.to_le_bytes());
        }
        let r = &self.ring;
        out.extend_from_slice(&r.addr.to_le_bytes());
        out.extend_from_slice(&r.rkey.to_le_bytes());
        out.extend_from_slice(&r.slabs.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&r.slab_bytes.to_le_bytes());
        out.extend_from_slice(&self.slot.addr.to_le_bytes());
        out.extend_from_slice(&self.slot.rkey.to_le_bytes());
    }

    fn decode(c: &mut Cursor<'_>) -> Result<SetupParams, MsgError> {
        let lid = c.u16()?;
        let flags = c.u8()?;
        if flags > 1 {
            return Err(c.bad("flags", flags.into()));
        }
        let mtu = c.u8()?;
        if !(1..=5).contains(&mtu) {
            return Err(c.bad("mtu", mtu.into()));
        }
        let gid: [u8; 16] = c.take(16)?.try_into().expect("16");
        let mut qp = |name_qpn, name_psn| -> Result<QpEndpoint, MsgError> {
            let qpn = c.u32()?;
            if qpn > MAX_24 {
                return Err(c.bad(name_qpn, qpn.into()));
            }
            let psn = c.u32()?;
            if psn > MAX_24 {
                return Err(c.bad(name_psn, psn.into()));
            }
            Ok(QpEndpoint { qpn, psn })
        };
        let data = qp("data qpn", "data psn")?;
        let keepalive = qp("keepalive qpn", "keepalive psn")?;
        let addr = c.u64()?;
        let rkey = c.u32()?;
        let slabs = c.u16()?;
        if slabs == 0 || slabs > MAX_RING_SLABS {
            return Err(c.bad("ring slabs", slabs.into()));
        }
        let pad = c.u16()?;
        if pad != 0 {
            return Err(c.bad("reserved", pad.into()));
        }
        let slab_bytes = c.u32()?;
        if !(MIN_SLAB_BYTES..=MAX_SLAB_BYTES).contains(&slab_bytes) {
            return Err(c.bad("slab size", slab_bytes.into()));
        }
        if addr
            .checked_add(u64::from(slabs) * u64::from(slab_bytes))
            .is_none()
        {
            return Err(c.bad("ring address", addr));
        }
        let slot = SlotAddress {
            addr: c.u64()?,
            rkey: c.u32()?,
        };
        if slot.addr.checked_add(8).is_none() {
            return Err(c.bad("keepalive slot address", slot.addr));
        }
        Ok(SetupParams {
            port: PortAddress {
                lid,
                gid,
                global: flags == 1,
                mtu,
            },
            data,
            keepalive,
            ring: RingAddress {
                addr,
                rkey,
                slabs,
                slab_bytes,
            },
            slot,
        })
    }
}

impl SetupMsg {
    /// The message body (without the bootstrap channel's length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + PARAMS_LEN);
        match self {
            SetupMsg::Offer(p) | SetupMsg::Accept(p) => {
                let kind = if matches!(self, SetupMsg::Offer(_)) {
                    KIND_OFFER
                } else {
                    KIND_ACCEPT
                };
                out.extend_from_slice(&[kind, SETUP_VERSION]);
                p.encode(&mut out);
            }
            SetupMsg::Refuse(reason) => {
                out.extend_from_slice(&[KIND_REFUSE, SETUP_VERSION]);
                let mut end = reason.len().min(MAX_REASON_LEN);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&(end as u16).to_le_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
            SetupMsg::Ready => out.extend_from_slice(&[KIND_READY, SETUP_VERSION]),
        }
        out
    }

    /// Decodes a message body; everything is checked.
    pub fn decode(b: &[u8]) -> Result<SetupMsg, MsgError> {
        let mut c = Cursor::new(b, "RDMA setup message");
        let kind = c.u8()?;
        if !(KIND_OFFER..=KIND_READY).contains(&kind) {
            return Err(MsgError::Kind {
                what: "RDMA setup message",
                kind,
            });
        }
        let version = c.u8()?;
        if version != SETUP_VERSION {
            return Err(MsgError::Version { got: version });
        }
        let msg = match kind {
            KIND_OFFER => SetupMsg::Offer(SetupParams::decode(&mut c)?),
            KIND_ACCEPT => SetupMsg::Accept(SetupParams::decode(&mut c)?),
            KIND_REFUSE => {
                let len = usize::from(c.u16()?);
                if len > MAX_REASON_LEN {
                    return Err(c.bad("reason length", len as u64));
                }
                let text = std::str::from_utf8(c.take(len)?).map_err(|_| MsgError::Reason)?;
                SetupMsg::Refuse(text.to_string())
            }
            _ => SetupMsg::Ready,
        };
        c.end()?;
        Ok(msg)
    }

    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            SetupMsg::Offer(_) => "offer",
            SetupMsg::Accept(_) => "accept",
            SetupMsg::Refuse(_) => "refusal",
            SetupMsg::Ready => "ready",
        }
    }
}

impl Ctl {
    /// The 8 bytes of the SEND.
    pub fn encode(self) -> [u8; CTL_LEN] {
        let (kind, slab, len) = match self {
            Ctl::Data { slab, len } => (CTL_DATA, slab, len),
            Ctl::Credit { slab } => (CTL_CREDIT, slab, 0),
            Ctl::Close => (CTL_CLOSE, 0, 0),
        };
        let mut b = [0u8; CTL_LEN];
        b[0] = kind;
        b[2..4].copy_from_slice(&slab.to_le_bytes());
        b[4..8].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Decodes a received SEND (its whole payload: exactly 8 bytes).
    pub fn decode(b: &[u8]) -> Result<Ctl, MsgError> {
        let mut c = Cursor::new(b, "RDMA control message");
        let kind = c.u8()?;
        let pad = c.u8()?;
        let slab = c.u16()?;
        let len = c.u32()?;
        c.end()?;
        if pad != 0 {
            return Err(c.bad("reserved", pad.into()));
        }
        match kind {
            CTL_DATA => Ok(Ctl::Data { slab, len }),
            CTL_CREDIT if len == 0 => Ok(Ctl::Credit { slab }),
            CTL_CLOSE if slab == 0 && len == 0 => Ok(Ctl::Close),
            CTL_CREDIT | CTL_CLOSE => Err(c.bad("control fields", u64::from(len))),
            kind => Err(MsgError::Kind {
                what: "RDMA control message",
                kind,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SetupParams {
        SetupParams {
            port: PortAddress {
                lid: 0x1234,
                gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                global: true,
                mtu: 3,
            },
            data: QpEndpoint {
                qpn: 0x11,
                psn: 0xabcdef,
            },
            keepalive: QpEndpoint {
                qpn: 0xffffff,
                psn: 0,
            },
            ring: RingAddress {
                addr: 0x7f00_0000_1000,
                rkey: 0xdead_beef,
                slabs: 8,
                slab_bytes: 1 << 20,
            },
            slot: SlotAddress {
                addr: 0x7f00_1000_0000,
                rkey: 7,
            },
        }
    }

    #[test]
    fn setup_messages_round_trip_with_the_documented_layout() {
        let p = params();
        for msg in [
            SetupMsg::Offer(p),
            SetupMsg::Accept(p),
            SetupMsg::Refuse("no RDMA device".into()),
            SetupMsg::Ready,
        ] {
            let b = msg.encode();
            assert_eq!(SetupMsg::decode(&b).unwrap(), msg, "{}", msg.name());
        }
        let b = SetupMsg::Offer(p).encode();
        assert_eq!(b.len(), 2 + PARAMS_LEN);
        assert_eq!(&b[..2], &[KIND_OFFER, SETUP_VERSION]);
        assert_eq!(&b[2..4], &0x1234u16.to_le_bytes(), "lid");
        assert_eq!(b[4], 1, "global flag");
        assert_eq!(b[5], 3, "mtu");
        assert_eq!(&b[22..26], &0x11u32.to_le_bytes(), "data qpn");
        assert_eq!(&b[26..30], &0xabcdefu32.to_le_bytes(), "data psn");
        assert_eq!(&b[38..46], &0x7f00_0000_1000u64.to_le_bytes(), "ring addr");
        assert_eq!(&b[50..52], &8u16.to_le_bytes(), "ring slabs");
        assert_eq!(&b[54..58], &(1u32 << 20).to_le_bytes(), "slab bytes");
        assert_eq!(&b[58..66], &0x7f00_1000_0000u64.to_le_bytes(), "slot addr");
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let b = SetupMsg::Accept(params()).encode();
        for n in 0..b.len() {
            assert!(
                matches!(SetupMsg::decode(&b[..n]), Err(MsgError::Truncated { .. })),
                "{n} bytes"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            SetupMsg::decode(&long),
            Err(MsgError::Trailing {
                what: "RDMA setup message",
                extra: 1
            })
        );
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let good = SetupMsg::Offer(params()).encode();
        let cases: &[(usize, &[u8], &str)] = &[
            (0, &[9], "kind"),
            (1, &[2], "version"),
            (4, &[2], "flags"),
            (5, &[0], "mtu"),
            (5, &[6], "mtu"),
            (22, &0x0100_0000u32.to_le_bytes(), "data qpn"),
            (34, &0x0100_0000u32.to_le_bytes(), "keepalive psn"),
            (50, &0u16.to_le_bytes(), "ring slabs"),
            (50, &(MAX_RING_SLABS + 1).to_le_bytes(), "ring slabs"),
            (52, &1u16.to_le_bytes(), "reserved"),
            (54, &4095u32.to_le_bytes(), "slab size"),
            (54, &(MAX_SLAB_BYTES + 1).to_le_bytes(), "slab size"),
            (38, &(u64::MAX - 100).to_le_bytes(), "ring address"),
            (58, &(u64::MAX - 3).to_le_bytes(), "keepalive slot address"),
        ];
        for &(at, bytes, what) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            let err = SetupMsg::decode(&b).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(what) || (what == "kind" && text.contains("kind")),
                "{what}: {text}"
            );
        }
    }

    #[test]
    fn refusal_reasons_are_cut_at_a_char_boundary_and_must_be_utf8() {
        let long = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let b = SetupMsg::Refuse(long.clone()).encode();
        match SetupMsg::decode(&b).unwrap() {
            SetupMsg::Refuse(r) => {
                assert_eq!(r.len(), MAX_REASON_LEN);
                assert!(long.starts_with(&r));
            }
            other => panic!("{other:?}"),
        }
        let mut bad = SetupMsg::Refuse("ab".into()).encode();
        bad[4] = 0xff;
        assert_eq!(SetupMsg::decode(&bad), Err(MsgError::Reason));
    }

    #[test]
    fn control_messages_round_trip_and_reject_garbage() {
        for ctl in [
            Ctl::Data {
                slab: 7,
                len: 1 << 20,
            },
            Ctl::Credit { slab: 63 },
            Ctl::Close,
        ] {
            assert_eq!(Ctl::decode(&ctl.encode()).unwrap(), ctl);
        }
        assert_eq!(
            Ctl::Data { slab: 2, len: 5 }.encode(),
            [1, 0, 2, 0, 5, 0, 0, 0]
        );
        assert!(matches!(
            Ctl::decode(&[1, 0, 0, 0]),
            Err(MsgError::Truncated { .. })
        ));
        assert!(matches!(
            Ctl::decode(&[0; 9]),
            Err(MsgError::Trailing { .. })
        ));
        assert!(matches!(
            Ctl::decode(&[4, 0, 0, 0, 0, 0, 0, 0]),
            Err(MsgError::Kind { kind: 4, .. })
        ));
        assert!(Ctl::decode(&[1, 1, 0, 0, 0, 0, 0, 0]).is_err(), "reserved");
        assert!(
            Ctl::decode(&[2, 0, 0, 0, 1, 0, 0, 0]).is_err(),
            "credit len"
        );
        assert!(
            Ctl::decode(&[3, 0, 1, 0, 0, 0, 0, 0]).is_err(),
            "close slab"
        );
    }
}
