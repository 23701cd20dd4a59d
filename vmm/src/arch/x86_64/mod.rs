//! x86_64: guest physical layout, long-mode set-up, CPUID, MSRs, LAPIC and
//! the MP table, and the ioctl numbers the seccomp filters allow.

pub mod cpuid;
pub mod ioctls;
pub mod layout;
pub mod mptable;
pub mod regs;
