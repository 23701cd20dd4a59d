//! The devices of a VM: COM1 and the i8042 on the port I/O bus, and the
//! virtio devices, created from the configuration, placed on the MMIO bus at
//! their fixed addresses, wired to KVM (an ioeventfd per queue, an irqfd per
//! device), declared on the guest's kernel command line, quiesced for
//! checkpoints, and saved and restored ([`persist`]).
//!
//! Placement (the contract in `ftvmm_devices::virtio`): device `i`, counting
//! all `--net` devices and then all `--disk` devices, has its registers at
//! `VIRTIO_MMIO_START + i * 0x1000` and interrupt line `IRQS[i]`.

pub mod persist;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ftvmm_devices::bus::{Bus, BusError};
use ftvmm_devices::legacy::{
    SerialConsole, SerialOutput, COM1_BASE, COM1_IRQ, COM1_LEN, I8042, I8042_BASE, I8042_LEN,
};
use ftvmm_devices::virtio::block::{Block, BlockError, Disk};
use ftvmm_devices::virtio::mmio::{regs, VirtioDevice, VirtioMmioDevice};
use ftvmm_devices::virtio::net::{default_mac, FrameSink, Net, Tap, TapError};
use ftvmm_devices::virtio::{cmdline_entry, Quiesce, QuiesceError, IRQS, MAX_DEVICES, MMIO_WINDOW};
use ftvmm_devices::EventFdTrigger;

use crate::arch::x86_64::layout::VIRTIO_MMIO_START;
use crate::config::VmConfig;
use crate::memory::GuestMemory;

/// Errors creating, wiring or quiescing the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// More devices than addresses and interrupt lines.
    #[error(
        "{count} virtio devices (--net and --disk together) are too many: at most {MAX_DEVICES}"
    )]
    TooMany {
        /// Devices asked for.
        count: usize,
    },
    /// A tap cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A disk cannot be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// An eventfd or worker thread cannot be created.
    #[error("cannot create {what} for {device}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Which device.
        device: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// KVM refused an ioeventfd or irqfd.
    #[error("{what} for {device} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Which device.
        device: String,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The bus window is taken.
    #[error("cannot place {device}: {source}")]
    Bus {
        /// Which device.
        device: String,
        /// The bus's error.
        source: BusError,
    },
    /// A device did not quiesce.
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
}

/// Where device `index` lives: (MMIO base, interrupt line).
pub fn placement(index: usize) -> Option<(u64, u32)> {
    IRQS.get(index)
        .map(|&irq| (VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW, irq))
}

/// The VM's devices.
#[derive(Debug)]
pub struct DeviceManager {
    serial: Arc<Mutex<SerialConsole>>,
    net: Vec<VirtioMmioDevice<Net>>,
    blk: Vec<VirtioMmioDevice<Block>>,
    cmdline: String,
}

fn wire<D: VirtioDevice>(
    dev: D,
    index: usize,
    vm: &VmFd,
    mem: &GuestMemory,
    mmio: &mut Bus,
    cmdline: &mut String,
) -> Result<VirtioMmioDevice<D>, DeviceManagerError> {
    let name = dev.name();
    let (addr, irq) = placement(index).ok_or(DeviceManagerError::TooMany { count: index + 1 })?;
    let host = |what| {
        let device = name.clone();
        move |source| DeviceManagerError::Host {
            what,
            device,
            source,
        }
    };
    let kvm = |what| {
        let device = name.clone();
        move |source| DeviceManagerError::Kvm {
            what,
            device,
            source,
        }
    };
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(host("irqfd"))?;
    vm.register_irqfd(&irq_evt, irq).map_err(kvm("KVM_IRQFD"))?;
    // The worker installs its seccomp filter before it serves the guest.
    let start = crate::seccomp::worker_start(crate::seccomp::ThreadKind::Device);
    let device = VirtioMmioDevice::with_worker_start(dev, mem.clone(), irq_evt, Some(start))
        .map_err(host("queue eventfds and worker"))?;
    for (q, evt) in device.queue_evts().iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(addr + regs::QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(kvm("KVM_IOEVENTFD"))?;
    }
    mmio.insert(device.transport(), addr, MMIO_WINDOW)
        .map_err(|source| DeviceManagerError::Bus {
            device: name.clone(),
            source,
        })?;
    cmdline.push(' ');
    cmdline.push_str(&cmdline_entry(addr, irq));
    log::info!("{name} at {addr:#x}, irq {irq}");
    Ok(device)
}

