//! The network workload over virtio-net (`virtio_drivers::VirtIONetRaw`):
//! each heartbeat as one UDP datagram to `udp=`, answers to ARP for `ip=`,
//! UDP echo on `echo_port=` and ICMP echo. Polled, never interrupt driven;
//! all state (queues, buffers, ARP entry, pending heartbeats) is in guest
//! memory, so a VM restored from a checkpoint carries on.
//!
//! Nothing here blocks for long: a full TX queue is polled for completions
//! for a bounded time, then the frame is dropped (and counted). Completions
//! are taken in whatever order the device reports them.

use virtio_drivers::device::net::VirtIONetRaw;

use crate::arch::io::{pause, rdtsc};
use crate::cmdline::Config;
use crate::netproto::{self, ArpOp, Frame, Ipv4, Mac, UdpAddrs};
use crate::records;
use crate::serial::Line;
use crate::virtio::{alloc_pages, GuestHal, Mmio};

/// Descriptors per queue; one buffer per descriptor, so also buffers per queue.
const QUEUE: usize = 16;
/// Bytes per packet buffer (virtio_net_hdr + a 1514-byte frame fits).
const BUF: usize = 2048;
/// Heartbeats waiting for the destination's MAC (beyond: the oldest is dropped).
const PENDING: usize = 64;
/// ARP request retry period while heartbeats wait for the destination's MAC.
const ARP_RETRY_MS: u64 = 20;
/// How long a send waits for a free TX buffer before dropping the frame.
const TX_WAIT_MS: u64 = 2;

const FREE: u16 = u16::MAX;

pub struct Net {
    dev: VirtIONetRaw<GuestHal, Mmio, QUEUE>,
    mac: Mac,
    ip: Option<Ipv4>,
    dst: Option<(Ipv4, u16)>,
    dst_mac: Option<Mac>,
    src_port: u16,
    echo_port: u16,
    rx_bufs: *mut u8,
    tx_bufs: *mut u8,
    /// RX buffer posted under each descriptor token.
    rx_slot: [u16; QUEUE],
    /// TX buffer in flight under each descriptor token (FREE: none).
    tx_slot: [u16; QUEUE],
    /// Length handed to the device for each TX buffer (0: free).
    tx_len: [u16; QUEUE],
    /// Heartbeat numbers not sent yet (waiting for ARP), oldest first.
    pending: [u64; PENDING],
    pending_head: usize,
    pending_len: usize,
    last_arp_tsc: u64,
    arp_retry_cycles: u64,
    tx_wait_cycles: u64,
    ip_id: u16,
    pub tx_dropped: u64,
    pub hb_dropped: u64,
}

impl Net {
    /// Sets up the device and posts every RX buffer; prints why not on failure.
    pub fn new(t: Mmio, cfg: &Config, tsc_khz: u64) -> Option<Net> {
        let dev = match VirtIONetRaw::<GuestHal, Mmio, QUEUE>::new(t) {
            Ok(d) => d,
            Err(e) => {
                fail("net", e);
                return None;
            }
        };
        let pages = QUEUE * BUF / 4096;
        let (Some(rx), Some(tx)) = (alloc_pages(pages), alloc_pages(pages)) else {
            fail("net", "DMA pool exhausted");
            return None;
        };
        let mut net = Net {
            mac: dev.mac_address(),
            dev,
            ip: cfg.ip,
            dst: cfg.udp,
            dst_mac: cfg.gw_mac,
            src_port: cfg.udp_src,
            echo_port: cfg.echo_port,
            rx_bufs: rx.as_ptr(),
            tx_bufs: tx.as_ptr(),
            rx_slot: [FREE; QUEUE],
            tx_slot: [FREE; QUEUE],
            tx_len: [0; QUEUE],
            pending: [0; PENDING],
            pending_head: 0,
            pending_len: 0,
            last_arp_tsc: 0,
            arp_retry_cycles: ARP_RETRY_MS * tsc_khz,
            tx_wait_cycles: TX_WAIT_MS * tsc_khz,
            ip_id: 0,
            tx_dropped: 0,
            hb_dropped: 0,
        };
        net.dev.disable_interrupts();
        for slot in 0..QUEUE {
            // SAFETY: each RX buffer is posted once and not touched until the
            // device hands it back (poll_rx).
            match unsafe { net.dev.receive_begin(net.rx_buf(slot)) } {
                Ok(token) => net.rx_slot[usize::from(token) % QUEUE] = slot as u16,
                Err(e) => {
                    fail("net rx", e);
                    return None;
                }
            }
        }
        Some(net)
    }

