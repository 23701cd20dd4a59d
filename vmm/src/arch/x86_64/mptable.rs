//! The Intel MultiProcessor Specification 1.4 table: without one Linux scans
//! for it at length (seconds under emulation) and brings up only one CPU.
//!
//! Layout written at [`EBDA_START`]: the 16-byte floating pointer, then the
//! configuration table with one processor entry per vCPU, the ISA bus, the
//! IOAPIC, one interrupt source per ISA IRQ and the two local interrupt lines.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// Most vCPUs the table can describe (APIC IDs are 8 bits and one ID goes to
/// the IOAPIC).
pub const MAX_VCPUS: u8 = 254;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// More vCPUs than the table can describe.
    #[error("the MP table can describe at most {MAX_VCPUS} vCPUs, not {0}")]
    TooManyVcpus(u8),
    /// No vCPU at all.
    #[error("the MP table needs at least one vCPU")]
    NoVcpus,
    /// The table does not fit guest memory.
    #[error("cannot write the MP table at guest address {0:#x}")]
    GuestMemory(u64),
}

const MPC_SPEC: u8 = 4;
const MPC_APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table's bytes (header and entries) for `vcpus`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for id in 0..vcpus {
        entries.push(0u8); // MP_PROCESSOR
        entries.push(id);
        entries.push(MPC_APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    // MP_BUS: bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    // MP_IOAPIC.
    let ioapic_id = vcpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    // MP_INTSRC: ISA IRQ i → IOAPIC pin i (IRQ 0 is ExtINT from the PIC).
    for irq in 0..ISA_IRQS {
        let kind = if irq == 0 { MP_IRQ_EXTINT } else { MP_IRQ_INT };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // MP_LINTSRC: ExtINT on LINT0, NMI on LINT1, all local APICs.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);

    let count = u16::from(vcpus) + 1 + 1 + u16::from(ISA_IRQS) + 2;
    let len = 44 + entries.len();
    let mut table = Vec::with_capacity(len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"FTVMM   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the MP floating pointer and configuration table for `vcpus`.
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<(), MpTableError> {
    if vcpus == 0 {
        return Err(MpTableError::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyVcpus(vcpus));
    }
    let table_addr = EBDA_START + 16;
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MPC_SPEC;
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(EBDA_START))
        .map_err(|_| MpTableError::GuestMemory(EBDA_START))?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))
        .map_err(|_| MpTableError::GuestMemory(table_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mem = vm_memory::GuestMemoryMmap<()>;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn table_checksums_and_counts() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table = config_table(4);
        assert_eq!(sum(&table), 0);
        assert_eq!(
            u16::from_le_bytes([table[4], table[5]]) as usize,
            table.len()
        );
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 4 + 2 + 16 + 2);
        // The first processor entry is the BSP.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(table[64 + 3], CPU_ENABLED);
    }

    #[test]
    fn limits() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup_mptable(&mem, 0), Err(MpTableError::NoVcpus));
        assert_eq!(
            setup_mptable(&mem, 255),
            Err(MpTableError::TooManyVcpus(255))
        );
        setup_mptable(&mem, MAX_VCPUS).unwrap();
    }
}
