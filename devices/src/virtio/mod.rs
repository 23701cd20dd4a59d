//! virtio-mmio devices: the transport ([`mmio`]), virtio-net over a tap
//! ([`net`]) and virtio-blk over a file ([`block`]).
//!
//! # The device contract (what guests rely on)
//!
//! Guests (the tiny Linux guest, the bare-metal test guest) find the devices
//! on their kernel command line; nothing else describes them.
//!
//! * **Transport**: virtio-mmio, *modern* register layout (`Version` = 2,
//!   virtio 1.x): the driver must accept `VIRTIO_F_VERSION_1` (feature bit
//!   32), otherwise `FEATURES_OK` does not stick. Split virtqueues, no
//!   `EVENT_IDX`, no indirect descriptors, no packed rings. `VendorID` is
//!   [`VENDOR_ID`].
//! * **Order and placement**: the devices are numbered in the order
//!   *all `--net` options, then all `--disk` options*, each in the order
//!   given. Device `i` has its 4 KiB register window at guest physical
//!   `0xd000_0000 + i * 0x1000` (in the 32-bit MMIO gap) and raises its
//!   interrupt on GSI/ISA IRQ `IRQS[i]`, i.e. 5, 6, 7, 9, 10, 11, 12, 14, 15.
//!   At most [`MAX_DEVICES`] (9) devices; more is a configuration error.
//! * **Command line**: the VMM appends, for each device in order,
//!   ` virtio_mmio.device=4K@0x<addr>:<irq>` (lower-case hex address, decimal
//!   IRQ) to the guest's kernel command line, e.g. with one NIC and one disk:
//!   `virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6`.
//!   This is Linux's `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` syntax; the test
//!   guest parses exactly the same.
//! * **Interrupts**: edge-triggered (an irqfd pulse). `InterruptStatus` bit 0
//!   (used buffer) is set before every pulse; the driver acknowledges it
//!   through `InterruptACK`. Drivers that poll the used ring need not use
//!   interrupts at all.
//! * **Notifications**: `QueueNotify` takes the queue index as a 32-bit
//!   write (the VMM registers a KVM ioeventfd per queue with that datamatch;
//!   other writes still work, through the slower MMIO exit).
//!
//! ## virtio-net (device ID 1)
//! * Queues: 0 = receive, 1 = transmit; each at most [`QUEUE_MAX_SIZE`]
//!   entries. No control queue, no multiqueue.
//! * Features: `VERSION_1`, `MAC` (bit 5), `STATUS` (bit 16; link always up).
//!   No checksum/TSO offloads, no `MRG_RXBUF`.
//! * Config space: `mac[6]` at offset 0, `status: u16` at 6 (1 = link up).
//!   The MAC is `--net tap=NAME,mac=MAC`, or by default `02:` followed by five
//!   bytes of a hash of the tap name (locally administered, unicast,
//!   deterministic).
//! * Every buffer starts with the 12-byte virtio 1.x `virtio_net_hdr`
//!   (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
//!   num_buffers). On transmit it is ignored (write zeros). On receive the
//!   device writes zeros except `num_buffers = 1`. A received frame goes into
//!   one descriptor chain (one or more writable descriptors); a chain must
//!   hold 12 + 1514 bytes for a full-size frame, smaller chains get only
//!   the frames that fit (bigger ones are dropped).
//! * One frame per transmit chain: the header then the Ethernet frame
//!   (no FCS), in any number of readable descriptors.
//!
//! ## virtio-blk (device ID 2)
//! * One request queue (0), at most [`QUEUE_MAX_SIZE`] entries.
//! * Features: `VERSION_1`, `SEG_MAX` (bit 2), `FLUSH` (bit 9), and `RO`
//!   (bit 5) for `--disk ...,readonly`.
//! * Config space: `capacity: u64` (512-byte sectors: the file size rounded
//!   down) at offset 0, `seg_max: u32` at 12.
//! * Requests: `IN` (0), `OUT` (1), `FLUSH` (4), `GET_ID` (8; 20 bytes, the
//!   disk file's name, NUL-padded). Status byte: 0 OK, 1 IOERR (out-of-range
//!   sectors, a write to a readonly disk, a host I/O error, a malformed
//!   chain), 2 UNSUPP (other request types). Layout: a 16-byte readable
//!   header `{type: u32, reserved: u32, sector: u64}`, the data descriptors,
//!   and a final writable descriptor whose first byte receives the status.
//!
//! # The host side
//! Devices run their queues on a worker thread each, woken by the queues'
//! eventfds (ioeventfds) and, for net, the tap; they raise interrupts by
//! writing an eventfd (an irqfd). Every write into guest memory goes through
//! vm-memory on the dirty-tracked memory, so the checkpoint sees
//! it (DESIGN I3). For a checkpoint, [`Quiesce::pause`] stops a device at a
//! request boundary; [`Quiesce::resume`] lets it go on, and notifications
//! that came in between are served then.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(test)]
pub(crate) mod test_utils;

use std::time::Duration;

/// Guest memory as devices see it (the VMM's own type): every write through
/// vm-memory marks the written pages in its dirty bitmap (the checkpoint
/// crate's `PageBitmap`, a vm-memory `Bitmap` like `AtomicBitmap`).
pub type GuestMemory = vm_memory::GuestMemoryMmap<ftvmm_checkpoint::dirty::PageBitmap>;

/// The interrupt lines of virtio devices, in device order.
pub const IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];
/// Most virtio devices one VM can have.
pub const MAX_DEVICES: usize = IRQS.len();
/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Largest queue a device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// `VendorID` register value ("FTVM", little-endian).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");

/// Device IDs.
pub const TYPE_NET: u32 = 1;
/// Device IDs.
pub const TYPE_BLOCK: u32 = 2;

/// Feature bits shared by all devices.
pub mod features {
    /// virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
    /// net: the device has a MAC in its config space.
    pub const NET_MAC: u64 = 1 << 5;
    /// net: link status in config space.
    pub const NET_STATUS: u64 = 1 << 16;
    /// blk: maximum segments in config space.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// blk: read-only disk.
    pub const BLK_RO: u64 = 1 << 5;
    /// blk: flush supported.
    pub const BLK_FLUSH: u64 = 1 << 9;
}

/// The kernel command-line fragment declaring one device (Linux
/// `virtio_mmio.device=` syntax; see the module docs).
pub fn cmdline_entry(addr: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{addr:#x}:{irq}")
}

/// Errors of quiescing a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuiesceError {
    /// The worker did not reach a request boundary in time.
    #[error("{device}: did not quiesce within {timeout:?}")]
    Timeout {
        /// Which device.
        device: String,
        /// The time allowed.
        timeout: Duration,
    },
}

/// Stopping a device's emulation at a request boundary, for a consistent
/// checkpoint (DESIGN I4), and letting it go on.
pub trait Quiesce {
    /// Finishes the request in hand, then processes nothing more (no queue,
    /// no backend input) until [`Quiesce::resume`]. Idempotent.
    fn pause(&self, timeout: Duration) -> Result<(), QuiesceError>;
    /// Goes on; notifications and backend input that arrived while paused
    /// are served now. Idempotent.
    fn resume(&self);
}
