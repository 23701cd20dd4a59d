//! Benchmark: latency a UDP request/response through the guest gains from
//! network output commit (`--netbuf vmm`), at epoch intervals 5, 10, 25 and
//! 50 ms, against the same guest unprotected, in one run.
//!
//! The test guest answers UDP echo (port 7) within microseconds; the client
//! (the bridge of a namespace this benchmark creates and removes, see
//! `tests/netbuf_topology`) sends one 64-byte request at a time at random
//! phases and times the reply. Protected, the reply is held until the
//! standby acknowledged its epoch: on average half an epoch, plus the
//! checkpoint's transfer and the ack's round trip. Goal per interval:
//! added p50 ≤ interval/2 + transfer + 1 RTT + 1 ms, where transfer + RTT
//! is the median ack latency the primary measured (its `--ft-metrics`).
//!
//! Needs root, /dev/kvm, /dev/net/tun and `ip`:
//! `cargo run --release -p ftvmm --example netbuf_latency [-- REQUESTS]`
//! (build the binary first: `cargo build --release -p ftvmm`).

#[path = "../tests/common/host.rs"]
mod host;
#[path = "../tests/common/netns.rs"]
mod netns;
/// The part of the tests' `common` that `netbuf_topology` is built on (the
/// rest needs the test harness's `ftvmm`).
mod common {
    pub(crate) use super::{host, netns};
}
#[path = "../tests/netbuf_topology/mod.rs"]
mod netbuf_topology;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netbuf_topology::*;

const GUEST: &str = "dirty=64 rounds=10 round_us=1000";

fn ftvmm_bin() -> String {
    if let Ok(p) = std::env::var("FTVMM_BIN") {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/netbuf_latency → target/<profile>/ftvmm
    let bin: PathBuf = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ftvmm"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not built: cargo build --release -p ftvmm",
        bin.display()
    );
    bin.display().to_string()
}

/// A cheap xorshift for request phases.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Round trips (µs) of `n` echo requests sent open-loop at random gaps
/// (1-13 ms, independent of the replies, so they land at every phase of
/// the epoch; a closed loop would lock onto the releases), after a warm-up.
fn measure(sock: &UdpSocket, n: usize, rng: &mut Rng) -> Vec<u64> {
    let guest = format!("{GUEST_IP}:7");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 256];
    // The guest may still be resolving our MAC: warm up until one answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let _ = sock.send_to(b"warm-up", &guest);
        if sock.recv(&mut buf).is_ok() {
            break;
        }
    }
    let rx = sock.try_clone().unwrap();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || {
        let mut got = vec![None; n];
        let mut buf = [0u8; 256];
        let mut left = n;
        let deadline = Instant::now() + Duration::from_secs(120);
        while left > 0 && Instant::now() < deadline {
            if let Ok(m) = rx.recv(&mut buf) {
                if m == 64 {
                    let k = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
                    if k < n && got[k].is_none() {
                        got[k] = Some(start.elapsed());
                        left -= 1;
                    }
                }
            }
        }
        got
    });
    let mut sent = Vec::with_capacity(n);
    for k in 0..n {
        let mut p = [0u8; 64];
        p[..8].copy_from_slice(&(k as u64).to_le_bytes());
        sent.push(start.elapsed());
        sock.send_to(&p, &guest).unwrap();
        std::thread::sleep(Duration::from_micros(1000 + rng.next() % 12_000));
    }
    let got = receiver.join().unwrap();
    let mut rtts: Vec<u64> = got
        .iter()
        .zip(&sent)
        .filter_map(|(g, s)| g.map(|g| (g - *s).as_micros() as u64))
        .collect();
    rtts.sort_unstable();
    rtts
}

fn pct(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
}

fn median_of(metrics: &str, field: &str) -> f64 {
    let mut v: Vec<u64> = metrics
        .lines()
        .filter_map(|l| {
            let i = l.find(&format!("\"{field}\":"))? + field.len() + 3;
            l[i..].split([',', '}']).next()?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1000.0
}

/// One run: (sorted RTTs µs, median ack latency ms); protected when
/// `interval` is given.
fn run(bin: &str, interval: Option<u64>, n: usize, rng: &mut Rng) -> (Vec<u64>, f64) {
    let tag = interval.map(|i| format!("b{i}")).unwrap_or("bu".into());
    let seg = Segment::new(&tag).expect("namespace");
    let dir = TempDir::new(&tag);
    let sock = seg.udp(&format!("{HOST_IP}:0")).unwrap();
    let metrics = dir.path("metrics.jsonl");
    let mut vms = Vec::new();
    let port = free_port();
    if interval.is_some() {
        let s = seg.spawn(
            bin,
            "standby",
            &dir.0,
            &standby_args(&seg, port, &dir.path("standby.console"), &[]),
        );
        assert!(
            wait_until(Duration::from_secs(10), || s.stderr().contains("listening")),
            "standby: {}",
            s.stderr()
        );
        vms.push(s);
    }
    let iv = interval.map(|i| i.to_string()).unwrap_or_default();
    let m = metrics.display().to_string();
    let extra: Vec<&str> = match interval {
        Some(_) => vec![
            "--ft-interval-ms",
            &iv,
            "--netbuf",
            "vmm",
            "--ft-metrics",
            &m,
        ],
        None => vec![],
    };
    let p = seg.spawn(
        bin,
        "primary",
        &dir.0,
        &primary_args(
            &seg,
            interval.map(|_| port),
            &dir.path("primary.console"),
            GUEST,
            &extra,
        ),
    );
    vms.push(p);
    let rtts = measure(&sock, n, rng);
    let ack = median_of(
        &std::fs::read_to_string(&metrics).unwrap_or_default(),
        "ack_latency_us",
    );
    drop(vms);
    (rtts, ack)
}

fn main() {
    if let Some(r) = skip_reason() {
        println!("netbuf_latency: cannot run here: {r}");
        return;
    }
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let bin = ftvmm_bin();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (base, _) = run(&bin, None, n, &mut rng);
    println!(
        "unprotected: {} requests, RTT p50 {:.2} ms p99 {:.2} ms",
        base.len(),
        pct(&base, 0.5),
        pct(&base, 0.99)
    );
    println!();
    println!("| interval | unprotected p50 / p99 | `--netbuf vmm` p50 / p99 | added p50 / p99 | ack latency (transfer + RTT) | goal: added p50 ≤ | met |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for interval in [5u64, 10, 25, 50] {
        let (v, ack) = run(&bin, Some(interval), n, &mut rng);
        let goal = interval as f64 / 2.0 + ack + 1.0;
        let added50 = pct(&v, 0.5) - pct(&base, 0.5);
        println!(
            "| {interval} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            pct(&base, 0.5),
            pct(&base, 0.99),
            pct(&v, 0.5),
            pct(&v, 0.99),
            added50,
            pct(&v, 0.99) - pct(&base, 0.99),
            ack,
            goal,
            if added50 <= goal { "yes" } else { "no" }
        );
    }
}
