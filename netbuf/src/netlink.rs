//! A small synchronous rtnetlink client: just what the plug backend needs
//! (IFB links, the ingress qdisc, a u32 match-all filter with a `mirred`
//! redirect, and the `sch_plug` qdisc with its `tc_plug_qopt` commands).
//!
//! Why not the `rtnetlink` crate: it is async (a tokio runtime in the epoch
//! driver's path) and has no typed API for `tc_plug_qopt` anyway; the
//! messages here are a few fixed kernel structs and attributes, built by
//! hand below and unit-tested against the kernel's layouts
//! (`include/uapi/linux/{netlink,rtnetlink,pkt_sched,pkt_cls,tc_act/tc_mirred}.h`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Message types.
pub const RTM_NEWLINK: u16 = 16;
/// Delete a link.
pub const RTM_DELLINK: u16 = 17;
/// Create or change a qdisc.
pub const RTM_NEWQDISC: u16 = 36;
/// Delete a qdisc.
pub const RTM_DELQDISC: u16 = 37;
/// Create a filter.
pub const RTM_NEWTFILTER: u16 = 44;
const NLMSG_ERROR: u16 = 2;

/// Header flags.
pub const NLM_F_REQUEST: u16 = 0x1;
/// Ask for an ack.
pub const NLM_F_ACK: u16 = 0x4;
/// Fail if it exists.
pub const NLM_F_EXCL: u16 = 0x200;
/// Create if missing.
pub const NLM_F_CREATE: u16 = 0x400;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_EXT_ACK: libc::c_int = 11;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 0x1;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;
const ETH_P_ALL: u16 = 0x0003;

/// The root of a device's egress.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
/// The ingress hook.
pub const TC_H_INGRESS: u32 = 0xffff_fff1;
/// The ingress qdisc's handle, `ffff:`.
pub const INGRESS_HANDLE: u32 = 0xffff_0000;
/// The plug qdisc's handle, `1:`.
pub const PLUG_HANDLE: u32 = 0x0001_0000;

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

/// Kernel structs this module sends, all without implicit padding.
///
/// # Safety
/// Implementors are `repr(C)`, contain only integers, and have no padding
/// bytes, so viewing them as bytes reads initialised memory only.
unsafe trait Plain: Sized {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: `Self` is plain integers, no
        // padding, so all `size_of` bytes are initialised; the slice
        // borrows `self`.
        unsafe {
            std::slice::from_raw_parts(
                self as *const Self as *const u8,
                std::mem::size_of::<Self>(),
            )
        }
    }
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct NlMsgHdr {
    /// Length with header.
    pub len: u32,
    /// Type.
    pub ty: u16,
    /// Flags.
    pub flags: u16,
    /// Sequence number.
    pub seq: u32,
    /// Port id.
    pub pid: u32,
}

/// `struct ifinfomsg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IfInfoMsg {
    /// Address family.
    pub family: u8,
    /// Padding.
    pub pad: u8,
    /// Device type.
    pub ty: u16,
    /// Interface index.
    pub index: i32,
    /// Device flags.
    pub flags: u32,
    /// Change mask.
    pub change: u32,
}

/// `struct tcmsg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcMsg {
    /// Address family.
    pub family: u8,
    /// Padding.
    pub pad1: u8,
    /// Padding.
    pub pad2: u16,
    /// Interface index.
    pub ifindex: i32,
    /// Handle.
    pub handle: u32,
    /// Parent.
    pub parent: u32,
    /// Filters: priority << 16 | protocol (network order).
    pub info: u32,
}

/// `struct tc_plug_qopt`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcPlugQopt {
    /// A [`PlugAction`].
    pub action: i32,
    /// Byte limit (for create and [`PlugAction::Limit`]).
    pub limit: u32,
}

