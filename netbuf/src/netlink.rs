//! The rtnetlink requests of the plug backend, and a small synchronous
//! socket that sends them one at a time.
//!
//! The messages (the IFB link, the `ingress` qdisc, a u32 match-all filter
//! with a `mirred` redirect, the `sch_plug` qdisc) are the typed messages of
//! `netlink-packet-route`, sent over a blocking `netlink-sys` socket: no
//! async runtime in the epoch driver's path. The one thing those crates do
//! not type is the plug qdisc's `struct tc_plug_qopt`
//! (`include/uapi/linux/pkt_sched.h`), which the kernel reads from a plain,
//! not nested, `TCA_OPTIONS` attribute: [`plug_qopt`] builds those 8 bytes
//! and they go out as a raw attribute ([`TcAttribute::Other`]).

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    parse_string, DecodeError, DefaultNla, ErrorBuffer, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NlasIterator, NLMSG_ERROR, NLMSG_NOOP, NLM_F_ACK,
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkHeader, LinkInfo, LinkMessage,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcHeader, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, SocketAddr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// One rtnetlink request.
pub type Request = NetlinkMessage<RouteNetlinkMessage>;

/// `TCA_OPTIONS` (`include/uapi/linux/rtnetlink.h`).
const TCA_OPTIONS: u16 = 2;
/// `NLMSGERR_ATTR_MSG` (`include/uapi/linux/netlink.h`).
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `ETH_P_ALL` (`include/uapi/linux/if_ether.h`).
const ETH_P_ALL: u16 = 0x0003;
/// Room for one datagram of answers (acks are capped: no request echoed).
const RECV_BUF: usize = 32 * 1024;

/// The ingress qdisc's handle, `ffff:`.
pub const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// The plug qdisc's handle, `1:`.
pub const PLUG_HANDLE: TcHandle = TcHandle { major: 1, minor: 0 };
/// The u32 filter's priority.
pub const REDIRECT_PRIO: u16 = 1;

/// How long a request may wait for its answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// `tc_plug_qopt.action` values (`TCQ_PLUG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum PlugAction {
    /// Insert a plug: packets from now on wait behind it.
    Buffer = 0,
    /// Let out the packets before the oldest plug.
    ReleaseOne = 1,
    /// Remove all plugs: pass everything.
    ReleaseIndefinite = 2,
    /// Set the byte limit.
    Limit = 3,
}

/// `struct tc_plug_qopt { int action; __u32 limit; }`, in host order.
pub fn plug_qopt(action: PlugAction, limit: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(action as i32).to_ne_bytes());
    b[4..].copy_from_slice(&limit.to_ne_bytes());
    b
}

fn request(msg: RouteNetlinkMessage, flags: u16) -> Request {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg))
}

fn link(index: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m
}

/// A tc message on device `index` (tc headers carry it as a C `int`;
/// kernel ifindexes are positive ints, so the cast is lossless).
fn tc(index: u32, handle: TcHandle, parent: TcHandle, info: u32) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            index: index as i32,
            handle,
            parent,
            info,
            ..TcHeader::default()
        },
        Vec::new(),
    )
}

/// `ip link add NAME type ifb`.
pub fn new_ifb(name: &str) -> Request {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
    request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
}

/// `ip link show NAME` (the answer carries the index).
pub fn get_link(name: &str) -> Request {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    request(RouteNetlinkMessage::GetLink(m), 0)
}

/// `ip link set dev INDEX up`.
pub fn set_up(index: u32) -> Request {
    let mut m = link(index);
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::NewLink(m), 0)
}

/// `ip link del dev INDEX`.
pub fn del_link(index: u32) -> Request {
    request(RouteNetlinkMessage::DelLink(link(index)), 0)
}

