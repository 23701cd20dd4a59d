//! ftvmm: a KVM micro-VMM whose virtual machines survive the loss of their
//! host. This library holds the VMM proper (configuration, KVM VM and vCPUs,
//! guest memory, boot, device manager, control API, fault tolerance); the
//! binary `ftvmm` is a thin CLI, plus `ftvmm demo`, a client of the roles
//! that lives in the binary (src/demo/).

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod dirty_log;
pub mod ft;
pub mod memory;
pub mod pagemap;
pub mod persist;
pub mod quirks;
pub mod seccomp;
pub mod transcript;
pub mod vcpu;
pub mod vm;

/// The log target of the lines a user of the binary reads as its report
/// (takeover, run summaries, test hooks such as memory checksums): the
/// binary shows them by default, as `ftvmm: <line>`; everything else is
/// diagnostics under `FTVMM_LOG`.
pub const REPORT: &str = "ftvmm::report";
