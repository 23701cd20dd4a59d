//! Checkpoint benchmarks (figures and ratios, never assertions):
//!
//! 1. Epoch pause for dirty sets of 0, 1k, 10k and 50k pages, next to the
//!    lower bound measured in the same run: the same epoch's harvest plus a
//!    plain copy of the same pages into one buffer. Target: pause ≤ 1.3 ×
//!    bound + 100 µs. The pause's parts, and the fixed part at 0 pages next
//!    to what it is made of (the kick, six vCPU ioctls, the harvest).
//! 2. Checkpoint stream throughput next to raw loopback TCP in the same run.
//!    Target: ≥ 90 %. Also raw TCP from and into buffers as large as a
//!    checkpoint (out of cache, as the slabs and the standby's staging are),
//!    with the standby's CRC check, and the frames sent as before (the
//!    whole rest of the frame offered to each sendmsg).
//! 3. Share of wall time the test guest spends paused at 10, 25 and 50 ms
//!    epochs while it dirties a fixed rate of pages.
//!
//! 4. Epoch pause at 0 and 1k dirty pages for 1, 2, 4 and 8 busy vCPUs,
//!    with the ratio to 1 vCPU. Target: 8 vCPUs ≤ 2 × 1 vCPU.
//!
//! Run: `cargo bench -p ftvmm --bench ft` (needs /dev/kvm); `-- stream`
//! (or `pause`, `share`, `vcpus`) runs one section.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{loopback, staged};
use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::ft::engine::Engine;
use ftvmm::vm::Vm;
use ftvmm_checkpoint::wire::Limits;
use ftvmm_checkpoint::{CheckpointFrame, Frame, FrameReader, GuestShape, Staging, PAGE_SIZE};
use ftvmm_transport::{Channel, TcpChannel, TcpOptions};
use vm_memory::{GuestAddress, GuestMemoryBackend};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Medians of one configuration's epochs (µs, pages).
#[derive(Clone, Copy, Default)]
struct PauseRow {
    dirty: f64,
    pause: f64,
    /// The shortest pause of the run.
    pause_min: f64,
    bound: f64,
    stop: f64,
    /// Waiting for the vCPU threads' state capture after the page copy.
    save_wait: f64,
    harvest: f64,
    stage: f64,
    /// Encoding the state, sealing, and resuming.
    rest: f64,
    /// Resuming alone (waking every vCPU thread).
    resume: f64,
}

/// 15 epochs of a guest dirtying `n` pages.
fn pause_run(n: usize) -> PauseRow {
    pause_run_on(n, 1)
}

/// 15 epochs of a guest dirtying `n` pages per epoch on `vcpus` busy vCPUs
/// (each runs its rounds on its own part of the working set, dirtying its
/// share of the `n` pages; with `n` = 0 they spin at CPL3).
fn pause_run_on(n: usize, vcpus: u8) -> PauseRow {
    let cmdline = if n == 0 {
        "dirty=0 rounds=1000000 round_us=1000".to_string()
    } else {
        format!("dirty={n} span={n} rounds=1000000 round_us=0")
    };
    let cfg = VmConfig {
        cmdline,
        mem_mib: 512,
        vcpus,
        serial: SerialConfig::None,
        ..Default::default()
    };
    let mut vm = Vm::build(&cfg).expect("build VM");
    let mut engine = Engine::new(&mut vm).expect("engine");
    vm.start().expect("start");
    // Let the guest boot and cover its working set once; then a warm-up
    // capture takes the boot-time pages out of the way. Between epochs the
    // guest gets the time to write all its pages again (≈25 µs each here:
    // the first write to a page after its re-protection faults).
    // The APs start one after the other (≈10 ms each: the INIT wait).
    let settle =
        Duration::from_millis(300 + 50 * u64::from(vcpus)) + Duration::from_micros(n as u64 * 40);
    std::thread::sleep(settle);
    engine.capture(&mut vm, None, 0, false).expect("capture");
    engine.trim();
    let wait = Duration::from_micros((30_000).max(n as u64 * 40));
    let mut v: [Vec<f64>; 9] = Default::default();
    let mut buf = vec![0u8; (n + 4096) * PAGE_SIZE];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
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
        let parts = c.save + c.harvest + c.stage;
        for (i, x) in [
            c.counts.total() as f64,
            us(c.pause),
            us(c.harvest + copy),
            us(c.stop),
            us(c.save - c.stop),
            us(c.harvest),
            us(c.stage),
            us(c.pause.saturating_sub(parts)),
            us(c.pause.saturating_sub(parts + c.encode)),
        ]
        .into_iter()
        .enumerate()
        {
            v[i].push(x);
        }
    }
    vm.stop();
    let pause_min = v[1].iter().copied().fold(f64::INFINITY, f64::min);
    let m: Vec<f64> = v.iter_mut().map(|x| median(x)).collect();
    PauseRow {
        dirty: m[0],
        pause: m[1],
        pause_min,
        bound: m[2],
        stop: m[3],
        save_wait: m[4],
        harvest: m[5],
        stage: m[6],
        rest: m[7],
        resume: m[8],
    }
}

