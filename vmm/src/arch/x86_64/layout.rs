//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (boot)            0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT (empty)           0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4                  0x0000_a000  PDPT
//! 0x0000_b000  4 page directories: identity map of the first 4 GiB (2 MiB pages)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  MP table (EBDA)       0x0010_0000  kernel (HIMEM_START)
//! 0xc000_0000 .. 0x1_0000_0000       32-bit MMIO gap (virtio-mmio devices)
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (left empty; the kernel loads its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap: no RAM between here and 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM needs for the TSS of real-mode emulation (three pages).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The guest RAM ranges for `mem_size` bytes of memory: below the MMIO gap,
/// then above 4 GiB for the rest.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
