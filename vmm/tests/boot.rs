//! Booting the embedded test guest through the real binary.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn assert_counts(transcript: &str, n: u64) {
    assert_counts_on(transcript, n, "ftguest ready\n");
}

fn assert_counts_on(transcript: &str, n: u64, ready: &str) {
    assert!(
        transcript.contains(ready),
        "no ready marker {ready:?} in:\n{transcript}"
    );
    assert_eq!(transcript.matches("ftguest ready").count(), 1);
    assert_eq!(
        heartbeats(transcript),
        (1..=n).collect::<Vec<_>>(),
        "{transcript}"
    );
    assert!(transcript.contains("ftguest done"), "{transcript}");
}

#[test]
fn test_guest_heartbeats_then_powers_off() {
    let out = run(&["run", "--cmdline", "stop=5", "--serial", "stdout"], T);
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        out.stderr
    );
    assert_counts(&out.stdout, 5);
    assert!(out.stderr.is_empty(), "stderr: {}", out.stderr);
}

#[test]
fn test_guest_with_two_vcpus() {
    let out = run(
        &[
            "run",
            "--vcpus",
            "2",
            "--mem-mib",
            "64",
            "--cmdline",
            "stop=3 dirty=64",
        ],
        T,
    );
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        out.stderr
    );
    // The guest started its second vCPU, which ran rounds too.
    assert_counts_on(&out.stdout, 3, "ftguest ready cpus=2\n");
    assert!(
        out.stdout.contains("ftguest cpus rounds="),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("consistency error"), "{}", out.stdout);
}

#[test]
fn serial_to_file_and_to_nowhere() {
    let dir = TempDir::new("serial");
    let log = dir.path("console.log");
    let spec = format!("file:{}", log.display());
    let out = run(&["run", "--cmdline", "stop=2", "--serial", &spec], T);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
    assert_counts(&std::fs::read_to_string(&log).unwrap(), 2);

    let out = run(&["run", "--cmdline", "stop=2", "--serial", "none"], T);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
}

#[test]
fn guest_memory_sizes() {
    for mib in ["16", "512"] {
        let out = run(
            &["run", "--mem-mib", mib, "--cmdline", "stop=1 dirty=16"],
            T,
        );
        assert!(out.status.success(), "--mem-mib {mib}: {}", out.stderr);
        assert_counts(&out.stdout, 1);
    }
}

/// A bzImage goes through the same boot path: linux-loader loads its
/// protected-mode part at `code32_start`, the VMM keeps its setup header in
/// the zero page and enters at the 64-bit entry (+0x200). The image here is
/// built by the test: its payload checks the zero page's copy of the setup
/// header, prints on COM1 and resets through the i8042.
#[test]
fn bzimage_boots_through_the_64bit_entry() {
    let setup_sects = 4u8;
    let mut image = vec![0u8; (setup_sects as usize + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1fe] = 0x55;
    image[0x1ff] = 0xaa;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 0x01; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes());
    let mut payload = vec![0x90u8; 0x200]; // the 32-bit entry, unused
    #[rustfmt::skip]
    payload.extend_from_slice(&[
        0x66, 0xba, 0xf8, 0x03,                         // mov dx, 0x3f8
        0xb0, b'b', 0xee,                               // mov al, 'b'; out dx, al
        0xb0, b'z', 0xee,                               // mov al, 'z'; out dx, al
        0x80, 0xbe, 0xf1, 0x01, 0x00, 0x00, setup_sects, // cmp byte [rsi+0x1f1], setup_sects
        0x75, 0x03,                                     // jne +3
        0xb0, b'+', 0xee,                               // mov al, '+'; out dx, al
        0xb0, b'\n', 0xee,                              // mov al, '\n'; out dx, al
        0x66, 0xba, 0x64, 0x00,                         // mov dx, 0x64
        0xb0, 0xfe, 0xee,                               // mov al, 0xfe; out dx, al (reset)
        0xeb, 0xfe,                                     // jmp $
    ]);
    image.extend_from_slice(&payload);
    let dir = TempDir::new("bzimage");
    let path = dir.path("bzImage");
    std::fs::write(&path, &image).unwrap();
    let out = run(&["run", "--kernel", path.to_str().unwrap()], T);
    assert!(out.status.success(), "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout, "bz+\n",
        "the payload did not see its setup header in the zero page"
    );
}
