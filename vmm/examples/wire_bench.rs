//! Benchmark of the page encoding and the initial sync (figures and ratios
//! measured A against B in the same run; nothing is asserted).
//!
//! 1. Bytes on the wire for the demo workload (`dirty=512 span=2048
//!    rounds=2 round_us=2000`, 25 ms epochs) through the real binary, with
//!    `--ft-cache-mib 64` (deltas) and `--ft-cache-mib 0` (zero pages only):
//!    Σ `bytes_sent` / Σ dirty page bytes from the primary's
//!    `--ft-metrics`, and the medians of encode, transfer and ack latency.
//!    Target: ≤ 10 %.
//! 2. Stream throughput of incompressible pages (random content, new every
//!    checkpoint) in-process over loopback TCP: 10 000-page checkpoints
//!    staged, encoded or not, framed, sent, received, verified and applied
//!    into the standby's memory, each acked before the next (as epochs
//!    are); dirty bytes per second of that path, plain frames against the
//!    encoder (with and without a cache), next to raw TCP moving the same
//!    bytes with the same stop-and-wait. Target: no loss. Also the
//!    effective rate for pages that change one word (demo-like).
//! 3. Time to protection of a fresh guest of 1, 4 and 8 GiB, idle and with
//!    most of its memory written, through the real binary: the guest runs
//!    unprotected, then `ctl protect` pairs it with a standby; the time to
//!    the end of the initial sync (when `protect` answers) and to the
//!    standby's first committed checkpoint (its `status`). With
//!    `FTVMM_BIN_BEFORE=PATH` the same for another build (its own
//!    standby), e.g. the one before the page encoding.
//!
//! `cargo run --release -p ftvmm --example wire_bench [-- 1 2 3]` (the
//! sections to run; all by default). Needs /dev/kvm for 1 and 3; builds
//! `target/release/ftvmm` first (`FTVMM_BIN` overrides). `WIRE_BENCH_GIB`
//! (e.g. `1,4`) limits section 3's sizes. Every child process and scratch
//! file is removed on exit, on a panic and on SIGINT/SIGTERM.

