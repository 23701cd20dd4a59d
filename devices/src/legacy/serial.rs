use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of registers of a 16550.
pub const COM1_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Where the console's output goes: stdout, a file, nowhere, or (for a
/// protected VM) a buffer held until the checkpoint that produced it commits.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1: a vm-superio 16550 whose interrupt is an irqfd.
pub struct SerialConsole {
    pub(super) serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    pub(super) interrupt: EventFdTrigger,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A serial port in its reset state.
    pub fn new(interrupt: EventFdTrigger, out: SerialOutput) -> std::io::Result<Self> {
        Ok(SerialConsole {
            serial: Serial::new(interrupt.try_clone()?, out),
            interrupt,
        })
    }

    /// The output sink.
    pub fn output_mut(&mut self) -> &mut SerialOutput {
        self.serial.writer_mut()
    }

    /// Replaces the output sink (e.g. when a standby takes over and its own
    /// console becomes the guest's console).
    pub fn set_output(&mut self, out: SerialOutput) {
        *self.serial.writer_mut() = out;
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            // Output errors (a closed stdout) must not stop the guest.
            log::debug!("serial write at offset {offset}: {e:?}");
        }
    }
}
