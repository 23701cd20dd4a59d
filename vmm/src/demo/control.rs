//! The roles as their control APIs (`--api SOCKET`) describe them: the
//! demo's only view of a role's state (readiness, pairing, takeover). Log
//! text is for people; the demo never reads it to learn a role's state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvmm::api::{call_with_timeout, Request};
use serde::Deserialize;

use super::error::DemoError;
use super::proc::{nap, RoleProc};

/// How long a role gets to answer `status`: it answers between epochs (a
/// few ms), so much longer means it is stuck, and the demo says so rather
/// than waiting with it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The role a standby reports once it runs the guest (`ft::primary::Runner`
/// with the role of a standby that took over).
pub const TOOK_OVER: &str = "standby (took over)";
/// The role of a standby that mirrors, or waits for, a primary.
pub const STANDBY: &str = "standby";

/// What the demo reads of a `status` answer. A standby waiting for or
/// mirroring a primary fills `listen`, `paired` and `committed_epoch`; a
/// VMM that runs the guest fills `protected`, and the `took_over_*` fields
/// once a standby has taken over. Other fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RoleStatus {
    /// "primary", "standby" or "standby (took over)".
    pub role: String,
    /// The address the standby listens on for a primary.
    pub listen: Option<String>,
    /// Whether a primary is paired with the standby.
    pub paired: Option<bool>,
    /// The standby's last committed checkpoint.
    pub committed_epoch: Option<u64>,
    /// Whether the running guest is protected by a standby.
    pub protected: Option<bool>,
    /// The checkpoint a standby that took over resumed.
    pub took_over_from_epoch: Option<u64>,
    /// The standby's own measure: from the loss of the primary to the guest
    /// running, ms.
    pub takeover_ms: Option<f64>,
}

/// A role's control socket.
pub struct Control {
    role: &'static str,
    socket: PathBuf,
}

impl Control {
    /// The API of `role` ("primary" or "standby") on `socket`.
    pub fn new(role: &'static str, socket: PathBuf) -> Control {
        Control { role, socket }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its current status.
    pub fn status(&self) -> Result<RoleStatus, DemoError> {
        let err = |reason: String| DemoError::Api {
            role: self.role,
            reason,
        };
        let resp = call_with_timeout(&self.socket, &Request::Status, STATUS_TIMEOUT)
            .map_err(|e| err(e.to_string()))?;
        if !resp.ok {
            return Err(err(resp
                .error
                .unwrap_or_else(|| "status refused".to_string())));
        }
        serde_json::from_value(resp.result).map_err(|e| err(format!("unreadable status: {e}")))
    }

    /// Waits until the API of `proc` answers `status`, which for a standby
    /// means it listens for a primary; an error if the process ends first
    /// or `timeout` passes. `dir` holds the demo's files.
    pub fn wait_ready(
        &self,
        proc: &mut RoleProc,
        timeout: Duration,
        dir: &Path,
    ) -> Result<RoleStatus, DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Not there yet (no socket, or a stale one from an earlier
            // run in the same directory): try again.
            if let Ok(status) = self.status() {
                return Ok(status);
            }
            proc.check_alive()?;
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: "the control API did not answer",
                    secs: timeout.as_secs(),
                    log: proc.stderr.clone(),
                });
            }
            nap(Duration::from_millis(5), dir)?;
        }
    }
}

/// A role: its process and its control API.
pub struct Role {
    /// The process.
    pub proc: RoleProc,
    /// Its control API.
    pub api: Control,
}

impl Role {
    /// Its status; an error naming how it ended if it has.
    pub fn status(&mut self) -> Result<RoleStatus, DemoError> {
        self.api.status().map_err(|e| match self.proc.exited() {
            Some(status) => self.proc.died(status),
            None => e,
        })
    }
}

/// Whether the primary says a standby protects it; if not, what it says.
pub fn check_primary(primary: &RoleStatus) -> Result<(), String> {
    match primary.protected {
        Some(true) => Ok(()),
        p => Err(format!("role {:?}, protected: {}", primary.role, shown(p))),
    }
}

/// Whether the standby says it mirrors a primary; if not, what it says.
/// Returns its last committed checkpoint.
pub fn check_standby(standby: &RoleStatus) -> Result<Option<u64>, String> {
    if standby.role != STANDBY || standby.paired != Some(true) {
        return Err(format!(
            "role {:?}, paired: {}",
            standby.role,
            shown(standby.paired)
        ));
    }
    Ok(standby.committed_epoch)
}

