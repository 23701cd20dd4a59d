//! Host-side checks of the bare-metal test guest (`resources/test-guest`).
//!
//! - `tests/guest_isa.rs`: builds the guest and disassembles it; every
//!   instruction must be one that KVM's x86 instruction emulator can execute,
//!   because on the project's machines guest CPL0 code runs under that
//!   emulator (PLATFORM.md). A compiler or toolchain change that slips in SSE,
//!   `popcnt`, `int3` and the like fails here instead of at guest run time.
//! - `tests/guest_cmdline.rs`: the guest's command-line parser, compiled from
//!   the guest's own source file and run on the host.
