//! A protected pair for the failover tests: a standby and a primary, the
//! test guest, consoles and logs in a temporary directory.

use std::time::Duration;

use super::*;

/// The test guest's default workload in these tests.
pub const GUEST: &str = "dirty=512 span=2048 rounds=2 round_us=2000";

/// A standby listening on loopback and a primary it protects, both the
/// real binary with the test guest, in one temporary directory (consoles,
/// stderr, the primary's metrics).
pub struct FtPair {
    pub dir: TempDir,
    pub port: u16,
    pub standby: Proc,
    pub primary: Option<Proc>,
}

impl FtPair {
    fn primary_args(&self, cmdline: &str, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "run".to_string(),
            "--mem-mib".into(),
            "64".into(),
            "--cmdline".into(),
            cmdline.into(),
            "--ft-peer".into(),
            format!("127.0.0.1:{}", self.port),
            "--ft-interval-ms".into(),
            "20".into(),
            "--serial".into(),
            format!("file:{}", self.dir.path("primary.console").display()),
            "--ft-metrics".into(),
            self.dir.path("metrics.jsonl").display().to_string(),
        ];
        // Generous failure detection: these tests kill processes, which is
        // detected at once through the closed connections; silence must not
        // be mistaken on a loaded 2-core machine running several VMs.
        if !extra.contains(&"--heartbeat-ms") {
            a.extend(["--heartbeat-ms".to_string(), "200".to_string()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// A standby listening, and a primary protected by it.
    pub fn start(tag: &str, primary_extra: &[&str], standby_extra: &[&str]) -> FtPair {
        FtPair::start_with_guest(tag, GUEST, primary_extra, standby_extra)
    }

    /// As [`FtPair::start`], with the test guest's command line `guest`.
    pub fn start_with_guest(
        tag: &str,
        guest: &str,
        primary_extra: &[&str],
        standby_extra: &[&str],
    ) -> FtPair {
        let dir = TempDir::new(tag);
        let port = free_port();
        let standby = spawn(
            "standby",
            &dir,
            &standby_args(port, &dir.path("standby.console"), standby_extra),
        );
        assert!(
            listening(&dir, "standby"),
            "standby did not start: {}",
            read(&dir.path("standby.stderr"))
        );
        let mut pair = FtPair {
            dir,
            port,
            standby,
            primary: None,
        };
        let args = pair.primary_args(guest, primary_extra);
        pair.primary = Some(spawn("primary", &pair.dir, &args));
        pair
    }

    pub fn file(&self, name: &str) -> String {
        read(&self.dir.path(name))
    }

    /// DESIGN's exactly-once property of the two consoles.
    pub fn check(&self) -> (u64, u64, u64) {
        check_exactly_once(
            &self.file("primary.console"),
            &self.file("standby.console"),
            hb_line,
        )
    }

    /// The standby resumed from checkpoint `epoch`.
    pub fn assert_took_over_from(&self, epoch: u64) {
        let stderr = self.file("standby.stderr");
        assert!(
            stderr.contains(&format!("took over from checkpoint {epoch} ")),
            "the standby must resume from checkpoint {epoch}:\n{stderr}"
        );
    }

    /// The memory CRC `side` ("primary" or "standby") printed for `epoch`
    /// (`--ft-hash-epoch`), once it did.
    pub fn memory_crc(&self, side: &str, epoch: u64) -> Option<String> {
        let prefix = format!("ftvmm: memory crc at epoch {epoch}: ");
        self.file(&format!("{side}.stderr"))
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    /// Both sides printed the same memory CRC for `epoch`.
    pub fn assert_memory_equal(&self, epoch: u64) {
        assert!(
            wait_until(Duration::from_secs(10), || self
                .memory_crc("standby", epoch)
                .is_some()),
            "the standby printed no memory crc for epoch {epoch}"
        );
        let p = self
            .memory_crc("primary", epoch)
            .expect("primary printed no memory crc");
        assert_eq!(
            Some(p),
            self.memory_crc("standby", epoch),
            "guest memory differs between primary and standby at epoch {epoch}"
        );
    }

    pub fn epochs(&self) -> usize {
        self.file("metrics.jsonl").lines().count()
    }

    pub fn wait_epochs(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(90), || self.epochs() >= n),
            "only {} epochs; primary stderr:\n{}\nstandby stderr:\n{}",
            self.epochs(),
            self.file("primary.stderr"),
            self.file("standby.stderr")
        );
    }

    pub fn standby_hbs(&self) -> usize {
        complete_lines(&self.file("standby.console"), hb_line).len()
    }

    /// Waits until the standby took over and printed `n` heartbeats.
    pub fn wait_takeover(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(60), || self.standby_hbs() >= n),
            "standby did not take over; its stderr:\n{}\nconsole:\n{}",
            self.file("standby.stderr"),
            self.file("standby.console")
        );
    }

    pub fn kill_primary(&mut self) {
        if let Some(p) = self.primary.as_mut() {
            p.kill();
        }
    }

    pub fn primary_died_by_itself(&mut self) -> bool {
        let p = self.primary.as_mut().unwrap();
        p.wait(Duration::from_secs(60)).is_some()
    }
}
