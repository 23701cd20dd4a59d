//! Several CPUs (CPL3 side): finding them in the MP table, starting the
//! application processors with INIT-SIPI-SIPI through the BSP's local APIC,
//! each AP's workload loop, and the shared state the CPUs update under a
//! spinlock so that a restored VM can be checked for a consistent cut.
//!
//! Shared state, in one region of guest memory (`__ftg_smp`, zeroed by the
//! BSP before it starts the APs): one page per CPU (its sequence number and
//! round count), and a page holding the lock, the log's entry count and a
//! ring of the last `LOG_LEN` log entries `(cpu << 56) | seq`. Every round,
//! each CPU, under the lock, takes `seq = own seq + 1`, appends `(cpu, seq)`
//! to the log and stores `seq` in its own page. After every heartbeat the BSP
//! checks, under the lock, that the two agree (see [`check`]).
//!
//! With one CPU none of this runs: the guest behaves as it always did.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::io::{pause, rdtsc};
use crate::arch::smp::{install_trampoline, prepare_ap, TRAMPOLINE_BASE};
use crate::serial::Line;

/// Most CPUs the guest runs on (more in the MP table are left idle).
pub const MAX_CPUS: usize = 8;

const PAGE: u64 = 4096;
/// Entries of the log ring (one page).
const LOG_LEN: u64 = 509;

// One page per CPU, then the lock/log page. Not zeroed by the boot code
// (zeroing under the emulator is slow); the BSP zeroes it at CPL3.
global_asm!(
    ".section .noinit.smp,\"aw\",@nobits",
    ".balign 4096",
    ".global __ftg_smp",
    "__ftg_smp:",
    ".skip {size}",
    size = const (MAX_CPUS as u64 + 1) * 4096,
);

extern "C" {
    static __ftg_smp: u8;
}

fn word(page: u64, index: u64) -> &'static AtomicU64 {
    let addr = (&raw const __ftg_smp) as u64 + page * PAGE + index * 8;
    // SAFETY: inside the `__ftg_smp` region (page <= MAX_CPUS, index < 512),
    // 8-byte aligned, only ever accessed atomically.
    unsafe { &*(addr as *const AtomicU64) }
}

fn cpu_seq(cpu: usize) -> &'static AtomicU64 {
    word(cpu as u64, 0)
}
fn cpu_rounds(cpu: usize) -> &'static AtomicU64 {
    word(cpu as u64, 1)
}
fn cpu_alive(cpu: usize) -> &'static AtomicU64 {
    word(cpu as u64, 2)
}
const SHARED: u64 = MAX_CPUS as u64;
fn lock_word() -> &'static AtomicU64 {
    word(SHARED, 0)
}
fn log_count() -> &'static AtomicU64 {
    word(SHARED, 1)
}
fn log_entry(i: u64) -> &'static AtomicU64 {
    word(SHARED, 3 + i % LOG_LEN)
}

/// What each CPU does per round: dirty `dirty` pages of its own part of the
/// working set (`pages` pages from `base`), then wait out `round_cycles`.
#[derive(Clone, Copy)]
pub struct Share {
    pub base: u64,
    pub pages: u64,
    pub dirty: u64,
}

/// The plan the BSP publishes before starting the APs.
#[derive(Clone, Copy)]
struct Plan {
    shares: [Share; MAX_CPUS],
    round_cycles: u64,
}

static mut PLAN: Plan = Plan {
    shares: [Share {
        base: 0,
        pages: 0,
        dirty: 0,
    }; MAX_CPUS],
    round_cycles: 0,
};

/// The CPUs the MP table lists (enabled ones, the BSP first), at most
/// `MAX_CPUS`.
pub struct Cpus {
    pub count: usize,
    pub apic_ids: [u8; MAX_CPUS],
    /// How many the table listed in all.
    pub listed: usize,
}

