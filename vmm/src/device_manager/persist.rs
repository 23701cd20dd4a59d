//! Save/restore of the VM's devices: COM1 and every virtio device, in
//! device order (the i8042 has no state).

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use ftvmm_checkpoint::Persist;
use ftvmm_devices::legacy::persist::{SerialDeviceState, SerialRestoreError};
use ftvmm_devices::virtio::block::{BlockDeviceState, BlockRestoreError};
use ftvmm_devices::virtio::net::{NetDeviceState, NetRestoreError};

use super::DeviceManager;

/// State of the VMM's own devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// virtio-net devices, in `--net` order.
    pub net: Vec<NetDeviceState>,
    /// virtio-blk devices, in `--disk` order.
    pub blk: Vec<BlockDeviceState>,
}

/// Why the devices' state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum DevicesRestoreError {
    /// The checkpoint has other devices than this VM.
    #[error("cannot restore the devices: the checkpoint has {ckpt_net} NICs and {ckpt_blk} disks, this VM {net} and {blk}")]
    Shape {
        /// NICs in the checkpoint.
        ckpt_net: usize,
        /// Disks in the checkpoint.
        ckpt_blk: usize,
        /// NICs here.
        net: usize,
        /// Disks here.
        blk: usize,
    },
    /// COM1.
    #[error(transparent)]
    Serial(#[from] SerialRestoreError),
    /// A NIC.
    #[error(transparent)]
    Net(#[from] NetRestoreError),
    /// A disk.
    #[error(transparent)]
    Block(#[from] BlockRestoreError),
}

impl Persist for DeviceManager {
    type State = DevicesState;
    type SaveError = Infallible;
    type RestoreError = DevicesRestoreError;

    /// Pause the devices first ([`DeviceManager::pause_devices`], and the
    /// vCPUs for COM1) for a consistent cut. Reuses the state's vectors:
    /// after the first epoch, saving the devices allocates nothing.
    fn save_into(&mut self, state: &mut DevicesState) -> Result<(), Infallible> {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_into(&mut state.serial)?;
        state.net.resize_with(self.net.len(), Default::default);
        for (d, s) in self.net.iter_mut().zip(state.net.iter_mut()) {
            d.save_into(s)?;
        }
        state.blk.resize_with(self.blk.len(), Default::default);
        for (d, s) in self.blk.iter_mut().zip(state.blk.iter_mut()) {
            d.save_into(s)?;
        }
        Ok(())
    }

    /// Restores checkpointed device states into these devices, which keep
    /// their own host resources (this VMM's console, taps and disks).
    fn restore(&mut self, state: &DevicesState) -> Result<(), DevicesRestoreError> {
        if state.net.len() != self.net.len() || state.blk.len() != self.blk.len() {
            return Err(DevicesRestoreError::Shape {
                ckpt_net: state.net.len(),
                ckpt_blk: state.blk.len(),
                net: self.net.len(),
                blk: self.blk.len(),
            });
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.serial)?;
        for (d, s) in self.net.iter_mut().zip(&state.net) {
            d.restore(s)?;
        }
        for (d, s) in self.blk.iter_mut().zip(&state.blk) {
            d.restore(s)?;
        }
        Ok(())
    }
}
