//! Building a VM from its configuration and running it: KVM VM with in-kernel
//! irqchip and PIT, guest memory, the loaded guest, legacy devices and vCPU
//! threads; pausing and resuming all vCPUs; waiting for the guest to end.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use ftvmm_checkpoint::Persist;
use ftvmm_devices::bus::Bus;
use ftvmm_devices::legacy::SerialOutput;

use crate::arch::x86_64::{cpuid, layout, mptable, regs};
use crate::boot::{self, BootError};
use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::dirty_log::{self, DirtyLogError, DirtyRing};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::persist::{MachineState, VmSaveError};
use crate::vcpu::persist::{saveable_msrs, VcpuCapture};
use crate::vcpu::{ExitSignal, ParkGate, Vcpu, VcpuError, VcpuHandle, VmExit};

/// Path of the KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Errors building or controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open {KVM_DEVICE}: {0}{hint}", hint = kvm_hint(.0))]
    KvmOpen(std::io::Error),
    /// A KVM VM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Invalid vCPU count.
    #[error("--vcpus {asked} is invalid: it must be between 1 and {max} (KVM allows {kvm_max} on this host, the MP table {mp_max})")]
    VcpuCount {
        /// vCPUs asked for.
        asked: u64,
        /// The effective maximum.
        max: u64,
        /// KVM's maximum.
        kvm_max: u64,
        /// The MP table's maximum.
        mp_max: u64,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Register set-up.
    #[error("vCPU {id}: {source}")]
    Regs {
        /// vCPU index.
        id: u8,
        /// What failed.
        source: regs::RegsError,
    },
    /// vCPU control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The console output file.
    #[error("cannot open serial output file '{path}': {source}")]
    SerialFile {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An eventfd or other host resource could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Saving the machine's state.
    #[error(transparent)]
    Save(#[from] VmSaveError),
    /// Dirty tracking set-up.
    #[error("dirty tracking: {0}")]
    DirtyTrack(#[from] DirtyLogError),
    /// The devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
}

fn kvm_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => " (is the kvm module loaded? this host needs KVM)",
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (permission denied: run as root or join the kvm group)"
        }
        _ => "",
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens the console output the configuration names.
pub fn open_serial_output(cfg: &SerialConfig) -> Result<SerialOutput, VmError> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File(path) => {
            Box::new(File::create(path).map_err(|source| VmError::SerialFile {
                path: path.display().to_string(),
                source,
            })?)
        }
    })
}

/// A built VM.
pub struct Vm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The KVM VM.
    pub fd: Arc<VmFd>,
    /// Guest memory.
    pub memory: GuestMemory,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    /// vCPUs whose threads have not started (a VM just built or restored).
    pub(crate) pending: Vec<Vcpu>,
    dirty_rings: Vec<DirtyRing>,
    ring_full: Arc<EventFd>,
    /// vCPUs whose threads run.
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// What parked vCPU threads sleep on: opened once to resume them all.
    gate: Arc<ParkGate>,
    /// The state [`Vm::finish_save`] saves into, kept from epoch to epoch.
    state: MachineState,
    /// The devices.
    pub devices: DeviceManager,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &(self.pending.len() + self.vcpus.len()))
            .finish_non_exhaustive()
    }
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| VmError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))
}

/// Checks the vCPU count against KVM and the MP table.
pub fn validate_vcpus(kvm: &Kvm, asked: u64) -> Result<u8, VmError> {
    let kvm_max = kvm.get_max_vcpus() as u64;
    let mp_max = u64::from(mptable::MAX_VCPUS);
    let max = kvm_max.min(mp_max);
    if asked == 0 || asked > max {
        return Err(VmError::VcpuCount {
            asked,
            max,
            kvm_max,
            mp_max,
        });
    }
    Ok(asked as u8)
}

impl Vm {
    /// Builds a VM ready to boot `config`'s guest: vCPUs are created and set
    /// up for the 64-bit entry, but their threads are not started yet.
    pub fn build(config: &VmConfig) -> Result<Vm, VmError> {
        let vm = Vm::create(config)?;
        vm.boot(config)?;
        Ok(vm)
    }

    /// Creates the machine `config` describes — KVM VM, irqchip, PIT,
    /// memory, devices and vCPUs — without loading a guest: the common part
    /// of a boot ([`Vm::boot`]) and of a restore from a checkpoint
    /// ([`Persist::restore`]).
    pub fn create(config: &VmConfig) -> Result<Vm, VmError> {
        let out = open_serial_output(&config.serial)?;
        Vm::create_with_output(config, out)
    }

