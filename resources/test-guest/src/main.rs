//! ftguest: the bare-metal test guest of ftvmm.
//!
//! Booted through the Linux 64-bit boot protocol, it sets itself up at CPL0
//! (which runs under KVM's instruction emulator on the project's machines, so
//! that part is kept tiny), then drops to CPL3 (native speed) where it
//! calibrates the TSC, parses its command line and runs the workload: rounds
//! that dirty guest pages, and a heartbeat line on COM1 every few rounds from
//! a counter kept in guest memory. See README.md for the contract.

#![no_std]
#![no_main]

mod arch;
mod blk;
mod bootparams;
mod cmdline;
mod disk;
mod mem;
mod net;
mod netproto;
mod peripherals;
mod power;
mod records;
mod serial;
mod smp;
mod tsc;
mod virtio;
mod workload;

use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use serial::Line;

/// Set by a panic at CPL3 just before it traps into CPL0 to die, so the trap
/// handler does not print a second, misleading "exception" line.
pub static PANICKED: AtomicBool = AtomicBool::new(false);

/// The CPL3 entry point, reached from `arch::boot` with `iretq`.
///
/// `boot_params` is the physical (= virtual) address of the zero page.
extern "C" fn user_main(boot_params: u64) -> ! {
    // SAFETY: the address came from the VMM in RSI at boot, and the whole of
    // RAM is mapped user-accessible by `arch::paging`.
    let bp = unsafe { bootparams::BootParams::new(boot_params) };

    let khz = tsc::calibrate_khz();
    let mut line = Line::new();
    line.push_str("ftguest tsc_khz=");
    line.push_u64(khz.khz);
    line.push_str("\n");
    line.emit();
    if let Some(note) = khz.note {
        let mut line = Line::new();
        line.push_str("ftguest warning: ");
        line.push_str(note);
        line.push_str("\n");
        line.emit();
    }

    let cfg = cmdline::parse(bp.cmdline(), |key, value| {
        let mut line = Line::new();
        line.push_str("ftguest warning: ignoring bad cmdline value ");
        line.push_bytes(key);
        line.push_str("=");
        line.push_bytes(value);
        line.push_str("\n");
        line.emit();
    });

    let cpus = smp::detect();
    if cpus.listed > cpus.count {
        let mut line = Line::new();
        line.push_str("ftguest warning: smp: ");
        line.push_u64(cpus.listed as u64);
        line.push_str(" CPUs in the MP table, running on ");
        line.push_u64(cpus.count as u64);
        line.push_str("\n");
        line.emit();
    }
    let mut wl = workload::Workload::new(&bp, &cfg, khz.khz);
    wl.print_config();
    let mut io = peripherals::Peripherals::new(&cfg, khz.khz);
    if cpus.count > 1 {
        let shares = wl.shares(cpus.count);
        let running = smp::start_aps(&cpus, shares, wl.round_cycles(), khz.khz);
        wl.set_cpus(running, shares[0]);
        let mut line = Line::new();
        line.push_str("ftguest ready cpus=");
        line.push_u64(running as u64);
        line.push_str("\n");
        line.emit();
    } else {
        serial::write_bytes(b"ftguest ready\n");
    }
    match cfg.crash {
        cmdline::Crash::No => {}
        cmdline::Crash::PageFault => {
            // Nothing is mapped at 512 GiB (only PML4 entry 0 is present).
            let unmapped = 0x80_0000_0000 as *mut u64;
            // SAFETY: not safe at all, on purpose: the #PF ends the VM.
            unsafe { unmapped.write_volatile(1) };
        }
        cmdline::Crash::Panic => panic!("crash=panic on the command line"),
        cmdline::Crash::Log => smp::tear(),
    }
    wl.run(&mut io)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut line = Line::new();
    let _ = write!(line, "ftguest panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(line, " at {}:{}", loc.file(), loc.line());
    }
    line.push_str("\n");
    line.emit();
    if arch::cpl() == 0 {
        arch::triple_fault()
    } else {
        PANICKED.store(true, Ordering::Relaxed);
        arch::die_from_user()
    }
}
