//! Save/restore of the legacy devices.
//!
//! COM1 has registers and a receive FIFO: [`SerialDeviceState`]. The i8042
//! has no state at all (vm-superio's `I8042Device` holds only the reset event
//! it signals; every read answers 0), so it has nothing to save and does not
//! implement [`Persist`].

use std::convert::Infallible;

use ftvmm_checkpoint::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as SerialError, NoEvents, SerialState};
use vm_superio::Serial;

use super::serial::{SerialConsole, SerialOutput};

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

/// Why a serial state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// The state's receive FIFO is longer than a 16550's.
    #[error("cannot restore COM1: its receive FIFO holds {len} bytes, a 16550's at most {max}")]
    Fifo {
        /// Bytes in the state's FIFO.
        len: usize,
        /// The FIFO's size.
        max: usize,
    },
    /// The interrupt line cannot be duplicated or raised.
    #[error("cannot restore COM1: its interrupt eventfd failed: {0}")]
    Interrupt(#[source] std::io::Error),
    /// vm-superio reported an output error.
    #[error("cannot restore COM1: its output failed: {0}")]
    Output(#[source] std::io::Error),
}

impl Persist for SerialConsole {
    type State = SerialDeviceState;
    type SaveError = Infallible;
    type RestoreError = SerialRestoreError;

    /// Saves the registers and FIFO. vm-superio hands its state out as a new
    /// value, whose FIFO copy allocates only while the guest has unread input.
    fn save_into(&mut self, out: &mut SerialDeviceState) -> Result<(), Infallible> {
        let SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        } = self.serial.state();
        *out = SerialDeviceState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        };
        Ok(())
    }

    /// Restores the registers and FIFO, keeping this console's interrupt
    /// line and output sink (on error too).
    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialRestoreError> {
        if state.in_buffer.len() > MAX_SERIAL_FIFO {
            return Err(SerialRestoreError::Fifo {
                len: state.in_buffer.len(),
                max: MAX_SERIAL_FIFO,
            });
        }
        let trigger = self
            .interrupt
            .try_clone()
            .map_err(SerialRestoreError::Interrupt)?;
        let superio = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // Built with a placeholder sink; the console's own moves over only
        // once the restore cannot fail any more.
        let placeholder: SerialOutput = Box::new(std::io::sink());
        let mut serial =
            Serial::from_state(&superio, trigger, NoEvents, placeholder).map_err(|e| match e {
                SerialError::Trigger(e) => SerialRestoreError::Interrupt(e),
                SerialError::IOError(e) => SerialRestoreError::Output(e),
                SerialError::FullFifo => SerialRestoreError::Fifo {
                    len: state.in_buffer.len(),
                    max: MAX_SERIAL_FIFO,
                },
            })?;
        std::mem::swap(serial.writer_mut(), self.serial.writer_mut());
        self.serial = serial;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use ftvmm_checkpoint::persist_roundtrip_tests;
    use ftvmm_checkpoint::test_utils::PersistPair;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::bus::BusDevice;
    use crate::EventFdTrigger;

    /// A console output the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console(out: SerialOutput) -> SerialConsole {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        SerialConsole::new(EventFdTrigger::new(irq), out).unwrap()
    }

    struct Consoles(SerialConsole, SerialConsole);

    impl PersistPair for Consoles {
        type Component = SerialConsole;
        fn pair(&mut self) -> (&mut SerialConsole, &mut SerialConsole) {
            (&mut self.0, &mut self.1)
        }
    }

    /// A port the guest programmed (divisor, line and modem control,
    /// interrupts, scratch) with input it has not read yet.
    fn programmed() -> Consoles {
        let mut a = console(Box::new(std::io::sink()));
        for (off, v) in [
            (3, 0x80),
            (0, 0x0c),
            (1, 0x00),
            (3, 0x03),
            (1, 0x01),
            (4, 0x0b),
            (7, 0x5a),
        ] {
            a.write(off, &[v]);
        }
        a.serial.enqueue_raw_bytes(b"typed ahead").unwrap();
        Consoles(a, console(Box::new(std::io::sink())))
    }

    persist_roundtrip_tests! {
        serial_console: programmed();
    }

    #[test]
    fn an_oversized_fifo_is_refused_and_the_output_kept() {
        let out = Captured::default();
        let mut c = console(Box::new(out.clone()));
        let state = SerialDeviceState {
            in_buffer: vec![b'x'; MAX_SERIAL_FIFO + 1],
            ..Default::default()
        };
        let err = c.restore(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot restore COM1: its receive FIFO holds 65 bytes, a 16550's at most 64"
        );
        c.write(0, b"k");
        assert_eq!(&*out.0.lock().unwrap(), b"k");
    }

    #[test]
    fn restore_keeps_the_consoles_own_output() {
        let mut pair = programmed();
        let state = pair.0.save().unwrap();
        let out = Captured::default();
        let mut b = console(Box::new(out.clone()));
        b.restore(&state).unwrap();
        // DLAB is off (LCR 0x03): offset 0 is the transmit register.
        b.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
        let mut first = [0u8];
        b.read(0, &mut first);
        assert_eq!(&first, b"t", "the FIFO travelled");
    }
}