fn read8(addr: u64) -> u8 {
    // SAFETY: only called on addresses below 1 MiB (the EBDA and BIOS
    // areas), which are RAM identity mapped user-readable.
    unsafe { (addr as *const u8).read_volatile() }
}
fn read16(addr: u64) -> u16 {
    u16::from(read8(addr)) | (u16::from(read8(addr + 1)) << 8)
}
fn read32(addr: u64) -> u32 {
    u32::from(read16(addr)) | (u32::from(read16(addr + 2)) << 16)
}

fn find_mp_floating_pointer() -> Option<u64> {
    let areas = [(0x9_fc00u64, 0xa_0000u64), (0xf_0000, 0x10_0000)];
    for (start, end) in areas {
        let mut a = start;
        while a + 16 <= end {
            if read32(a) == u32::from_le_bytes(*b"_MP_") {
                let sum = (0..16).fold(0u8, |s, i| s.wrapping_add(read8(a + i)));
                if sum == 0 {
                    return Some(a);
                }
            }
            a += 16;
        }
    }
    None
}

/// Reads the MP table. Without one (or with a damaged one) there is one CPU.
pub fn detect() -> Cpus {
    let mut cpus = Cpus {
        count: 1,
        apic_ids: [0; MAX_CPUS],
        listed: 1,
    };
    let Some(fp) = find_mp_floating_pointer() else {
        return cpus;
    };
    let table = u64::from(read32(fp + 4));
    if table == 0 || table >= 0x10_0000 || read32(table) != u32::from_le_bytes(*b"PCMP") {
        return cpus;
    }
    let len = u64::from(read16(table + 4));
    let entries = read16(table + 34);
    let end = table + len;
    let mut at = table + 44;
    let mut bsp = None;
    let mut aps = [0u8; MAX_CPUS];
    let (mut n_aps, mut listed) = (0, 0);
    for _ in 0..entries {
        if at >= end {
            break;
        }
        match read8(at) {
            0 => {
                let (id, flags) = (read8(at + 1), read8(at + 3));
                if flags & 1 != 0 {
                    listed += 1;
                    if flags & 2 != 0 && bsp.is_none() {
                        bsp = Some(id);
                    } else if n_aps < MAX_CPUS - 1 {
                        aps[n_aps] = id;
                        n_aps += 1;
                    }
                }
                at += 20;
            }
            _ => at += 8,
        }
    }
    let Some(bsp) = bsp else {
        return cpus;
    };
    cpus.apic_ids[0] = bsp;
    cpus.apic_ids[1..=n_aps].copy_from_slice(&aps[..n_aps]);
    cpus.count = 1 + n_aps;
    cpus.listed = listed;
    cpus
}

const APIC_BASE: u64 = 0xfee0_0000;
const APIC_ICR_LOW: u64 = 0x300;
const APIC_ICR_HIGH: u64 = 0x310;
const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_PENDING: u32 = 1 << 12;

fn apic_write(reg: u64, value: u32) {
    // SAFETY: the xAPIC's MMIO page, inside the prebuilt identity map of the
    // first 4 GiB (user-accessible); KVM's in-kernel LAPIC handles it.
    unsafe { ((APIC_BASE + reg) as *mut u32).write_volatile(value) }
}
fn apic_read(reg: u64) -> u32 {
    // SAFETY: as for `apic_write`.
    unsafe { ((APIC_BASE + reg) as *const u32).read_volatile() }
}

