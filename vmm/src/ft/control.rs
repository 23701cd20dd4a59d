//! The control API of a running VM (`ctl status`, `stats`, `pause`,
//! `resume`, `protect`, `set interval-ms`), answered by the runner's loop
//! between epochs.

use std::time::Duration;

use ftvmm_netbuf::OutputCommit;

use super::engine::PAUSE_TIMEOUT;
use super::runner::Runner;
use super::FtError;
use crate::api::{Request, Response};

impl Runner {
    /// Answers the control request waiting in the mailbox, if any.
    pub(super) fn serve_api(&mut self) {
        let Some((req, reply)) = self.mailbox.as_ref().and_then(|m| m.next()) else {
            return;
        };
        let resp = self.handle(req);
        let _ = reply.send(resp);
    }

    fn status(&self) -> serde_json::Value {
        let session = self.protection.session();
        serde_json::json!({
            "role": self.role,
            "protected": session.is_some(),
            "deciding": matches!(self.protection, super::runner::Protection::Deciding { .. }),
            "witness": self.arbiter.status(),
            "peer": session.map(|s| s.peer().to_string()),
            "generation": self.ft.generation,
            "epoch": self.epoch,
            "interval_ms": self.ft.interval.as_millis() as u64,
            "adaptive": self.adaptive.as_ref().map(|a| {
                let c = a.config();
                serde_json::json!({
                    "min_ms": c.min.as_millis() as u64,
                    "max_ms": c.max.as_millis() as u64,
                    "budget_pct": c.budget * 100.0,
                    "fault_us": c.fault_cost.as_secs_f64() * 1e6,
                    "fault_cost_from": c.fault_source.as_str(),
                    "overhead_pct": a.estimate() * 100.0,
                })
            }),
            "paused": self.user_paused,
            "mem_bytes": self.shape.mem_bytes,
            "vcpus": self.shape.vcpus,
            "took_over_from_epoch": self.took_over.as_ref().map(|t| t.from_epoch),
            "takeover_ms": self.took_over.as_ref().map(|t| t.after_loss.as_secs_f64() * 1e3),
            "takeover_reason": self.took_over.as_ref().map(|t| t.reason.clone()),
        })
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response::ok(self.status()),
            Request::Stats => Response::ok(serde_json::json!({
                "status": self.status(),
                "summary": self.metrics.summary.report(),
                "last_epoch": self.metrics.last,
            })),
            Request::Pause if self.user_paused => Response::error("the guest is already paused"),
            Request::Pause => match self.vm.pause(PAUSE_TIMEOUT) {
                Ok(()) => {
                    self.user_paused = true;
                    Response::ok(self.status())
                }
                Err(e) => {
                    self.vm.resume();
                    Response::error(format!("cannot pause: {e}"))
                }
            },
            Request::Resume if !self.user_paused => Response::error("the guest is not paused"),
            Request::Resume => {
                self.vm.resume();
                self.user_paused = false;
                Response::ok(self.status())
            }
            Request::Failover => Response::error(format!(
                "failover promotes a standby; this VMM is the {} and runs the guest",
                self.role
            )),
            Request::Protect { .. } if self.protection.session().is_some() => Response::error(
                FtError::AlreadyProtected {
                    peer: self
                        .protection
                        .session()
                        .map(|s| s.peer().to_string())
                        .unwrap_or_default(),
                }
                .to_string(),
            ),
            Request::Protect { .. } if self.ft.security.is_none() => {
                Response::error(FtError::NoKey.to_string())
            }
            Request::Protect { .. } if self.user_paused => {
                Response::error("resume the guest before protecting it")
            }
            Request::Protect { peer } => self.handle_protect(&peer),
            Request::SetIntervalMs { ms } if (1..=60_000).contains(&ms) => {
                // The operator's fixed length: adaptive mode ends.
                self.ft.interval = Duration::from_millis(ms);
                self.adaptive = None;
                Response::ok(self.status())
            }
            Request::SetIntervalMs { ms } => {
                Response::error(format!("interval-ms {ms} is out of range (1 to 60000)"))
            }
        }
    }

    fn handle_protect(&mut self, peer: &str) -> Response {
        match self.protect(peer) {
            Ok(()) if self.protection.session().is_some() => Response::ok(self.status()),
            Ok(()) => Response::error(format!("standby {peer} was lost during the initial sync")),
            Err(e @ FtError::Fenced { .. }) => Response::error(e.to_string()),
            Err(e) => {
                // Nothing was committed: output flows as before.
                self.console.release_all();
                Response::error(format!("cannot protect with {peer}: {e}"))
            }
        }
    }
}
