use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// The i8042 keyboard controller, as far as a VMM needs it: the guest's
/// "pulse reset line" command (0xFE on the command port) signals `reset_evt`,
/// which ends the VM.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that signals `reset_evt` on a guest reset request.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        I8042 {
            dev: I8042Device::new(reset_evt),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status port (offset 4): nothing to read, output buffer empty.
        let v = self.dev.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.dev.write(offset as u8, data[0]) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, &[0xfe]);
        assert!(evt.read().is_err(), "a data-port write is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
