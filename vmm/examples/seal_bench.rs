//! What sealing the checkpoint channel costs, sealed vs plain in the same
//! run (figures and ratios; nothing is asserted).
//!
//! 1. Stream throughput: 10k-page checkpoint frames through a keyed
//!    (AES-256-GCM, or ChaCha20-Poly1305 without AES-NI) and an insecure
//!    pair made by the real handshake, the standby side parsing, staging
//!    and verifying every frame as the standby does; next to raw loopback
//!    TCP (1 MiB `write_all`) and to the AEAD alone on one core. Rounds
//!    interleaved, medians.
//! 2. The pair through the real binary (release), keyed vs `--ft-insecure`,
//!    the demo's guest workload: median pause, transfer and ack latency per
//!    epoch from the metrics, runs interleaved.
//!
//! `cargo run --release -p ftvmm --example seal_bench [-- --quick]`

#[path = "../benches/common/mod.rs"]
mod fixtures;
#[path = "../tests/common/host.rs"]
mod host;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use fixtures::staged;
use ftvmm_checkpoint::wire::Limits;
use ftvmm_checkpoint::{CheckpointFrame, EpochMetrics, Frame, FrameReader, GuestShape, Staging};
use ftvmm_transport::{
    connect_pair_with, Channel, ChannelListener, Cipher, FtKey, Security, TcpOptions,
};
use host::{free_port, read, Proc, TempDir};

