//! Bad virtio device configurations end ftvmm with one clear line, never a
//! panic: too many devices, an empty or missing disk file.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn refused(args: &[&str]) -> String {
    let out = run(args, T);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        !out.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        out.stderr
    );
    out.stderr.trim().to_string()
}

#[test]
fn disk_errors_name_the_file() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP disk_errors_name_the_file: no /dev/kvm");
        return;
    }
    let dir = TempDir::new("virtio-config");
    let empty = dir.path("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let spec = format!("path={}", empty.display());
    let l = refused(&["run", "--disk", &spec]);
    assert!(
        l.contains("empty.img") && l.contains("512-byte sector"),
        "{l}"
    );
    let missing = dir.path("missing.img");
    let spec = format!("path={}", missing.display());
    let l = refused(&["run", "--disk", &spec]);
    assert!(
        l.contains("missing.img") && l.contains("No such file"),
        "{l}"
    );
}

#[test]
fn more_than_nine_devices_are_refused() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP more_than_nine_devices_are_refused: no /dev/kvm");
        return;
    }
    let dir = TempDir::new("virtio-many");
    let disk = dir.path("d.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let spec = format!("path={},readonly", disk.display());
    let mut args = vec!["run"];
    for _ in 0..10 {
        args.push("--disk");
        args.push(&spec);
    }
    let l = refused(&args);
    assert!(
        l.contains("10 virtio devices") && l.contains("at most 9"),
        "{l}"
    );
}
