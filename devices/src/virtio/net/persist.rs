//! Plain-data state of a virtio-net device.

use serde::{Deserialize, Serialize};

use crate::virtio::persist::VirtioMmioState;

/// A virtio-net device: transport, queues and the guest-visible identity.
/// The tap is a host resource, named only: a restoring VMM attaches its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetDeviceState {
    /// Transport and queues.
    pub mmio: VirtioMmioState,
    /// The MAC in config space (the guest's identity: it travels).
    pub mac: [u8; 6],
    /// The tap the checkpointed device used (informational).
    pub tap: String,
}
