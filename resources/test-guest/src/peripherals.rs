//! The virtio devices the workload drives, found and set up from the command
//! line (`virtio_mmio.device=`, `net=`, `disk=`): what the workload polls
//! between rounds and feeds each heartbeat.

use crate::arch::io::{pause, rdtsc};
use crate::cmdline::{Config, Switch};
use crate::disk::Disk;
use crate::net::{fail, Net};
use crate::virtio;

/// How long power-off waits for the last datagrams to leave.
const DRAIN_MS: u64 = 1000;

pub struct Peripherals {
    pub net: Option<Net>,
    pub disk: Option<Disk>,
    tsc_khz: u64,
}

impl Peripherals {
    /// Probes and sets up the devices, printing one line per device (and a
    /// warning for one asked for with `net=on`/`disk=on` but not there).
    pub fn new(cfg: &Config, tsc_khz: u64) -> Peripherals {
        let found = virtio::probe(cfg);
        let mut net = None;
        match (cfg.net, found.net) {
            (Switch::Off, _) => {}
            (_, Some(t)) => {
                net = Net::new(t, cfg, tsc_khz);
                if let Some(n) = &net {
                    n.print();
                }
            }
            (Switch::On, None) => fail("net=on", "no virtio-net device"),
            (Switch::Auto, None) => {}
        }
        let mut disk = None;
        match (cfg.disk, found.blk) {
            (Switch::Off, _) => {}
            (_, Some(t)) => {
                disk = Disk::new(t, cfg, tsc_khz);
                if let Some(d) = &disk {
                    d.print();
                }
            }
            (Switch::On, None) => fail("disk=on", "no virtio-blk device"),
            (Switch::Auto, None) => {}
        }
        Peripherals { net, disk, tsc_khz }
    }

    /// Called once, right after `ftguest ready`.
    pub fn start(&mut self) {
        if let Some(net) = &mut self.net {
            net.start();
        }
    }

    /// Cheap when there is nothing to do (no VM exit).
    pub fn poll(&mut self) {
        if let Some(net) = &mut self.net {
            net.poll();
        }
    }

    /// Round `r`'s disk traffic (the bulk write of `disk_bytes=`).
    pub fn round(&mut self, r: u64) {
        if let Some(disk) = &mut self.disk {
            disk.round(r, self.net.as_mut());
        }
    }

    /// Heartbeat `n` as a datagram and a sector.
    pub fn heartbeat(&mut self, n: u64) {
        if let Some(net) = &mut self.net {
            net.heartbeat(n);
        }
        if let Some(disk) = &mut self.disk {
            disk.heartbeat(n, self.net.as_mut());
        }
    }

    /// Before power-off: lets queued datagrams leave (bounded wait).
    pub fn drain(&mut self) {
        let Some(net) = &mut self.net else {
            return;
        };
        let start = rdtsc();
        let limit = DRAIN_MS * self.tsc_khz;
        while rdtsc().wrapping_sub(start) < limit {
            net.poll();
            if net.idle() {
                return;
            }
            pause();
        }
        fail("net", "datagrams still queued at power-off");
    }
}