/// Sends an IPI (ICR low word `low`) to APIC ID `dest` and waits (bounded)
/// until the APIC accepted it.
fn send_ipi(dest: u8, low: u32) {
    apic_write(APIC_ICR_HIGH, u32::from(dest) << 24);
    apic_write(APIC_ICR_LOW, low);
    for _ in 0..1000 {
        if apic_read(APIC_ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        pause();
    }
}

fn wait_us(us: u64, tsc_khz: u64) {
    let start = rdtsc();
    let cycles = us * tsc_khz / 1000;
    while rdtsc().wrapping_sub(start) < cycles {
        pause();
    }
}

/// Waits at most `us` for CPU `cpu` to report itself alive.
fn wait_alive(cpu: usize, us: u64, tsc_khz: u64) -> bool {
    let start = rdtsc();
    let cycles = us * tsc_khz / 1000;
    while rdtsc().wrapping_sub(start) < cycles {
        if cpu_alive(cpu).load(Ordering::Acquire) != 0 {
            return true;
        }
        pause();
    }
    cpu_alive(cpu).load(Ordering::Acquire) != 0
}

/// Publishes the plan, installs the trampoline and starts the APs one after
/// the other; returns how many CPUs run (the BSP included). Stops at the
/// first AP that does not come up after two INIT-SIPI-SIPI rounds (1 s
/// each), with a warning.
pub fn start_aps(cpus: &Cpus, shares: [Share; MAX_CPUS], round_cycles: u64, tsc_khz: u64) -> usize {
    for page in 0..=SHARED {
        for i in 0..PAGE / 8 {
            word(page, i).store(0, Ordering::Relaxed);
        }
    }
    // SAFETY: no AP runs yet; they read the plan only after their start,
    // which the Release stores in `prepare_ap` order after this.
    unsafe {
        PLAN = Plan {
            shares,
            round_cycles,
        }
    };
    install_trampoline();
    let vector = (TRAMPOLINE_BASE >> 12) as u32;
    for cpu in 1..cpus.count {
        let id = cpus.apic_ids[cpu];
        // SAFETY: cpu < MAX_CPUS, not started, and the previous AP is up.
        unsafe { prepare_ap(cpu) };
        // Twice at most: an INIT still pending in the LAPIC when a
        // checkpoint is cut is not part of the saved state, so a VM
        // restored from that instant needs it again.
        let mut alive = false;
        for _ in 0..2 {
            send_ipi(id, ICR_INIT_ASSERT);
            wait_us(10_000, tsc_khz);
            send_ipi(id, ICR_STARTUP | vector);
            if !wait_alive(cpu, 200, tsc_khz) {
                send_ipi(id, ICR_STARTUP | vector);
            }
            alive = wait_alive(cpu, 1_000_000, tsc_khz);
            if alive {
                break;
            }
        }
        if !alive {
            let mut line = Line::new();
            line.push_str("ftguest warning: smp: cpu ");
            line.push_u64(cpu as u64);
            line.push_str(" (apic ");
            line.push_u64(u64::from(id));
            line.push_str(") did not start\n");
            line.emit();
            return cpu;
        }
    }
    cpus.count
}

fn lock() {
    while lock_word().swap(1, Ordering::Acquire) != 0 {
        while lock_word().load(Ordering::Relaxed) != 0 {
            pause();
        }
    }
}
fn unlock() {
    lock_word().store(0, Ordering::Release);
}

/// One round's update of the shared state by CPU `cpu`: under the lock, the
/// next sequence number goes both into the log and into the CPU's own page.
pub fn append(cpu: usize) {
    lock();
    let seq = cpu_seq(cpu).load(Ordering::Relaxed) + 1;
    let count = log_count().load(Ordering::Relaxed);
    log_entry(count).store(((cpu as u64) << 56) | seq, Ordering::Relaxed);
    log_count().store(count + 1, Ordering::Relaxed);
    cpu_seq(cpu).store(seq, Ordering::Relaxed);
    unlock();
}

/// `crash=log`: bumps the BSP's sequence number without a log entry, as a
/// cut in the middle of an update would leave it.
pub fn tear() {
    lock();
    cpu_seq(0).fetch_add(1, Ordering::Relaxed);
    unlock();
}

/// Dirties `share.dirty` pages from `cursor` on (wrapping in the share),
/// writing `round` into each; returns the next cursor.
pub fn dirty(share: &Share, mut cursor: u64, round: u64) -> u64 {
    if share.pages == 0 {
        return cursor;
    }
    for _ in 0..share.dirty {
        let page = (share.base + cursor * PAGE) as *mut u64;
        // SAFETY: cursor < pages, so the page is inside this CPU's part of
        // the working set: RAM that nothing else uses, mapped user-writable.
        unsafe { page.write_volatile(round) };
        cursor += 1;
        if cursor == share.pages {
            cursor = 0;
        }
    }
    cursor
}

/// Counts a round of the BSP (CPU 0) for the progress line.
pub fn bsp_round(round: u64) {
    cpu_rounds(0).store(round, Ordering::Relaxed);
}

/// An AP's CPL3 entry: reports itself alive, then runs rounds forever.
pub extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    // SAFETY: written once by the BSP before this AP was started.
    let plan = unsafe { PLAN };
    let share = plan.shares[cpu];
    cpu_alive(cpu).store(1, Ordering::Release);
    let mut cursor = 0;
    loop {
        let start = rdtsc();
        let round = cpu_rounds(cpu).load(Ordering::Relaxed) + 1;
        cpu_rounds(cpu).store(round, Ordering::Relaxed);
        cursor = dirty(&share, cursor, round);
        append(cpu);
        while rdtsc().wrapping_sub(start) < plan.round_cycles {
            pause();
        }
    }
}

