//! Plain-data state of a virtio-blk device.

use serde::{Deserialize, Serialize};

use crate::virtio::persist::VirtioMmioState;

/// A virtio-blk device: transport, queue and the guest-visible disk shape.
/// The disk file is a host resource, named only: a restoring VMM opens its
/// own (the replica), which must have the same capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockDeviceState {
    /// Transport and queue.
    pub mmio: VirtioMmioState,
    /// The disk file the checkpointed device used (informational).
    pub path: String,
    /// Guest writes refused (`VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The GET_ID answer (20 bytes).
    pub disk_id: Vec<u8>,
}
