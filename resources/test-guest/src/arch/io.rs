//! Port I/O and the TSC. Used at CPL0 and, with RFLAGS.IOPL=3, at CPL3.

use core::arch::asm;

/// Writes `value` to I/O port `port`.
///
/// # Safety
/// Port writes drive devices: the caller must know what the port does.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the device access.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads I/O port `port`.
///
/// # Safety
/// Port reads can have device side effects: the caller must know the port.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the device access.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC (CR4.TSD is clear at CPL3 too).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    // SAFETY: `pause` has no architectural effect.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

/// `cpuid` leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ecx, edx): (u32, u32, u32);
    let rbx: u64;
    // SAFETY: `cpuid` only reads; rbx is reserved by LLVM so it is saved by hand.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) rbx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    };
    (eax, rbx as u32, ecx, edx)
}
