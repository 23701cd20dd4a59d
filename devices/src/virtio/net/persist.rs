//! Save/restore of a virtio-net device.

use std::convert::Infallible;

use ftvmm_checkpoint::Persist;
use serde::{Deserialize, Serialize};

use super::Net;
use crate::virtio::persist::{VirtioDeviceState, VirtioRestoreError};

/// What virtio-net adds to the transport: the guest-visible identity. The tap
/// is a host resource, named only: a restoring VMM attaches its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetState {
    /// The MAC in config space (the guest's identity: it travels).
    pub mac: [u8; 6],
    /// The tap the checkpointed device used (informational).
    pub tap: String,
}

/// A virtio-net device: transport, queues and [`NetState`].
pub type NetDeviceState = VirtioDeviceState<NetState>;

/// Why a virtio-net state cannot be restored (only the transport can refuse
/// one: any MAC is a valid identity).
pub type NetRestoreError = VirtioRestoreError<Infallible>;

impl Persist for Net {
    type State = NetState;
    type SaveError = Infallible;
    type RestoreError = Infallible;

    /// A frame read from the tap but not yet delivered is not part of the
    /// state (as if lost on the wire).
    fn save_into(&mut self, state: &mut NetState) -> Result<(), Infallible> {
        state.mac = self.mac;
        state.tap.clear();
        state.tap.push_str(self.tap.name());
        Ok(())
    }

    /// Takes the MAC from the state (it is the guest's identity) and keeps
    /// this device's own tap; forgets any frame in hand.
    fn restore(&mut self, state: &NetState) -> Result<(), Infallible> {
        self.mac = state.mac;
        self.rx_len = 0;
        self.rx_blocked = false;
        Ok(())
    }
}
