//! The errors of a protected run, on either side.

/// Errors of a protected run, on either side.
#[derive(Debug, thiserror::Error)]
pub enum FtError {
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Restoring the VM from a checkpoint.
    #[error(transparent)]
    Restore(#[from] crate::persist::VmRestoreError),
    /// The network output commit.
    #[error(transparent)]
    Netbuf(#[from] ftvmm_netbuf::NetbufError),
    /// The checkpoint transport.
    #[error(transparent)]
    Transport(#[from] ftvmm_transport::TransportError),
    /// The checkpoint stream.
    #[error("checkpoint stream: {0}")]
    Wire(#[from] ftvmm_checkpoint::WireError),
    /// The standby refused the primary.
    #[error("standby {peer} refused this primary: {reason}")]
    Refused {
        /// The standby's address.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The standby took over: this primary is fenced (I5) and stopped.
    #[error("fenced: standby {peer} took over from checkpoint {epoch} as generation {generation}; this primary stopped its guest and released nothing after that checkpoint")]
    Fenced {
        /// The standby.
        peer: String,
        /// The checkpoint it runs from.
        epoch: u64,
        /// Its new generation.
        generation: u64,
    },
    /// The peer sent something out of protocol.
    #[error("protocol error with {peer}: {what}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        what: String,
    },
    /// The seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Dirty logging.
    #[error(transparent)]
    DirtyLog(#[from] crate::dirty_log::DirtyLogError),
    /// Dirty harvest.
    #[error("dirty harvest: {0}")]
    Dirty(#[from] ftvmm_checkpoint::DirtyError),
    /// Staging.
    #[error("staging: {0}")]
    Staging(#[from] ftvmm_checkpoint::StagingError),
    /// State encoding.
    #[error("machine state: {0}")]
    Codec(#[from] ftvmm_checkpoint::CodecError),
    /// Reading guest memory for a checkpoint.
    #[error("cannot read guest page {gpa:#x}: {reason}")]
    GuestMemory {
        /// The page.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// The metrics file.
    #[error("cannot write metrics file '{path}': {source}")]
    Metrics {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Listening for primaries.
    #[error("standby cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        source: ftvmm_transport::TransportError,
    },
    /// The standby was lost (while a caller needed it, e.g. the initial
    /// sync).
    #[error("standby lost: {0}")]
    PeerLost(Box<super::session::PeerLoss>),
    /// Protection asked of a VM started with neither `--ft-key` nor
    /// `--ft-insecure`.
    #[error("this VM was started without --ft-key FILE (or --ft-insecure): it cannot pair with a standby")]
    NoKey,
    /// `ctl protect` on a VM that has a standby.
    #[error("already protected by standby {peer}")]
    AlreadyProtected {
        /// The standby.
        peer: String,
    },
    /// Disk replication.
    #[error(transparent)]
    Disk(#[from] super::disk::DiskError),
    /// The witness could not be asked.
    #[error(transparent)]
    Witness(#[from] super::witness::WitnessError),
    /// The witness gave the next generation to someone else.
    #[error(
        "the witness gave generation {generation} to {owner}: this side must not run the guest"
    )]
    Outvoted {
        /// The generation now in force.
        generation: u64,
        /// Who holds it.
        owner: String,
    },
    /// The control API.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The standby's acceptor thread ended.
    #[error("the standby's acceptor thread ended")]
    AcceptorEnded,
    /// An I/O error on the channel.
    #[error("checkpoint channel: {0}")]
    Io(#[from] std::io::Error),
}
