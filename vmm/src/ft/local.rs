//! Benchmark only (`ftvmm run --ft-bench-local`, a hidden option): a VM
//! whose epochs run as a protected primary's do — the pause, the dirty
//! harvest that write-protects the pages again, the copy into the staging,
//! the state capture, the console held and sealed per epoch — but with no
//! standby: nothing is sent, and each epoch's output is let out as soon as
//! it is sealed, as if acknowledged at once. The guest's speed here is the
//! floor that dirty tracking and the pause alone impose on this host; the
//! `guest_speed` example compares a protected guest with it. Nothing of
//! this run is protected.

use std::time::Instant;

use ftvmm_netbuf::OutputCommit;

use super::console::HeldOutput;
use super::engine::Engine;
use super::metrics::MetricsLog;
use super::wait::{Waiter, Wake};
use super::{FtError, FtOptions};
use crate::config::VmConfig;
use crate::vcpu::VmExit;
use crate::vm::{open_serial_output, Vm};

/// Boots `config`'s guest and runs it with local epochs of `ft.interval`
/// (metrics to `ft.metrics_path`) until it ends.
pub fn run_local(config: &VmConfig, ft: &FtOptions) -> Result<VmExit, FtError> {
    let console = HeldOutput::new(open_serial_output(&config.serial)?);
    let mut vm = Vm::create_with_output(config, console.writer())?;
    vm.boot(config)?;
    let mut engine = Engine::new(&mut vm)?;
    let mut metrics = MetricsLog::new(ft)?;
    let mut waiter = Waiter::new(&vm, None, None)?;
    log::warn!("--ft-bench-local: epochs without a standby, nothing is protected");
    console.hold();
    vm.start()?;
    let mut next = Instant::now() + ft.interval;
    let mut epoch = 0;
    loop {
        match waiter.wait(&vm, None, None, next) {
            Wake::Exit(reason) => {
                console.release_all();
                metrics.log_summary("local epochs");
                return Ok(reason);
            }
            Wake::Boundary => {}
            Wake::Lost | Wake::Api => continue,
        }
        // The same cadence as the runner's: from the start of this epoch.
        let started = Instant::now();
        epoch += 1;
        let c = engine.capture(&mut vm, Some(&*console), epoch, false)?;
        console.release_upto(epoch);
        engine.trim();
        metrics.record(&c.metrics(epoch, ft.interval));
        next = started + ft.interval;
    }
}
