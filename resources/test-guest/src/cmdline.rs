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
    /// `crash=pf|panic`: die on purpose right after `ftguest ready` (a test
    /// hook for the VMM's handling of a guest that shuts down).
    pub crash: Crash,
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
                    _ => bad(key, value),
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