/// A status field as it reads in a message.
fn shown(field: Option<bool>) -> String {
    field.map_or_else(|| "(absent)".to_string(), |b| b.to_string())
}

/// Whether the standby has taken over: the checkpoint it resumed and its
/// own measure of the takeover (ms); an error if its status makes no sense
/// for a standby.
pub fn took_over(standby: &RoleStatus) -> Result<Option<(u64, f64)>, String> {
    match standby.role.as_str() {
        STANDBY => Ok(None),
        TOOK_OVER => match (standby.took_over_from_epoch, standby.takeover_ms) {
            (Some(epoch), Some(ms)) => Ok(Some((epoch, ms))),
            _ => Err(
                "its status after the takeover lacks took_over_from_epoch or takeover_ms".into(),
            ),
        },
        other => Err(format!("unexpected role {other:?}")),
    }
}

/// A directory for the control sockets: `dir`, unless its path is too long
/// for a Unix socket address (108 bytes with the NUL); then a fresh short
/// one, to be removed at the end (the second value).
pub fn socket_dir(dir: &Path) -> Result<(PathBuf, bool), DemoError> {
    const SUN_PATH: usize = 108;
    let longest = dir.join("standby.sock");
    if longest.as_os_str().len() < SUN_PATH {
        return Ok((dir.to_path_buf(), false));
    }
    super::fresh_dir("ftvmm-demo-api").map(|d| (d, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_roles_status() {
        // As ft/standby.rs and ft/primary.rs answer.
        let standby = serde_json::json!({
            "role": "standby", "listen": "127.0.0.1:4000", "paired": true,
            "peer": "127.0.0.1:5000", "generation": 1, "committed_epoch": 12,
            "checkpoints_applied": 12,
        });
        let s: RoleStatus = serde_json::from_value(standby).unwrap();
        assert_eq!(
            (
                s.role.as_str(),
                s.listen.as_deref(),
                s.paired,
                s.committed_epoch
            ),
            (STANDBY, Some("127.0.0.1:4000"), Some(true), Some(12))
        );
        let took = serde_json::json!({
            "role": "standby (took over)", "protected": false, "peer": null,
            "generation": 2, "epoch": 0, "interval_ms": 25, "paused": false,
            "mem_bytes": 134217728, "vcpus": 1, "took_over_from_epoch": 207,
            "takeover_ms": 1.4, "takeover_reason": "the primary closed the connection",
        });
        let t: RoleStatus = serde_json::from_value(took).unwrap();
        assert_eq!(t.role, TOOK_OVER);
        assert_eq!(
            (t.protected, t.took_over_from_epoch, t.takeover_ms),
            (Some(false), Some(207), Some(1.4))
        );
    }

    #[test]
    fn pairing_and_takeover_from_status() {
        let primary = RoleStatus {
            role: "primary".into(),
            protected: Some(true),
            ..Default::default()
        };
        let mut standby = RoleStatus {
            role: STANDBY.into(),
            paired: Some(true),
            committed_epoch: Some(3),
            ..Default::default()
        };
        assert_eq!(check_primary(&primary), Ok(()));
        assert_eq!(check_standby(&standby), Ok(Some(3)));
        assert_eq!(took_over(&standby), Ok(None));
        let alone = RoleStatus {
            protected: Some(false),
            ..primary.clone()
        };
        assert_eq!(
            check_primary(&alone).unwrap_err(),
            "role \"primary\", protected: false"
        );
        standby.paired = Some(false);
        assert!(check_standby(&standby).is_err());
        standby.role = TOOK_OVER.into();
        standby.paired = None;
        assert!(check_standby(&standby).is_err());
        assert!(took_over(&standby).is_err(), "the fields are required");
        standby.took_over_from_epoch = Some(3);
        standby.takeover_ms = Some(2.5);
        assert_eq!(took_over(&standby), Ok(Some((3, 2.5))));
        standby.role = "primary".into();
        assert!(took_over(&standby).is_err());
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_the_role() {
        let c = Control::new("standby", PathBuf::from("/nonexistent/ftvmm-demo.sock"));
        let e = c.status().unwrap_err().to_string();
        assert!(e.starts_with("the standby's control API: "), "{e}");
        assert!(e.contains("/nonexistent/ftvmm-demo.sock"), "{e}");
    }
}
