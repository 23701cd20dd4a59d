//! Power-off through the i8042: 0xFE on its command port is the reset request
//! that makes the VMM end the run with exit status 0.

use crate::arch::io::{outb, pause};

const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Asks the VMM to end the VM. Works at CPL0 and at CPL3 with IOPL=3.
pub fn poweroff() -> ! {
    // SAFETY: the i8042 command port; ending the VM is the point.
    unsafe { outb(I8042_COMMAND, I8042_RESET) };
    // The VMM acts on the exit; no `hlt` here (it faults at CPL3).
    loop {
        pause();
    }
}
