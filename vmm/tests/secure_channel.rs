//! The authenticated, sealed checkpoint channel through the real binary:
//! the key rules at the command line, peers without the right key (or with
//! `--ft-insecure` on one side only), a recorded session replayed, single
//! flipped bytes in a checkpoint, an ack and a heartbeat, and a flood of
//! unauthenticated connections against a standby that protects a primary.
//! Everything on 127.0.0.1.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::relay::{Relay, Tamper, Way};
use common::*;
use ftvmm::api::Request;

const GUEST: &str = "dirty=256 rounds=2 round_us=2000";

/// `ftvmm ARGS` with the environment's key removed: what the command line
/// says is all there is.
fn bare(args: &[&str]) -> Output {
    let mut c = ftvmm();
    c.env_remove("FTVMM_FT_KEY").args(args);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    wait_with_timeout(c.spawn().unwrap(), Duration::from_secs(30))
}

fn one_line_error(o: &Output, want: &str) {
    assert!(!o.status.success(), "expected a failure: {o:?}");
    assert!(
        o.stderr.contains(want),
        "expected '{want}' in: {}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn keygen_and_the_key_rules_at_the_command_line() {
    let dir = TempDir::new("keyrules");
    let key = dir.path("k");
    let k = key.to_str().unwrap();
    let o = bare(&["keygen", k]);
    assert!(o.status.success(), "{o:?}");
    assert!(o.stdout.contains("fingerprint"), "{}", o.stdout);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    one_line_error(&bare(&["keygen", k]), "refusing to overwrite");

    // No key and no --ft-insecure: a standby and a protected run refuse.
    one_line_error(
        &bare(&["standby", "--listen", "127.0.0.1:0"]),
        "a standby needs --ft-key FILE",
    );
    one_line_error(
        &bare(&["run", "--ft-peer", "127.0.0.1:9", "--cmdline", "stop=1"]),
        "a protected run (--ft-peer) needs --ft-key FILE",
    );
    // Both: contradictory.
    one_line_error(
        &bare(&[
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--ft-key",
            k,
            "--ft-insecure",
        ]),
        "cannot be used with",
    );
    // A key others can read is refused, as ssh does.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    one_line_error(
        &bare(&["standby", "--listen", "127.0.0.1:0", "--ft-key", k]),
        "chmod 600",
    );
    // Too short.
    let short = dir.path("short");
    std::fs::write(&short, "00112233\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    one_line_error(
        &bare(&[
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--ft-key",
            short.to_str().unwrap(),
        ]),
        "at least 32 are needed",
    );
    // `ctl protect` of a VM started without either cannot pair.
    let sock = dir.path("api.sock");
    let mut c = ftvmm();
    c.env_remove("FTVMM_FT_KEY").args([
        "run",
        "--cmdline",
        GUEST,
        "--serial",
        "none",
        "--api",
        sock.to_str().unwrap(),
    ]);
    let mut vm = Proc::spawn(c, "vm", &dir.0);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let r = ftvmm::api::call(
        &sock,
        &Request::Protect {
            peer: "127.0.0.1:9".into(),
        },
    )
    .unwrap();
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("without --ft-key"));
    vm.kill();
}

/// The standby's status over its API.
fn status(sock: &Path) -> serde_json::Value {
    let r = ftvmm::api::call(sock, &Request::Status).expect("standby API");
    assert!(r.ok, "{r:?}");
    r.result
}

/// Starts a standby on `port` with `key_args`, its API on `NAME.sock`.
fn standby_with(dir: &TempDir, name: &'static str, port: u16, key_args: &[&str]) -> Proc {
    let sock = dir.path(&format!("{name}.sock"));
    let mut args = standby_args(port, &dir.path(&format!("{name}.console")), key_args);
    args.extend(["--api".to_string(), sock.display().to_string()]);
    let mut c = ftvmm();
    c.env_remove("FTVMM_FT_KEY").args(&args);
    let p = Proc::spawn(c, name, &dir.0);
    assert!(
        listening(dir, name),
        "{}",
        read(&dir.path(&format!("{name}.stderr")))
    );
    p
}

