//! No split brain under partitions (DESIGN "Witness", I5), through the real
//! binary, with an etcd witness.
//!
//! Every role change is a compare-and-swap of the VM's generation on the
//! witness: a standby takes over only after winning it, a primary that lost
//! its standby releases nothing more and does not go on unprotected until it
//! won it, and the loser stops (a primary exits non-zero saying `fenced`,
//! releasing nothing past the last ack; a standby discards its copy and
//! exits non-zero or waits for a new pairing, never running the guest).
//!
//! Topology, private to each test: three namespaces (primary, standby,
//! witness), each with one veth (`eth0`, 10.213.0.{1,2,3}/24) whose other end
//! is on a bridge in a fourth (switch) namespace. etcd runs inside the
//! witness namespace with its data in the test's scratch directory; the VMMs
//! run inside theirs, consoles to files. Partitions are blackhole routes
//! inside the namespaces, or a namespace's link set down. Everything (etcd,
//! VMMs, namespaces, veths, the bridge) goes away when the test ends,
//! whatever way it ends.
//!
//! The tests:
//! 1. primary ↔ standby cut, both reach the witness: exactly one copy runs;
//! 2. primary isolated: the standby takes over; the primary releases
//!    nothing more and stops, also once the partition heals;
//! 3. standby isolated: the primary wins and runs on unprotected; the
//!    standby never runs the guest;
//! 4. witness unreachable, pair healthy: nothing changes; then the pair cut
//!    too: nobody proceeds; witness back: exactly one copy runs;
//! 5. primary stalled (SIGSTOP 2 s): the standby takes over, the resumed
//!    primary is fenced.
//!
//! Each prints `SKIP <test>: <reason>` where the host cannot run it (no
//! /usr/bin/etcd, not root, no /dev/kvm or /dev/net/tun).
//!
//! `FTVMM_WITNESS_TESTS_OMIT_WITNESS=1` runs the same scenarios without
//! `--witness`/`--vm-id`: tests 1–4 must then fail (two copies run, or a
//! copy runs alone), which shows the checks catch a split brain.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::netns::{self, Netns};
use common::*;

const ETCD: &str = "/usr/bin/etcd";
/// A test guest with a heartbeat about every 10 ms and a light memory load.
const GUEST: &str = "dirty=64 span=256 rounds=5 round_us=2000";
const SUBNET: &str = "10.213.0";
const STANDBY_PORT: u16 = 7000;
const ETCD_PORT: u16 = 2379;
/// Heartbeats a side must add to count as "going on" (about 1 s of guest
/// time, far more than the one or two epochs that can be in flight at a
/// cut).
const PROCEEDS: u64 = 100;
/// Heartbeats a copy may still release after a cut: acks already received
/// by its kernel when the routes changed (a few 20 ms epochs).
const IN_FLIGHT: u64 = 40;
/// Bound on every wait for the pair to react (failure detection is 5 ×
/// 200 ms; the rest is etcd and a loaded 2-core machine).
const REACT: Duration = Duration::from_secs(30);

fn skip(test: &str) -> bool {
    if !Path::new(ETCD).exists() {
        println!("SKIP {test}: no etcd");
        return true;
    }
    if let Some(r) = netns::skip_reason() {
        println!("SKIP {test}: {r}");
        return true;
    }
    false
}

fn use_witness() -> bool {
    std::env::var("FTVMM_WITNESS_TESTS_OMIT_WITNESS").as_deref() != Ok("1")
}

/// A time the test holds a state to show that nothing happens in it: the
/// one kind of plain sleep here.
fn hold(d: Duration) {
    std::thread::sleep(d);
}

/// The three hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Primary,
    Standby,
    Witness,
}

impl Node {
    const ALL: [Node; 3] = [Node::Primary, Node::Standby, Node::Witness];

    fn index(self) -> usize {
        self as usize
    }

    fn ip(self) -> String {
        format!("{SUBNET}.{}", self.index() + 1)
    }

    fn short(self) -> &'static str {
        match self {
            Node::Primary => "p",
            Node::Standby => "s",
            Node::Witness => "w",
        }
    }

    /// Its process's name (stderr, console and stdout files are named after it).
    fn name(self) -> &'static str {
        match self {
            Node::Primary => "primary",
            Node::Standby => "standby",
            Node::Witness => "etcd",
        }
    }
}

/// Who kept running after a partition resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Winner {
    Primary,
    Standby,
}

