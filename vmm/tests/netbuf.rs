//! Network output commit (DESIGN "Output commit", I1) end to end, through
//! the real binary, in a namespace with the primary's and the standby's taps
//! on one bridge (see `netbuf_topology`):
//! - nothing escapes early: with the standby's acks delayed 300 ms, no
//!   heartbeat datagram reaches the client before the primary's console
//!   released the same heartbeat (both are released on the same ack, the
//!   console first); and with `--netbuf none` they do (the check can fail);
//! - exactly once across failover, and the takeover announce;
//! - the `plug` backend (here: its clear start-up error on a kernel without
//!   sch_plug);
//! - the buffer limit: a guest that sends more than the limit per epoch has
//!   its epochs cut early; no frame is lost, the peak stays under the limit;
//! - a real TCP/IP stack (the tiny Linux guest) pinged every 25 ms through a
//!   failover: no duplicate reply, every request after the takeover answered.
//!
//! Every test prints `SKIP <test>: <reason>` where the host cannot run it.

mod common;
mod netbuf_topology;

use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netbuf_topology::*;

const FTVMM: &str = env!("CARGO_BIN_EXE_ftvmm");
/// A test guest with a heartbeat about every 10 ms and a light memory load.
const GUEST: &str = "dirty=64 rounds=10 round_us=1000";

fn skip(test: &str) -> bool {
    if let Some(r) = skip_reason() {
        println!("SKIP {test}: {r}");
        return true;
    }
    false
}

/// A standby (with `standby_extra`) and a protected primary on `seg`.
fn start_pair(
    seg: &Segment,
    dir: &TempDir,
    guest: &str,
    primary_extra: &[&str],
    standby_extra: &[&str],
) -> (Proc, Proc) {
    let port = free_port();
    let standby = seg.spawn(
        FTVMM,
        "standby",
        &dir.0,
        &standby_args(seg, port, &dir.path("standby.console"), standby_extra),
    );
    assert!(
        wait_until(Duration::from_secs(10), || standby
            .stderr()
            .contains("listening")),
        "standby did not start: {}",
        standby.stderr()
    );
    let primary = seg.spawn(
        FTVMM,
        "primary",
        &dir.0,
        &primary_args(
            seg,
            Some(port),
            &dir.path("primary.console"),
            guest,
            &if primary_extra.contains(&"--ft-interval-ms") {
                primary_extra.to_vec()
            } else {
                [&["--ft-interval-ms", "20"], primary_extra].concat()
            },
        ),
    );
    (primary, standby)
}

/// One received heartbeat datagram.
#[derive(Debug, Clone, Copy)]
struct Beat {
    n: u64,
    at: Instant,
    /// The primary's console already held `ftguest hb=<n>` when it came.
    console_had_it: bool,
}

/// Receives heartbeat datagrams until `until(beats)` or `deadline`; for each,
/// checks right away whether `console` (the primary's released output) has
/// the same heartbeat.
fn receive(
    sock: &UdpSocket,
    console: &std::path::Path,
    deadline: Instant,
    mut until: impl FnMut(&[Beat]) -> bool,
) -> Vec<Beat> {
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut beats = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline && !until(&beats) {
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let at = Instant::now();
        let Some(hb) = hb_of(&buf[..n]) else { continue };
        let text = std::fs::read_to_string(console).unwrap_or_default();
        beats.push(Beat {
            n: hb,
            at,
            console_had_it: text.contains(&format!("ftguest hb={hb}\n")),
        });
    }
    beats
}

fn numbers(beats: &[Beat]) -> Vec<u64> {
    beats.iter().map(|b| b.n).collect()
}

/// Runs the nothing-escapes-early scenario with `netbuf`: 300 ms ack delay.
/// Err(stderr) if the primary exited at start.
fn escape_run(tag: &str, netbuf: &str) -> Result<Vec<Beat>, String> {
    let seg = Segment::new(tag).expect("namespace");
    let dir = TempDir::new(tag);
    let sock = seg.udp(&format!("{HOST_IP}:{HB_PORT}")).unwrap();
    let (mut primary, _standby) = start_pair(
        &seg,
        &dir,
        GUEST,
        &["--netbuf", netbuf],
        &["--ft-ack-delay-ms", "300"],
    );
    let beats = receive(
        &sock,
        &dir.path("primary.console"),
        Instant::now() + Duration::from_secs(30),
        |b| b.len() >= 120 || (b.is_empty() && primary.exited()),
    );
    if beats.is_empty() && primary.exited() {
        return Err(primary.stderr());
    }
    assert!(
        beats.len() >= 120,
        "only {} datagrams arrived; primary: {}",
        beats.len(),
        primary.stderr()
    );
    Ok(beats)
}

