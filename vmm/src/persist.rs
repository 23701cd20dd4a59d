//! Save/restore of the whole machine, less its memory: the VM's in-kernel
//! devices (irqchip, PIT, kvmclock), every vCPU and the devices.
//!
//! Composed upward: device → device manager ([`DevicesState`]) → VM
//! ([`MachineState`]), each level through its own [`Persist`] implementation.
//! Everything here is serialisable and holds no file descriptors, so it can
//! travel in a checkpoint; state read from the wire is validated on restore.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use ftvmm_checkpoint::Persist;

use crate::device_manager::persist::{DevicesRestoreError, DevicesState};
use crate::vcpu::persist::{VcpuRestoreError, VcpuSaveError, VcpuState};
use crate::vm::Vm;

/// The VM's in-kernel devices, which KVM emulates and the VM saves as its
/// own.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// The whole machine, less its memory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineState {
    /// The in-kernel devices.
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The VMM's devices.
    pub devices: DevicesState,
}

/// Why the machine's state cannot be saved.
#[derive(Debug, thiserror::Error)]
pub enum VmSaveError {
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuSaveError),
    /// A KVM VM ioctl failed.
    #[error("cannot save the VM's in-kernel devices: {ioctl} failed: {source}")]
    Kvm {
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Why a machine state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VmRestoreError {
    /// The vCPU threads run already.
    #[error("cannot restore a checkpoint into a VM whose vCPUs have started")]
    Started,
    /// Another number of vCPUs.
    #[error("cannot restore a checkpoint of {state} vCPUs into a VM of {vm}")]
    VcpuCount {
        /// vCPUs in the checkpoint.
        state: usize,
        /// vCPUs of this VM.
        vm: usize,
    },
    /// An irqchip slot holds another chip's state.
    #[error(
        "cannot restore the VM's {slot} from the state of irqchip {chip_id} (expected {expected})"
    )]
    Irqchip {
        /// Which slot.
        slot: &'static str,
        /// The chip id in the state.
        chip_id: u32,
        /// The slot's chip id.
        expected: u32,
    },
    /// A KVM VM ioctl failed.
    #[error("cannot restore the VM's in-kernel devices: {ioctl} failed: {source}")]
    Kvm {
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuRestoreError),
    /// The devices.
    #[error(transparent)]
    Devices(#[from] DevicesRestoreError),
}

/// The irqchips: id, name, and the ioctls that get and set them, named with
/// the chip for messages.
const IRQCHIPS: [(u32, &str, &str, &str); 3] = [
    (
        KVM_IRQCHIP_PIC_MASTER,
        "PIC master",
        "KVM_GET_IRQCHIP (PIC master)",
        "KVM_SET_IRQCHIP (PIC master)",
    ),
    (
        KVM_IRQCHIP_PIC_SLAVE,
        "PIC slave",
        "KVM_GET_IRQCHIP (PIC slave)",
        "KVM_SET_IRQCHIP (PIC slave)",
    ),
    (
        KVM_IRQCHIP_IOAPIC,
        "IOAPIC",
        "KVM_GET_IRQCHIP (IOAPIC)",
        "KVM_SET_IRQCHIP (IOAPIC)",
    ),
];

/// Captures the in-kernel irqchip, PIT and kvmclock.
fn save_kernel_devices(vm: &VmFd, out: &mut VmState) -> Result<(), VmSaveError> {
    let kvm = |ioctl| move |source| VmSaveError::Kvm { ioctl, source };
    let chips = [&mut out.pic_master, &mut out.pic_slave, &mut out.ioapic];
    for ((chip_id, _, get, _), chip) in IRQCHIPS.into_iter().zip(chips) {
        *chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(chip).map_err(kvm(get))?;
    }
    out.pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    out.clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    Ok(())
}