#[path = "../benches/common/mod.rs"]
mod fixtures;
#[path = "../tests/common/host.rs"]
mod host;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fixtures::loopback;
use ftvmm::api::{call_with_timeout, Request};
use ftvmm_checkpoint::wire::{encode_message, Ack, Frame, FrameReader, Limits, Message};
use ftvmm_checkpoint::{
    CheckpointFrame, DevicesSummary, Encoder, EpochMetrics, GuestShape, Staging, PAGE_SIZE,
};
use ftvmm_transport::{Channel, TcpChannel, TcpOptions};
use host::{
    catch_signals, check_interrupt, free_port, interruptible_sleep, interruptible_wait, read, Proc,
    TempDir,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DEMO_GUEST: &str = "dirty=512 span=2048 rounds=2 round_us=2000";
const INTERVAL_MS: u64 = 25;
const WARMUP: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(5);
/// Pages of one checkpoint in section 2.
const PAGES: usize = 10_000;
/// Distinct page contents section 2 cycles through.
const SETS: usize = 3;
/// Checkpoints per arm and repetition in section 2.
const ROUNDS: usize = 10;

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// xorshift64*: cheap incompressible bytes.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

struct Bench {
    bin: PathBuf,
    dir: TempDir,
}

impl Bench {
    fn new(bin: PathBuf, tag: &str) -> Bench {
        Bench {
            bin,
            dir: TempDir::new(tag),
        }
    }

    fn spawn(&self, name: &'static str, args: &[String]) -> Proc {
        let mut c = Command::new(&self.bin);
        c.args(args).env("FTVMM_FT_KEY", host::test_key());
        Proc::spawn(c, name, &self.dir.0)
    }

    /// A standby on a fresh port, with a control API; returns it, its port
    /// and its API socket once it listens.
    fn standby(&self, name: &'static str) -> (Proc, u16, PathBuf) {
        let port = free_port();
        let api = self.dir.path(&format!("{name}.sock"));
        let a: Vec<String> = vec![
            "standby".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--serial".into(),
            "none".into(),
            "--api".into(),
            api.display().to_string(),
        ];
        let mut p = self.spawn(name, &a);
        let ok = interruptible_wait(Duration::from_secs(20), Duration::from_millis(20), || {
            p.stderr().contains("listening")
        });
        assert!(ok && p.running(), "standby did not listen:\n{}", p.stderr());
        (p, port, api)
    }
}

// ------------------------------------------------------- 1. demo workload

fn metrics(path: &Path) -> Vec<EpochMetrics> {
    read(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn demo_workload(bin: &Path) {
    println!("## 1. Bytes on the wire, demo workload ({DEMO_GUEST}, {INTERVAL_MS} ms epochs)");
    println!(
        "{:>10} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "cache MiB",
        "epochs",
        "dirty MB",
        "sent MB",
        "sent %",
        "pause µs",
        "encode µs",
        "xfer µs",
        "ack µs"
    );
    for cache in ["64", "0"] {
        let b = Bench::new(bin.to_path_buf(), "wire-demo");
        let (mut standby, port, _) = b.standby("standby");
        let m = b.dir.path("metrics.jsonl");
        let a: Vec<String> = [
            "run",
            "--mem-mib",
            "256",
            "--cmdline",
            DEMO_GUEST,
            "--serial",
            "none",
            "--ft-peer",
            &format!("127.0.0.1:{port}"),
            "--ft-interval-ms",
            &INTERVAL_MS.to_string(),
            "--heartbeat-ms",
            "200",
            "--ft-cache-mib",
            cache,
            "--ft-metrics",
            &m.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut primary = b.spawn("primary", &a);
        interruptible_sleep(WARMUP);
        let skip = metrics(&m).len();
        interruptible_sleep(WINDOW);
        standby.kill();
        primary.kill();
        let all = metrics(&m);
        let w = &all[skip.min(all.len())..];
        let dirty: u64 = w.iter().map(EpochMetrics::dirty_bytes).sum();
        let sent: u64 = w.iter().map(|e| e.bytes_sent).sum();
        let med = |f: fn(&EpochMetrics) -> u64| {
            median(&mut w.iter().map(|e| f(e) as f64).collect::<Vec<_>>())
        };
        println!(
            "{:>10} {:>7} {:>10.1} {:>10.2} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            cache,
            w.len(),
            dirty as f64 / 1e6,
            sent as f64 / 1e6,
            sent as f64 * 100.0 / dirty.max(1) as f64,
            med(|e| e.pause_us),
            med(|e| e.encode_us),
            med(|e| e.transfer_us),
            med(|e| e.ack_latency_us),
        );
    }
}

// ------------------------------------------------- 2. stream throughput

fn channel(s: TcpStream) -> TcpChannel {
    let peer = s.peer_addr().unwrap();
    TcpChannel::from_stream(s, peer, &TcpOptions::default()).unwrap()
}

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    /// Plain frames (every page raw), as before the encoding.
    Plain,
    /// The encoder with a 64 MiB cache.
    Cache,
    /// The encoder without a cache (zero test only).
    NoCache,
}

const MEM: u64 = (2 * PAGES * PAGE_SIZE) as u64;

fn shape() -> GuestShape {
    GuestShape {
        mem_bytes: MEM,
        vcpus: 1,
        cmdline: String::new(),
        devices: DevicesSummary::default(),
    }
}

/// One primary → standby path of section 2: a loopback channel, a standby
/// thread that verifies, applies and acks each checkpoint into its own
/// memory, the primary's staging and (for the encoding arms) its encoder,
/// all kept from round to round as in a protected run.
struct Pipeline {
    tx: TcpChannel,
    standby: Option<std::thread::JoinHandle<()>>,
    staging: Staging,
    encoder: Option<Encoder>,
    acks: FrameReader,
    ctl: Staging,
    epoch: u64,
}

impl Pipeline {
    fn new(arm: Arm, rounds: usize) -> Pipeline {
        let (tx, rx) = loopback();
        let tx = channel(tx);
        let mut rx = channel(rx);
        let limits = Limits::for_shape(&shape(), u64::MAX, 1 << 20).unwrap();
        let standby = std::thread::spawn(move || {
            let mem: GuestMemoryMmap =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
            // Back the standby's memory first, as a standby's is after its sync.
            mem.write_slice(&vec![0u8; MEM as usize], GuestAddress(0))
                .unwrap();
            let mut reader = FrameReader::new(limits);
            let mut st = Staging::new(limits.staging_config()).unwrap();
            let (mut state, mut ack) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let mut r = rx.reader();
                let Frame::Checkpoint(cp) = reader.read_frame(&mut r, &mut st).unwrap() else {
                    panic!("not a checkpoint")
                };
                cp.apply(&mem, &mut state).unwrap();
                let a = Message::Ack(Ack {
                    epoch: cp.epoch(),
                    generation: 1,
                });
                encode_message(&a, &mut ack).unwrap();
                rx.send_all(&ack).unwrap();
            }
        });
        Pipeline {
            tx,
            standby: Some(standby),
            staging: Staging::new(limits.staging_config()).unwrap(),
            encoder: match arm {
                Arm::Plain => None,
                Arm::Cache => Some(Encoder::new(64 << 20, MEM)),
                Arm::NoCache => Some(Encoder::new(0, MEM)),
            },
            acks: FrameReader::new(Limits::handshake()),
            ctl: Staging::new(ftvmm_checkpoint::StagingConfig {
                max_pages: 0,
                ..Limits::handshake().staging_config()
            })
            .unwrap(),
            epoch: 0,
        }
    }

    /// One checkpoint of `pages`; its dirty bytes per second from its
    /// encode to its ack, and the share of that time the encode took.
    fn round(&mut self, pages: &[u8]) -> (f64, f64) {
        check_interrupt();
        self.epoch += 1;
        // The pause's copy (not timed: the same for every arm).
        let mut w = self.staging.begin_epoch();
        for (i, p) in pages.chunks_exact(PAGE_SIZE).enumerate() {
            w.page_slot((i * 2 * PAGE_SIZE) as u64)
                .unwrap()
                .copy_from_slice(p);
        }
        w.stage_state(&[7u8; 8192]).unwrap();
        w.finish();
        let t = Instant::now();
        if let Some(e) = &mut self.encoder {
            e.encode(&mut self.staging);
        }
        let encode = t.elapsed();
        let frame = CheckpointFrame::new(&self.staging, self.epoch, 1);
        self.tx.send_checkpoint(&frame).unwrap();
        match self.acks.read_frame(&mut self.tx.reader(), &mut self.ctl) {
            Ok(Frame::Message(Message::Ack(_))) => {}
            other => panic!("no ack: {other:?}"),
        }
        let all = t.elapsed().as_secs_f64();
        ((PAGES * PAGE_SIZE) as f64 / all, encode.as_secs_f64() / all)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.tx.shutdown();
        if let Some(h) = self.standby.take() {
            let _ = h.join();
        }
    }
}

/// Raw TCP moving the same bytes with the same stop-and-wait: a 1 MiB
/// `write_all` at a time, then a 1-byte answer once the receiver has them.
fn raw_stop_and_wait(rounds: usize) -> Vec<f64> {
    let bytes = (PAGES * PAGE_SIZE) as u64;
    let (mut tx, mut rx) = loopback();
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 20];
        for _ in 0..rounds {
            let mut got = 0u64;
            while got < bytes {
                let n = rx.read(&mut b).unwrap();
                assert!(n > 0, "raw: receiver saw EOF");
                got += n as u64;
            }
            rx.write_all(&[1]).unwrap();
        }
    });
    let mut chunk = vec![0u8; 1 << 20];
    fill_random(&mut chunk, 3);
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(1 << 20) as usize;
            tx.write_all(&chunk[..n]).unwrap();
            sent += n as u64;
        }
        let mut one = [0u8; 1];
        tx.read_exact(&mut one).unwrap();
        rates.push(bytes as f64 / t.elapsed().as_secs_f64());
    }
    drain.join().unwrap();
    rates
}

