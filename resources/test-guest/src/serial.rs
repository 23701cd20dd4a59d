//! COM1 output. Lines are built in a buffer and written whole, one `out` per
//! byte after polling LSR's transmit-holding-register-empty bit.

use crate::arch::io::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Polls before writing anyway (a UART that never drains must not hang us).
const MAX_POLLS: u32 = 100_000;

/// Writes one byte to COM1.
pub fn write_byte(b: u8) {
    // SAFETY: COM1's LSR and THR; IOPL=3 lets CPL3 do this too.
    unsafe {
        let mut polls = 0;
        while inb(LSR) & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
            polls += 1;
        }
        outb(THR, b);
    }
}

/// Writes `bytes` to COM1.
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        write_byte(b);
    }
}

const LINE_MAX: usize = 256;

/// A line under construction; what does not fit is dropped.
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    pub fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == LINE_MAX {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    pub fn push_str(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    /// Decimal.
    pub fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }

    /// `0x`-prefixed lowercase hexadecimal.
    pub fn push_hex(&mut self, n: u64) {
        self.push_str("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((n >> (shift * 4)) & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push_bytes(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
            }
        }
    }

    /// Writes the line out (the caller ends it with `\n`).
    pub fn emit(&self) {
        let mut end = self.len;
        // A truncated line still ends with a newline.
        if end == LINE_MAX && self.buf[end - 1] != b'\n' {
            end -= 1;
            write_bytes(&self.buf[..end]);
            write_byte(b'\n');
        } else {
            write_bytes(&self.buf[..end]);
        }
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push_str(s);
        Ok(())
    }
}