/// Restores the in-kernel devices into a VM whose irqchip and PIT exist.
fn restore_kernel_devices(vm: &VmFd, state: &VmState) -> Result<(), VmRestoreError> {
    let chips = [&state.pic_master, &state.pic_slave, &state.ioapic];
    for ((expected, slot, _, _), chip) in IRQCHIPS.into_iter().zip(chips) {
        if chip.chip_id != expected {
            return Err(VmRestoreError::Irqchip {
                slot,
                chip_id: chip.chip_id,
                expected,
            });
        }
    }
    let kvm = |ioctl| move |source| VmRestoreError::Kvm { ioctl, source };
    for ((_, _, _, set), chip) in IRQCHIPS.into_iter().zip(chips) {
        vm.set_irqchip(chip).map_err(kvm(set))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value travels: the flags describe the source host.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

impl Persist for Vm {
    type State = MachineState;
    type SaveError = VmSaveError;
    type RestoreError = VmRestoreError;

    /// Saves the machine, less its memory. Call it with the VM paused by
    /// [`Vm::begin_save`] and its vCPUs parked ([`Vm::finish_save`] does
    /// both), or before the vCPUs started. Once `state`'s vectors have grown,
    /// this allocates nothing.
    fn save_into(&mut self, state: &mut MachineState) -> Result<(), VmSaveError> {
        let MachineState { vm, vcpus, devices } = state;
        // The vCPUs are all started or none is.
        vcpus.resize_with(self.vcpus.len() + self.pending.len(), Default::default);
        let (running, pending) = vcpus.split_at_mut(self.vcpus.len());
        for (v, slot) in self.vcpus.iter().zip(running) {
            v.copy_saved(slot)?;
        }
        for (v, slot) in self.pending.iter_mut().zip(pending) {
            v.save_into(slot)?;
        }
        save_kernel_devices(&self.fd, vm)?;
        let Ok(()) = self.devices.save_into(devices);
        Ok(())
    }

    /// Restores a checkpointed machine into this VM, created through the
    /// same builder as a boot ([`Vm::create`]) and not started, whose memory
    /// already holds the checkpoint's pages: in-kernel devices, every vCPU,
    /// the devices.
    fn restore(&mut self, state: &MachineState) -> Result<(), VmRestoreError> {
        if !self.vcpus.is_empty() {
            return Err(VmRestoreError::Started);
        }
        if state.vcpus.len() != self.pending.len() {
            return Err(VmRestoreError::VcpuCount {
                state: state.vcpus.len(),
                vm: self.pending.len(),
            });
        }
        restore_kernel_devices(&self.fd, &state.vm)?;
        for (v, s) in self.pending.iter_mut().zip(&state.vcpus) {
            v.restore(s)?;
        }
        self.devices.restore(&state.devices)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use ftvmm_checkpoint::persist_roundtrip_tests;
    use ftvmm_checkpoint::test_utils::PersistPair;

    use super::*;
    use crate::config::{DiskConfig, SerialConfig, VmConfig};
    use crate::device_manager::DeviceManager;
    use crate::vcpu::Vcpu;

    const T: Duration = Duration::from_secs(5);
    /// `IA32_TIME_STAMP_COUNTER`: reads the host's TSC plus the vCPU's offset.
    const MSR_IA32_TSC: u32 = 0x10;

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ftvmm-persist-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Two vCPUs, the test guest beating quickly, a disk named `disk`.
    fn config(dir: &TempDir, disk: &str) -> VmConfig {
        let path = dir.0.join(disk);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        VmConfig {
            cmdline: "dirty=64 rounds=2 round_us=500".into(),
            vcpus: 2,
            mem_mib: 32,
            serial: SerialConfig::None,
            disks: vec![DiskConfig {
                path,
                readonly: false,
            }],
            ..Default::default()
        }
    }

    /// A primary whose guest ran a while (its disk driven), then paused with
    /// a save; and a standby machine created from the same configuration with
    /// its own disk, its devices paused.
    struct Machines {
        primary: Vm,
        standby: Vm,
        _dir: TempDir,
    }

    fn machines(tag: &str) -> Machines {
        let dir = TempDir::new(tag);
        let mut primary = Vm::build(&config(&dir, "primary.img")).unwrap();
        primary.start().unwrap();
        assert!(primary
            .wait_exit(Some(Duration::from_millis(300)))
            .is_none());
        let saved = primary.pause_and_save(T).unwrap();
        assert!(
            saved.devices.blk[0].transport.activated,
            "the guest never set its disk up"
        );
        let standby = Vm::create(&config(&dir, "standby.img")).unwrap();
        standby.pause(T).unwrap();
        Machines {
            primary,
            standby,
            _dir: dir,
        }
    }

    /// Host time runs on between two saves: the TSC MSR.
    fn normalize_vcpu(state: &mut VcpuState) {
        for msr in &mut state.msrs {
            if msr.index == MSR_IA32_TSC {
                msr.data = 0;
            }
        }
    }

    /// The disk file is a host resource: each machine names its own.
    fn normalize_devices(state: &mut DevicesState) {
        for blk in &mut state.blk {
            blk.device.path.clear();
        }
    }

    struct Vcpus(Machines);

    impl PersistPair for Vcpus {
        type Component = Vcpu;

        /// vCPU 1 of a booted machine (set up for the 64-bit entry, not run)
        /// and of a created one.
        fn pair(&mut self) -> (&mut Vcpu, &mut Vcpu) {
            (
                &mut self.0.primary.pending[1],
                &mut self.0.standby.pending[1],
            )
        }

        fn normalize(state: &mut VcpuState) {
            normalize_vcpu(state);
        }
    }

    fn booted_vcpus() -> Vcpus {
        let dir = TempDir::new("vcpu");
        let primary = Vm::build(&config(&dir, "primary.img")).unwrap();
        let standby = Vm::create(&config(&dir, "standby.img")).unwrap();
        Vcpus(Machines {
            primary,
            standby,
            _dir: dir,
        })
    }

    struct Devices(Machines);

    impl PersistPair for Devices {
        type Component = DeviceManager;

        fn pair(&mut self) -> (&mut DeviceManager, &mut DeviceManager) {
            (&mut self.0.primary.devices, &mut self.0.standby.devices)
        }

        fn normalize(state: &mut DevicesState) {
            normalize_devices(state);
        }
    }

    struct Machine(Machines);

    impl PersistPair for Machine {
        type Component = Vm;

        fn pair(&mut self) -> (&mut Vm, &mut Vm) {
            (&mut self.0.primary, &mut self.0.standby)
        }

        /// Host time: kvmclock, when the PIT's counters were loaded, the TSCs.
        fn normalize(state: &mut MachineState) {
            state.vm.clock = Default::default();
            for ch in &mut state.vm.pit.channels {
                ch.count_load_time = 0;
            }
            state.vcpus.iter_mut().for_each(normalize_vcpu);
            normalize_devices(&mut state.devices);
        }
    }

    persist_roundtrip_tests! {
        vcpu: booted_vcpus();
        device_manager: Devices(machines("devices"));
        vm: Machine(machines("vm"));
    }
}