/// `struct tc_u32_sel` with one `struct tc_u32_key`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcU32Sel1 {
    /// Flags.
    pub flags: u8,
    /// Offset shift.
    pub offshift: u8,
    /// Number of keys.
    pub nkeys: u8,
    /// Padding (implicit in the kernel's struct).
    pub pad: u8,
    /// Offset mask (network order).
    pub offmask: u16,
    /// Offset.
    pub off: u16,
    /// Offset offset.
    pub offoff: i16,
    /// Hash offset.
    pub hoff: i16,
    /// Hash mask (network order).
    pub hmask: u32,
    /// Key: mask (network order).
    pub key_mask: u32,
    /// Key: value.
    pub key_val: u32,
    /// Key: offset.
    pub key_off: i32,
    /// Key: offset mask.
    pub key_offmask: i32,
}

/// `struct tc_mirred` (with its `tc_gen` fields).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TcMirred {
    /// Action index.
    pub index: u32,
    /// Capabilities.
    pub capab: u32,
    /// Verdict (`TC_ACT_*`).
    pub action: i32,
    /// Reference count.
    pub refcnt: i32,
    /// Bind count.
    pub bindcnt: i32,
    /// Mirror or redirect, ingress or egress.
    pub eaction: i32,
    /// Target device.
    pub ifindex: u32,
}

// SAFETY: each is repr(C), integers only, and laid out without padding
// (the sizes are checked in the tests below).
unsafe impl Plain for NlMsgHdr {}
// SAFETY: as above.
unsafe impl Plain for IfInfoMsg {}
// SAFETY: as above.
unsafe impl Plain for TcMsg {}
// SAFETY: as above.
unsafe impl Plain for TcPlugQopt {}
// SAFETY: as above.
unsafe impl Plain for TcU32Sel1 {}
// SAFETY: as above.
unsafe impl Plain for TcMirred {}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink request under construction.
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A request of type `ty` (`NLM_F_REQUEST | NLM_F_ACK` are added).
    pub fn new(ty: u16, flags: u16) -> Msg {
        let hdr = NlMsgHdr {
            len: 0,
            ty,
            flags: flags | NLM_F_REQUEST | NLM_F_ACK,
            seq: 0,
            pid: 0,
        };
        let mut m = Msg {
            buf: Vec::with_capacity(256),
        };
        m.buf.extend_from_slice(hdr.as_bytes());
        m
    }

    fn put<T: Plain>(mut self, v: &T) -> Msg {
        self.buf.extend_from_slice(v.as_bytes());
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn nest(&mut self, ty: u16, body: impl FnOnce(&mut Msg)) {
        let start = self.buf.len();
        self.attr(ty, &[]);
        body(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The bytes to send, with length and sequence number filled in.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// `ip link add NAME type ifb`.
pub fn new_ifb(name: &str) -> Msg {
    let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL).put(&IfInfoMsg::default());
    m.attr_str(IFLA_IFNAME, name);
    m.nest(IFLA_LINKINFO, |m| m.attr_str(IFLA_INFO_KIND, "ifb"));
    m
}

/// `ip link set dev INDEX up`.
pub fn set_up(index: i32) -> Msg {
    Msg::new(RTM_NEWLINK, 0).put(&IfInfoMsg {
        index,
        flags: IFF_UP,
        change: IFF_UP,
        ..IfInfoMsg::default()
    })
}

/// `ip link del dev INDEX`.
pub fn del_link(index: i32) -> Msg {
    Msg::new(RTM_DELLINK, 0).put(&IfInfoMsg {
        index,
        ..IfInfoMsg::default()
    })
}

/// `tc qdisc add dev INDEX ingress`.
pub fn new_ingress(ifindex: i32) -> Msg {
    let mut m = Msg::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL).put(&TcMsg {
        ifindex,
        handle: INGRESS_HANDLE,
        parent: TC_H_INGRESS,
        ..TcMsg::default()
    });
    m.attr_str(TCA_KIND, "ingress");
    m
}

/// `tc qdisc del dev INDEX ingress` (its filters go with it).
pub fn del_ingress(ifindex: i32) -> Msg {
    Msg::new(RTM_DELQDISC, 0).put(&TcMsg {
        ifindex,
        handle: INGRESS_HANDLE,
        parent: TC_H_INGRESS,
        ..TcMsg::default()
    })
}

/// `tc filter add dev TAP parent ffff: protocol all prio 1 u32 match u32 0 0
/// action mirred egress redirect dev IFB`.
pub fn new_redirect(tap_index: i32, ifb_index: i32) -> Msg {
    let mut m = Msg::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL).put(&TcMsg {
        ifindex: tap_index,
        handle: 0,
        parent: INGRESS_HANDLE,
        info: (1 << 16) | u32::from(ETH_P_ALL.to_be()),
        ..TcMsg::default()
    });
    m.attr_str(TCA_KIND, "u32");
    m.nest(TCA_OPTIONS, |m| {
        let sel = TcU32Sel1 {
            flags: TC_U32_TERMINAL,
            nkeys: 1,
            ..TcU32Sel1::default()
        };
        m.attr(TCA_U32_SEL, sel.as_bytes());
        m.nest(TCA_U32_ACT, |m| {
            m.nest(1, |m| {
                m.attr_str(TCA_ACT_KIND, "mirred");
                m.nest(TCA_ACT_OPTIONS, |m| {
                    let p = TcMirred {
                        action: TC_ACT_STOLEN,
                        eaction: TCA_EGRESS_REDIR,
                        ifindex: ifb_index as u32,
                        ..TcMirred::default()
                    };
                    m.attr(TCA_MIRRED_PARMS, p.as_bytes());
                });
            });
        });
    });
    m
}