/// A primary of `stop` heartbeats protected by 127.0.0.1:`port`, with
/// `key_args`, that is expected to end by itself; returns its exit and
/// stderr.
fn primary_with(
    dir: &TempDir,
    name: &'static str,
    port: u16,
    key_args: &[&str],
    stop: u32,
) -> (bool, String) {
    let mut args = vec![
        "run".to_string(),
        "--mem-mib".into(),
        "64".into(),
        "--cmdline".into(),
        format!("{GUEST} stop={stop}"),
        "--ft-peer".into(),
        format!("127.0.0.1:{port}"),
        "--heartbeat-ms".into(),
        "200".into(),
        "--serial".into(),
        format!("file:{}", dir.path(&format!("{name}.console")).display()),
    ];
    args.extend(key_args.iter().map(|s| s.to_string()));
    let mut c = ftvmm();
    c.env_remove("FTVMM_FT_KEY").args(&args);
    let mut p = Proc::spawn(c, name, &dir.0);
    let st = p
        .wait(Duration::from_secs(60))
        .expect("primary did not end");
    (st.success(), read(&dir.path(&format!("{name}.stderr"))))
}

fn untouched(s: &serde_json::Value) {
    assert_eq!(s["paired"], false, "{s}");
    assert_eq!(s["checkpoints_applied"], 0, "{s}");
    assert_eq!(s["generation"], 0, "{s}");
    assert!(s["committed_epoch"].is_null(), "{s}");
}

#[test]
fn wrong_key_no_key_and_one_sided_insecure_are_refused_then_the_right_primary_pairs() {
    let dir = TempDir::new("wrongkey");
    let (good, bad) = (dir.path("good.key"), dir.path("bad.key"));
    for k in [&good, &bad] {
        assert!(bare(&["keygen", k.to_str().unwrap()]).status.success());
    }
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
    let port = free_port();
    let mut standby = standby_with(&dir, "standby", port, &["--ft-key", good]);
    let sock = dir.path("standby.sock");

    let (ok, err) = primary_with(&dir, "wrong", port, &["--ft-key", bad], 5);
    assert!(!ok);
    assert!(
        err.contains("authentication failed: the standby does not hold the primary's key"),
        "{err}"
    );
    let (ok, err) = primary_with(&dir, "insecure", port, &["--ft-insecure"], 5);
    assert!(!ok);
    assert!(
        err.contains(
            "the standby requires a key (--ft-key) but the primary runs with --ft-insecure"
        ),
        "{err}"
    );
    let log = read(&dir.path("standby.stderr"));
    assert!(
        log.contains("authentication failed: the primary does not hold the standby's key"),
        "{log}"
    );
    assert!(log.contains("the standby requires a key"), "{log}");
    untouched(&status(&sock));
    assert!(standby.running(), "the standby must keep listening");

    // The right primary pairs and runs protected to its end.
    let (ok, err) = primary_with(&dir, "right", port, &["--ft-key", good], 20);
    assert!(ok, "{err}");
    assert!(err.is_empty() || !err.contains("refused"), "{err}");
    assert_eq!(
        complete_lines(&read(&dir.path("right.console")), hb_line),
        (1..=20).collect::<Vec<_>>()
    );
    assert!(
        standby.wait(Duration::from_secs(10)).is_some(),
        "a bye ends the standby"
    );

    // An insecure standby and a keyed primary: refused on both sides.
    let port = free_port();
    let mut open = standby_with(&dir, "open", port, &["--ft-insecure"]);
    assert!(read(&dir.path("open.stderr")).contains("neither authenticated nor encrypted"));
    let (ok, err) = primary_with(&dir, "keyed", port, &["--ft-key", good], 5);
    assert!(!ok);
    assert!(
        err.contains("the standby runs with --ft-insecure but the primary has a key"),
        "{err}"
    );
    untouched(&status(&dir.path("open.sock")));
    open.kill();
}

