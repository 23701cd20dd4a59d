//! The guest's command-line parser, compiled from the guest's own source
//! (plain `core` code) and tested on the host.

#[path = "../../../resources/test-guest/src/cmdline.rs"]
mod cmdline;

use cmdline::{
    parse, parse_ip_port, parse_ipv4, parse_mac, parse_mmio_device, parse_size, parse_u64, Config,
    Crash, MmioDevice, Switch,
};

fn parse_ok(s: &str) -> Config {
    parse(s.as_bytes(), |k, v| {
        panic!(
            "unexpected bad value {}={}",
            String::from_utf8_lossy(k),
            String::from_utf8_lossy(v)
        )
    })
}

#[test]
fn defaults() {
    let cfg = parse_ok("");
    assert_eq!(
        cfg,
        Config {
            dirty: 256,
            span: None,
            rounds: 10,
            round_us: 1000,
            stop: 0,
            crash: Crash::No,
            mmio: [None; 8],
            net: Switch::Auto,
            ip: None,
            udp: None,
            udp_src: 7777,
            echo_port: 7,
            gw_mac: None,
            disk: Switch::Auto,
            disk_verify: false,
            disk_flush: false,
            disk_bytes: 0,
        }
    );
}

#[test]
fn keys_and_unknown_words() {
    let cfg = parse_ok(
        "console=ttyS0 quiet dirty=1000 span=0x1000  rounds=3\tround_us=0 stop=5 tap=tap0",
    );
    assert_eq!(
        cfg,
        Config {
            dirty: 1000,
            span: Some(4096),
            rounds: 3,
            round_us: 0,
            stop: 5,
            ..Config::default()
        }
    );
    // span=0 means the default; the last occurrence wins.
    assert_eq!(parse_ok("span=7 span=0").span, None);
    assert_eq!(parse_ok("stop=1 stop=2").stop, 2);
    assert_eq!(parse_ok("crash=pf").crash, Crash::PageFault);
    assert_eq!(parse_ok("crash=panic").crash, Crash::Panic);
    assert_eq!(parse_ok("crash=log").crash, Crash::Log);
}

#[test]
fn bad_values_keep_defaults_and_are_reported() {
    let mut bad = Vec::new();
    let cfg = parse(
        b"dirty=12x rounds= stop=99999999999999999999 span=-1 crash=yes other=zz",
        |k, v| {
            bad.push(format!(
                "{}={}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            ))
        },
    );
    assert_eq!(cfg, Config::default());
    assert_eq!(
        bad,
        [
            "dirty=12x",
            "rounds=",
            "stop=99999999999999999999",
            "span=-1",
            "crash=yes"
        ]
    );
}

#[test]
fn numbers() {
    assert_eq!(parse_u64(b"0"), Some(0));
    assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
    assert_eq!(parse_u64(b"18446744073709551616"), None);
    assert_eq!(parse_u64(b"0xfF"), Some(255));
    assert_eq!(parse_u64(b"0x"), None);
    assert_eq!(parse_u64(b""), None);
    assert_eq!(parse_u64(b"+1"), None);
}

#[test]
fn devices_and_network_keys() {
    let cfg = parse_ok(
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x1000@0xd0001000:6:1 \
         net=on ip=10.0.0.2 udp=10.0.0.1:9000 udp_src=1234 echo_port=0x7 \
         gw_mac=02:00:00:00:00:FE disk=off disk_verify=yes",
    );
    assert_eq!(
        cfg.mmio[0],
        Some(MmioDevice {
            addr: 0xd000_0000,
            size: 4096,
            irq: 5
        })
    );
    assert_eq!(
        cfg.mmio[1],
        Some(MmioDevice {
            addr: 0xd000_1000,
            size: 4096,
            irq: 6
        })
    );
    assert_eq!(cfg.mmio[2], None);
    assert_eq!(cfg.net, Switch::On);
    assert_eq!(cfg.disk, Switch::Off);
    assert!(cfg.disk_verify);
    assert_eq!(cfg.ip, Some([10, 0, 0, 2]));
    assert_eq!(cfg.udp, Some(([10, 0, 0, 1], 9000)));
    assert_eq!(cfg.udp_src, 1234);
    assert_eq!(cfg.echo_port, 7);
    assert_eq!(cfg.gw_mac, Some([2, 0, 0, 0, 0, 0xfe]));
    // More windows than kept: the first ones stay.
    let many: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "virtio_mmio.device=4K@0x{:x}:{}",
                0xd000_0000u64 + i * 0x1000,
                5 + i
            )
        })
        .collect();
    let cfg = parse_ok(&many.join(" "));
    assert!(cfg.mmio.iter().all(Option::is_some));
    assert_eq!(cfg.mmio[7].unwrap().addr, 0xd000_7000);
}

