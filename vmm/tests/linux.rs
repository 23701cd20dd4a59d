//! The tiny Linux guest (resources/linux) boots through `ftvmm run`: the
//! same boot path as the test guest, with a kernel we did not write. It
//! boots on two vCPUs (the kernel is SMP and starts the second itself);
//! the virtio and failover tests cover one and two vCPUs as well.

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
            "--vcpus",
            "2",
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
        out.stdout.contains("ftlinux ready cpus=2"),
        "Linux did not come up with 2 CPUs online; console:\n{}",
        out.stdout
    );
    let uname = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Linux "))
        .unwrap_or_else(|| panic!("no uname line:\n{}", out.stdout));
    assert!(uname.contains("x86_64"), "{uname}");
    println!("tiny Linux, 2 vCPUs: boot to poweroff in {took:.1?}; {uname}");
}
