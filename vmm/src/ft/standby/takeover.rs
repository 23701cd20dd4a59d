//! Failover: the standby restores the last committed checkpoint through the
//! same builder as a boot, announces the guest's MACs, and runs the guest
//! through the same loop as a primary (unprotected until `ctl protect`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::{decode_state, GuestShape, Persist, DEFAULT_STATE_LIMIT};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::super::console::HeldOutput;
use super::super::runner::{Runner, TookOver};
use super::super::{FtError, FtOptions, DEFAULT_INTERVAL};
use super::StandbyOptions;
use crate::config::{KernelSource, NetConfig, VmConfig};
use crate::persist::MachineState;
use crate::vcpu::VmExit;
use crate::vm::Vm;

/// Everything a takeover needs.
pub struct Takeover {
    pub(super) vm: Box<Vm>,
    pub(super) console: Arc<HeldOutput>,
    pub(super) shape: GuestShape,
    pub(super) heartbeat: Duration,
    /// The primary's epoch settings (validated), for a later `ctl protect`.
    pub(super) epochs: ftvmm_checkpoint::EpochPolicy,
    /// The witness the pair decided with, if any, and the VM's id there.
    pub(super) witness: Option<String>,
    pub(super) vm_id: String,
    /// The standby's key (or insecure choice), for a later `ctl protect`.
    pub(super) security: ftvmm_transport::Security,
    /// The committed checkpoint's encoded machine state.
    pub(super) state: Vec<u8>,
    pub(super) epoch: u64,
    pub(super) why: String,
    pub(super) lost_at: Instant,
}

/// Restores the committed checkpoint and runs the guest here, as
/// generation `generation`, through the same loop as a primary (unprotected
/// until `ctl protect` pairs it with a new standby).
pub fn take_over(
    t: Takeover,
    generation: u64,
    api: Option<&crate::api::ApiServer>,
) -> Result<VmExit, FtError> {
    let Takeover {
        mut vm,
        console,
        shape,
        heartbeat,
        epochs,
        witness,
        vm_id,
        security,
        state,
        epoch,
        why,
        lost_at,
    } = t;
    let machine: MachineState = decode_state(&state, DEFAULT_STATE_LIMIT)?;
    vm.restore(&machine)?;
    // Pages written by the apply are not "dirty" for this VM's own future.
    reset_vmm_bitmap(&vm);
    let announce = announce_nics(&vm);
    vm.start()?;
    // The announce thread inherits its filter from the helper that starts it.
    crate::seccomp::within(crate::seccomp::ThreadKind::Announce, || {
        ftvmm_netbuf::announce::spawn_announcer(announce)
    })?;
    let after_loss = lost_at.elapsed();
    log::info!(
        target: crate::REPORT,
        "standby took over from checkpoint {epoch} ({why}); guest running {:.1} ms after the primary was lost",
        after_loss.as_secs_f64() * 1e3
    );
    let mailbox = match api {
        Some(server) => {
            let (mailbox, handler) = crate::api::mailbox()?;
            server.set_handler(handler);
            Some(mailbox)
        }
        None => None,
    };
    let mut ft = FtOptions {
        peer: String::new(),
        interval: DEFAULT_INTERVAL,
        adaptive: None,
        heartbeat,
        generation,
        metrics_path: None,
        fault: None,
        hash_epoch: None,
        disk_sync: ftvmm_checkpoint::DiskSync::default(),
        witness,
        vm_id,
        netbuf: ftvmm_netbuf::NetbufConfig::default(),
        security: Some(security),
        cache_bytes: ftvmm_checkpoint::DEFAULT_CACHE_BYTES,
        // A standby has no --transport: a new standby it pairs with later
        // (`ctl protect`) is reached over TCP.
        transport: ftvmm_transport::Transport::Tcp,
    };
    // Protected again later (`ctl protect`), the guest is checkpointed as
    // its first primary did it. The Hello's settings were validated at
    // pairing; should the adaptive ones still not build, fixed epochs of
    // the given length remain.
    if let Err(e) = ft.adopt_epochs(&epochs) {
        log::warn!(
            "the primary's adaptive epoch settings do not apply here ({e}): fixed epochs of {} ms",
            epochs.interval_ms
        );
    }
    let took_over = TookOver {
        from_epoch: epoch,
        after_loss,
        reason: why,
    };
    Runner::new(*vm, shape, console, ft, mailbox, "standby (took over)")?
        .with_took_over(took_over)
        .run()
}