#[test]
fn bad_device_and_network_values() {
    let mut bad = Vec::new();
    let cfg = parse(
        b"virtio_mmio.device=4K@0xd0000000 virtio_mmio.device=0@0x1000:5 net=maybe \
          ip=10.0.0.256 udp=10.0.0.1 udp=10.0.0.1:0 udp_src=70000 gw_mac=02:00:00:00:00 disk=2",
        |k, v| {
            bad.push(format!(
                "{}={}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            ))
        },
    );
    assert_eq!(cfg, Config::default());
    assert_eq!(bad.len(), 9, "{bad:?}");
}

#[test]
fn disk_flush_and_bytes() {
    let cfg = parse_ok("disk_flush=on disk_bytes=4096");
    assert!(cfg.disk_flush);
    assert_eq!(cfg.disk_bytes, 4096);
    assert!(!cfg.disk_verify);
    for (word, on) in [
        ("disk_flush=1", true),
        ("disk_flush=yes", true),
        ("disk_flush=true", true),
        ("disk_flush=off", false),
        ("disk_flush=0", false),
        ("disk_flush=on disk_flush=no", false),
    ] {
        assert_eq!(parse_ok(word).disk_flush, on, "{word}");
    }
    // Sizes as `virtio_mmio.device=` takes them; the byte count is kept as
    // given (the guest rounds it up to sectors); 64 KiB at most.
    for (word, bytes) in [
        ("disk_bytes=0", 0),
        ("disk_bytes=1", 1),
        ("disk_bytes=513", 513),
        ("disk_bytes=0x200", 512),
        ("disk_bytes=8K", 8192),
        ("disk_bytes=64k", 65536),
        ("disk_bytes=65536", 65536),
        ("disk_bytes=4K disk_bytes=0", 0),
    ] {
        assert_eq!(parse_ok(word).disk_bytes, bytes, "{word}");
    }
    assert_eq!(cmdline::MAX_DISK_BYTES, 65536);
}

#[test]
fn bad_disk_flush_and_bytes() {
    let mut bad = Vec::new();
    let cfg = parse(
        b"disk_flush=maybe disk_flush= disk_bytes=65537 disk_bytes=1M disk_bytes=-1 \
          disk_bytes=4KB disk_bytes=",
        |k, v| {
            bad.push(format!(
                "{}={}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            ))
        },
    );
    assert_eq!(cfg, Config::default());
    assert_eq!(
        bad,
        [
            "disk_flush=maybe",
            "disk_flush=",
            "disk_bytes=65537",
            "disk_bytes=1M",
            "disk_bytes=-1",
            "disk_bytes=4KB",
            "disk_bytes="
        ]
    );
    // A bad value leaves an earlier good one alone.
    let cfg = parse(
        b"disk_bytes=512 disk_bytes=70000 disk_flush=on disk_flush=2",
        |_, _| {},
    );
    assert_eq!(cfg.disk_bytes, 512);
    assert!(cfg.disk_flush);
}

#[test]
fn value_parsers() {
    assert_eq!(parse_size(b"4K"), Some(4096));
    assert_eq!(parse_size(b"0x200"), Some(512));
    assert_eq!(parse_size(b"1m"), Some(1 << 20));
    assert_eq!(parse_size(b"K"), None);
    assert_eq!(
        parse_mmio_device(b"512@0xfeb00000:12:3"),
        Some(MmioDevice {
            addr: 0xfeb0_0000,
            size: 512,
            irq: 12
        })
    );
    assert_eq!(parse_mmio_device(b"4K@0xd0000000:5:x"), None);
    assert_eq!(parse_mmio_device(b"4K0xd0000000:5"), None);
    assert_eq!(parse_ipv4(b"192.168.1.255"), Some([192, 168, 1, 255]));
    assert_eq!(parse_ipv4(b"1.2.3"), None);
    assert_eq!(parse_ipv4(b"1.2.3.4.5"), None);
    assert_eq!(parse_ipv4(b"1..3.4"), None);
    assert_eq!(parse_ipv4(b"0x1.2.3.4"), None);
    assert_eq!(parse_ip_port(b"1.2.3.4:65535"), Some(([1, 2, 3, 4], 65535)));
    assert_eq!(parse_ip_port(b"1.2.3.4:65536"), None);
    assert_eq!(parse_ip_port(b"1.2.3.4:"), None);
    assert_eq!(
        parse_mac(b"aa-BB-cc-00-01-2"),
        Some([0xaa, 0xbb, 0xcc, 0, 1, 2])
    );
    assert_eq!(parse_mac(b"aa:bb:cc:00:01:02:03"), None);
    assert_eq!(parse_mac(b"aa:bb:cc:00:01:xyz"), None);
}
