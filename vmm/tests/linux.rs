//! The tiny Linux guest (resources/linux) boots through `ftvmm run`: the
//! same boot path as the test guest, with a kernel we did not write.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn tiny_linux_boots_and_powers_off() {
    let Some((vmlinux, initrd, cmdline)) = linux_guest("tiny_linux_boots_and_powers_off") else {
        return;
    };
    let start = Instant::now();
    let out = run(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--mem-mib",
            "128",
        ],
        Duration::from_secs(300),
    );
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}\nconsole:\n{}",
        out.status,
        out.stderr,
        out.stdout
    );
    assert!(
        out.stdout.contains("ftlinux ready"),
        "console:\n{}",
        out.stdout
    );
    let uname = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Linux "))
        .unwrap_or_else(|| panic!("no uname line:\n{}", out.stdout));
    assert!(uname.contains("x86_64"), "{uname}");
    println!("tiny Linux: boot to poweroff in {took:.1?}; {uname}");
}
