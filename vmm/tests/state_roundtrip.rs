//! The generic round trip (save → encode → decode → restore → save equal),
//! applied to every state type of a real running machine, and validation of
//! state read from the wire.

mod common;

use std::time::Duration;

use ftvmm::config::{SerialConfig, VmConfig};
use ftvmm::persist::{MachineState, PodBytes};
use ftvmm::vm::Vm;
use ftvmm_checkpoint::test_utils::assert_roundtrip;
use ftvmm_checkpoint::{decode_state, encode_state, DEFAULT_STATE_LIMIT};

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
fn captured(vcpus: u8) -> (Vm, Vec<u8>) {
    let mut vm = Vm::build(&config(vcpus)).unwrap();
    vm.start().unwrap();
    // Let it get past its CPL0 set-up, so the state is not the boot state.
    assert!(vm.wait_exit(Some(Duration::from_millis(100))).is_none());
    let state = vm.pause_and_save(Duration::from_secs(2)).unwrap();
    let mut bytes = Vec::new();
    encode_state(&state, &mut bytes).unwrap();
    (vm, bytes)
}

#[test]
fn every_state_type_round_trips() {
    let (mut vm, bytes) = captured(2);
    let state: MachineState = decode_state(&bytes, DEFAULT_STATE_LIMIT).unwrap();
    for v in &state.vcpus {
        assert_roundtrip(v);
    }
    assert_roundtrip(&state.devices);
    assert_roundtrip(&state.devices.serial);
    // The borrowed view the primary encodes and the owned state the standby
    // decodes are one encoding: re-encoding gives the same bytes.
    let mut again = Vec::new();
    encode_state(&state, &mut again).unwrap();
    assert_eq!(bytes, again);

    // Restore into a fresh VM through the same builder, then save again:
    // equal (the VM-wide state has no PartialEq: compare encodings).
    let mut fresh = Vm::create(&config(2)).unwrap();
    fresh.restore(&state).unwrap();
    let saved = fresh.pause_and_save(Duration::from_secs(2)).unwrap();
    let mut resaved = Vec::new();
    encode_state(&saved, &mut resaved).unwrap();
    let resaved: MachineState = decode_state(&resaved, DEFAULT_STATE_LIMIT).unwrap();
    assert_eq!(resaved.vcpus.len(), state.vcpus.len());
    for (a, b) in resaved.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.sregs, b.sregs);
        assert_eq!(a.lapic, b.lapic);
        assert_eq!(a.mp_state, b.mp_state);
        assert_eq!(a.xcrs, b.xcrs);
        assert_eq!(a.debugregs, b.debugregs);
    }
    assert_eq!(resaved.devices, state.devices);
    vm.stop();
}

#[test]
fn hostile_state_is_refused_not_applied() {
    let (mut vm, bytes) = captured(1);
    vm.stop();
    // Truncated or garbage bytes do not decode.
    assert!(decode_state::<MachineState>(&bytes[..bytes.len() / 2], DEFAULT_STATE_LIMIT).is_err());
    assert!(decode_state::<MachineState>(&[0xff; 64], DEFAULT_STATE_LIMIT).is_err());

    let state: MachineState = decode_state(&bytes, DEFAULT_STATE_LIMIT).unwrap();
    // Wrong vCPU count for this VM.
    let mut two = Vm::create(&config(2)).unwrap();
    let err = two.restore(&state).unwrap_err().to_string();
    assert!(err.contains("vCPUs"), "{err}");
    // A damaged FPU/XSAVE blob.
    let mut bad = state.clone();
    match &mut bad.vcpus[0].xsave {
        Some(x) => x.0.truncate(10),
        None => bad.vcpus[0].fpu = PodBytes(vec![0; 3]),
    }
    let mut one = Vm::create(&config(1)).unwrap();
    let err = one.restore(&bad).unwrap_err().to_string();
    assert!(err.contains("state is") && err.contains("bytes"), "{err}");
    // An irqchip slot holding the wrong chip.
    let mut bad = state.clone();
    bad.vm.pic_master.chip_id = 2;
    let err = one.restore(&bad).unwrap_err().to_string();
    assert!(err.contains("irqchip"), "{err}");
}
