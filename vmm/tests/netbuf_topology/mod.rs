//! The network the netbuf tests and the latency benchmark build: two hosts
//! on one L2 segment, as a failover pair would have them, inside one network
//! namespace that is always removed: a bridge (`ftapb…`, the segment, whose
//! own address 10.0.0.1/24 is the outside client), the primary's tap
//! (`ftapp…`) and the standby's tap (`ftaps…`) on it. The VMMs run inside
//! the namespace (`ip netns exec`); sockets are made there by a thread that
//! entered it. Traffic never leaves the namespace.

#![allow(dead_code)]

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The client's (bridge's) address.
pub const HOST_IP: &str = "10.0.0.1";
/// The guest's address.
pub const GUEST_IP: &str = "10.0.0.2";
/// The guest's MAC.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Where the test guest sends its heartbeat datagrams.
pub const HB_PORT: u16 = 9000;

/// `02:00:00:00:00:01`.
pub fn guest_mac_str() -> String {
    GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why this host cannot run the namespace tests, if it cannot.
pub fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm");
    }
    let ip_works = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ip_works {
        return Some("no `ip` command");
    }
    None
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespace, bridge and taps; the namespace (and all in it) is
/// deleted on drop.
pub struct Segment {
    /// Namespace.
    pub ns: String,
    /// Bridge (the client's interface).
    pub br: String,
    /// The primary's tap.
    pub tap_p: String,
    /// The standby's tap.
    pub tap_s: String,
}

impl Segment {
    /// Builds it; `tag` (≤ 3 chars) keeps tests of one process apart.
    pub fn new(tag: &str) -> Result<Segment, String> {
        let id = std::process::id() % 100_000;
        let me = Segment {
            ns: format!("mcvmm{tag}{id}"),
            br: format!("ftapb{tag}{id}"),
            tap_p: format!("ftapp{tag}{id}"),
            tap_s: format!("ftaps{tag}{id}"),
        };
        for n in [&me.ns, &me.br, &me.tap_p, &me.tap_s] {
            assert!(n.len() <= 15, "{n} is too long for an interface name");
        }
        let _ = ip(&["netns", "del", &me.ns]);
        ip(&["netns", "add", &me.ns])?;
        let ns = me.ns.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", &me.br, "type", "bridge"])?;
        // Forward at once (no STP listening delay) and learn from the start.
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            &me.br,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        for tap in [&me.tap_p, &me.tap_s] {
            ip(&[
                "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
            ])?;
            ip(&["-n", ns, "link", "set", tap, "master", &me.br])?;
            ip(&["-n", ns, "link", "set", tap, "up"])?;
        }
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &me.br,
        ])?;
        ip(&["-n", ns, "link", "set", &me.br, "up"])?;
        Ok(me)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay
    /// there).
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns on this thread only, with a namespace fd we own.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            f()
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_string())?
    }

    /// A UDP socket bound to `addr` in the namespace.
    pub fn udp(&self, addr: &str) -> Result<UdpSocket, String> {
        let addr = addr.to_string();
        let s =
            self.in_ns(move || UdpSocket::bind(&addr).map_err(|e| format!("bind {addr}: {e}")))?;
        // Room for bursts of released datagrams.
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt reads one int from a live pointer.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(s)
    }

    /// A raw socket in the namespace: `AF_PACKET` (every frame of every
    /// interface) or `AF_INET`/ICMP.
    pub fn raw(&self, family: libc::c_int, proto: libc::c_int) -> Result<OwnedFd, String> {
        self.in_ns(move || {
            // SAFETY: socket(2); the result is checked.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
            if fd < 0 {
                return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
    }

    /// Spawns the ftvmm binary `bin` with `args` inside the namespace,
    /// stdout/stderr to `dir/NAME.stdout|stderr`.
    pub fn spawn(&self, bin: &str, name: &str, dir: &Path, args: &[String]) -> Vm {
        let out = File::create(dir.join(format!("{name}.stdout"))).unwrap();
        let err = File::create(dir.join(format!("{name}.stderr"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, bin])
            .args(args)
            .env("FTVMM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ip netns exec ftvmm");
        Vm {
            child,
            stderr: dir.join(format!("{name}.stderr")),
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.ns, "link", "del", &self.br]);
        let _ = ip(&["-n", &self.ns, "link", "del", &self.tap_p]);
        let _ = ip(&["-n", &self.ns, "link", "del", &self.tap_s]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// An ftvmm process, SIGKILLed and reaped on drop.
pub struct Vm {
    /// The process (`ip netns exec` execs ftvmm: same pid).
    pub child: Child,
    /// Its stderr file.
    pub stderr: PathBuf,
}

impl Vm {
    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Exited?
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits at most `t` for exit.
    pub fn wait(&mut self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 10 ms until it holds or `t` passes.
pub fn wait_for(t: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + t;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The heartbeat number of a datagram payload `ftguest hb=<n>\n`.
pub fn hb_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .strip_prefix("ftguest hb=")?
        .trim_end()
        .parse()
        .ok()
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh one.
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ftvmm-nb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// `dir/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The arguments of a standby on the segment's standby tap.
pub fn standby_args(seg: &Segment, port: u16, console: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "standby".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--net".into(),
        format!("tap={}", seg.tap_s),
        "--serial".into(),
        format!("file:{}", console.display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The arguments of a test-guest VM on the segment's primary tap, sending
/// heartbeats to the client; protected by `port` when given.
pub fn primary_args(
    seg: &Segment,
    port: Option<u16>,
    console: &Path,
    guest: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        "--mem-mib".into(),
        "64".into(),
        "--net".into(),
        format!("tap={},mac={}", seg.tap_p, guest_mac_str()),
        "--cmdline".into(),
        format!("ip={GUEST_IP} udp={HOST_IP}:{HB_PORT} {guest}"),
        "--serial".into(),
        format!("file:{}", console.display()),
    ];
    if let Some(p) = port {
        a.push("--ft-peer".into());
        a.push(format!("127.0.0.1:{p}"));
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the namespace has
/// its own loopback, so this only makes a clash unlikely).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
