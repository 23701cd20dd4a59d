//! Our own identity map, with U/S set at every level so CPL3 can touch all
//! of RAM: 2 MiB pages, the first 4 GiB prebuilt at compile time in `.data`
//! (loaded with the image: no emulated stores), the rest of RAM up to
//! `MAX_GIB` filled in at boot.

use core::arch::{asm, global_asm};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER;
const LEAF_FLAGS: u64 = PRESENT | WRITABLE | USER | HUGE;

const ENTRIES: usize = 512;
const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// GiB mapped by the prebuilt page directories.
const LOW_GIB: usize = 4;
/// GiB mapped at most (one PDPT covers 512).
pub const MAX_GIB: usize = 64;

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);

#[link_section = ".data.pagetables"]
static mut PML4: Table = Table([0; ENTRIES]);
#[link_section = ".data.pagetables"]
static mut PDPT: Table = Table([0; ENTRIES]);
#[link_section = ".data.pagetables"]
static mut PD_LOW: [Table; LOW_GIB] = low_directories();

// Page directories for RAM above 4 GiB: not zeroed, every entry used is written.
global_asm!(
    ".section .noinit.pagetables,\"aw\",@nobits",
    ".balign 4096",
    ".global __ftg_pd_high",
    "__ftg_pd_high:",
    ".skip {size}",
    size = const (MAX_GIB - LOW_GIB) * 4096,
);

extern "C" {
    static mut __ftg_pd_high: u8;
}

const fn low_directories() -> [Table; LOW_GIB] {
    let mut t = [const { Table([0; ENTRIES]) }; LOW_GIB];
    let mut i = 0;
    while i < LOW_GIB * ENTRIES {
        t[i / ENTRIES].0[i % ENTRIES] = ((i as u64) * PAGE_2M) | LEAF_FLAGS;
        i += 1;
    }
    t
}

/// Links the tables, maps RAM up to `ram_end` (at least 4 GiB, at most
/// `MAX_GIB`), loads CR3 and returns the end of the mapping.
///
/// # Safety
/// CPL0, once, before anything relies on CPL3 access.
pub unsafe fn init(ram_end: u64) -> u64 {
    let gib = (ram_end.div_ceil(GIB) as usize).clamp(LOW_GIB, MAX_GIB);
    let pml4 = (&raw mut PML4).cast::<u64>();
    let pdpt = (&raw mut PDPT).cast::<u64>();
    let pd_low = (&raw mut PD_LOW).cast::<u64>();
    let pd_high = (&raw mut __ftg_pd_high).cast::<u64>();
    // SAFETY: every index stays inside its table (gib <= MAX_GIB); the tables
    // are not in use until CR3 is loaded below.
    unsafe {
        pml4.write(pdpt as u64 | TABLE_FLAGS);
        for g in 0..LOW_GIB {
            pdpt.add(g)
                .write(pd_low.add(g * ENTRIES) as u64 | TABLE_FLAGS);
        }
        for g in LOW_GIB..gib {
            let pd = pd_high.add((g - LOW_GIB) * ENTRIES);
            let mut addr = g as u64 * GIB;
            for e in 0..ENTRIES {
                pd.add(e).write(addr | LEAF_FLAGS);
                addr += PAGE_2M;
            }
            pdpt.add(g).write(pd as u64 | TABLE_FLAGS);
        }
        asm!("mov cr3, {0}", in(reg) pml4 as u64, options(nostack, preserves_flags));
    }
    gib as u64 * GIB
}

/// The physical (= virtual) address of the PML4, for the APs' CR3.
pub fn pml4_addr() -> u64 {
    (&raw const PML4) as u64
}
