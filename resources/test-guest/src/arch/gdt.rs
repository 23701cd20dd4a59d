//! Our GDT (kernel and user segments, a 64-bit TSS) and the TSS itself.
//!
//! The kernel code selector stays 0x10, as in the VMM's boot GDT, so CS need
//! not be reloaded (no far return under the emulator).

use core::arch::asm;

use super::DescriptorPointer;

pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
pub const TSS_SEL: u16 = 0x30;

/// Bytes of an I/O permission bitmap covering all 65536 ports.
const IOMAP_BYTES: usize = 65536 / 8;

/// The 64-bit task-state segment: RSP0 (traps from CPL3), IST1 (#DF), and an
/// I/O permission bitmap that allows every port to ring 3 (clear bits), with
/// the all-ones byte the architecture wants after it. It lives in `.data`, so
/// the VMM loads it ready-made (no emulated stores).
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    iomap: [u8; IOMAP_BYTES],
    iomap_end: u8,
}

const TSS_SIZE: usize = core::mem::size_of::<Tss>();
const IOMAP_OFFSET: usize = 104;
const _: () = assert!(TSS_SIZE == IOMAP_OFFSET + IOMAP_BYTES + 1);

const TSS_INIT: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: IOMAP_OFFSET as u16,
    iomap: [0; IOMAP_BYTES],
    iomap_end: 0xff,
};

static mut TSS: Tss = TSS_INIT;

/// Flat segments: base 0, limit 4 GiB, G=1; code has L=1.
const GDT_INIT: [u64; 8] = [
    0,                     // 0x00 null
    0,                     // 0x08 unused
    0x00af_9a00_0000_ffff, // 0x10 kernel code, 64-bit, DPL0
    0x00cf_9200_0000_ffff, // 0x18 kernel data, DPL0
    0x00cf_f200_0000_ffff, // 0x20 user data, DPL3
    0x00af_fa00_0000_ffff, // 0x28 user code, 64-bit, DPL3
    0,                     // 0x30 TSS, low half (filled in by init)
    0,                     // 0x38 TSS, high half
];

static mut GDT: [u64; 8] = GDT_INIT;

/// Each application processor's own GDT and TSS (a TSS is marked busy by
/// `ltr`, so no two CPUs can share one). In `.data`, ready-made like the
/// BSP's: the BSP fills in the stack pointers and the TSS descriptor at CPL3
/// (`prepare_ap`), the AP only loads them at CPL0 (`load_ap`).
static mut AP_TSS: [Tss; crate::smp::MAX_CPUS - 1] = [TSS_INIT; crate::smp::MAX_CPUS - 1];
static mut AP_GDT: [[u64; 8]; crate::smp::MAX_CPUS - 1] = [GDT_INIT; crate::smp::MAX_CPUS - 1];

extern "C" {
    static __kstack_top: u8;
    static __dfstack_top: u8;
}

/// Loads our GDT and data segments, and the TSS with RSP0/IST1.
///
/// # Safety
/// CPL0, once, with interrupts off.
pub unsafe fn init() {
    // SAFETY: single-threaded set-up; the TSS and GDT are not in use yet.
    unsafe {
        fill(
            &raw mut TSS,
            (&raw mut GDT).cast::<u64>(),
            &raw const __kstack_top as u64,
            &raw const __dfstack_top as u64,
        );
        load((&raw mut GDT).cast::<u64>())
    }
}

/// Fills application processor `ap`'s (1-based CPU index) TSS (RSP0, IST1)
/// and the TSS descriptor of its GDT. Runs at CPL3 on the BSP, before the AP
/// is started.
///
/// # Safety
/// `ap` must be in 1..MAX_CPUS and that AP not started yet.
pub unsafe fn prepare_ap(ap: usize, kstack_top: u64, dfstack_top: u64) {
    // SAFETY: the caller guarantees the index and that nobody uses the
    // tables yet.
    unsafe {
        let tss = (&raw mut AP_TSS).cast::<Tss>().add(ap - 1);
        let gdt = (&raw mut AP_GDT).cast::<[u64; 8]>().add(ap - 1).cast::<u64>();
        fill(tss, gdt, kstack_top, dfstack_top);
    }
}

/// Loads application processor `ap`'s GDT, data segments and TSS (CPL0).
///
/// # Safety
/// CPL0, once per AP, after `prepare_ap(ap, ..)`.
pub unsafe fn load_ap(ap: usize) {
    // SAFETY: prepared by the BSP; in bounds by the caller's contract.
    unsafe { load((&raw mut AP_GDT).cast::<[u64; 8]>().add(ap - 1).cast::<u64>()) }
}

/// Writes the stack pointers into `tss` and its descriptor into `gdt`.
///
/// # Safety
/// Both point at tables not in use.
unsafe fn fill(tss: *mut Tss, gdt: *mut u64, kstack_top: u64, dfstack_top: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        (&raw mut (*tss).rsp[0]).write_unaligned(kstack_top);
        (&raw mut (*tss).ist[0]).write_unaligned(dfstack_top);
    }
    let base = tss as u64;
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, DPL0, type 9 = available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    // SAFETY: indices 6 and 7 are inside the 8-entry GDT, not yet loaded.
    unsafe {
        gdt.add(6).write(low);
        gdt.add(7).write(base >> 32);
    }
}

/// Loads the 8-entry GDT at `gdt`, the kernel data segments and its TSS.
///
/// # Safety
/// CPL0; the GDT is complete.
unsafe fn load(gdt: *mut u64) {
    let ptr = DescriptorPointer {
        limit: (8 * 8 - 1) as u16,
        base: gdt as u64,
    };
    // SAFETY: the GDT keeps 0x10 as 64-bit kernel code, so CS stays valid;
    // the data selector and TSS descriptor were just written.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            ds = in(reg) u32::from(KERNEL_DS),
            tss = in(reg) TSS_SEL,
            options(nostack, preserves_flags),
        )
    };
}
