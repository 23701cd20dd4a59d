//! Benchmark of disk replication through the real binary (figures and
//! ratios against floors measured in the same run; nothing is asserted).
//!
//! 1. Initial sync of a 1 GiB image (sparse, ~30 % of its 1 MiB blocks
//!    random data; the replica equal to it but for a few blocks) with
//!    `--ft-disk-sync hashes` and `--ft-disk-sync full`: blocks and bytes
//!    sent and the time, from the primary's `disk sync (…)` report line,
//!    next to the floors measured here: read + SHA-256 of the whole image
//!    (`ring::digest`, as the sync hashes) and a plain loopback `TcpStream`
//!    copy of the same bytes.
//! 2. A write-heavy test guest (`disk_bytes=N`: one write of N bytes per
//!    workload round) against the same guest without a disk, at equal dirty
//!    pages, 25 ms epochs, from the primary's `--ft-metrics` lines: median
//!    pause, median ack latency, disk MB/s replicated; pause ratio (target
//!    ≤ 1.10), replication throughput against raw loopback TCP (target
//!    ≥ 80 %), and the ack latency with `disk_flush=on` (the standby
//!    fdatasyncs before acking an epoch that holds a guest flush).
//!
//! Needs /dev/kvm. `cargo run --release -p ftvmm --example disk_bench`
//! (it builds `target/release/ftvmm` first; `FTVMM_BIN` overrides the
//! binary). Every child process and scratch file is removed on exit, on a
//! panic and on SIGINT/SIGTERM.

#[path = "../tests/common/host.rs"]
mod host;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ftvmm_checkpoint::EpochMetrics;
use host::{
    catch_signals, check_interrupt, free_port, interruptible_sleep, interruptible_wait, read, Proc,
    TempDir,
};

const MIB: u64 = 1 << 20;
/// The initial-sync image.
const SYNC_DISK: u64 = 1 << 30;
/// Share of the image's blocks that hold data, in percent.
const DATA_PERCENT: u64 = 30;
/// Blocks of the replica that differ from the primary's.
const DIFFERING: u64 = 8;
/// The workload runs' disk (the bulk area is its second half).
const WORK_DISK: u64 = 64 * MIB;
/// The workload at equal dirty pages, with and without a disk.
/// Its span is small enough that the guest writes all of it in every epoch
/// whatever the disk costs it (a first write to a page per epoch costs
/// ≈30 µs on PVM hosts: 256 pages ≈ 8 ms of a 25 ms epoch), so every
/// configuration checkpoints the same pages.
const GUEST: &str = "dirty=64 span=256 rounds=2 round_us=1000";
const INTERVAL_MS: u64 = 25;
/// Epochs left out at the start of a workload run, then the measured window.
const WARMUP: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(5);

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Bench {
    bin: PathBuf,
    dir: TempDir,
}

impl Bench {
    fn spawn(&self, name: &'static str, args: &[String]) -> Proc {
        let mut c = Command::new(&self.bin);
        c.args(args).env("FTVMM_FT_KEY", host::test_key());
        Proc::spawn(c, name, &self.dir.0)
    }

    /// A standby on a fresh port with `replica` (if any); returns it and
    /// the port once it listens.
    fn standby(&self, name: &'static str, replica: Option<&Path>) -> (Proc, u16) {
        let port = free_port();
        let mut a: Vec<String> = vec![
            "standby".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--serial".into(),
            "none".into(),
        ];
        if let Some(r) = replica {
            a.extend(["--disk".into(), format!("path={}", r.display())]);
        }
        let mut p = self.spawn(name, &a);
        let ok = interruptible_wait(Duration::from_secs(20), Duration::from_millis(20), || {
            p.stderr().contains("listening")
        });
        assert!(ok && p.running(), "standby did not listen:\n{}", p.stderr());
        (p, port)
    }

