//! Save/restore of the virtio-mmio transport: the plain-data state of its
//! registers and queues, composed with the state of the device behind it, and
//! its validation on restore (state from the wire is untrusted).

use ftvmm_checkpoint::Persist;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::{Common, VirtioDevice, VirtioMmioDevice};
use super::{GuestMemory, QUEUE_MAX_SIZE};

/// virtio-queue's `QueueState`, made serialisable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Descriptor table (guest physical).
    pub desc_table: u64,
    /// Available ring (guest physical).
    pub avail_ring: u64,
    /// Used ring (guest physical).
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(s: &QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The transport registers every virtio-mmio device has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VirtioMmioState {
    /// `Status` register.
    pub device_status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// The device went live on `DRIVER_OK`.
    pub activated: bool,
    /// One per queue.
    pub queues: Vec<QueueSnapshot>,
}

/// A virtio-mmio device: the transport's state and the state of the device
/// behind it (`NetState`, `BlockState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VirtioDeviceState<S> {
    /// Transport registers and queues.
    pub transport: VirtioMmioState,
    /// The device type's own state.
    pub device: S,
}

/// Why a virtio device's state cannot be restored; `E` is the device type's
/// own restore error.
#[derive(Debug, thiserror::Error)]
pub enum VirtioRestoreError<E> {
    /// Wrong number of queues.
    #[error("cannot restore {device}: the state has {got} queues, the device {want}")]
    QueueCount {
        /// Which device.
        device: String,
        /// Queues in the state.
        got: usize,
        /// Queues of the device.
        want: usize,
    },
    /// A queue's maximum size differs from the device's.
    #[error(
        "cannot restore {device}: queue {index} has maximum size {got}, the device offers {want}"
    )]
    QueueMaxSize {
        /// Which device.
        device: String,
        /// Queue index.
        index: usize,
        /// The state's maximum size.
        got: u16,
        /// The device's.
        want: u16,
    },
    /// A queue uses `VIRTIO_F_EVENT_IDX`, which no device here offers.
    #[error("cannot restore {device}: queue {index} has EVENT_IDX enabled, which the device does not offer")]
    EventIdx {
        /// Which device.
        device: String,
        /// Queue index.
        index: usize,
    },
    /// virtio-queue rejects a queue (size not a power of two, misaligned
    /// rings...).
    #[error("cannot restore {device}: queue {index}: {source}")]
    Queue {
        /// Which device.
        device: String,
        /// Queue index.
        index: usize,
        /// virtio-queue's reason.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ready queue of a live device whose rings lie outside guest memory.
    #[error("cannot restore {device}: queue {index}'s rings (descriptors {desc:#x}, available {avail:#x}, used {used:#x}, size {size}) lie outside guest memory")]
    QueueOutsideMemory {
        /// Which device.
        device: String,
        /// Queue index.
        index: usize,
        /// Descriptor table address.
        desc: u64,
        /// Available ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
        /// Queue size.
        size: u16,
    },
    /// Features the device does not offer.
    #[error(
        "cannot restore {device}: driver features {features:#x} are not a subset of the device's {offered:#x}"
    )]
    Features {
        /// Which device.
        device: String,
        /// Accepted by the driver, per the state.
        features: u64,
        /// Offered by this device.
        offered: u64,
    },
    /// The device type refused its part of the state.
    #[error(transparent)]
    Device(E),
}