fn stream_throughput() {
    println!(
        "\n## 2. Stream throughput, {PAGES}-page checkpoints through encode, frame, send, verify, apply, ack"
    );
    // Incompressible: every checkpoint's pages are new random bytes.
    let mut sets = vec![vec![0u8; PAGES * PAGE_SIZE]; SETS];
    for (i, s) in sets.iter_mut().enumerate() {
        fill_random(s, 100 + i as u64);
    }
    let random = |r: usize, out: &mut [u8]| out.copy_from_slice(&sets[r % SETS]);
    // Demo-like: one word per page changes every checkpoint.
    let demo = |r: usize, out: &mut [u8]| {
        if r == 0 {
            out.copy_from_slice(&sets[0]);
        }
        for p in out.chunks_exact_mut(PAGE_SIZE) {
            p[..8].copy_from_slice(&(r as u64).to_le_bytes());
        }
    };
    let rounds = 3 * ROUNDS;
    let mut pipes = [
        Pipeline::new(Arm::Plain, rounds),
        Pipeline::new(Arm::Cache, rounds),
        Pipeline::new(Arm::NoCache, rounds),
        Pipeline::new(Arm::Cache, rounds),
    ];
    let mut rates = [vec![], vec![], vec![], vec![]];
    let mut shares = [vec![], vec![], vec![], vec![]];
    let mut page = vec![0u8; PAGES * PAGE_SIZE];
    let mut demo_page = vec![0u8; PAGES * PAGE_SIZE];
    let mut raw = raw_stop_and_wait(ROUNDS);
    // Round by round, arm after arm, so that the host's load drifts alike
    // for all; the first two rounds warm the cache (a copy per page, then a
    // failed delta per page) and are left out.
    for r in 0..rounds {
        for (i, p) in pipes.iter_mut().enumerate() {
            let rate = if i < 3 {
                random(r, &mut page);
                p.round(&page)
            } else {
                demo(r, &mut demo_page);
                p.round(&demo_page)
            };
            if r >= 2 {
                rates[i].push(rate.0);
                shares[i].push(rate.1);
            }
        }
    }
    drop(pipes);
    raw.extend(raw_stop_and_wait(ROUNDS));
    let [mut plain, mut cache, mut nocache, mut compressible] = rates;
    let raw = median(&mut raw);
    let row = |name: &str, v: &mut Vec<f64>, share: &mut Vec<f64>| {
        let m = median(v);
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "{name:<44} {:>6.2} GB/s median (min {:>5.2}), {:>5.0} % of raw; encode {:.1} % of the time",
            m / 1e9,
            min / 1e9,
            m / raw * 100.0,
            median(share) * 100.0
        );
        m
    };
    let [mut s_plain, mut s_cache, mut s_nocache, mut s_comp] = shares;
    println!(
        "{:<44} {:>6.2} GB/s median",
        "raw TCP, same bytes, same stop-and-wait",
        raw / 1e9
    );
    let p = row(
        "plain frames (no encoding), random pages",
        &mut plain,
        &mut s_plain,
    );
    let c = row(
        "encoded, 64 MiB cache, random pages",
        &mut cache,
        &mut s_cache,
    );
    row(
        "encoded, no cache, random pages",
        &mut nocache,
        &mut s_nocache,
    );
    println!("encoded / plain for incompressible pages: {:.2}", c / p);
    row(
        "encoded, 64 MiB cache, one word per page",
        &mut compressible,
        &mut s_comp,
    );
}

