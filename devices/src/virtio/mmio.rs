//! The virtio-mmio transport (virtio 1.x, register layout version 2) and the
//! worker thread that runs a device's queues.
//!
//! A device is split in two: [`MmioTransport`], registered on the MMIO bus,
//! answers the driver's register accesses on vCPU threads; a worker thread
//! serves the queues when their eventfds (KVM ioeventfds on `QueueNotify`)
//! fire, and the device's backend (a tap) when it has input. Both share the
//! device under one mutex: the worker holds it while it serves requests, so
//! whoever holds it sees the device between requests. [`VirtioMmioDevice`]
//! owns the worker and is what the VMM keeps: eventfds to register, state
//! to save and restore, and [`Quiesce`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, GuestMemory, Quiesce, QuiesceError, QUEUE_MAX_SIZE, VENDOR_ID};
use crate::bus::BusDevice;

/// `MagicValue` ("virt").
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version (2: modern).
pub const VERSION: u32 = 2;

/// Register offsets.
pub mod regs {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// `InterruptStatus` bit: the used ring changed.
pub const INT_VRING: u32 = 1;

/// What a device type adds to the transport: identity, features, config
/// space, and the serving of its queues and backend. Called with the device
/// lock held, on the worker thread (queues, backend) or a vCPU thread
/// (config, reset).
pub trait VirtioDevice: Send + 'static {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// A name for messages ("virtio-net 'ftap0'").
    fn name(&self) -> String;
    /// Features offered (including `VERSION_1`).
    fn device_features(&self) -> u64;
    /// Number of queues.
    fn num_queues(&self) -> usize;
    /// Reads the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Serves queue `index` (it was notified, or the device was activated or
    /// resumed). Stops early, between requests, when `stop` is set. Returns
    /// true when the used ring changed (the driver is interrupted).
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        stop: &AtomicBool,
    ) -> bool;
    /// A backend fd the worker should wait on now (net: the tap, while the
    /// guest has receive buffers).
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// Serves the backend's input; like [`VirtioDevice::process_queue`].
    fn process_backend(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
        _stop: &AtomicBool,
    ) -> bool {
        false
    }
    /// The driver reset the device: forget guest-visible progress.
    fn reset(&mut self) {}
}

/// The transport's registers.
#[derive(Debug)]
pub(crate) struct Common {
    pub device_status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<Queue>,
}

/// Transport registers and device, under one lock.
pub(crate) struct Inner<D> {
    pub common: Common,
    pub dev: D,
}

pub(crate) struct Shared<D> {
    pub inner: Mutex<Inner<D>>,
    pub mem: GuestMemory,
    pub queue_evts: Vec<EventFd>,
    pub irq: EventFd,
    ctl: EventFd,
    paused: AtomicBool,
    exit: AtomicBool,
    pub name: String,
}

impl<D: VirtioDevice> Shared<D> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner<D>> {
        // A poisoned lock means the worker panicked; the registers are
        // still consistent enough to answer the guest.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn kick_worker(&self) {
        if let Err(e) = self.ctl.write(1) {
            log::error!("{}: cannot wake worker: {e}", self.name);
        }
    }

    pub(crate) fn signal_used(&self, common: &mut Common) {
        common.interrupt_status |= INT_VRING;
        if let Err(e) = self.irq.write(1) {
            log::error!("{}: cannot raise interrupt: {e}", self.name);
        }
    }
}

fn new_queues(n: usize) -> Vec<Queue> {
    (0..n)
        .map(|_| Queue::new(QUEUE_MAX_SIZE).expect("QUEUE_MAX_SIZE is a valid power of two"))
        .collect()
}

