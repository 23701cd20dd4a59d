//! The least of Ethernet, ARP, IPv4, UDP and ICMP echo the guest needs:
//! building frames into a buffer and classifying received ones.
//!
//! Plain `core` code with no dependency on the rest of the guest, so the host
//! tests in `tests/guest_isa` compile and test this very file.

pub type Mac = [u8; 6];
pub type Ipv4 = [u8; 4];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_HDR: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
const IPV4_HDR: usize = 20;
const UDP_HDR: usize = 8;
const ARP_LEN: usize = 28;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// Shortest Ethernet frame without its FCS; shorter ones are padded.
const ETH_MIN: usize = 60;
const TTL: u8 = 64;
/// The largest UDP payload in one unfragmented 1500-byte IPv4 packet.
pub const MAX_UDP_PAYLOAD: usize = 1500 - IPV4_HDR - UDP_HDR;

/// A received frame, as far as the guest cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Arp {
        op: ArpOp,
        sender_mac: Mac,
        sender_ip: Ipv4,
        target_ip: Ipv4,
    },
    Udp {
        src_mac: Mac,
        src_ip: Ipv4,
        dst_ip: Ipv4,
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// An ICMP echo request; `message` is the whole ICMP message.
    Ping {
        src_mac: Mac,
        src_ip: Ipv4,
        dst_ip: Ipv4,
        message: &'a [u8],
    },
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOp {
    Request,
    Reply,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn ip_at(b: &[u8], at: usize) -> Ipv4 {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    [b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5]]
}

/// Adds `data` as big-endian 16-bit words to a one's-complement sum.
pub fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Internet checksum of a one's-complement sum.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(0, data))
}

fn eth_header(buf: &mut [u8], dst: &Mac, src: &Mac, ethertype: u16) {
    buf[0..6].copy_from_slice(dst);
    buf[6..12].copy_from_slice(src);
    put16(buf, 12, ethertype);
}

/// Pads a frame of `len` bytes to the Ethernet minimum; returns its length.
fn pad(buf: &mut [u8], len: usize) -> usize {
    if len < ETH_MIN {
        buf[len..ETH_MIN].fill(0);
        ETH_MIN
    } else {
        len
    }
}

/// An ARP request (broadcast) or reply (to `target_mac`) into `buf` (at least
/// 60 bytes); returns the frame length.
pub fn build_arp(
    buf: &mut [u8],
    op: ArpOp,
    sender_mac: &Mac,
    sender_ip: &Ipv4,
    target_mac: &Mac,
    target_ip: &Ipv4,
) -> usize {
    let eth_dst = match op {
        ArpOp::Request => BROADCAST,
        ArpOp::Reply => *target_mac,
    };
    eth_header(buf, &eth_dst, sender_mac, ETHERTYPE_ARP);
    let a = &mut buf[ETH_HDR..ETH_HDR + ARP_LEN];
    put16(a, 0, 1); // Ethernet
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(
        a,
        6,
        match op {
            ArpOp::Request => ARP_REQUEST,
            ArpOp::Reply => ARP_REPLY,
        },
    );
    a[8..14].copy_from_slice(sender_mac);
    a[14..18].copy_from_slice(sender_ip);
    match op {
        ArpOp::Request => a[18..24].fill(0),
        ArpOp::Reply => a[18..24].copy_from_slice(target_mac),
    }
    a[24..28].copy_from_slice(target_ip);
    pad(buf, ETH_HDR + ARP_LEN)
}

/// An IPv4 header (no options) for `payload_len` bytes of `proto`.
fn ipv4_header(h: &mut [u8], proto: u8, id: u16, src: &Ipv4, dst: &Ipv4, payload_len: usize) {
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, (IPV4_HDR + payload_len) as u16);
    put16(h, 4, id);
    put16(h, 6, 0x4000); // DF, offset 0
    h[8] = TTL;
    h[9] = proto;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(src);
    h[16..20].copy_from_slice(dst);
    let sum = checksum(&h[..IPV4_HDR]);
    put16(h, 10, sum);
}

/// The UDP checksum over the IPv4 pseudo-header and `segment` (header with a
/// zero checksum field, then payload); 0 is sent as 0xffff.
pub fn udp_checksum(src: &Ipv4, dst: &Ipv4, segment: &[u8]) -> u16 {
    let mut acc = sum16(0, src);
    acc = sum16(acc, dst);
    acc += u32::from(IPPROTO_UDP);
    acc += segment.len() as u32;
    let sum = fold(sum16(acc, segment));
    if sum == 0 {
        0xffff
    } else {
        sum
    }
}

/// Addresses of one UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpAddrs {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv4,
    pub dst_ip: Ipv4,
    pub src_port: u16,
    pub dst_port: u16,
}