// --------------------------------------------------- 3. time to protection

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// Pages the test guest writes to cover most of `gib` GiB: its largest
/// stretch of RAM above 16 MiB (below the 3 GiB MMIO gap, or above 4 GiB).
fn written_pages(gib: u64) -> u64 {
    let mem = gib << 30;
    let gap = 3u64 << 30;
    let largest = if mem <= gap {
        mem - (16 << 20)
    } else {
        (gap - (16 << 20)).max(mem - gap)
    };
    // Leave room for the guest's own image and tables.
    (largest - (8 << 20)) / PAGE_SIZE as u64
}

/// Raw loopback TCP moving `bytes` in 1 MiB writes, until the receiver has
/// them all; with `fresh`, the receiver lands them in newly mapped memory,
/// as a standby fills its guest memory (each first write of a page faults
/// it in).
fn raw_tcp(bytes: u64, fresh: bool) -> Duration {
    let (mut tx, mut rx) = loopback();
    let drain = std::thread::spawn(move || {
        let mut landing = if fresh {
            vec![0u8; bytes as usize]
        } else {
            vec![0u8; 1 << 20]
        };
        let mut got = 0u64;
        while got < bytes {
            let at = if fresh { got as usize } else { 0 };
            let end = (at + (1 << 20)).min(landing.len());
            let n = rx.read(&mut landing[at..end]).unwrap();
            assert!(n > 0, "raw: receiver saw EOF");
            got += n as u64;
        }
    });
    let mut chunk = vec![0u8; 1 << 20];
    fill_random(&mut chunk, 5);
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(1 << 20) as usize;
        tx.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    drain.join().unwrap();
    t.elapsed()
}

