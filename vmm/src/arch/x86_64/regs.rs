//! Initial register state of a vCPU for the 64-bit Linux boot protocol: long
//! mode with identity-mapped page tables, a flat GDT, boot MSRs, FPU defaults
//! and the LAPIC's local interrupt lines.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;

/// Errors of vCPU register set-up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write {what} at guest address {addr:#x}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
    /// KVM accepted fewer MSRs than asked.
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs asked for.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

// CR0, CR4 and EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// Page-table entry bits.
const PTE_PRESENT: u64 = 0x1;
const PTE_WRITE: u64 = 0x2;
const PTE_PS: u64 = 0x80;

/// Boot selectors of the Linux 64-bit boot protocol: __BOOT_CS, __BOOT_DS.
pub const BOOT_CS: u16 = 0x10;
/// Data selector.
pub const BOOT_DS: u16 = 0x18;
/// TSS selector of the boot GDT.
pub const BOOT_TSS: u16 = 0x20;

/// Packs a GDT entry from flags, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` for a GDT entry.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if flag(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        unusable: u8::from(flag(47, 1) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and IDT and the identity page tables, and points the
/// sregs at them in 64-bit mode.
pub fn setup_sregs<M: GuestMemoryBackend>(mem: &M, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0, 0, 0),            // unused
        gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
        gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|_| RegsError::GuestMemory {
                what: "boot GDT",
                addr,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestMemory {
            what: "boot IDT",
            addr: BOOT_IDT_START,
        })?;
    setup_page_tables(mem)?;

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(gdt[2], BOOT_CS);
    let data = segment(gdt[3], BOOT_DS);
    let tss = segment(gdt[4], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn setup_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    let w = |what: &'static str, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| RegsError::GuestMemory { what, addr })
    };
    w("PML4", PML4_START, PDPTE_START | PTE_PRESENT | PTE_WRITE)?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        w("PDPT", PDPTE_START + dir * 8, pd | PTE_PRESENT | PTE_WRITE)?;
        for i in 0..512u64 {
            let phys = (dir << 30) | (i << 21);
            w(
                "page directory",
                pd + i * 8,
                phys | PTE_PRESENT | PTE_WRITE | PTE_PS,
            )?;
        }
    }
    Ok(())
}

/// Sets the general registers for the kernel entry: RIP at the entry point,
/// RSI at the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// Sets the x87/SSE control words to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

// MSR indices.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 0x800;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Sets the boot MSRs: syscall MSRs cleared, fast strings on, MTRRs enabled
/// with write-back as the default type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).expect("10 entries fit a kvm_msrs");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// Routes LAPIC LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a PC does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert_eq!(code.l, 1);
        assert_eq!(code.db, 0);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 0x3);
        assert_eq!(data.unusable, 0);
    }

    #[test]
    fn lapic_lint_bits() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0000);
        let v = (lapic_reg(&l, APIC_LVT0) & !0x700) | (APIC_MODE_EXTINT << 8);
        assert_eq!(v, 0x0001_0700);
    }
}