#[test]
fn nothing_escapes_before_its_epoch_is_acked() {
    let test = "nothing_escapes_before_its_epoch_is_acked";
    if skip(test) {
        return;
    }
    let beats = escape_run("e", "vmm").unwrap_or_else(|e| panic!("primary failed: {e}"));
    let early: Vec<u64> = beats
        .iter()
        .filter(|b| !b.console_had_it)
        .map(|b| b.n)
        .collect();
    assert!(
        early.is_empty(),
        "datagrams arrived before their epoch was acked (console not yet released): {early:?}"
    );
    let n = numbers(&beats);
    assert_eq!(
        n,
        (n[0]..n[0] + n.len() as u64).collect::<Vec<_>>(),
        "datagrams lost, repeated or out of order"
    );
    // Released in bursts, one per acked epoch (300 ms apart), not one by one.
    let gaps = beats
        .windows(2)
        .filter(|w| w[1].at - w[0].at > Duration::from_millis(150))
        .count();
    assert!(gaps >= 2, "no ack-paced bursts seen");

    // The same check catches a VMM that lets frames out early.
    let beats = escape_run("n", "none").unwrap_or_else(|e| panic!("primary failed: {e}"));
    let early = beats.iter().filter(|b| !b.console_had_it).count();
    assert!(
        early > beats.len() / 2,
        "with --netbuf none the datagrams should beat the console by the ack delay ({early} of {})",
        beats.len()
    );
}

#[test]
fn plug_backend_holds_or_says_the_kernel_has_no_sch_plug() {
    let test = "plug_backend_holds_or_says_the_kernel_has_no_sch_plug";
    if skip(test) {
        return;
    }
    match escape_run("p", "plug") {
        Ok(beats) => {
            let early: Vec<u64> = beats
                .iter()
                .filter(|b| !b.console_had_it)
                .map(|b| b.n)
                .collect();
            assert!(early.is_empty(), "plug let datagrams out early: {early:?}");
            let n = numbers(&beats);
            assert_eq!(n, (n[0]..n[0] + n.len() as u64).collect::<Vec<_>>());
        }
        Err(stderr) => {
            println!("SKIP {test}: kernel has no sch_plug (tested the start-up error instead)");
            assert!(
                stderr.contains("sch_plug") && stderr.contains("CONFIG_NET_SCH_PLUG"),
                "the error does not name sch_plug / CONFIG_NET_SCH_PLUG:\n{stderr}"
            );
            assert!(stderr.contains("use --netbuf vmm"), "{stderr}");
        }
    }
}

/// Gratuitous ARPs (sender = target = `ip`) and RARPs from `mac` seen on any
/// interface of the namespace through `fd` until `deadline`.
fn watch_announce(
    fd: std::os::fd::OwnedFd,
    mac: [u8; 6],
    ip: [u8; 4],
    deadline: Instant,
) -> (u32, u32) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: setsockopt reads one timeval from a live pointer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut f = std::fs::File::from(fd);
    let (mut garp, mut rarp) = (0, 0);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok(n) = f.read(&mut buf) else { continue };
        let b = &buf[..n];
        if n < 42 || b[6..12] != mac {
            continue;
        }
        match [b[12], b[13]] {
            [0x08, 0x06] if b[28..32] == ip && b[38..42] == ip => garp += 1,
            [0x80, 0x35] if b[22..28] == mac => rarp += 1,
            _ => {}
        }
    }
    (garp, rarp)
}

