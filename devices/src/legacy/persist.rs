//! Plain-data states of the legacy devices.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// Maximum receive-FIFO bytes a restored serial state may carry (the 16550
/// FIFO of vm-superio holds 64).
pub const MAX_SERIAL_FIFO: usize = 64;

/// The registers and receive FIFO of a 16550 (vm-superio's `SerialState`,
/// made serialisable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl SerialDeviceState {
    /// Converts from vm-superio's state.
    pub fn from_superio(s: &SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }

    /// Converts to vm-superio's state, truncating an oversized FIFO (state
    /// from the wire is untrusted).
    pub fn to_superio(&self) -> SerialState {
        let mut in_buffer = self.in_buffer.clone();
        in_buffer.truncate(MAX_SERIAL_FIFO);
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer,
        }
    }
}
