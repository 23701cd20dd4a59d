//! The guest's packet code and record formats, compiled from the guest's own
//! sources (plain `core` code) and tested on the host.

#[path = "../../../resources/test-guest/src/netproto.rs"]
#[allow(dead_code)]
mod netproto;
#[path = "../../../resources/test-guest/src/records.rs"]
mod records;

use netproto::{
    build_arp, build_pong, build_udp, checksum, parse, udp_checksum, ArpOp, Frame, UdpAddrs,
};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const HOST_MAC: [u8; 6] = [0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];

#[test]
fn ipv4_header_checksum_known_vector() {
    // The classic example header (checksum field zeroed): 0xb861.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(checksum(&h), 0xb861);
    let mut with = h;
    with[10] = 0xb8;
    with[11] = 0x61;
    assert_eq!(checksum(&with), 0);
    // Odd length: the last byte is the high half of a word.
    assert_eq!(checksum(&[0x01]), !0x0100);
}

#[test]
fn udp_frame_layout_and_checksums() {
    let addrs = UdpAddrs {
        src_mac: GUEST_MAC,
        dst_mac: HOST_MAC,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
        src_port: 7777,
        dst_port: 9000,
    };
    let payload = b"ftguest hb=42\n";
    let mut buf = [0xaau8; 2048];
    let len = build_udp(&mut buf, &addrs, 0x1234, payload).unwrap();
    // 14 + 20 + 8 + 14 = 56 bytes, padded to the Ethernet minimum.
    assert_eq!(len, 60);
    let f = &buf[..len];
    assert_eq!(&f[0..6], &HOST_MAC);
    assert_eq!(&f[6..12], &GUEST_MAC);
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 14);
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 0x1234);
    assert_eq!(ip[9], 17);
    assert_eq!(&ip[12..16], &GUEST_IP);
    assert_eq!(&ip[16..20], &HOST_IP);
    assert_eq!(checksum(ip), 0, "IPv4 header checksum");
    let seg = &f[34..34 + 8 + payload.len()];
    assert_eq!(u16::from_be_bytes([seg[0], seg[1]]), 7777);
    assert_eq!(u16::from_be_bytes([seg[2], seg[3]]), 9000);
    assert_eq!(
        usize::from(u16::from_be_bytes([seg[4], seg[5]])),
        8 + payload.len()
    );
    assert_ne!(u16::from_be_bytes([seg[6], seg[7]]), 0);
    // Pseudo-header + segment (with its checksum) sums to 0xffff.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&GUEST_IP);
    pseudo.extend_from_slice(&HOST_IP);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    assert_eq!(checksum(&pseudo), 0, "UDP checksum");
    assert_eq!(&seg[8..], payload);
    // Padded to the Ethernet minimum with zeros.
    assert!(buf[56..60].iter().all(|&b| b == 0));

    // And it parses back.
    assert_eq!(
        parse(f),
        Frame::Udp {
            src_mac: GUEST_MAC,
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port: 7777,
            dst_port: 9000,
            payload
        }
    );
}

#[test]
fn udp_checksum_zero_is_sent_as_ffff() {
    // Find a payload whose checksum folds to 0 and check it becomes 0xffff.
    let (src, dst) = (GUEST_IP, HOST_IP);
    for x in 0..=u16::MAX {
        let mut seg = vec![0x1e, 0x61, 0x23, 0x28, 0, 10, 0, 0];
        seg.extend_from_slice(&x.to_be_bytes());
        let sum = udp_checksum(&src, &dst, &seg);
        assert_ne!(sum, 0);
        if sum == 0xffff {
            return;
        }
    }
    panic!("no payload with a zero checksum found");
}

#[test]
fn big_and_small_udp() {
    let addrs = UdpAddrs {
        src_mac: GUEST_MAC,
        dst_mac: HOST_MAC,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
        src_port: 7,
        dst_port: 40000,
    };
    let mut buf = [0u8; 2048];
    assert_eq!(build_udp(&mut buf, &addrs, 1, &[]), Some(60));
    assert_eq!(build_udp(&mut buf, &addrs, 1, &[7; 1472]), Some(14 + 1500));
    assert_eq!(build_udp(&mut buf, &addrs, 1, &[7; 1473]), None);
    assert_eq!(build_udp(&mut buf[..100], &addrs, 1, &[7; 80]), None);
}

