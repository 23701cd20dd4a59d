//! Plain-data state of the virtio-mmio transport and its queues, and its
//! validation on restore (state from the wire is untrusted).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::GuestMemory;

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

/// A device state that does not fit the device it is restored into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioStateError {
    /// Wrong number of queues.
    #[error("{device}: state has {got} queues, the device {want}")]
    QueueCount {
        /// Which device.
        device: String,
        /// Queues in the state.
        got: usize,
        /// Queues of the device.
        want: usize,
    },
    /// A queue that virtio-queue rejects or that lies outside guest memory.
    #[error("{device}: queue {index}: {reason}")]
    Queue {
        /// Which device.
        device: String,
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Features the device does not offer.
    #[error(
        "{device}: driver features {features:#x} are not a subset of the device's {offered:#x}"
    )]
    Features {
        /// Which device.
        device: String,
        /// Accepted by the driver, per the state.
        features: u64,
        /// Offered by this device.
        offered: u64,
    },
    /// The device's host resource differs from the checkpointed one.
    #[error("{device}: {reason}")]
    Mismatch {
        /// Which device.
        device: String,
        /// What differs.
        reason: String,
    },
}

/// Rebuilds and validates the queues of `state` for a device offering
/// `max_size`-entry queues: virtio-queue's own checks (`Queue::try_from`:
/// power-of-two sizes, alignment), the same maximum size, and, for a live
/// device, ready queues that lie inside guest memory.
pub(crate) fn restore_queues(
    device: &str,
    state: &VirtioMmioState,
    num_queues: usize,
    max_size: u16,
    offered: u64,
    mem: &GuestMemory,
) -> Result<Vec<Queue>, VirtioStateError> {
    if state.queues.len() != num_queues {
        return Err(VirtioStateError::QueueCount {
            device: device.to_string(),
            got: state.queues.len(),
            want: num_queues,
        });
    }
    if state.driver_features & !offered != 0 {
        return Err(VirtioStateError::Features {
            device: device.to_string(),
            features: state.driver_features,
            offered,
        });
    }
    let qerr = |index: usize, reason: String| VirtioStateError::Queue {
        device: device.to_string(),
        index,
        reason,
    };
    let mut queues = Vec::with_capacity(num_queues);
    for (index, snap) in state.queues.iter().enumerate() {
        if snap.max_size != max_size {
            return Err(qerr(
                index,
                format!(
                    "max size {} where the device offers {max_size}",
                    snap.max_size
                ),
            ));
        }
        if snap.event_idx_enabled {
            return Err(qerr(index, "EVENT_IDX is not offered".to_string()));
        }
        let q =
            Queue::try_from(QueueState::from(snap)).map_err(|e| qerr(index, format!("{e:?}")))?;
        if state.activated && q.ready() && !q.is_valid(mem) {
            return Err(qerr(
                index,
                "rings lie outside guest memory or are misaligned".to_string(),
            ));
        }
        queues.push(q);
    }
    Ok(queues)
}
