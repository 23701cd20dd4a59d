//! Fault tolerance: the FT roles and what they share (docs/design.md).
//!
//! - [`primary`]: boots the guest, pairs with the standby before it runs.
//! - [`runner`]: the loop of every running VM (a primary, an unprotected VM,
//!   a standby that took over): waits ([`wait`]), runs the epochs, handles
//!   the loss of the standby in one place; its control API is in
//!   [`control`].
//! - [`engine`]: the checkpoint machinery: dirty log, harvest, staging, the
//!   epoch capture under a pause guard, the initial sync's pages.
//! - [`session`]: the primary's link to the standby (pairing, checkpoints,
//!   acks) and [`session::PeerLoss`], every way that link ends.
//! - [`standby`]: receives, verifies and applies checkpoints, and takes over.
//! - [`console`]: output commit of the serial console (the network's is in
//!   the netbuf crate; both drive the same `OutputCommit`).
//! - [`adaptive`]: the adaptive epoch length's controller.
//! - [`metrics`], [`fault`] (fault injection for the tests), [`error`];
//!   [`local`], epochs without a standby (a benchmark's floor).

pub mod adaptive;
pub mod arbiter;
pub mod console;
pub mod control;
pub mod disk;
pub mod engine;
pub mod error;
pub mod fault;
pub mod local;
pub mod metrics;
pub mod primary;
pub mod runner;
pub mod session;
pub mod standby;
pub mod wait;
pub mod witness;

pub use error::FtError;
pub use fault::{die_now, Fault, FaultPoint};

use std::path::PathBuf;
use std::time::Duration;

/// Heartbeat intervals of silence after which the peer is declared lost.
pub const HEARTBEAT_MISSES: u32 = 5;
/// Epoch length when none is given (a standby that took over).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(25);

/// Settings of a protected run.
#[derive(Debug, Clone)]
pub struct FtOptions {
    /// The standby's address.
    pub peer: String,
    /// Epoch length (in adaptive mode: the current one, first the minimum).
    pub interval: Duration,
    /// Adaptive epochs (`--ft-adaptive`): the length varies between
    /// `interval` and a maximum to keep the guest's overhead in a budget.
    pub adaptive: Option<adaptive::AdaptiveConfig>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Protection generation (fencing, I5).
    pub generation: u64,
    /// Where to write one JSON line of metrics per epoch.
    pub metrics_path: Option<PathBuf>,
    /// Fault injection for the kill-at-every-step tests.
    pub fault: Option<Fault>,
    /// Print a checksum of all guest memory at this epoch's cut (tests).
    pub hash_epoch: Option<u64>,
    /// The witness's etcd endpoints (`--witness`), if role changes go
    /// through one.
    pub witness: Option<String>,
    /// The VM's id on the witness.
    pub vm_id: String,
    /// How the disks' replicas are brought equal at pairing.
    pub disk_sync: ftvmm_checkpoint::DiskSync,
    /// Network output commit: backend and memory limit.
    pub netbuf: ftvmm_netbuf::NetbufConfig,
    /// How the checkpoint channel is protected (`--ft-key` or
    /// `--ft-insecure`); `None`: neither was given, so this VM cannot be
    /// protected.
    pub security: Option<ftvmm_transport::Security>,
    /// Bytes of recently sent pages the primary keeps to send them again as
    /// deltas (`--ft-cache-mib`; 0: no deltas).
    pub cache_bytes: u64,
    /// What carries the checkpoints (`--transport`).
    pub transport: ftvmm_transport::Transport,
}

impl FtOptions {
    /// The epoch settings the Hello carries (a standby that takes over
    /// keeps them: [`FtOptions::adopt_epochs`]).
    pub fn epoch_policy(&self) -> ftvmm_checkpoint::EpochPolicy {
        let ms = |d: Duration| d.as_millis().min(u128::from(u32::MAX)) as u32;
        let (interval, max, budget_ppm) = match &self.adaptive {
            Some(a) => (a.min, ms(a.max), (a.budget * 1e6).round() as u32),
            None => (self.interval, 0, 0),
        };
        ftvmm_checkpoint::EpochPolicy {
            interval_ms: ms(interval),
            max_interval_ms: max,
            budget_ppm,
            cache_bytes: self.cache_bytes,
        }
    }

    /// Takes the epoch settings of a validated Hello: the length, the
    /// adaptive bounds and budget (with this host's own write-fault cost),
    /// the page cache.
    pub fn adopt_epochs(
        &mut self,
        p: &ftvmm_checkpoint::EpochPolicy,
    ) -> Result<(), adaptive::AdaptiveError> {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        self.interval = ms(p.interval_ms);
        self.cache_bytes = p.cache_bytes;
        self.adaptive = if p.max_interval_ms == 0 {
            None
        } else {
            let (cost, source) = adaptive::default_fault_cost();
            Some(adaptive::AdaptiveConfig::new(
                ms(p.interval_ms),
                ms(p.max_interval_ms),
                f64::from(p.budget_ppm) / 1e4,
                cost,
                source,
            )?)
        };
        Ok(())
    }
}

/// CRC-32 of all guest RAM, region by region: the memory-equality tests
/// compare the primary's at an epoch's cut with the standby's after it
/// applied that epoch.
pub fn memory_crc(mem: &crate::memory::GuestMemory) -> u32 {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = ((region.len() - off) as usize).min(buf.len());
            let addr = vm_memory::GuestAddress(region.start_addr().0 + off);
            if mem.read_slice(&mut buf[..n], addr).is_err() {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    h.finalize()
}
