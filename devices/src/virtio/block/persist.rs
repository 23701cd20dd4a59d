//! Save/restore of a virtio-blk device.

use std::convert::Infallible;

use ftvmm_checkpoint::Persist;
use serde::{Deserialize, Serialize};

use super::{Block, DISK_ID_LEN};
use crate::virtio::persist::{VirtioDeviceState, VirtioRestoreError};

/// What virtio-blk adds to the transport: the guest-visible disk shape. The
/// disk file is a host resource, named only: a restoring VMM opens its own
/// (the replica), which must have the same capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockState {
    /// The disk file the checkpointed device used (informational).
    pub path: String,
    /// Guest writes refused (`VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The GET_ID answer.
    pub disk_id: [u8; DISK_ID_LEN],
}

/// A virtio-blk device: transport, queue and [`BlockState`].
pub type BlockDeviceState = VirtioDeviceState<BlockState>;

/// Why a checkpointed disk does not fit the disk it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    /// Another capacity.
    #[error("cannot restore {device}: the checkpointed disk has {state} sectors, this one {disk}")]
    Capacity {
        /// Which device.
        device: String,
        /// Sectors per the state.
        state: u64,
        /// Sectors of this disk.
        disk: u64,
    },
    /// Read-only in one, writable in the other.
    #[error("cannot restore {device}: the checkpointed disk is {}, this one {}", access(*.state), access(*.disk))]
    ReadOnly {
        /// Which device.
        device: String,
        /// Read-only per the state.
        state: bool,
        /// This disk is read-only.
        disk: bool,
    },
}

fn access(readonly: bool) -> &'static str {
    if readonly {
        "readonly"
    } else {
        "writable"
    }
}

/// Why a virtio-blk state cannot be restored.
pub type BlockRestoreError = VirtioRestoreError<BlockStateError>;

impl Persist for Block {
    type State = BlockState;
    type SaveError = Infallible;
    type RestoreError = BlockStateError;

    fn save_into(&mut self, state: &mut BlockState) -> Result<(), Infallible> {
        use std::fmt::Write;
        state.path.clear();
        // Writing into a String cannot fail.
        let _ = write!(state.path, "{}", self.disk.path.display());
        state.readonly = self.disk.readonly;
        state.capacity = self.disk.capacity;
        state.disk_id = self.id;
        Ok(())
    }

    /// Keeps this device's own disk file (a standby opens its replica):
    /// capacity and access must match; the disk ID comes from the state.
    fn restore(&mut self, state: &BlockState) -> Result<(), BlockStateError> {
        let device = || format!("virtio-blk '{}'", self.disk.path.display());
        if state.capacity != self.disk.capacity {
            return Err(BlockStateError::Capacity {
                device: device(),
                state: state.capacity,
                disk: self.disk.capacity,
            });
        }
        if state.readonly != self.disk.readonly {
            return Err(BlockStateError::ReadOnly {
                device: device(),
                state: state.readonly,
                disk: self.disk.readonly,
            });
        }
        self.id = state.disk_id;
        Ok(())
    }
}