const PAGES: usize = 10_000;
const ROUNDS: usize = 20;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn raw_tcp(total: u64) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    tx.set_nodelay(true).unwrap();
    let drain = thread::spawn(move || {
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
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// GB/s of `ROUNDS` frames through a pair made by the real handshake with
/// `security`, the receiver verifying every frame as the standby does; also
/// the sender's and the receiver's CPU time per byte (ns).
fn frames(staging: &Staging, shape: &GuestShape, security: &Security) -> (f64, f64, f64) {
    let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
    l.set_security(security.clone());
    let addr = l.local_addr();
    let sec = security.clone();
    let p = thread::spawn(move || {
        connect_pair_with(addr, Duration::from_secs(5), &TcpOptions::default(), &sec).unwrap()
    });
    let (mut rx, _s_hb) = l.accept_pair(Duration::from_secs(5)).unwrap();
    let (mut tx, _p_hb) = p.join().unwrap();
    let shape = shape.clone();
    let recv = thread::spawn(move || {
        let limits = Limits::for_shape(&shape, u64::MAX, 1 << 20).unwrap();
        let mut reader = FrameReader::new(limits);
        // As the standby does: no CRC where the channel authenticates.
        reader.trust_channel(rx.cipher().is_some());
        let mut st = Staging::new(limits.staging_config()).unwrap();
        let c0 = thread_cpu();
        for _ in 0..ROUNDS {
            match reader.read_frame(&mut rx, &mut st).unwrap() {
                Frame::Checkpoint(cp) => assert_eq!(cp.page_count(), PAGES),
                Frame::Message(m) => panic!("{m:?}"),
            }
        }
        thread_cpu() - c0
    });
    let frame = CheckpointFrame::new(staging, 1, 1);
    let total = frame.len() * ROUNDS as u64;
    let t = Instant::now();
    let c0 = thread_cpu();
    for _ in 0..ROUNDS {
        tx.send_checkpoint(&frame).unwrap();
    }
    let send_cpu = thread_cpu() - c0;
    let recv_cpu = recv.join().unwrap();
    let per_byte = |d: Duration| d.as_nanos() as f64 / total as f64;
    (
        total as f64 / t.elapsed().as_secs_f64() / 1e9,
        per_byte(send_cpu),
        per_byte(recv_cpu),
    )
}

/// GB/s of sealing 256 KiB records in place on this core (the AEAD alone).
fn aead_alone(cipher: Cipher) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
    let alg = match cipher {
        Cipher::Aes256Gcm => &AES_256_GCM,
        Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
    };
    let key = LessSafeKey::new(UnboundKey::new(alg, &[3u8; 32]).unwrap());
    let mut buf = vec![0x5au8; 256 << 10];
    let n = 2000u64;
    let t = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&i.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .unwrap();
        let _ = std::hint::black_box(tag);
    }
    (n * buf.len() as u64) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn stream(quick: bool) {
    println!("## 1. Checkpoint stream, sealed vs plain (same run, {PAGES}-page frames, standby verifies)");
    let (staging, shape) = staged(PAGES);
    let total = CheckpointFrame::new(&staging, 1, 1).len() * ROUNDS as u64;
    let keyed = Security::keyed(FtKey::generate().unwrap());
    let reps = if quick { 3 } else { 7 };
    let (mut raw, mut plain, mut sealed) = (vec![], vec![], vec![]);
    let (mut cpu_plain, mut cpu_sealed) = (vec![], vec![]);
    for _ in 0..reps {
        raw.push(raw_tcp(total));
        let (gbs, s, r) = frames(&staging, &shape, &Security::Insecure);
        plain.push(gbs);
        cpu_plain.push((s, r));
        let (gbs, s, r) = frames(&staging, &shape, &keyed);
        sealed.push(gbs);
        cpu_sealed.push((s, r));
    }
    let (raw, plain, sealed) = (median(&mut raw), median(&mut plain), median(&mut sealed));
    let cpu = |v: &[(f64, f64)]| {
        let mut s: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut r: Vec<f64> = v.iter().map(|x| x.1).collect();
        (median(&mut s), median(&mut r))
    };
    let ((ps, pr), (ss, sr)) = (cpu(&cpu_plain), cpu(&cpu_sealed));
    let cipher = Cipher::preferred();
    println!("raw TCP (1 MiB write_all)              {raw:6.2} GB/s");
    println!(
        "plain frames (--ft-insecure)           {plain:6.2} GB/s  ({:.0} % of raw)",
        plain / raw * 100.0
    );
    println!(
        "sealed frames ({:<17})       {sealed:6.2} GB/s  ({:.0} % of raw, {:.0} % of plain; target >= 80 %)",
        cipher.name(),
        sealed / raw * 100.0,
        sealed / plain * 100.0
    );
    println!(
        "the AEAD alone on one core             {:6.2} GB/s ({})",
        aead_alone(cipher),
        cipher.name()
    );
    println!(
        "CPU ns per byte, sender / receiver: plain {ps:.2} / {pr:.2}, sealed {ss:.2} / {sr:.2}"
    );
}

fn read_metrics(path: &Path) -> Vec<EpochMetrics> {
    read(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// One protected run of `secs` with `key_args`; the epochs after warm-up.
fn pair_run(
    bin: &Path,
    dir: &TempDir,
    tag: &str,
    key_args: &[&str],
    secs: u64,
) -> Vec<EpochMetrics> {
    let port = free_port();
    let spawn = |name: &'static str, args: Vec<String>| {
        let mut c = Command::new(bin);
        c.args(args).env_remove("FTVMM_FT_KEY");
        Proc::spawn(c, name, &dir.0)
    };
    let mut s_args: Vec<String> = vec![
        "standby".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--serial".into(),
        "none".into(),
    ];
    s_args.extend(key_args.iter().map(|s| s.to_string()));
    let mut standby = spawn("standby", s_args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !standby.stderr().contains("listening") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let metrics = dir.path(&format!("{tag}.jsonl"));
    let _ = std::fs::remove_file(&metrics);
    let mut p_args: Vec<String> = vec![
        "run".into(),
        "--mem-mib".into(),
        "128".into(),
        "--cmdline".into(),
        "dirty=512 span=2048 rounds=2 round_us=2000".into(),
        "--serial".into(),
        "none".into(),
        "--ft-peer".into(),
        format!("127.0.0.1:{port}"),
        "--ft-interval-ms".into(),
        "25".into(),
        "--heartbeat-ms".into(),
        "200".into(),
        "--ft-metrics".into(),
        metrics.display().to_string(),
    ];
    p_args.extend(key_args.iter().map(|s| s.to_string()));
    let mut primary = spawn("primary", p_args);
    thread::sleep(Duration::from_secs(secs));
    standby.kill();
    primary.kill();
    let m = read_metrics(&metrics);
    m.into_iter().skip(20).collect()
}

fn epochs(quick: bool) {
    println!(
        "\n## 2. The pair through the binary: keyed vs --ft-insecure (demo workload, 25 ms epochs)"
    );
    let bin = host::release_ftvmm();
    let dir = TempDir::new("seal-bench");
    let key = dir.path("ft.key");
    FtKey::write_new(&key).unwrap();
    let key = key.display().to_string();
    let secs = if quick { 4 } else { 8 };
    let (mut keyed, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..if quick { 1 } else { 2 } {
        keyed.extend(pair_run(&bin, &dir, "keyed", &["--ft-key", &key], secs));
        plain.extend(pair_run(&bin, &dir, "plain", &["--ft-insecure"], secs));
    }
    let med = |v: &[EpochMetrics], f: fn(&EpochMetrics) -> u64| {
        let mut x: Vec<f64> = v.iter().map(|m| f(m) as f64).collect();
        if x.is_empty() {
            return f64::NAN;
        }
        median(&mut x)
    };
    println!(
        "{:>10} {:>7} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "channel", "epochs", "dirty med", "pause µs", "transfer µs", "ack µs", "bytes med"
    );
    for (name, v) in [("keyed", &keyed), ("insecure", &plain)] {
        println!(
            "{:>10} {:>7} {:>10.0} {:>10.0} {:>12.0} {:>12.0} {:>12.0}",
            name,
            v.len(),
            med(v, |m| m.dirty_total()),
            med(v, |m| m.pause_us),
            med(v, |m| m.transfer_us),
            med(v, |m| m.ack_latency_us),
            med(v, |m| m.bytes_sent),
        );
    }
    println!(
        "added by sealing: pause {:+.0} µs, transfer {:+.0} µs, ack latency {:+.0} µs (medians)",
        med(&keyed, |m| m.pause_us) - med(&plain, |m| m.pause_us),
        med(&keyed, |m| m.transfer_us) - med(&plain, |m| m.transfer_us),
        med(&keyed, |m| m.ack_latency_us) - med(&plain, |m| m.ack_latency_us),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    stream(quick);
    epochs(quick);
}