    /// `ftguest net mac=<mac> ip=<ip>` (ip=none without `ip=`).
    pub fn print(&self) {
        let mut line = Line::new();
        line.push_str("ftguest net mac=");
        for (i, b) in self.mac.iter().enumerate() {
            if i > 0 {
                line.push_str(":");
            }
            line.push_bytes(&[hex(b >> 4), hex(b & 0xf)]);
        }
        line.push_str(" ip=");
        match self.ip {
            Some(ip) => push_ip(&mut line, &ip),
            None => line.push_str("none"),
        }
        line.push_str("\n");
        line.emit();
    }

    fn rx_buf(&self, slot: usize) -> &'static mut [u8] {
        // SAFETY: slot < QUEUE; the RX area is QUEUE * BUF bytes of the DMA
        // pool owned by this device alone; callers use one slot at a time.
        unsafe { core::slice::from_raw_parts_mut(self.rx_bufs.add(slot * BUF), BUF) }
    }

    fn tx_buf(&self, slot: usize) -> &'static mut [u8] {
        // SAFETY: as rx_buf, for the TX area.
        unsafe { core::slice::from_raw_parts_mut(self.tx_bufs.add(slot * BUF), BUF) }
    }

    /// Starts resolving the destination's MAC at once (before the first
    /// heartbeat needs it).
    pub fn start(&mut self) {
        if self.dst.is_some() && self.dst_mac.is_none() {
            self.send_arp_request(rdtsc());
        }
    }

    /// Queues heartbeat `n`'s datagram (sent at once when the destination's
    /// MAC is known).
    pub fn heartbeat(&mut self, n: u64) {
        if self.dst.is_none() || self.ip.is_none() {
            return;
        }
        if self.pending_len == PENDING {
            self.pending_head = (self.pending_head + 1) % PENDING;
            self.pending_len -= 1;
            self.hb_dropped += 1;
        }
        self.pending[(self.pending_head + self.pending_len) % PENDING] = n;
        self.pending_len += 1;
        self.poll();
    }

    /// Receives and answers what arrived, reclaims sent buffers, sends
    /// pending heartbeats or retries ARP. Cheap when idle: a few loads from
    /// the used rings, no VM exit.
    pub fn poll(&mut self) {
        self.poll_rx();
        self.reclaim_tx();
        if self.pending_len > 0 {
            self.flush_pending();
        }
    }

    /// True when no heartbeat waits and every TX buffer came back.
    pub fn idle(&mut self) -> bool {
        self.reclaim_tx();
        self.pending_len == 0 && self.tx_len.iter().all(|&l| l == 0)
    }

    fn flush_pending(&mut self) {
        let (Some((dst_ip, dst_port)), Some(src_ip)) = (self.dst, self.ip) else {
            return;
        };
        let Some(dst_mac) = self.dst_mac else {
            let now = rdtsc();
            if now.wrapping_sub(self.last_arp_tsc) >= self.arp_retry_cycles {
                self.send_arp_request(now);
            }
            return;
        };
        let addrs = UdpAddrs {
            src_mac: self.mac,
            dst_mac,
            src_ip,
            dst_ip,
            src_port: self.src_port,
            dst_port,
        };
        while self.pending_len > 0 {
            let n = self.pending[self.pending_head];
            let mut payload = [0u8; 32];
            let len = records::heartbeat_payload(&mut payload, n);
            let id = self.next_id();
            let sent = self.send(|buf| netproto::build_udp(buf, &addrs, id, &payload[..len]));
            if !sent {
                // Kept for the next poll; order is preserved.
                return;
            }
            self.pending_head = (self.pending_head + 1) % PENDING;
            self.pending_len -= 1;
        }
    }

    fn next_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    fn send_arp_request(&mut self, now: u64) {
        let (Some((dst_ip, _)), Some(ip)) = (self.dst, self.ip) else {
            return;
        };
        self.last_arp_tsc = now;
        let mac = self.mac;
        self.send(|buf| {
            Some(netproto::build_arp(
                buf,
                ArpOp::Request,
                &mac,
                &ip,
                &[0; 6],
                &dst_ip,
            ))
        });
    }

    fn poll_rx(&mut self) {
        while let Some(token) = self.dev.poll_receive() {
            let slot = usize::from(self.rx_slot[usize::from(token) % QUEUE]);
            let buf = self.rx_buf(slot);
            // SAFETY: `buf` is the buffer posted under `token`.
            let got = unsafe { self.dev.receive_complete(token, buf) };
            if let Ok((hdr, len)) = got {
                if let Some(frame) = buf.get(hdr..hdr + len) {
                    self.handle(frame);
                }
            }
            // SAFETY: as in `new`.
            match unsafe { self.dev.receive_begin(self.rx_buf(slot)) } {
                Ok(token) => self.rx_slot[usize::from(token) % QUEUE] = slot as u16,
                Err(e) => fail("net rx", e),
            }
        }
    }

    fn handle(&mut self, frame: &[u8]) {
        let Some(my_ip) = self.ip else {
            return;
        };
        let mac = self.mac;
        match netproto::parse(frame) {
            Frame::Arp {
                op,
                sender_mac,
                sender_ip,
                target_ip,
            } => {
                if let Some((dst_ip, _)) = self.dst {
                    if sender_ip == dst_ip && self.dst_mac.is_none() {
                        self.dst_mac = Some(sender_mac);
                    }
                }
                if op == ArpOp::Request && target_ip == my_ip {
                    self.send(|buf| {
                        Some(netproto::build_arp(
                            buf,
                            ArpOp::Reply,
                            &mac,
                            &my_ip,
                            &sender_mac,
                            &sender_ip,
                        ))
                    });
                }
            }
            Frame::Udp {
                src_mac,
                src_ip,
                dst_ip,
                src_port,
                dst_port,
                payload,
            } if dst_ip == my_ip && self.echo_port != 0 && dst_port == self.echo_port => {
                let addrs = UdpAddrs {
                    src_mac: mac,
                    dst_mac: src_mac,
                    src_ip: my_ip,
                    dst_ip: src_ip,
                    src_port: dst_port,
                    dst_port: src_port,
                };
                let id = self.next_id();
                self.send(|buf| netproto::build_udp(buf, &addrs, id, payload));
            }
            Frame::Ping {
                src_mac,
                src_ip,
                dst_ip,
                message,
            } if dst_ip == my_ip => {
                let id = self.next_id();
                self.send(|buf| {
                    netproto::build_pong(buf, &mac, &src_mac, &my_ip, &src_ip, id, message)
                });
            }
            _ => {}
        }
    }

    /// Takes back every TX buffer the device has finished with, in the
    /// device's order.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.dev.poll_transmit() {
            let t = usize::from(token) % QUEUE;
            let slot = self.tx_slot[t];
            if slot == FREE {
                // Not ours (cannot happen); stop rather than spin.
                return;
            }
            let slot = usize::from(slot);
            let len = usize::from(self.tx_len[slot]);
            // SAFETY: the buffer and length handed over with `token`.
            let _ = unsafe { self.dev.transmit_complete(token, &self.tx_buf(slot)[..len]) };
            self.tx_slot[t] = FREE;
            self.tx_len[slot] = 0;
        }
    }

    /// Builds a frame with `build` into a free TX buffer (after the virtio
    /// header) and hands it to the device. False when no buffer freed up in
    /// time, or `build` declined.
    fn send(&mut self, build: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        self.reclaim_tx();
        let mut slot = self.tx_len.iter().position(|&l| l == 0);
        if slot.is_none() {
            let start = rdtsc();
            while slot.is_none() && rdtsc().wrapping_sub(start) < self.tx_wait_cycles {
                pause();
                self.reclaim_tx();
                slot = self.tx_len.iter().position(|&l| l == 0);
            }
        }
        let Some(slot) = slot else {
            self.tx_dropped += 1;
            return false;
        };
        let buf = self.tx_buf(slot);
        let Ok(hdr) = self.dev.fill_buffer_header(buf) else {
            return false;
        };
        let Some(len) = build(&mut buf[hdr..]) else {
            return false;
        };
        let total = hdr + len;
        // SAFETY: the buffer is not touched until reclaim_tx takes it back.
        match unsafe { self.dev.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                self.tx_slot[usize::from(token) % QUEUE] = slot as u16;
                self.tx_len[slot] = total as u16;
                true
            }
            Err(_) => {
                self.tx_dropped += 1;
                false
            }
        }
    }
}

fn hex(d: u8) -> u8 {
    if d < 10 {
        b'0' + d
    } else {
        b'a' + d - 10
    }
}

pub fn push_ip(line: &mut Line, ip: &Ipv4) {
    for (i, b) in ip.iter().enumerate() {
        if i > 0 {
            line.push_str(".");
        }
        line.push_u64(u64::from(*b));
    }
}

/// `ftguest warning: <what>: <why>`.
pub fn fail(what: &str, why: impl core::fmt::Display) {
    let mut line = Line::new();
    line.push_str("ftguest warning: ");
    line.push_str(what);
    let _ = core::fmt::Write::write_fmt(&mut line, format_args!(": {why}\n"));
    line.emit();
}
