//! Booting the embedded test guest through the real binary.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn assert_counts(transcript: &str, n: u64) {
    assert!(
        transcript.contains("ftguest ready\n"),
        "no ready marker in:\n{transcript}"
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
    assert_counts(&out.stdout, 3);
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
