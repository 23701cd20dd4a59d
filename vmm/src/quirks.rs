//! Workarounds for the PVM hosts this project is developed on, kept in this
//! one place.
//!
//! On those hosts KVM runs guest kernel code (CPL0) under its instruction
//! emulator, which fails (`KVM_EXIT_INTERNAL_ERROR`, suberror 1 =
//! `KVM_INTERNAL_ERROR_EMULATION`) on two instructions a Linux guest uses:
//! - `int3` (the kernel's alternatives self-test): we complete it ourselves,
//!   advancing RIP past it and injecting #BP, which is what the CPU does.
//! - `fwait` (on process exit): with no pending x87 exception it is a no-op;
//!   we skip it.
//!
//! On hardware KVM these exits never happen, so none of this ever runs there.
//! Any other internal error stops the VM with the exit's details and RIP.
//! Both are handled on whichever vCPU they happen.
//!
//! One more workaround is CPUID data and lives with the rest of it, in
//! `arch/x86_64/cpuid.rs`: the KVM paravirtual features that make a
//! hypercall are hidden, because `vmcall` never returns on those hosts.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::vcpu::VmExit;

const OPCODE_INT3: u8 = 0xcc;
const OPCODE_FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;

/// Handles `KVM_EXIT_INTERNAL_ERROR`: completes `int3` or `fwait`, or returns
/// the reason the VM must stop.
pub fn handle_internal_error(fd: &mut VcpuFd, mem: &GuestMemory, id: u8) -> Result<(), VmExit> {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
    // member of the kvm_run union is the one KVM filled in.
    let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
    let fail = |what: String| VmExit::Error(format!("vCPU {id}: KVM_EXIT_INTERNAL_ERROR {what}"));
    let regs = fd
        .get_regs()
        .map_err(|e| fail(format!("(KVM_GET_REGS failed: {e})")))?;
    let detail = || {
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "suberror {} at RIP {:#x}, data {:x?}",
            internal.suberror,
            regs.rip,
            &internal.data[..n]
        )
    };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(fail(detail()));
    }
    let opcode = fd
        .translate_gva(regs.rip)
        .ok()
        .filter(|t| t.valid != 0)
        .and_then(|t| mem.read_obj::<u8>(GuestAddress(t.physical_address)).ok());
    match opcode {
        Some(OPCODE_INT3) => {
            let mut r = regs;
            r.rip += 1;
            fd.set_regs(&r)
                .map_err(|e| fail(format!("(KVM_SET_REGS: {e})")))?;
            let mut events = fd
                .get_vcpu_events()
                .map_err(|e| fail(format!("(KVM_GET_VCPU_EVENTS: {e})")))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            fd.set_vcpu_events(&events)
                .map_err(|e| fail(format!("(KVM_SET_VCPU_EVENTS: {e})")))?;
            log::debug!("vCPU {id}: emulated int3 at {:#x}", regs.rip);
            Ok(())
        }
        Some(OPCODE_FWAIT) => {
            let mut r = regs;
            r.rip += 1;
            fd.set_regs(&r)
                .map_err(|e| fail(format!("(KVM_SET_REGS: {e})")))?;
            log::debug!("vCPU {id}: skipped fwait at {:#x}", regs.rip);
            Ok(())
        }
        Some(op) => Err(fail(format!("{} (opcode byte {op:#04x})", detail()))),
        None => Err(fail(detail())),
    }
}