fn plug_msg(ifindex: i32, flags: u16, opt: TcPlugQopt) -> Msg {
    let mut m = Msg::new(RTM_NEWQDISC, flags).put(&TcMsg {
        ifindex,
        handle: PLUG_HANDLE,
        parent: TC_H_ROOT,
        ..TcMsg::default()
    });
    m.attr_str(TCA_KIND, "plug");
    m.attr(TCA_OPTIONS, opt.as_bytes());
    m
}

/// `tc qdisc add dev INDEX root handle 1: plug limit LIMIT`.
pub fn new_plug(ifindex: i32, limit: u32) -> Msg {
    plug_msg(
        ifindex,
        NLM_F_CREATE | NLM_F_EXCL,
        TcPlugQopt {
            action: PlugAction::Limit as i32,
            limit,
        },
    )
}

/// `tc qdisc change dev INDEX root handle 1: plug <action>`.
pub fn plug_command(ifindex: i32, action: PlugAction) -> Msg {
    plug_msg(
        ifindex,
        0,
        TcPlugQopt {
            action: action as i32,
            limit: 0,
        },
    )
}

/// A netlink request the kernel refused, or a socket failure.
#[derive(Debug, thiserror::Error)]
#[error("{source}{}", ext.as_ref().map(|m| format!(" (kernel: {m})")).unwrap_or_default())]
pub struct NetlinkError {
    /// The OS error (the kernel's errno for a refusal).
    pub source: std::io::Error,
    /// The kernel's extended-ack message, if any.
    pub ext: Option<String>,
}

impl NetlinkError {
    fn os(source: std::io::Error) -> Self {
        NetlinkError { source, ext: None }
    }

    /// The errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// A `NETLINK_ROUTE` socket that sends one request at a time and waits for
/// its ack.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens and binds the socket, with extended acks on.
    pub fn open() -> Result<Socket, NetlinkError> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::os(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid (family set below).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `sa` is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NetlinkError::os(std::io::Error::last_os_error()));
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one int from a live pointer; failure
        // only means no extended messages.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads one timeval from a live pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Socket { fd, seq: 1 })
    }

    /// Sends `msg` and waits for the kernel's ack.
    pub fn request(&mut self, msg: Msg) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: sends from a live buffer of the given length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
            )
        };
        if n < 0 {
            return Err(NetlinkError::os(std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: receives into a live buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::os(e));
            }
            if let Some(r) = parse_ack(&buf[..n as usize], seq) {
                return r;
            }
        }
    }
}

