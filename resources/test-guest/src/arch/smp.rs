//! Application processors: the real-mode trampoline that INIT-SIPI-SIPI
//! starts them at, and their CPL0 set-up (IDT, own GDT/TSS) before they drop
//! to CPL3 like the BSP.
//!
//! The trampoline is assembled into `.rodata` (position-independent: every
//! address in it is `TRAMPOLINE_BASE` plus an offset) and copied to
//! `TRAMPOLINE_BASE` (below 1 MiB, page-aligned, free in the VMM's layout) by
//! the BSP at CPL3. A SIPI with vector `TRAMPOLINE_BASE >> 12` starts the AP
//! in real mode at CS = 0x1000, IP = 0: it loads the trampoline's own GDT,
//! enters 32-bit protected mode, turns on PAE, the BSP's page tables (CR3 is
//! patched into the copy), EFER.LME and paging, jumps to 64-bit code, takes
//! the kernel stack the BSP published in `AP_BOOT_STACK` and calls
//! [`ap_kernel_main`]. All of it runs under the instruction emulator on the
//! project's hosts; `tests/guest_isa` checks its three parts in their modes.
//! APs are started one at a time, so one published stack/index suffices.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{boot, gdt, idt};
use crate::smp::MAX_CPUS;

/// Where the trampoline is copied: SIPI vector 0x10.
pub const TRAMPOLINE_BASE: u64 = 0x10000;

/// The CPU index (1-based for APs) the AP being started takes.
pub static AP_BOOT_INDEX: AtomicU64 = AtomicU64::new(0);
/// The kernel stack top of the AP being started (read by the trampoline).
#[no_mangle]
pub static AP_BOOT_STACK: AtomicU64 = AtomicU64::new(0);

const KSTACK: u64 = 16384;
const DFSTACK: u64 = 4096;
const USTACK: u64 = 65536;
const AP_STACKS: u64 = KSTACK + DFSTACK + USTACK;

// Each AP's stacks: kernel (RSP0), #DF (IST1), user. Not zeroed, like the
// BSP's.
global_asm!(
    ".section .noinit.apstacks,\"aw\",@nobits",
    ".balign 4096",
    ".global __ftg_ap_stacks",
    "__ftg_ap_stacks:",
    ".skip {size}",
    size = const AP_STACKS * (MAX_CPUS as u64 - 1),
);

// The trampoline. Offsets are relative to `__ftg_tramp_start`; DS = CS =
// TRAMPOLINE_BASE >> 4 in real mode.
global_asm!(
    ".section .rodata.ap_trampoline,\"a\"",
    ".balign 16",
    ".global __ftg_tramp_start",
    "__ftg_tramp_start:",
    ".global __ftg_tramp16",
    "__ftg_tramp16:",
    ".code16",
    "cli",
    "cld",
    "movw %cs, %ax",
    "movw %ax, %ds",
    "lgdtl (__ftg_tramp_gdtr - __ftg_tramp_start)",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, ${base} + (__ftg_tramp32 - __ftg_tramp_start)",
    ".global __ftg_tramp32",
    "__ftg_tramp32:",
    ".code32",
    "movw $0x18, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl %cr4, %eax",
    "orl $0x20, %eax", // PAE
    "movl %eax, %cr4",
    "movl ({base} + (__ftg_tramp_cr3 - __ftg_tramp_start)), %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx", // EFER
    "rdmsr",
    "orl $0x100, %eax", // LME
    "wrmsr",
    "movl %cr0, %eax",
    "orl $0x80000000, %eax", // PG
    "movl %eax, %cr0",
    "ljmp $0x10, ${base} + (__ftg_tramp64 - __ftg_tramp_start)",
    ".global __ftg_tramp64",
    "__ftg_tramp64:",
    ".code64",
    "movabsq $AP_BOOT_STACK, %rax",
    "movq (%rax), %rsp",
    "movabsq ${main}, %rax",
    "callq *%rax",
    "ud2",
    ".balign 8",
    "__ftg_tramp_gdt:",
    ".quad 0",
    ".quad 0x00cf9a000000ffff", // 0x08 32-bit code
    ".quad 0x00af9a000000ffff", // 0x10 64-bit code
    ".quad 0x00cf92000000ffff", // 0x18 data
    "__ftg_tramp_gdtr:",
    ".word 31",
    ".long {base} + (__ftg_tramp_gdt - __ftg_tramp_start)",
    ".global __ftg_tramp_cr3",
    "__ftg_tramp_cr3:",
    ".long 0",
    ".global __ftg_tramp_end",
    "__ftg_tramp_end:",
    ".text",
    base = const TRAMPOLINE_BASE,
    main = sym ap_kernel_main,
    options(att_syntax),
);

extern "C" {
    static __ftg_tramp_start: u8;
    static __ftg_tramp_cr3: u8;
    static __ftg_tramp_end: u8;
    static __ftg_ap_stacks: u8;
}

/// Copies the trampoline to `TRAMPOLINE_BASE` with the BSP's CR3 patched in
/// (CPL3, on the BSP, before the first SIPI).
pub fn install_trampoline() {
    let start = (&raw const __ftg_tramp_start) as u64;
    let len = (&raw const __ftg_tramp_end) as u64 - start;
    let cr3_at = (&raw const __ftg_tramp_cr3) as u64 - start;
    let dst = TRAMPOLINE_BASE as *mut u8;
    // SAFETY: the destination is RAM below 1 MiB that the VMM's layout leaves
    // free (between its page tables and the command line), identity mapped
    // user-writable; the source is the image's `.rodata`.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, dst, len as usize);
        (dst.add(cr3_at as usize) as *mut u32).write_unaligned(super::paging::pml4_addr() as u32);
    }
}

/// The user stack top of CPU `cpu` (1-based AP index).
fn stacks(cpu: usize) -> (u64, u64, u64) {
    let base = (&raw const __ftg_ap_stacks) as u64 + (cpu as u64 - 1) * AP_STACKS;
    (base + KSTACK, base + KSTACK + DFSTACK, base + AP_STACKS)
}

/// Prepares AP `cpu`'s GDT/TSS and publishes its index and boot stack, so a
/// SIPI can start it (CPL3, on the BSP).
///
/// # Safety
/// `cpu` in 1..MAX_CPUS, not started yet, and no other AP being started.
pub unsafe fn prepare_ap(cpu: usize) {
    let (kstack, dfstack, _) = stacks(cpu);
    // SAFETY: the caller's contract.
    unsafe { gdt::prepare_ap(cpu, kstack, dfstack) };
    AP_BOOT_INDEX.store(cpu as u64, Ordering::Release);
    AP_BOOT_STACK.store(kstack, Ordering::Release);
}

/// The AP's CPL0 set-up, reached from the trampoline in long mode on its
/// kernel stack: the shared IDT, its own GDT and TSS, then CPL3.
extern "C" fn ap_kernel_main() -> ! {
    let cpu = AP_BOOT_INDEX.load(Ordering::Acquire) as usize;
    let (_, _, ustack) = stacks(cpu);
    // SAFETY: the BSP prepared this AP's tables before its SIPI and set up
    // the IDT and page tables it shares.
    unsafe {
        idt::load();
        gdt::load_ap(cpu);
        boot::enter_user(crate::smp::ap_main, cpu as u64, ustack)
    }
}
