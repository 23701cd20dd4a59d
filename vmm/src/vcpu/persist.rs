//! Save/restore of a vCPU: everything KVM holds for it, as plain data, and
//! the KVM calls that capture and restore it.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_sync_regs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use ftvmm_checkpoint::Persist;

use super::Vcpu;

/// Words in the XSAVE area KVM_GET_XSAVE returns (`kvm_xsave.region`).
pub const XSAVE_WORDS: usize = 1024;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC ID).
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub fpu: FpuState,
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

/// Field by field, so that `clone_from` reuses the vectors' buffers: the
/// epoch's copy of a vCPU's saved state does not allocate.
impl Clone for VcpuState {
    fn clone(&self) -> Self {
        let mut s = VcpuState::default();
        s.clone_from(self);
        s
    }

    fn clone_from(&mut self, src: &Self) {
        let VcpuState {
            id,
            regs,
            sregs,
            fpu,
            xcrs,
            lapic,
            msrs,
            events,
            mp_state,
            debugregs,
        } = src;
        self.id = *id;
        self.regs = *regs;
        self.sregs = *sregs;
        self.fpu.clone_from(fpu);
        self.xcrs = *xcrs;
        self.lapic = *lapic;
        self.msrs.clone_from(msrs);
        self.events = *events;
        self.mp_state = *mp_state;
        self.debugregs = *debugregs;
    }
}

/// The FPU and vector state, in whichever form the host saves it.
// The legacy form inline (416 bytes, in a state of several KiB) keeps its
// saves free of allocation; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area (`kvm_xsave.region`, [`XSAVE_WORDS`] words), which
    /// covers the legacy FPU and SSE state too.
    Xsave(Vec<u32>),
    /// Legacy FPU and SSE registers, on hosts without XSAVE.
    Legacy(#[serde(with = "KvmFpuDef")] kvm_fpu),
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState::Xsave(Vec::new())
    }
}

impl Clone for FpuState {
    fn clone(&self) -> Self {
        match self {
            FpuState::Xsave(x) => FpuState::Xsave(x.clone()),
            FpuState::Legacy(f) => FpuState::Legacy(*f),
        }
    }

    fn clone_from(&mut self, src: &Self) {
        match (self, src) {
            (FpuState::Xsave(a), FpuState::Xsave(b)) => a.clone_from(b),
            (this, src) => *this = src.clone(),
        }
    }
}

/// serde for kvm-bindings' `kvm_fpu`, which has none (every field, padding
/// included, is a plain integer or array).
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct KvmFpuDef {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// Why a vCPU's state cannot be saved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VcpuSaveError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot save vCPU {id}: {ioctl} failed: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM read fewer MSRs than asked.
    #[error("cannot save vCPU {id}: KVM_GET_MSRS read {done} of {wanted} MSRs (first missing: {first:#x})")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were read.
        done: usize,
        /// How many were asked.
        wanted: usize,
        /// The index of the first one not read.
        first: u32,
    },
    /// Completing a pending I/O exit ran the guest instead.
    #[error("cannot save vCPU {id}: KVM_RUN with immediate_exit set, to complete a pending I/O exit, ran the guest")]
    RanGuest {
        /// vCPU index.
        id: u8,
    },
    /// The vCPU's thread saved nothing at this pause (the VM was paused
    /// without saving, or has run since).
    #[error("cannot save vCPU {id}: its thread saved no state at this pause (pause the VM with Vm::begin_save first)")]
    NotSaved {
        /// vCPU index.
        id: u8,
    },
}

/// Why a vCPU state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRestoreError {
    /// The state belongs to another vCPU.
    #[error("cannot restore vCPU {id} from the state of vCPU {state_id}")]
    Id {
        /// vCPU index.
        id: u8,
        /// The index in the state.
        state_id: u8,
    },
    /// The XSAVE area has the wrong size.
    #[error("cannot restore vCPU {id}: its XSAVE area holds {len} 32-bit words, KVM_SET_XSAVE takes {XSAVE_WORDS}")]
    Xsave {
        /// vCPU index.
        id: u8,
        /// Words in the state.
        len: usize,
    },
    /// More MSRs than one `kvm_msrs` carries.
    #[error(
        "cannot restore vCPU {id}: its state holds {count} MSRs, more than KVM_SET_MSRS takes"
    )]
    TooManyMsrs {
        /// vCPU index.
        id: u8,
        /// MSRs in the state.
        count: usize,
    },
    /// A KVM vCPU ioctl failed.
    #[error("cannot restore vCPU {id}: {ioctl} failed: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        ioctl: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM wrote fewer MSRs than asked.
    #[error("cannot restore vCPU {id}: KVM_SET_MSRS wrote {done} of {wanted} MSRs (first refused: {first:#x})")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were written.
        done: usize,
        /// How many were asked.
        wanted: usize,
        /// The index of the first one refused.
        first: u32,
    },
}

