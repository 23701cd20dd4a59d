//! The primary: boots the guest, pairs with the standby before the guest
//! runs, and hands the VM to the [`Runner`] loop (docs/design.md "The
//! epoch").

use std::sync::Arc;

use ftvmm_checkpoint::{DevicesSummary, DiskShape, GuestShape};
use ftvmm_netbuf::NetOutput;

use super::console::HeldOutput;
use super::runner::Runner;
use super::{FtError, FtOptions};
use crate::config::VmConfig;
use crate::vcpu::VmExit;
use crate::vm::{open_serial_output, Vm};

/// The guest's shape, as the standby must mirror it (its disks as `vm`
/// opened them).
pub fn shape_of(config: &VmConfig, vm: &Vm) -> GuestShape {
    GuestShape {
        mem_bytes: config.mem_mib << 20,
        vcpus: u32::from(config.vcpus),
        cmdline: config.cmdline.clone(),
        devices: DevicesSummary {
            nic_macs: config
                .net
                .iter()
                .map(|n| n.mac.map(|m| m.0).unwrap_or([0; 6]))
                .collect(),
            disks: vm
                .devices
                .blk()
                .iter()
                .map(|b| {
                    b.with_device(|d| DiskShape {
                        bytes: super::disk::size_of(d.disk()),
                        readonly: d.disk().readonly(),
                    })
                })
                .collect(),
        },
    }
}

/// Boots `config`'s guest and runs it until it ends: protected by the
/// standby at `peer` if given, and with a control API if `mailbox` is given
/// (whose `protect` request can pair it with a standby later).
pub fn run_vm(
    config: &VmConfig,
    ft: &FtOptions,
    peer: Option<&str>,
    mailbox: Option<crate::api::Mailbox>,
) -> Result<VmExit, FtError> {
    let console = HeldOutput::new(open_serial_output(&config.serial)?);
    let vm = Vm::create_with_output(config, console.writer())?;
    vm.boot(config)?;
    let shape = shape_of(config, &vm);
    let mut ft = ft.clone();
    if ft.witness.is_some() {
        // Nothing claimed yet: the pairing claims generation 1.
        ft.generation = 0;
    } else if peer.is_some() {
        log::warn!(
            "no --witness: a network partition between primary and standby can leave two running copies of the guest"
        );
    }
    let mut runner = Runner::new(vm, shape, console, ft, mailbox, "primary")?;
    // Set up: from here on this thread, and every thread it starts (the
    // vCPUs, the pairings' heartbeats and watchers), runs under the
    // primary's seccomp filter.
    crate::seccomp::apply(crate::seccomp::ThreadKind::Primary)?;
    // Before the guest runs: a primary whose standby cannot be reached
    // fails here, with nothing released.
    if let Some(peer) = peer {
        runner.connect(peer)?;
    }
    runner.vm.start()?;
    runner.initial_sync()?;
    runner.run()
}

/// The network output commit (DESIGN "Output commit"): the backend, with
/// each NIC's transmit sink replaced where the backend holds frames itself.
pub(super) fn start_netbuf(vm: &Vm, ft: &FtOptions) -> Result<Arc<dyn NetOutput>, FtError> {
    let taps = (0..vm.devices.net().len())
        .filter_map(|i| vm.devices.net_tap(i))
        .collect::<std::io::Result<Vec<_>>>()?;
    let (netbuf, sinks) = ftvmm_netbuf::create(&ft.netbuf, &taps)?;
    for (i, sink) in sinks.into_iter().enumerate() {
        if let Some(sink) = sink {
            vm.devices.set_net_sink(i, sink);
        }
    }
    Ok(netbuf)
}