#[test]
fn arp_request_and_reply() {
    let mut buf = [0xaau8; 64];
    let len = build_arp(
        &mut buf,
        ArpOp::Request,
        &GUEST_MAC,
        &GUEST_IP,
        &[0; 6],
        &HOST_IP,
    );
    assert_eq!(len, 60);
    assert_eq!(&buf[0..6], &[0xff; 6]);
    assert_eq!(&buf[12..14], &[0x08, 0x06]);
    assert_eq!(&buf[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
    assert_eq!(&buf[22..28], &GUEST_MAC);
    assert_eq!(&buf[28..32], &GUEST_IP);
    assert_eq!(&buf[32..38], &[0; 6]);
    assert_eq!(&buf[38..42], &HOST_IP);
    assert!(buf[42..60].iter().all(|&b| b == 0));
    assert_eq!(
        parse(&buf[..len]),
        Frame::Arp {
            op: ArpOp::Request,
            sender_mac: GUEST_MAC,
            sender_ip: GUEST_IP,
            target_ip: HOST_IP
        }
    );
    let len = build_arp(
        &mut buf,
        ArpOp::Reply,
        &GUEST_MAC,
        &GUEST_IP,
        &HOST_MAC,
        &HOST_IP,
    );
    assert_eq!(&buf[0..6], &HOST_MAC);
    assert_eq!(&buf[20..22], &[0, 2]);
    assert_eq!(&buf[32..38], &HOST_MAC);
    assert_eq!(
        parse(&buf[..len]),
        Frame::Arp {
            op: ArpOp::Reply,
            sender_mac: GUEST_MAC,
            sender_ip: GUEST_IP,
            target_ip: HOST_IP
        }
    );
}

/// A frame as a Linux host would send it: IPv4 with options, UDP.
fn host_udp(options: &[u8], payload: &[u8], flags_frag: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let ihl = 20 + options.len();
    let total = ihl + 8 + payload.len();
    let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 9]);
    ip.extend_from_slice(&flags_frag.to_be_bytes());
    ip.extend_from_slice(&[64, 17, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(options);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&7u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    // Ethernet padding after the IP packet must be ignored.
    while f.len() < 60 {
        f.push(0xee);
    }
    f
}

#[test]
fn parses_udp_with_options_and_padding() {
    let f = host_udp(&[1, 1, 1, 1], b"hi", 0x4000);
    assert_eq!(
        parse(&f),
        Frame::Udp {
            src_mac: HOST_MAC,
            src_ip: HOST_IP,
            dst_ip: GUEST_IP,
            src_port: 40000,
            dst_port: 7,
            payload: b"hi"
        }
    );
}

#[test]
fn rejects_fragments_bad_checksums_and_junk() {
    assert_eq!(parse(&host_udp(&[], b"x", 0x2000)), Frame::Other); // MF
    assert_eq!(parse(&host_udp(&[], b"x", 0x0001)), Frame::Other); // offset
    let mut f = host_udp(&[], b"x", 0);
    f[14 + 8] ^= 1; // TTL changed, checksum now wrong
    assert_eq!(parse(&f), Frame::Other);
    let f = host_udp(&[], b"xyz", 0);
    for cut in 0..14 + 20 + 8 {
        assert_eq!(parse(&f[..cut]), Frame::Other, "cut at {cut}");
    }
    assert_eq!(parse(&[]), Frame::Other);
    let mut ipv6 = f.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(parse(&ipv6), Frame::Other);
}

#[test]
fn ping_gets_a_pong() {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(b"abcdefgh");
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    let s = checksum(&ip);
    ip[10..12].copy_from_slice(&s.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    let Frame::Ping {
        src_mac,
        src_ip,
        dst_ip,
        message,
    } = parse(&f)
    else {
        panic!("not a ping: {:?}", parse(&f));
    };
    assert_eq!((src_mac, src_ip, dst_ip), (HOST_MAC, HOST_IP, GUEST_IP));
    let mut buf = [0u8; 128];
    let len = build_pong(
        &mut buf, &GUEST_MAC, &src_mac, &GUEST_IP, &src_ip, 5, message,
    )
    .unwrap();
    // 14 + 20 + 16 = 50 bytes, padded to the Ethernet minimum.
    assert_eq!(len, 60);
    let reply = &buf[34..50];
    assert_eq!(reply[0], 0);
    assert_eq!(&reply[4..], &icmp[4..]);
    assert_eq!(checksum(reply), 0);
    assert_eq!(checksum(&buf[14..34]), 0);
    assert_eq!(&buf[0..6], &HOST_MAC);
}

#[test]
fn records() {
    let mut buf = [0u8; 32];
    let n = records::heartbeat_payload(&mut buf, 1);
    assert_eq!(&buf[..n], b"ftguest hb=1\n");
    let n = records::heartbeat_payload(&mut buf, u64::MAX);
    assert_eq!(&buf[..n], b"ftguest hb=18446744073709551615\n");
    let mut sector = [0xffu8; 512];
    records::sector_record(&mut sector, 1234);
    let text = b"ftguest sector hb=1234\n";
    assert_eq!(&sector[..text.len()], text);
    assert!(sector[text.len()..].iter().all(|&b| b == 0));
    assert_eq!(records::sector_lba(1, 8), 0);
    assert_eq!(records::sector_lba(8, 8), 7);
    assert_eq!(records::sector_lba(9, 8), 0);
    assert_eq!(records::sector_lba(5, 0), 0);
}

#[test]
fn bulk_area_layout() {
    use records::BulkArea;
    // 8 MiB, 4 KiB a round: records in 0..8192, 1024 slots of 8 sectors.
    let a = BulkArea::new(16384, 4096).unwrap();
    assert_eq!(
        a,
        BulkArea {
            first: 8192,
            sectors: 8,
            slots: 1024
        }
    );
    assert_eq!(a.records(), 8192);
    assert_eq!(records::sector_lba(8192, a.records()), 8191);
    assert_eq!(records::sector_lba(8193, a.records()), 0);
    assert_eq!(a.lba(1), 8192);
    assert_eq!(a.lba(2), 8200);
    assert_eq!(a.lba(1024), 16384 - 8);
    assert_eq!(a.lba(1025), 8192);
    // Bytes round up to sectors; an odd capacity gives the bulk area the
    // extra sector; what does not fill a whole slot is left unused.
    assert_eq!(
        BulkArea::new(101, 1).unwrap(),
        BulkArea {
            first: 50,
            sectors: 1,
            slots: 51
        }
    );
    assert_eq!(
        BulkArea::new(100, 513).unwrap(),
        BulkArea {
            first: 50,
            sectors: 2,
            slots: 25
        }
    );
    assert_eq!(
        BulkArea::new(300, 65536).unwrap(),
        BulkArea {
            first: 150,
            sectors: 128,
            slots: 1
        }
    );
    let a = BulkArea::new(1 << 20, 65536).unwrap();
    for r in 1..5000 {
        let lba = a.lba(r);
        assert!(
            lba >= a.records() && lba + a.sectors <= 1 << 20,
            "round {r}"
        );
    }
    // No room, or nothing to write.
    assert_eq!(BulkArea::new(16384, 0), None);
    assert_eq!(BulkArea::new(1, 512), None);
    assert_eq!(BulkArea::new(0, 512), None);
    assert_eq!(BulkArea::new(254, 65536), None);
    assert_eq!(BulkArea::new(255, 65536).unwrap().slots, 1);
}

#[test]
fn bulk_sector_format() {
    let mut sector = [0u8; 512];
    records::bulk_sector(&mut sector, 7, 8193);
    let text = b"ftguest bulk round=7 sector=8193\n";
    assert_eq!(&sector[..text.len()], text);
    for (i, &b) in sector.iter().enumerate().skip(text.len()) {
        assert_eq!(b, ((7 + i) % 256) as u8, "byte {i}");
        assert_eq!(b, records::bulk_byte(7, i));
    }
    // Only the first sector of a longer buffer is written.
    let mut buf = [0xaau8; 1024];
    records::bulk_sector(&mut buf, u64::MAX, u64::MAX);
    let text = b"ftguest bulk round=18446744073709551615 sector=18446744073709551615\n";
    assert_eq!(&buf[..text.len()], text);
    // (2^64 - 1 + 511) mod 256
    assert_eq!(buf[511], 254);
    assert!(buf[512..].iter().all(|&b| b == 0xaa));
}
