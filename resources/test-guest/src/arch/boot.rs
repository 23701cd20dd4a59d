//! The entry point and the CPL0 set-up, then the drop to CPL3.
//!
//! The VMM enters `_start` in long mode at CPL0 with RSI = boot_params, a
//! temporary stack near 0x9000, its own GDT and page tables, and `.bss` not
//! zeroed. Everything here runs under the instruction emulator (about 1 µs per
//! instruction), so it does only what cannot wait for CPL3.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use super::{gdt, idt, paging};
use crate::bootparams::BootParams;

/// Bytes of RAM mapped by our page tables (set at CPL0, read at CPL3).
pub static MAPPED_END: AtomicU64 = AtomicU64::new(0);

// Stacks live in `.noinit`, which is not zeroed (zeroing costs ~2.4 µs a byte
// under emulation): they are never read before written.
global_asm!(
    ".section .noinit.stacks,\"aw\",@nobits",
    ".balign 4096",
    "__kstack_bottom:",
    ".skip 16384",
    ".global __kstack_top",
    "__kstack_top:",
    ".skip 4096",
    ".global __dfstack_top",
    "__dfstack_top:",
    ".skip 65536",
    ".global __ustack_top",
    "__ustack_top:",
    "",
    ".section .text.boot,\"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "cld",
    "mov r15, rsi",
    "lea rsp, [rip + __kstack_top]",
    // Zero .bss (8-byte aligned at both ends by the linker script).
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "shr rcx, 3",
    "xor eax, eax",
    "rep stosq",
    "mov rdi, r15",
    "call {main}",
    "ud2",
    main = sym kernel_main,
);

extern "C" {
    static __ustack_top: u8;
}

/// CPL0 set-up: IDT, page tables, GDT/TSS; then `iretq` to CPL3.
extern "C" fn kernel_main(boot_params: u64) -> ! {
    // SAFETY: each step runs once, at CPL0, before anything else uses the
    // tables it builds; the boot_params address is the VMM's.
    unsafe {
        idt::init();
        let bp = BootParams::new(boot_params);
        let mapped = paging::init(bp.ram_end());
        MAPPED_END.store(mapped, Ordering::Relaxed);
        gdt::init();
        enter_user(
            crate::user_main,
            boot_params,
            (&raw const __ustack_top) as u64,
        )
    }
}

/// Drops to CPL3 at `entry(arg)` on the user stack `ustack_top`, with IF=0
/// and IOPL=3.
///
/// IOPL=3 is what lets ring 3 do port I/O on hardware KVM. On the project's
/// PVM hosts it does not stick (user mode runs with the hardware IOPL=0, and
/// an `in`/`out` that traps is emulated against the guest's IOPL as saved at
/// that trap: 0), so the TSS I/O bitmap (all ports allowed, see `gdt`) is
/// what grants the access there.
///
/// # Safety
/// The GDT, TSS, IDT and user-accessible page tables must be in place.
pub(super) unsafe fn enter_user(entry: extern "C" fn(u64) -> !, arg: u64, ustack_top: u64) -> ! {
    const RFLAGS_IOPL3: u64 = 3 << 12;
    const RFLAGS_RESERVED1: u64 = 1 << 1;
    // As if `entry` had been called: RSP ≡ 8 (mod 16) at its first instruction.
    let user_rsp = ustack_top - 8;
    // SAFETY: the caller set up everything `iretq` and the user code need.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(gdt::USER_DS),
            rsp = in(reg) user_rsp,
            rflags = in(reg) RFLAGS_IOPL3 | RFLAGS_RESERVED1,
            cs = in(reg) u64::from(gdt::USER_CS),
            rip = in(reg) entry as usize as u64,
            in("rdi") arg,
            options(noreturn),
        )
    }
}