impl Common {
    fn new(num_queues: usize) -> Self {
        Common {
            device_status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
            interrupt_status: 0,
            activated: false,
            queues: new_queues(num_queues),
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }
}

/// The register window of one device, for the MMIO bus.
pub struct MmioTransport<D> {
    shared: Arc<Shared<D>>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    fn set_status(&self, inner: &mut Inner<D>, v: u32) {
        let Inner { common, dev } = inner;
        if v == 0 {
            log::debug!("{}: reset by the driver", self.shared.name);
            *common = Common {
                config_generation: common.config_generation,
                ..Common::new(common.queues.len())
            };
            dev.reset();
            return;
        }
        let old = common.device_status;
        if v & old != old {
            log::warn!(
                "{}: status {v:#x} clears bits of {old:#x}; ignored",
                self.shared.name
            );
            return;
        }
        let mut v = v;
        let added = v & !old;
        if added & status::FEATURES_OK != 0 && common.driver_features & features::VERSION_1 == 0 {
            log::warn!(
                "{}: driver did not accept VERSION_1; FEATURES_OK refused",
                self.shared.name
            );
            v &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 && !common.activated {
            let bad = common
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.shared.mem));
            if v & status::FEATURES_OK == 0 || bad.is_some() {
                log::warn!(
                    "{}: cannot activate (features ok: {}, invalid queue: {bad:?})",
                    self.shared.name,
                    v & status::FEATURES_OK != 0
                );
                v |= status::DEVICE_NEEDS_RESET;
            } else {
                common.activated = true;
                log::debug!(
                    "{}: activated, features {:#x}",
                    self.shared.name,
                    common.driver_features
                );
                self.shared.kick_worker();
            }
        }
        common.device_status = v;
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let inner = self.shared.lock();
        if offset >= regs::CONFIG {
            inner.dev.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let c = &inner.common;
        let q = c.queues.get(c.queue_sel as usize);
        let v: u32 = match offset {
            regs::MAGIC_VALUE => MAGIC,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => inner.dev.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match c.device_features_sel {
                0 => inner.dev.device_features() as u32,
                1 => (inner.dev.device_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => c.interrupt_status,
            regs::STATUS => c.device_status,
            regs::CONFIG_GENERATION => c.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        if offset >= regs::CONFIG {
            inner.dev.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "{}: {}-byte write at {offset:#x} ignored",
                self.shared.name,
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let offered = inner.dev.device_features();
        let c = &mut inner.common;
        // Queue and feature registers are frozen once the device is live.
        let configurable = !c.activated && c.device_status & status::FAILED == 0;
        match offset {
            regs::DEVICE_FEATURES_SEL => c.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => c.driver_features_sel = v,
            regs::DRIVER_FEATURES if configurable && c.device_status & status::FEATURES_OK == 0 => {
                let shift = match c.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                c.driver_features &= !(0xffff_ffffu64 << shift);
                c.driver_features |= (u64::from(v) << shift) & offered;
            }
            regs::QUEUE_SEL => c.queue_sel = v,
            regs::QUEUE_NUM if configurable => {
                if let Some(q) = c.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            regs::QUEUE_READY if configurable => {
                if let Some(q) = c.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH
                if configurable =>
            {
                if let Some(q) = c.selected_queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        regs::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        regs::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            regs::QUEUE_NOTIFY => match self.shared.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        log::error!("{}: queue {v} notify: {e}", self.shared.name);
                    }
                }
                None => log::debug!("{}: notify of unknown queue {v}", self.shared.name),
            },
            regs::INTERRUPT_ACK => c.interrupt_status &= !v,
            regs::STATUS => self.set_status(inner, v),
            _ => log::debug!("{}: write {v:#x} at {offset:#x} ignored", self.shared.name),
        }
    }
}

/// What a worker thread runs first, before it serves the guest (the VMM
/// installs the thread's seccomp filter there). An error stops the worker
/// and fails the device's creation with it.
pub type WorkerStart =
    Box<dyn FnOnce() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

/// A virtio-mmio device and its worker thread: what the VMM keeps.
pub struct VirtioMmioDevice<D: VirtioDevice> {
    pub(crate) shared: Arc<Shared<D>>,
    worker: Option<JoinHandle<()>>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmioDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioDevice")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> VirtioMmioDevice<D> {
    /// Wraps `dev` in a transport over `mem`, raising interrupts through
    /// `irq` (an eventfd the VMM registers as an irqfd), and starts its
    /// worker thread.
    pub fn new(dev: D, mem: GuestMemory, irq: EventFd) -> std::io::Result<Self> {
        Self::with_worker_start(dev, mem, irq, None)
    }

    /// [`VirtioMmioDevice::new`], with `start` run first on the worker
    /// thread; returns once it has, with its error if it failed (the
    /// worker then ends without serving anything).
    pub fn with_worker_start(
        dev: D,
        mem: GuestMemory,
        irq: EventFd,
        start: Option<WorkerStart>,
    ) -> std::io::Result<Self> {
        let name = dev.name();
        let nq = dev.num_queues();
        let queue_evts = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                common: Common::new(nq),
                dev,
            }),
            mem,
            queue_evts,
            irq,
            ctl: EventFd::new(EFD_NONBLOCK)?,
            paused: AtomicBool::new(false),
            exit: AtomicBool::new(false),
            name: name.clone(),
        });
        let s = shared.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let waits = start.is_some();
        let worker = std::thread::Builder::new()
            .name(format!("virtio-{}", short_name(&name)))
            .spawn(move || {
                if let Some(start) = start {
                    let r = start();
                    let failed = r.is_err();
                    let _ = started_tx.send(r.map_err(|e| e.to_string()));
                    if failed {
                        return;
                    }
                }
                worker_loop(s)
            })?;
        if waits {
            let started = started_rx
                .recv()
                .unwrap_or_else(|_| Err("the worker ended before it started".into()));
            if let Err(e) = started {
                let _ = worker.join();
                return Err(std::io::Error::other(format!("{name}: worker start: {e}")));
            }
        }
        Ok(VirtioMmioDevice {
            shared,
            worker: Some(worker),
        })
    }

    /// The register window, for the MMIO bus.
    pub fn transport(&self) -> Arc<Mutex<MmioTransport<D>>> {
        Arc::new(Mutex::new(MmioTransport {
            shared: self.shared.clone(),
        }))
    }

    /// The queues' notification eventfds, queue `i` at index `i`: register
    /// each as a KVM ioeventfd on `QueueNotify` with datamatch `i`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.shared.queue_evts
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs `f` on the device with the device lock held (between requests).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.shared.lock().dev)
    }
}

