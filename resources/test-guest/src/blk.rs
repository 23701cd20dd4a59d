//! A small virtio-blk driver on the `virtio-drivers` crate's virtqueue and
//! transport. The crate's own `VirtIOBlk` can only flush by blocking until
//! the device answers (with no bound, and without polling the network
//! meanwhile); here reads, writes and flushes are all submitted without
//! blocking and completed by token, so the caller can time any of them out.
//!
//! The caller owns the request's parts (header, status byte, data), in DMA
//! memory, and keeps them untouched while the request is in flight.

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{Error, PAGE_SIZE};

use crate::virtio::{GuestHal, Mmio};

const QUEUE: u16 = 0;
const QUEUE_SIZE: usize = 16;

/// VIRTIO_BLK_F_RO: the device is read-only.
const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device takes VIRTIO_BLK_T_FLUSH.
const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_F_VERSION_1.
const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

/// What a request does with its data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Fills the data from the disk.
    Read,
    /// Writes the data to the disk.
    Write,
    /// Makes completed writes durable (no data).
    Flush,
}

/// A request's header and status byte, in DMA memory.
pub struct Req {
    header: &'static mut [u8; 16],
    status: &'static mut [u8; 1],
}

impl Req {
    /// # Safety
    /// `header` and `status` are DMA memory for this request alone, for the
    /// rest of the guest's life.
    pub unsafe fn new(header: *mut [u8; 16], status: *mut [u8; 1]) -> Req {
        // SAFETY: per the caller.
        unsafe {
            Req {
                header: &mut *header,
                status: &mut *status,
            }
        }
    }
}

pub struct Blk {
    transport: Mmio,
    queue: VirtQueue<GuestHal, QUEUE_SIZE>,
    capacity: u64,
    features: u64,
}

impl Blk {
    /// Resets and sets up the device (virtio 1.x, 3.1.1), with device
    /// notifications off: completions are polled.
    pub fn new(mut t: Mmio) -> Result<Blk, Error> {
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let features = t.read_device_features() & (F_RO | F_FLUSH | F_VERSION_1);
        t.write_driver_features(features);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        t.set_guest_page_size(PAGE_SIZE as u32);
        // Config space: capacity (in 512-byte sectors) as two u32 halves.
        let capacity = t.read_consistent(|| {
            let low: u32 = t.read_config_space(0)?;
            let high: u32 = t.read_config_space(4)?;
            Ok(u64::from(low) | (u64::from(high) << 32))
        })?;
        let mut queue = VirtQueue::new(&mut t, QUEUE, false, false)?;
        queue.set_dev_notify(false);
        t.finish_init();
        Ok(Blk {
            transport: t,
            queue,
            capacity,
            features,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn readonly(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Whether the device took VIRTIO_BLK_F_FLUSH.
    pub fn can_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    /// Hands a request to the device; returns its token. `data` is what a
    /// write writes or a read fills (a whole number of sectors), and is
    /// ignored by a flush.
    ///
    /// # Safety
    /// `req` and `data` are DMA memory, and are not touched again until
    /// `complete` is called with the token, the same kind and the same parts.
    pub unsafe fn submit(
        &mut self,
        kind: Kind,
        lba: u64,
        req: &mut Req,
        data: &mut [u8],
    ) -> Result<u16, Error> {
        let (type_, lba) = match kind {
            Kind::Read => (T_IN, lba),
            Kind::Write => (T_OUT, lba),
            // The sector of a flush is unused; the spec wants 0.
            Kind::Flush => (T_FLUSH, 0),
        };
        req.header[..4].copy_from_slice(&type_.to_le_bytes());
        req.header[4..8].fill(0);
        req.header[8..].copy_from_slice(&lba.to_le_bytes());
        req.status[0] = 0xff;
        let header = &req.header[..];
        let status = &mut req.status[..];
        // SAFETY: the caller keeps the parts untouched until `complete`.
        let token = unsafe {
            match kind {
                Kind::Read => self.queue.add(&[header], &mut [data, status]),
                Kind::Write => self.queue.add(&[header, data], &mut [status]),
                Kind::Flush => self.queue.add(&[header], &mut [status]),
            }
        }?;
        if self.queue.should_notify() {
            self.transport.notify(QUEUE);
        }
        Ok(token)
    }

    /// The token of the next completed request, if there is one (nothing is
    /// taken off the used ring).
    pub fn peek_used(&self) -> Option<u16> {
        self.queue.peek_used()
    }

    /// Takes the completed request `token` off the used ring; its outcome
    /// from the status byte.
    ///
    /// # Safety
    /// `kind`, `req` and `data` are those given to `submit` for `token`.
    pub unsafe fn complete(
        &mut self,
        token: u16,
        kind: Kind,
        req: &mut Req,
        data: &mut [u8],
    ) -> Result<(), Error> {
        let header = &req.header[..];
        let status = &mut req.status[..];
        // SAFETY: per the caller, the same buffers as were added.
        unsafe {
            match kind {
                Kind::Read => self.queue.pop_used(token, &[header], &mut [data, status]),
                Kind::Write => self.queue.pop_used(token, &[header, data], &mut [status]),
                Kind::Flush => self.queue.pop_used(token, &[header], &mut [status]),
            }
        }?;
        match req.status[0] {
            S_OK => Ok(()),
            S_UNSUPP => Err(Error::Unsupported),
            _ => Err(Error::IoError),
        }
    }
}
