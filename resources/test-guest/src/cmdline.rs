//! The guest's command line: space-separated `key=value` words; unknown keys
//! (and words without `=`) are ignored, since Linux-style command lines may
//! carry other words.
//!
//! Plain `core` code with no dependency on the rest of the guest, so the host
//! tests in `tests/guest_isa` compile and test this very file.

/// The workload the command line selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `dirty=N`: pages dirtied per round.
    pub dirty: u64,
    /// `span=N`: pages in the working set (None: 4 × dirty); capped by RAM.
    pub span: Option<u64>,
    /// `rounds=R`: rounds per heartbeat.
    pub rounds: u64,
    /// `round_us=U`: minimum duration of a round, in microseconds.
    pub round_us: u64,
    /// `stop=K`: power off after heartbeat K (0: never).
    pub stop: u64,
    /// `crash=pf|panic|log`: die on purpose right after `ftguest ready` (a test
    /// hook for the VMM's handling of a guest that shuts down).
    pub crash: Crash,
    /// `virtio_mmio.device=<size>@<addr>:<irq>[:<id>]` (Linux syntax), in
    /// command-line order; at most `MAX_MMIO_DEVICES`, more are ignored.
    pub mmio: [Option<MmioDevice>; MAX_MMIO_DEVICES],
    /// `net=on|off`: drive a virtio-net device (Auto: when one is present).
    pub net: Switch,
    /// `ip=A.B.C.D`: the guest's own IPv4 address.
    pub ip: Option<[u8; 4]>,
    /// `udp=A.B.C.D:PORT`: where each heartbeat goes as a datagram.
    pub udp: Option<([u8; 4], u16)>,
    /// `udp_src=PORT`: the source port of the heartbeat datagrams.
    pub udp_src: u16,
    /// `echo_port=PORT`: UDP echo service port (0: none).
    pub echo_port: u16,
    /// `gw_mac=MAC`: the destination's MAC, so no ARP is needed for it.
    pub gw_mac: Option<[u8; 6]>,
    /// `disk=on|off`: drive a virtio-blk device (Auto: when one is present).
    pub disk: Switch,
    /// `disk_verify=on|off`: read each heartbeat's sector back and compare.
    pub disk_verify: bool,
    /// `disk_flush=on|off`: flush the disk after each heartbeat's sector.
    pub disk_flush: bool,
    /// `disk_bytes=N`: bytes written to the disk's bulk area each round
    /// (0: none; at most `MAX_DISK_BYTES`).
    pub disk_bytes: u64,
}

/// The largest `disk_bytes=`: one request of 128 sectors.
pub const MAX_DISK_BYTES: u64 = 64 << 10;

/// How many `virtio_mmio.device=` entries are kept.
pub const MAX_MMIO_DEVICES: usize = 8;

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub addr: u64,
    pub size: u64,
    pub irq: u32,
}

/// An `on|off` key whose default depends on the hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    Auto,
    On,
    Off,
}

/// How `crash=` makes the guest die.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// Not at all.
    No,
    /// `crash=pf`: a page fault at CPL3 (the exception path).
    PageFault,
    /// `crash=panic`: a Rust panic at CPL3 (the panic path).
    Panic,
    /// `crash=log`: not a crash but one torn update of the vCPUs' shared
    /// log (with several vCPUs), which the next heartbeat's check reports: a
    /// test hook proving the check catches what it is there for.
    Log,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dirty: 256,
            span: None,
            rounds: 10,
            round_us: 1000,
            stop: 0,
            crash: Crash::No,
            mmio: [None; MAX_MMIO_DEVICES],
            net: Switch::Auto,
            ip: None,
            udp: None,
            udp_src: 7777,
            echo_port: 7,
            gw_mac: None,
            disk: Switch::Auto,
            disk_verify: false,
            disk_flush: false,
            disk_bytes: 0,
        }
    }
}

