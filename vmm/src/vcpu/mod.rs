//! vCPU threads: the `KVM_RUN` loop, the handling of every exit reason, and
//! the pause/resume protocol the checkpoint engine relies on.
//!
//! Pausing: the controller sets the vCPU's request under its lock, raises the
//! `pending` flag and sends the thread [`kick_signal`]. The signal handler
//! sets `immediate_exit` in the thread's `kvm_run`, so whether the thread is
//! inside `KVM_RUN` or about to enter it, `KVM_RUN` returns `EINTR` at once;
//! the thread then sees `pending`, acknowledges the pause and waits on a
//! condition variable until it is told to run again or to exit.
//!
//! A saving pause has the thread capture its vCPU's state ([`persist`])
//! before it acknowledges; the controller copies it out with
//! [`VcpuHandle::copy_saved`].
//!
//! Parked threads sleep on their VM's [`ParkGate`], one futex word for all
//! of them, so a resume wakes every vCPU with one system call: woken one by
//! one (a condition variable each), every woken vCPU could preempt the
//! controller before it woke the next, which on a host with fewer cores
//! than busy vCPUs stretched the resume of 8 vCPUs to milliseconds.

pub mod persist;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use ftvmm_checkpoint::Persist;
use ftvmm_devices::bus::Bus;

use crate::memory::GuestMemory;
use crate::quirks;
use persist::{VcpuCapture, VcpuSaveError, VcpuState};

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset through the i8042 controller (the way
    /// both the test guest and Linux power off here).
    Reset,
    /// KVM reported a guest shutdown or reset system event.
    SystemEvent(u32),
    /// The guest triple-faulted.
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP at the fault.
        rip: u64,
    },
    /// The VM cannot continue: an unexpected exit or a failed ioctl.
    Error(String),
}

impl VmExit {
    /// True for the ways a guest ends itself on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::SystemEvent(_))
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset (i8042)"),
            VmExit::SystemEvent(t) => write!(f, "guest system event {t}"),
            VmExit::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {vcpu} at RIP {rip:#x}"
                )
            }
            VmExit::Error(e) => write!(f, "{e}"),
        }
    }
}

