//! Pausing and resuming all vCPUs of a running guest: the operation the
//! checkpoint engine is built on.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::vm::Vm;

fn hb_count(path: &std::path::Path) -> usize {
    heartbeats(&std::fs::read_to_string(path).unwrap_or_default()).len()
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = TempDir::new("pause");
    let log = dir.path("console.log");
    let config = VmConfig {
        cmdline: "dirty=64 rounds=2 round_us=1000".into(),
        vcpus: 2,
        mem_mib: 64,
        serial: SerialConfig::File(log.clone()),
        ..Default::default()
    };
    let mut vm = Vm::build(&config).expect("build");
    vm.start().expect("start");
    assert!(
        wait_until(Duration::from_secs(30), || hb_count(&log) >= 3),
        "no heartbeats: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Paused: not a single heartbeat more, for a window much longer than the
    // heartbeat period (~2 ms).
    let t = Instant::now();
    vm.pause(Duration::from_secs(2)).expect("pause");
    let pause_latency = t.elapsed();
    let before = hb_count(&log);
    let window = Instant::now() + Duration::from_millis(300);
    while Instant::now() < window {
        assert_eq!(hb_count(&log), before, "guest ran while paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.exit_reason().is_none());

    vm.resume();
    assert!(
        wait_until(Duration::from_secs(10), || hb_count(&log) >= before + 3),
        "guest did not continue after resume"
    );

    // Many short pauses in a row: no lost kick, no deadlock, and the
    // heartbeat sequence stays intact.
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        vm.pause(Duration::from_secs(2)).expect("pause in loop");
        lat.push(t.elapsed());
        vm.resume();
    }
    lat.sort();
    println!(
        "pause latency: first {:?}; 200 pauses: median {:?}, p99 {:?}, max {:?}",
        pause_latency,
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    let n = hb_count(&log);
    assert!(wait_until(Duration::from_secs(10), || hb_count(&log) > n + 2));
    vm.stop();
    let hbs = heartbeats(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(hbs, (1..=hbs.len() as u64).collect::<Vec<_>>());
}
