//! The bare-metal test guest's virtio drivers against ftvmm's devices, end to
//! end: inside a network namespace this test creates (and always removes),
//! the guest's heartbeat datagrams arrive in order at a UDP socket on the
//! host side of its tap, UDP echo requests sent to the guest come back, and
//! the disk file holds one sector record per heartbeat afterwards. A second
//! test (no root needed) checks that a readonly disk is reported and left
//! untouched.

mod common;

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::{set_rcvbuf_force, skip_reason, Netns};
use common::{run, wait_with_timeout, TempDir};

const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
const GUEST_MAC: &str = "02:00:00:00:00:01";
const HB_PORT: u16 = 9000;
const ECHO_PORT: u16 = 7;
/// Heartbeats of the networked run (one about every 10 ms).
const BEATS: u64 = 300;
const SECTOR: usize = 512;
const DISK_SECTORS: usize = 2048;

/// A network namespace with one persistent tap whose host side is
/// 10.0.0.1/24 (both removed on drop, whatever happened), and the tap.
fn tap_namespace(tag: &str) -> Result<(Netns, String), String> {
    let id = std::process::id() % 100_000;
    let (name, tap) = (format!("mcvmm{tag}{id}"), format!("ftap{tag}{id}"));
    assert!(name.len() <= 15 && tap.len() <= 15);
    let mut net = Netns::new(&name)?;
    net.ip(&["link", "set", "lo", "up"])?;
    net.add_tap(&tap, true)?;
    net.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap])?;
    net.ip(&["link", "set", &tap, "up"])?;
    Ok((net, tap))
}

/// An echo request's payload, and the answer's payload and sender (if any).
type Echo = (Vec<u8>, Option<(Vec<u8>, SocketAddr)>);

/// What the host side saw while the guest ran.
#[derive(Default)]
struct Seen {
    /// Heartbeat datagram payloads, in arrival order.
    beats: Vec<String>,
    /// Where they came from.
    beat_sources: Vec<SocketAddr>,
    /// (sent, answered) echo payloads.
    echoes: Vec<Echo>,
    errors: Vec<String>,
}

/// Receives heartbeats until `ftguest hb=<last>` (or the deadline); once the
/// first arrives, sends `echoes` echo requests, each retried a few times.
/// Stops early (after a last 200 ms of receiving) when `child` exits.
fn talk(
    child: &mut Child,
    hb: &UdpSocket,
    echo: &UdpSocket,
    last: u64,
    echoes: usize,
    mut deadline: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let last_payload = format!("ftguest hb={last}\n");
    hb.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    echo.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let guest_echo: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().unwrap();
    let mut buf = [0u8; 2048];
    let mut exited = false;
    while Instant::now() < deadline {
        if !exited && child.try_wait().ok().flatten().is_some() {
            exited = true;
            deadline = deadline.min(Instant::now() + Duration::from_millis(200));
        }
        match hb.recv_from(&mut buf) {
            Ok((n, from)) => {
                seen.beats
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                seen.beat_sources.push(from);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                seen.errors.push(format!("heartbeat socket: {e}"));
                break;
            }
        }
        if !exited && !seen.beats.is_empty() && seen.echoes.len() < echoes {
            let i = seen.echoes.len();
            let payload = format!("echo request {i} {}", "x".repeat(i * 97)).into_bytes();
            let mut answer = None;
            for _try in 0..5 {
                if let Err(e) = echo.send_to(&payload, guest_echo) {
                    seen.errors.push(format!("echo send: {e}"));
                    break;
                }
                match echo.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        answer = Some((buf[..n].to_vec(), from));
                        break;
                    }
                    Err(_) => continue,
                }
            }
            seen.echoes.push((payload, answer));
        }
        if seen.beats.last() == Some(&last_payload) && seen.echoes.len() >= echoes {
            break;
        }
    }
    seen
}

