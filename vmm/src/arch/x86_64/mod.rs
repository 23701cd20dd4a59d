//! x86_64: guest physical layout, long-mode set-up, CPUID, MSRs, LAPIC and
//! the MP table.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
