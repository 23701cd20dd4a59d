//! Bad peers of a standby: wrong wire version, wrong guest shape, garbage
//! bytes, a stale primary with an old generation, a second primary while
//! paired. Each is refused with a clear reason and the standby's state is
//! untouched: it still serves (or still protects) a good primary afterwards.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use ftvmm_checkpoint::wire::{encode_message, Limits, Message};
use ftvmm_checkpoint::{
    DevicesSummary, DiskShape, DiskSync, EpochPolicy, Frame, FrameReader, GuestShape, Hello, Role,
    Staging, StagingConfig, WIRE_VERSION,
};
use ftvmm_transport::{connect_pair_with, Channel, FtKey, Security, TcpOptions};

const GUEST: &str = "dirty=256 rounds=2 round_us=2000";

fn good_hello(generation: u64) -> Hello {
    Hello {
        version: WIRE_VERSION,
        generation,
        role: Role::Primary,
        heartbeat_ms: 50,
        shape: GuestShape {
            mem_bytes: 64 << 20,
            vcpus: 1,
            cmdline: String::new(),
            devices: DevicesSummary::default(),
        },
        disk_sync: DiskSync::Hashes,
        vm_id: String::new(),
        witnessed: false,
        epochs: EpochPolicy {
            interval_ms: 25,
            max_interval_ms: 0,
            budget_ppm: 0,
            cache_bytes: 64 << 20,
        },
    }
}

/// Sends `hello` as a primary holding the pair's key would and returns the
/// standby's answer (these peers get past authentication: what is tested is
/// the standby's judgement of what they say).
fn handshake(port: u16, hello: Hello) -> Message {
    let key = Security::keyed(FtKey::load(test_key()).unwrap());
    let (mut chan, _hb) = connect_pair_with(
        format!("127.0.0.1:{port}").as_str(),
        Duration::from_secs(5),
        &TcpOptions::default(),
        &key,
    )
    .unwrap();
    let mut buf = Vec::new();
    encode_message(&Message::Hello(hello), &mut buf).unwrap();
    chan.send_all(&buf).unwrap();
    chan.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let limits = Limits::handshake();
    let mut staging = Staging::new(StagingConfig {
        max_pages: 0,
        ..limits.staging_config()
    })
    .unwrap();
    match FrameReader::new(limits)
        .read_frame(&mut chan, &mut staging)
        .unwrap()
    {
        Frame::Message(m) => m,
        Frame::Checkpoint(_) => panic!("a standby answered a Hello with a checkpoint"),
    }
}

