//! Sending a checkpoint through a channel allocates nothing: `send_checkpoint` hands the
//! frame's chunks (slices into the staging slabs) to the channel's gather send, whose
//! window lives on the stack, also while it waits for room in a full socket buffer.
//!
//! A global allocator is per binary, hence this file. It counts the allocations of the
//! sending thread only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::thread;
use std::time::Duration;

use ftvmm_checkpoint::{CheckpointFrame, Staging, StagingConfig, PAGE_SIZE};
use ftvmm_transport::{
    connect_pair_with, Channel, ChannelListener, FtKey, Security, TcpChannel, TcpOptions,
};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: never touch a thread-local that is being torn down.
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// const-initialized thread-local Cells, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAGES: usize = 2000;

#[test]
fn send_checkpoint_allocates_nothing_even_when_the_socket_is_full() {
    send_rounds(false);
}

/// Sealing copies each chunk into the channel's one record buffer and
/// encrypts it in place: still nothing allocated per checkpoint.
#[test]
fn a_sealed_channel_allocates_nothing_either() {
    send_rounds(true);
}

fn send_rounds(sealed: bool) {
    // Four pages per slab: 500 slab chunks, several send windows per frame.
    let mut st = Staging::new(StagingConfig {
        slab_bytes: 4 * PAGE_SIZE,
        ..StagingConfig::for_guest((PAGES * PAGE_SIZE) as u64)
    })
    .unwrap();
    let mut w = st.begin_epoch();
    for p in 0..PAGES {
        w.page_slot((p * PAGE_SIZE) as u64).unwrap().fill(p as u8);
    }
    w.stage_state(&[7; 10_000]).unwrap();
    w.finish();

    // Small socket buffers: the sender finds them full and waits for room.
    let small = TcpOptions {
        nodelay: true,
        send_buffer: Some(64 << 10),
        recv_buffer: Some(64 << 10),
    };
    let mut l = ChannelListener::bind_with("127.0.0.1:0", small).unwrap();
    let t = Duration::from_secs(5);
    let (mut tx, mut rx, _hbs) = if sealed {
        let key = || Security::keyed(FtKey::from_bytes(&[9; 32]).unwrap());
        l.set_security(key());
        let addr = l.local_addr();
        let p = thread::spawn(move || connect_pair_with(addr, t, &small, &key()).unwrap());
        let (rx, s_hb) = l.accept_pair(t).unwrap();
        let (tx, p_hb) = p.join().unwrap();
        assert!(tx.cipher().is_some());
        (tx, rx, Some((p_hb, s_hb)))
    } else {
        let tx = TcpChannel::connect_with(l.local_addr(), t, &small).unwrap();
        (tx, l.accept_timeout(t).unwrap(), None)
    };
    let frame_len = CheckpointFrame::new(&st, 0, 1).len();
    const ROUNDS: u64 = 6;
    let drain = thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 16 << 10];
        let mut left = frame_len * ROUNDS;
        while left > 0 {
            let n = rx.recv(&mut buf).unwrap();
            assert!(n > 0, "EOF with {left} bytes to go");
            left -= n as u64;
        }
    });
    tx.set_write_timeout(Some(Duration::from_secs(20))).unwrap();

    // A warm-up round, then the counted ones.
    let frame = CheckpointFrame::new(&st, 1, 1);
    assert_eq!(tx.send_checkpoint(&frame).unwrap(), frame_len);
    let before = tx.stats();
    ARMED.with(|a| a.set(true));
    for epoch in 2..=ROUNDS {
        let frame = CheckpointFrame::new(&st, epoch, 1);
        assert_eq!(tx.send_checkpoint(&frame).unwrap(), frame_len);
    }
    ARMED.with(|a| a.set(false));
    let allocs = ALLOCS.with(|c| c.get());
    drain.join().unwrap();

    let after = tx.stats();
    if !sealed {
        assert_eq!(
            after.bytes_sent - before.bytes_sent,
            frame_len * (ROUNDS - 1)
        );
    }
    assert!(
        after.send_waits > before.send_waits,
        "the counted rounds should have waited for buffer room: {after:?}"
    );
    assert_eq!(allocs, 0, "sending {} checkpoints allocated", ROUNDS - 1);
}
