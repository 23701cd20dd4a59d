//! Why the demo failed: one variant per thing that can go wrong, each
//! naming what and where to look.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The pair's key could not be made.
    #[error("cannot make the demo's channel key: {0}")]
    Key(#[from] ftvmm_transport::KeyError),
    /// KVM is not usable.
    #[error("the demo needs KVM: {0}")]
    Kvm(#[from] ftvmm::vm::VmError),
    /// The output directory.
    #[error("cannot create the demo directory '{path}': {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The executable to run the roles with.
    #[error("cannot find the ftvmm executable to run the primary and the standby: {0}")]
    Exe(std::io::Error),
    /// A file the demo writes or reads.
    #[error("cannot {what} '{path}': {source}")]
    File {
        /// "create", "read", "write".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Starting a role.
    #[error("cannot start the {role}: {source}")]
    Spawn {
        /// "primary" or "standby".
        role: &'static str,
        /// What failed.
        source: std::io::Error,
    },
    /// A role ended when it should have been running.
    #[error("the {role} exited early ({status}): {last} (log: {log})")]
    DiedEarly {
        /// "primary" or "standby".
        role: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The last line of its stderr.
        last: String,
        /// Its stderr file.
        log: PathBuf,
    },
    /// Something did not happen in time.
    #[error("{what} within {secs} s (log: {log})")]
    Timeout {
        /// What did not happen, as a sentence start.
        what: &'static str,
        /// The bound.
        secs: u64,
        /// The log to look at.
        log: PathBuf,
    },
    /// A metrics line that is not an epoch record.
    #[error("bad metrics line in '{path}': {line}")]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The line.
        line: String,
    },
    /// A role's control API failed or gave an answer the demo cannot read.
    #[error("the {role}'s control API: {reason}")]
    Api {
        /// "primary" or "standby".
        role: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The pair came apart before the kill.
    #[error("the primary and the standby came apart before the demo killed the primary: the {role} reports {state} (log: {log})")]
    Unpaired {
        /// Who reports it.
        role: &'static str,
        /// What its status says.
        state: String,
        /// Its stderr file.
        log: PathBuf,
    },
    /// The standby had nothing to take over from when the primary was to be
    /// killed.
    #[error("the standby had no committed checkpoint to take over from (log: {})", .0.display())]
    NothingToRun(PathBuf),
    /// The transcript check failed.
    #[error("exactly-once: FAIL: {source} (transcripts: {primary} and {standby})")]
    ExactlyOnce {
        /// How.
        source: ftvmm::transcript::TranscriptError,
        /// The primary's console.
        primary: PathBuf,
        /// The standby's console.
        standby: PathBuf,
    },
    /// The replica check failed.
    #[error("disk replica: FAIL: {source} (replica: {replica})")]
    DiskReplica {
        /// How.
        source: super::replica::ReplicaFail,
        /// The standby's replica image.
        replica: PathBuf,
    },
    /// Ctrl-C or a termination signal.
    #[error("interrupted; the primary and the standby were stopped (files in {0})")]
    Interrupted(PathBuf),
}
