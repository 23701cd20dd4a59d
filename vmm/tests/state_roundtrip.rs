//! State read from the wire is untrusted: bytes that do not decode, and a
//! machine state that does not fit the VM it is restored into, are refused
//! with an error that says what. (The generic round trip — save → encode →
//! decode → restore → save is equal — runs on every component's state in the
//! crates' unit tests, through `persist_roundtrip_tests!`.)

mod common;

use std::time::Duration;

use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::persist::MachineState;
use ftvmm::vcpu::persist::FpuState;
use ftvmm::vm::Vm;
use ftvmm_checkpoint::{decode_state, encode_state, Persist, DEFAULT_STATE_LIMIT};

fn config(vcpus: u8) -> VmConfig {
    VmConfig {
        cmdline: "dirty=64".into(),
        vcpus,
        mem_mib: 32,
        serial: SerialConfig::None,
        ..Default::default()
    }
}

/// Runs the guest a little and captures its whole state, encoded.
fn captured(vcpus: u8) -> Vec<u8> {
    let mut vm = Vm::build(&config(vcpus)).unwrap();
    vm.start().unwrap();
    // Let it get past its CPL0 set-up, so the state is not the boot state.
    assert!(vm.wait_exit(Some(Duration::from_millis(100))).is_none());
    let state = vm.pause_and_save(Duration::from_secs(2)).unwrap();
    let mut bytes = Vec::new();
    encode_state(state, &mut bytes).unwrap();
    vm.stop();
    bytes
}

#[test]
fn hostile_state_is_refused() {
    let bytes = captured(1);
    // Truncated or garbage bytes do not decode.
    assert!(decode_state::<MachineState>(&bytes[..bytes.len() / 2], DEFAULT_STATE_LIMIT).is_err());
    assert!(decode_state::<MachineState>(&[0xff; 64], DEFAULT_STATE_LIMIT).is_err());

    let state: MachineState = decode_state(&bytes, DEFAULT_STATE_LIMIT).unwrap();
    let refused = |vcpus: u8, state: &MachineState| {
        let mut vm = Vm::create(&config(vcpus)).unwrap();
        vm.restore(state).unwrap_err().to_string()
    };
    // Wrong vCPU count for this VM.
    let err = refused(2, &state);
    assert_eq!(
        err, "cannot restore a checkpoint of 1 vCPUs into a VM of 2",
        "{err}"
    );
    // A damaged XSAVE area.
    let mut bad = state.clone();
    if let FpuState::Xsave(words) = &mut bad.vcpus[0].fpu {
        words.truncate(10);
        let err = refused(1, &bad);
        assert!(
            err.contains("vCPU 0") && err.contains("XSAVE area holds 10 32-bit words"),
            "{err}"
        );
    }
    // Another vCPU's state.
    let mut bad = state.clone();
    bad.vcpus[0].id = 3;
    let err = refused(1, &bad);
    assert_eq!(err, "cannot restore vCPU 0 from the state of vCPU 3");
    // An irqchip slot holding the wrong chip.
    let mut bad = state.clone();
    bad.vm.pic_master.chip_id = 2;
    let err = refused(1, &bad);
    assert!(
        err.contains("PIC master") && err.contains("irqchip 2"),
        "{err}"
    );
    // A COM1 FIFO no 16550 has.
    let mut bad = state;
    bad.devices.serial.in_buffer = vec![0; 65];
    let err = refused(1, &bad);
    assert!(err.contains("COM1") && err.contains("65 bytes"), "{err}");
}