/// An Ethernet + IPv4 + UDP frame into `buf`; returns its length, or None
/// when `payload` does not fit one unfragmented packet or `buf` is short.
pub fn build_udp(buf: &mut [u8], a: &UdpAddrs, ip_id: u16, payload: &[u8]) -> Option<usize> {
    let total = ETH_HDR + IPV4_HDR + UDP_HDR + payload.len();
    if payload.len() > MAX_UDP_PAYLOAD || buf.len() < total.max(ETH_MIN) {
        return None;
    }
    eth_header(buf, &a.dst_mac, &a.src_mac, ETHERTYPE_IPV4);
    let udp_len = UDP_HDR + payload.len();
    ipv4_header(
        &mut buf[ETH_HDR..ETH_HDR + IPV4_HDR],
        IPPROTO_UDP,
        ip_id,
        &a.src_ip,
        &a.dst_ip,
        udp_len,
    );
    let seg = &mut buf[ETH_HDR + IPV4_HDR..total];
    put16(seg, 0, a.src_port);
    put16(seg, 2, a.dst_port);
    put16(seg, 4, udp_len as u16);
    put16(seg, 6, 0);
    seg[UDP_HDR..].copy_from_slice(payload);
    let sum = udp_checksum(&a.src_ip, &a.dst_ip, seg);
    put16(seg, 6, sum);
    Some(pad(buf, total))
}

/// An ICMP echo reply to a request whose ICMP message is `request`; returns
/// the frame length, or None when it does not fit.
pub fn build_pong(
    buf: &mut [u8],
    src_mac: &Mac,
    dst_mac: &Mac,
    src_ip: &Ipv4,
    dst_ip: &Ipv4,
    ip_id: u16,
    request: &[u8],
) -> Option<usize> {
    let total = ETH_HDR + IPV4_HDR + request.len();
    if request.len() < 8 || request.len() > 1500 - IPV4_HDR || buf.len() < total.max(ETH_MIN) {
        return None;
    }
    eth_header(buf, dst_mac, src_mac, ETHERTYPE_IPV4);
    ipv4_header(
        &mut buf[ETH_HDR..ETH_HDR + IPV4_HDR],
        IPPROTO_ICMP,
        ip_id,
        src_ip,
        dst_ip,
        request.len(),
    );
    let msg = &mut buf[ETH_HDR + IPV4_HDR..total];
    msg.copy_from_slice(request);
    msg[0] = 0; // echo reply
    msg[1] = 0;
    put16(msg, 2, 0);
    let sum = checksum(msg);
    put16(msg, 2, sum);
    Some(pad(buf, total))
}

/// Classifies a received Ethernet frame (without any virtio header).
/// Malformed, fragmented or checksum-failing IPv4 packets are `Other`.
pub fn parse(frame: &[u8]) -> Frame<'_> {
    if frame.len() < ETH_HDR {
        return Frame::Other;
    }
    let src_mac = mac_at(frame, 6);
    let body = &frame[ETH_HDR..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(body),
        ETHERTYPE_IPV4 => parse_ipv4(src_mac, body),
        _ => Frame::Other,
    }
}

fn parse_arp(a: &[u8]) -> Frame<'_> {
    if a.len() < ARP_LEN
        || be16(a, 0) != 1
        || be16(a, 2) != ETHERTYPE_IPV4
        || a[4] != 6
        || a[5] != 4
    {
        return Frame::Other;
    }
    let op = match be16(a, 6) {
        ARP_REQUEST => ArpOp::Request,
        ARP_REPLY => ArpOp::Reply,
        _ => return Frame::Other,
    };
    Frame::Arp {
        op,
        sender_mac: mac_at(a, 8),
        sender_ip: ip_at(a, 14),
        target_ip: ip_at(a, 24),
    }
}

fn parse_ipv4(src_mac: Mac, p: &[u8]) -> Frame<'_> {
    if p.len() < IPV4_HDR || p[0] >> 4 != 4 {
        return Frame::Other;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(be16(p, 2));
    if ihl < IPV4_HDR || total < ihl || total > p.len() || checksum(&p[..ihl]) != 0 {
        return Frame::Other;
    }
    // More fragments, or not the first fragment.
    if be16(p, 6) & 0x3fff != 0 {
        return Frame::Other;
    }
    let (src_ip, dst_ip) = (ip_at(p, 12), ip_at(p, 16));
    let data = &p[ihl..total];
    match p[9] {
        IPPROTO_UDP => {
            if data.len() < UDP_HDR {
                return Frame::Other;
            }
            let len = usize::from(be16(data, 4));
            if len < UDP_HDR || len > data.len() {
                return Frame::Other;
            }
            Frame::Udp {
                src_mac,
                src_ip,
                dst_ip,
                src_port: be16(data, 0),
                dst_port: be16(data, 2),
                payload: &data[UDP_HDR..len],
            }
        }
        IPPROTO_ICMP if data.len() >= 8 && data[0] == 8 && data[1] == 0 => Frame::Ping {
            src_mac,
            src_ip,
            dst_ip,
            message: data,
        },
        _ => Frame::Other,
    }
}