#[test]
fn guest_heartbeats_echo_and_disk_records() {
    if let Some(why) = skip_reason() {
        println!("SKIP guest_net: {why}");
        return;
    }
    let dir = TempDir::new("guest-net");
    let (net, tap) =
        tap_namespace("gn").unwrap_or_else(|e| panic!("setting up the namespace: {e}"));
    let hb = net
        .udp(&format!("{HOST_IP}:{HB_PORT}"))
        .unwrap_or_else(|e| panic!("heartbeat socket: {e}"));
    // Room for every heartbeat even if this thread falls behind.
    set_rcvbuf_force(&hb, 4 << 20);
    let echo = net
        .udp(&format!("{HOST_IP}:0"))
        .unwrap_or_else(|e| panic!("echo socket: {e}"));

    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; DISK_SECTORS * SECTOR]).unwrap();

    let cmdline = format!(
        "ip={GUEST_IP} udp={HOST_IP}:{HB_PORT} echo_port={ECHO_PORT} disk_verify=on stop={BEATS}"
    );
    let mut child = net
        .exec(env!("CARGO_BIN_EXE_ftvmm"))
        .arg("run")
        .arg("--net")
        .arg(format!("tap={tap},mac={GUEST_MAC}"))
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip netns exec ftvmm");
    let seen = talk(
        &mut child,
        &hb,
        &echo,
        BEATS,
        8,
        Instant::now() + Duration::from_secs(60),
    );
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let context = format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}\nerrors: {:?}",
        out.status, out.stdout, out.stderr, seen.errors
    );
    assert!(out.status.success(), "ftvmm failed: {context}");

    // The console: device lines before ready, no errors, every heartbeat.
    assert!(
        out.stdout
            .contains(&format!("ftguest net mac={GUEST_MAC} ip={GUEST_IP}\n")),
        "{context}"
    );
    assert!(
        out.stdout
            .contains(&format!("ftguest disk sectors={DISK_SECTORS}\n")),
        "{context}"
    );
    let ready = out.stdout.find("ftguest ready").expect("ftguest ready");
    assert!(out.stdout.find("ftguest net mac=").unwrap() < ready);
    assert!(!out.stdout.contains("ftguest disk error"), "{context}");
    assert!(!out.stdout.contains("ftguest disk readonly"), "{context}");
    assert!(!out.stdout.contains("ftguest warning"), "{context}");
    assert_eq!(
        common::heartbeats(&out.stdout),
        (1..=BEATS).collect::<Vec<_>>()
    );

    // The datagrams: every heartbeat, in order, from the guest's port 7777.
    let want: Vec<String> = (1..=BEATS).map(|n| format!("ftguest hb={n}\n")).collect();
    assert_eq!(seen.beats, want, "heartbeat datagrams; {context}");
    let guest_hb: SocketAddr = format!("{GUEST_IP}:7777").parse().unwrap();
    assert!(seen.beat_sources.iter().all(|s| *s == guest_hb));

    // The echoes: each answered from the echo port with the same payload.
    assert_eq!(seen.echoes.len(), 8, "{context}");
    let guest_echo: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().unwrap();
    for (sent, answer) in &seen.echoes {
        let (got, from) = answer
            .as_ref()
            .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(sent)));
        assert_eq!(got, sent);
        assert_eq!(*from, guest_echo);
    }

    // The disk: sector n-1 holds heartbeat n's record, the rest is zero.
    let mut image = Vec::new();
    File::open(&disk).unwrap().read_to_end(&mut image).unwrap();
    assert_eq!(image.len(), DISK_SECTORS * SECTOR);
    for (lba, sector) in image.chunks(SECTOR).enumerate() {
        let n = lba as u64 + 1;
        if n <= BEATS {
            let text = format!("ftguest sector hb={n}\n");
            assert_eq!(
                &sector[..text.len()],
                text.as_bytes(),
                "sector {lba}: {:?}",
                String::from_utf8_lossy(&sector[..32])
            );
            assert!(sector[text.len()..].iter().all(|&b| b == 0), "sector {lba}");
        } else {
            assert!(sector.iter().all(|&b| b == 0), "sector {lba} written");
        }
    }
}

#[test]
fn guest_reports_a_readonly_disk_and_leaves_it_alone() {
    if !Path::new("/dev/kvm").exists() {
        println!("SKIP guest_net readonly: no /dev/kvm");
        return;
    }
    let dir = TempDir::new("guest-ro");
    let disk = dir.path("ro.img");
    let pattern: Vec<u8> = (0..64 * SECTOR).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &pattern).unwrap();
    let out = run(
        &[
            "run",
            "--disk",
            &format!("path={},readonly", disk.display()),
            "--cmdline",
            "stop=5",
        ],
        Duration::from_secs(60),
    );
    let context = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.status.success(), "{context}");
    assert!(
        out.stdout.contains("ftguest disk sectors=64\n"),
        "{context}"
    );
    assert_eq!(
        out.stdout.matches("ftguest disk readonly\n").count(),
        1,
        "{context}"
    );
    assert!(!out.stdout.contains("ftguest disk error"), "{context}");
    assert_eq!(common::heartbeats(&out.stdout), vec![1, 2, 3, 4, 5]);
    assert_eq!(std::fs::read(&disk).unwrap(), pattern);
}