/// The MSRs worth saving on this host: those KVM lists that a vCPU answers.
/// Probed once per VM, on a vCPU that has not run yet.
pub fn saveable_msrs(sys: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let list = sys.get_msr_index_list()?;
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

/// What capturing a vCPU needs besides the vCPU: the MSR buffer (allocated
/// once, so an epoch's capture does not allocate) and what the host offers.
#[derive(Debug)]
pub struct VcpuCapture {
    msrs: Msrs,
    has_xsave: bool,
    has_xcrs: bool,
    sync_regs: bool,
    /// The MP state the previous capture read.
    last_mp_state: u32,
}

/// A vCPU that runs guest code or waits in `hlt`, as opposed to one waiting
/// for (or in the middle of receiving) INIT and SIPI.
fn running(mp_state: u32) -> bool {
    mp_state == KVM_MP_STATE_RUNNABLE || mp_state == KVM_MP_STATE_HALTED
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
            last_mp_state: KVM_MP_STATE_UNINITIALIZED,
        }
    }

    /// Whether registers can be read from the `kvm_run` sync area.
    pub fn sync_regs(&self) -> bool {
        self.sync_regs
    }

    /// Captures vCPU `id` into `out`, reusing its buffers.
    ///
    /// With `sync`, the general and segment registers and the vCPU events
    /// come from the `kvm_run` sync area (`KVM_CAP_SYNC_REGS`), which KVM
    /// fills at the end of every `KVM_RUN`: three ioctls fewer in the epoch
    /// pause (each vCPU ioctl costs ≈5 µs on the PVM development hosts). The
    /// caller passes it only when a `KVM_RUN` returned after the last change
    /// of those registers. It is used only for a vCPU that was running (or
    /// halted) at the previous capture and still is: `KVM_GET_MP_STATE` first
    /// delivers a pending INIT or SIPI — an application processor the guest
    /// is starting just at the cut — which resets the registers or points
    /// them at the SIPI's page after the sync area was filled. (Not covered:
    /// INIT and SIPI both pending at the cut for a vCPU that was running or
    /// halted at the previous one, i.e. a CPU the guest offlined and starts
    /// again within one epoch; Linux starts each AP once from
    /// `KVM_MP_STATE_UNINITIALIZED` unless CPUs are hot-plugged.)
    fn capture(
        &mut self,
        id: u8,
        vcpu: &VcpuFd,
        sync: Option<&kvm_sync_regs>,
        out: &mut VcpuState,
    ) -> Result<(), VcpuSaveError> {
        let kvm = |ioctl| move |source| VcpuSaveError::Kvm { id, ioctl, source };
        let n = vcpu.get_msrs(&mut self.msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let wanted = self.msrs.as_slice().len();
        if n != wanted {
            return Err(VcpuSaveError::Msrs {
                id,
                done: n,
                wanted,
                first: self.msrs.as_slice()[n].index,
            });
        }
        out.mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let was_running = running(self.last_mp_state);
        self.last_mp_state = out.mp_state.mp_state;
        let sync = sync.filter(|_| was_running && running(out.mp_state.mp_state));
        (out.regs, out.sregs, out.events) = match sync {
            Some(s) => (s.regs, s.sregs, s.events),
            None => (
                vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
                vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
                vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            ),
        };
        // XSAVE covers the legacy FPU area; KVM_GET_FPU only without it.
        if self.has_xsave {
            let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
            match &mut out.fpu {
                FpuState::Xsave(words) => {
                    words.clear();
                    words.extend_from_slice(&xsave.region);
                }
                other => *other = FpuState::Xsave(xsave.region.to_vec()),
            }
        } else {
            out.fpu = FpuState::Legacy(vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?);
        }
        out.xcrs = if self.has_xcrs {
            Some(vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?)
        } else {
            None
        };
        out.lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        out.debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        out.id = id;
        out.msrs.clear();
        out.msrs.extend_from_slice(self.msrs.as_slice());
        Ok(())
    }
}

/// The FPU state in the form its KVM call takes.
// A stack temporary of one restore: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Fpu<'a> {
    Xsave(kvm_xsave),
    Legacy(&'a kvm_fpu),
}

impl Persist for Vcpu {
    type State = VcpuState;
    type SaveError = VcpuSaveError;
    type RestoreError = VcpuRestoreError;