    /// A protected primary of the standby on `port`.
    fn primary(
        &self,
        name: &'static str,
        port: u16,
        cmdline: &str,
        disk: Option<&Path>,
        extra: &[&str],
    ) -> Proc {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            cmdline.into(),
            "--serial".into(),
            "none".into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            INTERVAL_MS.to_string(),
            // A loaded 2-core host must not mistake slowness for death.
            "--heartbeat-ms".into(),
            "200".into(),
        ];
        if let Some(d) = disk {
            a.extend(["--disk".into(), format!("path={}", d.display())]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(name, &a)
    }
}

/// Stops a run: the standby first (the primary then runs on unprotected and
/// writes no more metrics), then the primary.
fn stop(mut standby: Proc, mut primary: Proc) {
    standby.kill();
    primary.kill();
}

// ---------------------------------------------------------------- images

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

/// Whether block `b` of the sync image holds data (a fixed ~30 % of them).
fn holds_data(b: u64) -> bool {
    (b.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 100 < DATA_PERCENT
}

/// A sparse image of `bytes` bytes (set_len), zeros.
fn make_image(path: &Path, bytes: u64) -> File {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(bytes).expect("set_len");
    f
}

/// The primary's image and a replica equal to it: the same random data in
/// the same ~30 % of the 1 MiB blocks, holes elsewhere. Returns the blocks
/// with data.
fn make_sync_images(primary: &Path, replica: &Path) -> u64 {
    let p = make_image(primary, SYNC_DISK);
    let r = make_image(replica, SYNC_DISK);
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0;
    for b in (0..SYNC_DISK / MIB).filter(|&b| holds_data(b)) {
        check_interrupt();
        fill_random(&mut buf, b + 1);
        p.write_all_at(&buf, b * MIB).expect("write primary");
        r.write_all_at(&buf, b * MIB).expect("write replica");
        n += 1;
    }
    p.sync_all().expect("sync primary");
    r.sync_all().expect("sync replica");
    n
}

/// Makes `DIFFERING` blocks of the replica differ from the primary: half
/// overwrite data blocks, half fill holes.
fn make_replica_differ(replica: &Path) {
    let r = File::options().write(true).open(replica).expect("replica");
    let blocks = SYNC_DISK / MIB;
    let mut buf = vec![0u8; MIB as usize];
    let (mut data, mut holes) = (0, 0);
    for b in (0..blocks).map(|i| (i * 97 + 13) % blocks) {
        let take = if holds_data(b) {
            data < DIFFERING / 2 && {
                data += 1;
                true
            }
        } else {
            holes < DIFFERING / 2 && {
                holes += 1;
                true
            }
        };
        if take {
            fill_random(&mut buf, 0xd1ff_0000 + b);
            r.write_all_at(&buf, b * MIB).expect("write replica");
        }
        if data + holes == DIFFERING {
            break;
        }
    }
    r.sync_all().expect("sync replica");
}

// ---------------------------------------------------------------- floors

/// Read + SHA-256 of `path` in 1 MiB blocks, as the initial sync hashes.
fn hash_floor(path: &Path) -> Duration {
    let f = File::open(path).expect("open image");
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut off = 0;
    let mut acc = 0u8;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("read image");
        acc ^= ring::digest::digest(&ring::digest::SHA256, &buf[..n]).as_ref()[0];
        off += n as u64;
    }
    std::hint::black_box(acc);
    t.elapsed()
}

/// A plain loopback `TcpStream` copy of `bytes` bytes in 1 MiB writes, until
/// the receiver has read the last one.
fn raw_tcp(bytes: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    tx.set_nodelay(true).unwrap();
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; MIB as usize];
        let mut got = 0u64;
        while got < bytes {
            let n = rx.read(&mut b).unwrap();
            assert!(n > 0, "raw copy: receiver saw EOF");
            got += n as u64;
        }
    });
    let mut chunk = vec![0u8; MIB as usize];
    fill_random(&mut chunk, 42);
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(MIB) as usize;
        tx.write_all(&chunk[..n]).unwrap();
        sent += n as u64;
    }
    drain.join().unwrap();
    t.elapsed()
}