struct Protected {
    /// Until `ctl protect` answered (the initial sync is done); `None` when
    /// the API gave up waiting for the answer (the sync goes on).
    synced: Option<Duration>,
    /// Until the standby committed its first checkpoint.
    protected: Duration,
    /// The primary's own report line, where it has one.
    report: Option<String>,
    /// Raw TCP just before, while the guest ran, in bytes per second: into
    /// a reused buffer, and into fresh memory (of the written bytes, at most
    /// 1 GiB).
    floors: Option<(f64, f64)>,
}

/// Boots a guest of `gib` GiB unprotected (writing `written` pages once,
/// then idling), then pairs it with a new standby and times it.
fn time_to_protect(bin: &Path, gib: u64, written: u64) -> Protected {
    let b = Bench::new(bin.to_path_buf(), "wire-ttp");
    let (mut standby, port, standby_api) = b.standby("standby");
    let api = b.dir.path("primary.sock");
    let console = b.dir.path("primary.console");
    let cmdline = if written == 0 {
        "dirty=0 rounds=1000000 round_us=1000".to_string()
    } else {
        // One round that writes every page of the span, then an hour's wait.
        format!("dirty={written} span={written} rounds=1 round_us=3600000000")
    };
    let a: Vec<String> = [
        "run",
        "--mem-mib",
        &(gib << 10).to_string(),
        "--cmdline",
        &cmdline,
        "--serial",
        &format!("file:{}", console.display()),
        "--api",
        &api.display().to_string(),
        "--ft-interval-ms",
        &INTERVAL_MS.to_string(),
        "--heartbeat-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut primary = b.spawn("primary", &a);
    let pid = primary.child.id();
    assert!(
        interruptible_wait(Duration::from_secs(60), Duration::from_millis(20), || read(
            &console
        )
        .contains("ftguest ready")),
        "guest not ready:\n{}",
        primary.stderr()
    );
    if written > 0 {
        // Written once the primary's memory stops growing near the target.
        let target = written * PAGE_SIZE as u64 * 98 / 100;
        let ok = interruptible_wait(Duration::from_secs(600), Duration::from_millis(200), || {
            rss_bytes(pid) >= target
        });
        assert!(ok, "the guest did not write {written} pages");
        interruptible_sleep(Duration::from_millis(500));
    }
    let bytes = (written * PAGE_SIZE as u64).min(1 << 30);
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64();
    let floors = (written > 0).then(|| (rate(raw_tcp(bytes, false)), rate(raw_tcp(bytes, true))));
    let t = Instant::now();
    let resp = call_with_timeout(
        &api,
        &Request::Protect {
            peer: format!("127.0.0.1:{port}"),
        },
        Duration::from_secs(600),
    )
    .expect("ctl protect");
    let gave_up = resp
        .error
        .as_deref()
        .is_some_and(|e| e.contains("did not answer in time"));
    let synced = (!gave_up).then(|| t.elapsed());
    assert!(
        resp.ok || gave_up,
        "protect refused: {:?}\n{}",
        resp.error,
        primary.stderr()
    );
    let committed = || {
        call_with_timeout(&standby_api, &Request::Status, Duration::from_secs(5))
            .ok()
            .and_then(|r| r.result.get("committed_epoch")?.as_u64())
            .is_some()
    };
    let ok = interruptible_wait(
        Duration::from_secs(600),
        Duration::from_millis(5),
        committed,
    );
    assert!(ok, "no committed checkpoint:\n{}", standby.stderr());
    let protected = t.elapsed();
    let report = interruptible_wait(Duration::from_secs(2), Duration::from_millis(20), || {
        primary.stderr().contains("ftvmm: protected by standby")
    })
    .then(|| {
        primary
            .stderr()
            .lines()
            .find(|l| l.starts_with("ftvmm: protected by standby"))
            .map(|l| l.trim_start_matches("ftvmm: ").to_string())
    })
    .flatten();
    standby.kill();
    primary.kill();
    Protected {
        synced,
        protected,
        report,
        floors,
    }
}

fn time_to_protection(after: &Path) {
    println!("\n## 3. Time to protection (ctl protect of a running guest; loopback)");
    let sizes: Vec<u64> = std::env::var("WIRE_BENCH_GIB")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8]);
    let mut builds = vec![("this build", after.to_path_buf())];
    if let Some(b) = std::env::var_os("FTVMM_BIN_BEFORE") {
        builds.insert(0, ("FTVMM_BIN_BEFORE", PathBuf::from(b)));
    }
    println!(
        "{:<18} {:>5} {:>10} {:>14} {:>14}",
        "build", "GiB", "written", "sync done ms", "protected ms"
    );
    for &gib in &sizes {
        for written in [0, written_pages(gib)] {
            for (name, bin) in &builds {
                let p = time_to_protect(bin, gib, written);
                println!(
                    "{:<18} {:>5} {:>9.0}% {:>14} {:>14.0}",
                    name,
                    gib,
                    written as f64 * 100.0 * PAGE_SIZE as f64 / (gib << 30) as f64,
                    p.synced.map_or("(no answer)".to_string(), |d| format!(
                        "{:.0}",
                        d.as_secs_f64() * 1e3
                    )),
                    p.protected.as_secs_f64() * 1e3
                );
                if let Some((raw, fresh)) = p.floors {
                    let bytes = written as f64 * PAGE_SIZE as f64;
                    let sync = bytes / p.synced.unwrap_or(p.protected).as_secs_f64();
                    println!(
                        "    {:.0} MB written: synced at {:.2} GB/s; raw TCP {:.2} GB/s, into fresh memory {:.2} GB/s \
                         (same moment): {:.0} % and {:.0} % of them",
                        bytes / 1e6,
                        sync / 1e9,
                        raw / 1e9,
                        fresh / 1e9,
                        sync / raw * 100.0,
                        sync / fresh * 100.0,
                    );
                }
                if let Some(r) = p.report {
                    println!("    {r}");
                }
            }
        }
    }
}

fn main() {
    catch_signals();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let bin = (kvm && (want("1") || want("3"))).then(host::release_ftvmm);
    if want("1") {
        match &bin {
            Some(b) => demo_workload(b),
            None => println!("SKIP 1: /dev/kvm is not accessible"),
        }
    }
    if want("2") {
        stream_throughput();
    }
    if want("3") {
        match &bin {
            Some(b) => time_to_protection(b),
            None => println!("SKIP 3: /dev/kvm is not accessible"),
        }
    }
}
