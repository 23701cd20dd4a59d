//! TSC calibration against the PIT (runs at CPL3; port I/O via IOPL=3).
//!
//! Channel 2 counts down once in mode 0 with its gate opened through port
//! 0x61; its OUT pin (0x61 bit 5) rises at terminal count. The TSC ticks
//! between programming and that rise give the rate (Linux's
//! `pit_calibrate_tsc`).

use crate::arch::io::{cpuid, inb, outb, rdtsc};

const PIT_HZ: u64 = 1_193_182;
const CALIBRATE_MS: u64 = 10;
const PIT_CH2: u16 = 0x42;
const PIT_MODE: u16 = 0x43;
const PORT_B: u16 = 0x61;
const PORT_B_GATE2: u8 = 1 << 0;
const PORT_B_SPEAKER: u8 = 1 << 1;
const PORT_B_OUT2: u8 = 1 << 5;
/// Channel 2, lobyte/hibyte access, mode 0 (interrupt on terminal count), binary.
const CH2_MODE0: u8 = 0b1011_0000;
/// Each poll is a VM exit (> 1 µs): this bounds the wait well past 10 ms.
const MAX_POLLS: u64 = 10_000_000;
/// Rates outside this range mean the measurement went wrong.
const PLAUSIBLE_KHZ: core::ops::RangeInclusive<u64> = 100_000..=20_000_000;
const FALLBACK_KHZ: u64 = 2_000_000;

pub struct TscRate {
    pub khz: u64,
    /// Why the rate did not come from the PIT, if it did not.
    pub note: Option<&'static str>,
}

/// The TSC rate in kHz.
pub fn calibrate_khz() -> TscRate {
    if let Some(khz) = pit_khz().filter(|k| PLAUSIBLE_KHZ.contains(k)) {
        return TscRate { khz, note: None };
    }
    if let Some(khz) = cpuid_khz().filter(|k| PLAUSIBLE_KHZ.contains(k)) {
        return TscRate {
            khz,
            note: Some("PIT calibration failed; TSC rate taken from CPUID"),
        };
    }
    TscRate {
        khz: FALLBACK_KHZ,
        note: Some("PIT calibration failed; assuming a 2 GHz TSC"),
    }
}

fn pit_khz() -> Option<u64> {
    let latch = PIT_HZ * CALIBRATE_MS / 1000;
    // SAFETY: the PIT's channel 2 and port 0x61 (speaker kept off); no
    // interrupts are involved and the gate is restored afterwards.
    unsafe {
        let saved = inb(PORT_B);
        outb(PORT_B, (saved & !PORT_B_SPEAKER) | PORT_B_GATE2);
        outb(PIT_MODE, CH2_MODE0);
        outb(PIT_CH2, latch as u8);
        outb(PIT_CH2, (latch >> 8) as u8);
        let start = rdtsc();
        let mut polls = 0u64;
        while inb(PORT_B) & PORT_B_OUT2 == 0 && polls < MAX_POLLS {
            polls += 1;
        }
        let end = rdtsc();
        outb(PORT_B, saved);
        // OUT high at once (no PIT behind port 0x61) or never: no answer.
        if polls == 0 || polls == MAX_POLLS {
            return None;
        }
        Some(end.wrapping_sub(start) / CALIBRATE_MS)
    }
}

/// Hypervisor leaf 0x40000010 (TSC kHz) or leaf 0x15 (crystal ratio).
fn cpuid_khz() -> Option<u64> {
    let (max_hv, ..) = cpuid(0x4000_0000);
    if (0x4000_0010..0x4001_0000).contains(&max_hv) {
        let (khz, ..) = cpuid(0x4000_0010);
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    let (max_std, ..) = cpuid(0);
    if max_std >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return Some(u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    None
}