/// Asks for ftvmm's checkpoint-channel socket buffers (transport's
/// `DEFAULT_SOCKET_BUFFER`) on `s`.
fn channel_buffers(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = ftvmm_transport::DEFAULT_SOCKET_BUFFER as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket fd, and a pointer to a c_int of the size given.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Raw loopback TCP under a checkpoint's conditions: a burst of `bytes`
/// (1 MiB writes) every epoch interval, on a connection with the checkpoint
/// channel's socket buffers, the receiver draining all along. Median time
/// for `write_all` of a burst to return, as `transfer_us` is timed.
fn raw_bursts(bytes: u64, bursts: usize) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    tx.set_nodelay(true).unwrap();
    channel_buffers(&tx);
    channel_buffers(&rx);
    let total = bytes * bursts as u64;
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; MIB as usize];
        let mut got = 0u64;
        while got < total {
            let n = rx.read(&mut b).unwrap();
            assert!(n > 0, "raw bursts: receiver saw EOF");
            got += n as u64;
        }
    });
    let mut chunk = vec![0u8; MIB as usize];
    fill_random(&mut chunk, 7);
    let mut times = Vec::with_capacity(bursts);
    let start = Instant::now();
    for i in 0..bursts {
        let at = start + Duration::from_millis(INTERVAL_MS) * i as u32;
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(MIB) as usize;
            tx.write_all(&chunk[..n]).unwrap();
            sent += n as u64;
        }
        times.push(t.elapsed().as_secs_f64());
    }
    drain.join().unwrap();
    Duration::from_secs_f64(median(&mut times))
}

/// Writes `bytes` of random data into a new file at `path` (1 MiB
/// `pwrite`s, no sync: what the standby's replica writes cost), then
/// removes it.
fn write_floor(path: &Path, bytes: u64) -> Duration {
    let f = make_image(path, 0);
    let mut buf = vec![0u8; MIB as usize];
    fill_random(&mut buf, 9);
    let t = Instant::now();
    for b in 0..bytes / MIB {
        f.write_all_at(&buf, b * MIB).expect("write floor");
    }
    let d = t.elapsed();
    drop(f);
    let _ = std::fs::remove_file(path);
    d
}

/// [`hash_floor`] while another thread spins, as the test guest's vCPU
/// does (its rounds busy-wait on the TSC) during the real sync.
fn hash_floor_contended(path: &Path) -> Duration {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let spin = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    });
    let d = hash_floor(path);
    stop.store(true, Ordering::Relaxed);
    spin.join().unwrap();
    d
}

// ---------------------------------------------------------------- 1. sync

struct SyncRow {
    mode: &'static str,
    sent_blocks: u64,
    blocks: u64,
    mib: u64,
    ms: f64,
    wall_ms: f64,
    raw_ms: f64,
}

/// Floors of the initial sync, measured in the same run.
struct SyncFloors {
    /// Read + SHA-256 of the image.
    sha_ms: f64,
    /// The same while one more thread spins (the guest's vCPU).
    sha_busy_ms: f64,
    /// Writing 1 GiB into a new file on the replica's filesystem.
    write_ms: f64,
}

impl SyncFloors {
    /// The floor of a mode: raw TCP for its bytes, plus the primary's hash
    /// pass with hashes.
    fn floor(&self, r: &SyncRow) -> f64 {
        r.raw_ms + if r.mode == "hashes" { self.sha_ms } else { 0.0 }
    }
}

/// `(sent, of, MiB, ms)` from `disk sync (Mode): X of Y blocks sent (Z MiB) in T ms`.
fn parse_sync_line(stderr: &str) -> Option<(u64, u64, u64, f64)> {
    let line = stderr.lines().find(|l| l.contains("disk sync ("))?;
    let w: Vec<&str> = line.split("): ").nth(1)?.split_whitespace().collect();
    let sent = w.first()?.parse().ok()?;
    let of = w.get(2)?.parse().ok()?;
    let mib = w.get(5)?.trim_start_matches('(').parse().ok()?;
    let ms = w.get(8)?.parse().ok()?;
    Some((sent, of, mib, ms))
}