    /// [`Vm::create`] with the console output given instead of opened from
    /// the configuration (a protected VM's console goes through its held
    /// output buffer).
    pub fn create_with_output(config: &VmConfig, serial_out: SerialOutput) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        let vcpu_count = validate_vcpus(&kvm, u64::from(config.vcpus))?;
        let memory = memory::create(config.mem_mib)?;

        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Needed on Intel hosts for real-mode emulation; harmless elsewhere.
        if let Err(e) = fd.set_tss_address(layout::KVM_TSS_ADDRESS) {
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        memory::register_slots(&fd, &memory, false)?;
        // The dirty ring must be on before the first vCPU exists.
        let ring_entries = if config.dirty_ring {
            Some(dirty_log::enable_dirty_ring(
                &fd,
                dirty_log::DIRTY_RING_ENTRIES,
            )?)
        } else {
            None
        };
        let ring_full =
            Arc::new(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Host {
                    what: "ring-full eventfd",
                    source,
                })?,
            );
        let mut dirty_rings = Vec::new();

        let host = |what| move |source| VmError::Host { what, source };
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host("reset eventfd"))?;
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        let devices = DeviceManager::new(
            config,
            &fd,
            &memory,
            serial_out,
            &reset_evt,
            (&mut pio, &mut mmio),
        )?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let exit = Arc::new(ExitSignal::new().map_err(host("exit eventfd"))?);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let has_xsave = kvm.check_extension(Cap::Xsave);
        let has_xcrs = kvm.check_extension(Cap::Xcrs);
        // REGS | SREGS | EVENTS.
        let sync_regs = fd.check_extension_int(Cap::SyncRegs) & 0x7 == 0x7;
        let mut pending = Vec::with_capacity(vcpu_count as usize);
        let mut msr_indices = None;
        let gate = Arc::new(ParkGate::new());
        for id in 0..vcpu_count {
            let vfd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::filter(&mut cpuid, id, vcpu_count);
            vfd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if msr_indices.is_none() {
                msr_indices =
                    Some(saveable_msrs(&kvm, &vfd).map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?);
            }
            let capture = VcpuCapture::new(
                msr_indices.as_deref().unwrap_or(&[]),
                has_xsave,
                has_xcrs,
                sync_regs,
            );
            if let Some(entries) = ring_entries {
                dirty_rings.push(DirtyRing::map(&vfd, id, entries)?);
            }
            let mut vcpu = Vcpu::new(
                id,
                vfd,
                (pio.clone(), mmio.clone()),
                memory.clone(),
                exit.clone(),
                capture,
            )?;
            vcpu.set_ring_full_signal(ring_full.clone());
            vcpu.set_park_gate(gate.clone());
            pending.push(vcpu);
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            pio,
            mmio,
            exit,
            reset_evt,
            pending,
            vcpus: Vec::new(),
            gate,
            state: MachineState::default(),
            devices,
            dirty_rings,
            ring_full,
        })
    }

    /// The vCPUs' dirty rings (`--dirty-track ring`), handed to the
    /// checkpoint engine, their one reader.
    pub fn take_dirty_rings(&mut self) -> Vec<DirtyRing> {
        std::mem::take(&mut self.dirty_rings)
    }

    /// Readable when a vCPU stopped because its dirty ring is full: the
    /// epoch driver harvests (which resets the rings) at once.
    pub fn ring_full_event(&self) -> &EventFd {
        &self.ring_full
    }

    /// Loads `config`'s kernel, initrd and command line and sets the boot
    /// vCPU up for the 64-bit entry.
    ///
    /// The other vCPUs (application processors) get only their MSRs and
    /// LAPIC lines: with the in-kernel irqchip KVM creates them in
    /// `KVM_MP_STATE_UNINITIALIZED`, where `KVM_RUN` waits until the guest
    /// starts them with INIT-SIPI-SIPI through its local APIC, and INIT
    /// resets their registers anyway (to real mode at the SIPI's vector).
    pub fn boot(&self, config: &VmConfig) -> Result<(), VmError> {
        let boot = boot::load(
            &self.memory,
            &config.kernel,
            config.initrd.as_deref(),
            &self.devices.kernel_cmdline(&config.cmdline),
            self.pending.len() as u8,
        )?;
        for v in &self.pending {
            let id = v.id;
            let r = |source| VmError::Regs { id, source };
            regs::setup_msrs(&v.fd).map_err(r)?;
            if id == 0 {
                regs::setup_regs(&v.fd, boot.entry).map_err(r)?;
                regs::setup_sregs(&self.memory, &v.fd).map_err(r)?;
                regs::setup_fpu(&v.fd).map_err(r)?;
            }
            regs::setup_lint(&v.fd).map_err(r)?;
        }
        Ok(())
    }

    /// Pauses every vCPU and device and saves the whole machine's state
    /// into `self`'s reusable state; returns it borrowed. The VM stays
    /// paused until [`Vm::resume`].
    pub fn pause_and_save(&mut self, timeout: Duration) -> Result<&MachineState, VmError> {
        self.begin_save(timeout)?;
        self.finish_save(timeout)
    }

    /// First half of [`Vm::pause_and_save`]: every vCPU is out of `KVM_RUN`
    /// and every device is quiesced when this returns, so guest memory no
    /// longer changes; the vCPU threads are still saving their registers.
    pub fn begin_save(&mut self, timeout: Duration) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request_pause(true);
        }
        let deadline = Instant::now() + timeout;
        for v in &self.vcpus {
            v.wait_stopped(deadline, timeout)?;
        }
        self.devices.pause_devices(timeout)?;
        Ok(())
    }

    /// Second half of [`Vm::pause_and_save`]: waits for the vCPU threads to
    /// have saved their state, then saves the machine ([`Persist::save_into`])
    /// into `self`'s reusable state, without allocating once it has grown.
    pub fn finish_save(&mut self, timeout: Duration) -> Result<&MachineState, VmError> {
        let deadline = Instant::now() + timeout;
        for v in &self.vcpus {
            v.wait_parked(deadline, timeout)?;
        }
        let mut state = std::mem::take(&mut self.state);
        let saved = self.save_into(&mut state);
        self.state = state;
        saved?;
        Ok(&self.state)
    }

    /// Starts every vCPU thread.
    pub fn start(&mut self) -> Result<(), VmError> {
        crate::vcpu::install_kick_handler()?;
        for vcpu in self.pending.drain(..) {
            self.vcpus.push(vcpu.start()?);
        }
        Ok(())
    }

    /// Stops every vCPU out of `KVM_RUN` and waits, at most `timeout`, until
    /// all of them acknowledged. On error the vCPUs that did pause stay
    /// paused; call [`Vm::resume`] to go on.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request_pause(false);
        }
        let deadline = Instant::now() + timeout;
        for v in &self.vcpus {
            v.wait_parked(deadline, timeout)?;
        }
        self.devices
            .pause_devices(deadline.saturating_duration_since(Instant::now()))?;
        Ok(())
    }

    /// Lets every vCPU and device run again: every vCPU's request is set
    /// first, then one wake-up of the VM's gate starts them all (woken one
    /// by one, each could preempt this thread before it woke the next).
    /// Returns the instant of that wake-up: the end of the guest's pause.
    pub fn resume(&self) -> Instant {
        self.devices.resume_devices();
        for v in &self.vcpus {
            v.set_run();
        }
        let now = Instant::now();
        self.gate.open();
        now
    }

    /// The eventfds that become readable when the VM ends: the exit signal
    /// (vCPU-detected) and the i8042 reset.
    pub fn exit_fds(&self) -> [&EventFd; 2] {
        [self.exit.eventfd(), &self.reset_evt]
    }

    /// Why the VM ended, if it did.
    pub fn exit_reason(&self) -> Option<VmExit> {
        if self.reset_evt.read().is_ok() {
            self.exit.raise(VmExit::Reset);
        }
        self.exit.reason()
    }

    /// Waits until the VM ends or `timeout` passes.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<VmExit> {
        use std::os::fd::AsRawFd;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.exit_reason() {
                return Some(r);
            }
            let ms = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    (d - now).as_millis().min(i32::MAX as u128) as i32 + 1
                }
                None => -1,
            };
            let mut fds = self.exit_fds().map(|e| libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `fds` is a valid array of two pollfd structs that
            // lives across the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};

    #[test]
    fn only_the_boot_processor_is_set_up_for_the_entry() {
        let config = VmConfig {
            vcpus: 2,
            mem_mib: 32,
            serial: SerialConfig::None,
            ..Default::default()
        };
        let vm = Vm::build(&config).unwrap();
        let (bsp, ap) = (&vm.pending[0].fd, &vm.pending[1].fd);
        assert_eq!(bsp.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);
        assert_ne!(bsp.get_regs().unwrap().rip, 0xfff0);
        // The AP waits for INIT-SIPI-SIPI with its reset registers.
        assert_eq!(
            ap.get_mp_state().unwrap().mp_state,
            KVM_MP_STATE_UNINITIALIZED
        );
        assert_eq!(ap.get_regs().unwrap().rip, 0xfff0);
        assert_eq!(ap.get_sregs().unwrap().cr0 & 1, 0, "the AP is in real mode");
    }
}
