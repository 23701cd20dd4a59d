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

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

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

/// The dirty logs of all slots, harvested together.
#[derive(Debug)]
pub struct DirtyLog {
    /// One entry per slot, in slot order (= guest memory region order).
    pub slots: Vec<SlotLog>,
}

impl DirtyLog {
    /// Enables manual protection on `vm` (before dirty logging is turned on
    /// for the slots) and allocates the bitmaps for `mem`'s regions.
    pub fn new(vm: &VmFd, mem: &GuestMemory) -> Result<Self, DirtyLogError> {
        if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
            return Err(DirtyLogError::NoManualProtect);
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(DirtyLogError::Enable)?;
        let slots = mem
            .iter()
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
            .collect();
        Ok(DirtyLog { slots })
    }

    /// Reads every slot's log into its bitmap and re-protects the pages read.
    /// Call with all vCPUs paused. Allocation-free.
    pub fn harvest(&mut self, vm: &VmFd) -> Result<(), DirtyLogError> {
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

    /// Number of dirty pages in the last harvest.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.bitmap.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}
