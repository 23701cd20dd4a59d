//! Plain-data state of the whole machine — vCPUs, in-kernel irqchip, PIT,
//! kvmclock and devices — and the KVM calls that capture and restore it.
//!
//! Composed upward: device → device manager → VM. Everything here is
//! serialisable and holds no file descriptors, so it can travel in a
//! checkpoint; state read from the wire is validated on restore.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::device_manager::persist::DevicesState;

/// Errors capturing or restoring machine state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked.
    #[error("{what}: KVM handled {done} of {wanted} MSRs (first missing: {first:#x})")]
    Msrs {
        /// Get or set.
        what: &'static str,
        /// How many were handled.
        done: usize,
        /// How many were asked.
        wanted: usize,
        /// The index of the first one not handled.
        first: u32,
    },
    /// The state does not match the machine it is restored into.
    #[error("state does not fit this VM: {0}")]
    Mismatch(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Kvm { what, source }
}

/// The raw bytes of a plain C struct that kvm-bindings gives no serde or
/// `Clone` for (`kvm_fpu`, `kvm_xsave`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodBytes(pub Vec<u8>);

/// Marker for the KVM structs [`PodBytes`] may hold: plain C structs of
/// integers and arrays, for which every bit pattern is valid.
pub trait Pod: Default {}
impl Pod for kvm_fpu {}
impl Pod for kvm_xsave {}

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is a plain C struct of integers and arrays (the Pod marker is
    // implemented only for such KVM structs), initialised by KVM's GET ioctl
    // wrappers, which zero it first; viewing it as bytes is sound.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

impl PodBytes {
    fn set<T: Pod>(&mut self, v: &T) {
        self.0.clear();
        self.0.extend_from_slice(pod_bytes(v));
    }

    fn of<T: Pod>(v: &T) -> Self {
        PodBytes(pod_bytes(v).to_vec())
    }

    fn get<T: Pod>(&self, what: &str) -> Result<T, PersistError> {
        let size = std::mem::size_of::<T>();
        if self.0.len() != size {
            return Err(PersistError::Mismatch(format!(
                "{what} state is {} bytes, expected {size}",
                self.0.len()
            )));
        }
        let mut v = T::default();
        // SAFETY: the length matches and every bit pattern is a valid T
        // (Pod: integers and arrays only).
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.as_ptr(), (&mut v as *mut T).cast::<u8>(), size)
        };
        Ok(v)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC ID).
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (used when XSAVE is unavailable).
    pub fpu: PodBytes,
    /// Extended state.
    pub xsave: Option<PodBytes>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable that this vCPU answers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// VM-wide in-kernel device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// VM-wide state.
    pub vm: VmState,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
}

/// The MSRs worth saving on this host: those KVM lists that a vCPU answers.
/// Probed once per VM, on a vCPU that has not run yet.
pub fn saveable_msrs(sys: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, PersistError> {
    let list = sys
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits");
        if vcpu.get_msrs(&mut one).unwrap_or(0) == 1 {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// Reusable buffers for capturing a vCPU, so an epoch's capture does not
/// allocate.
#[derive(Debug)]
pub struct VcpuCapture {
    msrs: Msrs,
    has_xsave: bool,
    has_xcrs: bool,
    sync_regs: bool,
}

impl VcpuCapture {
    /// Prepares capture of the MSRs in `msr_indices`; `sync_regs` says the
    /// host offers `KVM_CAP_SYNC_REGS` for registers, sregs and events.
    pub fn new(msr_indices: &[u32], has_xsave: bool, has_xcrs: bool, sync_regs: bool) -> Self {
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        VcpuCapture {
            msrs: Msrs::from_entries(&entries).expect("MSR list fits a kvm_msrs"),
            has_xsave,
            has_xcrs,
            sync_regs,
        }
    }

    /// Whether registers can be read from the `kvm_run` sync area.
    pub fn sync_regs(&self) -> bool {
        self.sync_regs
    }

    /// Captures `vcpu` into `out` (whose buffers are reused).
    ///
    /// With `sync`, the general and segment registers and the vCPU events
    /// come from the `kvm_run` sync area (`KVM_CAP_SYNC_REGS`), which KVM
    /// fills at the end of every `KVM_RUN`: three ioctls fewer in the epoch
    /// pause (each vCPU ioctl costs ≈5 µs on the PVM development hosts). The
    /// caller passes it only when a `KVM_RUN` returned after the last change
    /// of those registers.
    pub fn capture(
        &mut self,
        id: u8,
        vcpu: &VcpuFd,
        sync: Option<&kvm_sync_regs>,
        out: &mut Option<VcpuState>,
    ) -> Result<(), PersistError> {
        let n = vcpu.get_msrs(&mut self.msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let wanted = self.msrs.as_slice().len();
        if n != wanted {
            return Err(PersistError::Msrs {
                what: "KVM_GET_MSRS",
                done: n,
                wanted,
                first: self.msrs.as_slice()[n].index,
            });
        }
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let (regs, sregs, events) = match sync {
            Some(s) => (s.regs, s.sregs, s.events),
            None => (
                vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
                vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
                vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            ),
        };
        // XSAVE covers the legacy FPU area; KVM_GET_FPU only without it.
        let (fpu, xsave) = if self.has_xsave {
            (
                kvm_fpu::default(),
                Some(vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
            )
        } else {
            (vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?, None)
        };
        let xsave = xsave.as_ref();
        let xcrs = if self.has_xcrs {
            Some(vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        match out {
            Some(s) => {
                s.id = id;
                s.regs = regs;
                s.sregs = sregs;
                s.fpu.set(&fpu);
                match (xsave, &mut s.xsave) {
                    (Some(x), Some(buf)) => buf.set(x),
                    (x, buf) => *buf = x.map(PodBytes::of),
                }
                s.xcrs = xcrs;
                s.lapic = lapic;
                s.msrs.clear();
                s.msrs.extend_from_slice(self.msrs.as_slice());
                s.events = events;
                s.mp_state = mp_state;
                s.debugregs = debugregs;
            }
            None => {
                *out = Some(VcpuState {
                    id,
                    regs,
                    sregs,
                    fpu: PodBytes::of(&fpu),
                    xsave: xsave.map(PodBytes::of),
                    xcrs,
                    lapic,
                    msrs: self.msrs.as_slice().to_vec(),
                    events,
                    mp_state,
                    debugregs,
                })
            }
        }
        Ok(())
    }
}

/// Restores `state` into a vCPU that has its CPUID set but has not run.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), PersistError> {
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    match &state.xsave {
        Some(x) => {
            let xsave: kvm_xsave = x.get("XSAVE")?;
            // SAFETY: a kvm_xsave is exactly what KVM_SET_XSAVE reads.
            unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?
        }
        None => vcpu
            .set_fpu(&state.fpu.get::<kvm_fpu>("FPU")?)
            .map_err(kvm("KVM_SET_FPU"))?,
    }
    if let Some(x) = &state.xcrs {
        vcpu.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    if !state.msrs.is_empty() {
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| {
            PersistError::Mismatch(format!("{} MSRs are too many", state.msrs.len()))
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != state.msrs.len() {
            return Err(PersistError::Msrs {
                what: "KVM_SET_MSRS",
                done: n,
                wanted: state.msrs.len(),
                first: state.msrs[n].index,
            });
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

/// Captures the in-kernel irqchip, PIT and kvmclock.
pub fn capture_vm(vm: &VmFd) -> Result<VmState, PersistError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores VM-wide state into a VM whose irqchip and PIT exist.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), PersistError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(PersistError::Mismatch(format!(
                "irqchip id {} where {id} was expected",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
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
