//! Who decides a role change (docs/design.md "Witness"): with `--witness`,
//! every role change — a new pairing, a standby taking over, a primary going
//! on without its standby — is a compare-and-swap of the VM's generation on
//! the witness, g → g + 1, and only the winner proceeds. Without a witness
//! the generation only fences what the notice can reach (a stalled primary);
//! a partition can leave two running copies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::witness::{Advance, Record, Witness, WitnessError};

/// Longest a witness request may take: a role change waits for it.
pub const WITNESS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an undecided role change asks the witness again.
pub const RETRY: Duration = Duration::from_millis(200);

/// What a claim of the next generation came to.
#[derive(Debug)]
pub enum Claim {
    /// This side holds generation `0` now.
    Won(u64),
    /// Someone else changed the record first: this side must stop.
    Lost(Record),
    /// The witness did not answer: nobody may proceed alone; ask again.
    Unreachable(WitnessError),
}

/// The last thing the witness said, for `ctl status` (never a request on
/// the status path: the loop must not wait for the witness to answer one).
#[derive(Debug, Clone, Default)]
struct Seen {
    record: Option<Record>,
    error: Option<String>,
    at: Option<Instant>,
}

/// The arbiter of one VM's role changes.
#[derive(Debug, Clone)]
pub struct Arbiter {
    witness: Option<Arc<Witness>>,
    owner: String,
    seen: Arc<Mutex<Seen>>,
}

impl Arbiter {
    /// No witness: every claim is won (the pre-witness behaviour).
    pub fn none() -> Self {
        Arbiter {
            witness: None,
            owner: String::new(),
            seen: Arc::default(),
        }
    }

    /// Claims go to the witness at `urls`, for VM `vm_id`, as `owner`.
    pub fn witness(urls: &str, vm_id: &str, owner: String) -> Result<Self, WitnessError> {
        Ok(Arbiter {
            witness: Some(Arc::new(Witness::new(urls, vm_id, WITNESS_TIMEOUT)?)),
            owner,
            seen: Arc::default(),
        })
    }

    /// Whether a witness decides.
    pub fn witnessed(&self) -> bool {
        self.witness.is_some()
    }

    fn note(&self, record: Option<Record>, error: Option<String>) {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if record.is_some() {
            s.record = record;
        }
        s.error = error;
        s.at = Some(Instant::now());
    }

    /// Claims generation `from + 1` (see [`Witness::advance`]).
    pub fn claim(&self, from: u64) -> Claim {
        let Some(w) = &self.witness else {
            return Claim::Won(from + 1);
        };
        match w.advance(from, &self.owner) {
            Ok(Advance::Won(r)) => {
                let g = r.generation;
                self.note(Some(r), None);
                Claim::Won(g)
            }
            Ok(Advance::Lost(r)) => {
                self.note(Some(r.clone()), None);
                Claim::Lost(r)
            }
            Err(e) => {
                self.note(None, Some(e.to_string()));
                Claim::Unreachable(e)
            }
        }
    }

    /// Checks that `generation` is the witness's current one (a standby
    /// admitting a primary's Hello).
    pub fn current(&self, generation: u64) -> Result<(), String> {
        let Some(w) = &self.witness else {
            return Ok(());
        };
        match w.read() {
            Ok(Some(r)) if r.generation == generation => {
                self.note(Some(r), None);
                Ok(())
            }
            Ok(Some(r)) => {
                let msg = format!(
                    "generation {generation} is not the witness's current generation {} (owner {})",
                    r.generation, r.owner
                );
                self.note(Some(r), None);
                Err(msg)
            }
            Ok(None) => Err(format!(
                "the witness has no record of this VM (generation {generation} claimed)"
            )),
            Err(e) => {
                self.note(None, Some(e.to_string()));
                Err(format!("cannot check generation {generation}: {e}"))
            }
        }
    }

    /// The witness's state as last seen, for `ctl status`.
    pub fn status(&self) -> serde_json::Value {
        let Some(w) = &self.witness else {
            return serde_json::Value::Null;
        };
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        serde_json::json!({
            "endpoints": w.endpoints(),
            "reachable": s.at.is_some() && s.error.is_none(),
            "error": s.error,
            "generation": s.record.as_ref().map(|r| r.generation),
            "owner": s.record.as_ref().map(|r| r.owner.clone()),
            "seen_ms_ago": s.at.map(|t| t.elapsed().as_millis() as u64),
        })
    }
}
