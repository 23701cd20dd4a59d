//! KVM's dirty page log with manual re-protection
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` reads the
//! bitmap of a slot without resetting it, `KVM_CLEAR_DIRTY_LOG` resets (and
//! write-protects again) exactly the pages we harvested.
//!
//! kvm-ioctls wraps `KVM_GET_DIRTY_LOG` only in a form that allocates a new
//! bitmap on every call and knows nothing of `KVM_CLEAR_DIRTY_LOG`; the epoch
//! pause must not allocate, so this module issues both ioctls itself into
//! bitmaps allocated once. It is the single owner of the log: each read of a
//! slot's log is followed by exactly one clear of what was read.

use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log, kvm_enable_cap, KVMIO,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::memory::GuestMemory;

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Errors of the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The host KVM lacks manual dirty-log protection.
    #[error("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not available on this host")]
    NoManualProtect,
    /// Enabling it failed.
    #[error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) failed: {0}")]
    Enable(kvm_ioctls::Error),
    /// Reading a slot's log failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    Get {
        /// Slot.
        slot: u32,
        /// OS error.
        source: std::io::Error,
    },
    /// The host KVM lacks the dirty ring.
    #[error("KVM_CAP_DIRTY_LOG_RING is not available on this host (use --dirty-track bitmap)")]
    NoDirtyRing,
    /// Mapping a vCPU's dirty ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu}: {source}")]
    MapRing {
        /// vCPU index.
        vcpu: u8,
        /// OS error.
        source: std::io::Error,
    },
    /// KVM_RESET_DIRTY_RINGS failed.
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    ResetRings(std::io::Error),
    /// Clearing a slot's log failed.
    #[error("KVM_CLEAR_DIRTY_LOG for slot {slot} failed: {source}")]
    Clear {
        /// Slot.
        slot: u32,
        /// OS error.
        source: std::io::Error,
    },
}

/// The dirty bitmap of one KVM slot (= one guest memory region).
#[derive(Debug)]
pub struct SlotLog {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical base of the slot.
    pub gpa: u64,
    /// Pages in the slot.
    pub pages: u64,
    /// Bit i set: page i was written by a vCPU since the last harvest.
    pub bitmap: Vec<u64>,
}

/// The dirty logs of all slots, harvested together: from KVM's per-slot
/// bitmaps (GET + CLEAR), or from the per-vCPU dirty rings.
#[derive(Debug)]
pub struct DirtyLog {
    /// One entry per slot, in slot order (= guest memory region order).
    pub slots: Vec<SlotLog>,
    /// The dirty rings, when that backend is used.
    rings: Option<Vec<DirtyRing>>,
}

impl DirtyLog {
    /// Enables manual protection on `vm` (before dirty logging is turned on
    /// for the slots) and allocates the bitmaps for `mem`'s regions.
    pub fn new(vm: &VmFd, mem: &GuestMemory) -> Result<Self, DirtyLogError> {
        let slots = Self::slot_logs(mem);
        if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
            return Err(DirtyLogError::NoManualProtect);
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(DirtyLogError::Enable)?;
        Ok(DirtyLog { slots, rings: None })
    }

    /// A log fed by the vCPUs' dirty rings (enabled with
    /// [`enable_dirty_ring`] when the VM was created).
    pub fn with_rings(mem: &GuestMemory, rings: Vec<DirtyRing>) -> Self {
        DirtyLog {
            slots: Self::slot_logs(mem),
            rings: Some(rings),
        }
    }

    /// Whether this log is fed by dirty rings.
    pub fn uses_rings(&self) -> bool {
        self.rings.is_some()
    }

    fn slot_logs(mem: &GuestMemory) -> Vec<SlotLog> {
        mem.iter()
            .enumerate()
            .map(|(i, r)| {
                let pages = r.len() / 4096;
                SlotLog {
                    slot: i as u32,
                    gpa: r.start_addr().0,
                    pages,
                    bitmap: vec![0u64; pages.div_ceil(64) as usize],
                }
            })
            .collect()
    }

    /// Reads every slot's log into its bitmap and re-protects the pages read.
    /// Call with all vCPUs paused. Allocation-free.
    pub fn harvest(&mut self, vm: &VmFd) -> Result<(), DirtyLogError> {
        if let Some(rings) = &mut self.rings {
            for s in &mut self.slots {
                s.bitmap.fill(0);
            }
            let mut taken = 0;
            for ring in rings.iter_mut() {
                taken += ring.drain(&mut self.slots);
            }
            if taken > 0 {
                // SAFETY: a VM ioctl without arguments; KVM re-protects the
                // pages of the entries we marked for reset.
                if unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) } < 0 {
                    return Err(DirtyLogError::ResetRings(std::io::Error::last_os_error()));
                }
            }
            return Ok(());
        }
        for s in &mut self.slots {
            let mut get = kvm_dirty_log {
                slot: s.slot,
                ..Default::default()
            };
            get.__bindgen_anon_1.dirty_bitmap = s.bitmap.as_mut_ptr().cast();
            // SAFETY: the bitmap holds one bit per page of the slot, rounded
            // up to 64 bits, which is what KVM writes for this slot.
            let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &get) };
            if ret != 0 {
                return Err(DirtyLogError::Get {
                    slot: s.slot,
                    source: std::io::Error::last_os_error(),
                });
            }
            if s.bitmap.iter().all(|w| *w == 0) {
                continue;
            }
            let mut clear = kvm_clear_dirty_log {
                slot: s.slot,
                num_pages: s.pages as u32,
                first_page: 0,
                ..Default::default()
            };
            clear.__bindgen_anon_1.dirty_bitmap = s.bitmap.as_mut_ptr().cast();
            // SAFETY: KVM reads num_pages bits from the bitmap, which holds
            // at least that many; first_page 0 and the whole slot satisfy
            // the alignment rules of KVM_CLEAR_DIRTY_LOG.
            let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret != 0 {
                return Err(DirtyLogError::Clear {
                    slot: s.slot,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM published this ring entry.
const GFN_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: we harvested it; `KVM_RESET_DIRTY_RINGS` may
/// re-protect the page and recycle the entry.
const GFN_RESET: u32 = 2;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entries per vCPU dirty ring (the largest these hosts offer; one entry is
/// 16 bytes, so 1 MiB per vCPU).
pub const DIRTY_RING_ENTRIES: u32 = 65_536;

/// Turns on the per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING`) for `vm`:
/// must happen before any vCPU exists. Returns the entries per ring, capped
/// at what the host offers.
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<u32, DirtyLogError> {
    let gfn = std::mem::size_of::<kvm_dirty_gfn>() as u32;
    let max_bytes = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    if max_bytes <= 0 {
        return Err(DirtyLogError::NoDirtyRing);
    }
    // A power of two no larger than asked or offered.
    let most = entries.min(max_bytes as u32 / gfn).max(1);
    let entries = 1u32 << (31 - most.leading_zeros());
    let cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        args: [u64::from(entries * gfn), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(DirtyLogError::Enable)?;
    Ok(entries)
}

/// One vCPU's dirty ring, mapped from its vCPU fd.
#[derive(Debug)]
pub struct DirtyRing {
    gfns: std::ptr::NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (ours; KVM keeps its own).
    fetch: u32,
}

// SAFETY: the mapping is owned by this value and only read and written
// through `&mut self` (one thread at a time); KVM is the other party, and it
// synchronises through the entries' flags.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of vCPU `id`, `vcpu`, which has `entries` entries.
    pub fn map(vcpu: &kvm_ioctls::VcpuFd, id: u8, entries: u32) -> Result<Self, DirtyLogError> {
        use std::os::fd::AsRawFd;
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let page = 4096i64;
        // SAFETY: mapping a KVM vCPU fd at the documented dirty-ring offset
        // with the size the cap was enabled with; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::MapRing {
                vcpu: id,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DirtyRing {
            gfns: std::ptr::NonNull::new(ptr.cast()).expect("mmap does not return null on success"),
            entries,
            fetch: 0,
        })
    }

    /// Moves every published entry into the slot bitmaps and marks it for
    /// reset. Returns the number of entries taken.
    fn drain(&mut self, slots: &mut [SlotLog]) -> usize {
        let mut taken = 0;
        loop {
            let i = (self.fetch & (self.entries - 1)) as usize;
            // SAFETY: i < entries, so the entry is inside the mapping.
            let e = unsafe { self.gfns.as_ptr().add(i) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory
            // that KVM publishes with release semantics; reading it as an
            // atomic with acquire pairs with that.
            let flags = unsafe { &*(std::ptr::addr_of!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY), so KVM no longer
            // writes its slot and offset.
            let (slot, offset) = unsafe { ((*e).slot as usize & 0xffff, (*e).offset) };
            if let Some(s) = slots.get_mut(slot) {
                if offset < s.pages {
                    s.bitmap[(offset / 64) as usize] |= 1 << (offset % 64);
                }
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            taken += 1;
        }
        taken
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe { libc::munmap(self.gfns.as_ptr().cast(), bytes) };
    }
}