/// Parses `cmdline`; `bad(key, value)` is called for a known key whose value
/// is not a number (the default is kept).
pub fn parse(cmdline: &[u8], mut bad: impl FnMut(&[u8], &[u8])) -> Config {
    let mut cfg = Config::default();
    for word in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(eq) = word.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        let slot = match key {
            b"dirty" => &mut cfg.dirty,
            b"rounds" => &mut cfg.rounds,
            b"round_us" => &mut cfg.round_us,
            b"stop" => &mut cfg.stop,
            b"crash" => {
                match value {
                    b"pf" => cfg.crash = Crash::PageFault,
                    b"panic" => cfg.crash = Crash::Panic,
                    b"log" => cfg.crash = Crash::Log,
                    _ => bad(key, value),
                }
                continue;
            }
            b"virtio_mmio.device" => {
                match parse_mmio_device(value) {
                    Some(dev) => {
                        if let Some(slot) = cfg.mmio.iter_mut().find(|d| d.is_none()) {
                            *slot = Some(dev);
                        }
                    }
                    None => bad(key, value),
                }
                continue;
            }
            b"net" | b"disk" | b"disk_verify" | b"disk_flush" => {
                let Some(on) = parse_switch(value) else {
                    bad(key, value);
                    continue;
                };
                let switch = if on { Switch::On } else { Switch::Off };
                match key {
                    b"net" => cfg.net = switch,
                    b"disk" => cfg.disk = switch,
                    b"disk_verify" => cfg.disk_verify = on,
                    _ => cfg.disk_flush = on,
                }
                continue;
            }
            b"ip" => {
                match parse_ipv4(value) {
                    Some(ip) => cfg.ip = Some(ip),
                    None => bad(key, value),
                }
                continue;
            }
            b"udp" => {
                match parse_ip_port(value) {
                    Some(dst) => cfg.udp = Some(dst),
                    None => bad(key, value),
                }
                continue;
            }
            b"udp_src" | b"echo_port" => {
                match parse_u64(value).and_then(|n| u16::try_from(n).ok()) {
                    Some(port) if key == b"udp_src" => cfg.udp_src = port,
                    Some(port) => cfg.echo_port = port,
                    None => bad(key, value),
                }
                continue;
            }
            b"gw_mac" => {
                match parse_mac(value) {
                    Some(mac) => cfg.gw_mac = Some(mac),
                    None => bad(key, value),
                }
                continue;
            }
            b"disk_bytes" => {
                match parse_size(value).filter(|&n| n <= MAX_DISK_BYTES) {
                    Some(n) => cfg.disk_bytes = n,
                    None => bad(key, value),
                }
                continue;
            }
            b"span" => {
                match parse_u64(value) {
                    Some(0) => cfg.span = None,
                    Some(n) => cfg.span = Some(n),
                    None => bad(key, value),
                }
                continue;
            }
            _ => continue,
        };
        match parse_u64(value) {
            Some(n) => *slot = n,
            None => bad(key, value),
        }
    }
    cfg
}

/// A decimal or `0x` hexadecimal u64; None on junk or overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// `on|off` (also `1|0`, `yes|no`).
pub fn parse_switch(s: &[u8]) -> Option<bool> {
    match s {
        b"on" | b"1" | b"yes" | b"true" => Some(true),
        b"off" | b"0" | b"no" | b"false" => Some(false),
        _ => None,
    }
}

/// A size with an optional `K`/`M`/`G` suffix (Linux's `memparse`).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1 << shift)
}

/// `<size>@<addr>:<irq>[:<id>]`, as Linux's `virtio_mmio.device=`.
pub fn parse_mmio_device(s: &[u8]) -> Option<MmioDevice> {
    let at = s.iter().position(|&b| b == b'@')?;
    let size = parse_size(&s[..at])?;
    let rest = &s[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let addr = parse_u64(&rest[..colon])?;
    let rest = &rest[colon + 1..];
    let irq_end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    let irq = u32::try_from(parse_u64(&rest[..irq_end])?).ok()?;
    if irq_end < rest.len() {
        // The optional platform device id: a number, ignored.
        parse_u64(&rest[irq_end + 1..])?;
    }
    if size == 0 {
        return None;
    }
    Some(MmioDevice { addr, size, irq })
}

/// Dotted-quad IPv4.
pub fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for octet in &mut ip {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *octet = u8::try_from(parse_u64(part)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// `A.B.C.D:PORT` (port 1-65535).
pub fn parse_ip_port(s: &[u8]) -> Option<([u8; 4], u16)> {
    let colon = s.iter().position(|&b| b == b':')?;
    let ip = parse_ipv4(&s[..colon])?;
    let port = &s[colon + 1..];
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let port = u16::try_from(parse_u64(port)?).ok().filter(|&p| p != 0)?;
    Some((ip, port))
}

/// `aa:bb:cc:dd:ee:ff` (also `-` separated).
pub fn parse_mac(s: &[u8]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(|&b| b == b':' || b == b'-');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        let mut v = 0u8;
        for &c in part {
            v = v * 16 + (c as char).to_digit(16)? as u8;
        }
        *byte = v;
    }
    parts.next().is_none().then_some(mac)
}