/// Finds the ack of request `seq` in a datagram: Some(Ok) for success,
/// Some(Err) with errno and extended message for a refusal, None if it is
/// not there.
pub fn parse_ack(mut data: &[u8], seq: u32) -> Option<Result<(), NetlinkError>> {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        let flags = u16::from_ne_bytes(data[6..8].try_into().ok()?);
        let mseq = u32::from_ne_bytes(data[8..12].try_into().ok()?);
        if len < 16 || len > data.len() {
            return None;
        }
        let msg = &data[..len];
        if ty == NLMSG_ERROR && mseq == seq && len >= 20 {
            let err = i32::from_ne_bytes(msg[16..20].try_into().ok()?);
            if err == 0 {
                return Some(Ok(()));
            }
            let mut ext = None;
            if flags & NLM_F_ACK_TLVS != 0 && len >= 36 {
                let orig = if flags & NLM_F_CAPPED != 0 {
                    16
                } else {
                    u32::from_ne_bytes(msg[20..24].try_into().ok()?) as usize
                };
                let mut tlv = msg.get(align4(20 + orig)..).unwrap_or(&[]);
                while tlv.len() >= 4 {
                    let alen = u16::from_ne_bytes([tlv[0], tlv[1]]) as usize;
                    let aty = u16::from_ne_bytes([tlv[2], tlv[3]]);
                    if alen < 4 || alen > tlv.len() {
                        break;
                    }
                    if aty == NLMSGERR_ATTR_MSG {
                        let s = &tlv[4..alen];
                        let s = s.split(|&b| b == 0).next().unwrap_or(s);
                        ext = Some(String::from_utf8_lossy(s).into_owned());
                    }
                    tlv = tlv.get(align4(alen)..).unwrap_or(&[]);
                }
            }
            return Some(Err(NetlinkError {
                source: std::io::Error::from_raw_os_error(-err),
                ext,
            }));
        }
        data = data.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Result<i32, NetlinkError> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| NetlinkError::os(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: `c` is a valid NUL-terminated string alive across the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(NetlinkError::os(std::io::Error::last_os_error()))
    } else {
        Ok(i as i32)
    }
}

