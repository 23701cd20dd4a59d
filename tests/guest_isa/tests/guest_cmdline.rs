//! The guest's command-line parser, compiled from the guest's own source
//! (plain `core` code) and tested on the host.

#[path = "../../../resources/test-guest/src/cmdline.rs"]
mod cmdline;

use cmdline::{parse, parse_u64, Config, Crash};

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
            crash: Crash::No
        }
    );
}

#[test]
fn keys_and_unknown_words() {
    let cfg = parse_ok(
        "console=ttyS0 quiet dirty=1000 span=0x1000  rounds=3\tround_us=0 stop=5 net=tap0",
    );
    assert_eq!(
        cfg,
        Config {
            dirty: 1000,
            span: Some(4096),
            rounds: 3,
            round_us: 0,
            stop: 5,
            crash: Crash::No
        }
    );
    // span=0 means the default; the last occurrence wins.
    assert_eq!(parse_ok("span=7 span=0").span, None);
    assert_eq!(parse_ok("stop=1 stop=2").stop, 2);
    assert_eq!(parse_ok("crash=pf").crash, Crash::PageFault);
    assert_eq!(parse_ok("crash=panic").crash, Crash::Panic);
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
