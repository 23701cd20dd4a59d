//! Disk images for the tests that give a VM a disk: sparse images, data
//! planted at chosen offsets, the test guest's sector records (its README,
//! "Disk record") and the `disk crc` report lines of `--ft-hash-epoch` and
//! of a takeover.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

/// The guest's sector size.
pub const SECTOR: usize = 512;

/// A sparse image of `bytes` bytes at `path` (zeros; replaces a file).
pub fn make_image(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("create image {}: {e}", path.display()));
    f.set_len(bytes)
        .unwrap_or_else(|e| panic!("size image {}: {e}", path.display()));
}

/// Writes `data` at byte `offset` of the image at `path`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open image {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write image {}: {e}", path.display()));
}

/// The whole image ("" when it cannot be read, so a check reports it as
/// missing data rather than panicking on the way).
pub fn read_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// A small deterministic generator (xorshift64*), so a failing run can be
/// repeated from the seed it printed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Seeded from `$var` when set (to repeat a run), else from the clock;
    /// prints the seed.
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    ^ (u64::from(std::process::id()) << 32)
            });
        println!("random seed {seed} (repeat with {var}={seed})");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `r` (empty ranges give `r.start`).
    pub fn range(&mut self, r: Range<u64>) -> u64 {
        if r.end <= r.start {
            return r.start;
        }
        r.start + self.next_u64() % (r.end - r.start)
    }

    /// `n` random bytes, none of them making a sector all zeros.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..n).map(|_| self.next_u64() as u8).collect();
        if let Some(b) = v.first_mut() {
            *b |= 1;
        }
        v
    }
}

/// The sector the test guest writes for heartbeat `n`: `ftguest sector
/// hb=<n>\n`, then zeros.
pub fn sector_record(n: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    let text = format!("ftguest sector hb={n}\n");
    s[..text.len()].copy_from_slice(text.as_bytes());
    s
}

/// What a sector holds, read as a record: Some(n) for a well-formed
/// record of heartbeat n (text then zeros).
pub fn record_in(sector: &[u8]) -> Option<u64> {
    let end = sector.iter().position(|b| *b == 0).unwrap_or(sector.len());
    let n: u64 = std::str::from_utf8(&sector[..end])
        .ok()?
        .strip_suffix('\n')?
        .strip_prefix("ftguest sector hb=")?
        .parse()
        .ok()?;
    (sector[..] == sector_record(n)[..]).then_some(n)
}

/// Heartbeat numbers of every record found in the image at `path`, in
/// sector order.
pub fn disk_records(path: &Path) -> Vec<u64> {
    read_image(path)
        .chunks(SECTOR)
        .filter_map(record_in)
        .collect()
}

/// Where the guest keeps its records: `area` sectors from LBA 0, heartbeat
/// n at LBA `(n - 1) mod area`. Without `disk_bytes=` the area is the whole
/// disk; with it, the first half (the second is the bulk area).
pub fn record_area(capacity_bytes: u64, bulk: bool) -> u64 {
    let sectors = capacity_bytes / SECTOR as u64;
    if bulk {
        sectors / 2
    } else {
        sectors
    }
}

/// The heartbeat whose record the record area's sector `lba` holds once
/// the guest wrote records 1..=last (the latest one mapping there), if any.
fn expected_at(lba: u64, area: u64, last: u64) -> Option<u64> {
    let first = lba + 1;
    (first <= last).then(|| first + (last - first) / area * area)
}

