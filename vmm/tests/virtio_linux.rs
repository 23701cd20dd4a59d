//! virtio-net and virtio-blk against a peer we did not write: the tiny Linux
//! guest's own virtio-mmio, virtio_net and virtio_blk drivers (one boot, to
//! keep the test short: a boot costs ~25 s on the project's hosts).
//!
//! In a network namespace the test creates (`mcvmm<pid>`), with two taps
//! (`ftap<pid>a` with the host address, `ftap<pid>b`), ftvmm boots Linux in
//! `ftlinux.mode=devtest` with two NICs, a writable disk and a readonly one.
//! Checked: both NICs appear with their MACs (configured and default); eth0
//! answers ping from the namespace; the guest reads the pattern the test put
//! on the disk and its write lands in the disk file after poweroff; the
//! readonly disk refuses the write and its file is unchanged.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::Netns;
use common::*;

/// Adds tap `tap` to `ns`, with host address `addr` if given, and sets it
/// up.
fn add_tap(ns: &mut Netns, tap: &str, addr: Option<&str>) -> Result<(), String> {
    ns.add_tap(tap, false)?;
    if let Some(a) = addr {
        ns.ip(&["addr", "add", a, "dev", tap])?;
    }
    ns.ip(&["link", "set", tap, "up"])
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Why the host cannot run this test, if it cannot.
fn host_facilities() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, taps)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    if !have("ip", "-V") {
        return Some("no `ip` command".into());
    }
    None
}

/// The host's ping: `ping`, else busybox's.
fn ping_cmd() -> Option<Vec<&'static str>> {
    if have("ping", "-V") {
        Some(vec!["ping"])
    } else if have("busybox", "--help") {
        Some(vec!["busybox", "ping"])
    } else {
        None
    }
}

#[test]
fn linux_guest_drives_two_nics_a_disk_and_a_readonly_disk() {
    let test = "linux_guest_drives_two_nics_a_disk_and_a_readonly_disk";
    if let Some(why) = host_facilities() {
        println!("SKIP {test}: {why}");
        return;
    }
    let Some(ping) = ping_cmd() else {
        println!("SKIP {test}: no ping (nor busybox) on the host");
        return;
    };
    let Some((vmlinux, initrd, cmdline)) = linux_guest(test) else {
        return;
    };
    let id = std::process::id() % 10000;
    let ns_name = format!("mcvmm{id}v");
    let (tap0, tap1) = (format!("ftap{id}a"), format!("ftap{id}b"));
    let mut ns = Netns::new(&ns_name).expect("create namespace");
    add_tap(&mut ns, &tap0, Some("10.99.0.1/24")).expect("tap 0");
    add_tap(&mut ns, &tap1, None).expect("tap 1");

    let dir = TempDir::new("virtio-linux");
    let disk = dir.path("disk.img");
    let pattern = format!("FTPATTERN-{id}");
    let wrote = format!("FTWROTE-{id}");
    let mut img = format!("{pattern}\n").into_bytes();
    img.resize(1 << 20, 0);
    std::fs::write(&disk, &img).unwrap();
    let ro = dir.path("ro.img");
    let ro_content = vec![0x5a_u8; 64 << 10];
    std::fs::write(&ro, &ro_content).unwrap();

    let mac0 = "02:11:22:33:44:55";
    let cmdline = format!(
        "{cmdline} ftlinux.mode=devtest ftlinux.ip=10.99.0.2 ftlinux.write={wrote} ftlinux.wait=15"
    );
    let child = ns
        .exec(env!("CARGO_BIN_EXE_ftvmm"))
        .arg("run")
        .args(["--kernel", vmlinux.to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--cmdline", &cmdline, "--mem-mib", "128"])
        .args(["--net", &format!("tap={tap0},mac={mac0}")])
        .args(["--net", &format!("tap={tap1}")])
        .args(["--disk", &format!("path={}", disk.display())])
        .args(["--disk", &format!("path={},readonly", ro.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvmm");
    let mut vm = Proc::new(child, "ftvmm");
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let console = console.clone();
        let out = vm.child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut c = console.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        })
    };
    let seen = |s: &str| console.lock().unwrap().contains(s);
    let up = wait_until(Duration::from_secs(180), || {
        seen("ftdev eth0 up") || seen("ftvmm:")
    });
    let transcript = || console.lock().unwrap().clone();
    assert!(up, "eth0 did not come up; console:\n{}", transcript());

    let ping_out = ns
        .exec(ping[0])
        .args(&ping[1..])
        .args(["-c", "3", "-W", "5", "10.99.0.2"])
        .output()
        .expect("run ping");
    let ping_text = String::from_utf8_lossy(&ping_out.stdout).to_string();

    let exited = wait_until(Duration::from_secs(120), || {
        matches!(vm.child.try_wait(), Ok(Some(_)))
    });
    assert!(
        exited,
        "guest did not power off; console:\n{}",
        transcript()
    );
    let status = vm.child.wait().unwrap();
    reader.join().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = vm.child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let c = transcript();
    let ftdev: Vec<&str> = c.lines().filter(|l| l.starts_with("ftdev ")).collect();
    println!("{}\n{ping_text}", ftdev.join("\n"));
    assert!(
        status.success(),
        "exit {status:?}\nstderr: {stderr}\nconsole:\n{c}"
    );

    // Two NICs with their MACs: the configured one and the default one.
    let default_mac = ftvmm_devices::virtio::net::default_mac(&tap1);
    let default_mac = default_mac.map(|b| format!("{b:02x}")).join(":");
    assert!(
        c.contains(&format!("ftdev eth0 mac={mac0}")),
        "console:\n{c}"
    );
    assert!(
        c.contains(&format!("ftdev eth1 mac={default_mac}")),
        "console:\n{c}"
    );
    // eth0 answered ping from the namespace.
    assert!(
        ping_out.status.success(),
        "ping failed:\n{ping_text}\nconsole:\n{c}"
    );
    assert!(ping_text.contains("3 packets received"), "{ping_text}");
    assert!(c.contains("ftdev echos=3"), "console:\n{c}");
    // The disk: the guest read our pattern, and its write is in the file.
    assert!(
        c.contains(&format!("ftdev vda read={pattern}")),
        "console:\n{c}"
    );
    assert!(c.contains("ftdev vda wrote"), "console:\n{c}");
    let after = std::fs::read(&disk).unwrap();
    let expect = format!("{pattern}\n{wrote}\n");
    assert_eq!(
        &after[..expect.len()],
        expect.as_bytes(),
        "disk file after poweroff"
    );
    assert!(after[expect.len()..].iter().all(|&b| b == 0));
    // The readonly disk refused the write; its file is unchanged.
    assert!(c.contains("ftdev vdb write=refused"), "console:\n{c}");
    assert_eq!(std::fs::read(&ro).unwrap(), ro_content);
}
