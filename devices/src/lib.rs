//! Devices of ftvmm: the legacy PC devices (COM1 16550 serial and the i8042
//! reset controller, both from vm-superio), the virtio-mmio devices
//! (virtio-net over a tap, virtio-blk over a file) and the bus that routes
//! port I/O and MMIO exits to them.
//!
//! Devices receive what they need through constructor arguments (an interrupt
//! trigger, an output sink, a reset event); they never see the VMM. Each device
//! has a plain-data `State` in a `persist.rs` next to it.

pub mod bus;
pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio `Trigger` backed by an `EventFd`: writing the eventfd raises
/// the interrupt line it is registered for as an irqfd, or signals the VMM.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The wrapped eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// A second handle to the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
