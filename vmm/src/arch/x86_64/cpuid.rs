//! CPUID for a vCPU: KVM's supported set, filtered the way microVMs do
//! (APIC IDs, logical processor count, hypervisor bit), less the KVM
//! paravirtual features that need a hypercall.
//!
//! On the PVM hosts this project is developed on, `KVM_SET_CPUID2` masks are
//! ignored and the guest sees the host's CPUID; the filtering still matters on
//! hardware KVM.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM paravirtual features whose guest side makes a hypercall, hidden from
/// the guest: PV_UNHALT (bit 7, `KVM_HC_KICK_CPU`), PV_SEND_IPI (bit 11,
/// `KVM_HC_SEND_IPI`) and PV_SCHED_YIELD (bit 13, `KVM_HC_SCHED_YIELD`).
/// On the PVM development hosts `vmcall` never returns, so an SMP Linux
/// guest that sees them hangs at its first IPI (bringing up its second CPU);
/// this leaf, unlike the basic feature bits, is honoured there. Without
/// them Linux sends IPIs through the local APIC and spins on its locks
/// natively, which also works on hardware KVM, at the cost of an exit per
/// IPI destination instead of one per multicast.
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// Adjusts `cpuid` for vCPU `id` of `count`.
pub fn filter(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH size.
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if count > 1 {
                    entry.edx |= EDX_HTT_BIT;
                } else {
                    entry.edx &= !EDX_HTT_BIT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // EDX: x2APIC ID of this processor.
                entry.edx = u32::from(id);
            }
            LEAF_PERFMON => {
                // No PMU for guests.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_KVM_FEATURES => entry.eax &= !KVM_HYPERCALL_FEATURES,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 9,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & EDX_HTT_BIT, 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn kvm_hypercall_features_hidden() {
        let entries = [kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: 0x01ff_ffff,
            ..Default::default()
        }];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter(&mut cpuid, 0, 2);
        let eax = cpuid.as_slice()[0].eax;
        assert_eq!(eax, 0x01ff_ffff & !((1 << 7) | (1 << 11) | (1 << 13)));
        // kvmclock, steal time and PV TLB flush stay.
        assert_ne!(eax & (1 << 3), 0);
        assert_ne!(eax & (1 << 5), 0);
        assert_ne!(eax & (1 << 9), 0);
    }
}
