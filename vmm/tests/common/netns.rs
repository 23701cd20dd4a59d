//! Network namespaces for the tests that need a network: a namespace (with
//! its taps and bridges) that is always removed, however the test ends;
//! sockets made inside it; commands run inside it. Traffic never leaves the
//! namespace. Also included (with `host.rs`) by `examples/netbuf_latency.rs`
//! through `netbuf_topology`.

#![allow(dead_code)]

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use super::host::is_root;

/// Why this host cannot run the namespace tests, if it cannot.
pub fn skip_reason() -> Option<&'static str> {
    if !is_root() {
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

/// Gives `sock` a receive buffer of `bytes` (root may exceed rmem_max with
/// SO_RCVBUFFORCE), room for bursts of datagrams if the test falls behind.
pub fn set_rcvbuf_force(sock: &impl AsRawFd, bytes: libc::c_int) {
    // SAFETY: setsockopt reads one c_int from the pointer given with its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A network namespace and the links made in it; on drop the links are
/// deleted (in the order they were added), then the namespace, whatever
/// happened.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    links: Vec<String>,
}

impl Netns {
    /// Creates namespace `name`, first removing a leftover of an earlier
    /// run with the same pid.
    pub fn new(name: &str) -> Result<Netns, String> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        Ok(Netns {
            name: name.to_string(),
            links: Vec::new(),
        })
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        ip(&[&["-n", self.name.as_str()], args].concat())
    }

    /// Adds persistent tap `tap` (with virtio-net headers when `vnet_hdr`),
    /// deleted on drop.
    pub fn add_tap(&mut self, tap: &str, vnet_hdr: bool) -> Result<(), String> {
        self.links.push(tap.to_string());
        let mut args = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
        if vnet_hdr {
            args.push("vnet_hdr");
        }
        self.ip(&args)
    }

    /// Adds bridge `br`, deleted on drop.
    pub fn add_bridge(&mut self, br: &str) -> Result<(), String> {
        self.links.push(br.to_string());
        self.ip(&["link", "add", br, "type", "bridge"])
    }

    /// `ip netns exec NAME PROGRAM`, to complete and spawn (`ip netns exec`
    /// execs the program: same pid).
    /// The tests' channel key goes along in `FTVMM_FT_KEY` (see
    /// `ftvmm()` of the tests).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c.env("FTVMM_FT_KEY", super::host::test_key());
        c
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay
    /// there).
    pub fn in_ns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.name);
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
        self.in_ns(move || UdpSocket::bind(&addr).map_err(|e| format!("bind {addr}: {e}")))
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = self.ip(&["link", "del", link]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
