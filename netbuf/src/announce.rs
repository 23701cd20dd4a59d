//! The takeover announce: after a failover the standby tells the network
//! that the guest's MACs now live behind its taps, as QEMU's self-announce
//! does: a RARP per MAC (switches learn the port from its source address),
//! and a gratuitous ARP per MAC and IPv4 address (neighbours refresh their
//! caches), a few rounds with growing gaps.
//!
//! The VMM does not configure the guest's addresses, so the standby learns
//! them from the guest's own traffic after the takeover: [`LearningSink`]
//! wraps a NIC's transmit sink and notes the sender address of the ARP and
//! IPv4 frames the guest sends from its MAC. RARP needs no address and goes
//! out from the first round; each round sends a gratuitous ARP for every
//! address learnt so far.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvmm_devices::virtio::net::FrameSink;

use crate::held::Wire;

/// Gaps before each announce round after the first (QEMU: 50 ms, then 100
/// more each round). The last rounds are for addresses learnt late.
pub const ROUNDS: [Duration; 7] = [
    Duration::from_millis(0),
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(250),
    Duration::from_millis(350),
    Duration::from_millis(450),
    Duration::from_millis(1000),
];

/// Ethertypes.
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_RARP: u16 = 0x8035;
/// Minimum Ethernet frame without FCS.
const MIN_FRAME: usize = 60;
/// Most addresses remembered per NIC.
const MAX_ADDRS: usize = 4;

fn arp_frame(
    ethertype: u16,
    op: u16,
    mac: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> [u8; MIN_FRAME] {
    let mut f = [0u8; MIN_FRAME];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype: Ethernet
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes()); // ptype: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&spa.octets());
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa.octets());
    f
}

/// A RARP "reverse request" from `mac` (what QEMU's announce sends).
pub fn rarp(mac: [u8; 6]) -> [u8; MIN_FRAME] {
    arp_frame(
        ETH_P_RARP,
        3,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    )
}

/// A gratuitous ARP request: `mac` announces `ip` (sender and target
/// address both `ip`), broadcast.
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; MIN_FRAME] {
    arp_frame(ETH_P_ARP, 1, mac, ip, [0; 6], ip)
}

/// If `frame` is from `mac` and names its IPv4 sender (ARP sender address
/// or IPv4 source), that address.
pub fn sender_ipv4(mac: [u8; 6], frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < 14 || frame[6..12] != mac {
        return None;
    }
    let ip = match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_ARP if frame.len() >= 42 && frame[16..18] == ETH_P_IP.to_be_bytes() => {
            Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31])
        }
        ETH_P_IP if frame.len() >= 34 && frame[14] >> 4 == 4 => {
            Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29])
        }
        _ => return None,
    };
    (!ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()).then_some(ip)
}

/// The addresses learnt for one NIC.
#[derive(Debug, Clone, Default)]
pub struct Learnt(Arc<Mutex<Vec<Ipv4Addr>>>);

impl Learnt {
    fn note(&self, ip: Ipv4Addr) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !v.contains(&ip) && v.len() < MAX_ADDRS {
            v.push(ip);
        }
    }

    /// The addresses so far.
    pub fn addrs(&self) -> Vec<Ipv4Addr> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A transmit sink that writes to the tap at once (like the device's own)
/// and learns the guest's IPv4 addresses on the way.
pub struct LearningSink {
    wire: Box<dyn Wire>,
    mac: [u8; 6],
    learnt: Learnt,
}

impl LearningSink {
    /// Writes to `wire`, learning the addresses `mac` sends from.
    pub fn new(wire: Box<dyn Wire>, mac: [u8; 6]) -> (Self, Learnt) {
        let learnt = Learnt::default();
        (
            LearningSink {
                wire,
                mac,
                learnt: learnt.clone(),
            },
            learnt,
        )
    }
}

impl FrameSink for LearningSink {
    fn send(&mut self, frame: &[u8]) {
        if let Some(ip) = sender_ipv4(self.mac, frame) {
            self.learnt.note(ip);
        }
        if let Err(e) = self.wire.write_frame(frame) {
            log::debug!("frame of {} bytes dropped: {e}", frame.len());
        }
    }
}

/// One NIC to announce: where to write, its MAC, what was learnt.
pub struct AnnounceNic {
    /// The NIC's tap on this host.
    pub wire: Box<dyn Wire>,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// Its addresses, as learnt.
    pub learnt: Learnt,
}

/// Sends the announce rounds of [`ROUNDS`] on every NIC, on a thread of its
/// own (the guest is already running). Returns at once.
pub fn spawn_announcer(mut nics: Vec<AnnounceNic>) {
    let start = Instant::now();
    let r = std::thread::Builder::new()
        .name("ft-announce".into())
        .spawn(move || {
            let mut at = Duration::ZERO;
            for (round, gap) in ROUNDS.iter().enumerate() {
                at += *gap;
                std::thread::sleep(at.saturating_sub(start.elapsed()));
                for n in &mut nics {
                    let mut sent = 0;
                    if n.wire.write_frame(&rarp(n.mac)).is_ok() {
                        sent += 1;
                    }
                    for ip in n.learnt.addrs() {
                        if n.wire.write_frame(&garp(n.mac, ip)).is_ok() {
                            sent += 1;
                        }
                    }
                    log::info!(
                        "announce round {round}: {sent} frames for {}",
                        mac_str(n.mac)
                    );
                }
            }
        });
    if let Err(e) = r {
        log::warn!("cannot start the takeover announce: {e}");
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    #[test]
    fn rarp_layout() {
        let f = rarp(MAC);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[32..38], &MAC);
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn garp_layout_and_learning() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let f = garp(MAC, ip);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        assert_eq!(sender_ipv4(MAC, &f), Some(ip));
        assert_eq!(sender_ipv4([2, 0, 0, 0, 0, 9], &f), None, "another MAC");
        assert_eq!(sender_ipv4(MAC, &rarp(MAC)), None);
        // An IPv4 frame: source address at 26.
        let mut p = [0u8; 34];
        p[6..12].copy_from_slice(&MAC);
        p[12..14].copy_from_slice(&[8, 0]);
        p[14] = 0x45;
        p[26..30].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(sender_ipv4(MAC, &p), Some(Ipv4Addr::new(10, 0, 0, 7)));
        p[26..30].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(sender_ipv4(MAC, &p), None);
    }

    #[test]
    fn learning_sink_passes_frames_and_learns() {
        #[derive(Clone, Default)]
        struct Rec(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Wire for Rec {
            fn write_frame(&mut self, f: &[u8]) -> std::io::Result<()> {
                self.0.lock().unwrap().push(f.to_vec());
                Ok(())
            }
        }
        let rec = Rec::default();
        let (mut s, learnt) = LearningSink::new(Box::new(rec.clone()), MAC);
        s.send(&garp(MAC, Ipv4Addr::new(10, 0, 0, 2)));
        s.send(&garp(MAC, Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(learnt.addrs(), vec![Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
    }
}