#[test]
fn a_recorded_session_replayed_to_a_fresh_standby_is_refused() {
    let dir = TempDir::new("replay");
    let port = free_port();
    let key = test_key().to_str().unwrap().to_string();
    let mut first = standby_with(&dir, "first", port, &["--ft-key", &key]);
    let relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), None);
    let (ok, err) = primary_with(&dir, "primary", relay.addr.port(), &["--ft-key", &key], 10);
    assert!(ok, "{err}");
    assert!(first.wait(Duration::from_secs(10)).is_some());
    assert!(relay.connections() >= 2);
    let (data, hb) = (relay.sent_on(0), relay.sent_on(1));
    assert!(data.len() > 1 << 20, "the recording holds the initial sync");
    // The guest's heartbeat lines never crossed in the clear.
    assert!(!data.windows(11).any(|w| w == b"ftguest hb="));

    let port = free_port();
    let mut fresh = standby_with(&dir, "fresh", port, &["--ft-key", &key]);
    for bytes in [&data, &hb] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let log = || read(&dir.path("fresh.stderr"));
    assert!(
        wait_until(Duration::from_secs(10), || log()
            .matches("authentication failed: the primary does not hold the standby's key")
            .count()
            >= 2),
        "{}",
        log()
    );
    untouched(&status(&dir.path("fresh.sock")));
    assert!(fresh.running());
    // And it still serves the genuine primary.
    let (ok, err) = primary_with(&dir, "again", port, &["--ft-key", &key], 5);
    assert!(ok, "{err}");
}

/// A protected pair through a relay that flips one byte of `tamper`; the
/// pair must handle it as a lost peer: nothing tampered is applied, and the
/// output across both sides stays exactly once.
fn tampered_pair(tag: &str, tamper: Tamper, rejected_by: &str, want: &str) {
    let dir = TempDir::new(tag);
    let port = free_port();
    let key = test_key().to_str().unwrap().to_string();
    let _standby = standby_with(&dir, "standby", port, &["--ft-key", &key]);
    let relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap(), Some(tamper));
    let mut c = ftvmm();
    c.args([
        "run",
        "--mem-mib",
        "64",
        "--cmdline",
        GUEST,
        "--ft-peer",
        &relay.addr.to_string(),
        // The relay runs at normal priority in this process: give its
        // pumps 1 s before a silence counts (a relay stalled in both
        // directions is a partition, which only a witness settles).
        "--heartbeat-ms",
        "200",
        "--serial",
        &format!("file:{}", dir.path("primary.console").display()),
    ]);
    let mut primary = Proc::spawn(c, "primary", &dir.0);
    let log = |who: &str| read(&dir.path(&format!("{who}.stderr")));
    assert!(
        wait_until(Duration::from_secs(60), || relay
            .flipped
            .load(std::sync::atomic::Ordering::SeqCst)),
        "the relay never flipped a byte:\nprimary:\n{}\nstandby:\n{}",
        log("primary"),
        log("standby")
    );
    assert!(
        wait_until(Duration::from_secs(10), || log(rejected_by).contains(want)),
        "{rejected_by} did not reject the tampered bytes ('{want}'):\nprimary:\n{}\nstandby:\n{}",
        log("primary"),
        log("standby")
    );
    // One side goes on with the guest; whichever it is, let it print on,
    // then the transcript must be exactly once.
    let hbs =
        |who: &str| complete_lines(&read(&dir.path(&format!("{who}.console"))), hb_line).len();
    // Which side goes on: the standby takes over (and fences the primary),
    // or the primary runs on without it.
    wait_until(Duration::from_secs(15), || {
        log("standby").contains("took over")
    });
    let logs = || format!("primary:\n{}\nstandby:\n{}", log("primary"), log("standby"));
    if log("standby").contains("took over") {
        let n = hbs("standby");
        assert!(
            wait_until(Duration::from_secs(30), || hbs("standby") >= n + 5),
            "{}",
            logs()
        );
        assert!(
            primary.wait(Duration::from_secs(20)).is_some(),
            "the primary must stop once fenced: {}",
            logs()
        );
        check_exactly_once(
            &read(&dir.path("primary.console")),
            &read(&dir.path("standby.console")),
            hb_line,
        );
    } else {
        // The primary lost its standby and runs on unprotected: its own
        // transcript is whole.
        let n = hbs("primary");
        assert!(
            wait_until(Duration::from_secs(30), || hbs("primary") >= n + 5),
            "{}",
            logs()
        );
        let lines = complete_lines(&read(&dir.path("primary.console")), hb_line);
        assert_eq!(lines, (1..=lines.len() as u64).collect::<Vec<_>>());
        assert!(read(&dir.path("standby.console")).is_empty());
    }
    primary.kill();
}