fn refused(m: Message) -> String {
    match m {
        Message::Refuse(r) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A real primary that runs `stop` heartbeats under protection and ends
/// cleanly: proof that the standby still works.
fn good_primary_completes(dir: &TempDir, port: u16, generation: u64) {
    let mut p = spawn(
        "primary",
        dir,
        &[
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            format!("{GUEST} stop=20"),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--heartbeat-ms".into(),
            "200".into(),
            "--ft-generation".into(),
            generation.to_string(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
        ],
    );
    let st = p
        .wait(Duration::from_secs(60))
        .expect("good primary did not finish");
    assert!(
        st.success(),
        "good primary failed: {}",
        read(&dir.path("primary.stderr"))
    );
    assert_eq!(
        complete_lines(&read(&dir.path("primary.console")), hb_line),
        (1..=20).collect::<Vec<_>>()
    );
}

#[test]
fn wrong_version_wrong_shape_and_garbage_are_refused() {
    let dir = TempDir::new("badpeers");
    let port = free_port();
    let mut standby = start_standby("standby", &dir, port, &[]);

    let mut h = good_hello(1);
    h.version = 99;
    let r = refused(handshake(port, h));
    assert!(r.contains("wire version 99"), "{r}");

    let mut h = good_hello(1);
    h.shape.mem_bytes = 12345;
    let r = refused(handshake(port, h));
    assert!(r.contains("guest shape refused"), "{r}");

    let mut h = good_hello(1);
    h.shape.vcpus = 0;
    let r = refused(handshake(port, h));
    assert!(r.contains("guest shape refused"), "{r}");

    let mut h = good_hello(1);
    h.shape.mem_bytes = 1 << 50;
    let r = refused(handshake(port, h));
    assert!(r.contains("guest shape refused"), "{r}");

    let mut h = good_hello(1);
    h.shape.devices.disks = vec![
        DiskShape {
            bytes: 1 << 20,
            readonly: false,
        };
        2
    ];
    let r = refused(handshake(port, h));
    assert!(r.contains("disks"), "{r}");

    // Epoch settings outside the CLI's bounds (a standby that took over
    // would run with them): no epoch, a maximum below the minimum, a
    // budget of 100 %, a 1 TiB page cache.
    for bad in [
        EpochPolicy {
            interval_ms: 0,
            ..good_hello(1).epochs
        },
        EpochPolicy {
            interval_ms: 50,
            max_interval_ms: 40,
            budget_ppm: 100_000,
            cache_bytes: 0,
        },
        EpochPolicy {
            interval_ms: 20,
            max_interval_ms: 200,
            budget_ppm: 1_000_000,
            cache_bytes: 0,
        },
        EpochPolicy {
            cache_bytes: 1 << 40,
            ..good_hello(1).epochs
        },
    ] {
        let mut h = good_hello(1);
        h.epochs = bad;
        let r = refused(handshake(port, h));
        assert!(r.contains("epoch settings out of bounds"), "{bad:?}: {r}");
    }

    // Garbage bytes instead of a preamble: dropped at the door.
    for garbage in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0xffu8; 64][..]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(garbage);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        let n = std::io::Read::read(&mut s, &mut b).unwrap_or(0);
        assert_eq!(n, 0, "the standby answered garbage");
    }

    assert!(standby.running(), "a bad peer killed the standby");
    assert_eq!(read(&dir.path("standby.console")), "");
    good_primary_completes(&dir, port, 1);
    let st = standby
        .wait(Duration::from_secs(10))
        .expect("standby did not end after the primary's goodbye");
    assert!(st.success());
}

#[test]
fn stale_generation_is_fenced() {
    let dir = TempDir::new("fence");
    let port = free_port();
    let mut standby = start_standby("standby", &dir, port, &[]);
    // Generation 5 pairs, then dies before anything commits: the standby
    // keeps listening and remembers generation 5.
    let mut p5 = spawn(
        "p5",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--heartbeat-ms".into(),
            "200".into(),
            "--ft-generation".into(),
            "5".into(),
            "--ft-fault".into(),
            "initial-sync".into(),
            "--serial".into(),
            "none".into(),
        ],
    );
    assert!(p5.wait(Duration::from_secs(30)).is_some());
    assert!(wait_until(Duration::from_secs(10), || read(
        &dir.path("standby.stderr")
    )
    .contains("nothing to run")));

    let r = refused(handshake(port, good_hello(3)));
    assert!(r.contains("generation 3 is older than generation 5"), "{r}");
    assert!(standby.running());
    good_primary_completes(&dir, port, 6);
    assert!(standby
        .wait(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
}

#[test]
fn second_primary_is_refused_and_the_first_stays_protected() {
    let dir = TempDir::new("second");
    let port = free_port();
    let _standby = start_standby("standby", &dir, port, &[]);
    let mut first = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--heartbeat-ms".into(),
            "200".into(),
            "--ft-interval-ms".into(),
            "20".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--ft-metrics".into(),
            dir.path("metrics.jsonl").display().to_string(),
        ],
    );
    assert!(wait_until(Duration::from_secs(30), || read(
        &dir.path("metrics.jsonl")
    )
    .lines()
    .count()
        >= 5));
    let r = refused(handshake(port, good_hello(1)));
    assert!(r.contains("already paired"), "{r}");
    let r = refused(handshake(port, good_hello(7)));
    assert!(r.contains("already paired"), "{r}");
    // The first primary is still protected: its epochs go on, and a
    // failover still works from its state.
    let n = read(&dir.path("metrics.jsonl")).lines().count();
    assert!(wait_until(Duration::from_secs(10), || read(
        &dir.path("metrics.jsonl")
    )
    .lines()
    .count()
        > n + 5));
    first.kill();
    assert!(wait_until(Duration::from_secs(30), || {
        complete_lines(&read(&dir.path("standby.console")), hb_line).len() >= 5
    }));
    check_exactly_once(
        &read(&dir.path("primary.console")),
        &read(&dir.path("standby.console")),
        hb_line,
    );
    // Once it runs the guest, the standby refuses every primary.
    let r = refused(handshake(port, good_hello(9)));
    assert!(r.contains("took over"), "{r}");
}
