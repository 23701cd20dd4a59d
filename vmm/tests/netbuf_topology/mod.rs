//! The network the netbuf tests and the latency benchmark build: two hosts
//! on one L2 segment, as a failover pair would have them, inside one network
//! namespace that is always removed: a bridge (`ftapb…`, the segment, whose
//! own address 10.0.0.1/24 is the outside client), the primary's tap
//! (`ftapp…`) and the standby's tap (`ftaps…`) on it. The VMMs run inside
//! the namespace (`ip netns exec`); sockets are made there by a thread that
//! entered it. Traffic never leaves the namespace.
//!
//! Built on the tests' `common::{host, netns}`: the including crate has a
//! `common` module with those two (`examples/netbuf_latency.rs` includes
//! just them).

#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::path::Path;

pub use crate::common::host::{free_port, wait_until, Proc, TempDir};
pub use crate::common::netns::skip_reason;
use crate::common::netns::{set_rcvbuf_force, Netns};

/// The client's (bridge's) address.
pub const HOST_IP: &str = "10.0.0.1";
/// The guest's address.
pub const GUEST_IP: &str = "10.0.0.2";
/// The guest's MAC.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Where the test guest sends its heartbeat datagrams.
pub const HB_PORT: u16 = 9000;

/// `02:00:00:00:00:01`.
pub fn guest_mac_str() -> String {
    GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The namespace, bridge and taps; the namespace (and all in it) is
/// deleted on drop.
pub struct Segment {
    /// Namespace.
    pub ns: Netns,
    /// Bridge (the client's interface).
    pub br: String,
    /// The primary's tap.
    pub tap_p: String,
    /// The standby's tap.
    pub tap_s: String,
}

impl Segment {
    /// Builds it; `tag` (≤ 3 chars) keeps tests of one process apart.
    pub fn new(tag: &str) -> Result<Segment, String> {
        let id = std::process::id() % 100_000;
        let ns = format!("mcvmm{tag}{id}");
        let br = format!("ftapb{tag}{id}");
        let tap_p = format!("ftapp{tag}{id}");
        let tap_s = format!("ftaps{tag}{id}");
        for n in [&ns, &br, &tap_p, &tap_s] {
            assert!(n.len() <= 15, "{n} is too long for an interface name");
        }
        let mut ns = Netns::new(&ns)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.add_bridge(&br)?;
        // Forward at once (no STP listening delay) and learn from the start.
        ns.ip(&["link", "set", &br, "type", "bridge", "forward_delay", "0"])?;
        for tap in [&tap_p, &tap_s] {
            ns.add_tap(tap, true)?;
            ns.ip(&["link", "set", tap, "master", &br])?;
            ns.ip(&["link", "set", tap, "up"])?;
        }
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &br])?;
        ns.ip(&["link", "set", &br, "up"])?;
        Ok(Segment {
            ns,
            br,
            tap_p,
            tap_s,
        })
    }

    /// A UDP socket bound to `addr` in the namespace, with room for bursts
    /// of released datagrams.
    pub fn udp(&self, addr: &str) -> Result<UdpSocket, String> {
        let s = self.ns.udp(addr)?;
        set_rcvbuf_force(&s, 4 << 20);
        Ok(s)
    }

    /// A raw socket in the namespace: `AF_PACKET` (every frame of every
    /// interface) or `AF_INET`/ICMP.
    pub fn raw(&self, family: libc::c_int, proto: libc::c_int) -> Result<OwnedFd, String> {
        self.ns.raw(family, proto)
    }

    /// Spawns the ftvmm binary `bin` with `args` inside the namespace,
    /// stdout/stderr to `dir/NAME.stdout|stderr`.
    pub fn spawn(&self, bin: &str, name: &'static str, dir: &Path, args: &[String]) -> Proc {
        let mut cmd = self.ns.exec(bin);
        cmd.args(args);
        Proc::spawn(cmd, name, dir)
    }
}

/// The heartbeat number of a datagram payload `ftguest hb=<n>\n`.
pub fn hb_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .strip_prefix("ftguest hb=")?
        .trim_end()
        .parse()
        .ok()
}

/// The arguments of a standby on the segment's standby tap.
pub fn standby_args(seg: &Segment, port: u16, console: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "standby".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--net".into(),
        format!("tap={}", seg.tap_s),
        "--serial".into(),
        format!("file:{}", console.display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The arguments of a test-guest VM on the segment's primary tap, sending
/// heartbeats to the client; protected by `port` when given.
pub fn primary_args(
    seg: &Segment,
    port: Option<u16>,
    console: &Path,
    guest: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--mem-mib".into(),
        "64".into(),
        "--net".into(),
        format!("tap={},mac={}", seg.tap_p, guest_mac_str()),
        "--cmdline".into(),
        format!("ip={GUEST_IP} udp={HOST_IP}:{HB_PORT} {guest}"),
        "--serial".into(),
        format!("file:{}", console.display()),
    ];
    if let Some(p) = port {
        a.push("--ft-peer".into());
        a.push(format!("127.0.0.1:{p}"));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}
