//! Helpers shared by the unit tests (loopback only).

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A tiny deterministic PRNG, so tests need no dependency.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// `len` pseudo-random bytes.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = XorShift::new(seed);
    (0..len).map(|_| r.next() as u8).collect()
}

/// A connected pair of plain TCP streams on 127.0.0.1.
pub(crate) fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect_timeout(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}
