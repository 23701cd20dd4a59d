//! Exception handling: an IDT for vectors 0-31 whose handlers print
//! `ftguest panic: exception <vec> err=<e> rip=<rip>` and end the VM with a
//! triple fault. Nothing else ever interrupts the guest (IF stays 0).

use core::arch::{asm, global_asm};
use core::sync::atomic::Ordering;

use super::{gdt, DescriptorPointer};
use crate::serial::Line;

/// 16-byte interrupt gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const VECTORS: usize = 32;
const STUB_SIZE: u64 = 16;
const DOUBLE_FAULT: u64 = 8;
const PAGE_FAULT: u64 = 14;

/// In `.bss`: zeroed at entry, filled by `init`.
static mut IDT: [Gate; VECTORS] = [Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; VECTORS];

// One 16-byte stub per vector: push a dummy error code where the CPU pushes
// none, push the vector, join the common path, which passes the frame to
// `trap_handler` on a 16-byte aligned stack.
global_asm!(
    ".macro FTG_TRAP_NOERR v",
    ".balign 16",
    "push 0",
    "push \\v",
    "jmp __ftg_trap_common",
    ".endm",
    ".macro FTG_TRAP_ERR v",
    ".balign 16",
    "push \\v",
    "jmp __ftg_trap_common",
    ".endm",
    ".section .text.traps,\"ax\"",
    ".balign 16",
    ".global __ftg_trap_stubs",
    "__ftg_trap_stubs:",
    "FTG_TRAP_NOERR 0",
    "FTG_TRAP_NOERR 1",
    "FTG_TRAP_NOERR 2",
    "FTG_TRAP_NOERR 3",
    "FTG_TRAP_NOERR 4",
    "FTG_TRAP_NOERR 5",
    "FTG_TRAP_NOERR 6",
    "FTG_TRAP_NOERR 7",
    "FTG_TRAP_ERR 8",
    "FTG_TRAP_NOERR 9",
    "FTG_TRAP_ERR 10",
    "FTG_TRAP_ERR 11",
    "FTG_TRAP_ERR 12",
    "FTG_TRAP_ERR 13",
    "FTG_TRAP_ERR 14",
    "FTG_TRAP_NOERR 15",
    "FTG_TRAP_NOERR 16",
    "FTG_TRAP_ERR 17",
    "FTG_TRAP_NOERR 18",
    "FTG_TRAP_NOERR 19",
    "FTG_TRAP_NOERR 20",
    "FTG_TRAP_ERR 21",
    "FTG_TRAP_NOERR 22",
    "FTG_TRAP_NOERR 23",
    "FTG_TRAP_NOERR 24",
    "FTG_TRAP_NOERR 25",
    "FTG_TRAP_NOERR 26",
    "FTG_TRAP_NOERR 27",
    "FTG_TRAP_NOERR 28",
    "FTG_TRAP_ERR 29",
    "FTG_TRAP_ERR 30",
    "FTG_TRAP_NOERR 31",
    ".balign 16",
    "__ftg_trap_common:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    handler = sym trap_handler,
);

extern "C" {
    static __ftg_trap_stubs: u8;
}

/// What the stubs and the CPU leave on the stack.
#[repr(C)]
struct TrapFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Fills and loads the IDT.
///
/// # Safety
/// CPL0, once, with interrupts off.
pub unsafe fn init() {
    let stubs = &raw const __ftg_trap_stubs as u64;
    let idt = (&raw mut IDT).cast::<Gate>();
    for v in 0..VECTORS as u64 {
        let handler = stubs + v * STUB_SIZE;
        let gate = Gate {
            offset_low: handler as u16,
            selector: gdt::KERNEL_CS,
            ist: if v == DOUBLE_FAULT { 1 } else { 0 },
            type_attr: 0x8e, // present, DPL0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: v < VECTORS; the IDT is not loaded yet.
        unsafe { idt.add(v as usize).write(gate) };
    }
    // SAFETY: the table was just filled.
    unsafe { load() }
}

/// Loads the (filled) IDT on this CPU: the BSP's `init` and every AP.
///
/// # Safety
/// CPL0, after `init` ran on the BSP.
pub unsafe fn load() {
    let ptr = DescriptorPointer {
        limit: (VECTORS * core::mem::size_of::<Gate>() - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the table is complete and its gates point at the stubs above.
    unsafe { asm!("lidt [{0}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}

/// Runs at CPL0 (on RSP0 when the fault came from CPL3).
extern "C" fn trap_handler(frame: &TrapFrame) -> ! {
    // A panic at CPL3 already printed its message and used `ud2` to get here.
    if !crate::PANICKED.load(Ordering::Relaxed) {
        let mut line = Line::new();
        line.push_str("ftguest panic: exception ");
        line.push_u64(frame.vector);
        line.push_str(" err=");
        line.push_hex(frame.error);
        line.push_str(" rip=");
        line.push_hex(frame.rip);
        line.push_str(" cs=");
        line.push_hex(frame.cs);
        line.push_str(" rflags=");
        line.push_hex(frame.rflags);
        line.push_str(" rsp=");
        line.push_hex(frame.rsp);
        if frame.vector == PAGE_FAULT {
            let cr2: u64;
            // SAFETY: reading CR2 at CPL0 has no side effects.
            unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
            line.push_str(" cr2=");
            line.push_hex(cr2);
        }
        line.push_str("\n");
        line.emit();
    }
    super::triple_fault()
}
