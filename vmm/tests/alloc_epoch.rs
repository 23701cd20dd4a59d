//! The epoch pause allocates nothing: after warm-up, an epoch of an idle
//! guest with a virtio disk — stop the vCPUs, quiesce the device, harvest,
//! stage pages and the whole machine state, resume — makes no heap
//! allocation on the thread that drives it, and neither does the page
//! encoding that follows the resume. (The vCPU threads save their
//! registers into buffers they reuse; the engine's own structures are proven
//! allocation-free in the checkpoint crate's tests.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use common::*;
use ftvmm::config::{DiskConfig, SerialConfig, VmConfig};
use ftvmm::ft::engine::Engine;
use ftvmm::vm::Vm;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards to the system allocator; the counters are thread-local
// const-initialised cells (no allocation, no re-entrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.with(|a| a.get()))
}

#[test]
fn an_idle_epoch_allocates_nothing() {
    let dir = TempDir::new("alloc");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let config = VmConfig {
        // No heartbeats, no output: the guest only spins.
        cmdline: "dirty=0 rounds=100000000 round_us=1000".into(),
        vcpus: 2,
        mem_mib: 64,
        serial: SerialConfig::None,
        disks: vec![DiskConfig {
            path: img.clone(),
            readonly: false,
        }],
        ..Default::default()
    };
    let mut vm = Vm::build(&config).unwrap();
    let mut engine = Engine::new(&mut vm).unwrap();
    vm.start().unwrap();
    assert!(vm.wait_exit(Some(Duration::from_millis(200))).is_none());
    // Warm-up: the first epochs size the staging, the state buffers and the
    // device-state vectors.
    for epoch in 1..=5 {
        engine.capture(&mut vm, None, epoch, false).unwrap();
        engine.encode();
        engine.trim();
    }
    let mut total = 0;
    for epoch in 6..=25 {
        let (c, n) = counted(|| engine.capture(&mut vm, None, epoch, false).unwrap());
        let (_, m) = counted(|| engine.encode());
        assert_eq!(m, 0, "the encoding of epoch {epoch} allocated");
        engine.trim();
        assert!(
            c.counts.total() < 64,
            "not idle: {} dirty pages",
            c.counts.total()
        );
        total += n;
    }
    vm.stop();
    assert_eq!(total, 0, "20 idle epochs made {total} heap allocations");
}

#[test]
fn the_adaptive_controller_allocates_nothing() {
    use ftvmm::ft::adaptive::{AdaptiveConfig, Controller, EpochSample, FaultCostSource};
    let ms = Duration::from_millis(1);
    let cfg = AdaptiveConfig::new(ms * 20, ms * 200, 10.0, ms / 50, FaultCostSource::Given)
        .expect("settings");
    let mut c = Controller::new(cfg);
    let ((), allocs) = counted(|| {
        for i in 0..1000u64 {
            let length = c.interval();
            c.observe(&EpochSample {
                length,
                pause: Duration::from_micros(300 + i % 7 * 100),
                dirty_pages: (i / 100 % 3) * 1000,
            });
        }
    });
    assert_eq!(
        allocs, 0,
        "the controller allocated {allocs} times in 1000 epochs"
    );
}
