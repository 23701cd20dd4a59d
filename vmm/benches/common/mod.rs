//! Fixtures shared by the benchmarks (`benches/ft.rs`) and the examples
//! that measure the stream (`examples/seal_bench.rs`, `wire_bench.rs`).

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};

use ftvmm_checkpoint::{DevicesSummary, GuestShape, Staging, StagingConfig, PAGE_SIZE};

/// A staged checkpoint of `pages` pseudo-random pages (every other page of
/// a guest twice as large) and 8 KiB of state, and that guest's shape.
pub fn staged(pages: usize) -> (Staging, GuestShape) {
    let mem_bytes = ((pages * 2) * PAGE_SIZE) as u64;
    let mut staging = Staging::new(StagingConfig::for_guest(mem_bytes)).unwrap();
    let mut w = staging.begin_epoch();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..pages {
        let slot = w.page_slot((i * 2 * PAGE_SIZE) as u64).unwrap();
        for chunk in slot.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
    w.stage_state(&[7u8; 8192]).unwrap();
    w.finish();
    let shape = GuestShape {
        mem_bytes,
        vcpus: 1,
        cmdline: String::new(),
        devices: DevicesSummary::default(),
    };
    (staging, shape)
}

/// A connected pair of loopback TCP streams, `TCP_NODELAY` on both.
pub fn loopback() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}
