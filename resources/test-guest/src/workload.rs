//! The workload (CPL3): rounds that each write the round number into `dirty`
//! consecutive pages of the working set (wrapping around), each lasting at
//! least `round_us`; after every `rounds` rounds a heartbeat line from a
//! counter kept in guest memory, so a VM restored from a checkpoint carries on
//! from the checkpointed count.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::boot::MAPPED_END;
use crate::arch::io::{pause, rdtsc};
use crate::bootparams::BootParams;
use crate::cmdline::Config;
use crate::peripherals::Peripherals;
use crate::power::poweroff;
use crate::serial::{write_bytes, Line};
use crate::smp::{self, Share, MAX_CPUS};

const PAGE: u64 = 4096;
/// The working set starts at or above this address.
const WORKING_SET_MIN: u64 = 16 << 20;

/// The heartbeat counter: incremented, then printed. Lives in guest memory.
static HEARTBEAT: AtomicU64 = AtomicU64::new(0);
/// The last round number written into the working set.
static ROUND: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __image_end: u8;
}

pub struct Workload {
    base: u64,
    span: u64,
    dirty: u64,
    rounds: u64,
    round_us: u64,
    round_cycles: u64,
    stop: u64,
    /// CPUs running the workload (1: no APs, the original single loop).
    cpus: usize,
    /// The BSP's part of the working set (all of it with one CPU).
    share: Share,
}

impl Workload {
    /// Places the working set in the largest stretch of RAM at or above
    /// 16 MiB (and above the image), and sizes it.
    pub fn new(bp: &BootParams, cfg: &Config, tsc_khz: u64) -> Self {
        let image_end = (&raw const __image_end as u64).next_multiple_of(PAGE);
        let lowest = image_end.max(WORKING_SET_MIN);
        let mapped_end = MAPPED_END.load(Ordering::Relaxed);
        let (base, room) = bp
            .ram()
            .filter_map(|r| {
                let start = r.start.max(lowest).next_multiple_of(PAGE);
                let end = r.end.min(mapped_end) / PAGE * PAGE;
                (end > start).then_some((start, (end - start) / PAGE))
            })
            .max_by_key(|&(_, pages)| pages)
            .unwrap_or((lowest, 0));
        let wanted = cfg.span.unwrap_or(cfg.dirty.saturating_mul(4));
        Workload {
            base,
            span: wanted.min(room),
            dirty: cfg.dirty,
            rounds: cfg.rounds,
            round_us: cfg.round_us,
            round_cycles: cfg.round_us.saturating_mul(tsc_khz) / 1000,
            stop: cfg.stop,
            cpus: 1,
            share: Share {
                base,
                pages: wanted.min(room),
                dirty: cfg.dirty,
            },
        }
    }

    /// The working set split among `cpus` CPUs: each gets a contiguous part
    /// of `span / cpus` pages and dirties its share of `dirty` pages per
    /// round (the first `dirty % cpus` CPUs one more), so the pages dirtied
    /// per round stay `dirty` whatever the CPU count.
    pub fn shares(&self, cpus: usize) -> [Share; MAX_CPUS] {
        let n = cpus.clamp(1, MAX_CPUS) as u64;
        let part = self.span / n;
        let mut shares = [Share {
            base: self.base,
            pages: 0,
            dirty: 0,
        }; MAX_CPUS];
        for (c, s) in shares.iter_mut().enumerate().take(n as usize) {
            let c = c as u64;
            *s = Share {
                base: self.base + c * part * PAGE,
                pages: part,
                dirty: self.dirty / n + u64::from(c < self.dirty % n),
            };
        }
        shares
    }

    /// Minimum TSC cycles per round.
    pub fn round_cycles(&self) -> u64 {
        self.round_cycles
    }

    /// From now on the BSP runs only its share (`shares(cpus)[0]`) and
    /// checks the CPUs' shared state after each heartbeat.
    pub fn set_cpus(&mut self, cpus: usize, share: Share) {
        self.cpus = cpus;
        self.share = share;
    }

    /// One line with the effective settings (before `ftguest ready`).
    pub fn print_config(&self) {
        let mut line = Line::new();
        line.push_str("ftguest config dirty=");
        line.push_u64(self.dirty);
        line.push_str(" span=");
        line.push_u64(self.span);
        line.push_str(" rounds=");
        line.push_u64(self.rounds);
        line.push_str(" round_us=");
        line.push_u64(self.round_us);
        line.push_str(" stop=");
        line.push_u64(self.stop);
        line.push_str(" ws=");
        line.push_hex(self.base);
        line.push_str("\n");
        line.emit();
    }

    /// Rounds and heartbeats forever (or until `stop`); `io` is polled
    /// while rounds wait, and told of each heartbeat after its line.
    pub fn run(&self, io: &mut Peripherals) -> ! {
        let mut cursor = 0;
        io.start();
        loop {
            for _ in 0..self.rounds {
                cursor = self.round(cursor, io);
            }
            let n = HEARTBEAT.load(Ordering::Relaxed) + 1;
            HEARTBEAT.store(n, Ordering::Relaxed);
            let mut line = Line::new();
            line.push_str("ftguest hb=");
            line.push_u64(HEARTBEAT.load(Ordering::Relaxed));
            line.push_str("\n");
            line.emit();
            if self.cpus > 1 {
                smp::after_heartbeat(n, self.cpus);
            }
            io.heartbeat(n);
            if self.stop != 0 && n >= self.stop {
                io.drain();
                write_bytes(b"ftguest done\n");
                poweroff();
            }
        }
    }

    /// Dirties `dirty` pages from `cursor` on, lets `io` do the round's disk
    /// writes, waits out the round (polling `io`), and returns the next
    /// cursor.
    fn round(&self, cursor: u64, io: &mut Peripherals) -> u64 {
        let start = rdtsc();
        let round = ROUND.load(Ordering::Relaxed) + 1;
        ROUND.store(round, Ordering::Relaxed);
        let cursor = smp::dirty(&self.share, cursor, round);
        if self.cpus > 1 {
            smp::bsp_round(round);
            smp::append(0);
        }
        io.round(round);
        io.poll();
        while rdtsc().wrapping_sub(start) < self.round_cycles {
            pause();
            io.poll();
        }
        cursor
    }
}