    /// Captures this vCPU, out of `KVM_RUN`, after letting KVM complete an
    /// I/O instruction whose exit we handled but which it has not retired
    /// yet (its effects would otherwise be half in the state). Runs on the
    /// vCPU's own thread once it started (a saving pause), on the
    /// controller's before.
    fn save_into(&mut self, state: &mut VcpuState) -> Result<(), VcpuSaveError> {
        let id = self.id;
        if self.io_pending {
            self.fd.set_kvm_immediate_exit(1);
            let r = self.fd.run().map(|_| ());
            self.fd.set_kvm_immediate_exit(0);
            match r {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(()) => return Err(VcpuSaveError::RanGuest { id }),
                Err(source) => {
                    return Err(VcpuSaveError::Kvm {
                        id,
                        ioctl: "KVM_RUN (completing a pending I/O exit)",
                        source,
                    })
                }
            }
            self.io_pending = false;
            self.synced = true;
        }
        let sync = (self.capture.sync_regs() && self.synced).then(|| self.fd.sync_regs());
        self.capture.capture(id, &self.fd, sync.as_ref(), state)
    }

    /// Restores `state` into this vCPU, which has its CPUID set and has not
    /// run.
    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuRestoreError> {
        let id = self.id;
        if state.id != id {
            return Err(VcpuRestoreError::Id {
                id,
                state_id: state.id,
            });
        }
        // Check what KVM cannot before changing anything.
        let fpu = match &state.fpu {
            FpuState::Xsave(words) => {
                if words.len() != XSAVE_WORDS {
                    return Err(VcpuRestoreError::Xsave {
                        id,
                        len: words.len(),
                    });
                }
                let mut xsave = kvm_xsave::default();
                xsave.region.copy_from_slice(words);
                Fpu::Xsave(xsave)
            }
            FpuState::Legacy(f) => Fpu::Legacy(f),
        };
        let msrs = if state.msrs.is_empty() {
            None
        } else {
            Some(
                Msrs::from_entries(&state.msrs).map_err(|_| VcpuRestoreError::TooManyMsrs {
                    id,
                    count: state.msrs.len(),
                })?,
            )
        };
        let kvm = |ioctl| move |source| VcpuRestoreError::Kvm { id, ioctl, source };
        let vcpu = &self.fd;
        vcpu.set_mp_state(state.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        match &fpu {
            // SAFETY: KVM_SET_XSAVE reads more than the 4 KiB of a kvm_xsave
            // only for XSTATE components enabled dynamically, which needs an
            // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) this process never makes;
            // `x` is a whole kvm_xsave.
            Fpu::Xsave(x) => unsafe { vcpu.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?,
            Fpu::Legacy(f) => vcpu.set_fpu(f).map_err(kvm("KVM_SET_FPU"))?,
        }
        if let Some(x) = &state.xcrs {
            vcpu.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        if let Some(msrs) = &msrs {
            let n = vcpu.set_msrs(msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if n != state.msrs.len() {
                return Err(VcpuRestoreError::Msrs {
                    id,
                    done: n,
                    wanted: state.msrs.len(),
                    first: state.msrs[n].index,
                });
            }
        }
        vcpu.set_vcpu_events(&state.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        // Nothing is pending, and the sync area holds nothing of the new
        // state until the next KVM_RUN.
        self.io_pending = false;
        self.synced = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{
        kvm_mp_state, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED,
        KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    };

    use ftvmm_checkpoint::Persist;

    use crate::config::{SerialConfig, VmConfig};
    use crate::vm::Vm;

    /// An application processor whose SIPI is pending when a pause takes it
    /// out of `KVM_RUN` (a guest starting it just then): `KVM_GET_MP_STATE`
    /// delivers the SIPI, so the saved registers must be read after it, not
    /// taken from the sync area that `KVM_RUN` filled before.
    #[test]
    fn an_ap_started_at_the_cut_is_saved_at_its_sipi_vector() {
        let config = VmConfig {
            vcpus: 2,
            mem_mib: 32,
            serial: SerialConfig::None,
            ..Default::default()
        };
        let mut vm = Vm::build(&config).unwrap();
        let ap = &mut vm.pending[1];
        if !ap.capture.sync_regs() {
            println!(
                "SKIP an_ap_started_at_the_cut_is_saved_at_its_sipi_vector: no KVM_CAP_SYNC_REGS"
            );
            return;
        }
        // INIT received, SIPI to page 0x9a pending.
        let mut events = ap.fd.get_vcpu_events().unwrap();
        events.flags = KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        events.sipi_vector = 0x9a;
        ap.fd.set_vcpu_events(&events).unwrap();
        ap.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_SIPI_RECEIVED,
            })
            .unwrap();
        // A KVM_RUN that a pause's kick ends at once: it fills the sync
        // area with the registers of before the SIPI.
        ap.fd.set_kvm_immediate_exit(1);
        let r = ap.fd.run().map(|_| ()).map_err(|e| e.errno());
        ap.fd.set_kvm_immediate_exit(0);
        assert_eq!(r, Err(libc::EINTR), "KVM_RUN with immediate_exit");
        ap.synced = true;
        let saved = ap.save().unwrap();
        assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
        assert_eq!(saved.sregs.cs.selector, 0x9a00);
        assert_eq!(saved.sregs.cs.base, 0x9a000);
        assert_eq!(saved.regs.rip, 0);
    }
}
