//! The byte formats tests parse: the heartbeat datagram's payload and the
//! disk sector record (README.md, "Network and disk").
//!
//! Plain `core` code with no dependency on the rest of the guest, so the host
//! tests in `tests/guest_isa` compile and test this very file.

pub const SECTOR: usize = 512;

/// Writes `n` in decimal at the start of `buf`; returns the length (≤ 20).
pub fn put_u64(buf: &mut [u8], mut n: u64) -> usize {
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
    let len = digits.len() - i;
    buf[..len].copy_from_slice(&digits[i..]);
    len
}

fn put_line(buf: &mut [u8], prefix: &[u8], n: u64) -> usize {
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    len += put_u64(&mut buf[len..], n);
    buf[len] = b'\n';
    len + 1
}

/// The payload of heartbeat `n`'s datagram: `ftguest hb=<n>\n`. `buf` holds
/// at least 32 bytes; returns the length.
pub fn heartbeat_payload(buf: &mut [u8], n: u64) -> usize {
    put_line(buf, b"ftguest hb=", n)
}

/// The sector written with heartbeat `n`: `ftguest sector hb=<n>\n`, then
/// zeros to 512 bytes.
pub fn sector_record(buf: &mut [u8; SECTOR], n: u64) {
    let len = put_line(buf, b"ftguest sector hb=", n);
    buf[len..].fill(0);
}

/// The LBA heartbeat `n` (from 1) is written at: `(n - 1) mod capacity`.
pub fn sector_lba(n: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        0
    } else {
        n.wrapping_sub(1) % capacity
    }
}
