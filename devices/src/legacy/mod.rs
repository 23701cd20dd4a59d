//! Legacy PC devices: COM1 serial and the i8042 reset controller.

mod i8042;
pub mod persist;
mod serial;

pub use i8042::I8042;
pub use serial::{SerialConsole, SerialOutput, COM1_BASE, COM1_IRQ, COM1_LEN};

/// Port I/O base of the i8042 controller (data port; the command port is +4).
pub const I8042_BASE: u64 = 0x60;
/// Number of ports the i8042 answers (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