fn short_name(name: &str) -> String {
    // Thread names are cut at 15 bytes by the kernel; keep the useful end.
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
}

impl<D: VirtioDevice> Quiesce for VirtioMmioDevice<D> {
    fn pause(&self, timeout: Duration) -> Result<(), QuiesceError> {
        self.shared.paused.store(true, Ordering::SeqCst);
        self.shared.kick_worker();
        // The worker serves requests with the lock held and checks `paused`
        // between requests: once we hold the lock it is at a boundary, and
        // it takes no more work while `paused` is set.
        let deadline = Instant::now() + timeout;
        loop {
            match self.shared.inner.try_lock() {
                Ok(_) | Err(TryLockError::Poisoned(_)) => return Ok(()),
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(QuiesceError::Timeout {
                            device: self.shared.name.clone(),
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
    }

    fn resume(&self) {
        if self.shared.paused.swap(false, Ordering::SeqCst) {
            self.shared.kick_worker();
        }
    }
}

impl<D: VirtioDevice> Drop for VirtioMmioDevice<D> {
    fn drop(&mut self) {
        self.shared.exit.store(true, Ordering::SeqCst);
        self.shared.kick_worker();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// The worker: wait on the control eventfd, the queues' eventfds and the
/// backend; serve what fired. While paused it waits on the control eventfd
/// only, leaving the others signalled for after the resume.
fn worker_loop<D: VirtioDevice>(s: Arc<Shared<D>>) {
    let nq = s.queue_evts.len();
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(nq + 2);
    loop {
        if s.exit.load(Ordering::SeqCst) {
            return;
        }
        fds.clear();
        fds.push(pollfd(s.ctl.as_raw_fd()));
        let paused = s.paused.load(Ordering::SeqCst);
        let mut backend = None;
        if !paused {
            fds.extend(s.queue_evts.iter().map(|e| pollfd(e.as_raw_fd())));
            let inner = s.lock();
            if inner.common.activated {
                backend = inner.dev.backend_fd();
            }
            drop(inner);
            if let Some(fd) = backend {
                fds.push(pollfd(fd));
            }
        }
        // SAFETY: `fds` is a valid, initialised array of pollfd that lives
        // across the call; its length is passed with it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("{}: worker poll failed: {e}", s.name);
            return;
        }
        let woke_ctl = fds[0].revents != 0;
        if woke_ctl {
            let _ = s.ctl.read();
        }
        if s.exit.load(Ordering::SeqCst) {
            return;
        }
        if paused {
            continue;
        }
        let mut guard = s.lock();
        if s.paused.load(Ordering::SeqCst) {
            // Paused meanwhile: leave the eventfds signalled.
            continue;
        }
        let Inner { common, dev } = &mut *guard;
        let mut used = false;
        for q in 0..nq {
            let fired = fds[1 + q].revents != 0;
            if fired {
                let _ = s.queue_evts[q].read();
            }
            if common.activated && (fired || woke_ctl) {
                used |= dev.process_queue(q, &mut common.queues, &s.mem, &s.paused);
            }
        }
        let backend_fired = backend.is_some() && fds[1 + nq].revents != 0;
        if common.activated && (backend_fired || woke_ctl) && !s.paused.load(Ordering::SeqCst) {
            used |= dev.process_backend(&mut common.queues, &s.mem, &s.paused);
        }
        if used {
            s.signal_used(common);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::test_mem;

    /// A device with one queue that never has work.
    struct Idle;

    impl VirtioDevice for Idle {
        fn device_type(&self) -> u32 {
            0x2a
        }
        fn name(&self) -> String {
            "idle".into()
        }
        fn device_features(&self) -> u64 {
            features::VERSION_1
        }
        fn num_queues(&self) -> usize {
            1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process_queue(
            &mut self,
            _index: usize,
            _queues: &mut [Queue],
            _mem: &GuestMemory,
            _stop: &AtomicBool,
        ) -> bool {
            false
        }
    }

    fn irq() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn the_worker_start_runs_on_the_worker_before_the_device_is_returned() {
        let (tx, rx) = std::sync::mpsc::channel();
        let start: WorkerStart = Box::new(move || {
            let name = std::thread::current().name().map(str::to_string);
            tx.send(name).unwrap();
            Ok(())
        });
        let dev = VirtioMmioDevice::with_worker_start(Idle, test_mem(1 << 16), irq(), Some(start))
            .unwrap();
        // It already ran: nothing to wait for.
        assert_eq!(rx.try_recv().unwrap().as_deref(), Some("virtio-idle"));
        drop(dev);
    }

    #[test]
    fn a_failed_worker_start_fails_the_device_with_its_reason() {
        let start: WorkerStart = Box::new(|| Err("no filter for you".into()));
        let e = VirtioMmioDevice::with_worker_start(Idle, test_mem(1 << 16), irq(), Some(start))
            .unwrap_err();
        assert_eq!(e.to_string(), "idle: worker start: no filter for you");
    }
}
