//! Guest memory: vm-memory's `GuestMemoryMmap` with a dirty bitmap backend,
//! so every write the VMM makes into guest memory through vm-memory marks its
//! page dirty, and the KVM memory slots that back it.
//!
//! The bitmap is the checkpoint crate's `PageBitmap`: vm-memory marks it
//! exactly like its own `AtomicBitmap` (it implements vm-memory's `Bitmap`),
//! but the epoch harvest reads it 64 pages per load instead of one bit at a
//! time (≈5 µs instead of ≈420 µs for 1 GiB, measured).

use ftvmm_checkpoint::dirty::PageBitmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// Guest memory as the whole VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<PageBitmap>;

/// Smallest guest memory accepted (MiB).
pub const MIN_MEM_MIB: u64 = 16;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Too little memory asked for.
    #[error("--mem-mib {0} is too small: at least {MIN_MEM_MIB} MiB are needed")]
    TooSmall(u64),
    /// More memory asked for than the host has.
    #[error("--mem-mib {asked} is more than this host's {host_mib} MiB of memory")]
    TooLarge {
        /// MiB asked for.
        asked: u64,
        /// MiB the host has.
        host_mib: u64,
    },
    /// mmap of the guest memory failed.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Allocate {
        /// MiB asked for.
        mib: u64,
        /// Why it failed.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} (guest {gpa:#x}, {size:#x} bytes) failed: {source}")]
    SetSlot {
        /// Slot number.
        slot: u32,
        /// Guest physical base.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// Total host memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks `mem_mib` against the minimum and the host's memory.
pub fn validate_size(mem_mib: u64) -> Result<(), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if let Some(host_mib) = host_memory_mib() {
        if mem_mib > host_mib {
            return Err(MemoryError::TooLarge {
                asked: mem_mib,
                host_mib,
            });
        }
    }
    Ok(())
}

/// Allocates `mem_mib` MiB of guest memory laid out around the MMIO gap.
pub fn create(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    validate_size(mem_mib)?;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(base, len)| (GuestAddress(base), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError::Allocate {
        mib: mem_mib,
        reason: e.to_string(),
    })
}

/// Registers (or re-registers, to change the flags) every region of `mem`
/// as a KVM slot; slot i is region i. With `dirty_log`, KVM tracks the pages
/// vCPUs write.
pub fn register_slots(vm: &VmFd, mem: &GuestMemory, dirty_log: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let gpa = region.start_addr().0;
        let size = region.len();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("an mmap region has a host address") as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the
        // VM (the VM and its memory are dropped together, memory last), and
        // the slot does not overlap another one: regions of a
        // GuestMemoryMmap never overlap.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::SetSlot {
            slot,
            gpa,
            size,
            source,
        })?;
    }
    Ok(())
}

/// Number of 4 KiB pages in `mem`.
pub fn page_count(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len() / 4096).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits() {
        assert!(matches!(validate_size(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(
            validate_size(1 << 40),
            Err(MemoryError::TooLarge { .. })
        ));
        let mem = create(32).unwrap();
        assert_eq!(page_count(&mem), 32 * 256);
    }
}