#[test]
fn exactly_once_across_failover_and_takeover_announce() {
    let test = "exactly_once_across_failover_and_takeover_announce";
    if skip(test) {
        return;
    }
    let seg = Segment::new("f").expect("namespace");
    let dir = TempDir::new("f");
    let sock = seg.udp(&format!("{HOST_IP}:{HB_PORT}")).unwrap();
    let (mut primary, standby) = start_pair(&seg, &dir, GUEST, &[], &[]);
    let before = receive(
        &sock,
        &dir.path("primary.console"),
        Instant::now() + Duration::from_secs(30),
        |b| b.len() >= 50,
    );
    assert!(before.len() >= 50, "primary: {}", primary.stderr());
    let packets = seg
        .raw(libc::AF_PACKET, i32::from((libc::ETH_P_ALL as u16).to_be()))
        .unwrap();
    let watcher = std::thread::spawn(move || {
        watch_announce(
            packets,
            GUEST_MAC,
            [10, 0, 0, 2],
            Instant::now() + Duration::from_secs(8),
        )
    });
    primary.kill();
    let after = receive(
        &sock,
        &dir.path("primary.console"),
        Instant::now() + Duration::from_secs(20),
        |b| b.len() >= 50,
    );
    assert!(
        after.len() >= 50,
        "the standby's guest did not go on sending: {}",
        standby.stderr()
    );
    assert!(
        standby.stderr().contains("took over"),
        "{}",
        standby.stderr()
    );
    let all: Vec<u64> = numbers(&before)
        .into_iter()
        .chain(numbers(&after))
        .collect();
    let mut gaps = Vec::new();
    for w in all.windows(2) {
        assert!(
            w[1] > w[0],
            "datagram {} repeated or out of order: {all:?}",
            w[1]
        );
        if w[1] != w[0] + 1 {
            gaps.push((w[0], w[1]));
        }
    }
    assert!(
        gaps.len() <= 1,
        "more than one gap (only the in-flight epoch may be lost): {gaps:?}"
    );
    if let Some((a, b)) = gaps.first() {
        assert!(b - a <= 10, "gap {a}..{b} is more than an epoch's worth");
    }
    let (garp, rarp) = watcher.join().unwrap();
    println!("{test}: gap {gaps:?}; announce: {garp} gratuitous ARPs, {rarp} RARPs");
    assert!(rarp >= 1, "no RARP for the guest's MAC after the takeover");
    assert!(
        garp >= 1,
        "no gratuitous ARP for {GUEST_IP} after the takeover"
    );
}

#[test]
fn buffer_limit_cuts_epochs_early_and_loses_nothing() {
    let test = "buffer_limit_cuts_epochs_early_and_loses_nothing";
    if skip(test) {
        return;
    }
    let seg = Segment::new("l").expect("namespace");
    let dir = TempDir::new("l");
    let hb = seg.udp(&format!("{HOST_IP}:{HB_PORT}")).unwrap();
    let client = seg.udp(&format!("{HOST_IP}:0")).unwrap();
    let limit_kib = 64;
    // Epochs of 1 s; the guest echoes 1000-byte datagrams at ~500 per second,
    // so an epoch would hold ~500 KB: far past the limit without early cuts.
    let (mut primary, _standby) = start_pair(
        &seg,
        &dir,
        &format!("{GUEST} stop=500"),
        &[
            "--ft-interval-ms",
            "1000",
            "--netbuf-limit-kib",
            &limit_kib.to_string(),
            "--ft-metrics",
            &dir.path("metrics.jsonl").display().to_string(),
        ],
        &[],
    );
    let first = receive(
        &hb,
        &dir.path("primary.console"),
        Instant::now() + Duration::from_secs(30),
        |b| !b.is_empty(),
    );
    assert!(!first.is_empty(), "no heartbeat: {}", primary.stderr());
    let total = 600u32;
    let guest = format!("{GUEST_IP}:7");
    let recv = client.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        recv.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && got.len() < total as usize {
            if let Ok(n) = recv.recv(&mut buf) {
                if n == 1000 {
                    got.push(u32::from_le_bytes(buf[..4].try_into().unwrap()));
                }
            }
        }
        got
    });
    let t0 = Instant::now();
    for k in 0..total {
        let mut p = vec![0x5au8; 1000];
        p[..4].copy_from_slice(&k.to_le_bytes());
        client.send_to(&p, &guest).unwrap();
        let next = t0 + Duration::from_millis(2) * (k + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let got = reader.join().unwrap();
    assert!(
        primary.wait(Duration::from_secs(30)).is_some(),
        "the guest did not stop"
    );
    let stderr = primary.stderr();
    assert_eq!(
        got,
        (0..total).collect::<Vec<_>>(),
        "echo replies lost or reordered ({} of {total})\n{stderr}",
        got.len()
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("ftvmm: netbuf vmm:"))
        .unwrap_or_else(|| panic!("no netbuf summary:\n{stderr}"));
    println!("{test}: {line}");
    assert!(num_after(line, "held µs median ") > 0);
    let early = num_before(line, " early cuts");
    let over = num_before(line, " over limit");
    let peak = num_after(line, "peak ");
    assert!(early >= 5, "the epochs were not cut early: {line}");
    assert_eq!(over, 0, "frames held past the limit: {line}");
    assert!(peak <= limit_kib, "peak {peak} KiB > limit {limit_kib} KiB");
    // Epochs came much faster than the 1 s timer.
    let metrics = std::fs::read_to_string(dir.path("metrics.jsonl")).unwrap();
    let held: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["held_bytes"].as_u64())
        .collect();
    assert!(
        held.iter().all(|&b| b <= limit_kib << 10),
        "an epoch held more than the limit: {held:?}"
    );
}