/// Rebuilds and validates the queues of `state` for a device offering
/// `max_size`-entry queues: virtio-queue's own checks (`Queue::try_from`:
/// power-of-two sizes, alignment), the same maximum size, and, for a live
/// device, ready queues that lie inside guest memory.
fn restore_queues<E>(
    device: &str,
    state: &VirtioMmioState,
    num_queues: usize,
    max_size: u16,
    offered: u64,
    mem: &GuestMemory,
) -> Result<Vec<Queue>, VirtioRestoreError<E>> {
    let device = || device.to_string();
    if state.queues.len() != num_queues {
        return Err(VirtioRestoreError::QueueCount {
            device: device(),
            got: state.queues.len(),
            want: num_queues,
        });
    }
    if state.driver_features & !offered != 0 {
        return Err(VirtioRestoreError::Features {
            device: device(),
            features: state.driver_features,
            offered,
        });
    }
    let mut queues = Vec::with_capacity(num_queues);
    for (index, snap) in state.queues.iter().enumerate() {
        if snap.max_size != max_size {
            return Err(VirtioRestoreError::QueueMaxSize {
                device: device(),
                index,
                got: snap.max_size,
                want: max_size,
            });
        }
        if snap.event_idx_enabled {
            return Err(VirtioRestoreError::EventIdx {
                device: device(),
                index,
            });
        }
        let q = Queue::try_from(QueueState::from(snap)).map_err(|source| {
            VirtioRestoreError::Queue {
                device: device(),
                index,
                source,
            }
        })?;
        if state.activated && q.ready() && !q.is_valid(mem) {
            return Err(VirtioRestoreError::QueueOutsideMemory {
                device: device(),
                index,
                desc: snap.desc_table,
                avail: snap.avail_ring,
                used: snap.used_ring,
                size: snap.size,
            });
        }
        queues.push(q);
    }
    Ok(queues)
}

/// The transport saves and restores its registers and queues and has the
/// device type save and restore the rest, all under the device lock (the
/// worker is between requests).
impl<D> Persist for VirtioMmioDevice<D>
where
    D: VirtioDevice + Persist,
{
    type State = VirtioDeviceState<D::State>;
    type SaveError = D::SaveError;
    type RestoreError = VirtioRestoreError<D::RestoreError>;

    /// Call it paused ([`crate::virtio::Quiesce`]) for a consistent
    /// checkpoint. Reuses the state's queue vector: no allocation per epoch.
    fn save_into(&mut self, state: &mut Self::State) -> Result<(), D::SaveError> {
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let VirtioMmioState {
            device_status,
            driver_features,
            device_features_sel,
            driver_features_sel,
            queue_sel,
            config_generation,
            interrupt_status,
            activated,
            queues,
        } = &mut state.transport;
        let c = &inner.common;
        *device_status = c.device_status;
        *driver_features = c.driver_features;
        *device_features_sel = c.device_features_sel;
        *driver_features_sel = c.driver_features_sel;
        *queue_sel = c.queue_sel;
        *config_generation = c.config_generation;
        *interrupt_status = c.interrupt_status;
        *activated = c.activated;
        queues.clear();
        queues.extend(c.queues.iter().map(|q| QueueSnapshot::from(q.state())));
        inner.dev.save_into(&mut state.device)
    }

    /// Validates the transport's part of the state, has the device restore
    /// its own, then installs the registers and queues and lets the worker
    /// serve whatever the queues hold. A pending interrupt is raised again.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::RestoreError> {
        let t = &state.transport;
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let queues = restore_queues(
            &self.shared.name,
            t,
            inner.dev.num_queues(),
            QUEUE_MAX_SIZE,
            inner.dev.device_features(),
            &self.shared.mem,
        )?;
        inner
            .dev
            .restore(&state.device)
            .map_err(VirtioRestoreError::Device)?;
        inner.common = Common {
            device_status: t.device_status,
            driver_features: t.driver_features,
            device_features_sel: t.device_features_sel,
            driver_features_sel: t.driver_features_sel,
            queue_sel: t.queue_sel,
            config_generation: t.config_generation,
            interrupt_status: t.interrupt_status,
            activated: t.activated,
            queues,
        };
        // An interrupt raised just before the checkpoint may not have
        // reached the guest; a spurious one is harmless.
        if t.interrupt_status != 0 {
            if let Err(e) = self.shared.irq.write(1) {
                log::warn!(
                    "{}: cannot raise the restored interrupt: {e}",
                    self.shared.name
                );
            }
        }
        drop(guard);
        self.shared.kick_worker();
        Ok(())
    }
}