#[test]
fn a_flipped_byte_in_a_checkpoint_is_rejected_never_applied() {
    tampered_pair(
        "flipckpt",
        Tamper {
            connection: 0,
            way: Way::ToStandby,
            after: Duration::from_millis(2500),
        },
        "standby",
        "rejected a sealed record",
    );
}

#[test]
fn a_flipped_byte_in_an_ack_is_rejected() {
    tampered_pair(
        "flipack",
        Tamper {
            connection: 0,
            way: Way::ToPrimary,
            after: Duration::from_millis(2500),
        },
        "primary",
        "rejected a sealed record",
    );
}

#[test]
fn a_flipped_byte_in_a_heartbeat_is_rejected_never_taken_as_a_notice() {
    tampered_pair(
        "fliphb",
        Tamper {
            connection: 1,
            way: Way::ToStandby,
            after: Duration::from_millis(2500),
        },
        "standby",
        "failed authentication",
    );
}

/// Epochs per second the primary reports over `window`.
fn epoch_rate(sock: &Path, window: Duration) -> f64 {
    let epoch = || {
        let r = ftvmm::api::call(sock, &Request::Status).unwrap();
        r.result["epoch"].as_u64().unwrap()
    };
    let (e0, t0) = (epoch(), Instant::now());
    std::thread::sleep(window);
    (epoch() - e0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn a_flood_of_unauthenticated_connections_does_not_disturb_the_pair() {
    let dir = TempDir::new("flood");
    let port = free_port();
    let key = test_key().to_str().unwrap().to_string();
    let mut standby = standby_with(&dir, "standby", port, &["--ft-key", &key]);
    let sock = dir.path("primary.sock");
    let mut c = ftvmm();
    c.args([
        "run",
        "--mem-mib",
        "64",
        "--cmdline",
        GUEST,
        "--ft-peer",
        &format!("127.0.0.1:{port}"),
        "--ft-interval-ms",
        "25",
        "--serial",
        &format!("file:{}", dir.path("primary.console").display()),
        "--api",
        sock.to_str().unwrap(),
    ]);
    let mut primary = Proc::spawn(c, "primary", &dir.0);
    assert!(wait_until(Duration::from_secs(20), || {
        sock.exists()
            && ftvmm::api::call(&sock, &Request::Status)
                .map(|r| r.result["epoch"].as_u64().unwrap_or(0) > 10)
                .unwrap_or(false)
    }));
    let before = epoch_rate(&sock, Duration::from_secs(2));

    // 1 000 connections: garbage, a valid preamble with nothing after, a
    // valid preamble and a keyed offer followed by a bogus proof.
    let flood = std::thread::spawn(move || {
        let preamble = ftvmm_transport::handshake::encode_preamble(
            ftvmm_transport::ConnectionKind::Data,
            ftvmm_transport::SessionId::random(),
        );
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let _ = match i % 3 {
                0 => s.write_all(&i.to_le_bytes().repeat(16)),
                1 => s.write_all(&preamble[..8]),
                _ => {
                    let mut offer = [7u8; 36];
                    offer[0] = 1;
                    offer[1] = 1;
                    let _ = s.write_all(&preamble);
                    let _ = s.write_all(&offer);
                    s.write_all(&[0u8; 32])
                }
            };
        }
        t0.elapsed()
    });
    let during = epoch_rate(&sock, Duration::from_secs(2));
    let took = flood.join().unwrap();
    let after = epoch_rate(&sock, Duration::from_secs(1));
    println!(
        "epochs/s: before {before:.1}, during the flood {during:.1}, after {after:.1} \
         (1000 connections sent in {:.2} s)",
        took.as_secs_f64()
    );
    let s = status(&dir.path("standby.sock"));
    assert_eq!(s["paired"], true, "the pair must survive the flood: {s}");
    assert!(primary.running() && standby.running());
    let p = ftvmm::api::call(&sock, &Request::Status).unwrap().result;
    assert!(
        p["peer"].is_string(),
        "the primary must still be protected: {p}"
    );
    assert!(!read(&dir.path("standby.stderr")).contains("took over"));
    // The standby's log is rate-limited, not flooded.
    let log = read(&dir.path("standby.stderr"));
    assert!(
        log.lines().count() < 400,
        "{} log lines",
        log.lines().count()
    );
    primary.kill();
    standby.kill();
}
