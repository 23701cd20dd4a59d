//! x86_64 low-level code: port I/O, the boot entry and CPL0 set-up (GDT/TSS,
//! IDT, page tables), and the way out (a deliberate triple fault).
//!
//! Everything reachable at CPL0 runs under KVM's instruction emulator on the
//! project's machines: only integer instructions, `rep movs/stos`, port I/O,
//! descriptor-table loads, `mov cr`, `iretq` (PLATFORM.md has the full set).
//! `tests/guest_isa` checks the linked ELF against that set.

pub mod boot;
pub mod gdt;
pub mod idt;
pub mod io;
pub mod paging;
pub mod smp;

use core::arch::asm;

/// The current privilege level (0 or 3).
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// Pseudo-descriptor for `lgdt`/`lidt`.
#[repr(C, packed)]
pub struct DescriptorPointer {
    pub limit: u16,
    pub base: u64,
}

/// Ends the VM on purpose: with a zero-limit IDT, `ud2`'s #UD cannot be
/// delivered, nor can the #GP and #DF that follow, so the CPU shuts down and
/// the VMM sees `KVM_EXIT_SHUTDOWN`. Must run at CPL0.
pub fn triple_fault() -> ! {
    let null = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately ends the VM; nothing runs after it.
    unsafe { asm!("lidt [{0}]", "ud2", in(reg) &null, options(noreturn, nostack)) }
}

/// From CPL3: trap into the CPL0 exception handler (#UD), which triple-faults.
pub fn die_from_user() -> ! {
    // SAFETY: `ud2` raises #UD; its handler never returns.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}
