//! Loopback figures for the transport (prints numbers; asserts nothing).
//!
//! `cargo run --release -p ftvmm-transport --example tcp_bench [MiB per round] [rounds]`
//!
//! 1. Throughput of `send_vectored_all` with 256 × 4 KiB slices per call
//!    (scattered pages of a 64 MiB pool, as a checkpoint's slab list would
//!    point) against plain `write_all` of 1 MiB buffers, on the same
//!    connection, rounds interleaved, medians and their ratio. Each round ends
//!    when the receiver acknowledges the last byte, so socket buffering does
//!    not flatter the sender. Done with the default 4 MiB socket buffers and
//!    with the kernel's auto-tuning.
//! 2. Heartbeat round trip: a heartbeat frame (44 bytes) echoed back, median
//!    and p99.
//! 3. Failure detection: how long after the peer closes its heartbeat
//!    connection `ConnectionClosed` is reported, and how far past
//!    `interval × k` a `Silence` verdict comes.
//! 4. Checkpoint stream: a staged checkpoint (16 Ki scattered pages in the
//!    primary's default 1 MiB slabs, plus 200 KB of state) sent with
//!    `Channel::send_checkpoint`, against std's blocking writev of the same
//!    frame chunks on the same connection, rounds interleaved, medians.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::protocol::{self, HEARTBEAT_FRAME_LEN};
use ftvmm_checkpoint::{CheckpointFrame, Staging, StagingConfig};
use ftvmm_transport::{
    Channel, ChannelListener, Heartbeat, HeartbeatStream, PeerLost, TcpChannel, TcpOptions,
};

const PAGE: usize = 4096;
const SLICES_PER_CALL: usize = 256;
const POOL_PAGES: usize = 16 << 10; // 64 MiB
const T: Duration = Duration::from_secs(10);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A connected channel pair; the receiving end drains rounds of `round`
/// bytes and answers each with one byte.
fn setup(opts: TcpOptions, round: usize) -> (TcpChannel, thread::JoinHandle<()>) {
    let l = ChannelListener::bind_with("127.0.0.1:0", opts).unwrap();
    let tx = TcpChannel::connect_with(l.local_addr(), T, &opts).unwrap();
    let mut rx = l.accept_timeout(T).unwrap();
    let sink = thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut left = round;
        loop {
            let n = rx.recv(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            left -= n;
            if left == 0 {
                rx.send_all(&[1]).unwrap();
                left = round;
            }
        }
    });
    (tx, sink)
}

fn wait_ack(tx: &mut TcpChannel) {
    let mut b = [0u8; 1];
    tx.recv_exact(&mut b).unwrap();
}