/// The namespaces, etcd and the two VMMs of one test. Fields drop in
/// order: the processes die before their namespaces are deleted, and the
/// scratch directory goes last.
struct Lab {
    primary: Option<Proc>,
    standby: Option<Proc>,
    etcd: Option<Proc>,
    /// Primary, standby, witness (indexed by [`Node::index`]).
    nodes: Vec<Netns>,
    /// Holds the bridge `br0` and the hosts' veth ends.
    _switch: Netns,
    dir: TempDir,
    vm_id: String,
    test: &'static str,
    /// Blackhole routes in place: (namespace, destination).
    cuts: Vec<(Node, Node)>,
}

impl Lab {
    /// The topology and a healthy etcd; panics with the reason when it
    /// cannot be built.
    fn new(test: &'static str, tag: &str) -> Lab {
        let id = std::process::id();
        let base = format!("ftwp{tag}-{id}");
        let dir = TempDir::new(&format!("witness-{tag}"));
        let mut switch = Netns::new(&format!("{base}-x")).expect("switch namespace");
        let setup = |r: Result<(), String>| r.unwrap_or_else(|e| panic!("{test}: set-up: {e}"));
        setup(switch.ip(&["link", "set", "lo", "up"]));
        setup(switch.add_bridge("br0"));
        setup(switch.ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"]));
        setup(switch.ip(&["link", "set", "br0", "up"]));
        let mut nodes = Vec::new();
        for node in Node::ALL {
            let ns = Netns::new(&format!("{base}-{}", node.short()))
                .unwrap_or_else(|e| panic!("{test}: set-up: {e}"));
            // Pushed before configuring it, so a failure below still
            // deletes it.
            nodes.push(ns);
            let ns = nodes.last().unwrap();
            let port = format!("v{}", node.short());
            setup(switch.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]));
            setup(switch.ip(&["link", "set", &port, "master", "br0"]));
            setup(switch.ip(&["link", "set", &port, "up"]));
            setup(ns.ip(&["link", "set", "lo", "up"]));
            setup(ns.ip(&["addr", "add", &format!("{}/24", node.ip()), "dev", "eth0"]));
            setup(ns.ip(&["link", "set", "eth0", "up"]));
        }
        let mut lab = Lab {
            primary: None,
            standby: None,
            etcd: None,
            nodes,
            _switch: switch,
            dir,
            vm_id: format!("wp-{tag}-{id}"),
            test,
            cuts: Vec::new(),
        };
        lab.start_etcd();
        lab
    }

    fn ns(&self, node: Node) -> &Netns {
        &self.nodes[node.index()]
    }

    fn witness_url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", Node::Witness.ip())
    }

    /// etcd inside the witness namespace, on its private address only,
    /// data in the scratch directory; waits until it reports healthy.
    fn start_etcd(&mut self) {
        let w = Node::Witness.ip();
        let client = format!("http://{w}:{ETCD_PORT}");
        let peer = "http://127.0.0.1:2380";
        let mut cmd = self.ns(Node::Witness).exec(ETCD);
        cmd.args(["--name", "witness", "--data-dir"])
            .arg(self.dir.path("etcd-data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("witness={peer}")])
            .args(["--initial-cluster-state", "new"]);
        self.etcd = Some(Proc::spawn(cmd, "etcd", &self.dir.0));
        let healthy = wait_until(Duration::from_secs(20), || {
            self.http("GET", "/health", None)
                .is_ok_and(|r| r.contains("\"health\":\"true\""))
        });
        if !healthy {
            panic!(
                "{}: etcd did not become healthy within 20 s:\n{}",
                self.test,
                tail(&read(&self.dir.path("etcd.stderr")), 30)
            );
        }
    }

    /// One HTTP/1.1 request to etcd, made from inside the witness namespace.
    fn http(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        let addr: SocketAddr = format!("{}:{ETCD_PORT}", Node::Witness.ip())
            .parse()
            .unwrap();
        let body = body.unwrap_or("").to_string();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.ns(Node::Witness).in_ns(move || {
            let t = Duration::from_secs(2);
            let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
            s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
            Ok(reply)
        })
    }

    /// Every key and value the witness holds, for failure reports.
    fn witness_keys(&self) -> String {
        // The whole keyspace: from "\0" to the end ("\0" as range_end).
        let reply = match self.http(
            "POST",
            "/v3/kv/range",
            Some(r#"{"key":"AA==","range_end":"AA=="}"#),
        ) {
            Ok(r) => r,
            Err(e) => return format!("(witness not readable: {e})"),
        };
        let Some(json) = reply.split("\r\n\r\n").nth(1) else {
            return format!("(odd reply: {reply})");
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            return format!("(odd reply: {json})");
        };
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        if kvs.is_empty() {
            return "(no keys)".to_string();
        }
        kvs.iter()
            .map(|kv| {
                let s = |f: &str| {
                    String::from_utf8_lossy(&base64(kv[f].as_str().unwrap_or(""))).into_owned()
                };
                format!("{} = {}", s("key"), s("value"))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `ftvmm ARGS` inside `node`'s namespace.
    fn spawn_vmm(&self, node: Node, args: &[String]) -> Proc {
        let mut cmd = self.ns(node).exec(env!("CARGO_BIN_EXE_ftvmm"));
        cmd.args(args);
        Proc::spawn(cmd, node.name(), &self.dir.0)
    }

    fn witness_args(&self, with_vm_id: bool) -> Vec<String> {
        if !use_witness() {
            return Vec::new();
        }
        let mut a = vec!["--witness".to_string(), self.witness_url()];
        if with_vm_id {
            a.extend(["--vm-id".to_string(), self.vm_id.clone()]);
        }
        a
    }

    /// A standby, then a primary protected by it; returns once the pair has
    /// run 20 epochs and the primary released 10 heartbeats.
    fn start_pair(&mut self) {
        let mut s = vec![
            "standby".to_string(),
            "--listen".into(),
            format!("{}:{STANDBY_PORT}", Node::Standby.ip()),
            "--serial".into(),
            format!("file:{}", self.console_path(Node::Standby).display()),
        ];
        s.extend(self.witness_args(false));
        self.standby = Some(self.spawn_vmm(Node::Standby, &s));
        let up = wait_until(Duration::from_secs(10), || {
            self.stderr(Node::Standby).contains("listening") || !self.running(Node::Standby)
        });
        if !up || !self.running(Node::Standby) {
            self.fail("the standby did not start listening".into());
        }
        let mut p = vec![
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            GUEST.into(),
            "--ft-peer".into(),
            format!("{}:{STANDBY_PORT}", Node::Standby.ip()),
            "--ft-interval-ms".into(),
            "20".into(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--serial".into(),
            format!("file:{}", self.console_path(Node::Primary).display()),
            "--ft-metrics".into(),
            self.dir.path("metrics.jsonl").display().to_string(),
        ];
        p.extend(self.witness_args(true));
        self.primary = Some(self.spawn_vmm(Node::Primary, &p));
        let paired = wait_until(Duration::from_secs(60), || {
            (self.epochs() >= 20 && self.hbs(Node::Primary).len() >= 10)
                || !self.running(Node::Primary)
                || !self.running(Node::Standby)
        });
        if !paired || !self.running(Node::Primary) || !self.running(Node::Standby) {
            self.fail(format!("the pair did not start ({} epochs)", self.epochs()));
        }
        if !self.hbs(Node::Standby).is_empty() {
            self.fail("the standby printed before any failure".into());
        }
    }

    fn epochs(&self) -> usize {
        read(&self.dir.path("metrics.jsonl")).lines().count()
    }

    fn console_path(&self, node: Node) -> std::path::PathBuf {
        self.dir.path(&format!("{}.console", node.name()))
    }

    fn console(&self, node: Node) -> String {
        read(&self.console_path(node))
    }

    fn hbs(&self, node: Node) -> Vec<u64> {
        heartbeats(&self.console(node))
    }

    /// The last heartbeat `node` released (0 before the first).
    fn last(&self, node: Node) -> u64 {
        self.hbs(node).last().copied().unwrap_or(0)
    }

    fn stderr(&self, node: Node) -> String {
        read(&self.dir.path(&format!("{}.stderr", node.name())))
    }

    fn proc(&mut self, node: Node) -> &mut Proc {
        match node {
            Node::Primary => self.primary.as_mut(),
            Node::Standby => self.standby.as_mut(),
            Node::Witness => self.etcd.as_mut(),
        }
        .unwrap_or_else(|| panic!("no {} process", node.name()))
    }

    fn running(&mut self, node: Node) -> bool {
        self.proc(node).running()
    }

    /// Its exit status, if it has exited.
    fn exit_status(&mut self, node: Node) -> Option<ExitStatus> {
        self.proc(node).child.try_wait().ok().flatten()
    }

    fn pid(&mut self, node: Node) -> libc::pid_t {
        self.proc(node).child.id() as libc::pid_t
    }

    /// The state of both copies and the witness, for failure messages.
    fn report(&mut self) -> String {
        let mut out = String::new();
        for node in [Node::Primary, Node::Standby] {
            let state = match node {
                Node::Primary => self.primary.as_mut(),
                _ => self.standby.as_mut(),
            }
            .map(|p| match p.child.try_wait() {
                Ok(Some(st)) => format!("exited ({st})"),
                _ => "running".to_string(),
            })
            .unwrap_or_else(|| "not started".to_string());
            let hbs = self.hbs(node);
            let range = match (hbs.first(), hbs.last()) {
                (Some(a), Some(b)) => format!("hb={a}..={b}"),
                _ => "no heartbeat".to_string(),
            };
            out.push_str(&format!(
                "--- {} ({state}, console: {range}), stderr:\n{}\n",
                node.name(),
                tail(&self.stderr(node), 25)
            ));
        }
        out.push_str(&format!("--- witness: {}\n", self.witness_keys()));
        out
    }

    /// Panics with `msg`, then the state of everything.
    fn fail(&mut self, msg: String) -> ! {
        let report = self.report();
        panic!("{}: {msg}:\n{report}", self.test)
    }

    /// Blackhole routes both ways between `a` and `b`.
    fn cut(&mut self, a: Node, b: Node) {
        for (from, to) in [(a, b), (b, a)] {
            self.ns(from)
                .ip(&["route", "add", "blackhole", &format!("{}/32", to.ip())])
                .unwrap_or_else(|e| panic!("{}: cut: {e}", self.test));
            self.cuts.push((from, to));
        }
    }

    /// Removes every blackhole route.
    fn heal(&mut self) {
        for (from, to) in std::mem::take(&mut self.cuts) {
            self.ns(from)
                .ip(&["route", "del", "blackhole", &format!("{}/32", to.ip())])
                .unwrap_or_else(|e| panic!("{}: heal: {e}", self.test));
        }
    }

    /// `node`'s only link up or down.
    fn link(&self, node: Node, up: bool) {
        self.ns(node)
            .ip(&["link", "set", "eth0", if up { "up" } else { "down" }])
            .unwrap_or_else(|e| panic!("{}: link: {e}", self.test));
    }

    /// Waits until `node`'s last heartbeat reaches `n`; panics with `what`
    /// past [`REACT`].
    fn wait_hb(&mut self, node: Node, n: u64, what: &str) {
        if !wait_until(REACT, || self.last(node) >= n) {
            self.fail(format!(
                "{what} (waited {REACT:?} for {} hb={n})",
                node.name()
            ));
        }
    }

    /// Waits until the primary's console has not changed for `quiet`, and
    /// returns its text then. Fails as soon as it passes hb=`cut_at` +
    /// [`IN_FLIGHT`] (it went on after the cut), or if it still changes
    /// after [`REACT`]; `what` says what that means.
    fn wait_primary_quiet(&mut self, cut_at: u64, quiet: Duration, what: &str) -> String {
        let deadline = Instant::now() + REACT;
        let mut text = self.console(Node::Primary);
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.console(Node::Primary);
            let last = heartbeats(&now).last().copied().unwrap_or(0);
            if last > cut_at + IN_FLIGHT {
                self.fail(format!(
                    "{what}: its released output grew from hb={cut_at} at the cut to hb={last}"
                ));
            }
            if now != text {
                text = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return text;
            }
        }
        self.fail(format!(
            "{what}: its console still changes {REACT:?} after the cut"
        ));
    }

    /// Waits for the primary to exit, and checks it was fenced: non-zero,
    /// a line saying `fenced`.
    fn assert_primary_fenced(&mut self, what: &str) {
        let st = self.proc(Node::Primary).wait(REACT);
        let Some(st) = st else {
            self.fail(format!("{what}: the primary did not stop within {REACT:?}"));
        };
        let stderr = self.stderr(Node::Primary);
        if st.success() || !stderr.contains("fenced") {
            self.fail(format!(
                "{what}: the primary must exit non-zero saying `fenced`; it exited ({st})"
            ));
        }
    }

    /// A standby that lost: it printed no heartbeat, and it either still
    /// waits or exited non-zero.
    fn assert_standby_ran_nothing(&mut self, what: &str) {
        let hbs = self.hbs(Node::Standby);
        let status = self.exit_status(Node::Standby);
        if !hbs.is_empty() || status.is_some_and(|s| s.success()) {
            self.fail(format!(
                "{what}: the standby must run no guest and exit non-zero or wait \
                 (printed {} heartbeats, {:?})",
                hbs.len(),
                status
            ));
        }
    }

    /// After a partition with both sides able to reach the witness (at
    /// last): waits until one side proceeds, then checks that the other
    /// never does and that the released output is exactly-once. `cut_at`:
    /// the primary's last heartbeat when the pair was cut.
    fn assert_exactly_one_runs(&mut self, cut_at: u64) -> Winner {
        let decided = wait_until(REACT, || {
            !self.hbs(Node::Standby).is_empty() || self.last(Node::Primary) >= cut_at + PROCEEDS
        });
        if !decided {
            self.fail(format!(
                "nobody proceeded within {REACT:?} (the primary was at hb={cut_at} at the cut)"
            ));
        }
        // Give the other side every chance to (wrongly) run too.
        hold(Duration::from_secs(3));
        let (p, s) = (self.hbs(Node::Primary), self.hbs(Node::Standby));
        let p_last = p.last().copied().unwrap_or(0);
        if let (Some(s_first), Some(s_last)) = (s.first(), s.last()) {
            if p_last > cut_at + IN_FLIGHT {
                self.fail(format!(
                    "both copies ran: the primary's released output grew from hb={cut_at} \
                     at the cut to hb={p_last}, and the standby printed hb={s_first}..={s_last}"
                ));
            }
        }
        if s.is_empty() {
            self.assert_standby_ran_nothing("the primary won");
            let n = self.last(Node::Primary);
            self.wait_hb(Node::Primary, n + 50, "the winning primary stopped");
            let p = self.hbs(Node::Primary);
            if p != (1..=p.len() as u64).collect::<Vec<_>>() {
                self.fail("the primary's output is not every heartbeat once, in order".into());
            }
            Winner::Primary
        } else {
            self.assert_primary_fenced("the standby won");
            let n = self.last(Node::Standby);
            self.wait_hb(
                Node::Standby,
                n + 20,
                "the standby stopped after taking over",
            );
            check_exactly_once(
                &self.console(Node::Primary),
                &self.console(Node::Standby),
                hb_line,
            );
            Winner::Standby
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Kill the VMMs before etcd and the namespaces (fields drop in
        // declaration order; this only makes it explicit for a stopped
        // primary, which SIGKILL ends too).
        for p in [&mut self.primary, &mut self.standby, &mut self.etcd]
            .into_iter()
            .flatten()
        {
            p.kill();
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Standard base64 (etcd's JSON gateway encodes keys and values so).
fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn partition_between_the_pair_leaves_exactly_one_copy_running() {
    let test = "partition_between_the_pair_leaves_exactly_one_copy_running";
    if skip(test) {
        return;
    }
    let mut lab = Lab::new(test, "1");
    lab.start_pair();
    let cut_at = lab.last(Node::Primary);
    lab.cut(Node::Primary, Node::Standby);
    let winner = lab.assert_exactly_one_runs(cut_at);
    println!("{test}: the {winner:?} won");
}

#[test]
fn an_isolated_primary_stops_and_the_standby_takes_over() {
    let test = "an_isolated_primary_stops_and_the_standby_takes_over";
    if skip(test) {
        return;
    }
    let mut lab = Lab::new(test, "2");
    lab.start_pair();
    let cut_at = lab.last(Node::Primary);
    lab.cut(Node::Primary, Node::Standby);
    lab.cut(Node::Primary, Node::Witness);
    lab.wait_hb(
        Node::Standby,
        10,
        "the standby did not take over from an isolated primary",
    );
    let released = lab.wait_primary_quiet(
        cut_at,
        Duration::from_secs(1),
        "the isolated primary kept releasing output",
    );
    hold(Duration::from_secs(2));
    assert_eq!(
        lab.console(Node::Primary),
        released,
        "{test}: the isolated primary released output after the takeover:\n{}",
        lab.report()
    );
    lab.heal();
    lab.assert_primary_fenced("the partition healed");
    assert_eq!(
        lab.console(Node::Primary),
        released,
        "{test}: the primary released output once the partition healed:\n{}",
        lab.report()
    );
    let n = lab.last(Node::Standby);
    lab.wait_hb(Node::Standby, n + 20, "the standby stopped after the heal");
    check_exactly_once(
        &lab.console(Node::Primary),
        &lab.console(Node::Standby),
        hb_line,
    );
}

#[test]
fn with_the_standby_isolated_the_primary_runs_on_unprotected() {
    let test = "with_the_standby_isolated_the_primary_runs_on_unprotected";
    if skip(test) {
        return;
    }
    let mut lab = Lab::new(test, "3");
    lab.start_pair();
    let cut_at = lab.last(Node::Primary);
    lab.cut(Node::Standby, Node::Primary);
    lab.cut(Node::Standby, Node::Witness);
    lab.wait_hb(
        Node::Primary,
        cut_at + PROCEEDS,
        "the primary did not go on without its isolated standby",
    );
    let before = lab.last(Node::Primary);
    hold(Duration::from_secs(3));
    lab.assert_standby_ran_nothing("the standby is isolated");
    assert!(
        lab.last(Node::Primary) >= before + 50,
        "{test}: the primary's console stopped growing (hb={before} → hb={}):\n{}",
        lab.last(Node::Primary),
        lab.report()
    );
    // Back in touch with the witness, the standby learns it lost.
    lab.heal();
    hold(Duration::from_secs(3));
    lab.assert_standby_ran_nothing("the partition healed");
    let n = lab.last(Node::Primary);
    lab.wait_hb(Node::Primary, n + 50, "the primary stopped after the heal");
    let p = lab.hbs(Node::Primary);
    assert_eq!(
        p,
        (1..=p.len() as u64).collect::<Vec<_>>(),
        "{test}: the primary's output is not every heartbeat once, in order"
    );
}

#[test]
fn without_the_witness_nobody_proceeds_alone() {
    let test = "without_the_witness_nobody_proceeds_alone";
    if skip(test) {
        return;
    }
    let mut lab = Lab::new(test, "4");
    lab.start_pair();

    // Witness unreachable, pair healthy: nothing changes.
    lab.link(Node::Witness, false);
    let before = lab.last(Node::Primary);
    hold(Duration::from_millis(2500));
    let (p_up, s_up) = (lab.running(Node::Primary), lab.running(Node::Standby));
    if !p_up || !s_up || lab.last(Node::Primary) < before + 50 || !lab.hbs(Node::Standby).is_empty()
    {
        panic!(
            "{test}: the witness went away from a healthy pair and something changed \
             (primary hb={before} → hb={}, both must keep running, the standby silent):\n{}",
            lab.last(Node::Primary),
            lab.report()
        );
    }

    // And the peer lost too: neither proceeds.
    let cut_at = lab.last(Node::Primary);
    lab.cut(Node::Primary, Node::Standby);
    let stalled = lab.wait_primary_quiet(
        cut_at,
        Duration::from_secs(1),
        "with the witness down and the standby lost, the primary went on",
    );
    hold(Duration::from_secs(3));
    assert_eq!(
        lab.console(Node::Primary),
        stalled,
        "{test}: with the witness down and the standby lost, the primary released output:\n{}",
        lab.report()
    );
    assert!(
        lab.hbs(Node::Standby).is_empty(),
        "{test}: with the witness down the standby ran the guest:\n{}",
        lab.report()
    );

    // The witness comes back: exactly one copy runs.
    lab.link(Node::Witness, true);
    let winner = lab.assert_exactly_one_runs(cut_at);
    println!("{test}: once the witness was back the {winner:?} won");
}

#[test]
fn a_stalled_primary_loses_to_the_standby() {
    let test = "a_stalled_primary_loses_to_the_standby";
    if skip(test) {
        return;
    }
    let mut lab = Lab::new(test, "5");
    lab.start_pair();
    let pid = lab.pid(Node::Primary);
    // SAFETY: signalling our own child, alive until reaped by Lab's drop.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    hold(Duration::from_secs(2));
    let during = lab.hbs(Node::Standby).len();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    lab.wait_hb(
        Node::Standby,
        5,
        "the standby did not take over from the stalled primary",
    );
    lab.assert_primary_fenced("the stalled primary resumed");
    let n = lab.last(Node::Standby);
    lab.wait_hb(Node::Standby, n + 20, "the standby stopped");
    let (last_p, first_s, gap) = check_exactly_once(
        &lab.console(Node::Primary),
        &lab.console(Node::Standby),
        hb_line,
    );
    println!(
        "{test}: the standby printed {during} heartbeats during the stall; \
         primary released up to hb={last_p}, standby went on from hb={first_s} ({gap} lost)"
    );
}