/// Checks that the image `img` holds records 1..=`last` exactly, each in
/// its sector of the record area (`area` sectors), and, with `zero_rest`,
/// that the area's sectors no record reached are still zeros. The error
/// says what is wrong in ranges of heartbeats ("lacks records 1..61").
pub fn check_records(img: &[u8], area: u64, last: u64, zero_rest: bool) -> Result<(), String> {
    let sector = |lba: u64| -> Option<&[u8]> {
        let at = lba as usize * SECTOR;
        img.get(at..at + SECTOR)
    };
    let mut missing = Vec::new(); // zeros where a record belongs
    let mut other = Vec::new(); // (n, what is there instead)
    let mut dirty_rest = Vec::new();
    for lba in 0..area {
        let got = sector(lba);
        match expected_at(lba, area, last) {
            Some(n) => match got {
                Some(s) if s[..] == sector_record(n)[..] => {}
                Some(s) if s.iter().all(|b| *b == 0) => missing.push(n),
                Some(s) => other.push((n, describe_sector(s))),
                None => missing.push(n),
            },
            None if zero_rest => {
                if let Some(s) = got {
                    if s.iter().any(|b| *b != 0) {
                        dirty_rest.push(lba);
                    }
                }
            }
            None => {}
        }
    }
    if missing.is_empty() && other.is_empty() && dirty_rest.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    other.sort_unstable();
    let mut why = String::new();
    if !missing.is_empty() {
        let _ = write!(
            why,
            "lacks records {} ({} of {last}: zero sectors where they belong)",
            ranges(&missing),
            missing.len()
        );
    }
    if !other.is_empty() {
        if !why.is_empty() {
            why.push_str("; ");
        }
        let ns: Vec<u64> = other.iter().map(|(n, _)| *n).collect();
        let _ = write!(
            why,
            "holds something else where records {} belong (first: hb={} has {})",
            ranges(&ns),
            other[0].0,
            other[0].1
        );
    }
    if !dirty_rest.is_empty() {
        if !why.is_empty() {
            why.push_str("; ");
        }
        let _ = write!(
            why,
            "{} sector(s) past the last record are not zeros (LBAs {})",
            dirty_rest.len(),
            ranges(&dirty_rest)
        );
    }
    Err(why)
}

/// The bulk area of a disk of `capacity` sectors written `k` sectors a
/// round (`disk_bytes=`): (its first LBA, the number of slots).
pub fn bulk_layout(capacity: u64, k: u64) -> (u64, u64) {
    let first = capacity / 2;
    (first, (capacity - first) / k)
}

/// The sector at `lba` of round `r`'s bulk slot: `ftguest bulk round=<r>
/// sector=<lba>\n`, then byte i of the sector is (r + i) mod 256.
pub fn bulk_sector(r: u64, lba: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    let text = format!("ftguest bulk round={r} sector={lba}\n");
    s[..text.len()].copy_from_slice(text.as_bytes());
    for (i, b) in s.iter_mut().enumerate().skip(text.len()) {
        *b = ((r + i as u64) % 256) as u8;
    }
    s
}

/// Some(r) when `sector` is exactly round r's bulk data for its LBA.
pub fn bulk_in(sector: &[u8]) -> Option<(u64, u64)> {
    let end = sector.iter().position(|b| *b == b'\n')?;
    let text = std::str::from_utf8(&sector[..end]).ok()?;
    let (r, lba) = text
        .strip_prefix("ftguest bulk round=")?
        .split_once(" sector=")?;
    let (r, lba) = (r.parse().ok()?, lba.parse().ok()?);
    (sector[..] == bulk_sector(r, lba)[..]).then_some((r, lba))
}

/// Checks the bulk area of the image `img` (`capacity` sectors, slots of
/// `k` sectors) after rounds 1..=`last_round`: each slot holds exactly the
/// latest round written to it, and the sectors no round reached are zeros.
pub fn check_bulk(img: &[u8], capacity: u64, k: u64, last_round: u64) -> Result<(), String> {
    let (first, slots) = bulk_layout(capacity, k);
    let sector = |lba: u64| -> &[u8] {
        let at = lba as usize * SECTOR;
        img.get(at..at + SECTOR).unwrap_or(&[])
    };
    let mut missing = Vec::new();
    let mut other: Vec<(u64, String)> = Vec::new();
    let mut dirty = Vec::new();
    for slot in 0..slots {
        let want = expected_at(slot, slots, last_round);
        for lba in first + slot * k..first + (slot + 1) * k {
            let got = sector(lba);
            // One entry per slot, however many of its sectors are wrong.
            match want {
                Some(r) if got == bulk_sector(r, lba) => {}
                Some(r) if got.iter().all(|b| *b == 0) && missing.last() != Some(&r) => {
                    missing.push(r)
                }
                Some(r) if got.iter().any(|b| *b != 0) && other.last().map(|o| o.0) != Some(r) => {
                    other.push((r, format!("LBA {lba} holds {}", describe_sector(got))))
                }
                Some(_) => {}
                None if got.iter().any(|b| *b != 0) => dirty.push(lba),
                None => {}
            }
        }
    }
    for lba in first + slots * k..capacity {
        if sector(lba).iter().any(|b| *b != 0) {
            dirty.push(lba);
        }
    }
    if missing.is_empty() && other.is_empty() && dirty.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    other.sort_unstable();
    let mut why = Vec::new();
    if !missing.is_empty() {
        why.push(format!(
            "lacks the bulk writes of rounds {} ({} of {last_round}: zero slots where they belong)",
            ranges(&missing),
            missing.len()
        ));
    }
    if !other.is_empty() {
        let rs: Vec<u64> = other.iter().map(|o| o.0).collect();
        why.push(format!(
            "holds something else in the bulk slots of rounds {} (first: round {}: {})",
            ranges(&rs),
            other[0].0,
            other[0].1
        ));
    }
    if !dirty.is_empty() {
        why.push(format!(
            "{} bulk-area sector(s) no round wrote are not zeros (LBAs {})",
            dirty.len(),
            ranges(&dirty)
        ));
    }
    Err(why.join("; "))
}

