//! Capture a running guest's whole state, restore it into a second VM built
//! through the same builder, and check the guest continues where it was:
//! the path a standby's failover takes.

mod common;

use std::time::Duration;

use common::*;
use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::persist::MachineState;
use ftvmm::vm::Vm;
use ftvmm_checkpoint::Persist;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

fn hbs(path: &std::path::Path) -> Vec<u64> {
    heartbeats(&std::fs::read_to_string(path).unwrap_or_default())
}

#[test]
fn restored_guest_continues_counting() {
    let dir = TempDir::new("restore");
    let log_a = dir.path("a.log");
    let log_b = dir.path("b.log");
    let base = VmConfig {
        cmdline: "dirty=128 rounds=2 round_us=500".into(),
        vcpus: 2,
        mem_mib: 64,
        ..Default::default()
    };
    let mut a = Vm::build(&VmConfig {
        serial: SerialConfig::File(log_a.clone()),
        ..base.clone()
    })
    .unwrap();
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(30), || hbs(&log_a).len() >= 5));

    let state = a.pause_and_save(Duration::from_secs(2)).unwrap();
    let json = serde_json::to_vec(&state).unwrap();
    let state: MachineState = serde_json::from_slice(&json).unwrap();

    let mut b = Vm::create(&VmConfig {
        serial: SerialConfig::File(log_b.clone()),
        ..base.clone()
    })
    .unwrap();
    // Copy guest memory while A is paused.
    let mut buf = Vec::new();
    for region in a.memory.iter() {
        buf.resize(region.len() as usize, 0);
        a.memory.read_slice(&mut buf, region.start_addr()).unwrap();
        b.memory.write_slice(&buf, region.start_addr()).unwrap();
    }
    let transcript_a = std::fs::read_to_string(&log_a).unwrap();
    a.stop();
    drop(a);

    b.restore(&state).unwrap();
    b.start().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || hbs(&log_b).len() >= 5),
        "restored guest printed: {:?}",
        std::fs::read_to_string(&log_b)
    );
    b.stop();
    let transcript_b = std::fs::read_to_string(&log_b).unwrap();
    // B continues from the counter and the console position it found: A's
    // output followed by B's (a line A was in the middle of is finished by
    // B) counts 1, 2, 3... with nothing missing or repeated.
    let all = heartbeats(&format!("{transcript_a}{transcript_b}"));
    assert!(all.len() >= 10, "{all:?}");
    assert_eq!(
        all,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "A:\n{transcript_a}\nB:\n{transcript_b}"
    );
    assert!(
        !transcript_b.contains("ready"),
        "B rebooted: {transcript_b}"
    );
    assert!(!transcript_b.contains("panic"), "{transcript_b}");
}
