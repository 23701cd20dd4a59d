//! The byte formats tests parse: the heartbeat datagram's payload, the disk
//! sector record, and the bulk sectors and where they go (README.md,
//! "Network and disk").
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

/// The LBA heartbeat `n` (from 1) is written at: `(n - 1) mod area`, where
/// `area` is the whole disk, or its first half when there is a bulk area
/// (`BulkArea::records`).
pub fn sector_lba(n: u64, area: u64) -> u64 {
    if area == 0 {
        0
    } else {
        n.wrapping_sub(1) % area
    }
}

/// Where the bulk writes of `disk_bytes=` go: the second half of the disk,
/// cut in `slots` slots of `sectors` sectors each; round r writes slot
/// `(r - 1) mod slots`. The heartbeat records keep to the first half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkArea {
    /// The first LBA of the area (= capacity / 2).
    pub first: u64,
    /// Sectors per bulk write.
    pub sectors: u64,
    /// Whole writes that fit in the area.
    pub slots: u64,
}

impl BulkArea {
    /// The area for `bytes` per round on a disk of `capacity` sectors: None
    /// when `bytes` is 0 or the disk's second half cannot hold one write.
    pub fn new(capacity: u64, bytes: u64) -> Option<BulkArea> {
        let sectors = bytes.div_ceil(SECTOR as u64);
        let first = capacity / 2;
        if sectors == 0 || first == 0 {
            return None;
        }
        let slots = (capacity - first) / sectors;
        (slots > 0).then_some(BulkArea {
            first,
            sectors,
            slots,
        })
    }

    /// Sectors that the heartbeat records rotate through (the first half).
    pub fn records(&self) -> u64 {
        self.first
    }

    /// The first LBA that round `r` (from 1) writes.
    pub fn lba(&self, r: u64) -> u64 {
        self.first + (r.wrapping_sub(1) % self.slots) * self.sectors
    }
}

/// Byte `i` of a bulk sector of round `r`, past its line: `(r + i) mod 256`.
pub fn bulk_byte(r: u64, i: usize) -> u8 {
    r.wrapping_add(i as u64) as u8
}

/// The bulk sector at `lba` written in round `r`: the line
/// `ftguest bulk round=<r> sector=<lba>\n`, then `bulk_byte(r, i)` for every
/// byte `i` after it.
pub fn bulk_sector(buf: &mut [u8], r: u64, lba: u64) {
    let buf = &mut buf[..SECTOR];
    let prefix = b"ftguest bulk round=";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    len += put_u64(&mut buf[len..], r);
    len += put_line(&mut buf[len..], b" sector=", lba);
    for (i, b) in buf.iter_mut().enumerate().skip(len) {
        *b = bulk_byte(r, i);
    }
}