/// `tc qdisc add dev INDEX ingress`.
pub fn new_ingress(index: u32) -> Request {
    let mut m = tc(index, INGRESS_HANDLE, TcHandle::INGRESS, 0);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// `tc qdisc del dev INDEX ingress` (its filters go with it).
pub fn del_ingress(index: u32) -> Request {
    let m = tc(index, INGRESS_HANDLE, TcHandle::INGRESS, 0);
    request(RouteNetlinkMessage::DelQueueDiscipline(m), 0)
}

/// `tc filter add dev TAP parent ffff: protocol all prio 1 u32 match u32 0 0
/// action mirred egress redirect dev IFB`.
pub fn new_redirect(tap_index: u32, ifb_index: u32) -> Request {
    let info = (u32::from(REDIRECT_PRIO) << 16) | u32::from(ETH_P_ALL.to_be());
    let mut m = tc(tap_index, TcHandle::UNSPEC, INGRESS_HANDLE, info);

    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys.push(TcU32Key::default()); // match u32 0 0 at 0: everything

    let mut mirred = TcMirror::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = ifb_index;
    let mut act = TcAction::default(); // tab (order) 1
    act.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirred,
        ))]),
    ];

    m.attributes = vec![
        TcAttribute::Kind(TcFilterU32::KIND.into()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(sel)),
            TcOption::U32(TcFilterU32Option::Action(vec![act])),
        ]),
    ];
    request(
        RouteNetlinkMessage::NewTrafficFilter(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

fn plug_msg(index: u32, flags: u16, action: PlugAction, limit: u32) -> Request {
    let mut m = tc(index, PLUG_HANDLE, TcHandle::ROOT, 0);
    m.attributes = vec![
        TcAttribute::Kind("plug".into()),
        // Not nested: the bare struct, as sch_plug's init/change read it.
        TcAttribute::Other(DefaultNla::new(
            TCA_OPTIONS,
            plug_qopt(action, limit).to_vec(),
        )),
    ];
    request(RouteNetlinkMessage::NewQueueDiscipline(m), flags)
}

/// `tc qdisc add dev INDEX root handle 1: plug limit LIMIT`.
pub fn new_plug(index: u32, limit: u32) -> Request {
    plug_msg(index, NLM_F_CREATE | NLM_F_EXCL, PlugAction::Limit, limit)
}

/// `tc qdisc change dev INDEX root handle 1: plug <action>`.
pub fn plug_command(index: u32, action: PlugAction) -> Request {
    plug_msg(index, 0, action, 0)
}

/// The name of a request's message type, for errors.
fn request_name(req: &Request) -> &'static str {
    match &req.payload {
        NetlinkPayload::InnerMessage(m) => match m {
            RouteNetlinkMessage::NewLink(_) => "RTM_NEWLINK",
            RouteNetlinkMessage::DelLink(_) => "RTM_DELLINK",
            RouteNetlinkMessage::GetLink(_) => "RTM_GETLINK",
            RouteNetlinkMessage::NewQueueDiscipline(_) => "RTM_NEWQDISC",
            RouteNetlinkMessage::DelQueueDiscipline(_) => "RTM_DELQDISC",
            RouteNetlinkMessage::NewTrafficFilter(_) => "RTM_NEWTFILTER",
            _ => "rtnetlink request",
        },
        _ => "netlink message",
    }
}

/// A netlink request the kernel refused, or a socket failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A call on the netlink socket failed.
    #[error("netlink socket: {op}: {source}")]
    Socket {
        /// The call.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel refused the request.
    #[error("{request}: {source}{}", ext.as_ref().map(|m| format!(" (kernel: {m})")).unwrap_or_default())]
    Refused {
        /// The request's message type.
        request: &'static str,
        /// The kernel's errno.
        source: std::io::Error,
        /// The kernel's extended-ack message, if any.
        ext: Option<String>,
    },
    /// No answer in time.
    #[error("{request}: no answer from the kernel within {TIMEOUT:?}")]
    Timeout {
        /// The request's message type.
        request: &'static str,
    },
    /// The answer could not be parsed.
    #[error("{request}: malformed answer from the kernel: {source}")]
    Malformed {
        /// The request's message type.
        request: &'static str,
        /// The parser's error.
        source: DecodeError,
    },
    /// The answer did not carry what was asked for.
    #[error("{request}: the kernel's answer has no {what}")]
    Missing {
        /// The request's message type.
        request: &'static str,
        /// What was missing.
        what: &'static str,
    },
}

impl NetlinkError {
    /// The errno, if the kernel refused or a socket call failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket { source, .. } | NetlinkError::Refused { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// One message of an answer that belongs to the request.
#[derive(Debug)]
enum Answer {
    /// The final ack (`Ok`) or refusal.
    Done(Result<(), NetlinkError>),
    /// A reply before the ack: message type and payload.
    Reply(u16, Vec<u8>),
}

/// The messages of datagram `data` answering request `seq`, in order.
fn parse_answers(
    mut data: &[u8],
    seq: u32,
    request: &'static str,
) -> Result<Vec<Answer>, NetlinkError> {
    let malformed = |source| NetlinkError::Malformed { request, source };
    let mut out = Vec::new();
    while !data.is_empty() {
        let msg = NetlinkBuffer::new_checked(data).map_err(malformed)?;
        let len = msg.length() as usize;
        if msg.sequence_number() == seq {
            match msg.message_type() {
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(msg.payload()).map_err(malformed)?;
                    let done = match err.code() {
                        None => Ok(()),
                        Some(code) => Err(NetlinkError::Refused {
                            request,
                            source: std::io::Error::from_raw_os_error(-code.get()),
                            ext: ext_ack_message(msg.flags(), err.payload()),
                        }),
                    };
                    out.push(Answer::Done(done));
                }
                NLMSG_NOOP => {}
                ty => out.push(Answer::Reply(ty, msg.payload().to_vec())),
            }
        }
        // Messages are 4-byte aligned within a datagram.
        data = data.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The kernel's extended-ack text in an `NLMSG_ERROR` payload after the
/// error code: the request (its header alone if capped), then attributes.
fn ext_ack_message(flags: u16, after_code: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let request_len = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(after_code.get(..4)?.try_into().ok()?) as usize
    };
    let tlvs = after_code.get(request_len.next_multiple_of(4)..)?;
    NlasIterator::new(tlvs)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .and_then(|nla| parse_string(nla.value()).ok())
}

/// A `NETLINK_ROUTE` socket that sends one request at a time and waits (at
/// most [`TIMEOUT`]) for its ack.
#[derive(Debug)]
pub struct Socket {
    sock: netlink_sys::Socket,
    /// Readiness of `sock`, for the timeout.
    epoll: Epoll,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// Opens and binds the socket, with capped and extended acks.
    pub fn open() -> Result<Socket, NetlinkError> {
        let os = |op| move |source| NetlinkError::Socket { op, source };
        let mut sock = netlink_sys::Socket::new(NETLINK_ROUTE).map_err(os("socket"))?;
        sock.bind_auto().map_err(os("bind"))?;
        // Without these, errors only lack the kernel's text, and acks
        // carry the whole request back.
        if let Err(e) = sock.set_ext_ack(true) {
            log::debug!("netlink: NETLINK_EXT_ACK: {e}");
        }
        if let Err(e) = sock.set_cap_ack(true) {
            log::debug!("netlink: NETLINK_CAP_ACK: {e}");
        }
        let epoll = Epoll::new().map_err(os("epoll_create"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(os("epoll_ctl"))?;
        Ok(Socket {
            sock,
            epoll,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `req` and waits for the kernel's ack.
    pub fn request(&mut self, req: Request) -> Result<(), NetlinkError> {
        self.exchange(req).map(drop)
    }

    /// The index of interface `name` in this socket's network namespace.
    pub fn ifindex(&mut self, name: &str) -> Result<u32, NetlinkError> {
        let request = "RTM_GETLINK";
        let replies = self.exchange(get_link(name))?;
        let (_, payload) = replies
            .iter()
            .find(|(ty, _)| *ty == libc::RTM_NEWLINK)
            .ok_or(NetlinkError::Missing {
                request,
                what: "link",
            })?;
        let header = LinkHeader::parse(payload)
            .map_err(|source| NetlinkError::Malformed { request, source })?;
        Ok(header.index)
    }

    /// Sends `req`; returns the replies that came before its ack.
    fn exchange(&mut self, mut req: Request) -> Result<Vec<(u16, Vec<u8>)>, NetlinkError> {
        let request = request_name(&req);
        let os = |op| move |source| NetlinkError::Socket { op, source };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        req.header.sequence_number = seq;
        req.finalize();
        let mut bytes = vec![0u8; req.buffer_len()];
        req.serialize(&mut bytes);
        self.sock
            .send_to(&bytes, &SocketAddr::new(0, 0), 0)
            .map_err(os("send"))?;

        let deadline = Instant::now() + TIMEOUT;
        let mut replies = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut ready = [EpollEvent::default()];
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            match self.epoll.wait(ms, &mut ready) {
                Ok(0) => return Err(NetlinkError::Timeout { request }),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(os("epoll_wait")(e)),
            }
            self.buf.clear();
            match self.sock.recv(&mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(os("recv")(e)),
            }
            for answer in parse_answers(&self.buf, seq, request)? {
                match answer {
                    Answer::Done(r) => return r.map(|()| replies),
                    Answer::Reply(ty, payload) => replies.push((ty, payload)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLA_TYPE_MASK;

    fn bytes(mut req: Request, seq: u32) -> Vec<u8> {
        req.header.sequence_number = seq;
        req.finalize();
        let mut b = vec![0u8; req.buffer_len()];
        req.serialize(&mut b);
        b
    }
    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn plug_command_bytes() {
        let b = bytes(plug_command(7, PlugAction::ReleaseOne), 42);
        // nlmsghdr
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        assert_eq!(u16_at(&b, 4), libc::RTM_NEWQDISC);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK,
            "change: no CREATE"
        );
        assert_eq!(u32_at(&b, 8), 42);
        // tcmsg at 16: family, pad, ifindex, handle, parent, info
        assert_eq!(u32_at(&b, 16), 0);
        assert_eq!(u32_at(&b, 20), 7);
        assert_eq!(u32_at(&b, 24), 0x0001_0000, "handle 1:");
        assert_eq!(u32_at(&b, 28), 0xffff_ffff, "TC_H_ROOT");
        assert_eq!(u32_at(&b, 32), 0);
        // TCA_KIND "plug\0" at 36: len 9, padded to 12
        assert_eq!(u16_at(&b, 36), 9);
        assert_eq!(u16_at(&b, 38), 1, "TCA_KIND");
        assert_eq!(&b[40..45], b"plug\0");
        // TCA_OPTIONS at 48: the bare tc_plug_qopt, not nested
        assert_eq!(u16_at(&b, 48), 4 + 8);
        assert_eq!(u16_at(&b, 50), TCA_OPTIONS, "no NLA_F_NESTED");
        assert_eq!(u32_at(&b, 52), 1, "TCQ_PLUG_RELEASE_ONE");
        assert_eq!(u32_at(&b, 56), 0);
        assert_eq!(b.len(), 60);

        let c = bytes(new_plug(7, 1 << 20), 1);
        assert_eq!(
            u16_at(&c, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&c, 52), 3, "TCQ_PLUG_LIMIT");
        assert_eq!(u32_at(&c, 56), 1 << 20);
        assert_eq!(c.len(), 60);

        // include/uapi/linux/pkt_sched.h: TCQ_PLUG_*, and the struct layout.
        assert_eq!(plug_qopt(PlugAction::Buffer, 0), [0; 8]);
        assert_eq!(
            plug_qopt(PlugAction::ReleaseIndefinite, 0x0102_0304)[..],
            [2i32.to_ne_bytes(), 0x0102_0304u32.to_ne_bytes()].concat()[..]
        );
    }

    #[test]
    fn redirect_filter_bytes() {
        let b = bytes(new_redirect(3, 9), 1);
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        assert_eq!(u16_at(&b, 4), libc::RTM_NEWTFILTER);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&b, 20), 3);
        assert_eq!(u32_at(&b, 24), 0, "handle chosen by the kernel");
        assert_eq!(u32_at(&b, 28), 0xffff_0000, "parent ffff:");
        // prio 1, protocol ETH_P_ALL in network order
        assert_eq!(u32_at(&b, 32), (1 << 16) | u32::from(0x0003u16.to_be()));
        // Attributes: KIND "u32", then OPTIONS holding SEL and ACT.
        assert_eq!(u16_at(&b, 38), 1, "TCA_KIND");
        assert_eq!(&b[40..44], b"u32\0");
        let opt = 44;
        assert_eq!(u16_at(&b, opt + 2), TCA_OPTIONS);
        assert_eq!(
            u16_at(&b, opt) as usize,
            b.len() - opt,
            "options nest to the end"
        );
        // tc_u32_sel (16 bytes) + one tc_u32_key (16), all zero but the
        // TC_U32_TERMINAL flag and nkeys.
        let sel = opt + 4;
        assert_eq!(u16_at(&b, sel), 4 + 32);
        assert_eq!(u16_at(&b, sel + 2), 5, "TCA_U32_SEL");
        assert_eq!(b[sel + 4], 1, "TC_U32_TERMINAL");
        assert_eq!(b[sel + 6], 1, "one key");
        assert!(b[sel + 8..sel + 36].iter().all(|&x| x == 0));
        let act = sel + 36;
        assert_eq!(u16_at(&b, act + 2), 7, "TCA_U32_ACT");
        let prio = act + 4;
        assert_eq!(u16_at(&b, prio + 2), 1, "action order 1");
        assert_eq!(u16_at(&b, prio + 6), 1, "TCA_ACT_KIND");
        assert_eq!(&b[prio + 8..prio + 15], b"mirred\0");
        let aopt = prio + 16;
        assert_eq!(u16_at(&b, aopt + 2) & NLA_TYPE_MASK, 2, "TCA_ACT_OPTIONS");
        // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt),
        // eaction, ifindex.
        let parms = aopt + 4;
        assert_eq!(u16_at(&b, parms), 4 + 28);
        assert_eq!(u16_at(&b, parms + 2), 2, "TCA_MIRRED_PARMS");
        let p = parms + 4;
        assert_eq!(u32_at(&b, p), 0, "index chosen by the kernel");
        assert_eq!(u32_at(&b, p + 8), 4, "TC_ACT_STOLEN");
        assert_eq!(u32_at(&b, p + 20) as i32, 1, "TCA_EGRESS_REDIR");
        assert_eq!(u32_at(&b, p + 24), 9, "to the IFB");
        assert_eq!(parms + 32, b.len());
    }

    #[test]
    fn ingress_and_link_bytes() {
        let q = bytes(new_ingress(5), 2);
        assert_eq!(u16_at(&q, 4), libc::RTM_NEWQDISC);
        assert_eq!(u32_at(&q, 20), 5);
        assert_eq!(u32_at(&q, 24), 0xffff_0000, "handle ffff:");
        assert_eq!(u32_at(&q, 28), 0xffff_fff1, "TC_H_INGRESS");
        assert_eq!(&q[40..48], b"ingress\0");
        let d = bytes(del_ingress(5), 3);
        assert_eq!(u16_at(&d, 4), libc::RTM_DELQDISC);
        assert_eq!(u16_at(&d, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&d, 28), 0xffff_fff1);
        assert_eq!(d.len(), 36);

        let b = bytes(new_ifb("ftapifb1"), 5);
        assert_eq!(u16_at(&b, 4), libc::RTM_NEWLINK);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert!(b[16..32].iter().all(|&x| x == 0), "ifinfomsg all zero");
        assert_eq!(u16_at(&b, 32), 4 + 9);
        assert_eq!(u16_at(&b, 34), libc::IFLA_IFNAME);
        assert_eq!(&b[36..45], b"ftapifb1\0");
        let li = 48;
        assert_eq!(u16_at(&b, li + 2) & NLA_TYPE_MASK, libc::IFLA_LINKINFO);
        assert_eq!(u16_at(&b, li + 6), libc::IFLA_INFO_KIND);
        assert_eq!(&b[li + 8..li + 12], b"ifb\0");
        assert_eq!(u16_at(&b, li) as usize, b.len() - li);

        let up = bytes(set_up(4), 6);
        assert_eq!(u16_at(&up, 4), libc::RTM_NEWLINK);
        assert_eq!(u32_at(&up, 20), 4);
        assert_eq!(u32_at(&up, 24), libc::IFF_UP as u32);
        assert_eq!(u32_at(&up, 28), libc::IFF_UP as u32);
        assert_eq!(up.len(), 32);
        let del = bytes(del_link(4), 7);
        assert_eq!(u16_at(&del, 4), libc::RTM_DELLINK);
        assert_eq!(u32_at(&del, 20), 4);
        let get = bytes(get_link("tap0"), 8);
        assert_eq!(u16_at(&get, 4), libc::RTM_GETLINK);
        assert_eq!(u16_at(&get, 6), NLM_F_REQUEST | NLM_F_ACK, "no dump");
        assert_eq!(&get[36..41], b"tap0\0");
    }

    #[test]
    fn the_redirect_parses_back_as_a_mirred_redirect() {
        let b = bytes(new_redirect(3, 9), 1);
        let msg = Request::deserialize(&b).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) = msg.payload
        else {
            panic!("not a filter: {msg:?}")
        };
        assert_eq!(m.header.index, 3);
        let opts = m
            .attributes
            .iter()
            .find_map(|a| match a {
                TcAttribute::Options(o) => Some(o),
                _ => None,
            })
            .unwrap();
        let acts = opts
            .iter()
            .find_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Action(a)) => Some(a),
                _ => None,
            })
            .unwrap();
        let parms = acts[0]
            .attributes
            .iter()
            .find_map(|a| match a {
                TcActionAttribute::Options(o) => o.iter().find_map(|o| match o {
                    TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) => Some(p),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap();
        assert_eq!(parms.eaction, TcMirrorActionType::EgressRedir);
        assert_eq!(parms.generic.action, TcActionType::Stolen);
        assert_eq!(parms.ifindex, 9);
    }

    /// An `NLMSG_ERROR` message for request `seq` with `code`, the given
    /// header flags, and an optional extended-ack text.
    fn error_msg(seq: u32, code: i32, flags: u16, text: Option<&[u8]>) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e[6..8].copy_from_slice(&flags.to_ne_bytes());
        e[8..12].copy_from_slice(&seq.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        // The request's header (capped): its length says 60.
        let mut orig = [0u8; 16];
        orig[0..4].copy_from_slice(&60u32.to_ne_bytes());
        e.extend_from_slice(&orig);
        if let Some(text) = text {
            e.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
            e.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            e.extend_from_slice(text);
            e.resize(e.len().next_multiple_of(4), 0);
        }
        let n = e.len() as u32;
        e[0..4].copy_from_slice(&n.to_ne_bytes());
        e
    }

    #[test]
    fn acks_and_refusals_with_extended_messages() {
        let ok = error_msg(9, 0, NLM_F_CAPPED, None);
        let a = parse_answers(&ok, 9, "RTM_NEWQDISC").unwrap();
        assert!(matches!(a[..], [Answer::Done(Ok(()))]), "{a:?}");
        assert!(parse_answers(&ok, 8, "RTM_NEWQDISC").unwrap().is_empty());

        // A refusal: ENOENT, capped, with a message TLV; after a reply and
        // behind someone else's message in the same datagram.
        let text = b"Specified qdisc kind is unknown.\0";
        let mut d = error_msg(3, 0, 0, None);
        let mut reply = vec![0u8; 20];
        reply[0..4].copy_from_slice(&20u32.to_ne_bytes());
        reply[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        reply[8..12].copy_from_slice(&9u32.to_ne_bytes());
        reply[16] = 0xaa;
        d.extend_from_slice(&reply);
        d.extend_from_slice(&error_msg(
            9,
            -libc::ENOENT,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            Some(text),
        ));
        let a = parse_answers(&d, 9, "RTM_NEWQDISC").unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(
            matches!(&a[0], Answer::Reply(ty, p) if *ty == libc::RTM_NEWLINK && p[..] == [0xaa, 0, 0, 0])
        );
        let Answer::Done(Err(err)) = &a[1] else {
            panic!("{a:?}")
        };
        assert_eq!(err.errno(), Some(libc::ENOENT));
        let NetlinkError::Refused { ext, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(ext.as_deref(), Some("Specified qdisc kind is unknown."));
        let shown = err.to_string();
        assert!(shown.starts_with("RTM_NEWQDISC: "), "{shown}");
        assert!(shown.contains("kernel: Specified qdisc kind"), "{shown}");

        // Not capped: the whole request (60 bytes) comes back before the TLVs.
        let mut e = error_msg(9, -libc::EEXIST, NLM_F_ACK_TLVS, None);
        e.truncate(20 + 16);
        e.extend_from_slice(&[0u8; 44]);
        e.extend_from_slice(&11u16.to_ne_bytes());
        e.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        e.extend_from_slice(b"Exists\0\0"); // 7 bytes and 1 of padding
        let n = e.len() as u32;
        e[0..4].copy_from_slice(&n.to_ne_bytes());
        let a = parse_answers(&e, 9, "RTM_NEWTFILTER").unwrap();
        let [Answer::Done(Err(NetlinkError::Refused { ext, source, .. }))] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(ext.as_deref(), Some("Exists"));

        // Garbage is an error, not a hang or a panic.
        assert!(matches!(
            parse_answers(&[1, 0, 0, 0, 2], 9, "RTM_NEWQDISC"),
            Err(NetlinkError::Malformed { .. })
        ));
    }
}
