//! Test helpers: guest memory, a driver-side split queue built by hand, and
//! a driver that sets a device up through its MMIO registers.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{regs, status};
use super::GuestMemory;
use crate::bus::BusDevice;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// `size` bytes of guest memory at 0, dirty-tracked.
pub fn test_mem(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Clears the dirty bitmap.
pub fn clear_dirty(mem: &GuestMemory) {
    use ftvmm_checkpoint::dirty::DirtyBitmap;
    for r in mem.iter() {
        let bm = std::ops::Deref::deref(r).bitmap();
        for w in 0..bm.page_count().div_ceil(64) {
            bm.clear_bits(w, u64::MAX);
        }
    }
}

/// Whether the page holding `addr` is marked dirty in the dirty bitmap.
pub fn is_dirty(mem: &GuestMemory, addr: u64) -> bool {
    let r = mem.find_region(GuestAddress(addr)).unwrap();
    vm_memory::bitmap::Bitmap::dirty_at(
        std::ops::Deref::deref(r).bitmap(),
        (addr - r.start_addr().0) as usize,
    )
}

/// The driver's side of a split virtqueue.
pub struct TestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Rings laid out from `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Adds a chain of (addr, len, device-writable) descriptors and makes it
    /// available; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let next = (idx + 1) % self.size;
            self.write_desc(mem, idx, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// Writes descriptor `idx` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Puts `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (head id, length).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let e = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }
}

pub fn w32(t: &mut dyn BusDevice, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

pub fn r32(t: &mut dyn BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Negotiates `features` and sets `queues` up; returns the status read
/// back (DRIVER_OK set when the device went live).
pub fn activate(t: &mut dyn BusDevice, features: u64, queues: &[&TestQueue]) -> u32 {
    w32(t, regs::STATUS, status::ACKNOWLEDGE);
    w32(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(t, regs::DRIVER_FEATURES_SEL, 0);
    w32(t, regs::DRIVER_FEATURES, features as u32);
    w32(t, regs::DRIVER_FEATURES_SEL, 1);
    w32(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w32(t, regs::STATUS, s);
    for (i, q) in queues.iter().enumerate() {
        w32(t, regs::QUEUE_SEL, i as u32);
        w32(t, regs::QUEUE_NUM, u32::from(q.size));
        w32(t, regs::QUEUE_DESC_LOW, q.desc as u32);
        w32(t, regs::QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        w32(t, regs::QUEUE_AVAIL_LOW, q.avail as u32);
        w32(t, regs::QUEUE_AVAIL_HIGH, (q.avail >> 32) as u32);
        w32(t, regs::QUEUE_USED_LOW, q.used as u32);
        w32(t, regs::QUEUE_USED_HIGH, (q.used >> 32) as u32);
        w32(t, regs::QUEUE_READY, 1);
    }
    w32(t, regs::STATUS, s | status::DRIVER_OK);
    r32(t, regs::STATUS)
}

/// Waits until `evt` is signalled, at most `timeout`; consumes the signal.
pub fn wait_evt(evt: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive across the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    r == 1 && evt.read().is_ok()
}

/// Waits (on the interrupt eventfd) until the used index reaches `n`.
pub fn wait_used(
    mem: &GuestMemory,
    q: &TestQueue,
    n: u16,
    irq: &EventFd,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if q.used_idx(mem) >= n {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        wait_evt(irq, deadline - now);
    }
}