/// The first reason the VM stopped, shared by all vCPU threads, with an
/// eventfd the VMM's event loop can wait on.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal nobody raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless an earlier one is recorded, and wakes waiters.
    pub fn raise(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        let _ = self.evt.write(1);
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Ctl {
    request: Request,
    /// Capture the vCPU's state before acknowledging the pause.
    save: bool,
    /// The thread is parked (paused, stopped or exited) and acknowledged it.
    parked: bool,
    /// The state captured at the last saving pause (buffers reused).
    saved: VcpuState,
    /// `saved` was captured at the current pause (and the vCPU has not run
    /// since).
    saved_now: bool,
    /// Why the capture at the current pause failed.
    save_error: Option<VcpuSaveError>,
    /// The thread left KVM_RUN for the current pause (it may still be
    /// saving its state).
    stopped: bool,
}

/// State shared between a vCPU thread and its controller.
#[derive(Debug)]
pub struct VcpuShared {
    pending: AtomicBool,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl VcpuShared {
    fn new() -> Self {
        VcpuShared {
            pending: AtomicBool::new(false),
            ctl: Mutex::new(Ctl {
                request: Request::Run,
                save: false,
                parked: false,
                saved: VcpuState::default(),
                saved_now: false,
                save_error: None,
                stopped: false,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The word parked vCPU threads of one VM sleep on (a futex): requests
/// change under each vCPU's lock, then [`ParkGate::open`] bumps the word and
/// wakes every sleeper at once.
#[derive(Debug, Default)]
pub struct ParkGate {
    generation: AtomicU32,
}

impl ParkGate {
    /// A gate nobody sleeps on yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Sleeps while the generation is still `seen`; returns at once if it
    /// moved on, and may return spuriously (a signal): callers re-check.
    fn wait(&self, seen: u32) {
        // SAFETY: FUTEX_WAIT on a 4-byte aligned word that lives as long as
        // `self`; it only compares the word with `seen` and sleeps.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.generation.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                std::ptr::null::<libc::timespec>(),
            )
        };
    }

    /// Wakes every thread sleeping on the gate (one system call).
    pub fn open(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        // SAFETY: FUTEX_WAKE on the same word; it reads no memory.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.generation.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }
}

thread_local! {
    // The running thread's kvm_run, for the kick signal handler. Const
    // initialised and without destructor, so reading it is a plain TLS load
    // and safe in a signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's
        // kvm_run mapping, which lives as long as the thread's VcpuFd; the
        // field is a plain byte that KVM reads on the next KVM_RUN.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler)
}

/// Errors controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        source: std::io::Error,
    },
    /// Capturing the state of a vCPU failed.
    #[error(transparent)]
    Save(#[from] VcpuSaveError),
    /// A vCPU did not acknowledge a pause in time.
    #[error("vCPU {id} did not pause within {timeout:?}")]
    PauseTimeout {
        /// vCPU index.
        id: u8,
        /// How long we waited.
        timeout: Duration,
    },
}

/// One vCPU before its thread starts.
pub struct Vcpu {
    /// Index, also the APIC ID.
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemory,
    exit: Arc<ExitSignal>,
    shared: Arc<VcpuShared>,
    capture: VcpuCapture,
    /// The last exit was port I/O or MMIO, completed by the next KVM_RUN.
    io_pending: bool,
    /// The kvm_run sync area holds the current registers: a KVM_RUN
    /// returned since the last time we changed them.
    synced: bool,
    /// Buffer a pause saves into, swapped with the shared slot (no
    /// allocation per epoch).
    scratch: VcpuState,
    /// Raised when this vCPU's dirty ring is full.
    ring_full: Option<Arc<EventFd>>,
    /// Where the thread sleeps while parked (shared by the VM's vCPUs).
    gate: Arc<ParkGate>,
}

impl Vcpu {
    /// Wraps a configured vCPU; captures its state once, which both checks
    /// that capture works on this host and sizes the reusable buffers.
    pub fn new(
        id: u8,
        mut fd: VcpuFd,
        buses: (Arc<Bus>, Arc<Bus>),
        mem: GuestMemory,
        exit: Arc<ExitSignal>,
        capture: VcpuCapture,
    ) -> Result<Self, VcpuError> {
        if capture.sync_regs() {
            for reg in [
                SyncReg::Register,
                SyncReg::SystemRegister,
                SyncReg::VcpuEvents,
            ] {
                fd.set_sync_valid_reg(reg);
            }
        }
        let mut vcpu = Vcpu {
            id,
            fd,
            pio: buses.0,
            mmio: buses.1,
            mem,
            exit,
            shared: Arc::new(VcpuShared::new()),
            capture,
            io_pending: false,
            synced: false,
            scratch: VcpuState::default(),
            ring_full: None,
            gate: Arc::new(ParkGate::new()),
        };
        let initial = vcpu.save()?;
        vcpu.scratch.clone_from(&initial);
        vcpu.shared.lock().saved = initial;
        Ok(vcpu)
    }

    /// Makes the thread sleep on `gate` while parked: the VM's gate, which
    /// [`Vm::resume`](crate::vm::Vm::resume) opens once for all vCPUs.
    pub fn set_park_gate(&mut self, gate: Arc<ParkGate>) {
        self.gate = gate;
    }

    /// Starts the vCPU's thread.
    pub fn start(self) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let shared = self.shared.clone();
        let gate = self.gate.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_thread())
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            shared,
            gate,
            thread: Some(thread),
        })
    }

    fn run_thread(mut self) {
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            // The guest never runs on an unfiltered vCPU thread.
            self.exit
                .raise(VmExit::Error(format!("vCPU {}: {e}", self.id)));
            self.park_while_requested(true);
            return;
        }
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        loop {
            if self.shared.pending.load(Ordering::Acquire) && !self.park_while_requested(false) {
                break;
            }
            match self.run_once() {
                Ok(()) => {}
                Err(reason) => {
                    self.exit.raise(reason);
                    // The guest cannot go on: stay parked until told to exit.
                    self.park_while_requested(true);
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Parks while the request is Pause (or, when `stopped`, until Exit).
    /// Returns false when the thread must exit.
    fn park_while_requested(&mut self, stopped: bool) -> bool {
        let shared = self.shared.clone();
        let mut ctl = shared.lock();
        loop {
            match ctl.request {
                Request::Exit => {
                    ctl.parked = true;
                    shared.cv.notify_all();
                    return false;
                }
                Request::Run if !stopped => {
                    ctl.parked = false;
                    ctl.saved_now = false;
                    // A kick that raced with the pause may have left
                    // immediate_exit set; the next KVM_RUN would only bounce.
                    self.fd.set_kvm_immediate_exit(0);
                    return true;
                }
                _ => {
                    if !ctl.parked {
                        // Out of KVM_RUN: the guest no longer runs on this
                        // vCPU, which is all the dirty harvest needs.
                        ctl.stopped = true;
                        shared.cv.notify_all();
                        if ctl.save {
                            ctl.save = false;
                            // Save without the lock, so the controller can
                            // harvest and copy pages meanwhile.
                            drop(ctl);
                            let mut scratch = std::mem::take(&mut self.scratch);
                            let r = self.save_into(&mut scratch);
                            ctl = shared.lock();
                            match r {
                                Ok(()) => {
                                    std::mem::swap(&mut ctl.saved, &mut scratch);
                                    ctl.saved_now = true;
                                }
                                Err(e) => ctl.save_error = Some(e),
                            }
                            self.scratch = scratch;
                        }
                        ctl.parked = true;
                        shared.cv.notify_all();
                    }
                    // Read under the lock: a request changed after this
                    // opens the gate after it, so the wait cannot miss it.
                    let seen = self.gate.generation();
                    drop(ctl);
                    self.gate.wait(seen);
                    ctl = shared.lock();
                }
            }
        }
    }

    /// Where to signal a full dirty ring.
    pub fn set_ring_full_signal(&mut self, evt: Arc<EventFd>) {
        self.ring_full = Some(evt);
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Result<(), VmExit> {
        let id = self.id;
        self.io_pending = false;
        let result = self.fd.run();
        self.synced = result.is_ok()
            || matches!(&result, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
        if matches!(
            result,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        ) {
            self.io_pending = true;
        }
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Ok(())
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    Ok(())
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    Ok(())
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    Ok(())
                }
                VcpuExit::Shutdown => Err(VmExit::TripleFault {
                    vcpu: id,
                    rip: self.fd.get_regs().map(|r| r.rip).unwrap_or(0),
                }),
                VcpuExit::SystemEvent(type_, _) => Err(VmExit::SystemEvent(type_)),
                VcpuExit::Hlt => {
                    // With the in-kernel LAPIC, HLT never leaves KVM; seeing
                    // one means the guest halted for good.
                    Err(VmExit::Error(format!("vCPU {id} halted (KVM_EXIT_HLT)")))
                }
                VcpuExit::InternalError => {
                    // The quirk handlers change registers behind the sync
                    // area's back; the next KVM_RUN (forced before a save)
                    // refreshes it.
                    self.io_pending = true;
                    quirks::handle_internal_error(&mut self.fd, &self.mem, id)
                }
                VcpuExit::FailEntry(reason, cpu) => Err(VmExit::Error(format!(
                    "vCPU {id}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host CPU {cpu}"
                ))),
                VcpuExit::Intr => Ok(()),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    // Ask the epoch driver to harvest (which resets the
                    // ring), and let it: KVM_RUN bounces until then.
                    if let Some(e) = &self.ring_full {
                        let _ = e.write(1);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                    Ok(())
                }
                VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => Ok(()),
                other => {
                    let what = format!("{other:?}");
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    Err(VmExit::Error(format!(
                        "vCPU {id}: unexpected KVM exit {what} at RIP {rip:#x}"
                    )))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Ok(())
            }
            Err(e) => Err(VmExit::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }
}

/// Controller side of a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    shared: Arc<VcpuShared>,
    gate: Arc<ParkGate>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            // A thread that already exited cannot be signalled; nothing to do.
            let _ = t.kill(kick_signal());
        }
    }

    /// Sets the request; `wake`: open the gate (a parked thread sees it).
    fn request(&self, req: Request, save: bool, wake: bool) {
        let mut ctl = self.shared.lock();
        ctl.request = req;
        ctl.save = save;
        if req == Request::Run {
            self.shared.pending.store(false, Ordering::Release);
        } else {
            ctl.parked = false;
            ctl.stopped = false;
            ctl.saved_now = false;
            ctl.save_error = None;
            self.shared.pending.store(true, Ordering::Release);
        }
        drop(ctl);
        if wake {
            self.gate.open();
        }
        if req != Request::Run {
            self.kick();
        }
    }

    /// Asks the vCPU to pause, without waiting; with `save`, it captures its
    /// state before acknowledging.
    pub fn request_pause(&self, save: bool) {
        // A running thread is kicked; only one parked (after a VM exit)
        // needs the gate, and it stays parked anyway.
        self.request(Request::Pause, save, false);
    }

    /// Copies the state this vCPU's thread captured at the current saving
    /// pause into `state`, reusing its buffers (no allocation once they have
    /// grown). Call it once the vCPU is parked ([`VcpuHandle::wait_parked`]).
    pub fn copy_saved(&self, state: &mut VcpuState) -> Result<(), VcpuSaveError> {
        let ctl = self.shared.lock();
        if let Some(e) = &ctl.save_error {
            return Err(e.clone());
        }
        if !(ctl.parked && ctl.saved_now) {
            return Err(VcpuSaveError::NotSaved { id: self.id });
        }
        state.clone_from(&ctl.saved);
        Ok(())
    }

    /// Waits, until `deadline`, for `done` to hold of the control state.
    fn wait_until(
        &self,
        deadline: Instant,
        timeout: Duration,
        done: impl Fn(&Ctl) -> bool,
    ) -> Result<(), VcpuError> {
        let mut ctl = self.shared.lock();
        while !done(&ctl) {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout {
                    id: self.id,
                    timeout,
                });
            }
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Waits until the vCPU acknowledged its pause (or is stopped for good).
    pub fn wait_parked(&self, deadline: Instant, timeout: Duration) -> Result<(), VcpuError> {
        self.wait_until(deadline, timeout, |c| c.parked)
    }

    /// Waits until the vCPU left `KVM_RUN` for the pause asked for (it may
    /// still be saving its state).
    pub fn wait_stopped(&self, deadline: Instant, timeout: Duration) -> Result<(), VcpuError> {
        self.wait_until(deadline, timeout, |c| c.stopped || c.parked)
    }

    /// Lets the vCPU run again.
    pub fn resume(&self) {
        self.request(Request::Run, false, true);
    }

    /// Lets the vCPU run again once the gate opens ([`ParkGate::open`]):
    /// [`Vm::resume`](crate::vm::Vm::resume) sets every vCPU so, then
    /// opens the VM's gate once.
    pub fn set_run(&self) {
        self.request(Request::Run, false, false);
    }

    /// Stops the thread and joins it.
    pub fn stop(&mut self) {
        self.request(Request::Exit, false, true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
