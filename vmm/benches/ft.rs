//! Checkpoint benchmarks (figures and ratios, never assertions):
//!
//! 1. Epoch pause for dirty sets of 0, 1k, 10k and 50k pages, next to the
//!    lower bound measured in the same run: the same epoch's harvest plus a
//!    plain copy of the same pages into one buffer. Target: pause ≤ 1.3 ×
//!    bound + 100 µs.
//! 2. Checkpoint stream throughput next to raw loopback TCP in the same run.
//!    Target: ≥ 90 %.
//! 3. Share of wall time the test guest spends paused at 10, 25 and 50 ms
//!    epochs while it dirties a fixed rate of pages.
//!
//! Run: `cargo bench -p ftvmm --bench ft` (needs /dev/kvm).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::ft::engine::Engine;
use ftvmm::vm::Vm;
use ftvmm_checkpoint::wire::Limits;
use ftvmm_checkpoint::{
    CheckpointFrame, DevicesSummary, Frame, FrameReader, GuestShape, Staging, StagingConfig,
    PAGE_SIZE,
};
use ftvmm_transport::{Channel, TcpChannel, TcpOptions};
use vm_memory::{GuestAddress, GuestMemoryBackend};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pause_vs_bound() {
    println!("## 1. Epoch pause vs. lower bound (harvest + plain copy of the same pages)");
    println!(
        "{:>8} {:>8} {:>10} {:>10} {:>10} {:>8} {:>12} {:>6}",
        "target", "dirty", "pause µs", "harvest", "bound µs", "ratio", "1.3b+100", "met"
    );
    let mut breakdown = Vec::new();
    for &n in &[0usize, 1_000, 10_000, 50_000] {
        let cmdline = if n == 0 {
            "dirty=0 rounds=1000000 round_us=1000".to_string()
        } else {
            format!("dirty={n} span={n} rounds=1000000 round_us=0")
        };
        let cfg = VmConfig {
            cmdline,
            mem_mib: 512,
            serial: SerialConfig::None,
            ..Default::default()
        };
        let mut vm = Vm::build(&cfg).expect("build VM");
        let mut engine = Engine::new(&mut vm).expect("engine");
        vm.start().expect("start");
        // Let the guest boot and cover its working set once; then a warm-up
        // capture takes the boot-time pages out of the way.
        let settle = Duration::from_millis(300 + (n as u64) / 100);
        std::thread::sleep(settle);
        engine.capture(&mut vm, None, 0, false).expect("capture");
        engine.trim();
        let wait = Duration::from_micros((30_000).max(n as u64 * 8));
        let (mut pause, mut harvest, mut bound, mut dirty) = (vec![], vec![], vec![], vec![]);
        let (mut save, mut encode, mut stagev) = (vec![], vec![], vec![]);
        let mut buf = vec![0u8; (n + 4096) * PAGE_SIZE];
        for epoch in 1..=15 {
            std::thread::sleep(wait);
            let c = engine
                .capture(&mut vm, None, epoch, false)
                .expect("capture");
            // The bound's copy: the same pages, a plain memcpy each.
            let t = Instant::now();
            let mut k = 0;
            for gpa in engine.dirty_gpas() {
                let src = vm.memory.get_host_address(GuestAddress(gpa)).unwrap();
                if k + PAGE_SIZE > buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                // SAFETY: src is a host address of a mapped guest page (4 KiB
                // inside one region); the destination range is inside `buf`.
                unsafe { std::ptr::copy_nonoverlapping(src, buf[k..].as_mut_ptr(), PAGE_SIZE) };
                k += PAGE_SIZE;
            }
            let copy = t.elapsed();
            engine.trim();
            pause.push(c.pause.as_secs_f64() * 1e6);
            harvest.push(c.harvest.as_secs_f64() * 1e6);
            save.push(c.save.as_secs_f64() * 1e6);
            encode.push(c.encode.as_secs_f64() * 1e6);
            stagev.push(c.stage.as_secs_f64() * 1e6);
            bound.push((c.harvest + copy).as_secs_f64() * 1e6);
            dirty.push(c.counts.total() as f64);
        }
        vm.stop();
        let (p, h, b, d) = (
            median(&mut pause),
            median(&mut harvest),
            median(&mut bound),
            median(&mut dirty),
        );
        breakdown.push((
            n,
            median(&mut save),
            median(&mut encode),
            h,
            median(&mut stagev),
        ));
        let target = 1.3 * b + 100.0;
        println!(
            "{:>8} {:>8.0} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>12.0} {:>6}",
            n,
            d,
            p,
            h,
            b,
            p / b.max(1.0),
            target,
            if p <= target { "yes" } else { "NO" }
        );
    }
    print_breakdown(&breakdown);
}

fn print_breakdown(rows: &[(usize, f64, f64, f64, f64)]) {
    println!("pause breakdown, medians in µs (stop+save state / encode / harvest / stage pages):");
    for (n, sv, en, h, st) in rows {
        println!("{n:>8}: {sv:>7.0} {en:>7.0} {h:>7.0} {st:>7.0}");
    }
}

