//! virtio-mmio glue for the `virtio-drivers` crate: its `Hal` over a DMA pool
//! inside the image (identity mapped, so physical == virtual), and the probe
//! of the `virtio_mmio.device=` windows named on the command line.
//!
//! Everything here runs at CPL3: MMIO accesses to the 0xc000_0000+ gap go
//! through our identity map (user-accessible) and trap to the VMM.

use core::arch::global_asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::cmdline::Config;
use crate::serial::Line;

/// Pages in the DMA pool: virtqueues, packet buffers, block requests.
pub const DMA_PAGES: usize = 64;

// The pool lives in `.noinit` (not zeroed at CPL0, where zeroing is
// emulated); `dma_alloc` zeroes what it hands out, at CPL3.
global_asm!(
    ".pushsection .noinit.dma,\"aw\",@nobits",
    ".balign 4096",
    ".global __ftg_dma",
    "__ftg_dma:",
    ".skip {size}",
    ".popsection",
    size = const DMA_PAGES * 4096,
);

extern "C" {
    static mut __ftg_dma: u8;
}

/// Pages of the pool handed out so far (never given back: devices live as
/// long as the guest).
static DMA_USED: AtomicUsize = AtomicUsize::new(0);

/// `pages` zeroed pages from the pool, or None when it is exhausted.
pub fn alloc_pages(pages: usize) -> Option<NonNull<u8>> {
    let first = DMA_USED.load(Ordering::Relaxed);
    let end = first.checked_add(pages).filter(|&e| e <= DMA_PAGES)?;
    DMA_USED.store(end, Ordering::Relaxed);
    // SAFETY: pages [first, end) of the pool are inside it and handed out
    // once; the pool is mapped writable at CPL3.
    unsafe {
        let p = (&raw mut __ftg_dma).add(first * PAGE_SIZE);
        core::ptr::write_bytes(p, 0, pages * PAGE_SIZE);
        NonNull::new(p)
    }
}

/// The crate's view of the platform: identity-mapped, no IOMMU, no bounce
/// buffers.
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, unaliased memory from the
// pool, whose physical address is its virtual address (identity map);
// share/unshare hand back the buffer's own address (no bounce buffers are
// needed: all of RAM is visible to the VMM).
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match alloc_pages(pages) {
            Some(p) => (p.as_ptr() as PhysAddr, p),
            // The crate turns paddr 0 into Error::DmaError.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

pub type Mmio = MmioTransport<'static>;

/// The first network and block devices among the command line's windows.
pub struct Found {
    pub net: Option<Mmio>,
    pub blk: Option<Mmio>,
}

/// Probes every `virtio_mmio.device=` window; prints a warning for a window
/// that is not a usable virtio-mmio device, or a device type we do not drive.
pub fn probe(cfg: &Config) -> Found {
    let mut found = Found {
        net: None,
        blk: None,
    };
    for dev in cfg.mmio.iter().flatten() {
        let ok_addr = dev.addr != 0
            && dev.addr % 4096 == 0
            && dev
                .addr
                .checked_add(dev.size)
                .is_some_and(|end| end <= 1 << 32);
        if !ok_addr || dev.size < 0x200 {
            warn(dev.addr, "not a 4 KiB-aligned window below 4 GiB");
            continue;
        }
        let header = NonNull::new(dev.addr as *mut VirtIOHeader).expect("nonzero");
        // SAFETY: the VMM named this window as a virtio-mmio device; it lies
        // in the MMIO gap, identity mapped; nothing else uses it (a second
        // entry for the same address would alias, which the VMM never does).
        let t = match unsafe { MmioTransport::new(header, dev.size as usize) } {
            Ok(t) => t,
            Err(e) => {
                let mut line = Line::new();
                line.push_str("ftguest warning: virtio-mmio at ");
                line.push_hex(dev.addr);
                let _ = core::fmt::Write::write_fmt(&mut line, format_args!(": {e}\n"));
                line.emit();
                continue;
            }
        };
        match t.device_type() {
            DeviceType::Network if found.net.is_none() => found.net = Some(t),
            DeviceType::Block if found.blk.is_none() => found.blk = Some(t),
            _ => warn(dev.addr, "device type not driven (or a second one)"),
        }
    }
    found
}

fn warn(addr: u64, what: &str) {
    let mut line = Line::new();
    line.push_str("ftguest warning: virtio-mmio at ");
    line.push_hex(addr);
    line.push_str(": ");
    line.push_str(what);
    line.push_str("\n");
    line.emit();
}