/// Default request timeout (the socket's receive timeout).
pub const TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn structs_match_the_kernel_layouts() {
        // include/uapi/linux/netlink.h
        assert_eq!(size_of::<NlMsgHdr>(), 16);
        assert_eq!(size_of::<NlMsgHdr>(), size_of::<libc::nlmsghdr>());
        assert_eq!(
            offset_of!(NlMsgHdr, ty),
            offset_of!(libc::nlmsghdr, nlmsg_type)
        );
        assert_eq!(
            offset_of!(NlMsgHdr, seq),
            offset_of!(libc::nlmsghdr, nlmsg_seq)
        );
        // include/uapi/linux/rtnetlink.h
        assert_eq!(size_of::<IfInfoMsg>(), 16);
        assert_eq!(size_of::<IfInfoMsg>(), size_of::<libc::ifinfomsg>());
        assert_eq!(
            offset_of!(IfInfoMsg, index),
            offset_of!(libc::ifinfomsg, ifi_index)
        );
        assert_eq!(
            offset_of!(IfInfoMsg, change),
            offset_of!(libc::ifinfomsg, ifi_change)
        );
        assert_eq!(size_of::<TcMsg>(), 20);
        assert_eq!(offset_of!(TcMsg, ifindex), 4);
        assert_eq!(offset_of!(TcMsg, handle), 8);
        assert_eq!(offset_of!(TcMsg, parent), 12);
        assert_eq!(offset_of!(TcMsg, info), 16);
        // include/uapi/linux/pkt_sched.h: struct tc_plug_qopt { int action; __u32 limit; }
        assert_eq!(size_of::<TcPlugQopt>(), 8);
        assert_eq!(offset_of!(TcPlugQopt, limit), 4);
        // pkt_cls.h: tc_u32_sel (16 bytes, hmask at 12) + one tc_u32_key (16).
        assert_eq!(size_of::<TcU32Sel1>(), 32);
        assert_eq!(offset_of!(TcU32Sel1, nkeys), 2);
        assert_eq!(offset_of!(TcU32Sel1, offmask), 4);
        assert_eq!(offset_of!(TcU32Sel1, off), 6);
        assert_eq!(offset_of!(TcU32Sel1, hoff), 10);
        assert_eq!(offset_of!(TcU32Sel1, hmask), 12);
        assert_eq!(offset_of!(TcU32Sel1, key_mask), 16);
        assert_eq!(offset_of!(TcU32Sel1, key_offmask), 28);
        // tc_act/tc_mirred.h: tc_gen (5 × 4) + eaction + ifindex.
        assert_eq!(size_of::<TcMirred>(), 28);
        assert_eq!(offset_of!(TcMirred, action), 8);
        assert_eq!(offset_of!(TcMirred, eaction), 20);
        assert_eq!(offset_of!(TcMirred, ifindex), 24);
        // nlattr: 4-byte header, 4-byte alignment.
        assert_eq!(size_of::<libc::nlattr>(), 4);
        assert_eq!(align4(5), 8);
        assert_eq!(align4(8), 8);
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn plug_command_bytes() {
        let b = plug_command(7, PlugAction::ReleaseOne).finish(42);
        // nlmsghdr
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        assert_eq!(u16_at(&b, 4), RTM_NEWQDISC);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK,
            "change: no CREATE"
        );
        assert_eq!(u32_at(&b, 8), 42);
        // tcmsg at 16
        assert_eq!(u32_at(&b, 20), 7);
        assert_eq!(u32_at(&b, 24), PLUG_HANDLE);
        assert_eq!(u32_at(&b, 28), TC_H_ROOT);
        // TCA_KIND "plug\0" at 36: len 9, padded to 12
        assert_eq!(u16_at(&b, 36), 9);
        assert_eq!(u16_at(&b, 38), TCA_KIND);
        assert_eq!(&b[40..45], b"plug\0");
        // TCA_OPTIONS at 48: tc_plug_qopt, not nested
        assert_eq!(u16_at(&b, 48), 12);
        assert_eq!(u16_at(&b, 50), TCA_OPTIONS);
        assert_eq!(u32_at(&b, 52), 1, "TCQ_PLUG_RELEASE_ONE");
        assert_eq!(u32_at(&b, 56), 0);
        assert_eq!(b.len(), 60);
        let c = new_plug(7, 1 << 20).finish(1);
        assert_eq!(
            u16_at(&c, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&c, 52), 3, "TCQ_PLUG_LIMIT");
        assert_eq!(u32_at(&c, 56), 1 << 20);
        assert_eq!(PlugAction::Buffer as i32, 0);
        assert_eq!(PlugAction::ReleaseIndefinite as i32, 2);
    }

    #[test]
    fn redirect_filter_bytes() {
        let b = new_redirect(3, 9).finish(1);
        assert_eq!(u32_at(&b, 0) as usize, b.len());
        assert_eq!(u16_at(&b, 4), RTM_NEWTFILTER);
        assert_eq!(u32_at(&b, 20), 3);
        assert_eq!(u32_at(&b, 28), INGRESS_HANDLE);
        // prio 1, protocol ETH_P_ALL in network order
        assert_eq!(u32_at(&b, 32), (1 << 16) | u32::from(0x0003u16.to_be()));
        // Walk the attributes: KIND "u32", then OPTIONS containing SEL and ACT.
        assert_eq!(u16_at(&b, 38), TCA_KIND);
        assert_eq!(&b[40..44], b"u32\0");
        let opt = 44;
        assert_eq!(u16_at(&b, opt + 2), TCA_OPTIONS);
        assert_eq!(
            u16_at(&b, opt) as usize,
            b.len() - opt,
            "options nest to the end"
        );
        let sel = opt + 4;
        assert_eq!(u16_at(&b, sel), 4 + 32);
        assert_eq!(u16_at(&b, sel + 2), TCA_U32_SEL);
        assert_eq!(b[sel + 4], TC_U32_TERMINAL);
        assert_eq!(b[sel + 6], 1, "one key");
        let act = sel + 36;
        assert_eq!(u16_at(&b, act + 2), TCA_U32_ACT);
        let prio = act + 4;
        assert_eq!(u16_at(&b, prio + 2), 1);
        assert_eq!(u16_at(&b, prio + 6), TCA_ACT_KIND);
        assert_eq!(&b[prio + 8..prio + 15], b"mirred\0");
        let aopt = prio + 16;
        assert_eq!(u16_at(&b, aopt + 2), TCA_ACT_OPTIONS);
        let parms = aopt + 4;
        assert_eq!(u16_at(&b, parms), 4 + 28);
        assert_eq!(u16_at(&b, parms + 2), TCA_MIRRED_PARMS);
        assert_eq!(u32_at(&b, parms + 4 + 8) as i32, TC_ACT_STOLEN);
        assert_eq!(u32_at(&b, parms + 4 + 20) as i32, TCA_EGRESS_REDIR);
        assert_eq!(u32_at(&b, parms + 4 + 24), 9);
        assert_eq!(parms + 32, b.len());
    }

    #[test]
    fn ifb_link_bytes() {
        let b = new_ifb("ftapifb1").finish(5);
        assert_eq!(u16_at(&b, 4), RTM_NEWLINK);
        // ifinfomsg 16..32, then IFLA_IFNAME
        assert_eq!(u16_at(&b, 32), 4 + 9);
        assert_eq!(u16_at(&b, 34), IFLA_IFNAME);
        assert_eq!(&b[36..45], b"ftapifb1\0");
        let li = 48;
        assert_eq!(u16_at(&b, li + 2), IFLA_LINKINFO);
        assert_eq!(u16_at(&b, li + 6), IFLA_INFO_KIND);
        assert_eq!(&b[li + 8..li + 12], b"ifb\0");
        assert_eq!(u16_at(&b, li) as usize, b.len() - li);
        let up = set_up(4).finish(6);
        assert_eq!(u32_at(&up, 20), 4);
        assert_eq!(u32_at(&up, 24), IFF_UP);
        assert_eq!(u32_at(&up, 28), IFF_UP);
    }

    #[test]
    fn acks_and_refusals_with_extended_messages() {
        let mut ok = vec![0u8; 36];
        ok[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ok[8..12].copy_from_slice(&9u32.to_ne_bytes());
        assert!(matches!(parse_ack(&ok, 9), Some(Ok(()))));
        assert!(parse_ack(&ok, 8).is_none());
        // A refusal: ENOENT, capped, with a message TLV.
        let text = b"Specified qdisc kind is unknown.\0";
        let mut e = vec![0u8; 36];
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e[6..8].copy_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        e[8..12].copy_from_slice(&9u32.to_ne_bytes());
        e[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        e[20..24].copy_from_slice(&60u32.to_ne_bytes());
        e.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        e.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        e.extend_from_slice(text);
        e.resize(align4(e.len()), 0);
        let n = e.len() as u32;
        e[0..4].copy_from_slice(&n.to_ne_bytes());
        let err = parse_ack(&e, 9).unwrap().unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert_eq!(err.ext.as_deref(), Some("Specified qdisc kind is unknown."));
        assert!(err.to_string().contains("kernel: Specified qdisc kind"));
    }
}
