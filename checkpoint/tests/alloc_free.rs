//! The epoch hot path allocates nothing in steady state: an idle epoch (no dirty page, a
//! small state that fits the head slab and the reused buffers), and a busy epoch once the
//! slab cache has grown to its size. Both sides are covered: harvest, encode, stage,
//! frame, receive, verify, apply, ack. (The vectored send of the frame's chunks through a
//! channel is the transport's; `transport/tests/send_alloc_free.rs` counts it the same way.)
//!
//! A global allocator is per binary, hence this file. It counts allocations made by the
//! current thread only, so the test harness's own threads cannot disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ftvmm_checkpoint::wire::{encode_message, Ack, Frame, FrameReader, Message};
use ftvmm_checkpoint::{
    decode_state, encode_state, CheckpointFrame, DevicesSummary, EpochMetrics, GuestShape,
    HarvestBuffer, Limits, Staging, Summary, PAGE_SIZE,
};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, MmapRegion};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: never touch a thread-local that is being torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// a const-initialized thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
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

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

/// A VM-state-like blob: fixed-size registers, no heap.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone, Copy)]
struct VcpuLike {
    regs: [u64; 18],
    sregs: [u64; 24],
    lapic: [[u8; 32]; 32],
    mp_state: u32,
}

const MEM: usize = 4 << 20; // 1024 pages
const PAGES: usize = MEM / PAGE_SIZE;

struct Rig {
    mem: GuestMemoryMmap<AtomicBitmap>,
    kvm_log: Vec<u64>,
    harvest: HarvestBuffer,
    tx: Staging,
    rx: Staging,
    reader: FrameReader,
    standby_mem: GuestMemoryMmap,
    state_buf: Vec<u8>,
    state_out: Vec<u8>,
    wire: Vec<u8>,
    ack_buf: Vec<u8>,
    summary: Summary,
}

impl Rig {
    fn new() -> Self {
        let shape = GuestShape {
            mem_bytes: MEM as u64,
            vcpus: 1,
            cmdline: "console=ttyS0".into(),
            devices: DevicesSummary::default(),
        };
        let limits = Limits::for_shape(&shape, MEM as u64, 1 << 20).unwrap();
        Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            kvm_log: vec![0; PAGES / 64],
            harvest: HarvestBuffer::new(PAGES),
            tx: Staging::new(limits.staging_config()).unwrap(),
            rx: Staging::new(limits.staging_config()).unwrap(),
            reader: FrameReader::new(limits),
            standby_mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            state_buf: Vec::new(),
            state_out: Vec::new(),
            wire: Vec::with_capacity(8 << 20),
            ack_buf: Vec::new(),
            summary: Summary::new(),
        }
    }

    /// One whole epoch, primary and standby, with `dirty` pages dirtied by "vCPUs" and one
    /// by the "VMM". Returns the number of pages checkpointed.
    fn epoch(&mut self, epoch: u64, dirty: usize) -> usize {
        // Guest activity: vCPU writes show in the KVM log, a VMM write in the bitmap.
        for p in 0..dirty {
            self.kvm_log[p / 64] |= 1 << (p % 64);
        }
        if dirty > 0 {
            // Marks page 1000 in the region's AtomicBitmap, as a device write would.
            self.mem.write_obj(epoch, GuestAddress(0x3e_8000)).unwrap();
        }

        // Primary, paused: harvest, save, stage.
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let mmap: &MmapRegion<AtomicBitmap> = region;
        let counts = self.harvest.harvest(&self.kvm_log, mmap.bitmap()).unwrap();
        self.kvm_log.fill(0);
        let state = VcpuLike {
            regs: [epoch; 18],
            sregs: [1; 24],
            lapic: [[2; 32]; 32],
            mp_state: 0,
        };
        encode_state(&state, &mut self.state_buf).unwrap();
        let mut w = self.tx.begin_epoch();
        for page in self.harvest.pages() {
            let gpa = (page * PAGE_SIZE) as u64;
            let slot = w.page_slot(gpa).unwrap();
            self.mem.read_slice(slot, GuestAddress(gpa)).unwrap();
        }
        w.stage_state(&self.state_buf).unwrap();
        let stats = w.finish();

        // Primary, running: frame and send.
        self.wire.clear();
        let frame = CheckpointFrame::new(&self.tx, epoch, 1);
        frame.copy_into(&mut self.wire);
        let sent = frame.len();
        assert_eq!(self.wire.len() as u64, sent);
        self.tx.trim();

        // Standby: receive, verify, apply, decode, ack.
        let Frame::Checkpoint(v) = self
            .reader
            .read_frame(&mut &self.wire[..], &mut self.rx)
            .unwrap()
        else {
            panic!("expected a checkpoint");
        };
        let bytes = v.apply(&self.standby_mem, &mut self.state_out).unwrap();
        let back: VcpuLike = decode_state(bytes, 1 << 20).unwrap();
        assert_eq!(back, state);
        encode_message(
            &Message::Ack(Ack {
                epoch,
                generation: 1,
            }),
            &mut self.ack_buf,
        )
        .unwrap();

        let mut m = EpochMetrics {
            epoch,
            pause_us: 50 + epoch,
            bytes_staged: stats.payload_bytes as u64,
            bytes_sent: sent,
            slabs: stats.slabs_used as u64,
            ..Default::default()
        };
        m.set_dirty(counts);
        self.summary.record(&m);
        stats.pages
    }
}

#[test]
fn steady_state_epochs_allocate_nothing() {
    let mut rig = Rig::new();

    // Warm-up: one idle and one busy epoch grow every reused buffer once.
    rig.epoch(1, 0);
    rig.epoch(2, 300);

    // Busy epochs of the warmed-up size: the slab cache holds them (no strike either).
    let before = allocs();
    for e in 3..13 {
        assert_eq!(rig.epoch(e, 300), 301);
    }
    assert_eq!(allocs() - before, 0, "busy epochs allocated");
    assert!(rig.tx.slab_count() > 1);

    // Idle epochs: nothing dirty, the state fits the head slab. The strikes halve the
    // cache down to the head slab meanwhile (freeing is no allocation).
    let before = allocs();
    for e in 13..60 {
        assert_eq!(rig.epoch(e, 0), 0);
    }
    assert_eq!(allocs() - before, 0, "idle epochs allocated");
    assert_eq!(rig.tx.slab_count(), 1);
    assert_eq!(rig.rx.slab_count(), 1);

    // The standby memory holds the primary's pages.
    let v: u64 = rig.standby_mem.read_obj(GuestAddress(0x3e_8000)).unwrap();
    assert_eq!(v, 12);
    assert_eq!(rig.summary.count(), 59);
}

#[test]
fn growth_is_the_only_allocation() {
    // Sanity check of the counter itself: a burst bigger than the cache allocates slabs.
    let mut rig = Rig::new();
    rig.epoch(1, 0);
    let before = allocs();
    rig.epoch(2, 600);
    assert!(allocs() > before, "the counting allocator saw nothing");
}