fn throughput(label: &str, opts: TcpOptions, round_mib: usize, rounds: usize) {
    let round = round_mib << 20;
    let pool: Vec<u8> = (0..POOL_PAGES * PAGE).map(|i| (i * 31 + 7) as u8).collect();
    let plain = vec![0x5au8; 1 << 20];
    let (mut tx, sink) = setup(opts, round);
    let (snd, rcv) = tx.buffer_sizes().unwrap();

    let calls_per_round = round / (SLICES_PER_CALL * PAGE);
    let mut page = 0usize;
    let mut vectored = Vec::new();
    let mut write_all = Vec::new();
    let mut one_slice = Vec::new();
    let mut std_writev = Vec::new();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(SLICES_PER_CALL);
    // One warm-up round of each, not counted.
    for r in 0..=rounds {
        // A: send_vectored_all, 256 scattered 4 KiB pages per call.
        let t0 = Instant::now();
        for _ in 0..calls_per_round {
            slices.clear();
            for _ in 0..SLICES_PER_CALL {
                page = (page + 7919) % POOL_PAGES; // prime stride: scattered pages
                slices.push(IoSlice::new(&pool[page * PAGE..(page + 1) * PAGE]));
            }
            tx.send_vectored_all(&slices).unwrap();
        }
        wait_ack(&mut tx);
        let a = t0.elapsed();

        // B: plain write_all of 1 MiB buffers on the same socket.
        let t0 = Instant::now();
        for _ in 0..round_mib {
            tx.as_tcp().write_all(&plain).unwrap();
        }
        wait_ack(&mut tx);
        let b = t0.elapsed();

        // C: send_vectored_all of one 1 MiB slice (our send path, no gather).
        let t0 = Instant::now();
        for _ in 0..round_mib {
            tx.send_all(&plain).unwrap();
        }
        wait_ack(&mut tx);
        let c = t0.elapsed();

        // D: std's blocking writev of the same 256 x 4 KiB pages (the same
        // gather, without our non-blocking send + poll loop).
        let t0 = Instant::now();
        for _ in 0..calls_per_round {
            slices.clear();
            for _ in 0..SLICES_PER_CALL {
                page = (page + 7919) % POOL_PAGES;
                slices.push(IoSlice::new(&pool[page * PAGE..(page + 1) * PAGE]));
            }
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = tx.as_tcp().write_vectored(rest).unwrap();
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        wait_ack(&mut tx);
        let d = t0.elapsed();

        if r > 0 {
            let gbs = |d: Duration| round as f64 / d.as_secs_f64() / 1e9;
            vectored.push(gbs(a));
            write_all.push(gbs(b));
            one_slice.push(gbs(c));
            std_writev.push(gbs(d));
        }
    }
    let st = tx.stats();
    tx.shutdown().unwrap();
    sink.join().unwrap();
    let (a, b, c) = (
        median(&mut vectored),
        median(&mut write_all),
        median(&mut one_slice),
    );
    let d = median(&mut std_writev);
    println!(
        "throughput [{label}: SO_SNDBUF {} KiB, SO_RCVBUF {} KiB as reported], {rounds} rounds of {round_mib} MiB, medians:",
        snd >> 10,
        rcv >> 10
    );
    println!("  send_vectored_all 256 x 4 KiB : {a:6.2} GB/s");
    println!("  write_all 1 MiB               : {b:6.2} GB/s");
    println!("  send_vectored_all 1 x 1 MiB   : {c:6.2} GB/s");
    println!("  std writev 256 x 4 KiB        : {d:6.2} GB/s");
    println!("  ratio vectored / write_all    : {:6.3}", a / b);
    println!(
        "  send stats: {} sendmsg calls, {} short writes, {} waits for buffer room",
        st.send_calls, st.short_writes, st.send_waits
    );
}

fn hb_pair() -> (HeartbeatStream, HeartbeatStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect_timeout(&l.local_addr().unwrap(), T).unwrap();
    let (b, _) = l.accept().unwrap();
    (
        HeartbeatStream::from_tcp(a).unwrap(),
        HeartbeatStream::from_tcp(b).unwrap(),
    )
}

fn heartbeat_rtt(n: usize) {
    let (a, b) = hb_pair();
    let mut b = b.into_tcp();
    let echo = thread::spawn(move || {
        let mut buf = [0u8; HEARTBEAT_FRAME_LEN];
        while b.read_exact(&mut buf).is_ok() {
            let m = protocol::Heartbeat::decode_frame(&buf).unwrap();
            b.write_all(
                &protocol::Heartbeat {
                    seq: m.seq + 1,
                    ..m
                }
                .encode_frame(),
            )
            .unwrap();
        }
    });
    let mut a = a.into_tcp();
    let mut rtt = Vec::with_capacity(n);
    let mut buf = [0u8; HEARTBEAT_FRAME_LEN];
    for seq in 0..n as u64 + 100 {
        let t0 = Instant::now();
        a.write_all(
            &protocol::Heartbeat {
                generation: 1,
                epoch: seq,
                seq,
            }
            .encode_frame(),
        )
        .unwrap();
        a.read_exact(&mut buf).unwrap();
        let d = t0.elapsed();
        assert_eq!(
            protocol::Heartbeat::decode_frame(&buf).unwrap().seq,
            seq + 1
        );
        if seq >= 100 {
            rtt.push(d.as_secs_f64() * 1e6);
        }
    }
    drop(a);
    echo.join().unwrap();
    let med = median(&mut rtt);
    println!(
        "heartbeat round trip ({HEARTBEAT_FRAME_LEN} B frame, TCP_NODELAY), {n} samples: median {med:.1} us, p99 {:.1} us, min {:.1} us",
        percentile(&mut rtt, 0.99),
        rtt[0]
    );
}

fn detection(trials: usize) {
    // Close: the peer's handle stops (threads joined, socket shut down).
    let mut close = Vec::new();
    for _ in 0..trials {
        let (a, b) = hb_pair();
        let ha = Heartbeat::start(a, Duration::from_millis(10), 5, 1).unwrap();
        let hb = Heartbeat::start(b, Duration::from_millis(10), 5, 1).unwrap();
        let t0 = Instant::now();
        hb.stop();
        assert_eq!(ha.wait_failure(T), Some(PeerLost::ConnectionClosed));
        close.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "ConnectionClosed after the peer stops: median {:.0} us over {trials} trials (includes joining the peer's threads)",
        median(&mut close)
    );

    // Silence: the peer sends one heartbeat and then nothing.
    let (interval, k) = (Duration::from_millis(10), 5u32);
    let mut late = Vec::new();
    for _ in 0..trials {
        let (a, b) = hb_pair();
        let h = Heartbeat::start(a, interval, k, 1).unwrap();
        let mut b = b.into_tcp();
        b.write_all(
            &protocol::Heartbeat {
                generation: 1,
                epoch: 0,
                seq: 0,
            }
            .encode_frame(),
        )
        .unwrap();
        let end = Instant::now() + T;
        while h.detector().last_seen().is_none() && Instant::now() < end {
            thread::yield_now();
        }
        let heard = h.detector().last_seen().unwrap();
        assert!(matches!(h.wait_failure(T), Some(PeerLost::Silence { .. })));
        let over = heard.elapsed().saturating_sub(interval * k);
        late.push(over.as_secs_f64() * 1e6);
    }
    println!(
        "Silence with interval {} ms x k {k} = {} ms: declared a median {:.0} us (max {:.0} us) after the timeout",
        interval.as_millis(),
        (interval * k).as_millis(),
        median(&mut late),
        late.iter().cloned().fold(0.0, f64::max)
    );
}

fn checkpoint_stream(rounds: usize) {
    const PAGES: usize = 16 << 10;
    let mut st = Staging::new(StagingConfig::for_guest((2 * PAGES * PAGE) as u64)).unwrap();
    let mut w = st.begin_epoch();
    for p in 0..PAGES {
        // Every other page of the guest, as a dirty set would be.
        w.page_slot((2 * p * PAGE) as u64).unwrap().fill(p as u8);
    }
    w.stage_state(&vec![7u8; 200_000]).unwrap();
    w.finish();
    let frame_len = CheckpointFrame::new(&st, 0, 1).len();
    let (mut tx, sink) = setup(TcpOptions::default(), frame_len as usize);
    let (mut ours, mut std_writev) = (Vec::new(), Vec::new());
    for r in 0..=rounds {
        let frame = CheckpointFrame::new(&st, r as u64 + 1, 1);
        // A: the primary's path.
        let t0 = Instant::now();
        assert_eq!(tx.send_checkpoint(&frame).unwrap(), frame_len);
        wait_ack(&mut tx);
        let a = t0.elapsed();
        // B: std's blocking writev of the same chunks.
        let mut slices: Vec<IoSlice<'_>> = frame.chunks().map(IoSlice::new).collect();
        let t0 = Instant::now();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = tx.as_tcp().write_vectored(rest).unwrap();
            IoSlice::advance_slices(&mut rest, n);
        }
        wait_ack(&mut tx);
        let b = t0.elapsed();
        if r > 0 {
            let gbs = |d: Duration| frame_len as f64 / d.as_secs_f64() / 1e9;
            ours.push(gbs(a));
            std_writev.push(gbs(b));
        }
    }
    tx.shutdown().unwrap();
    sink.join().unwrap();
    let (a, b) = (median(&mut ours), median(&mut std_writev));
    println!(
        "checkpoint stream, {} MiB frames ({} chunks), {rounds} rounds, medians:",
        frame_len >> 20,
        CheckpointFrame::new(&st, 0, 1).chunks().count()
    );
    println!("  send_checkpoint               : {a:6.2} GB/s");
    println!("  std writev of the same chunks : {b:6.2} GB/s");
    println!("  ratio                         : {:6.3}", a / b);
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let round_mib = args.first().copied().unwrap_or(128);
    let rounds = args.get(1).copied().unwrap_or(11);
    throughput(
        "4 MiB buffers (default)",
        TcpOptions::default(),
        round_mib,
        rounds,
    );
    let autotune = TcpOptions {
        send_buffer: None,
        recv_buffer: None,
        ..TcpOptions::default()
    };
    throughput("kernel auto-tuning", autotune, round_mib, rounds);
    heartbeat_rtt(5000);
    detection(20);
    checkpoint_stream(rounds);
}