fn staged(pages: usize) -> (Staging, GuestShape) {
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

fn loopback() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

/// The sending end of [`loopback`] as the primary's checkpoint channel, with
/// the same socket buffers as the raw stream it is compared with.
fn channel(tx: TcpStream) -> TcpChannel {
    let peer = tx.peer_addr().unwrap();
    let opts = TcpOptions {
        nodelay: true,
        send_buffer: None,
        recv_buffer: None,
    };
    TcpChannel::from_stream(tx, peer, &opts).unwrap()
}

fn stream_vs_raw() {
    println!("\n## 2. Checkpoint stream vs. raw loopback TCP (same run, 10k-page checkpoints)");
    const PAGES: usize = 10_000;
    const ROUNDS: usize = 30;
    let (staging, shape) = staged(PAGES);
    let frame = CheckpointFrame::new(&staging, 1, 1);
    let total = frame.len() * ROUNDS as u64;

    // Raw: 1 MiB write_all on a fresh connection, receiver drains.
    let (mut tx, mut rx) = loopback();
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            got += rx.read(&mut b).unwrap() as u64;
        }
    });
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        tx.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    drain.join().unwrap();
    let raw = total as f64 / t.elapsed().as_secs_f64() / 1e9;

    // Checkpoint frames, vectored straight from the slabs; receiver drains.
    let (tx, mut rx) = loopback();
    let mut tx = channel(tx);
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            got += rx.read(&mut b).unwrap() as u64;
        }
    });
    let t = Instant::now();
    for _ in 0..ROUNDS {
        tx.send_checkpoint(&frame).unwrap();
    }
    drain.join().unwrap();
    let ckpt = total as f64 / t.elapsed().as_secs_f64() / 1e9;

    // Checkpoint frames into the real standby path: parse, stage, CRC check.
    let (tx, mut rx) = loopback();
    let mut tx = channel(tx);
    let recv = std::thread::spawn(move || {
        let limits = Limits::for_shape(&shape, u64::MAX, 1 << 20).unwrap();
        let mut reader = FrameReader::new(limits);
        let mut st = Staging::new(limits.staging_config()).unwrap();
        for _ in 0..ROUNDS {
            match reader.read_frame(&mut rx, &mut st).unwrap() {
                Frame::Checkpoint(cp) => assert_eq!(cp.page_count(), PAGES),
                Frame::Message(m) => panic!("{m:?}"),
            }
        }
    });
    let t = Instant::now();
    for _ in 0..ROUNDS {
        tx.send_checkpoint(&frame).unwrap();
    }
    recv.join().unwrap();
    let full = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("raw TCP (1 MiB write_all)            {raw:6.2} GB/s");
    println!(
        "checkpoint frames, receiver drains   {ckpt:6.2} GB/s  ({:.0} % of raw)",
        ckpt / raw * 100.0
    );
    println!(
        "checkpoint frames, standby verifies  {full:6.2} GB/s  ({:.0} % of raw)",
        full / raw * 100.0
    );
}

fn pause_share() {
    println!("\n## 3. Share of wall time paused (guest dirtying 64 pages per ms)");
    println!(
        "{:>10} {:>8} {:>12} {:>12} {:>10}",
        "interval", "epochs", "pause med µs", "dirty med", "paused %"
    );
    for &ms in &[10u64, 25, 50] {
        let cfg = VmConfig {
            cmdline: "dirty=64 span=8192 rounds=1000000 round_us=1000".into(),
            mem_mib: 256,
            serial: SerialConfig::None,
            ..Default::default()
        };
        let mut vm = Vm::build(&cfg).expect("build VM");
        let mut engine = Engine::new(&mut vm).expect("engine");
        vm.start().expect("start");
        std::thread::sleep(Duration::from_millis(300));
        engine.capture(&mut vm, None, 0, false).unwrap();
        let start = Instant::now();
        let mut paused = Duration::ZERO;
        let (mut pauses, mut dirty) = (vec![], vec![]);
        let mut epoch = 0;
        while start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(ms));
            epoch += 1;
            let c = engine.capture(&mut vm, None, epoch, false).unwrap();
            engine.trim();
            paused += c.pause;
            pauses.push(c.pause.as_secs_f64() * 1e6);
            dirty.push(c.counts.total() as f64);
        }
        let wall = start.elapsed();
        vm.stop();
        println!(
            "{:>8}ms {:>8} {:>12.0} {:>12.0} {:>9.2}%",
            ms,
            epoch,
            median(&mut pauses),
            median(&mut dirty),
            paused.as_secs_f64() / wall.as_secs_f64() * 100.0
        );
    }
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIP ft bench: /dev/kvm is not accessible");
        return;
    }
    // `cargo bench` passes --bench; a filter argument is ignored.
    pause_vs_bound();
    stream_vs_raw();
    pause_share();
}