/// What [`check`] found wrong.
struct Mismatch {
    cpu: u64,
    log: u64,
    page: u64,
}

/// Checks, under the lock, that the log and the CPUs' pages agree: as many
/// entries as the sequence numbers add up to, each CPU's entries in the ring
/// consecutive, and its last one equal to the number in its page.
fn verify(cpus: usize) -> Option<Mismatch> {
    let count = log_count().load(Ordering::Relaxed);
    let total: u64 = (0..cpus).map(|c| cpu_seq(c).load(Ordering::Relaxed)).sum();
    if count != total {
        return Some(Mismatch {
            cpu: u64::MAX,
            log: count,
            page: total,
        });
    }
    let mut last = [0u64; MAX_CPUS];
    for i in count.saturating_sub(LOG_LEN)..count {
        let e = log_entry(i).load(Ordering::Relaxed);
        let (cpu, seq) = (e >> 56, e & ((1 << 56) - 1));
        if cpu as usize >= cpus {
            return Some(Mismatch {
                cpu,
                log: seq,
                page: 0,
            });
        }
        let prev = last[cpu as usize];
        if prev != 0 && seq != prev + 1 {
            return Some(Mismatch {
                cpu,
                log: seq,
                page: prev + 1,
            });
        }
        last[cpu as usize] = seq;
    }
    for (c, &seq) in last.iter().enumerate().take(cpus) {
        let page = cpu_seq(c).load(Ordering::Relaxed);
        if seq != 0 && seq != page {
            return Some(Mismatch {
                cpu: c as u64,
                log: seq,
                page,
            });
        }
    }
    None
}

/// After heartbeat `hb`: checks the shared state and says so if it is
/// inconsistent; every tenth heartbeat (from the first) prints the CPUs'
/// round counts.
pub fn after_heartbeat(hb: u64, cpus: usize) {
    lock();
    let bad = verify(cpus);
    unlock();
    if let Some(m) = bad {
        let mut line = Line::new();
        line.push_str("ftguest consistency error at=");
        line.push_u64(hb);
        if m.cpu == u64::MAX {
            line.push_str(" entries=");
            line.push_u64(m.log);
            line.push_str(" seqsum=");
            line.push_u64(m.page);
        } else {
            line.push_str(" cpu=");
            line.push_u64(m.cpu);
            line.push_str(" log=");
            line.push_u64(m.log);
            line.push_str(" page=");
            line.push_u64(m.page);
        }
        line.push_str("\n");
        line.emit();
    }
    if hb % 10 == 1 {
        let mut line = Line::new();
        line.push_str("ftguest cpus rounds=");
        for c in 0..cpus {
            if c > 0 {
                line.push_str(",");
            }
            line.push_u64(cpu_rounds(c).load(Ordering::Relaxed));
        }
        line.push_str(" seq=");
        line.push_u64(log_count().load(Ordering::Relaxed));
        line.push_str("\n");
        line.emit();
    }
}