fn sync_run(b: &Bench, mode: &'static str, primary: &Path, replica: &Path) -> SyncRow {
    make_replica_differ(replica);
    let (standby, port) = b.standby("sync-standby", Some(replica));
    let t = Instant::now();
    let mut p = b.primary(
        "sync-primary",
        port,
        "dirty=0 rounds=10 round_us=1000 disk=off",
        Some(primary),
        &["--ft-disk-sync", mode],
    );
    let mut parsed = None;
    let ok = interruptible_wait(Duration::from_secs(180), Duration::from_millis(20), || {
        parsed = parse_sync_line(&p.stderr());
        parsed.is_some() || p.exited()
    });
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let Some((sent_blocks, blocks, mib, ms)) = parsed.filter(|_| ok) else {
        panic!(
            "{mode}: no disk sync line\nprimary:\n{}\nstandby:\n{}",
            p.stderr(),
            standby.stderr()
        );
    };
    stop(standby, p);
    let raw_ms = raw_tcp(mib * MIB).as_secs_f64() * 1e3;
    SyncRow {
        mode,
        sent_blocks,
        blocks,
        mib,
        ms,
        wall_ms,
        raw_ms,
    }
}

fn initial_sync(b: &Bench) -> (SyncFloors, Vec<SyncRow>) {
    println!("## 1. Initial sync of a 1 GiB image (--ft-disk-sync hashes vs full)");
    let (primary, replica) = (
        b.dir.path("sync-primary.img"),
        b.dir.path("sync-replica.img"),
    );
    let t = Instant::now();
    let data = make_sync_images(&primary, &replica);
    println!(
        "image: {data} of {} 1 MiB blocks random data, holes elsewhere; the replica differs in \
         {DIFFERING} blocks (made in {:.1} s; page cache warm)",
        SYNC_DISK / MIB,
        t.elapsed().as_secs_f64()
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let floors = SyncFloors {
        sha_ms: median(&mut (0..3).map(|_| ms(hash_floor(&primary))).collect::<Vec<_>>()),
        sha_busy_ms: ms(hash_floor_contended(&primary)),
        write_ms: ms(write_floor(&b.dir.path("write-floor.img"), SYNC_DISK)),
    };
    let rows: Vec<SyncRow> = ["hashes", "full"]
        .iter()
        .map(|m| sync_run(b, m, &primary, &replica))
        .collect();
    let _ = std::fs::remove_file(&replica);
    let _ = std::fs::remove_file(&primary);
    println!(
        "{:>7} {:>12} {:>6} {:>9} {:>9} {:>11} {:>9} {:>6}",
        "mode", "blocks sent", "MiB", "sync ms", "wall ms", "raw TCP ms", "floor ms", "ratio"
    );
    for r in &rows {
        let floor = floors.floor(r);
        println!(
            "{:>7} {:>12} {:>6} {:>9.0} {:>9.0} {:>11.0} {:>9.0} {:>6.2}",
            r.mode,
            format!("{}/{}", r.sent_blocks, r.blocks),
            r.mib,
            r.ms,
            r.wall_ms,
            r.raw_ms,
            floor,
            r.ms / floor
        );
    }
    println!(
        "floors, same run: read + SHA-256 of 1 GiB {:.0} ms ({:.2} GB/s), {:.0} ms with one more \
         thread spinning (the guest's vCPU spins through its rounds during the sync); writing \
         1 GiB into a new file here (no sync) {:.0} ms ({:.2} GB/s).\n\
         raw TCP ms = a plain loopback TcpStream copy of the same MiB (1 MiB writes). floor = raw \
         TCP, + the primary's hash pass for hashes. sync ms = the primary's report line (its \
         hash pass and the sending; the standby's own hash pass comes before, in the handshake); \
         wall ms = spawning the primary to that line (boot, handshake, sync).",
        floors.sha_ms,
        SYNC_DISK as f64 / floors.sha_ms / 1e6,
        floors.sha_busy_ms,
        floors.write_ms,
        SYNC_DISK as f64 / floors.write_ms / 1e6,
    );
    (floors, rows)
}

// ---------------------------------------------------------------- 2. workload

struct WorkRow {
    label: String,
    /// The pause ratio against the diskless run means something (same pages).
    same_pages: bool,
    epochs: usize,
    dirty: f64,
    pause: f64,
    ack: f64,
    ack_flush: f64,
    transfer: f64,
    frame_mib: f64,
    disk_mb_s: f64,
    disk_share: f64,
    /// Σ disk_bytes / Σ transfer time, B/s.
    disk_per_transfer: f64,
    /// Σ bytes_sent / Σ transfer time, B/s.
    frame_per_transfer: f64,
    /// Raw TCP bursts of the median frame's size at the epoch cadence, B/s.
    raw_burst: f64,
    flushes: u64,
    flush_epochs: usize,
}

fn read_metrics(path: &Path) -> Vec<EpochMetrics> {
    read(path)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn workload_run(b: &Bench, label: &str, cmdline: &str, disk: bool, same_pages: bool) -> WorkRow {
    check_interrupt();
    let (primary_img, replica_img) = (
        b.dir.path("work-primary.img"),
        b.dir.path("work-replica.img"),
    );
    if disk {
        make_image(&primary_img, WORK_DISK);
        make_image(&replica_img, WORK_DISK);
    }
    let metrics = b.dir.path("work.metrics.jsonl");
    let _ = std::fs::remove_file(&metrics);
    let (mut standby, port) = b.standby("work-standby", disk.then_some(replica_img.as_path()));
    let m = metrics.display().to_string();
    let mut p = b.primary(
        "work-primary",
        port,
        cmdline,
        disk.then_some(primary_img.as_path()),
        &["--ft-metrics", &m],
    );
    let started = interruptible_wait(Duration::from_secs(60), Duration::from_millis(20), || {
        !read(&metrics).is_empty() || p.exited()
    });
    assert!(
        started && p.running(),
        "{label}: no epochs\nprimary:\n{}\nstandby:\n{}",
        p.stderr(),
        standby.stderr()
    );
    interruptible_sleep(WARMUP);
    let c0 = read_metrics(&metrics).len();
    let t0 = Instant::now();
    interruptible_sleep(WINDOW);
    let all = read_metrics(&metrics);
    let wall = t0.elapsed().as_secs_f64();
    let alive = p.running() && standby.running();
    let (perr, serr) = (p.stderr(), standby.stderr());
    stop(standby, p);
    assert!(
        alive,
        "{label}: a process ended early\nprimary:\n{perr}\nstandby:\n{serr}"
    );
    let _ = std::fs::remove_file(&primary_img);
    let _ = std::fs::remove_file(&replica_img);
    let w = &all[c0.min(all.len())..];
    assert!(!w.is_empty(), "{label}: no epochs in the window");
    let col = |g: fn(&EpochMetrics) -> u64| -> Vec<f64> { w.iter().map(|m| g(m) as f64).collect() };
    let sum = |g: fn(&EpochMetrics) -> u64| -> f64 { col(g).iter().sum() };
    let disk_bytes = sum(|m| m.disk_bytes);
    let sent = sum(|m| m.bytes_sent);
    let transfer_s = sum(|m| m.transfer_us) / 1e6;
    let frame = median(&mut col(|m| m.bytes_sent));
    let mut ack_flush: Vec<f64> = w
        .iter()
        .filter(|m| m.disk_flushes > 0)
        .map(|m| m.ack_latency_us as f64)
        .collect();
    let raw_burst = frame / raw_bursts(frame as u64, 40).as_secs_f64();
    WorkRow {
        label: label.to_string(),
        same_pages,
        epochs: w.len(),
        dirty: median(&mut col(|m| m.dirty_total())),
        pause: median(&mut col(|m| m.pause_us)),
        ack: median(&mut col(|m| m.ack_latency_us)),
        ack_flush: median(&mut ack_flush),
        transfer: median(&mut col(|m| m.transfer_us)),
        frame_mib: frame / MIB as f64,
        disk_mb_s: disk_bytes / wall / 1e6,
        disk_share: disk_bytes / sent.max(1.0),
        disk_per_transfer: disk_bytes / transfer_s,
        frame_per_transfer: sent / transfer_s,
        raw_burst,
        flushes: w.iter().map(|m| m.disk_flushes).sum(),
        flush_epochs: ack_flush.len(),
    }
}

/// The disk with the heartbeat records only (no `disk_bytes`).
const DISK_RECORDS: &str = "disk, records";

/// The row the replication-throughput target is judged on: frames that are
/// (nearly) all disk.
const DISK_ONLY: &str = "disk only 64K";

fn workload(b: &Bench, raw_bps: f64) -> Vec<WorkRow> {
    println!(
        "\n## 2. Write-heavy guest vs the same guest without a disk ({GUEST}, {INTERVAL_MS} ms \
         epochs, {} s windows after {} s warm-up)",
        WINDOW.as_secs(),
        WARMUP.as_secs()
    );
    let mut rows = vec![workload_run(b, "no disk", GUEST, false, true)];
    // The disk device quiesced at every cut, but only the heartbeat
    // records written (512 bytes per heartbeat): what a disk costs the
    // pause whatever the write sizes.
    rows.push(workload_run(b, DISK_RECORDS, GUEST, true, true));
    for n in [4096u64, 16384, 65536] {
        rows.push(workload_run(
            b,
            &format!("disk {}K", n / 1024),
            &format!("{GUEST} disk_bytes={n}"),
            true,
            true,
        ));
    }
    rows.push(workload_run(
        b,
        "disk 4K+flush",
        &format!("{GUEST} disk_bytes=4096 disk_flush=on"),
        true,
        true,
    ));
    // Frames that are nearly all disk: no dirtying, no wait between rounds.
    rows.push(workload_run(
        b,
        DISK_ONLY,
        "dirty=0 rounds=2 round_us=0 disk_bytes=65536",
        true,
        false,
    ));
    let base = rows[0].pause;
    println!(
        "{:>14} {:>6} {:>5} {:>8} {:>5} {:>7} {:>7} {:>9} {:>6} {:>9} {:>6} {:>9} {:>9} {:>9}",
        "config",
        "epochs",
        "dirty",
        "pause µs",
        "p/p0",
        "ack µs",
        "xfer µs",
        "frame MiB",
        "disk %",
        "disk MB/s",
        "flush",
        "disk/raw",
        "frame/raw",
        "vs burst"
    );
    for r in &rows {
        println!(
            "{:>14} {:>6} {:>5.0} {:>8.0} {:>5} {:>7.0} {:>7.0} {:>9.2} {:>6.1} {:>9.2} {:>6} {:>9} {:>9} {:>9}",
            r.label,
            r.epochs,
            r.dirty,
            r.pause,
            if r.same_pages {
                format!("{:.2}", r.pause / base)
            } else {
                "-".into()
            },
            r.ack,
            r.transfer,
            r.frame_mib,
            r.disk_share * 100.0,
            r.disk_mb_s,
            r.flushes,
            pct(r.disk_per_transfer, raw_bps),
            pct(r.frame_per_transfer, raw_bps),
            pct(r.frame_per_transfer, r.raw_burst),
        );
    }
    println!(
        "raw loopback TCP, same run: {:.2} GB/s (1 GiB TcpStream copy, 1 MiB writes, until the \
         receiver read the last byte).\n\
         disk MB/s = disk bytes of the window's epochs / the window's wall time (the replicated \
         write rate: what the guest wrote). disk % = disk bytes / bytes sent. flush = epochs' \
         guest flushes in the window.\n\
         disk/raw  = (Σ disk_bytes / Σ transfer_us) / raw: disk bytes per second of transfer \
         time, the whole frame's transfer time charged to them.\n\
         frame/raw = (Σ bytes_sent / Σ transfer_us) / raw: the rate of the stream the disk \
         section travels in (one gathered send per frame).\n\
         vs burst  = the same rate / raw TCP sending bursts of the median frame's size every \
         {INTERVAL_MS} ms with the channel's 4 MiB socket buffers, timed like transfer_us (until \
         the last write returns). Frames far smaller than the socket buffer are handed to the \
         kernel faster than the bulk rate, hence figures above 100 %.",
        raw_bps / 1e9
    );
    rows
}

fn pct(x: f64, of: f64) -> String {
    if x.is_finite() && x > 0.0 {
        format!("{:.0}%", x / of * 100.0)
    } else {
        "-".into()
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

fn summary(raw_bps: f64, floors: &SyncFloors, sync: &[SyncRow], work: &[WorkRow]) {
    println!("\n## Summary");
    println!("| figure | value | target / floor | met |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| raw loopback TCP (floor) | {:.2} GB/s | | |",
        raw_bps / 1e9
    );
    println!(
        "| read + SHA-256 1 GiB (floor) | {:.0} ms ({:.0} ms beside a spinning thread) | | |",
        floors.sha_ms, floors.sha_busy_ms
    );
    for r in sync {
        let floor = floors.floor(r);
        println!(
            "| initial sync, {} | {}/{} blocks, {} MiB in {:.0} ms | floor {:.0} ms: {:.2}× | |",
            r.mode,
            r.sent_blocks,
            r.blocks,
            r.mib,
            r.ms,
            floor,
            r.ms / floor
        );
    }
    let base = &work[0];
    for r in work[1..].iter().filter(|r| r.same_pages) {
        let ratio = r.pause / base.pause;
        println!(
            "| pause, {} / no disk | {:.0} / {:.0} µs = {ratio:.2} | ≤ 1.10 | {} |",
            r.label,
            r.pause,
            base.pause,
            yes(ratio <= 1.10)
        );
    }
    if let Some(rec) = work.iter().find(|r| r.label == DISK_RECORDS) {
        let v: Vec<String> = work
            .iter()
            .filter(|r| r.same_pages && r.label.starts_with("disk ") && r.label != DISK_RECORDS)
            .map(|r| format!("{} {:.2}", r.label, r.pause / rec.pause))
            .collect();
        println!(
            "| pause / pause of '{DISK_RECORDS}' (the write size's share) | {} | | |",
            v.join(", ")
        );
    }
    for r in &work[1..] {
        let judged = r.label == DISK_ONLY;
        println!(
            "| replication, {} | {:.2} MB/s; disk/raw {}, frame/raw {}, vs burst {} | {} | {} |",
            r.label,
            r.disk_mb_s,
            pct(r.disk_per_transfer, raw_bps),
            pct(r.frame_per_transfer, raw_bps),
            pct(r.frame_per_transfer, r.raw_burst),
            if judged { "disk/raw ≥ 80%" } else { "" },
            if judged {
                yes(r.disk_per_transfer >= 0.8 * raw_bps)
            } else {
                ""
            }
        );
    }
    if let (Some(nf), Some(fl)) = (
        work.iter().find(|r| r.label == "disk 4K"),
        work.iter().find(|r| r.label == "disk 4K+flush"),
    ) {
        println!(
            "| ack latency, disk 4K with / without disk_flush | {:.0} / {:.0} µs ({:+.0} µs; \
             {:.0} µs over the {} epochs holding a flush) | report | |",
            fl.ack,
            nf.ack,
            fl.ack - nf.ack,
            fl.ack_flush,
            fl.flush_epochs,
        );
    }
}

fn main() {
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIP disk_bench: /dev/kvm is not accessible");
        return;
    }
    catch_signals();
    let bench = Bench {
        bin: host::release_ftvmm(),
        dir: TempDir::new("diskbench"),
    };
    let raw = raw_tcp(1 << 30);
    let raw_bps = (1u64 << 30) as f64 / raw.as_secs_f64();
    println!(
        "disk_bench: {} (release), scratch {}, raw loopback TCP {:.2} GB/s",
        bench.bin.display(),
        bench.dir.0.display(),
        raw_bps / 1e9
    );
    let (floors, sync) = initial_sync(&bench);
    let work = workload(&bench, raw_bps);
    summary(raw_bps, &floors, &sync, &work);
}