/// The number right before `suffix` in `line`.
fn num_before(line: &str, suffix: &str) -> u64 {
    let i = line
        .find(suffix)
        .unwrap_or_else(|| panic!("no '{suffix}' in {line}"));
    line[..i]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before '{suffix}' in {line}"))
}

/// The number right after `prefix` in `line`.
fn num_after(line: &str, prefix: &str) -> u64 {
    let i = line
        .find(prefix)
        .unwrap_or_else(|| panic!("no '{prefix}' in {line}"))
        + prefix.len();
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after '{prefix}' in {line}"))
}

/// An ICMP echo request with `id`, `seq`.
fn icmp_echo(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"ftvmmnb!");
    let mut sum = 0u32;
    for c in p.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

/// The pinger's cadence. The emulated guest kernel (PLATFORM.md) needs
/// about 14 ms of CPU per echo (measured on the standby; more on the
/// primary, whose epochs pause it): a request every 10 ms is more than it
/// can answer, so its reply latency grows ~0.6 s per second from the first
/// request, on the primary already, until the replies fall out of any
/// window (that looked like a NIC stall after the takeover; it is not).
/// 25 ms keeps it at about half load, latency flat.
const PING_EVERY: Duration = Duration::from_millis(25);

#[test]
fn linux_guest_pinged_every_25ms_through_failover() {
    let test = "linux_guest_pinged_every_25ms_through_failover";
    if skip(test) {
        return;
    }
    let Some((vmlinux, initrd, cmdline)) = common::linux_guest(test) else {
        return;
    };
    let seg = Segment::new("x").expect("namespace");
    let dir = TempDir::new("x");
    let port = free_port();
    let standby = seg.spawn(
        FTVMM,
        "standby",
        &dir.0,
        &standby_args(&seg, port, &dir.path("standby.console"), &[]),
    );
    assert!(wait_until(Duration::from_secs(10), || standby
        .stderr()
        .contains("listening")));
    let args: Vec<String> = [
        "run",
        "--kernel",
        &vmlinux.display().to_string(),
        "--initrd",
        &initrd.display().to_string(),
        "--cmdline",
        &format!("{cmdline} ftlinux.mode=devtest ftlinux.ip={GUEST_IP} ftlinux.wait=300"),
        "--mem-mib",
        "128",
        "--net",
        &format!("tap={},mac={}", seg.tap_p, guest_mac_str()),
        "--serial",
        &format!("file:{}", dir.path("primary.console").display()),
        "--ft-peer",
        &format!("127.0.0.1:{port}"),
        "--ft-interval-ms",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut primary = seg.spawn(FTVMM, "primary", &dir.0, &args);
    assert!(
        wait_until(Duration::from_secs(180), || {
            std::fs::read_to_string(dir.path("primary.console"))
                .unwrap_or_default()
                .contains("ftdev eth0 up")
                || primary.exited()
        }),
        "the Linux guest did not bring eth0 up"
    );
    assert!(!primary.exited(), "primary ended: {}", primary.stderr());
    // Our own pinger: a raw ICMP socket in the namespace, a request every
    // PING_EVERY.
    let sock = std::fs::File::from(seg.raw(libc::AF_INET, libc::IPPROTO_ICMP).unwrap());
    let fd = sock.as_raw_fd();
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 1000,
    };
    // SAFETY: setsockopt reads one timeval from a live pointer.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: a zeroed sockaddr_in is valid; fields set below.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from_ne_bytes([10, 0, 0, 2]);
    let id = (std::process::id() & 0xffff) as u16;
    let mut sent: Vec<Instant> = Vec::new();
    let mut replies: Vec<(u16, Instant)> = Vec::new();
    let start = Instant::now();
    let mut killed_at = None;
    let mut buf = [0u8; 1500];
    let mut seq: u16 = 0;
    while start.elapsed() < Duration::from_secs(10) {
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(3) {
            primary.kill();
            killed_at = Some(Instant::now());
        }
        let due = start + PING_EVERY * u32::from(seq);
        if Instant::now() >= due {
            let p = icmp_echo(id, seq);
            // SAFETY: sends a live buffer to a valid sockaddr_in.
            unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr() as *const libc::c_void,
                    p.len(),
                    0,
                    &to as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            sent.push(Instant::now());
            seq += 1;
        }
        let n = (&sock).read(&mut buf).unwrap_or(0);
        if n >= 28 {
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n];
            if icmp.len() >= 8 && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                replies.push((u16::from_be_bytes([icmp[6], icmp[7]]), Instant::now()));
            }
        }
    }
    let killed_at = killed_at.unwrap();
    // Late replies: until every request sent after the kill is answered, or
    // a bounded wait (a stalled NIC fails the check below).
    let drain = Instant::now();
    let after_kill: Vec<u16> = (0..seq)
        .filter(|s| sent[usize::from(*s)] > killed_at)
        .collect();
    while drain.elapsed() < Duration::from_secs(5)
        && !after_kill
            .iter()
            .all(|s| replies.iter().any(|(r, _)| r == s))
    {
        let n = (&sock).read(&mut buf).unwrap_or(0);
        if n >= 28 {
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n];
            if icmp.len() >= 8 && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
                replies.push((u16::from_be_bytes([icmp[6], icmp[7]]), Instant::now()));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    let dups: Vec<u16> = replies
        .iter()
        .filter(|(s, _)| !seen.insert(*s))
        .map(|r| r.0)
        .collect();
    assert!(dups.is_empty(), "duplicated echo replies (DUP!): {dups:?}");
    assert!(
        standby.stderr().contains("took over"),
        "{}",
        standby.stderr()
    );
    // The standby's first answer: the first reply to a request sent after the kill.
    let first_standby = replies
        .iter()
        .filter(|(s, _)| sent[usize::from(*s)] > killed_at)
        .map(|r| r.0)
        .min()
        .expect("the standby answered no request");
    let unanswered: Vec<u16> = (first_standby..seq).filter(|s| !seen.contains(s)).collect();
    let before = replies
        .iter()
        .filter(|(s, _)| sent[usize::from(*s)] < killed_at)
        .count();
    // Reply latency (ms) of the requests sent in each second: flat when the
    // guest keeps up, growing when it is overloaded.
    let mut per_second: Vec<Vec<f64>> = Vec::new();
    for (s, at) in &replies {
        let t = sent[usize::from(*s)];
        let i = (t - start).as_secs() as usize;
        per_second.resize(per_second.len().max(i + 1), Vec::new());
        per_second[i].push((*at - t).as_secs_f64() * 1e3);
    }
    let latency: Vec<String> = per_second
        .iter()
        .map(|v| format!("{:.0}", v.iter().cloned().fold(0.0, f64::max)))
        .collect();
    println!(
        "{test}: {} requests, {} replies ({before} before the kill); first answered after the takeover: seq {first_standby} ({:.0} ms after the kill); max reply latency per second of requests (ms): [{}]",
        seq,
        replies.len(),
        (sent[usize::from(first_standby)] - killed_at).as_secs_f64() * 1e3,
        latency.join(", ")
    );
    let expected_before = (Duration::from_secs(3).as_millis() / PING_EVERY.as_millis()) as usize;
    assert!(
        before > expected_before * 2 / 3,
        "the primary answered too few pings: {before} of ~{expected_before}"
    );
    assert!(
        unanswered.is_empty(),
        "requests sent after the takeover went unanswered: {unanswered:?}\nmax reply latency per second of requests (ms): [{}]\nstandby tap:\n{}\nstandby:\n{}\nstandby console:\n{}",
        latency.join(", "),
        String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["-n", &seg.ns.name, "-s", "link", "show", &seg.tap_s])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        ),
        standby.stderr(),
        std::fs::read_to_string(dir.path("standby.console")).unwrap_or_default()
    );
}