/// A short description of a sector's contents for an error message.
pub fn describe_sector(s: &[u8]) -> String {
    if let Some(n) = record_in(s) {
        return format!("the record of hb={n}");
    }
    if let Some((r, lba)) = bulk_in(s) {
        return format!("round {r}'s bulk data for LBA {lba}");
    }
    if s.iter().all(|b| *b == 0) {
        return "zeros".into();
    }
    let head: String = s
        .iter()
        .take(24)
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                *b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("other data ({head:?}…)")
}

/// Sorted numbers as ranges: "1..61, 70, 72..80".
pub fn ranges(v: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..{end}")
        });
        i += 1;
    }
    if out.len() > 12 {
        let n = out.len();
        out.truncate(12);
        out.push(format!("… ({} more ranges)", n - 12));
    }
    out.join(", ")
}

/// The per-disk CRCs of a `disk crc` line: `disk0=1a2b3c4d disk1=…`, in
/// order. None when the text is not of that form.
pub fn parse_disk_crcs(s: &str) -> Option<Vec<(String, u32)>> {
    let v: Option<Vec<(String, u32)>> = s
        .split_whitespace()
        .map(|w| {
            let (name, hex) = w.split_once('=')?;
            Some((name.to_string(), u32::from_str_radix(hex, 16).ok()?))
        })
        .collect();
    v.filter(|v| !v.is_empty())
}

/// The text after `ftvmm: disk crc at WHAT: ` on `stderr` (WHAT: "epoch
/// 12", "takeover from checkpoint 12").
pub fn disk_crc_text<'a>(stderr: &'a str, what: &str) -> Option<&'a str> {
    let prefix = format!("ftvmm: disk crc at {what}: ");
    stderr.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
}

/// The disk CRCs reported on `stderr` as `ftvmm: disk crc at WHAT: …`.
pub fn disk_crc(stderr: &str, what: &str) -> Option<Vec<(String, u32)>> {
    disk_crc_text(stderr, what).and_then(parse_disk_crcs)
}

/// A `disk crc` report for a message: the CRCs, the line as printed when
/// it does not read as CRCs, or "(no line)".
pub fn show_disk_crc(stderr: &str, what: &str) -> String {
    match disk_crc_text(stderr, what) {
        None => "(no line)".into(),
        Some(t) => parse_disk_crcs(t).map_or_else(|| format!("{t:?}"), |v| show_crcs(&v)),
    }
}

/// A takeover's disk line, `ftvmm: disk crc at takeover from checkpoint C:
/// …`: (C, the CRCs).
pub fn takeover_disk_crc(stderr: &str) -> Option<(u64, Vec<(String, u32)>)> {
    let (c, text) = takeover_disk_text(stderr)?;
    Some((c, parse_disk_crcs(text)?))
}

/// The takeover's disk line as printed: (C, the text after the colon).
pub fn takeover_disk_text(stderr: &str) -> Option<(u64, &str)> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("ftvmm: disk crc at takeover from checkpoint ")?;
        let (c, text) = rest.split_once(": ")?;
        Some((c.parse().ok()?, text))
    })
}

/// The memory CRC reported on `stderr` for `epoch` (`--ft-hash-epoch`).
pub fn memory_crc(stderr: &str, epoch: u64) -> Option<String> {
    let prefix = format!("ftvmm: memory crc at epoch {epoch}: ");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

/// The checkpoint a standby resumed from, from its report line `ftvmm:
/// standby took over from checkpoint C (…)`.
pub fn took_over_from(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        l.strip_prefix("ftvmm: standby took over from checkpoint ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// CRCs as the VMM prints them, for messages.
pub fn show_crcs(v: &[(String, u32)]) -> String {
    v.iter()
        .map(|(n, c)| format!("{n}={c:08x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
