//! The control API through the real binary: `ftvmm ctl` against a primary
//! and a standby; bad requests leave the VM unaffected; re-protection chains
//! primary → standby A → standby B with an exactly-once console.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;

const GUEST: &str = "dirty=256 span=1024 rounds=2 round_us=2000";

fn ctl(sock: &Path, words: &[&str]) -> Output {
    let mut args = vec!["ctl", "--api", sock.to_str().unwrap()];
    args.extend_from_slice(words);
    run(&args, Duration::from_secs(40))
}

fn ctl_ok(sock: &Path, words: &[&str]) -> serde_json::Value {
    let out = ctl(sock, words);
    assert!(out.status.success(), "ctl {words:?} failed: {}", out.stderr);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl {words:?}: {e}: {}", out.stdout))
}

fn ctl_err(sock: &Path, words: &[&str]) -> String {
    let out = ctl(sock, words);
    assert!(
        !out.status.success(),
        "ctl {words:?} should fail: {}",
        out.stdout
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    out.stderr
}

fn raw(sock: &Path, line: &[u8]) -> serde_json::Value {
    let s = UnixStream::connect(sock).unwrap();
    (&s).write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn standby(dir: &TempDir, name: &'static str, port: u16) -> Proc {
    let sock = dir.path(&format!("{name}.sock")).display().to_string();
    start_standby(name, dir, port, &["--api", &sock])
}

fn hbs(dir: &TempDir, name: &str) -> usize {
    complete_lines(&read(&dir.path(&format!("{name}.console"))), hb_line).len()
}

#[test]
fn api_commands_and_bad_requests_leave_the_vm_unaffected() {
    let dir = TempDir::new("ctl");
    let port = free_port();
    let _sb = standby(&dir, "standby", port);
    let psock = dir.path("primary.sock");
    let _primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--api".into(),
            psock.display().to_string(),
        ],
    );
    assert!(wait_until(Duration::from_secs(30), || hbs(&dir, "primary") >= 5));
    let st = ctl_ok(&psock, &["status"]);
    assert_eq!(st["role"], "primary");
    assert_eq!(st["protected"], true);
    assert!(st["took_over_from_epoch"].is_null(), "{st}");
    let ssock = dir.path("standby.sock");
    let sst = ctl_ok(&ssock, &["status"]);
    assert_eq!(sst["role"], "standby");
    assert_eq!(sst["paired"], true);
    assert_eq!(sst["listen"], format!("127.0.0.1:{port}"));
    assert!(
        ctl_ok(&psock, &["stats"])["summary"]["epochs"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Wrong state, unknown command, malformed JSON: an error reply each.
    assert!(ctl_err(&psock, &["failover"]).contains("standby"));
    assert!(ctl_err(&psock, &["protect", "127.0.0.1:1"]).contains("already protected"));
    assert!(ctl_err(&psock, &["resume"]).contains("not paused"));
    assert!(ctl_err(&psock, &["set", "interval-ms", "0"]).contains("out of range"));
    assert!(ctl_err(&psock, &["fly"]).contains("unknown ctl command"));
    assert!(ctl_err(&ssock, &["pause"]).contains("standby"));
    let r = raw(&psock, b"{\"command\":\"explode\"}\n");
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("unknown variant"),
        "{r}"
    );
    let r = raw(&psock, b"this is not json\n");
    assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");
    assert!(
        ctl_err(Path::new("/nonexistent/api.sock"), &["status"]).contains("/nonexistent/api.sock")
    );

    // Pause stops the guest (and its epochs); resume continues it.
    ctl_ok(&psock, &["pause"]);
    assert!(ctl_err(&psock, &["pause"]).contains("already paused"));
    let n = hbs(&dir, "primary");
    let epoch = ctl_ok(&psock, &["status"])["epoch"].as_u64().unwrap();
    let observe = std::time::Instant::now() + Duration::from_millis(400);
    while std::time::Instant::now() < observe {
        assert!(hbs(&dir, "primary") <= n + 1, "the guest ran while paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        ctl_ok(&psock, &["status"])["epoch"].as_u64().unwrap(),
        epoch
    );
    ctl_ok(&psock, &["resume"]);
    ctl_ok(&psock, &["set", "interval-ms", "10"]);
    assert_eq!(ctl_ok(&psock, &["status"])["interval_ms"], 10);
    assert!(wait_until(Duration::from_secs(20), || hbs(&dir, "primary") >= n + 10));
    // The VM was unaffected: still protected, still counting in order.
    assert_eq!(ctl_ok(&psock, &["status"])["protected"], true);
    let all = complete_lines(&read(&dir.path("primary.console")), hb_line);
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
}

#[test]
fn reprotection_chains_three_hosts_exactly_once() {
    let dir = TempDir::new("reprotect");
    let (pa, pb) = (free_port(), free_port());
    let _a = standby(&dir, "a", pa);
    let mut primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{pa}"),
            "--ft-interval-ms".into(),
            "30".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
        ],
    );
    assert!(wait_until(Duration::from_secs(30), || hbs(&dir, "primary") >= 20));
    primary.kill();
    assert!(
        wait_until(Duration::from_secs(30), || hbs(&dir, "a") >= 10),
        "A did not take over: {}",
        read(&dir.path("a.stderr"))
    );
    let asock = dir.path("a.sock");
    let st = ctl_ok(&asock, &["status"]);
    assert_eq!(st["role"], "standby (took over)");
    assert_eq!(st["protected"], false);
    assert_eq!(st["generation"], 2);
    // The first primary's epoch length (its Hello), not the default 25 ms.
    assert_eq!(st["interval_ms"], 30, "{st}");
    // How it took over: the checkpoint it resumed, its own timing, why.
    assert!(
        st["took_over_from_epoch"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert!(
        st["takeover_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{st}"
    );
    assert!(st["takeover_reason"].is_string(), "{st}");

    let mut b = standby(&dir, "b", pb);
    let st = ctl_ok(&asock, &["protect", &format!("127.0.0.1:{pb}")]);
    assert_eq!(st["protected"], true);
    let bsock = dir.path("b.sock");
    assert!(wait_until(Duration::from_secs(30), || {
        ctl_ok(&bsock, &["status"])["committed_epoch"]
            .as_u64()
            .unwrap_or(0)
            >= 20
    }));
    assert_eq!(ctl_ok(&bsock, &["status"])["generation"], 2);
    let _ = &mut b;
    // Kill A (the first standby, now primary): B takes over.
    drop(_a);
    assert!(
        wait_until(Duration::from_secs(30), || hbs(&dir, "b") >= 10),
        "B did not take over: {}",
        read(&dir.path("b.stderr"))
    );
    let p = read(&dir.path("primary.console"));
    let a = read(&dir.path("a.console"));
    let bc = read(&dir.path("b.console"));
    let (_, a_first, _) = check_exactly_once(&p, &a, hb_line);
    let (a_last, b_first, _) = check_exactly_once(&a, &bc, hb_line);
    println!("re-protection: primary → A from hb={a_first}, A → B from hb={b_first} (A released up to {a_last})");
    assert_eq!(ctl_ok(&bsock, &["status"])["generation"], 3);
}

/// The memory CRC `name` printed for `epoch` (`--ft-hash-epoch`), once it did.
fn memory_crc(dir: &TempDir, name: &str, epoch: u64) -> Option<String> {
    let prefix = format!("ftvmm: memory crc at epoch {epoch}: ");
    read(&dir.path(&format!("{name}.stderr")))
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

/// A primary that lost its standby and pairs with a new one through the same
/// machinery (its page cache emptied, a new initial sync): the new standby's
/// memory equals the primary's at a committed epoch, so no delta was made
/// against what only the lost standby held.
#[test]
fn a_new_standby_after_a_lost_one_gets_an_equal_copy() {
    const HASH_EPOCH: u64 = 150;
    let dir = TempDir::new("repair");
    let (pa, pb) = (free_port(), free_port());
    let a = standby(&dir, "a", pa);
    let psock = dir.path("primary.sock");
    let _primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{pa}"),
            "--ft-interval-ms".into(),
            "20".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--api".into(),
            psock.display().to_string(),
            "--ft-hash-epoch".into(),
            HASH_EPOCH.to_string(),
        ],
    );
    let asock = dir.path("a.sock");
    assert!(wait_until(Duration::from_secs(30), || {
        ctl_ok(&asock, &["status"])["committed_epoch"]
            .as_u64()
            .unwrap_or(0)
            >= 10
    }));
    drop(a);
    assert!(
        wait_until(Duration::from_secs(30), || ctl_ok(&psock, &["status"])
            ["protected"]
            == false),
        "the primary did not notice the loss of A"
    );
    let epoch = ctl_ok(&psock, &["status"])["epoch"].as_u64().unwrap();
    assert!(
        epoch < HASH_EPOCH,
        "epoch {epoch} already past the hash epoch"
    );
    // The guest keeps writing its working set while unprotected: pages the
    // lost standby held change without being sent anywhere.
    assert!(wait_until(Duration::from_secs(30), || hbs(&dir, "primary") >= 20));
    let _b = start_standby(
        "b",
        &dir,
        pb,
        &[
            "--api",
            &dir.path("b.sock").display().to_string(),
            "--ft-hash-epoch",
            &HASH_EPOCH.to_string(),
        ],
    );
    let st = ctl_ok(&psock, &["protect", &format!("127.0.0.1:{pb}")]);
    assert_eq!(st["protected"], true);
    assert!(
        wait_until(Duration::from_secs(60), || memory_crc(
            &dir, "b", HASH_EPOCH
        )
        .is_some()),
        "B never applied epoch {HASH_EPOCH}: {}",
        read(&dir.path("b.stderr"))
    );
    let (p, b) = (
        memory_crc(&dir, "primary", HASH_EPOCH),
        memory_crc(&dir, "b", HASH_EPOCH),
    );
    assert!(p.is_some() && p == b, "primary {p:?} against B {b:?}");
    let stderr = read(&dir.path("primary.stderr"));
    assert_eq!(
        stderr.matches("ftvmm: protected by standby").count(),
        2,
        "{stderr}"
    );
}

/// The API answers only root and the VMM's own user, even where its socket
/// was opened to everyone: another user's request is refused with one line,
/// and the VM is unaffected.
#[test]
fn another_users_request_is_refused() {
    if !is_root()
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        println!("SKIP another_users_request_is_refused: needs root and setpriv(1)");
        return;
    }
    let dir = TempDir::new("ctl-cred");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path("vm.sock");
    let _vm = spawn(
        "vm",
        &dir,
        &[
            "run".to_string(),
            "--cmdline".into(),
            GUEST.into(),
            "--serial".into(),
            "none".into(),
            "--api".into(),
            sock.display().to_string(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || sock.exists()
            && ctl(&sock, &["status"]).status.success()),
        "the VM's API did not answer"
    );
    // Widen the socket (as a careless operator might): the credentials
    // check still stands.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let bin = dir.path("ftvmm");
    std::fs::copy(env!("CARGO_BIN_EXE_ftvmm"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["ctl", "--api", sock.to_str().unwrap(), "pause"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    assert!(
        !out.status.success(),
        "nobody's pause was obeyed: {}",
        out.stdout
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("permission denied: uid 65534"),
        "{}",
        out.stderr
    );
    let st = ctl_ok(&sock, &["status"]);
    assert_eq!(st["paused"], false, "the refused request changed the VM");
}

/// Epochs that overrun their interval (1 ms epochs whose acks come 20 ms
/// late) must not starve the control API: every request is answered,
/// each within a bound.
#[test]
fn overrunning_epochs_do_not_starve_the_api() {
    let dir = TempDir::new("ctl-overrun");
    let port = free_port();
    // Each ack 20 ms late: every epoch takes 20 times its interval.
    let _standby = start_standby("standby", &dir, port, &["--ft-ack-delay-ms", "20"]);
    let sock = dir.path("primary.sock");
    let _primary = spawn(
        "primary",
        &dir,
        &[
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            "dirty=64 span=64 rounds=10 round_us=1000".into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{port}"),
            "--ft-interval-ms".into(),
            "1".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", dir.path("primary.console").display()),
            "--api".into(),
            sock.display().to_string(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || sock.exists()
            && ftvmm::api::call_with_timeout(
                &sock,
                &ftvmm::api::Request::Status,
                Duration::from_secs(2)
            )
            .map(|r| r.ok && r.result["epoch"].as_u64().unwrap_or(0) > 5)
            .unwrap_or(false)),
        "the protected VM never reached epoch 5 with its API answering: {}",
        read(&dir.path("primary.stderr"))
    );
    for _ in 0..10 {
        let t = std::time::Instant::now();
        let r = ftvmm::api::call_with_timeout(
            &sock,
            &ftvmm::api::Request::Status,
            Duration::from_secs(5),
        )
        .expect("the API must answer while epochs overrun");
        assert!(r.ok, "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
