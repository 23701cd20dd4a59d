//! Bad input: every case ends with exactly one clear line on stderr and a
//! non-zero exit, never a panic and never a hang.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Runs ftvmm and checks the one-line error contract; returns the line.
fn refused(args: &[&str]) -> String {
    check(run(args, T), args)
}

fn check(out: Output, args: &[&str]) -> String {
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stdout: {}",
        out.stdout
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {}",
        out.stderr
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one stderr line, got:\n{}",
        out.stderr
    );
    assert!(lines[0].starts_with("ftvmm: "), "{}", lines[0]);
    lines[0].to_string()
}

fn assert_mentions(line: &str, words: &[&str]) {
    for w in words {
        assert!(line.contains(w), "'{line}' does not mention '{w}'");
    }
}

#[test]
fn missing_kernel() {
    let l = refused(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_mentions(&l, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn unreadable_kernel() {
    let dir = TempDir::new("unreadable");
    // A directory cannot be read as a kernel, even by root.
    let p = dir.0.display().to_string();
    let l = refused(&["run", "--kernel", &p]);
    assert_mentions(&l, &[&p, "directory"]);
}

#[test]
fn kernel_neither_elf_nor_bzimage() {
    let dir = TempDir::new("garbage");
    let p = dir.path("kernel.bin");
    std::fs::write(&p, b"#!/bin/sh\necho this is not a kernel\n".repeat(200)).unwrap();
    let p = p.display().to_string();
    let l = refused(&["run", "--kernel", &p]);
    assert_mentions(&l, &[&p, "neither", "ELF", "bzImage"]);
}

#[test]
fn empty_kernel_file() {
    let dir = TempDir::new("empty");
    let p = dir.path("empty");
    std::fs::write(&p, b"").unwrap();
    let p = p.display().to_string();
    let l = refused(&["run", "--kernel", &p]);
    assert_mentions(&l, &[&p]);
}

#[test]
fn missing_initrd() {
    let l = refused(&["run", "--initrd", "/nonexistent/initrd.cpio"]);
    assert_mentions(&l, &["initrd", "/nonexistent/initrd.cpio"]);
}

#[test]
fn initrd_larger_than_memory() {
    let dir = TempDir::new("bigrd");
    let p = dir.path("big.cpio");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(40 << 20).unwrap();
    let p = p.display().to_string();
    let l = refused(&["run", "--mem-mib", "32", "--initrd", &p]);
    assert_mentions(&l, &["initrd", &p, "does not fit"]);
}

#[test]
fn memory_too_small() {
    let l = refused(&["run", "--mem-mib", "1"]);
    assert_mentions(&l, &["--mem-mib 1", "too small"]);
}

#[test]
fn memory_larger_than_host() {
    let l = refused(&["run", "--mem-mib", "100000000"]);
    assert_mentions(&l, &["--mem-mib 100000000", "host"]);
}

#[test]
fn memory_not_a_number() {
    let l = refused(&["run", "--mem-mib", "lots"]);
    assert_mentions(&l, &["lots", "--mem-mib"]);
}

#[test]
fn zero_vcpus() {
    let l = refused(&["run", "--vcpus", "0"]);
    assert_mentions(&l, &["--vcpus 0"]);
}

#[test]
fn vcpus_above_kvm_limit() {
    let l = refused(&["run", "--vcpus", "100000"]);
    assert_mentions(&l, &["--vcpus 100000"]);
    let l = refused(&["run", "--vcpus", "255"]);
    assert_mentions(&l, &["--vcpus 255"]);
}

#[test]
fn malformed_net_spec() {
    for spec in [
        "tap",
        "tap=",
        "mac=02:00:00:00:00:01",
        "tap=x,mac=zz",
        "tap=x,foo=1",
    ] {
        let l = refused(&["run", "--net", spec]);
        assert_mentions(&l, &["--net", spec]);
    }
}

#[test]
fn malformed_disk_spec() {
    for spec in ["", "path=", "readonly", "file=/tmp/x"] {
        let l = refused(&["run", "--disk", spec]);
        assert_mentions(&l, &["--disk"]);
    }
}

#[test]
fn malformed_serial_spec() {
    for spec in ["tty", "file:", "stdout2"] {
        let l = refused(&["run", "--serial", spec]);
        assert_mentions(&l, &["--serial", spec]);
    }
}

#[test]
fn unknown_option_and_command() {
    let l = refused(&["run", "--frobnicate"]);
    assert_mentions(&l, &["--frobnicate"]);
    let l = refused(&["fly"]);
    assert_mentions(&l, &["fly"]);
}

#[test]
fn serial_file_in_missing_directory() {
    let l = refused(&["run", "--serial", "file:/nonexistent/dir/console.log"]);
    assert_mentions(&l, &["/nonexistent/dir/console.log"]);
}

/// /dev/kvm absent: run ftvmm in a private mount namespace with an empty /dev.
#[test]
fn kvm_device_missing() {
    if !is_root()
        || std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("SKIP kvm_device_missing: needs root and unshare(1)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_ftvmm");
    let script = format!("mount -t tmpfs none /dev && exec {bin} run");
    let child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let l = check(wait_with_timeout(child, T), &["(no /dev/kvm)"]);
    assert_mentions(&l, &["/dev/kvm", "No such file"]);
}

/// /dev/kvm not accessible: run ftvmm as an unprivileged user.
#[test]
fn kvm_device_not_accessible() {
    let kvm = std::fs::metadata("/dev/kvm");
    let world_rw = kvm
        .as_ref()
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(true);
    if !is_root()
        || world_rw
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("SKIP kvm_device_not_accessible: needs root, setpriv(1) and a /dev/kvm closed to others");
        return;
    }
    // The binary must be reachable by the unprivileged user: copy it out of
    // the (possibly private) build directory.
    let dir = TempDir::new("nobody");
    let bin = dir.path("ftvmm");
    std::fs::copy(env!("CARGO_BIN_EXE_ftvmm"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let l = check(wait_with_timeout(child, T), &["(as nobody)"]);
    assert_mentions(&l, &["/dev/kvm", "ermission denied"]);
}