/// Takeover announce (DESIGN "Standby and failover"): each NIC's transmit
/// sink learns the guest's IPv4 addresses from its traffic, for the
/// gratuitous ARPs that go out, with a RARP per MAC, once the guest runs.
fn announce_nics(vm: &Vm) -> Vec<ftvmm_netbuf::announce::AnnounceNic> {
    use ftvmm_netbuf::announce::{AnnounceNic, LearningSink};
    let mut nics = Vec::new();
    for (i, dev) in vm.devices.net().iter().enumerate() {
        let mac = dev.with_device(|d| d.mac());
        let taps = vm
            .devices
            .net_tap(i)
            .and_then(Result::ok)
            .zip(vm.devices.net_tap(i).and_then(Result::ok));
        let Some((for_sink, for_announce)) = taps else {
            log::warn!("NIC {i}: no second tap handle; no takeover announce");
            continue;
        };
        let (sink, learnt) = LearningSink::new(Box::new(for_sink), mac);
        vm.devices.set_net_sink(i, Box::new(sink));
        nics.push(AnnounceNic {
            wire: Box::new(for_announce),
            mac,
            learnt,
        });
    }
    nics
}

fn reset_vmm_bitmap(vm: &Vm) {
    for region in vm.memory.iter() {
        let bm = std::ops::Deref::deref(region).bitmap();
        let mut scratch = ftvmm_checkpoint::HarvestBuffer::new((region.len() / 4096) as usize);
        let kvm_none = vec![0u64; ((region.len() / 4096) as usize).div_ceil(64)];
        let _ = scratch.harvest(&kvm_none, bm);
    }
}

/// Why a guest's shape does not fit this standby.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// Memory that is not a whole number of MiB.
    #[error("guest memory {0} bytes is not a whole number of MiB")]
    MemoryNotMib(u64),
    /// NICs and --net taps differ in number.
    #[error("the guest has {guest} NICs but this standby was given {here} --net taps")]
    Nics {
        /// The guest's.
        guest: usize,
        /// This standby's.
        here: usize,
    },
    /// Disks and --disk replicas differ in number.
    #[error("the guest has {guest} disks but this standby was given {here} --disk replicas")]
    Disks {
        /// The guest's.
        guest: usize,
        /// This standby's.
        here: usize,
    },
}

/// The VM config a Hello describes, with this host's resources.
pub fn config_for(shape: &GuestShape, opts: &StandbyOptions) -> Result<VmConfig, ShapeError> {
    if !shape.mem_bytes.is_multiple_of(1 << 20) {
        return Err(ShapeError::MemoryNotMib(shape.mem_bytes));
    }
    if shape.devices.nic_macs.len() != opts.net.len() {
        return Err(ShapeError::Nics {
            guest: shape.devices.nic_macs.len(),
            here: opts.net.len(),
        });
    }
    if shape.devices.disks.len() != opts.disks.len() {
        return Err(ShapeError::Disks {
            guest: shape.devices.disks.len(),
            here: opts.disks.len(),
        });
    }
    let net = opts
        .net
        .iter()
        .zip(&shape.devices.nic_macs)
        .map(|(n, mac)| NetConfig {
            tap: n.tap.clone(),
            mac: (*mac != [0; 6]).then_some(crate::config::MacAddr(*mac)),
        })
        .collect();
    Ok(VmConfig {
        kernel: KernelSource::EmbeddedTestGuest,
        initrd: None,
        cmdline: shape.cmdline.clone(),
        mem_mib: shape.mem_bytes >> 20,
        vcpus: shape.vcpus as u8,
        net,
        disks: opts.disks.clone(),
        serial: opts.serial.clone(),
        dirty_ring: false,
    })
}