/// One vCPU ioctl here (`KVM_GET_MP_STATE` on a vCPU that never ran,
/// median of 2000): the epoch's state capture issues six per vCPU (MSRs,
/// MP state, XSAVE, XCRs, LAPIC, debug registers), on the vCPU's thread,
/// while the pages are copied.
fn vcpu_ioctl_us() -> f64 {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut t: Vec<f64> = (0..2000)
        .map(|_| {
            let s = Instant::now();
            let _ = vcpu.get_mp_state();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median(&mut t)
}

/// Section 1.
fn pause_vs_bound() {
    println!("## 1. Epoch pause vs. lower bound (harvest + plain copy of the same pages)");
    println!("target pause ≤ 1.3 × bound + 100 µs");
    println!(
        "{:>8} {:>8} {:>10} {:>10} {:>8} {:>10} {:>6}",
        "target", "dirty", "pause µs", "bound µs", "ratio", "1.3b+100", "met"
    );
    let mut rows = Vec::new();
    for &n in &[0usize, 1_000, 10_000, 50_000] {
        let r = pause_run(n);
        let target = 1.3 * r.bound + 100.0;
        println!(
            "{:>8} {:>8.0} {:>10.0} {:>10.0} {:>8.2} {:>10.0} {:>6}",
            n,
            r.dirty,
            r.pause,
            r.bound,
            r.pause / r.bound.max(1.0),
            target,
            if r.pause <= target { "yes" } else { "NO" }
        );
        rows.push((n, r));
    }
    println!("pause breakdown, medians in µs: stop (kick, vCPUs out of KVM_RUN) / wait for the vCPUs' state");
    println!("after the copy / harvest / stage pages / encode state, seal, resume:");
    for (n, r) in &rows {
        println!(
            "{n:>8}: {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0}   stage {:.2} µs/page",
            r.stop,
            r.save_wait,
            r.harvest,
            r.stage,
            r.rest,
            r.stage / r.dirty.max(1.0)
        );
    }
    let ioctl = vcpu_ioctl_us();
    let zero = &rows[0].1;
    println!(
        "fixed part at 0 pages: one vCPU ioctl costs {ioctl:.1} µs here, and the vCPU's state capture issues 6 \
         ({:.0} µs) after a stop of {:.0} µs: with the harvest ({:.0} µs) that is {:.0} µs of the {:.0} µs pause",
        6.0 * ioctl,
        zero.stop,
        zero.harvest,
        zero.stop + 6.0 * ioctl + zero.harvest,
        zero.pause
    );
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

/// A loopback copy of `total` bytes in 1 MiB `write_all`s taken in turn
/// from `src` (wrapping), the receiver reading 1 MiB at a time into `dst`
/// (wrapping) and, with `crc`, checksumming what it read. Returns GB/s.
fn raw_copy(total: u64, src: &[u8], dst_len: usize, crc: bool) -> f64 {
    let (mut tx, mut rx) = loopback();
    let recv = std::thread::spawn(move || {
        let mut dst = vec![0x11u8; dst_len];
        let mut h = crc32fast::Hasher::new();
        let (mut got, mut at) = (0u64, 0usize);
        while got < total {
            let end = (at + (1 << 20)).min(dst.len());
            let n = rx.read(&mut dst[at..end]).unwrap();
            assert!(n > 0, "raw copy: EOF");
            if crc {
                h.update(&dst[at..at + n]);
            }
            got += n as u64;
            at = if at + n == dst.len() { 0 } else { at + n };
        }
        std::hint::black_box(h.finalize());
    });
    let t = Instant::now();
    let (mut sent, mut at) = (0u64, 0usize);
    while sent < total {
        let n = ((total - sent) as usize).min(1 << 20).min(src.len() - at);
        tx.write_all(&src[at..at + n]).unwrap();
        sent += n as u64;
        at = (at + n) % src.len();
    }
    recv.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Pages of the checkpoints of section 2.
const STREAM_PAGES: usize = 10_000;

/// One repetition of section 2: GB/s of each way of sending `rounds`
/// copies of `frame` (see [`stream_vs_raw`]).
fn stream_once(frame: &CheckpointFrame<'_>, shape: &GuestShape, rounds: usize) -> [f64; 6] {
    let total = frame.len() * rounds as u64;
    let frame_len = frame.len() as usize;
    let hot = vec![0x5au8; 1 << 20];
    let raw = raw_copy(total, &hot, 1 << 20, false);
    let cold = vec![0x5au8; frame_len];
    let raw_cold = raw_copy(total, &cold, 1 << 20, false);
    let raw_cold_crc = raw_copy(total, &cold, frame_len, true);
    drop(cold);

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
    for _ in 0..rounds {
        tx.send_checkpoint(frame).unwrap();
    }
    drain.join().unwrap();
    let ckpt = total as f64 / t.elapsed().as_secs_f64() / 1e9;

    // As the channel sent before it offered a slab per call: the whole
    // rest of the frame in each non-blocking sendmsg, a wait for room
    // whenever the socket buffer was full.
    let (tx, mut rx) = loopback();
    tx.set_nonblocking(true).unwrap();
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            got += rx.read(&mut b).unwrap() as u64;
        }
    });
    let t = Instant::now();
    for _ in 0..rounds {
        let mut iov: Vec<std::io::IoSlice<'_>> =
            frame.chunks().map(std::io::IoSlice::new).collect();
        let mut rest = &mut iov[..];
        while !rest.is_empty() {
            match (&tx).write_vectored(rest) {
                Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    use std::os::fd::AsRawFd;
                    let mut p = libc::pollfd {
                        fd: tx.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, living across the call.
                    unsafe { libc::poll(&mut p, 1, -1) };
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    drain.join().unwrap();
    let whole = total as f64 / t.elapsed().as_secs_f64() / 1e9;

    // Checkpoint frames into the real standby path: parse, stage, CRC check.
    let (tx, mut rx) = loopback();
    let mut tx = channel(tx);
    let shape = shape.clone();
    let pages = STREAM_PAGES;
    let recv = std::thread::spawn(move || {
        let limits = Limits::for_shape(&shape, u64::MAX, 1 << 20).unwrap();
        let mut reader = FrameReader::new(limits);
        let mut st = Staging::new(limits.staging_config()).unwrap();
        for _ in 0..rounds {
            match reader.read_frame(&mut rx, &mut st).unwrap() {
                Frame::Checkpoint(cp) => assert_eq!(cp.page_count(), pages),
                Frame::Message(m) => panic!("{m:?}"),
            }
        }
    });
    let t = Instant::now();
    for _ in 0..rounds {
        tx.send_checkpoint(frame).unwrap();
    }
    recv.join().unwrap();
    let full = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    [raw, raw_cold, raw_cold_crc, ckpt, full, whole]
}

/// Section 2. The goal's reference is raw TCP sending one hot 1 MiB buffer
/// over and over; a checkpoint is sent from slabs as large as itself (out
/// of cache), and the standby receives it into a staging as large and
/// checks its CRC: the same copies with plain buffers are measured too, as
/// references for the checkpoint's two paths. The frames are also sent as
/// the channel sent them before it offered one slab per `sendmsg`. Repetitions interleave the
/// five ways (the host is shared); ratios are per repetition, then medians.
fn stream_vs_raw() {
    println!("\n## 2. Checkpoint stream vs. raw loopback TCP (same run, 10k-page checkpoints)");
    const ROUNDS: usize = 10;
    const REPS: usize = 7;
    let (staging, shape) = staged(STREAM_PAGES);
    let frame = CheckpointFrame::new(&staging, 1, 1);
    let runs: Vec<[f64; 6]> = (0..REPS)
        .map(|_| stream_once(&frame, &shape, ROUNDS))
        .collect();
    let col = |i: usize| median(&mut runs.iter().map(|r| r[i]).collect::<Vec<_>>());
    let ratio = |a: usize, b: usize| {
        median(&mut runs.iter().map(|r| r[a] / r[b] * 100.0).collect::<Vec<_>>())
    };
    let mb = frame.len() >> 20;
    println!(
        "{REPS} repetitions of {ROUNDS} frames of {mb} MiB each way; medians (GB/s) and median ratios"
    );
    println!(
        "raw TCP, 1 MiB write_all of a hot 1 MiB buffer       {:6.2}  (the goal's reference)",
        col(0)
    );
    println!(
        "raw TCP from a {mb} MiB buffer (out of cache)          {:6.2}  {:4.0} % of raw",
        col(1),
        ratio(1, 0)
    );
    println!(
        "  ... received into a {mb} MiB buffer, CRC-32 checked  {:6.2}  {:4.0} % of raw",
        col(2),
        ratio(2, 0)
    );
    println!(
        "checkpoint frames, receiver drains                   {:6.2}  {:4.0} % of raw, {:4.0} % of raw from {mb} MiB",
        col(3),
        ratio(3, 0),
        ratio(3, 1)
    );
    println!(
        "  ... the whole frame offered per sendmsg (before)   {:6.2}  {:4.0} % of raw, {:4.0} % of raw from {mb} MiB",
        col(5),
        ratio(5, 0),
        ratio(5, 1)
    );
    println!(
        "checkpoint frames, standby verifies                  {:6.2}  {:4.0} % of raw, {:4.0} % of raw received and checked",
        col(4),
        ratio(4, 0),
        ratio(4, 2)
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

/// Section 4.
fn pause_vs_vcpus() {
    println!("## 4. Epoch pause vs. number of busy vCPUs (the guest runs on every vCPU)");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "target: 8 vCPUs ≤ 2 × the 1-vCPU pause; this host has {cores} cores, so more busy vCPUs \
         than that are oversubscribed (each kick may wait for a core)"
    );
    println!(
        "{:>6} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "vcpus",
        "dirty",
        "pages",
        "pause µs",
        "stop",
        "save",
        "harvest",
        "stage",
        "resume",
        "min",
        "× 1 vCPU",
        "min × 1"
    );
    println!("(medians of 15 epochs; min: the shortest pause; met: the 8-vCPU median against the target)");
    for &n in &[0usize, 1_000] {
        let (mut one, mut one_min) = (0.0, 0.0);
        for &vcpus in &[1u8, 2, 4, 8] {
            let r = pause_run_on(n, vcpus);
            if vcpus == 1 {
                (one, one_min) = (r.pause, r.pause_min);
            }
            let ratio = r.pause / one.max(1.0);
            println!(
                "{:>6} {:>6} {:>8.0} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.2} {:>9.2} {:>4}",
                vcpus,
                n,
                r.dirty,
                r.pause,
                r.stop,
                r.save_wait,
                r.harvest,
                r.stage,
                r.resume,
                r.pause_min,
                ratio,
                r.pause_min / one_min.max(1.0),
                if vcpus < 8 {
                    ""
                } else if ratio <= 2.0 {
                    "yes"
                } else {
                    "NO"
                }
            );
        }
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
    // `cargo bench` passes --bench; other arguments pick sections by name
    // (pause, stream, share).
    let picked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| picked.is_empty() || picked.iter().any(|p| name.contains(p.as_str()));
    if run("pause") {
        pause_vs_bound();
    }
    if run("stream") {
        stream_vs_raw();
    }
    if run("share") {
        pause_share();
    }
    if run("vcpus") {
        pause_vs_vcpus();
    }
}