/// The legacy devices: COM1, its interrupt an irqfd, writing to
/// `serial_out`, and the i8042, signalling `reset_evt` when the guest resets;
/// placed on `pio`.
fn legacy(
    vm: &VmFd,
    serial_out: SerialOutput,
    reset_evt: &EventFd,
    pio: &mut Bus,
) -> Result<Arc<Mutex<SerialConsole>>, DeviceManagerError> {
    let host = |what, device: &str| {
        let device = device.to_string();
        move |source| DeviceManagerError::Host {
            what,
            device,
            source,
        }
    };
    let place = |device: &str| {
        let device = device.to_string();
        move |source| DeviceManagerError::Bus { device, source }
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host("irqfd", "COM1"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|source| DeviceManagerError::Kvm {
            what: "KVM_IRQFD",
            device: "COM1".to_string(),
            source,
        })?;
    let serial = Arc::new(Mutex::new(
        SerialConsole::new(EventFdTrigger::new(serial_irq), serial_out)
            .map_err(host("irqfd", "COM1"))?,
    ));
    let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(
        reset_evt
            .try_clone()
            .map_err(host("reset eventfd", "i8042"))?,
    ))));
    pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
        .map_err(place("COM1"))?;
    pio.insert(i8042, I8042_BASE, I8042_LEN)
        .map_err(place("i8042"))?;
    Ok(serial)
}

impl DeviceManager {
    /// Creates COM1 (writing to `serial_out`) and the i8042 (signalling
    /// `reset_evt`) on `pio`; opens every virtio device's host resource
    /// (taps, disk files), creates the devices and places them on `mmio`; all
    /// wired to `vm`.
    pub fn new(
        config: &VmConfig,
        vm: &VmFd,
        mem: &GuestMemory,
        serial_out: SerialOutput,
        reset_evt: &EventFd,
        (pio, mmio): (&mut Bus, &mut Bus),
    ) -> Result<Self, DeviceManagerError> {
        let count = config.net.len() + config.disks.len();
        if count > MAX_DEVICES {
            return Err(DeviceManagerError::TooMany { count });
        }
        let mut dm = DeviceManager {
            serial: legacy(vm, serial_out, reset_evt, pio)?,
            net: Vec::new(),
            blk: Vec::new(),
            cmdline: String::new(),
        };
        let host = |what, device: &str| {
            let device = device.to_string();
            move |source| DeviceManagerError::Host {
                what,
                device,
                source,
            }
        };
        for n in &config.net {
            let tap = Tap::open(&n.tap)?;
            let mac = n.mac.map(|m| m.0).unwrap_or_else(|| default_mac(&n.tap));
            let net = Net::new(tap, mac, None).map_err(host("tap handle", &n.tap))?;
            let index = dm.net.len();
            dm.net
                .push(wire(net, index, vm, mem, mmio, &mut dm.cmdline)?);
        }
        for d in &config.disks {
            let disk = Disk::open(&d.path, d.readonly)?;
            let index = dm.net.len() + dm.blk.len();
            dm.blk.push(wire(
                Block::new(disk),
                index,
                vm,
                mem,
                mmio,
                &mut dm.cmdline,
            )?);
        }
        Ok(dm)
    }

    /// `base` with the devices' `virtio_mmio.device=` declarations
    /// appended, in device order.
    pub fn kernel_cmdline(&self, base: &str) -> String {
        format!("{}{}", base.trim_end(), self.cmdline)
    }

    /// The NICs, in `--net` order.
    pub fn net(&self) -> &[VirtioMmioDevice<Net>] {
        &self.net
    }

    /// The disks, in `--disk` order.
    pub fn blk(&self) -> &[VirtioMmioDevice<Block>] {
        &self.blk
    }

    /// Replaces NIC `index`'s transmit sink (output commit); the sink may
    /// write to a clone of the NIC's tap ([`DeviceManager::net_tap`]).
    pub fn set_net_sink(&self, index: usize, sink: Box<dyn FrameSink>) -> bool {
        match self.net.get(index) {
            Some(n) => {
                n.with_device(|d| d.set_sink(sink));
                true
            }
            None => false,
        }
    }

    /// A second handle on NIC `index`'s tap.
    pub fn net_tap(&self, index: usize) -> Option<std::io::Result<Tap>> {
        self.net
            .get(index)
            .map(|n| n.with_device(|d| d.tap().try_clone()))
    }

    fn all(&self) -> impl Iterator<Item = &dyn Quiesce> {
        self.net
            .iter()
            .map(|d| d as &dyn Quiesce)
            .chain(self.blk.iter().map(|d| d as &dyn Quiesce))
    }

    /// Stops every device at a request boundary, within `timeout` in all.
    /// On error, the devices that did pause stay paused; call
    /// [`DeviceManager::resume_devices`] to go on.
    pub fn pause_devices(&self, timeout: Duration) -> Result<(), DeviceManagerError> {
        let deadline = Instant::now() + timeout;
        for d in self.all() {
            d.pause(deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    /// Lets every device go on.
    pub fn resume_devices(&self) {
        for d in self.all() {
            d.resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_the_contract() {
        assert_eq!(placement(0), Some((0xd000_0000, 5)));
        assert_eq!(placement(1), Some((0xd000_1000, 6)));
        assert_eq!(placement(8), Some((0xd000_8000, 15)));
        assert_eq!(placement(9), None);
        assert_eq!(
            cmdline_entry(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
