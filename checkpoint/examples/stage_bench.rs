//! Benchmark of the checkpoint hot paths; prints figures and ratios, asserts nothing.
//!
//! `cargo run --release -p ftvmm-checkpoint --example stage_bench`
//!
//! - staging N scattered dirty pages into slabs (from vm-memory guest memory, and from a
//!   plain host buffer) against one plain memcpy of the same bytes into one buffer;
//! - harvesting a 1 GiB region's dirty set (KVM log OR VMM bitmap), with vm-memory's
//!   `AtomicBitmap`, with this crate's `PageBitmap` and with bare `AtomicU64` words;
//! - framing (CRC-32 over the slabs), sending (the frame's chunks copied into a Vec, as a
//!   channel's gather send reads them) and receiving (validate, copy into the receiver's
//!   slabs, verify).
//!
//! Every figure is the median of several runs, A against B in the same run.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ftvmm_checkpoint::wire::{Frame, FrameReader};
use ftvmm_checkpoint::{
    CheckpointFrame, DevicesSummary, DirtyBitmap, GuestShape, HarvestBuffer, Limits, PageBitmap,
    Staging, StagingConfig, PAGE_SIZE,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 256 << 20; // guest memory for the copy benchmarks
const REPS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median time of `f` in µs over REPS runs (after one warm-up run).
fn time_us(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..REPS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}

/// A deterministic scattered page set (xorshift), sorted as a dirty-bitmap walk yields it.
fn scattered_pages(n: usize, total: usize) -> Vec<usize> {
    let mut seen = vec![false; total];
    let mut out = Vec::with_capacity(n);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = (x % total as u64) as usize;
        if !seen[p] {
            seen[p] = true;
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

fn staging_for(mem: usize) -> Staging {
    Staging::new(StagingConfig::for_guest(mem as u64)).unwrap()
}

fn bench_staging() {
    println!("## staging scattered 4 KiB pages (guest {} MiB)", MEM >> 20);
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut host = vec![0u8; MEM];
    // Touch every page so no benchmark pays first-touch faults.
    for p in 0..MEM / PAGE_SIZE {
        mem.write_obj(p as u64, GuestAddress((p * PAGE_SIZE) as u64))
            .unwrap();
        host[p * PAGE_SIZE] = p as u8;
    }
    let mut staging = staging_for(MEM);
    println!(
        "{:>6} {:>16} {:>16} {:>16} {:>16} {:>10} {:>10}",
        "pages",
        "vm-memory µs/pg",
        "host buf µs/pg",
        "scat.cpy µs/pg",
        "memcpy µs/pg",
        "vm/memcpy",
        "GB/s vm"
    );
    for n in [1_000usize, 10_000] {
        let pages = scattered_pages(n, MEM / PAGE_SIZE);
        // Grow the cache once, as a warmed-up primary has.
        let mut w = staging.begin_epoch();
        for &p in &pages {
            w.page_slot((p * PAGE_SIZE) as u64).unwrap();
        }
        w.finish();

        let vm = time_us(|| {
            let mut w = staging.begin_epoch();
            for &p in &pages {
                let gpa = (p * PAGE_SIZE) as u64;
                let slot = w.page_slot(gpa).unwrap();
                mem.read_slice(slot, GuestAddress(gpa)).unwrap();
            }
            black_box(w.finish());
        });
        let hb = time_us(|| {
            let mut w = staging.begin_epoch();
            for &p in &pages {
                let off = p * PAGE_SIZE;
                let src: &[u8; PAGE_SIZE] = host[off..off + PAGE_SIZE].try_into().unwrap();
                w.stage_page(off as u64, src).unwrap();
            }
            black_box(w.finish());
        });
        let mut dst = vec![0u8; n * PAGE_SIZE];
        // The same scattered pages into one contiguous buffer, no slabs.
        let sc = time_us(|| {
            for (i, &p) in pages.iter().enumerate() {
                let off = p * PAGE_SIZE;
                dst[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .copy_from_slice(&host[off..off + PAGE_SIZE]);
            }
            black_box(&dst);
        });
        let src = &host[..n * PAGE_SIZE];
        let mc = time_us(|| {
            dst.copy_from_slice(black_box(src));
            black_box(&dst);
        });
        let per = |us: f64| us / n as f64;
        println!(
            "{:>6} {:>16.3} {:>16.3} {:>16.3} {:>16.3} {:>10.2} {:>10.2}",
            n,
            per(vm),
            per(hb),
            per(sc),
            per(mc),
            vm / mc,
            (n * PAGE_SIZE) as f64 / vm / 1e3
        );
    }
    println!();
}

/// Median µs of harvest + walk, net of re-setting the VMM bits each run (timed apart).
fn harvest_run<B: DirtyBitmap + ?Sized>(
    h: &mut HarvestBuffer,
    kvm: &[u64],
    vmm_pages: &[usize],
    bits: &B,
) -> f64 {
    let set = || {
        for &p in vmm_pages {
            bits.set_bits(p / 64, 1 << (p % 64));
        }
    };
    let both = time_us(|| {
        set();
        let c = h.harvest(kvm, bits).unwrap();
        let mut sum = 0usize;
        for p in h.pages() {
            sum += p;
        }
        black_box((c, sum));
    });
    let set_only = time_us(set);
    h.harvest(kvm, bits).unwrap(); // leave the bitmap clean
    (both - set_only).max(0.0)
}

fn bench_harvest() {
    const REGION: usize = 1 << 30;
    let pages = REGION / PAGE_SIZE;
    println!("## harvest + walk, 1 GiB region ({pages} pages), dirty split 3:1 vCPU:VMM, µs");
    println!(
        "{:>7} {:>18} {:>18} {:>18}",
        "dirty", "AtomicBitmap", "PageBitmap", "[AtomicU64]"
    );
    let atomic = AtomicBitmap::new(REGION, NonZeroUsize::new(PAGE_SIZE).unwrap());
    let page_bits = PageBitmap::new(REGION);
    let words: Vec<AtomicU64> = (0..pages / 64).map(|_| AtomicU64::new(0)).collect();
    let mut h = HarvestBuffer::new(pages);
    for n in [0usize, 1_000, 10_000] {
        let set = scattered_pages(n, pages);
        let mut kvm = vec![0u64; pages / 64];
        let vmm_pages: Vec<usize> = set.iter().copied().skip(3).step_by(4).collect();
        for (i, &p) in set.iter().enumerate() {
            if i % 4 != 3 {
                kvm[p / 64] |= 1 << (p % 64);
            }
        }
        let a = harvest_run(&mut h, &kvm, &vmm_pages, &atomic);
        let pb = harvest_run(&mut h, &kvm, &vmm_pages, &page_bits);
        let w = harvest_run(&mut h, &kvm, &vmm_pages, &words[..]);
        println!("{n:>7} {a:>18.1} {pb:>18.1} {w:>18.1}");
    }
    println!();
}

fn bench_wire() {
    println!("## frame (CRC-32), send (vectored into a Vec), receive (validate + copy + verify)");
    let mem_bytes = MEM as u64;
    let shape = GuestShape {
        mem_bytes,
        vcpus: 1,
        cmdline: String::new(),
        devices: DevicesSummary::default(),
    };
    let limits = Limits::for_shape(&shape, mem_bytes, 1 << 20).unwrap();
    let mut tx = staging_for(MEM);
    let mut rx = Staging::new(limits.staging_config()).unwrap();
    let mut reader = FrameReader::new(limits);
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>12}",
        "pages", "crc µs/pg", "crc GB/s", "send µs/pg", "recv µs/pg"
    );
    for n in [1_000usize, 10_000] {
        let mut w = tx.begin_epoch();
        for (i, p) in scattered_pages(n, MEM / PAGE_SIZE).into_iter().enumerate() {
            w.page_slot((p * PAGE_SIZE) as u64).unwrap().fill(i as u8);
        }
        w.stage_state(&[5; 20_000]).unwrap();
        w.finish();
        let crc = time_us(|| {
            black_box(CheckpointFrame::new(&tx, 1, 1));
        });
        let frame = CheckpointFrame::new(&tx, 1, 1);
        let mut wire = Vec::with_capacity(frame.len() as usize);
        let send = time_us(|| {
            frame.copy_into(&mut wire);
        });
        let recv = time_us(|| {
            let f = reader.read_frame(&mut &wire[..], &mut rx).unwrap();
            assert!(matches!(f, Frame::Checkpoint(_)));
        });
        let per = |us: f64| us / n as f64;
        println!(
            "{:>6} {:>12.3} {:>12.2} {:>12.3} {:>12.3}",
            n,
            per(crc),
            frame.len() as f64 / crc / 1e3,
            per(send),
            per(recv)
        );
    }
    println!();
}

fn main() {
    bench_staging();
    bench_harvest();
    bench_wire();
}
